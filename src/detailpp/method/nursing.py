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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from detailpp.config import AuthorsBehaviour, DetailConfig

logger = logging.getLogger(__name__)


def subject_distributions(
    probs: torch.Tensor,
    token_indices: Sequence[Sequence[int]],
    prompt_length: int,
    temperature: float,
    eps: float = 1e-8,
    columns: Sequence[torch.Tensor] | None = None,
    offset: int = 1,
) -> torch.Tensor:
    """``p_j`` for every subject: (subjects x tokens-of-the-grid), each summing to 1.

    Args:
        probs: cross-attention probabilities averaged over heads and layers, (grid tokens x text keys).
        token_indices: each subject's token positions among the keys.
        prompt_length: number of the prompt's own tokens (start and end tokens excluded).
        temperature: softmax temperature over the prompt's tokens.
        eps: added to the min-max range and to the sum (the authors' code: 0).
        columns: :func:`token_columns` of ``token_indices``, made once on ``probs``' device: gathered with
            ``index_select``, whose kernels neither copy from nor sync with the host (a CUDA-graphed pass); the same
            values as the list index.
        offset: the position of the prompt's first token among the keys (1 after CLIP's start token; 0 for T5).
    """
    text = probs.float()[:, offset : offset + prompt_length]
    text = torch.softmax(text / temperature, dim=-1)
    if columns is None:
        maps = torch.stack([text[:, [t - offset for t in toks]].mean(dim=-1) for toks in token_indices])
    else:
        maps = torch.stack([text.index_select(1, c).mean(dim=-1) for c in columns])
    lo = maps.amin(dim=-1, keepdim=True)
    hi = maps.amax(dim=-1, keepdim=True)
    maps = (maps - lo) / (hi - lo + eps)
    return maps / (maps.sum(dim=-1, keepdim=True) + eps)


def token_columns(
    token_indices: Sequence[Sequence[int]], device: torch.device | str, offset: int = 1
) -> list[torch.Tensor]:
    """Each subject's columns among the prompt's own tokens (position - ``offset``), as index tensors on ``device``."""
    return [torch.tensor([t - offset for t in toks], dtype=torch.long, device=device) for toks in token_indices]


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
    authors: AuthorsBehaviour | None = None,
) -> torch.Tensor:
    """``L_align``: squared distance (grid units) between each map's centroid and its blurred argmax.

    ``authors`` switches on the authors' blur kernel, centroid coordinates and missing epsilon
    (:class:`detailpp.config.AuthorsBehaviour`).
    """
    authors = authors or AuthorsBehaviour()
    h, w = grid
    maps = p.reshape(-1, h, w)
    if authors.centroid_unit_grid:  # on linspace(0, 1, n), then times the grid's width (theirs: attention_res[0])
        ys = torch.linspace(0, 1, h, dtype=maps.dtype, device=maps.device)
        xs = torch.linspace(0, 1, w, dtype=maps.dtype, device=maps.device)
    else:
        ys = torch.arange(h, dtype=maps.dtype, device=maps.device)
        xs = torch.arange(w, dtype=maps.dtype, device=maps.device)
    rows, cols = maps.sum(dim=2), maps.sum(dim=1)
    if authors.nursing_no_epsilon:
        centroid = torch.stack([(rows * ys).sum(1) / rows.sum(1), (cols * xs).sum(1) / cols.sum(1)], dim=1)
    else:
        mass = maps.sum(dim=(1, 2)) + 1e-8
        centroid = torch.stack([(rows * ys).sum(1), (cols * xs).sum(1)], dim=1) / mass[:, None]
    if authors.centroid_unit_grid:
        centroid = centroid * w
    with torch.no_grad():
        blurred = gaussian_blur(maps.detach(), kernel_size, sigma, opencv=authors.opencv_blur)
        flat = blurred.flatten(1).argmax(dim=1)
        target = torch.stack([flat // w, flat % w], dim=1).to(maps.dtype)
    return weight * ((centroid - target) ** 2).mean(dim=1).mean()


def nursing_loss(
    probs: torch.Tensor,
    token_indices: Sequence[Sequence[int]],
    prompt_length: int,
    grid: tuple[int, int],
    config: DetailConfig,
    columns: Sequence[torch.Tensor] | None = None,
    offset: int = 1,
) -> torch.Tensor:
    """``L = L_align + lambda * L_ent`` (eq. 6) from the averaged cross-attention of branch 0 (``columns``,
    ``offset``: see :func:`subject_distributions`)."""
    eps = 0.0 if config.authors.nursing_no_epsilon else 1e-8
    p = subject_distributions(probs, token_indices, prompt_length, config.entropy_temperature, eps, columns, offset)
    loss = p.new_zeros(())
    if config.entropy_loss:
        loss = loss + config.entropy_weight * entropy_loss(p)
    if config.centroid_alignment:
        loss = loss + centroid_alignment_loss(
            p, grid, config.alignment_weight, config.blur_kernel_size, config.blur_sigma, config.authors
        )
    return loss


def step_size(config: DetailConfig, step: int, num_steps: int, num_train_timesteps: int = 1000) -> float:
    """``alpha_t = alpha_0 * sqrt(1 - step / (T - 1))``: decays from alpha_0 at the first step to 0 at the last.

    With ``authors.fresh_scheduler_step_size`` the decay runs over ``num_train_timesteps`` instead of the run's T
    steps, as the authors' ``np.linspace(1, 0, len(scheduler.timesteps))`` does on a fresh scheduler.
    """
    if config.authors.fresh_scheduler_step_size:
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


def moves_weights_in_forward(module: torch.nn.Module) -> tuple[str, ...]:
    """What makes ``module``'s forward read weights from other places in each call (a CUDA graph replays the
    addresses of its capture): accelerate's sequential offload (hooks with ``offload=True``, parameters on the meta
    device), diffusers' hooks (group offloading, the caches that skip blocks on the values). Empty when nothing does.

    ``enable_model_cpu_offload()`` is not among them: it moves the whole UNet to the GPU before its first forward of
    a call and leaves it there until another model runs, so the weights stay put for every nursing pass.
    """
    reasons: set[str] = set()
    for m in module.modules():
        hooks = [getattr(m, "_hf_hook", None)]
        while hooks:
            hook = hooks.pop()
            if hook is None:
                continue
            hooks.extend(getattr(hook, "hooks", ()))  # accelerate's SequentialHook
            if getattr(hook, "offload", None) is True:  # AlignDevicesHook(offload=True); CpuOffload's is a method
                reasons.add("accelerate's sequential CPU offload")
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None and getattr(registry, "hooks", None):
            reasons.update(f"diffusers' {name} hook" for name in registry.hooks)
    if any(p.device.type == "meta" for p in module.parameters()):
        reasons.add("parameters on the meta device")
    return tuple(sorted(reasons))


#: ``gradient_of(z) -> (loss, d loss / d z)``: one nursing pass, forward and backward (``z`` a leaf requiring grad)
GradientOf = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def nurse_latent(
    latent: torch.Tensor,
    loss_of: Callable[[torch.Tensor], torch.Tensor] | None,
    *,
    iterations: int,
    threshold: float,
    alpha: float,
    record: NursingRecord,
    update_then_test: bool = False,
    gradient_of: GradientOf | None = None,
) -> torch.Tensor:
    """Gradient steps on ``latent`` until ``loss_of(latent) < threshold`` or ``iterations`` UNet passes are done.

    Each pass measures the loss of the current latent and, unless it is under the threshold, updates the latent:
    at most ``iterations`` forward and backward passes. ``update_then_test=True`` updates first and then stops if
    the loss was under the threshold (the authors' order: every pass updates).

    ``loss_of`` runs the conditional UNet pass and returns the scalar loss; it is called under
    ``torch.enable_grad()``. ``gradient_of``, when given, replaces it: a pass that returns the loss and its gradient
    together (:class:`GraphedGradient`; its backward also runs in the last pass, whose gradient is then unused).
    The update is computed in float32 and cast back to the latent's dtype.
    """
    if (loss_of is None) == (gradient_of is None):
        raise ValueError("nurse_latent needs exactly one of loss_of and gradient_of.")
    record.threshold = threshold
    for _ in range(iterations):
        z = latent.detach().requires_grad_(True)
        with torch.enable_grad():
            grad = None
            if gradient_of is not None:
                loss, grad = gradient_of(z)
            else:
                loss = loss_of(z)
            value = float(loss.detach())
            record.losses.append(value)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"The nursing loss became {value} at step {record.step}; run in float32 or with nursing off."
                )
            if value < threshold and not update_then_test:
                break
            if grad is None:
                (grad,) = torch.autograd.grad(loss, z)
        latent = (latent.float() - alpha * grad.float()).to(latent.dtype)
        record.updates += 1
        if value < threshold:
            break
    logger.debug("nursing step %d: %d updates, losses %s", record.step, record.updates, record.losses)
    return latent


def loss_and_gradient(loss_of: Callable[..., torch.Tensor], x: torch.Tensor, *args: torch.Tensor) -> tuple:
    """``(loss, d loss / d x)`` of ``loss_of(x, *args)``, ``x`` a leaf requiring grad: one forward, one backward."""
    with torch.enable_grad():
        loss = loss_of(x, *args)
        (grad,) = torch.autograd.grad(loss, x)
    return loss, grad


class GraphedGradient:
    """:func:`loss_and_gradient` of ``loss_of`` as one CUDA graph, replayed with static input buffers.

    A nursing pass at batch 1 launches thousands of small kernels and is bound by the host launching them, not by
    the GPU; replayed as a graph, the pass costs its GPU time. The first call runs the pass eagerly
    (the warm-up: lazy initialisation, compiled graphs, cuDNN plans; its result is returned), then captures it;
    every later call copies ``x`` and ``args`` into the static buffers and replays. The graph computes exactly what
    the eager pass computes (the same kernels on the same inputs: replays matched eager passes bit for bit on an
    H200, ``benchmarks/nursing_graph_check.py``); ``loss_of`` must not sync with the host, branch
    on tensor values, or copy from the host (everything it reads besides ``x`` and ``args`` must stay where it was at
    capture: weights, conditioning, index tensors).

    Args:
        loss_of: ``loss_of(x, *args) -> scalar loss``; ``x`` is a leaf that requires grad.
    """

    def __init__(self, loss_of: Callable[..., torch.Tensor]):
        self.loss_of = loss_of
        self.graph: torch.cuda.CUDAGraph | None = None
        self.replays = 0
        self._static: tuple[torch.Tensor, ...] = ()
        self._out: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None:
            return self._warm_up_and_capture(x, args)
        with torch.no_grad():  # (the static input is a leaf that requires grad)
            for buffer, value in zip(self._static, (x, *args), strict=True):
                buffer.copy_(value)
        self.graph.replay()
        self.replays += 1
        return self._out

    def _warm_up_and_capture(self, x: torch.Tensor, args: tuple[torch.Tensor, ...]) -> tuple:
        static_x = x.detach().clone().requires_grad_(True)
        static_args = tuple(a.detach().clone() for a in args)
        # The warm-up runs on the current stream, as the eager pass does: on a side stream its gradient differed from
        # the eager one (max abs 1.7e-5 of 0.012 on an H200; the replays matched it bit for bit).
        loss, grad = loss_and_gradient(self.loss_of, static_x, *static_args)
        warm = (loss.detach().clone(), grad.clone())
        del loss, grad
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, grad = loss_and_gradient(self.loss_of, static_x, *static_args)
        self.graph, self._static, self._out = graph, (static_x, *static_args), (loss.detach(), grad)
        return warm

    def release(self) -> None:
        """Free the graph and its memory pool."""
        self.graph, self._static, self._out = None, (), None


def num_nursing_steps(config: DetailConfig, n_subjects: int) -> int:
    """How many of the first steps nurse branch 0 (none without detail branches or without a loss term)."""
    if not (config.nursing and n_subjects > 0) or not (config.entropy_loss or config.centroid_alignment):
        return 0
    return config.nursing_steps


def use_nursing_graphs(
    config: DetailConfig, device: torch.device | str, *, pure: bool, denoiser: torch.nn.Module | None = None
) -> bool:
    """Whether a call's nursing passes replay as CUDA graphs (:class:`GraphedGradient`).

    ``DetailConfig.nursing_graphs`` asks for them: ``True`` on every device (the restructured pass runs eagerly on a
    CPU), ``False`` never, ``None`` (the default) on CUDA devices. They are used where a pass is a pure function of
    the denoiser input and the timestep whose weights stay put: not with the authors' maps averaged over every pass
    (history) or their OpenCV kernel (made on the host), not when the denoiser's inputs read the step index
    (``pure=False``: ControlNet's scheduled scale), not where a hook moves or skips weights in a forward
    (:func:`moves_weights_in_forward`, logged).
    """
    setting = config.nursing_graphs
    if not (bool(setting) if setting is not None else torch.device(device).type == "cuda"):
        return False
    authors = config.authors
    if authors.nursing_maps_all_passes or authors.opencv_blur or not pure:
        return False
    moving = moves_weights_in_forward(denoiser) if denoiser is not None else ()
    if moving:
        logger.info("Nursing passes run eagerly, not as CUDA graphs: %s.", ", ".join(moving))
    return not moving


class NursingPass(Protocol):
    """One nursing pass of the denoiser, as the engine runs it for :class:`Nursing`."""

    def __call__(self, sample: torch.Tensor, t: torch.Tensor, check: bool) -> torch.Tensor:
        """Branch 0's head- and layer-averaged conditional text attention (grid tokens x keys) from the denoiser
        input ``sample``, the forward cut after the last capture layer. ``check=True`` raises ``HookError`` when a
        capture layer did not run; ``check=False`` reads nothing back from the device (what a CUDA graph captures)."""
        ...

    def verify(self) -> None:
        """Raise ``HookError`` unless the latest pass ran every capture layer (a graph's first, eager, pass)."""
        ...


class Nursing:
    """Attention nursing in one call (eqs. 6-9): which steps nurse, the one loss of a pass, the update loop, the
    passes replayed as a CUDA graph, and what was done (:attr:`records`).

    The engine hands :meth:`nurse` the pass (:class:`NursingPass`) and the denoiser's input scaling; nothing here
    knows the denoiser.

    Args:
        config: the call's settings.
        tokens: the plan's token positions (each subject's in p0, the prompt's length): a
            :class:`~detailpp.plan.BranchTokens`.
        grid: the capture layers' token grid.
        num_inference_steps: T.
        num_train_timesteps: the scheduler's training steps (the iteration cap and the step size read them).
        prompt_offset: where the prompt's first token sits among the keys.
        graphs: replay each pass as a CUDA graph on a CUDA device (:func:`use_nursing_graphs` decides).
    """

    def __init__(
        self,
        config: DetailConfig,
        tokens: Any,
        *,
        grid: tuple[int, int],
        num_inference_steps: int,
        num_train_timesteps: int = 1000,
        prompt_offset: int = 1,
        graphs: bool = False,
    ):
        self.config, self.tokens, self.grid = config, tokens, grid
        self.num_inference_steps, self.num_train_timesteps = num_inference_steps, num_train_timesteps
        self.prompt_offset, self.graphs = prompt_offset, graphs
        self.n_subjects = len(tokens.in_full)
        #: how many of the first steps nurse branch 0
        self.steps = num_nursing_steps(config, self.n_subjects)
        #: what nursing did at each nursing step
        self.records: list[NursingRecord] = []
        #: the running sum of the maps over every pass so far (``authors.nursing_maps_all_passes``)
        self.history: dict[str, Any] = {"sum": None, "passes": 0}
        self.graph: GraphedGradient | None = None
        self._columns: list[torch.Tensor] | None = None

    def nurse(
        self,
        i: int,
        t: torch.Tensor,
        latent: torch.Tensor,
        nursing_pass: NursingPass,
        model_input: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Eq. 9 at step ``i``: branch 0's ``latent`` (one row) moved down the loss's gradient until the loss is under
        the step's threshold or the iteration cap is reached; unchanged at steps >= :attr:`steps`."""
        if i >= self.steps:
            return latent
        config, record = self.config, NursingRecord(step=i)
        started = time.perf_counter()
        latent = nurse_latent(
            latent,
            None,
            iterations=max_iterations(config, float(t), self.num_train_timesteps),
            threshold=config.threshold_at(i, self.n_subjects, self.grid[0] * self.grid[1]),
            alpha=step_size(config, i, self.num_inference_steps, self.num_train_timesteps),
            record=record,
            update_then_test=config.authors.update_then_test,
            gradient_of=lambda z0: self.gradient(z0, t, nursing_pass, model_input),
        )
        if i == min(self.steps, self.num_inference_steps) - 1:
            self.release()  # the graph's memory pool is free for the steps after nursing (and the decode)
        logger.debug("nursing at step %d took %.3f s", i, time.perf_counter() - started)
        self.records.append(record)
        return latent

    def loss(
        self, sample: torch.Tensor, t: torch.Tensor, nursing_pass: NursingPass, check: bool = True
    ) -> torch.Tensor:
        """Eq. 6 from the denoiser input ``sample``: the loss of every pass, eager or replayed."""
        if self._columns is None or self._columns[0].device != sample.device:
            self._columns = token_columns(self.tokens.in_full, sample.device, self.prompt_offset)
        probs = nursing_pass(sample, t, check)
        if (
            self.config.authors.nursing_maps_all_passes
        ):  # one store for every pass; the gradient flows through this one
            history = self.history
            total = probs if history["sum"] is None else history["sum"] + probs
            history["sum"], history["passes"] = total.detach(), history["passes"] + 1
            probs = total / history["passes"]
        tokens = [list(x) for x in self.tokens.in_full]
        return nursing_loss(
            probs, tokens, self.tokens.prompt_length, self.grid, self.config, self._columns, self.prompt_offset
        )

    def gradient(
        self,
        z0: torch.Tensor,
        t: torch.Tensor,
        nursing_pass: NursingPass,
        model_input: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: the loss and its gradient with respect to ``z0`` (a leaf that requires grad).

        The pass runs from the denoiser input, a leaf of its own: replayed as a CUDA graph on a GPU when
        :attr:`graphs` (the first pass of a call runs eagerly and captures), eagerly elsewhere; the gradient then
        flows back through the input scaling.
        """
        with torch.enable_grad():
            sample = z0 if self.config.authors.unscaled_nursing_input else model_input(z0, t)
        leaf = sample.detach().requires_grad_(True)
        if self.graphs and leaf.device.type == "cuda":
            first = self.graph is None
            if first:
                self.graph = GraphedGradient(lambda s, t_in: self.loss(s, t_in, nursing_pass, check=False))
            t_in = t if torch.is_tensor(t) and t.device == leaf.device else torch.as_tensor(t, device=leaf.device)
            loss, grad = self.graph(leaf, t_in)
            if first:
                nursing_pass.verify()
        else:
            loss, grad = loss_and_gradient(lambda s, t_in: self.loss(s, t_in, nursing_pass), leaf, t)
        if sample is z0:
            return loss, grad
        (grad_z0,) = torch.autograd.grad(sample, z0, grad)
        return loss, grad_z0

    def release(self) -> None:
        """Free the CUDA graph and its memory pool (after the call's last nursing step)."""
        if self.graph is not None:
            self.graph.release()
            self.graph = None
