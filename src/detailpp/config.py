"""Every knob of Detail++ in one frozen, documented dataclass.

Defaults follow the paper where it gives a value and the authors' code where the paper is silent (see
``docs/method.md``); each field says where its default comes from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from detailpp.errors import DetailError

logger = logging.getLogger(__name__)

#: Loss thresholds under which nursing stops early, by denoising step (authors' code).
DEFAULT_NURSING_THRESHOLDS: tuple[float, ...] = (26.0, 25.0, 24.0, 23.0, 22.5, 22.0)


class ConfigError(DetailError, ValueError):
    """A Detail++ setting out of its range; the message names the field, the value and the valid range."""


@dataclass(frozen=True)
class AuthorsBehaviour:
    """What the authors' code (``clf28/Detail-plus-plus`` at e73155b) does where detailpp does otherwise.

    Every field is off in detailpp's default and on in :meth:`DetailConfig.authors_preset`, the preset that reproduces
    the authors' pipeline (``docs/method.md`` measures each one's effect on the final latent). Each can be switched on
    alone, for ablations and for the deviation table of ``benchmarks/reference/record.py``.

    Attributes:
        normalize_prompts: lower-case every sub-prompt and strip leading/trailing "." and spaces before encoding
            (their ``preprocess_prompts``). CLIP lower-cases anyway; a trailing "." is a token that changes the image.
        floor_share_steps: S = int(share_steps * T) (theirs) instead of round(share_steps * T): at the default
            0.8 they differ exactly for every T = 1 or 2 (mod 5), T = 1, 2, 6, 7, 11, 12, 16, 17, ... (by one step).
        alm_one_step_short: Accumulative Latent Modification after steps 0..S-2 only (theirs: the controller's step
            counter has already moved on when the blend runs), while attention is shared in steps 0..S-1.
        aliased_mask_sum: with masks from the previous branch (nursing off), average the maps as the authors' code
            ends up doing: (m_0 + 2 (m_1 + ... + m_k)) / (k + 1). Their three controllers hold overlapping views of
            one attention tensor; the first step's views become the running-sum accumulator and two controllers'
            ``+=`` land on the same memory (``ProT2I/processors.py``, ``AttentionStore.between_steps``). A bug.
        relative_mask_threshold: binarise at ``min + (max - min) * tau`` of the normalised map (whose maximum is
            r / (r + 1e-8)) instead of ``> tau``.
        blend_latents: ALM as ``z_prev + B (z - z_prev)`` with float masks (theirs) instead of a selection
            (``torch.where``); equal up to rounding.
        opencv_blur: blur the nursing maps with OpenCV's fixed 5-tap kernel [1, 4, 6, 4, 1] / 16 (what
            ``cv2.GaussianBlur(m, (5, 5), 0)`` uses) instead of a Gaussian of ``blur_sigma``.
        unscaled_nursing_input: feed the nursing pass the latent without ``scheduler.scale_model_input`` (theirs).
        nursing_maps_all_passes: the nursing loss reads the maps averaged over every nursing pass of the call so far
            (theirs: one attention store for all passes); the gradient flows through the current pass only, so it
            shrinks with the pass count.
        update_then_test: update the latent, then stop if the loss (before the update) was under the threshold
            (theirs: always at least one update); detailpp tests first and never updates a latent already good.
        fresh_scheduler_step_size: alpha_i = alpha_0 * sqrt(linspace(1, 0, num_train_timesteps)[i]): their schedule
            reads the scheduler's timestep count before ``set_timesteps``, which on a fresh scheduler is
            ``num_train_timesteps`` (1000), so alpha barely decays. (On a scheduler reused from an earlier call their
            code reads that call's step count instead; the preset reproduces the fresh-scheduler case.)
        centroid_unit_grid: centroids on ``linspace(0, 1, w) * res`` coordinates (theirs) while the blurred argmax is
            in grid cells (0..w-1); detailpp puts both in grid cells.
        nursing_no_epsilon: no 1e-8 in the min-max normalisation and the sum of the nursing maps, nor in the
            centroid's mass (theirs).
        one_batch_after_window: after the first S steps, denoise every branch in one UNet batch (theirs) instead of
            the last branch in its own call (which keeps the final image independent of pruning).
    """

    normalize_prompts: bool = False
    floor_share_steps: bool = False
    alm_one_step_short: bool = False
    aliased_mask_sum: bool = False
    relative_mask_threshold: bool = False
    blend_latents: bool = False
    opencv_blur: bool = False
    unscaled_nursing_input: bool = False
    nursing_maps_all_passes: bool = False
    update_then_test: bool = False
    fresh_scheduler_step_size: bool = False
    centroid_unit_grid: bool = False
    nursing_no_epsilon: bool = False
    one_batch_after_window: bool = False

    @classmethod
    def all(cls) -> AuthorsBehaviour:
        """Every switch on: the authors' code."""
        return cls(**{f.name: True for f in fields(cls)})

    @property
    def is_all(self) -> bool:
        """True when every switch is on (the authors' preset's behaviour)."""
        return all(getattr(self, f.name) for f in fields(self))

    @property
    def active(self) -> tuple[str, ...]:
        """The names of the switches that are on."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name))


#: DetailConfig fields the authors' code fixes, with their values there: the authors' preset cannot honour others.
AUTHORS_FIXED: dict[str, Any] = {
    "share_halves": "cond",
    "share_layers": "lowest",
    "mask_source": "auto",
    "mask_average": "running",
    "latent_modification": True,
    "entropy_loss": True,
    "entropy_weight": 1.0,
    "alignment_weight": 0.05,
    "entropy_temperature": 0.5,
    "blur_kernel_size": 5,
}

#: DetailConfig fields the authors' preset sets to the authors' behaviour (each is one of our deviations too).
AUTHORS_SETTINGS: dict[str, Any] = {"scale_thresholds": False, "materialised_attention": True, "prune_branches": False}


@dataclass(frozen=True)
class DetailConfig:
    """Settings of Progressive Detail Injection and attention nursing.

    Attributes:
        share_steps: fraction S/T of the denoising steps during which self-attention is shared and latents are
            modified (paper: S = 0.8 T). 0 disables both; after these steps every branch denoises on its own.
        share_attention: share branch 0's (the full prompt's) self-attention map with every branch in the
            lowest-resolution attention layers (paper, section 3.2).
        share_layers: ``"lowest"`` shares in the lowest-resolution attention layers (the paper: 32x32 tokens in SDXL
            at 1024x1024); ``"all"`` in every self-attention layer. A diagnostic for models whose layout is not set
            at their lowest resolution alone (see ``docs/toy-binding.md``), not the paper's method.
        share_halves: ``"cond"`` shares in the conditional half of the CFG batch only (authors' code);
            ``"both"`` also shares the unconditional half's own branch-0 map.
        mask_threshold: tau of eq. 3; a subject mask keeps the latent pixels whose min-max normalised
            cross-attention exceeds it (authors' config: 0.5). Must lie in (0, 1).
        mask_source: whose cross-attention makes the masks: ``"full"`` = branch 0 (the full prompt),
            ``"previous"`` = the previous branch of the chain, ``"auto"`` = ``"full"`` while nursing is on, else
            ``"previous"`` (authors' code).
        mask_average: ``"running"`` averages the maps over all steps so far (authors' code), ``"current"`` uses
            the current step's maps only.
        latent_modification: apply Accumulative Latent Modification (eq. 4) after each scheduler step within the
            first S steps. Off, the branches never mix (an ablation switch).
        nursing: test-time attention optimisation of branch 0's latent (eqs. 6-9) at the first steps.
        centroid_alignment: include L_align (eq. 7) in the nursing loss; off gives the paper's "+ L_ent" ablation.
        entropy_loss: include L_ent (eq. 8) in the nursing loss.
        entropy_weight: lambda of eq. 9 (paper: 1).
        alignment_weight: weight on the squared centroid error (authors' code: 0.05).
        entropy_temperature: softmax temperature of the entropy loss over prompt tokens (ToMe: 0.5).
        blur_kernel_size / blur_sigma: the Gaussian blur applied to a detached map before taking its argmax.
        nursing_steps: how many of the first denoising steps run nursing (authors: 6, steps 0-5).
        nursing_thresholds: early-stop loss threshold per nursing step (authors' values; the last value repeats).
        scale_thresholds: the authors' thresholds were set for two subjects on a 32x32 grid (their loss sums the
            entropy of each subject, whose maximum is ln(grid tokens)); scale them by ``(K / 2) * ln(N) / ln(1024)``
            for K subjects and N grid tokens so that nursing behaves alike at 512x512 or with three subjects.
            Off, the raw values apply (authors' code: one subject never nurses, three always hit the cap).
        nursing_max_iterations_early / nursing_max_iterations_late: iteration cap while t/1000 > 0.9 / after.
        nursing_step_size: alpha_0; alpha at step i is alpha_0 * sqrt(1 - i / (T - 1)) over the run's own T steps
            (the authors read T before setting the timesteps, which makes alpha nearly constant; we do not).
        prune_branches: after the first S steps stop computing every branch but the last one, unless branch images
            were asked for. The final image is identical either way.
        nursing_graphs: replay each nursing pass as one CUDA graph (the pass at batch 1 is bound by the host
            launching its kernels; a replay costs its GPU time and computes what the eager pass computes): ``None``
            (default) on CUDA devices, ``True`` on every device (the restructured pass runs eagerly on a CPU),
            ``False`` never (``--eager-nursing``). Passes stay eager where they are no pure function of the latent
            (the authors' maps over every pass, their OpenCV kernel, ControlNet) or where weights move in a forward
            (sequential offload, group offloading): :func:`detailpp.method.nursing.use_nursing_graphs`.
        materialised_attention: compute attention through materialised maps, ``softmax(QK^T / sqrt(d)) V``, in every
            attention layer (what the authors' code does). Slow and memory-hungry: for tests and benchmarks only.
        mmdit_share_blocks: on a transformer (FLUX, SD3), the joint blocks in which every branch takes branch 0's
            image queries and image keys (its text keys and all values its own): the MMDiT form of section 3.2.
            ``None``: the family's default (docs/method.md, "Detail++ on MMDiT"); ``()``: none. Block indices count
            FLUX's double-stream blocks, SD3's joint blocks. Ignored by UNet pipelines.
        mmdit_capture_blocks: on a transformer, the joint blocks whose image-to-text attention makes the subject maps
            (eq. 3) and the nursing loss; a nursing pass runs up to the last of them. ``None``: the family's default.
        mmdit_capture_softmax: ``"text"``: the image queries' softmax over the text keys (a UNet cross-attention's
            normalisation; cheap); ``"joint"``: each text key's probability in the joint softmax over text and image
            keys (its normaliser costs a pass over the image keys per capture layer).
        granularity: how a prompt is split when no plan is given: one branch per ``"subject"`` (authors' code) or
            one per ``"attribute"``.
        authors: the authors' code's behaviours where ours differ (:class:`AuthorsBehaviour`; all off by
            default, all on in :meth:`authors_preset`).
    """

    share_steps: float = 0.8
    share_attention: bool = True
    share_layers: Literal["lowest", "all"] = "lowest"
    share_halves: Literal["cond", "both"] = "cond"
    mask_threshold: float = 0.5
    mask_source: Literal["auto", "full", "previous"] = "auto"
    mask_average: Literal["running", "current"] = "running"
    latent_modification: bool = True
    nursing: bool = True
    centroid_alignment: bool = True
    entropy_loss: bool = True
    entropy_weight: float = 1.0
    alignment_weight: float = 0.05
    entropy_temperature: float = 0.5
    blur_kernel_size: int = 5
    blur_sigma: float = 1.1
    nursing_steps: int = 6
    nursing_thresholds: tuple[float, ...] = DEFAULT_NURSING_THRESHOLDS
    scale_thresholds: bool = True
    nursing_max_iterations_early: int = 6
    nursing_max_iterations_late: int = 3
    nursing_step_size: float = 1750.0
    prune_branches: bool = True
    nursing_graphs: bool | None = None
    materialised_attention: bool = False
    mmdit_share_blocks: tuple[int, ...] | None = None
    mmdit_capture_blocks: tuple[int, ...] | None = None
    mmdit_capture_softmax: Literal["text", "joint"] = "text"
    granularity: Literal["subject", "attribute"] = "subject"
    authors: AuthorsBehaviour = field(default_factory=AuthorsBehaviour)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nursing_thresholds", tuple(float(x) for x in self.nursing_thresholds))
        for name in ("mmdit_share_blocks", "mmdit_capture_blocks"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.authors, dict):
            object.__setattr__(self, "authors", _authors_from_dict(self.authors))
        self.validate()

    @classmethod
    def authors_preset(cls, **changes: Any) -> DetailConfig:
        """The preset that reproduces the authors' pipeline (``clf28/Detail-plus-plus`` at e73155b).

        Every :class:`AuthorsBehaviour` on, materialised attention maps in every layer, raw nursing thresholds, and
        every branch computed to the end; ``changes`` set the fields their code lets a user choose (``nursing``,
        ``centroid_alignment``, ``mask_threshold``, ``share_steps``, ``nursing_step_size``, thresholds, caps...).
        Fields their code fixes (:data:`AUTHORS_FIXED`) raise :class:`ConfigError` when changed.
        """
        return cls(**{**AUTHORS_SETTINGS, **changes, "authors": AuthorsBehaviour.all()})

    @classmethod
    def preset(cls, name: str, **changes: Any) -> DetailConfig:
        """A named preset: ``"detailpp"`` (our defaults) or ``"authors"`` (:meth:`authors_preset`)."""
        if name not in PRESETS:
            raise ConfigError(f"Unknown preset {name!r}; use one of {PRESETS}.")
        return cls.authors_preset(**changes) if name == "authors" else cls(**changes)

    @classmethod
    def from_fields(
        cls,
        fields: Mapping[str, Any] | None = None,
        *,
        defaults: Mapping[str, Any] | None = None,
        preset: str = "detailpp",
    ) -> DetailConfig:
        """The one way a DetailConfig is built from fields: ``fields`` over ``defaults`` (a model's recommended
        settings, its ``detail_config.json``) over the ``preset``'s defaults (:meth:`preset`).

        The pipeline's ``make_detail_config`` and ``detailpp bench generate`` build theirs here. An unknown field
        raises ``TypeError`` (the dataclass's own), a value out of range :class:`ConfigError`.
        """
        return cls.preset(preset, **{**(defaults or {}), **(fields or {})})

    @property
    def preset_name(self) -> str:
        """``"authors"`` when every authors' behaviour is on, else ``"detailpp"`` (our defaults, or a custom mix)."""
        return "authors" if self.authors.is_all else "detailpp"

    def validate(self) -> None:
        """Raise :class:`ConfigError` for any value out of range (no side effects)."""
        self._check_finite()
        if not 0.0 <= self.share_steps <= 1.0:
            raise ConfigError(f"share_steps must lie in [0, 1] (a fraction of the steps), got {self.share_steps}.")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ConfigError(f"mask_threshold (tau) must lie in (0, 1), got {self.mask_threshold}.")
        choices = {
            "share_halves": ("cond", "both"),
            "share_layers": ("lowest", "all"),
            "mask_source": ("auto", "full", "previous"),
            "mask_average": ("running", "current"),
            "granularity": ("subject", "attribute"),
            "mmdit_capture_softmax": ("text", "joint"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        for name in ("nursing_steps", "nursing_max_iterations_early", "nursing_max_iterations_late"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.blur_kernel_size < 1 or self.blur_kernel_size % 2 == 0:
            raise ConfigError(f"blur_kernel_size must be a positive odd number, got {self.blur_kernel_size}.")
        for name in ("entropy_weight", "alignment_weight", "nursing_step_size", "blur_sigma"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("mmdit_share_blocks", "mmdit_capture_blocks"):
            value = getattr(self, name)
            valid = isinstance(value, tuple) and all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in value
            )
            if value is not None and not valid:
                raise ConfigError(f"{name} must be None or a list of block indices (integers >= 0), got {value!r}.")
        if self.nursing_graphs not in (None, True, False):
            raise ConfigError(f"nursing_graphs must be True, False or None, got {self.nursing_graphs!r}.")
        if self.entropy_temperature <= 0:
            raise ConfigError(f"entropy_temperature must be > 0, got {self.entropy_temperature}.")
        if self.nursing and not self.nursing_thresholds:
            raise ConfigError("nursing_thresholds must hold at least one value while nursing is on.")
        if not isinstance(self.authors, AuthorsBehaviour):
            raise ConfigError(f"authors must be an AuthorsBehaviour, got {type(self.authors).__name__}.")
        if self.authors.is_all:
            for name, value in AUTHORS_FIXED.items():
                if getattr(self, name) != value:
                    raise ConfigError(
                        f"The authors' preset cannot honour {name}={getattr(self, name)!r}: their code fixes it to "
                        f"{value!r}. Drop the preset, or switch single authors' behaviours on instead."
                    )

    def _check_finite(self) -> None:
        """Every number finite: a NaN passes every range check written as ``x < 0`` and then poisons the run."""
        for f in fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                name = "mask_threshold (tau)" if f.name == "mask_threshold" else f.name
                raise ConfigError(f"{name} must be a finite number, got {value!r}.")

    @property
    def resolved_mask_source(self) -> Literal["full", "previous"]:
        if self.mask_source == "auto":
            return "full" if self.nursing else "previous"
        return self.mask_source

    def num_share_steps(self, num_inference_steps: int) -> int:
        """S: how many of the first denoising steps share attention and modify latents."""
        if self.authors.floor_share_steps:
            return int(self.share_steps * num_inference_steps)
        return int(round(self.share_steps * num_inference_steps))

    def num_modify_steps(self, num_inference_steps: int) -> int:
        """How many of the first steps end with Accumulative Latent Modification: S (the authors' code: S - 1)."""
        share = self.num_share_steps(num_inference_steps)
        return max(0, share - 1) if self.authors.alm_one_step_short else share

    def threshold_at(self, step: int, num_subjects: int = 2, grid_tokens: int = 1024) -> float:
        """The early-stop threshold of nursing at ``step`` (see ``scale_thresholds``)."""
        value = self.nursing_thresholds[min(step, len(self.nursing_thresholds) - 1)]
        if self.scale_thresholds:
            value *= (num_subjects / 2) * math.log(grid_tokens) / math.log(1024)
        return value

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["nursing_thresholds"] = list(self.nursing_thresholds)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetailConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"Unknown Detail++ setting(s) {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**data)

    def replace(self, **changes: Any) -> DetailConfig:
        return replace(self, **changes)


#: The names :meth:`DetailConfig.preset` knows.
PRESETS = ("detailpp", "authors")


def _authors_from_dict(data: dict[str, Any]) -> AuthorsBehaviour:
    known = {f.name for f in fields(AuthorsBehaviour)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"Unknown authors' behaviour(s) {sorted(unknown)}; known: {sorted(known)}.")
    return AuthorsBehaviour(**data)


#: The file of a model folder that holds the Detail++ settings recommended for that model (DetailConfig fields).
DETAIL_DEFAULTS_FILE = "detail_config.json"


def check_detail_fields(data: Any, source: str) -> None:
    """Raise :class:`ConfigError` (naming ``source``) unless ``data`` is a dict that makes a valid DetailConfig."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a JSON object of DetailConfig fields.")
    try:
        DetailConfig(**data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {str(e).rstrip('.')}. Fix or delete it.") from e
