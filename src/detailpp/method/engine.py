"""The Detail++ denoising engine: one call's branch batch and its denoising step, Algorithm 1 of the paper.

A pipeline encodes the branches' prompts, prepares the timesteps and one initial noise per branch, wraps its
denoiser in a :class:`~detailpp.method.backbone.Backbone` for the call, and calls :meth:`DetailEngine.step` once per
timestep. A step is a row of named stages, in the order of diffusers' modular loop (before the denoiser, the denoiser,
after the denoiser):

1. :meth:`~DetailEngine.nurse`: attention nursing of branch 0's latent at the first steps (eqs. 6-9,
   :mod:`detailpp.method.nursing`; the engine hands it the pass);
2. :meth:`~DetailEngine.predict`: the guided noise prediction of the branches still needed; within the first S steps
   with shared self-attention and subject cross-attention capture (:mod:`detailpp.method.attention`), after them only
   the last branch (pruning) unless every branch's image was asked for;
3. :meth:`~DetailEngine.guide`: classifier-free guidance per branch (and guidance rescale);
4. the scheduler step;
5. :meth:`~DetailEngine.modify`: the step's subject masks from the accumulated maps (eq. 3,
   :mod:`detailpp.method.masks`) and Accumulative Latent Modification (eq. 4,
   :mod:`detailpp.method.latent_modification`).

The engine knows the backbone seam and the scheduler, nothing of UNets, transformers, text encoders, VAEs or output
formats.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from detailpp.config import DetailConfig
from detailpp.method.attention import AttentionState, CaptureSpec, HookError
from detailpp.method.backbone import Backbone, frozen_parameters
from detailpp.method.latent_modification import FIRST_DETAIL_BRANCH, accumulate_latents
from detailpp.method.masks import MaskAccumulator, binary_masks, normalized_maps
from detailpp.method.nursing import Nursing, NursingRecord, num_nursing_steps, use_nursing_graphs
from detailpp.plan import BranchTokens

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BranchLayout:
    """Where each branch sits in the denoiser batch: ``[uncond x n, cond x n]`` with classifier-free guidance, else
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


class DetailEngine:
    """The Detail++ part of one pipeline call: per-call state and the denoising step, stage by stage.

    Args:
        backbone: the call's denoiser behind the seam (:class:`~detailpp.method.backbone.Backbone`).
        scheduler: the pipeline's scheduler, its timesteps already set.
        config: the call's :class:`~detailpp.config.DetailConfig`.
        layout: the branch batch (:class:`BranchLayout`).
        tokens: the plan's token positions for this call (:class:`~detailpp.plan.BranchTokens`).
        num_inference_steps: T.
        device: where the denoiser runs.
        guidance_scale, guidance_rescale, extra_step_kwargs: as in the pipeline's call.
        keep_all: compute every branch to the end (their images were asked for, or pruning is off).
        return_masks: the caller wants the subject maps (captured even without latent modification).
    """

    def __init__(
        self,
        backbone: Backbone,
        scheduler: Any,
        config: DetailConfig,
        layout: BranchLayout,
        tokens: BranchTokens,
        *,
        num_inference_steps: int,
        device: torch.device,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        extra_step_kwargs: dict[str, Any] | None = None,
        keep_all: bool = False,
        return_masks: bool = False,
    ):
        self.backbone, self.scheduler, self.config, self.layout = backbone, scheduler, config, layout
        self.tokens, self.device, self.num_inference_steps = tokens, device, num_inference_steps
        self.guidance_scale, self.guidance_rescale = guidance_scale, guidance_rescale
        self.extra_step_kwargs = extra_step_kwargs or {}
        self.keep_all = keep_all or not config.prune_branches
        #: the step being computed (the backbone's extras are told)
        self.current_step = 0
        self.state = AttentionState(backbone.layers, backbone.grid, backbone.expected_tokens)
        self.share_steps = config.num_share_steps(num_inference_steps)
        self.modify_steps = config.num_modify_steps(num_inference_steps)
        self.n_detail = len(layout.detail_branches)
        self.capture = self._capture_spec() if self.wants_masks(config, self.n_detail, return_masks) else None
        self.share = layout.share_ranges(config)
        self.nursing = self._nursing(num_inference_steps)
        self.nursing_capture = CaptureSpec(rows=[0], tokens=[], full=True)
        self.accumulator = MaskAccumulator(
            config.mask_average,
            aliased=config.authors.aliased_mask_sum and config.resolved_mask_source == "previous",
        )
        #: the accumulated subject maps of the latest step within the window (subjects x tokens), or ``None``
        self.last_maps: torch.Tensor | None = None

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
        """How many of the first steps nurse branch 0 (:func:`~detailpp.method.nursing.num_nursing_steps`)."""
        return num_nursing_steps(config, n_detail)

    def _capture_spec(self) -> CaptureSpec:
        """Whose cross-attention makes each subject's mask: branch 0's (``"full"``) or the previous branch's."""
        rows_of = self.layout.rows_of
        if self.config.resolved_mask_source == "full":
            return CaptureSpec(rows=[rows_of([0])[-1]] * self.n_detail, tokens=[list(t) for t in self.tokens.in_full])
        rows = [rows_of([i - 1])[-1] for i in self.layout.detail_branches]
        return CaptureSpec(rows=rows, tokens=[list(t) for t in self.tokens.in_previous])

    def _nursing(self, num_inference_steps: int) -> Nursing:
        """The call's nursing: its passes replayed as CUDA graphs where the switch and the backbone allow it."""
        config, backbone = self.config, self.backbone
        steps = num_nursing_steps(config, self.n_detail)
        pure = not backbone.extras_read_the_step
        graphs = steps > 0 and use_nursing_graphs(config, self.device, pure=pure, denoiser=backbone.denoiser)
        return Nursing(
            config,
            self.tokens,
            grid=backbone.grid,
            num_inference_steps=num_inference_steps,
            num_train_timesteps=self.scheduler.config.num_train_timesteps,
            prompt_offset=backbone.prompt_offset,
            graphs=graphs,
        )

    @property
    def nursing_records(self) -> list[NursingRecord]:
        """What nursing did at each nursing step."""
        return self.nursing.records

    @contextmanager
    def attention(self) -> Iterator[None]:
        """Detail++'s attention processors installed for the block, when the call needs any; restored after."""
        config = self.config
        uses = bool(self.share) or self.capture is not None or self.nursing.steps > 0 or config.materialised_attention
        with self.backbone.processors(self.state, config.materialised_attention) if uses else nullcontext():
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
        if i >= self.nursing.steps:
            return latents
        with frozen_parameters(self.backbone.denoiser):
            latents[0:1] = self.nursing.nurse(i, t, latents[0:1], self, self.backbone.model_input)
        return latents

    def __call__(self, sample: torch.Tensor, t: torch.Tensor, check: bool = True) -> torch.Tensor:
        """The nursing pass (:class:`~detailpp.method.nursing.NursingPass`): branch 0's head- and layer-averaged
        conditional text attention (tokens x keys) from the denoiser input ``sample``, the denoiser cut after the last
        capture layer. ``check=False`` reads nothing back from the device (no hook check; the layer count is the
        capture layers'): what a CUDA graph can capture."""
        self.state.begin(capture=self.nursing_capture, device=self.device, num_keys=self.backbone.num_keys)
        self.backbone.predict_to_last_capture(sample, t, self.layout.rows_of([0])[-1:], self.current_step)
        self.state.end(expect_self=False, expect_cross=check)
        return self.state.full_probs / len(self.backbone.layers.cross_attention)

    def verify(self) -> None:
        """Raise :class:`HookError` unless the latest nursing pass ran every capture layer."""
        expected = len(self.backbone.layers.cross_attention)
        if self.state.cross_calls != expected:
            raise HookError(
                f"Nursing's cross-attention capture ran in {self.state.cross_calls} of {expected} layers; another "
                "processor bypassed Detail++'s hooks."
            )

    def predict(self, i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser: every branch's guided noise within the window (sharing and capturing), after it the last
        branch's (and the others' when kept)."""
        every, last = self.layout.branches, self.layout.last
        if i < self.share_steps:
            self.state.begin(
                share=self.share, capture=self.capture, device=self.device, num_keys=self.backbone.num_keys
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
        """Guided noise prediction of ``branches`` (latents ``x``, one row per branch): one denoiser call."""
        cfg = self.layout.cfg
        model_input = self.backbone.model_input(torch.cat([x, x]) if cfg else x, t)
        eps = self.backbone.predict(model_input, t, self.layout.rows_of(branches), self.current_step)
        return self.guide(eps) if cfg else eps

    def guide(self, eps: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance per branch on ``[uncond, cond]`` predictions (and guidance rescale)."""
        eps_uncond, eps_text = eps.chunk(2)
        eps = eps_uncond + self.guidance_scale * (eps_text - eps_uncond)
        if self.guidance_rescale > 0.0:
            eps = rescale_noise_cfg(eps, eps_text, guidance_rescale=self.guidance_rescale)
        return eps

    def modify(self, i: int, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """After the denoiser: the step's binary masks (eq. 3) and Accumulative Latent Modification (eq. 4) on the
        latents seen as an image (:meth:`~detailpp.method.backbone.Backbone.spatial`)."""
        if i >= self.modify_steps or not self.config.latent_modification or self.last_maps is None:
            return latents, None
        authors, backbone = self.config.authors, self.backbone
        normalized = normalized_maps(self.last_maps, backbone.grid, backbone.image_size)
        masks = binary_masks(normalized, self.config.mask_threshold, relative=authors.relative_mask_threshold)
        image = accumulate_latents(backbone.spatial(latents), masks, blend=authors.blend_latents)
        return backbone.unspatial(image), masks

    def masks(self) -> torch.Tensor | None:
        """Each detail branch's normalised subject map at the end of the window (on the CPU), at the size of the
        latents seen as an image, or ``None``."""
        if self.last_maps is None:
            return None
        return normalized_maps(self.last_maps, self.backbone.grid, self.backbone.image_size).cpu()


__all__ = ["BranchLayout", "DetailEngine"]
