"""MMDiT backbones: Detail++ on FLUX.1 (``FluxTransformer2DModel``) and SD3 / SD3.5 (``SD3Transformer2DModel``).

:class:`FluxBackbone` and :class:`SD3Backbone` implement :class:`detailpp.method.backbone.Backbone` for one call. A
transformer has no resolution levels: the Detail++ layers are the joint-attention modules of chosen blocks
(:func:`joint_layers`; FLUX's double-stream ``transformer_blocks``, SD3's joint ``transformer_blocks``), sharing in
``DetailConfig.mmdit_share_blocks`` and capturing in ``mmdit_capture_blocks`` (``None``: the family's default,
:data:`FLUX_DEFAULT_BLOCKS`, :data:`SD3_DEFAULT_BLOCKS`; ``docs/method.md`` says why), their processors those of
:mod:`detailpp.backbones.mmdit_attention`. A nursing pass ends after the last capture block. The maps live on the
transformer's token grid (latent / patch size: H/16 x W/16 pixels for both families); FLUX's packed latents (batch x
tokens x 64) are rearranged into an image (batch x 64 x H/16 x W/16) for ALM, SD3's latents are one already and its
patches are 2x2 latent pixels, so its masks are upsampled from the token grid to the latent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from detailpp.backbones.mmdit_attention import FluxDetailProcessor, SD3DetailProcessor, joint_processors
from detailpp.errors import DetailError
from detailpp.method.attention import AttentionState, MaskLayers
from detailpp.method.backbone import stop_after

#: FLUX.1's default Detail++ blocks, as [start, stop) fractions of its double-stream blocks' depth (19 in FLUX.1):
#: (sharing, capturing): share in all of them, capture in blocks 2-9 (subjects localise early; a nursing pass stops
#: after block 9). See docs/method.md, "Detail++ on MMDiT".
FLUX_DEFAULT_BLOCKS: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 1.0), (0.1, 0.5))
#: SD3 / SD3.5's default Detail++ blocks, as [start, stop) fractions of its joint blocks' depth: (sharing, capturing):
#: share in all, capture in blocks 8-17 of SD3.5-large's 38 (5-10 of SD3-medium's 24).
SD3_DEFAULT_BLOCKS: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 1.0), (0.2, 0.45))


def blocks_of(fractions: tuple[float, float], n_blocks: int) -> tuple[int, ...]:
    """The blocks ``i`` with ``start <= i / n_blocks < stop`` (at least one)."""
    start, stop = fractions
    chosen = tuple(i for i in range(n_blocks) if start <= i / n_blocks < stop)
    return chosen or (min(int(start * n_blocks), n_blocks - 1),)


def choose_blocks(
    n_blocks: int,
    defaults: tuple[tuple[float, float], tuple[float, float]],
    share: tuple[int, ...] | None,
    capture: tuple[int, ...] | None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(sharing, capturing) blocks: the config's where given, else the family's defaults for this depth."""
    return (
        blocks_of(defaults[0], n_blocks) if share is None else share,
        blocks_of(defaults[1], n_blocks) if capture is None else capture,
    )


class BlockChoiceError(DetailError, ValueError):
    """``mmdit_share_blocks`` / ``mmdit_capture_blocks`` name a block the transformer does not have."""


def joint_layers(n_blocks: int, share: Sequence[int], capture: Sequence[int], attention: str = "attn") -> MaskLayers:
    """The Detail++ layers of a transformer with ``n_blocks`` joint blocks: ``transformer_blocks.<i>.<attention>``
    for each sharing and capturing block; nursing stops after the last capture block."""
    for what, blocks in (("mmdit_share_blocks", share), ("mmdit_capture_blocks", capture)):
        bad = [b for b in blocks if not 0 <= b < n_blocks]
        if bad:
            raise BlockChoiceError(
                f"{what} names block(s) {bad}, but the transformer has {n_blocks} joint blocks (0-{n_blocks - 1})."
            )
    if not capture:
        raise BlockChoiceError("mmdit_capture_blocks is empty: the masks need at least one capture block.")
    names = [f"transformer_blocks.{b}.{attention}" for b in range(n_blocks)]
    shared = tuple(names[b] for b in sorted(set(share)))
    return MaskLayers(
        self_attention=shared,
        cross_attention=tuple(names[b] for b in sorted(set(capture))),
        level=0,
        last_block=f"transformer_blocks.{max(capture)}",
        shared_self_attention=shared,
    )


@dataclass(frozen=True)
class RowConditioning:
    """A transformer's conditioning for every batch row, complete when built; each row set's keyword arguments are
    gathered once.

    Attributes:
        per_row: keyword arguments with one row per batch row (text embeddings, pooled embeddings, FLUX's guidance).
        shared: keyword arguments passed as they are (FLUX's text and image position ids).
    """

    per_row: Mapping[str, torch.Tensor | None]
    shared: Mapping[str, Any] = field(default_factory=dict)
    _cache: dict[tuple[int, ...], dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def encoder_hidden_states(self) -> torch.Tensor:
        return self.per_row["encoder_hidden_states"]

    @property
    def num_keys(self) -> int:
        """The text tokens the image tokens attend to."""
        return self.encoder_hidden_states.shape[1]

    def rows(self, rows: Sequence[int]) -> dict[str, Any]:
        key = tuple(rows)
        if key not in self._cache:
            index = list(key)
            sliced = {k: None if v is None else v[index] for k, v in self.per_row.items()}
            self._cache[key] = {**sliced, **self.shared}
        return self._cache[key]


class MMDiTBackbone:
    """What FLUX and SD3 share behind the seam (see the module's documentation)."""

    processor_class: type = FluxDetailProcessor
    extras_read_the_step = False

    def __init__(
        self,
        transformer: torch.nn.Module,
        conditioning: RowConditioning,
        grid: tuple[int, int],
        layers: MaskLayers,
        *,
        softmax: str = "text",
        joint_attention_kwargs: dict[str, Any] | None = None,
    ):
        self.denoiser, self.conditioning, self.layers = transformer, conditioning, layers
        self.grid = tuple(grid)
        self.expected_tokens = {name: grid[0] * grid[1] for name in layers.shared_self_attention}
        self.num_keys = conditioning.num_keys
        self.softmax = softmax
        self.joint_attention_kwargs = joint_attention_kwargs

    def processors(self, state: AttentionState, materialise: bool):
        if materialise:
            raise DetailError("materialised_attention applies to UNet pipelines only (the authors' code is a UNet's).")
        return joint_processors(self.denoiser, state, self.processor_class, self.softmax)

    def predict_to_last_capture(self, sample: torch.Tensor, t: torch.Tensor, rows: Sequence[int], step: int) -> None:
        with stop_after(self.denoiser, self.layers.last_block):
            self.predict(sample, t, rows, step)

    def model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x  # flow matching feeds the latents as they are

    def predict(self, sample: torch.Tensor, t: torch.Tensor, rows: Sequence[int], step: int) -> torch.Tensor:
        raise NotImplementedError


class FluxBackbone(MMDiTBackbone):
    """FLUX.1: packed latents (batch x H/16*W/16 tokens x 64), T5 text keys (no start token), the timestep as
    ``t / 1000``, a guidance embedding per row (FLUX.1-dev)."""

    prompt_offset = 0
    processor_class = FluxDetailProcessor

    @property
    def image_size(self) -> tuple[int, int]:
        return self.grid

    def predict(self, sample: torch.Tensor, t: torch.Tensor, rows: Sequence[int], step: int) -> torch.Tensor:
        timestep = t.expand(sample.shape[0]).to(sample.dtype)
        return self.denoiser(
            hidden_states=sample,
            timestep=timestep / 1000,
            joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False,
            **self.conditioning.rows(rows),
        )[0]

    def spatial(self, latents: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, channels) -> (batch, channels, grid height, grid width): one token one pixel."""
        return latents.transpose(1, 2).reshape(latents.shape[0], latents.shape[2], *self.grid)

    def unspatial(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2).contiguous()


class SD3Backbone(MMDiTBackbone):
    """SD3 / SD3.5: latents (batch x 16 x H/8 x W/8) patched 2x2 into tokens, CLIP-then-T5 text keys (the subjects'
    CLIP tokens, after the start token), the timestep as it is."""

    prompt_offset = 1
    processor_class = SD3DetailProcessor

    def __init__(self, *args: Any, latent_hw: tuple[int, int], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.image_size = tuple(latent_hw)

    def predict(self, sample: torch.Tensor, t: torch.Tensor, rows: Sequence[int], step: int) -> torch.Tensor:
        return self.denoiser(
            hidden_states=sample,
            timestep=t.expand(sample.shape[0]),
            joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False,
            **self.conditioning.rows(rows),
        )[0]

    def spatial(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def unspatial(self, x: torch.Tensor) -> torch.Tensor:
        return x


__all__ = [
    "BlockChoiceError",
    "FLUX_DEFAULT_BLOCKS",
    "FluxBackbone",
    "MMDiTBackbone",
    "RowConditioning",
    "SD3Backbone",
    "SD3_DEFAULT_BLOCKS",
    "blocks_of",
    "choose_blocks",
    "joint_layers",
]
