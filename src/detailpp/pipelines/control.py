"""ControlNet's residuals for the Detail++ branch batch: the engine's :class:`~detailpp.backbones.unet.UNetExtras` for
SDXL ControlNet (one ``ControlNetModel`` or a ``MultiControlNetModel``).

What is computed once and what is repeated. Every branch of a Detail++ call denoises the same layout (the branches
differ only in their prompts), so one control image serves them all. Before each UNet call of the engine,
:class:`ControlResiduals` runs the ControlNet ONCE, on the FIRST branch of the call's rows: that branch's latent (the
call's ``sample`` row of its unconditional and of its conditional row), its prompt's conditioning
(:meth:`Conditioning.rows <detailpp.backbones.unet.Conditioning.rows>`) and the matching half of the CFG-doubled
control image. The residuals are then repeated to every row of the call: each unconditional row gets the unconditional
residual, each conditional row the conditional one. Within the sharing window the first branch is p0 (branch 0),
whose self-attention every branch shares too; the ControlNet's own attention layers keep their processors.

Why it is exact for the image. After the window the engine calls the UNet on the last branch alone (the branch that
becomes the image), so that branch is its own first branch: its residuals are computed from its own latent, prompt
and the control image, batch ``[uncond, cond]``, which is exactly what ``StableDiffusionXLControlNetPipeline``
computes for a one-image call. (Only when every branch is kept to the end in one batch, the authors' preset's
``one_batch_after_window``, does p0 stay the first branch, its residuals serving every branch to the end.) The nursing
pass (branch 0's conditional row, gradients on) gets the conditional
residual computed from its own ``sample`` with gradients, the ControlNet's weights frozen for the pass.

Per-step scale: diffusers' ``controlnet_keep`` (:func:`controlnet_keep`): a ControlNet contributes at step ``i`` of
``T`` unless ``i / T < control_guidance_start`` or ``(i + 1) / T > control_guidance_end``; its residuals are
multiplied by ``controlnet_conditioning_scale`` times that keep (0 or 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from detailpp.backbones.unet import Conditioning
from detailpp.method.backbone import frozen_parameters
from detailpp.method.engine import BranchLayout

#: The UNet's ``added_cond_kwargs`` the ControlNet reads (diffusers gives it SDXL's text and time embeddings).
CONTROLNET_ADDED = ("text_embeds", "time_ids")


def as_list(value: Any, n: int) -> list:
    """``value`` as a list of ``n`` (a list or tuple is kept as it is)."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def align_guidance(start: float | list[float], end: float | list[float], n_nets: int) -> tuple[list, list]:
    """``control_guidance_start``/``end`` as lists of one value per ControlNet (diffusers' alignment)."""
    if isinstance(start, (list, tuple)) or isinstance(end, (list, tuple)):
        n = len(start) if isinstance(start, (list, tuple)) else len(end)
        return as_list(start, n), as_list(end, n)
    return [start] * n_nets, [end] * n_nets


def controlnet_keep(num_steps: int, start: Sequence[float], end: Sequence[float]) -> list[list[float]]:
    """Per step, per ControlNet: 1.0 where it guides that step, else 0.0 (diffusers' ``controlnet_keep``)."""
    return [
        [1.0 - float(i / num_steps < s or (i + 1) / num_steps > e) for s, e in zip(start, end, strict=True)]
        for i in range(num_steps)
    ]


@dataclass
class ControlResiduals:
    """ControlNet's ``down_block_additional_residuals`` and ``mid_block_additional_residual`` for each UNet call of
    the engine (an :class:`~detailpp.backbones.unet.UNetExtras`; see the module's documentation).

    Attributes:
        controlnet: a ``ControlNetModel`` or a ``MultiControlNetModel``.
        images: the prepared control image (``prepare_image``: batch 1, ``[uncond, cond]`` with CFG), one tensor per
            ControlNet.
        scales: ``controlnet_conditioning_scale``, one per ControlNet.
        start, end: ``control_guidance_start``/``end``, one per ControlNet.
        layout: the branch batch.
        conditioning: every batch row's conditioning.
        num_timesteps: the call's number of timesteps.
    """

    controlnet: torch.nn.Module
    images: list[torch.Tensor]
    scales: list[float]
    start: list[float]
    end: list[float]
    layout: BranchLayout
    conditioning: Conditioning
    num_timesteps: int
    _keep: list[list[float]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._keep = controlnet_keep(self.num_timesteps, self.start, self.end)

    @property
    def multi(self) -> bool:
        return hasattr(self.controlnet, "nets")

    def scale_at(self, step: int) -> float | list[float]:
        """The step's conditioning scale: one float for one ControlNet, a list for a ``MultiControlNetModel``."""
        scales = [c * k for c, k in zip(self.scales, self._keep[step], strict=True)]
        return scales if self.multi else scales[0]

    def halves(self, rows: Sequence[int]) -> list[int]:
        """Per row of the call, 0 for an unconditional row and 1 for a conditional one (0 for every row without
        CFG)."""
        n = self.layout.n_branches
        return [int(r >= n) for r in rows] if self.layout.cfg else [0] * len(rows)

    def __call__(self, step: int, sample: torch.Tensor, t: torch.Tensor, rows: Sequence[int]) -> dict[str, Any]:
        halves = self.halves(rows)
        present = sorted(set(halves))  # the halves this call holds: [0, 1], [1] (nursing) or [0] (no CFG)
        positions = [halves.index(h) for h in present]  # the first branch's row of each half within the call
        index = [present.index(h) for h in halves]
        down, mid = self.residuals(step, sample[positions], t, [rows[p] for p in positions], present)
        if index == list(range(len(present))):  # the call is the first branch's rows: no repetition
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return {
            "down_block_additional_residuals": [d[index] for d in down],
            "mid_block_additional_residual": mid[index],
        }

    def residuals(
        self, step: int, sample: torch.Tensor, t: torch.Tensor, rows: list[int], halves: list[int]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One ControlNet pass on these rows (one branch's), with the control image's matching halves."""
        conditioning = self.conditioning.rows(rows)
        added = conditioning.get("added_cond_kwargs", {})
        images = [image[halves] for image in self.images]
        grads = torch.is_grad_enabled()
        with frozen_parameters(self.controlnet) if grads else nullcontext():
            down, mid = self.controlnet(
                sample,
                t,
                encoder_hidden_states=conditioning["encoder_hidden_states"],
                controlnet_cond=images if self.multi else images[0],
                conditioning_scale=self.scale_at(step),
                added_cond_kwargs={k: added[k] for k in CONTROLNET_ADDED if k in added},
                return_dict=False,
            )
        return list(down), mid


__all__ = ["CONTROLNET_ADDED", "ControlResiduals", "align_guidance", "as_list", "controlnet_keep"]
