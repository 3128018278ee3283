"""The backbone seam: everything the engine needs from the denoiser, behind one small interface.

The engine (:mod:`detailpp.method.engine`) and nursing (:mod:`detailpp.method.nursing`) run Detail++ on any denoiser
that implements :class:`Backbone`; they import nothing of a UNet or a transformer. A backbone is made for one call
(it holds the call's conditioning and latent geometry) by the pipeline, and answers five questions:

- **run a batch of rows** (:meth:`Backbone.predict`): the denoiser's prediction for the given batch rows (each row
  one branch's unconditional or conditional input), with those rows' conditioning;
- **which layers** (:attr:`Backbone.layers`, :meth:`Backbone.processors`): where self-attention is shared and where
  image-to-text attention is captured, and the processors installed there for the call (restored after it);
- **stop early** (:meth:`Backbone.predict_to_last_capture`): a nursing pass needs the capture layers only, so the
  forward ends after the last of them;
- **geometry** (:attr:`Backbone.grid`, :meth:`Backbone.spatial`, :meth:`Backbone.unspatial`): the token grid the
  captured maps live on, and the latents as a ``(batch, channels, height, width)`` image that the masks of eq. 3 are
  upsampled onto and ALM (eq. 4) blends (a UNet's latents are that already; a transformer's packed tokens are
  rearranged);
- **the text keys** (:attr:`Backbone.num_keys`, :attr:`Backbone.prompt_offset`): how many text keys the capture
  layers attend to, and where the prompt's first token sits among them (1 after CLIP's start token, 0 for T5).

:mod:`detailpp.backbones.unet` implements it for diffusers' ``UNet2DConditionModel`` (SDXL, SD 1.x/2.x, ControlNet).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch

from detailpp.method.attention import AttentionState, MaskLayers


class StopForward(Exception):
    """Raised by a forward hook to end a denoiser call once every capture layer has run (a nursing pass)."""


class _StopAfter(torch.nn.Module):
    """Runs the wrapped module, then raises :class:`StopForward`: outside the module's own call, so that a compiled
    module (``module.compile()`` compiles its hooks with it) stays one graph."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str):  # the parent's forward reads the block's attributes (a UNet's resnets...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, *args, **kwargs):
        self.inner(*args, **kwargs)
        raise StopForward


@contextmanager
def stop_after(module: torch.nn.Module, name: str) -> Iterator[None]:
    """End ``module``'s forwards after its submodule ``name``: a forward inside the block stops there (with
    :class:`StopForward`, caught at the block's end, so the rest of the block is skipped).

    The submodule is swapped for a wrapper in its parent for the block (and put back after): a forward hook would
    raise inside a compiled block and break its graph.
    """
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name)
    inner = parent._modules[child]
    parent._modules[child] = _StopAfter(inner)
    try:
        yield
    except StopForward:
        pass
    finally:
        parent._modules[child] = inner


@contextmanager
def frozen_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Parameters of ``module`` stop requiring gradients for the block, then get their flags back.

    Nursing needs the gradient of the latent only. Weights that require gradients (the default for a loaded model)
    make autograd keep every linear and convolution's input alive for weight gradients that are never computed; frozen,
    the pass keeps only what the latent's gradient needs. The gradient itself is the same.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class Backbone(Protocol):
    """The denoiser of one Detail++ call, as the engine sees it (see the module's documentation).

    Attributes:
        denoiser: the module that runs (frozen during nursing; checked for weights that move between forwards).
        layers: the Detail++ attention layers (:class:`~detailpp.method.attention.MaskLayers`).
        grid: the token grid of the capture layers for this call's latent size.
        image_size: the (height, width) of the latents seen as an image (:meth:`spatial`): the masks' size.
        expected_tokens: the token count each shared self-attention layer must meet in this call.
        num_keys: the text keys the capture layers attend to.
        prompt_offset: the position of the prompt's first token among the keys.
        extras_read_the_step: whether a call's inputs depend on the step index beyond the sample and the timestep
            (ControlNet's scheduled scale): a nursing pass is then no pure function of its inputs (no CUDA graph).
    """

    denoiser: torch.nn.Module
    layers: MaskLayers
    grid: tuple[int, int]
    image_size: tuple[int, int]
    expected_tokens: Mapping[str, int]
    num_keys: int
    prompt_offset: int
    extras_read_the_step: bool

    def processors(self, state: AttentionState, materialise: bool) -> AbstractContextManager:
        """Install Detail++'s processors on :attr:`layers` (and, with ``materialise``, materialising processors on
        every other attention layer) for the block; restore exactly the replaced ones after it."""
        ...

    def predict(self, sample: torch.Tensor, t: torch.Tensor, rows: Sequence[int], step: int) -> torch.Tensor:
        """One denoiser call on the batch ``rows`` (``sample``: their model input, one row each); the prediction."""
        ...

    def predict_to_last_capture(self, sample: torch.Tensor, t: torch.Tensor, rows: Sequence[int], step: int) -> None:
        """A denoiser call on ``rows`` that ends after the last capture layer (the maps land in the state)."""
        ...

    def model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's input for latents ``x`` at ``t`` (the scheduler's input scaling, where it has one)."""
        ...

    def spatial(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents as (batch, channels, height, width), on :attr:`grid`'s aspect: what masks apply to."""
        ...

    def unspatial(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`spatial`."""
        ...


__all__ = ["Backbone", "StopForward", "frozen_parameters", "stop_after"]
