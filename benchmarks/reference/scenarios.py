"""The golden fixture's scenarios and our pipeline's run of one: what ``record.py``, ``noise.py`` and ``gpu.py`` share.

This module imports none of them (``record.py`` and ``noise.py`` import it, ``gpu.py`` too), and never the authors'
code. A scenario is one call of both pipelines on detailpp's tiny random SDXL components (CPU, fp32): the call's
settings, the fields on top of :meth:`DetailConfig.authors_preset`, the initial latent's seed, and the bounds the
golden test applies. Every run is made on :data:`THREADS` threads (:func:`pinned_threads`), in the recording and in
``tests/method/test_reference_parity.py`` alike, so that the thread count is not one more way for two machines to
round differently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from detailpp.config import DetailConfig

#: The torch thread count of every recorded and tested run (the fixture's metadata ``threads``).
THREADS = 1

#: The sub-prompts of the authors' style example, each ending in "." (their code strips it; we keep it by default).
SUB_PROMPTS = (
    "A sketch-style robot is leaning a oil-painting style tree.",
    "A robot is leaning a tree.",
    "A sketch-style robot is leaning a tree.",
    "A robot is leaning a oil-painting style tree.",
)
SUBJECTS = ("robot", "tree")


@dataclass(frozen=True)
class Scenario:
    """One recorded run: the call's settings and the DetailConfig fields on top of the authors' preset."""

    name: str
    config: dict[str, Any]
    steps: int = 16
    height: int = 256
    width: int = 256
    guidance_scale: float = 7.5
    seed: int = 0
    component_seed: int = 0
    sub_prompts: tuple[str, ...] = SUB_PROMPTS
    subjects: tuple[str, ...] = SUBJECTS
    #: the golden test's bound on the max abs difference of any branch's final latent and of any nursing loss, on a
    #: machine whose platform fingerprint is the recording machine's (0: bit for bit); on another machine the
    #: bounds are measured when recording (``record.py``: the noise of emulated platforms, ``noise.py``)
    atol: float = 0.0
    #: the :class:`~detailpp.config.AuthorsBehaviour` switches the golden comparison of this scenario must catch
    #: when flipped (``record.py`` measures each one's effect and refuses one under ten times the bound)
    switches: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def detail_config(self) -> DetailConfig:
        return DetailConfig.authors_preset(**self.config)

    def plan(self) -> dict[str, Any]:
        p = self.sub_prompts
        branches = [{"prompt": q, "subject": s} for q, s in zip(p[2:], self.subjects, strict=True)]
        return {"prompt": p[0], "base": p[1], "branches": branches}

    def to_metadata(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: 256x256: masks on 32x32 latents, nursing maps on an 8x8 grid.
#:
#: ``nursing_off``: 16 steps (int(0.8 T) = 12 != round(0.8 T) = 13), the four switches that act without nursing.
#: ``nursing_on``: 8 steps, step size 17.5 (at the authors' 1750 random weights make the loss chaotic), centroid
#: alignment, the nursing switches that move the loss or the update. Seed 88: its blurred nursing maps' argmax moves
#: with ``opencv_blur`` (L_align's target changes, not only its rounding), so that every switch moves the losses or
#: the latents far beyond the platforms' noise (seed 30 at 16 steps left ``opencv_blur`` at 1.6 times the bound).
SCENARIOS = (
    Scenario(
        "nursing_off",
        {"nursing": False},
        seed=74,
        switches=("normalize_prompts", "floor_share_steps", "alm_one_step_short", "aliased_mask_sum"),
    ),
    Scenario(
        "nursing_on",
        {"nursing": True, "centroid_alignment": True, "nursing_step_size": 17.5},
        steps=8,
        seed=88,
        atol=1e-4,
        switches=(
            "opencv_blur",
            "unscaled_nursing_input",
            "nursing_maps_all_passes",
            "update_then_test",
            "fresh_scheduler_step_size",
            "centroid_unit_grid",
        ),
    ),
)


@contextlib.contextmanager
def pinned_threads(threads: int = THREADS) -> Iterator[None]:
    """Run the block on ``threads`` torch threads, then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def initial_latent(scenario: Scenario, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """The one initial latent every branch starts from (the UNet's 4 channels at the latent size)."""
    generator = torch.Generator("cpu").manual_seed(scenario.seed)
    shape = (1, 4, scenario.height // 8, scenario.width // 8)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def tiny(scenario: Scenario, pipeline_class: Any = None) -> Any:
    """The tiny random SDXL pipeline of the scenario's components (CPU, fp32)."""
    from detailpp.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(scenario.component_seed, pipeline_class=pipeline_class)


def authors_kwargs(scenario: Scenario) -> dict[str, Any]:
    """Their pipeline's settings for the scenario, read off the preset's config."""
    c = scenario.detail_config()
    return {
        "steps": scenario.steps,
        "height": scenario.height,
        "width": scenario.width,
        "guidance_scale": scenario.guidance_scale,
        "share_steps": c.share_steps,
        "mask_threshold": c.mask_threshold,
        "nursing": c.nursing,
        "centroid_alignment": c.centroid_alignment,
        "step_size": c.nursing_step_size,
        "thresholds": c.nursing_thresholds[: c.nursing_steps],
        "max_iterations": (c.nursing_max_iterations_early, c.nursing_max_iterations_late),
    }


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


class MarginTooSmall(Exception):
    """A step's mask margin fell below the bound :func:`mask_margins` was given (the run is abandoned)."""


@contextlib.contextmanager
def argmax_gaps() -> Iterator[list[float]]:
    """Record, for each blurred nursing map, ``(top1 - top2) / top1``: its argmax is a near tie below float noise.

    Wraps :func:`detailpp.method.nursing.gaussian_blur` (called only for
    :func:`~detailpp.method.nursing.centroid_alignment_loss`'s target) for the duration of the block.
    """
    from detailpp.method import nursing

    gaps: list[float] = []
    original = nursing.gaussian_blur

    def measured(maps: torch.Tensor, kernel_size: int, sigma: float, opencv: bool = False) -> torch.Tensor:
        blurred = original(maps, kernel_size, sigma, opencv=opencv)
        top = blurred.flatten(1).topk(2, dim=1).values
        gaps.append(float(((top[:, 0] - top[:, 1]) / top[:, 0].abs()).min()))
        return blurred

    nursing.gaussian_blur = measured
    try:
        yield gaps
    finally:
        nursing.gaussian_blur = original


@contextlib.contextmanager
def mask_margins(stop_below: float | None = None) -> Iterator[list[float]]:
    """Record, for each step's masks of our pipeline, the smallest distance of any pixel from the threshold's cut.

    The cut is eq. 3's ``tau``, or with ``relative_mask_threshold`` (the authors' rule, the preset's)
    ``min + (max - min) * tau`` of each normalised map. A pixel whose distance is below the float noise of the maps
    may land on either side on another CPU; the scenario's margin is the minimum over every step and pixel. Wraps
    :func:`detailpp.method.masks.binary_masks` where the engine calls it, for the duration of the block; with
    ``stop_below``, raises :class:`MarginTooSmall` at the first step whose margin is below it.
    """
    from detailpp.method import engine

    margins: list[float] = []
    original = engine.binary_masks

    def measured(normalized: torch.Tensor, tau: float, relative: bool = False) -> torch.Tensor:
        cut = torch.full_like(normalized[..., :1, :1], tau)
        if relative:
            lo = normalized.amin(dim=(-2, -1), keepdim=True)
            hi = normalized.amax(dim=(-2, -1), keepdim=True)
            cut = lo + (hi - lo) * tau
        margins.append(float((normalized - cut).abs().min()))
        if stop_below is not None and margins[-1] < stop_below:
            raise MarginTooSmall(margins[-1])
        return original(normalized, tau, relative=relative)

    engine.binary_masks = measured
    try:
        yield margins
    finally:
        engine.binary_masks = original


def run_ours(
    pipe: Any,
    scenario: Scenario,
    config: DetailConfig,
    latents: torch.Tensor,
    stop_below: float | None = None,
    threads: int = THREADS,
) -> dict[str, Any]:
    """Our pipeline on the scenario, on ``threads`` threads: every branch's final latent, the per-step masks, the
    nursing losses, the masks' margin (:func:`mask_margins`) and the blurred maps' argmax gap (:func:`argmax_gaps`;
    each ``None`` where there is none)."""
    masks: list[torch.Tensor] = []

    def keep_masks(pipeline, step, timestep, tensors):
        if tensors.get("masks") is not None:
            masks.append(tensors["masks"].detach().cpu())
        return {}

    with pinned_threads(threads), mask_margins(stop_below) as margins, argmax_gaps() as gaps:
        out = pipe(
            plan=scenario.plan(),
            height=scenario.height,
            width=scenario.width,
            num_inference_steps=scenario.steps,
            guidance_scale=scenario.guidance_scale,
            latents=latents,
            detail_config=config,
            output_type="latent",
            return_branch_images=True,
            callback_on_step_end=keep_masks,
            callback_on_step_end_tensor_inputs=["masks"],
        )
    if len(margins) != len(masks):
        raise RuntimeError(f"measured the margin of {len(margins)} steps' masks, the pipeline made {len(masks)}")
    losses = [x for record in out.nursing for x in record.losses]
    margin = min(margins) if margins else None
    gap = min(gaps) if gaps else None
    return {"latents": out.branch_images.float().cpu(), "masks": masks, "losses": losses, "margin": margin, "gap": gap}
