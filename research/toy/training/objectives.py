"""What training minimises and how fast: SDXL's text conditioning, the layout loss, the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from research.toy.scenes import (
    LAYOUT_GRID,
)
from research.toy.training.config import TrainConfig


def layout_loss(
    pred: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor, grid: int = LAYOUT_GRID
) -> torch.Tensor:
    """Per-sample squared error of the predicted clean latent, averaged over the cells of the layout field's grid.

    With ``x0_hat = (z_t - sqrt(1 - abar) * pred) / sqrt(abar)`` the error ``x0_hat - x0`` is
    ``sqrt((1 - abar) / abar) * (noise - pred)``; its mean over each of the ``grid x grid`` cells (where the
    objects are, coarsely) is squared and averaged. At high noise the epsilon loss weighs this coarse x0 error by
    the tiny SNR and drowns it in the unpredictable fine detail, yet it is what decides the layout read off the
    noise; both losses have the same minimiser (the posterior mean), so adding it reweights, it does not bias.
    ``abar_t``: alphas_cumprod at each sample's timestep, shape (B,) or broadcastable to ``pred``.
    """
    if pred.shape != noise.shape or pred.shape[-1] % grid or pred.shape[-2] % grid:
        raise ValueError(f"layout_loss needs equal latent shapes divisible by grid={grid}, got {tuple(pred.shape)}")
    a = abar_t.reshape(-1, *([1] * (pred.ndim - 1))).float()
    err = F.adaptive_avg_pool2d(noise.float() - pred.float(), grid) * ((1 - a) / a).sqrt()
    return err.pow(2).mean(dim=tuple(range(1, pred.ndim)))


def _lr_at(step: int, cfg: TrainConfig, warmup_from: int = 0) -> float:
    w = min(1.0, (step - warmup_from + 1) / max(cfg.warmup, 1))
    progress = min(1.0, step / max(cfg.steps, 1))
    return cfg.lr * w * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def encode_text(te1, te2, ids1: torch.Tensor, ids2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning: penultimate hidden states of both encoders, concatenated; pooled projection of the 2nd."""
    o1 = te1(ids1, output_hidden_states=True)
    o2 = te2(ids2, output_hidden_states=True)
    return torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1), o2.text_embeds
