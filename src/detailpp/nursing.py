"""Test-time attention optimisation ("attention nursing", paper eqs. 6-9).

Before branch 0 is denoised at the first steps, its latent is moved down the gradient of
``L = L_align + lambda * L_ent`` computed on its cross-attention maps (the lowest-resolution layers, conditional
pass only), so that each subject's map is compact and sits on one object:

- subject distributions ``p_j`` (:func:`subject_distributions`): the head- and layer-averaged cross-attention over
  the prompt's own tokens (start and end tokens excluded) is re-softmaxed at temperature 0.5, averaged over the
  subject's tokens, min-max normalised and divided by its sum (ToMe, as the authors use it);
- ``L_ent = -2 sum_j sum_x p_j(x) log(p_j(x) + 1e-5)`` (eq. 8), summed over subjects (:func:`entropy_loss`);
- ``L_align = (1/K) sum_j w * mean((c_j - a_j)^2)`` (eq. 7): ``c_j`` the centroid of ``p_j`` in grid units,
  ``a_j`` the argmax of a detached, Gaussian-blurred copy, ``w = 0.05`` (:func:`centroid_alignment_loss`);
- ``z <- z - alpha_t * grad_z L`` (eq. 9) until ``L`` falls under the step's threshold or the iteration cap
  (:func:`nurse_latent`).

All loss maths runs in float32 whatever the UNet's dtype. Deliberate differences from the authors' code (see
``docs/method.md``): the threshold is tested before an update (no update once the loss is already low); the UNet
input is scaled with ``scheduler.scale_model_input`` as in the denoising pass; the maps are those of the current
pass only (the authors average over every nursing pass so far, which shrinks the gradient by the pass count);
centroid and argmax share one grid unit; the step-size schedule decays over the run's own steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from detailpp.config import DetailConfig, ReferenceBehaviour

logger = logging.getLogger(__name__)


def subject_distributions(
    probs: torch.Tensor,
    token_indices: Sequence[Sequence[int]],
    prompt_length: int,
    temperature: float,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``p_j`` for every subject: (subjects x tokens-of-the-grid), each summing to 1.

    Args:
        probs: cross-attention probabilities averaged over heads and layers, (grid tokens x 77).
        token_indices: each subject's token positions (start token = 0).
        prompt_length: number of the prompt's own tokens (start and end tokens excluded).
        temperature: softmax temperature over the prompt's tokens.
        eps: added to the min-max range and to the sum (the authors' code: 0).
    """
    text = probs.float()[:, 1 : prompt_length + 1]
    text = torch.softmax(text / temperature, dim=-1)
    maps = torch.stack([text[:, [t - 1 for t in toks]].mean(dim=-1) for toks in token_indices])
    lo = maps.amin(dim=-1, keepdim=True)
    hi = maps.amax(dim=-1, keepdim=True)
    maps = (maps - lo) / (hi - lo + eps)
    return maps / (maps.sum(dim=-1, keepdim=True) + eps)


def entropy_loss(p: torch.Tensor) -> torch.Tensor:
    """``L_ent``: twice the entropy of each subject distribution (subjects x tokens), summed over subjects."""
    return -2.0 * (p * torch.log(p + 1e-5)).sum()


#: The kernels OpenCV's ``getGaussianKernel`` uses for sigma <= 0 at these sizes, instead of sampling a Gaussian.
OPENCV_SMALL_KERNELS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    3: (0.25, 0.5, 0.25),
    5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
    7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125),
}


def gaussian_blur(maps: torch.Tensor, kernel_size: int, sigma: float, opencv: bool = False) -> torch.Tensor:
    """Separable Gaussian blur of (n x h x w) maps with reflected borders (OpenCV's default).

    ``opencv=True`` uses the fixed kernel ``cv2.GaussianBlur(m, (k, k), 0)`` uses for k <= 7 (the authors' call;
    for k = 5 it is [1, 4, 6, 4, 1] / 16, not a sampled Gaussian of OpenCV's nominal sigma 1.1).
    """
    if opencv and kernel_size in OPENCV_SMALL_KERNELS:
        k = torch.tensor(OPENCV_SMALL_KERNELS[kernel_size], dtype=maps.dtype, device=maps.device)
    elif kernel_size == 1 or sigma == 0:
        return maps
    else:
        x = torch.arange(kernel_size, dtype=maps.dtype, device=maps.device) - (kernel_size - 1) / 2
        k = torch.exp(-(x**2) / (2 * sigma**2))
        k = k / k.sum()
    pad = kernel_size // 2
    m = maps.unsqueeze(1)
    mode = "reflect" if min(maps.shape[-2:]) > pad else "replicate"
    m = F.conv2d(F.pad(m, (pad, pad, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, pad, pad), mode=mode), k.view(1, 1, -1, 1))
    return m[:, 0]


def centroid_alignment_loss(
    p: torch.Tensor,
    grid: tuple[int, int],
    weight: float,
    kernel_size: int,
    sigma: float,
    reference: ReferenceBehaviour | None = None,
) -> torch.Tensor:
    """``L_align``: squared distance (grid units) between each map's centroid and its blurred argmax.

    ``reference`` switches on the authors' blur kernel, centroid coordinates and missing epsilon
    (:class:`detailpp.config.ReferenceBehaviour`).
    """
    reference = reference or ReferenceBehaviour()
    h, w = grid
    maps = p.reshape(-1, h, w)
    if reference.centroid_unit_grid:  # on linspace(0, 1, n), then times the grid's width (theirs: attention_res[0])
        ys = torch.linspace(0, 1, h, dtype=maps.dtype, device=maps.device)
        xs = torch.linspace(0, 1, w, dtype=maps.dtype, device=maps.device)
    else:
        ys = torch.arange(h, dtype=maps.dtype, device=maps.device)
        xs = torch.arange(w, dtype=maps.dtype, device=maps.device)
    rows, cols = maps.sum(dim=2), maps.sum(dim=1)
    if reference.nursing_no_epsilon:
        centroid = torch.stack([(rows * ys).sum(1) / rows.sum(1), (cols * xs).sum(1) / cols.sum(1)], dim=1)
    else:
        mass = maps.sum(dim=(1, 2)) + 1e-8
        centroid = torch.stack([(rows * ys).sum(1), (cols * xs).sum(1)], dim=1) / mass[:, None]
    if reference.centroid_unit_grid:
        centroid = centroid * w
    with torch.no_grad():
        blurred = gaussian_blur(maps.detach(), kernel_size, sigma, opencv=reference.opencv_blur)
        flat = blurred.flatten(1).argmax(dim=1)
        target = torch.stack([flat // w, flat % w], dim=1).to(maps.dtype)
    return weight * ((centroid - target) ** 2).mean(dim=1).mean()


def nursing_loss(
    probs: torch.Tensor,
    token_indices: Sequence[Sequence[int]],
    prompt_length: int,
    grid: tuple[int, int],
    config: DetailConfig,
) -> torch.Tensor:
    """``L = L_align + lambda * L_ent`` (eq. 6) from the averaged cross-attention of branch 0."""
    eps = 0.0 if config.reference.nursing_no_epsilon else 1e-8
    p = subject_distributions(probs, token_indices, prompt_length, config.entropy_temperature, eps=eps)
    loss = p.new_zeros(())
    if config.entropy_loss:
        loss = loss + config.entropy_weight * entropy_loss(p)
    if config.centroid_alignment:
        loss = loss + centroid_alignment_loss(
            p, grid, config.alignment_weight, config.blur_kernel_size, config.blur_sigma, config.reference
        )
    return loss


def step_size(config: DetailConfig, step: int, num_steps: int, num_train_timesteps: int = 1000) -> float:
    """``alpha_t = alpha_0 * sqrt(1 - step / (T - 1))``: decays from alpha_0 at the first step to 0 at the last.

    With ``reference.fresh_scheduler_step_size`` the decay runs over ``num_train_timesteps`` instead of the run's T
    steps, as the authors' ``np.linspace(1, 0, len(scheduler.timesteps))`` does on a fresh scheduler.
    """
    if config.reference.fresh_scheduler_step_size:
        return config.nursing_step_size * float(np.sqrt(np.linspace(1.0, 0.0, num_train_timesteps)[step]))
    if num_steps <= 1:
        return config.nursing_step_size
    return config.nursing_step_size * math.sqrt(max(0.0, 1.0 - step / (num_steps - 1)))


def max_iterations(config: DetailConfig, timestep: float, num_train_timesteps: int) -> int:
    """The authors' iteration cap: more iterations at the noisiest steps (t / T_train > 0.9)."""
    if timestep / num_train_timesteps > 0.9:
        return config.nursing_max_iterations_early
    return config.nursing_max_iterations_late


@dataclass
class NursingRecord:
    """What nursing did at one denoising step."""

    step: int
    losses: list[float] = field(default_factory=list)
    updates: int = 0
    threshold: float = 0.0

    @property
    def stopped_early(self) -> bool:
        return bool(self.losses) and self.losses[-1] < self.threshold


def nurse_latent(
    latent: torch.Tensor,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    *,
    iterations: int,
    threshold: float,
    alpha: float,
    record: NursingRecord,
    update_then_test: bool = False,
) -> torch.Tensor:
    """Gradient steps on ``latent`` until ``loss_of(latent) < threshold`` or ``iterations`` UNet passes are done.

    Each pass measures the loss of the current latent and, unless it is under the threshold, updates the latent:
    at most ``iterations`` forward and backward passes. ``update_then_test=True`` updates first and then stops if
    the loss was under the threshold (the authors' order: every pass updates).

    ``loss_of`` runs the conditional UNet pass and returns the scalar loss; it is called under
    ``torch.enable_grad()``. The update is computed in float32 and cast back to the latent's dtype.
    """
    record.threshold = threshold
    for _ in range(iterations):
        z = latent.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_of(z)
            value = float(loss.detach())
            record.losses.append(value)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"The nursing loss became {value} at step {record.step}; run in float32 or with nursing off."
                )
            if value < threshold and not update_then_test:
                break
            (grad,) = torch.autograd.grad(loss, z)
        latent = (latent.float() - alpha * grad.float()).to(latent.dtype)
        record.updates += 1
        if value < threshold:
            break
    logger.debug("nursing step %d: %d updates, losses %s", record.step, record.updates, record.losses)
    return latent
