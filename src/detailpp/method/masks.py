"""Subject masks from cross-attention (paper, eq. 3).

``B_i = 1[(M_i - min M_i) / (max M_i - min M_i) > tau]`` where ``M_i`` is subject i's cross-attention map, averaged
over the subject's tokens, the heads and the lowest-resolution cross-attention layers (done while capturing, in
:mod:`detailpp.method.attention`), over the denoising steps so far (:class:`MaskAccumulator`), and upsampled bilinearly
to the latent size.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


class MaskAccumulator:
    """Running mean of the per-step subject maps (``"running"``, authors' code) or the latest step (``"current"``).

    ``aliased=True`` reproduces what the authors' code computes with masks from the previous branch (nursing off):
    every step after the first is added twice, ``(m_0 + 2 (m_1 + ... + m_k)) / (k + 1)`` (their controllers'
    overlapping views of one tensor; see :class:`detailpp.config.AuthorsBehaviour`).
    """

    def __init__(self, mode: Literal["running", "current"] = "running", aliased: bool = False):
        self.mode = mode
        self.aliased = aliased
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, step_maps: torch.Tensor) -> torch.Tensor:
        """Add one step's maps (subjects x tokens) and return the maps to threshold."""
        step_maps = step_maps.detach().float()
        if self.mode == "current" or self.total is None:
            self.total, self.count = step_maps.clone(), 1
        else:
            self.total += step_maps
            if self.aliased:
                self.total += step_maps
            self.count += 1
        return self.total / self.count


def normalized_maps(maps: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Subject maps (subjects x tokens) -> (subjects x H x W) upsampled bilinearly and min-max normalised to [0, 1]."""
    m = maps.float().reshape(maps.shape[0], 1, *grid)
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = m.amin(dim=(1, 2), keepdim=True)
    hi = m.amax(dim=(1, 2), keepdim=True)
    return (m - lo) / (hi - lo + 1e-8)


def binary_masks(normalized: torch.Tensor, tau: float, relative: bool = False) -> torch.Tensor:
    """``B_i``: True where the normalised map exceeds ``tau``.

    ``relative=True``: where it exceeds ``min + (max - min) * tau`` of each normalised map (the authors' code; the
    normalised map's maximum is r / (r + 1e-8) rather than 1, so the two differ in rare pixels).
    """
    if not relative:
        return normalized > tau
    lo = normalized.amin(dim=(-2, -1), keepdim=True)
    hi = normalized.amax(dim=(-2, -1), keepdim=True)
    return normalized > lo + (hi - lo) * tau
