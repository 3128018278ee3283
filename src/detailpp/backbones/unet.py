"""The UNet backbone: Detail++ on diffusers' ``UNet2DConditionModel`` (SDXL, SD 1.x/2.x, SDXL + ControlNet).

:class:`UNetBackbone` implements :class:`detailpp.method.backbone.Backbone` for one call: the mask layers are the
lowest resolution level at which both the down and the up path have attention (:func:`find_mask_layers`; SDXL:
``down_blocks.2``, ``mid_block``, ``up_blocks.0``, 32x32 tokens at 1024x1024; SD 1.x/2.x: ``down_blocks.2``,
``up_blocks.1``, 16x16 at 512x512), found from the UNet's structure and the call's latent size; their processors are
:mod:`detailpp.backbones.unet_attention`'s; the rows' conditioning is :class:`Conditioning` (text embeddings, SDXL's
added conditioning, IP-Adapter's image embeddings, a guidance embedding), built once and complete; extra UNet inputs
per call (ControlNet's residuals) come from an :class:`UNetExtras`. The latents are already an image
(batch x 4 x H x W): masks are upsampled from the token grid onto them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from diffusers.models.attention_processor import Attention

from detailpp.backbones.unet_attention import detail_processors
from detailpp.method.attention import AttentionState, MaskLayers
from detailpp.method.backbone import stop_after

#: Text keys of a CLIP-encoded prompt, and where the prompt's first token sits (after the start token).
CLIP_PROMPT_OFFSET = 1


@dataclass(frozen=True)
class UNetMaskLayers(MaskLayers):
    """A UNet's mask layers; their group (``level``) is a resolution level: the number of 2x downsamplings above
    the latent."""

    def token_grid(self, latent_height: int, latent_width: int, level: int | None = None) -> tuple[int, int]:
        """Token grid of the layers at ``level`` (default: the mask layers') for a latent of this size."""
        h, w = latent_height, latent_width
        for _ in range(self.level if level is None else level):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def expected_tokens(self, latent_height: int, latent_width: int) -> dict[str, int]:
        """Token count every Detail++ self-attention layer must meet in a call with this latent size."""
        out = {}
        for name in self.shared_self_attention:
            h, w = self.token_grid(latent_height, latent_width, self.group_of(name))
            out[name] = h * w
        return out


def _block_levels(unet: torch.nn.Module) -> dict[str, int]:
    """Resolution level (downsamplings so far) of every down, mid and up block of a UNet2DConditionModel."""
    levels: dict[str, int] = {}
    level = 0
    for i, block in enumerate(unet.down_blocks):
        levels[f"down_blocks.{i}"] = level
        if getattr(block, "downsamplers", None) is not None:
            level += 1
    levels["mid_block"] = level
    for i, block in enumerate(unet.up_blocks):
        levels[f"up_blocks.{i}"] = level
        if getattr(block, "upsamplers", None) is not None:
            level -= 1
    return levels


def _block_of(module_name: str) -> str:
    return "mid_block" if module_name.startswith("mid_block") else ".".join(module_name.split(".")[:2])


def find_mask_layers(unet: torch.nn.Module, share: str = "lowest") -> UNetMaskLayers:
    """The Detail++ attention layers of a UNet: the lowest resolution level at which both the down path and the up
    path have attention layers, by module name (plus the mid block's layers when the mid block sits at that level).

    SDXL's lowest attention level holds ``down_blocks.2``, ``mid_block`` and ``up_blocks.0`` (32x32 tokens at
    1024x1024). Stable Diffusion 1.x/2.x downsample once more: their mid block alone sits at 8x8 (at 512x512; one
    self- and one cross-attention layer), below the down and up paths' lowest attention level, 16x16
    (``down_blocks.2``, ``up_blocks.1``), which is the one taken (the mid block is not). A UNet whose down or up path
    has no attention layer at all falls back to the layers with the fewest tokens.

    ``share="lowest"`` shares self-attention in those layers only (the paper); ``"all"`` in every self-attention
    layer of the down, mid and up blocks.
    """
    if share not in ("lowest", "all"):
        raise ValueError(f"share must be 'lowest' or 'all', got {share!r}.")
    levels = _block_levels(unet)
    found: list[tuple[int, str, bool]] = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            block = _block_of(name)
            if block in levels:
                found.append((levels[block], name, module.is_cross_attention))
    if not found:
        raise ValueError("The UNet has no attention layers in its down/mid/up blocks; Detail++ needs them.")
    down = {lv for lv, n, _ in found if n.startswith("down_blocks.")}
    up = {lv for lv, n, _ in found if n.startswith("up_blocks.")}
    level = max(down & up) if down & up else max(lv for lv, _, _ in found)
    chosen = [(n, cross) for lv, n, cross in found if lv == level]
    order = list(levels)
    last_block = max({_block_of(n) for n, _ in chosen}, key=order.index)
    self_names = tuple(n for n, cross in chosen if not cross)
    shared = self_names if share == "lowest" else tuple(n for _, n, cross in found if not cross)
    return UNetMaskLayers(
        self_attention=self_names,
        cross_attention=tuple(n for n, cross in chosen if cross),
        level=level,
        last_block=last_block,
        shared_self_attention=shared,
        levels={n: lv for lv, n, _ in found},
    )


@dataclass(frozen=True)
class Conditioning:
    """The UNet's conditioning for every row of the branch batch, complete when built; each row set's keyword
    arguments are gathered once (not per step).

    Attributes:
        encoder_hidden_states: the text embeddings, one row per batch row.
        added: UNet ``added_cond_kwargs`` with one row per batch row (SDXL: ``text_embeds``, ``time_ids``;
            IP-Adapter: ``image_embeds``, a list of one tensor per adapter); empty for a UNet without them (SD 1.x).
        timestep_cond: the guidance embedding of guidance-distilled UNets (one row, expanded per batch row), or
            ``None``.
    """

    encoder_hidden_states: torch.Tensor
    added: Mapping[str, Any] = field(default_factory=dict)
    timestep_cond: torch.Tensor | None = None
    _cache: dict[tuple[int, ...], dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)

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


class UNetExtras(Protocol):
    """Extra UNet keyword arguments for one UNet call (ControlNet's residuals, for example).

    Called with the step index, the UNet's input ``sample`` (already scaled by the scheduler), the timestep and the
    batch rows of the call; returns keyword arguments merged into the UNet call. A nursing pass calls it with
    gradients enabled, so what it computes from ``sample`` is differentiated too.
    """

    def __call__(self, step: int, sample: torch.Tensor, t: torch.Tensor, rows: Sequence[int]) -> dict[str, Any]: ...


class UNetBackbone:
    """:class:`~detailpp.method.backbone.Backbone` for a ``UNet2DConditionModel`` in one call.

    Args:
        unet: the pipeline's UNet (or a module with its call signature and block names).
        scheduler: the pipeline's scheduler (its ``scale_model_input`` makes the UNet's input).
        conditioning: every batch row's conditioning.
        latent_hw: the latent's height and width.
        share_layers: ``"lowest"`` (the paper) or ``"all"`` (``DetailConfig.share_layers``).
        cross_attention_kwargs: passed to every UNet call (LoRA's ``scale``, IP-Adapter's settings).
        extras: extra UNet inputs per call (:class:`UNetExtras`; ControlNet's residuals).
    """

    prompt_offset = CLIP_PROMPT_OFFSET

    def __init__(
        self,
        unet: torch.nn.Module,
        scheduler: Any,
        conditioning: Conditioning,
        latent_hw: tuple[int, int],
        *,
        share_layers: str = "lowest",
        cross_attention_kwargs: dict[str, Any] | None = None,
        extras: UNetExtras | None = None,
    ):
        self.denoiser, self.scheduler, self.conditioning = unet, scheduler, conditioning
        self.cross_attention_kwargs, self.extras = cross_attention_kwargs, extras
        self.layers = find_mask_layers(unet, share=share_layers)
        self.grid = self.layers.token_grid(*latent_hw)
        self.image_size = tuple(latent_hw)
        self.expected_tokens = self.layers.expected_tokens(*latent_hw)
        self.num_keys = conditioning.num_keys
        self.extras_read_the_step = extras is not None

    def processors(self, state: AttentionState, materialise: bool):
        """Detail++'s processors on the mask layers for the block (:func:`~detailpp.backbones.unet_attention.
        detail_processors`)."""
        return detail_processors(self.denoiser, state, materialise)

    def predict(self, sample: torch.Tensor, t: torch.Tensor, rows: Sequence[int], step: int) -> torch.Tensor:
        """One UNet call on these batch rows, with their conditioning and the call's extras."""
        extras = {} if self.extras is None else self.extras(step, sample, t, rows)
        return self.denoiser(
            sample,
            t,
            cross_attention_kwargs=self.cross_attention_kwargs,
            return_dict=False,
            **self.conditioning.rows(rows),
            **extras,
        )[0]

    def predict_to_last_capture(self, sample: torch.Tensor, t: torch.Tensor, rows: Sequence[int], step: int) -> None:
        """A UNet call cut after the block that holds the last mask layer (``layers.last_block``)."""
        with stop_after(self.denoiser, self.layers.last_block):
            self.predict(sample, t, rows, step)

    def model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.scale_model_input(x, t)

    def spatial(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def unspatial(self, x: torch.Tensor) -> torch.Tensor:
        return x


__all__ = [
    "Conditioning",
    "UNetBackbone",
    "UNetExtras",
    "UNetMaskLayers",
    "find_mask_layers",
]
