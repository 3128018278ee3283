"""The Detail++ denoising engine: one call's branch batch and its denoising step, independent of the pipeline class.

A pipeline (:class:`detailpp.DetailPlusPlusPipeline` for SDXL; SD 1.x or an SDXL ControlNet would be other thin
subclasses) encodes the branches' prompts into a :class:`Conditioning`, prepares the timesteps and one initial noise
per branch, and then calls :meth:`DetailEngine.step` once per timestep. A step is a row of named stages, in the
order of diffusers' modular SDXL loop (before the denoiser, the denoiser, after the denoiser):

1. :meth:`~DetailEngine.nurse`: attention nursing of branch 0's latent at the first steps (eqs. 6-9,
   :mod:`detailpp.method.nursing`);
2. :meth:`~DetailEngine.predict`: the guided noise prediction of the branches still needed; within the first S steps
   with shared self-attention and subject cross-attention capture (:mod:`detailpp.method.attention`), after them only
   the last branch (pruning) unless every branch's image was asked for;
3. :meth:`~DetailEngine.guide`: classifier-free guidance per branch (and guidance rescale);
4. the scheduler step;
5. :meth:`~DetailEngine.modify`: the step's subject masks from the accumulated maps (eq. 3,
   :mod:`detailpp.method.masks`)
   and Accumulative Latent Modification (eq. 4, :mod:`detailpp.method.latent_modification`).

The engine knows the UNet (``UNet2DConditionModel``'s call signature) and the scheduler, nothing of text encoders,
VAEs or output formats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

from detailpp.config import DetailConfig
from detailpp.method.attention import AttentionState, CaptureSpec, HookError, detail_processors, find_mask_layers
from detailpp.method.latent_modification import FIRST_DETAIL_BRANCH, accumulate_latents
from detailpp.method.masks import MaskAccumulator, binary_masks, normalized_maps
from detailpp.method.nursing import (
    NURSING_GRAPHS_ATTRIBUTE,
    GraphedGradient,
    NursingRecord,
    loss_and_gradient,
    max_iterations,
    moves_weights_in_forward,
    nurse_latent,
    nursing_loss,
    step_size,
    token_columns,
)
from detailpp.plan import BranchTokens

logger = logging.getLogger(__name__)


class UNetExtras(Protocol):
    """Extra UNet keyword arguments for one UNet call of the engine (ControlNet's residuals, for example).

    Called with the step index, the UNet's input ``sample`` (already scaled by the scheduler), the timestep and the
    batch rows of the call (:meth:`BranchLayout.rows_of`); returns keyword arguments merged into the UNet call. The
    nursing pass calls it with gradients enabled, so what it computes from ``sample`` is differentiated too.
    """

    def __call__(self, step: int, sample: torch.Tensor, t: torch.Tensor, rows: Sequence[int]) -> dict[str, Any]: ...


class StopUNet(Exception):
    """Raised by a forward hook to end a nursing pass once every mask layer has run."""


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


@contextmanager
def stop_after(unet: torch.nn.Module, block_name: str) -> Iterator[None]:
    """End ``unet``'s forwards with :class:`StopUNet` after ``block_name`` (nursing needs nothing computed later)."""

    def hook(module, args, output):
        raise StopUNet

    handle = unet.get_submodule(block_name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class BranchLayout:
    """Where each branch sits in the UNet batch: ``[uncond x n, cond x n]`` with classifier-free guidance, else
    ``[cond x n]``. Branch 0 is p0, branch 1 the base prompt p1, branches 2.. the detail branches."""

    n_branches: int
    cfg: bool

    @property
    def branches(self) -> list[int]:
        return list(range(self.n_branches))

    @property
    def last(self) -> int:
        """The branch that becomes the image."""
        return self.n_branches - 1

    @property
    def detail_branches(self) -> list[int]:
        return list(range(FIRST_DETAIL_BRANCH, self.n_branches))

    def rows_of(self, branches: Sequence[int]) -> list[int]:
        """Batch rows of these branches: their unconditional rows, then their conditional rows."""
        return [*branches, *(self.n_branches + b for b in branches)] if self.cfg else list(branches)

    def share_ranges(self, config: DetailConfig) -> list[tuple[int, int]]:
        """The row ranges whose first row's (branch 0's) self-attention every other row of the range uses."""
        if not config.share_attention:
            return []
        n = self.n_branches
        if not self.cfg:
            return [(0, n)]
        return [(0, n), (n, 2 * n)] if config.share_halves == "both" else [(n, 2 * n)]


@dataclass
class Conditioning:
    """The UNet's conditioning for every row of the branch batch, gathered once per row set (not per step).

    Attributes:
        encoder_hidden_states: the text embeddings, one row per batch row.
        added: UNet ``added_cond_kwargs`` with one row per batch row (SDXL: ``text_embeds``, ``time_ids``;
            IP-Adapter: ``image_embeds``, a list of one tensor per adapter); empty for a UNet without them (SD 1.x).
        timestep_cond: the guidance embedding of guidance-distilled UNets (one row, expanded per batch row), or
            ``None``.
    """

    encoder_hidden_states: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)
    timestep_cond: torch.Tensor | None = None
    _cache: dict[tuple[int, ...], dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def num_keys(self) -> int:
        """The text encoder's sequence length (the keys of cross-attention)."""
        return self.encoder_hidden_states.shape[1]

    def rows(self, rows: Sequence[int]) -> dict[str, Any]:
        """The UNet's conditioning keyword arguments for these batch rows."""
        key = tuple(rows)
        if key not in self._cache:
            index = list(key)
            kwargs: dict[str, Any] = {
                "encoder_hidden_states": self.encoder_hidden_states[index],
                "timestep_cond": None if self.timestep_cond is None else self.timestep_cond.expand(len(key), -1),
            }
            if self.added:  # (IP-Adapter's ``image_embeds``: a list, one tensor per adapter)
                kwargs["added_cond_kwargs"] = {
                    k: [e[index] for e in v] if isinstance(v, list) else v[index] for k, v in self.added.items()
                }
            self._cache[key] = kwargs
        return self._cache[key]


class DetailEngine:
    """The Detail++ part of one pipeline call: per-call state and the denoising step, stage by stage.

    Args:
        unet: a ``UNet2DConditionModel`` (or one with its call signature and block names).
        scheduler: the pipeline's scheduler, its timesteps already set.
        config: the call's :class:`~detailpp.config.DetailConfig`.
        layout: the branch batch (:class:`BranchLayout`).
        conditioning: every batch row's conditioning (:class:`Conditioning`).
        tokens: the plan's token positions for this call (:class:`~detailpp.plan.BranchTokens`).
        num_inference_steps: T.
        latent_hw: the latent's height and width.
        device: where the UNet runs.
        guidance_scale, guidance_rescale, cross_attention_kwargs, extra_step_kwargs: as in the pipeline's call.
        keep_all: compute every branch to the end (their images were asked for, or pruning is off).
        return_masks: the caller wants the subject maps (captured even without latent modification).
        unet_extras: extra UNet keyword arguments per UNet call (:class:`UNetExtras`; ControlNet's residuals).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        scheduler: Any,
        config: DetailConfig,
        layout: BranchLayout,
        conditioning: Conditioning,
        tokens: BranchTokens,
        *,
        num_inference_steps: int,
        latent_hw: tuple[int, int],
        device: torch.device,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        cross_attention_kwargs: dict[str, Any] | None = None,
        extra_step_kwargs: dict[str, Any] | None = None,
        keep_all: bool = False,
        return_masks: bool = False,
        unet_extras: UNetExtras | None = None,
    ):
        self.unet, self.scheduler, self.config, self.layout = unet, scheduler, config, layout
        self.conditioning, self.tokens, self.device = conditioning, tokens, device
        self.num_inference_steps, self.latent_hw = num_inference_steps, latent_hw
        self.guidance_scale, self.guidance_rescale = guidance_scale, guidance_rescale
        self.cross_attention_kwargs = cross_attention_kwargs
        self.extra_step_kwargs = extra_step_kwargs or {}
        self.keep_all = keep_all or not config.prune_branches
        self.unet_extras = unet_extras
        #: the step being computed (what :attr:`unet_extras` is told)
        self.current_step = 0
        authors = config.authors

        self.layers = find_mask_layers(unet, share=config.share_layers if config.share_attention else "lowest")
        self.state = AttentionState(
            self.layers, self.layers.token_grid(*latent_hw), self.layers.expected_tokens(*latent_hw)
        )
        self.share_steps = config.num_share_steps(num_inference_steps)
        self.modify_steps = config.num_modify_steps(num_inference_steps)
        self.n_detail = len(layout.detail_branches)
        self.capture = self._capture_spec() if self.wants_masks(config, self.n_detail, return_masks) else None
        self.share = layout.share_ranges(config)
        self.nursing_steps = self.num_nursing_steps(config, self.n_detail)
        self.nursing_capture = CaptureSpec(rows=[0], tokens=[], full=True)
        self.accumulator = MaskAccumulator(
            config.mask_average, aliased=authors.aliased_mask_sum and config.resolved_mask_source == "previous"
        )
        #: the running sum of the nursing maps over every pass so far (``authors.nursing_maps_all_passes``)
        self.nursing_history: dict[str, Any] = {"sum": None, "passes": 0}
        #: the accumulated subject maps of the latest step within the window (subjects x tokens), or ``None``
        self.last_maps: torch.Tensor | None = None
        self.nursing_records: list[NursingRecord] = []
        #: nursing passes as one function of the UNet input (:meth:`nursing_gradient`), CUDA-graphed on a GPU
        self.nursing_graphs = self.wants_nursing_graphs() and self.graphable_nursing()
        self._nursing_graph: GraphedGradient | None = None
        self._nursing_columns: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ what the call needs

    @staticmethod
    def wants_masks(config: DetailConfig, n_detail: int, return_masks: bool) -> bool:
        """Whether a call captures subject maps: detail branches, and latent modification on or masks asked for."""
        return n_detail > 0 and (config.latent_modification or return_masks)

    @classmethod
    def needs_previous_tokens(cls, config: DetailConfig, n_detail: int, return_masks: bool) -> bool:
        """Whether a call reads each subject's tokens in the previous branch's prompt (masks from ``"previous"``)."""
        return config.resolved_mask_source == "previous" and cls.wants_masks(config, n_detail, return_masks)

    @staticmethod
    def num_nursing_steps(config: DetailConfig, n_detail: int) -> int:
        """How many of the first steps nurse branch 0 (none without detail branches or without a loss term)."""
        if not (config.nursing and n_detail > 0) or not (config.entropy_loss or config.centroid_alignment):
            return 0
        return config.nursing_steps

    def _capture_spec(self) -> CaptureSpec:
        """Whose cross-attention makes each subject's mask: branch 0's (``"full"``) or the previous branch's."""
        rows_of = self.layout.rows_of
        if self.config.resolved_mask_source == "full":
            return CaptureSpec(rows=[rows_of([0])[-1]] * self.n_detail, tokens=[list(t) for t in self.tokens.in_full])
        rows = [rows_of([i - 1])[-1] for i in self.layout.detail_branches]
        return CaptureSpec(rows=rows, tokens=[list(t) for t in self.tokens.in_previous])

    @contextmanager
    def attention(self) -> Iterator[None]:
        """Detail++'s attention processors installed for the block, when the call needs any; restored after."""
        uses = (
            bool(self.share)
            or self.capture is not None
            or self.nursing_steps > 0
            or self.config.materialised_attention
        )
        processors = detail_processors(self.unet, self.state, self.config.materialised_attention) if uses else None
        with processors or nullcontext():
            yield

    # ------------------------------------------------------------------ the step

    def step(self, i: int, t: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One denoising step of every branch: nurse, predict, scheduler step, masks and ALM.

        Returns the new latents (one row per branch) and the step's binary subject masks (``None`` in steps without
        latent modification).
        """
        self.current_step = i
        latents = self.nurse(i, t, latents)
        eps = self.predict(i, t, latents)
        dtype = latents.dtype
        latents = self.scheduler.step(eps, t, latents, **self.extra_step_kwargs, return_dict=False)[0]
        latents, masks = self.modify(i, latents)
        return latents.to(dtype), masks

    def nurse(self, i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Before the denoiser: move branch 0's latent down the nursing loss's gradient (steps < nursing steps)."""
        if i >= self.nursing_steps:
            return latents
        config, train_steps = self.config, self.scheduler.config.num_train_timesteps
        record = NursingRecord(step=i)
        started = time.perf_counter()
        graphed = self.nursing_graphs
        with frozen_parameters(self.unet):
            latents[0:1] = nurse_latent(
                latents[0:1],
                None if graphed else lambda z0: self.nursing_loss(z0, t),
                iterations=max_iterations(config, float(t), train_steps),
                threshold=config.threshold_at(i, self.n_detail, self.state.num_tokens),
                alpha=step_size(config, i, self.num_inference_steps, train_steps),
                record=record,
                update_then_test=config.authors.update_then_test,
                gradient_of=(lambda z0: self.nursing_gradient(z0, t)) if graphed else None,
            )
        last = min(self.nursing_steps, self.num_inference_steps) - 1
        if i == last and self._nursing_graph is not None:
            self._nursing_graph.release()  # its memory pool is free for the steps after nursing (and the decode)
            self._nursing_graph = None
        logger.debug("nursing at step %d took %.3f s", i, time.perf_counter() - started)
        self.nursing_records.append(record)
        return latents

    def nursing_loss(self, z0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 6 on branch 0's conditional cross-attention, from a UNet pass cut after the last mask layer."""
        authors = self.config.authors
        sample = z0 if authors.unscaled_nursing_input else self.scheduler.scale_model_input(z0, t)
        probs = self.nursing_probs(sample, t)
        if authors.nursing_maps_all_passes:  # one store for every pass; the gradient flows through this one
            history = self.nursing_history
            total = probs if history["sum"] is None else history["sum"] + probs
            history["sum"], history["passes"] = total.detach(), history["passes"] + 1
            probs = total / history["passes"]
        tokens = [list(t) for t in self.tokens.in_full]
        return nursing_loss(probs, tokens, self.tokens.prompt_length, self.state.grid, self.config)

    def nursing_probs(self, sample: torch.Tensor, t: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Branch 0's head- and layer-averaged conditional cross-attention (tokens x keys) from the UNet input
        ``sample``, the UNet cut after the last mask layer. ``check=False`` reads nothing back from the device (no
        hook check; the layer count is the mask layers'): what a CUDA graph can capture."""
        state = self.state
        state.begin(capture=self.nursing_capture, device=self.device, num_keys=self.conditioning.num_keys)
        try:
            with stop_after(self.unet, self.layers.last_block):
                self.call_unet(sample, t, self.layout.rows_of([0])[-1:])
        except StopUNet:
            pass
        if not check:
            state.end(expect_self=False, expect_cross=False)
            return state.full_probs / len(self.layers.cross_attention)
        state.end(expect_self=False)
        return state.mean_full_probs()

    # ------------------------------------------------------------------ nursing as one function (CUDA graphs)

    def wants_nursing_graphs(self) -> bool:
        """The UNet's switch (:func:`detailpp.method.compile.nursing_graphs`): on, off, or unset: on for CUDA."""
        setting = getattr(self.unet, NURSING_GRAPHS_ATTRIBUTE, None)
        return bool(setting) if setting is not None else torch.device(self.device).type == "cuda"

    def graphable_nursing(self) -> bool:
        """Whether a nursing pass is a pure function of the UNet input and the timestep, with weights that stay put:
        no per-pass history (``authors.nursing_maps_all_passes``), no host-made kernel (``authors.opencv_blur``),
        no :attr:`unet_extras` (they see the step index), no hook that moves or skips weights
        (:func:`~detailpp.method.nursing.moves_weights_in_forward`)."""
        authors = self.config.authors
        if authors.nursing_maps_all_passes or authors.opencv_blur or self.unet_extras is not None:
            return False
        if self.nursing_steps == 0:
            return True
        moving = moves_weights_in_forward(self.unet)
        if moving:
            logger.info("Nursing passes run eagerly, not as CUDA graphs: %s.", ", ".join(moving))
        return not moving

    def sample_loss(self, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 6 from the UNet input ``sample`` (what :class:`~detailpp.method.nursing.GraphedGradient` captures)."""
        if self._nursing_columns is None or self._nursing_columns[0].device != sample.device:
            self._nursing_columns = token_columns(self.tokens.in_full, sample.device)
        probs = self.nursing_probs(sample, t, check=False)
        tokens = [list(t) for t in self.tokens.in_full]
        return nursing_loss(
            probs, tokens, self.tokens.prompt_length, self.state.grid, self.config, self._nursing_columns
        )

    def nursing_gradient(self, z0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One nursing pass: the loss and its gradient with respect to ``z0`` (a leaf that requires grad).

        The pass runs from the UNet input, a leaf of its own: replayed as a CUDA graph on a GPU (the first pass of
        a call warms up and captures), eagerly elsewhere; the gradient then flows back through the scheduler's
        input scaling. The same kernels on the same values as :meth:`nursing_loss` and ``autograd.grad``.
        """
        with torch.enable_grad():
            sample = z0 if self.config.authors.unscaled_nursing_input else self.scheduler.scale_model_input(z0, t)
        leaf = sample.detach().requires_grad_(True)
        if leaf.device.type == "cuda":
            first = self._nursing_graph is None
            if first:
                self._nursing_graph = GraphedGradient(self.sample_loss)
            t_in = t if torch.is_tensor(t) and t.device == leaf.device else torch.as_tensor(t, device=leaf.device)
            loss, grad = self._nursing_graph(leaf, t_in)
            if first and self.state.cross_calls != len(self.layers.cross_attention):
                raise HookError(
                    f"Nursing's cross-attention capture ran in {self.state.cross_calls} of "
                    f"{len(self.layers.cross_attention)} layers; another processor bypassed Detail++'s hooks."
                )
        else:
            loss, grad = loss_and_gradient(self.sample_loss, leaf, t)
        if sample is z0:
            return loss, grad
        (grad_z0,) = torch.autograd.grad(sample, z0, grad)
        return loss, grad_z0

    def predict(self, i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser: every branch's guided noise within the window (sharing and capturing), after it the last
        branch's (and the others' when kept)."""
        every, last = self.layout.branches, self.layout.last
        if i < self.share_steps:
            self.state.begin(
                share=self.share, capture=self.capture, device=self.device, num_keys=self.conditioning.num_keys
            )
            eps = self.denoise(every, latents, t)
            self.state.end()
            if self.capture is not None:
                self.last_maps = self.accumulator.update(self.state.mean_maps())
            return eps
        if self.keep_all and self.config.authors.one_batch_after_window:
            return self.denoise(every, latents, t)  # the authors' code: one batch to the end
        # After the window only the last branch feeds the final image. It always runs on its own, so that neither
        # pruning nor asking for the other branches' images can change it.
        eps = self.denoise([last], latents[last:], t)
        if self.keep_all:
            return torch.cat([self.denoise(every[:last], latents[:last], t), eps])
        return eps.expand_as(latents).clone()

    def denoise(self, branches: list[int], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Guided noise prediction of ``branches`` (latents ``x``, one row per branch): one UNet call."""
        cfg = self.layout.cfg
        model_input = self.scheduler.scale_model_input(torch.cat([x, x]) if cfg else x, t)
        eps = self.call_unet(model_input, t, self.layout.rows_of(branches))[0]
        return self.guide(eps) if cfg else eps

    def call_unet(self, sample: torch.Tensor, t: torch.Tensor, rows: list[int]) -> Any:
        """One UNet call on these batch rows, with their conditioning and the :attr:`unet_extras`."""
        extras = {} if self.unet_extras is None else self.unet_extras(self.current_step, sample, t, rows)
        return self.unet(
            sample,
            t,
            cross_attention_kwargs=self.cross_attention_kwargs,
            return_dict=False,
            **self.conditioning.rows(rows),
            **extras,
        )

    def guide(self, eps: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance per branch on ``[uncond, cond]`` predictions (and guidance rescale)."""
        eps_uncond, eps_text = eps.chunk(2)
        eps = eps_uncond + self.guidance_scale * (eps_text - eps_uncond)
        if self.guidance_rescale > 0.0:
            eps = rescale_noise_cfg(eps, eps_text, guidance_rescale=self.guidance_rescale)
        return eps

    def modify(self, i: int, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """After the denoiser: the step's binary masks (eq. 3) and Accumulative Latent Modification (eq. 4)."""
        if i >= self.modify_steps or not self.config.latent_modification or self.last_maps is None:
            return latents, None
        authors = self.config.authors
        normalized = normalized_maps(self.last_maps, self.state.grid, self.latent_hw)
        masks = binary_masks(normalized, self.config.mask_threshold, relative=authors.relative_mask_threshold)
        return accumulate_latents(latents, masks, blend=authors.blend_latents), masks

    def masks(self) -> torch.Tensor | None:
        """Each detail branch's normalised subject map at the end of the window (on the CPU), or ``None``."""
        if self.last_maps is None:
            return None
        return normalized_maps(self.last_maps, self.state.grid, self.latent_hw).cpu()


__all__ = [
    "BranchLayout",
    "Conditioning",
    "DetailEngine",
    "StopUNet",
    "UNetExtras",
    "frozen_parameters",
    "stop_after",
]
