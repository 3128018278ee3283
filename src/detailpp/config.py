"""Every knob of Detail++ in one frozen, documented dataclass.

Defaults follow the paper where it gives a value and the authors' code where the paper is silent (see
``docs/method.md``); each field says where its default comes from.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

#: Loss thresholds under which nursing stops early, by denoising step (authors' code).
DEFAULT_NURSING_THRESHOLDS: tuple[float, ...] = (26.0, 25.0, 24.0, 23.0, 22.5, 22.0)


class ConfigError(ValueError):
    """A Detail++ setting out of its range; the message names the field, the value and the valid range."""


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
        reference_attention: use the materialised-map reference processors in every attention layer (what the
            authors' code does). Slow and memory-hungry: for tests and benchmarks only.
        granularity: how a prompt is split when no plan is given: one branch per ``"subject"`` (authors' code) or
            one per ``"attribute"``.
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
    reference_attention: bool = False
    granularity: Literal["subject", "attribute"] = "subject"

    def __post_init__(self) -> None:
        object.__setattr__(self, "nursing_thresholds", tuple(float(x) for x in self.nursing_thresholds))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for any value out of range (no side effects)."""
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
        if self.entropy_temperature <= 0:
            raise ConfigError(f"entropy_temperature must be > 0, got {self.entropy_temperature}.")
        if self.nursing and not self.nursing_thresholds:
            raise ConfigError("nursing_thresholds must hold at least one value while nursing is on.")

    @property
    def resolved_mask_source(self) -> Literal["full", "previous"]:
        if self.mask_source == "auto":
            return "full" if self.nursing else "previous"
        return self.mask_source

    def num_share_steps(self, num_inference_steps: int) -> int:
        """S: how many of the first denoising steps share attention and modify latents."""
        return int(round(self.share_steps * num_inference_steps))

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


#: The file of a model folder that holds the Detail++ settings recommended for that model (DetailConfig fields).
DETAIL_DEFAULTS_FILE = "detail_config.json"


def _hub_misses() -> tuple[type[BaseException], ...]:
    """What ``hf_hub_download`` raises when a repo has no such file or cannot be reached (huggingface_hub 0.x-2.x)."""
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    misses: tuple[type[BaseException], ...] = (EntryNotFoundError, HFValidationError, OSError)
    for module in ("httpx", "httpx2"):  # huggingface_hub >= 1 reports network errors as httpx's (not OSErrors)
        try:
            misses += (importlib.import_module(module).HTTPError,)
        except (ImportError, AttributeError):
            pass
    return misses  # RepositoryNotFoundError, LocalEntryNotFoundError, requests' errors... are OSErrors


def detail_defaults_path(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: bool | str | None = None,
    local_files_only: bool = False,
) -> Path | None:
    """Where ``model``'s :data:`DETAIL_DEFAULTS_FILE` is, or ``None`` when it has none.

    A local folder: the file in it, if there. A Hub id (a string that names no local path): the file fetched into the
    Hugging Face cache with ``hf_hub_download`` and the given ``revision``, ``cache_dir``, ``token`` and
    ``local_files_only`` (``HF_HUB_OFFLINE`` is honoured too); a repo without the file, one that does not exist or
    cannot be reached (offline, network errors) gives ``None``, logged at debug level. Anything else (a single-file
    checkpoint, a missing local path) gives ``None``.
    """
    name = os.fspath(model)
    if os.path.isdir(name):
        path = Path(name) / DETAIL_DEFAULTS_FILE
        return path if path.is_file() else None
    if not isinstance(model, str) or os.path.exists(name):
        return None
    from huggingface_hub import hf_hub_download

    try:
        fetched = hf_hub_download(
            name,
            DETAIL_DEFAULTS_FILE,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
    except _hub_misses() as e:
        logger.debug("no %s for %r on the Hub: %s: %s", DETAIL_DEFAULTS_FILE, name, type(e).__name__, e)
        return None
    return Path(fetched)


def read_detail_defaults(model: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any]:
    """The DetailConfig fields a model recommends (its :data:`DETAIL_DEFAULTS_FILE`), ``{}`` if it has none.

    ``model`` is a local folder or a Hub id; ``hub_kwargs`` (``revision``, ``cache_dir``, ``token``,
    ``local_files_only``) say how to fetch a Hub id's file (see :func:`detail_defaults_path`). Raises
    :class:`ConfigError` naming the file when it is found but unreadable or holds fields DetailConfig rejects.
    """
    import json

    path = detail_defaults_path(model, **hub_kwargs)
    if path is None:
        return {}
    source = (
        str(path) if os.path.isdir(os.fspath(model)) else f"{path} (the Hub repo {model}'s {DETAIL_DEFAULTS_FILE})"
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"Cannot read the model's Detail++ settings {source}: {e}. Fix or delete the file.") from e
    check_detail_fields(data, source)
    return data


def check_detail_fields(data: Any, source: str) -> None:
    """Raise :class:`ConfigError` (naming ``source``) unless ``data`` is a dict that makes a valid DetailConfig."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a JSON object of DetailConfig fields.")
    try:
        DetailConfig(**data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {str(e).rstrip('.')}. Fix or delete it.") from e
