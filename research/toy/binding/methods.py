"""The benchmark's methods and diagnostic settings: their DetailConfig fields, the forced-layout diagnostics,
the run's :class:`BindingSettings`."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from detailpp.bench import BenchError

#: The benchmark's methods: ``None`` is plain SDXL sampling, a dict holds DetailConfig fields.
METHODS: dict[str, dict[str, Any] | None] = {
    "sdxl": None,
    "pdi": {"nursing": False},
    "pdi_entropy": {"centroid_alignment": False},
    "detailpp": {},
}
#: Extra settings run on the diagnostic items only (not defaults: ways to see why Detail++ does or does not help).
DIAGNOSTICS: dict[str, dict[str, Any]] = {
    "pdi_share_both": {"nursing": False, "share_halves": "both"},
    "detailpp_share_both": {"share_halves": "both"},
    "detailpp_share_all": {"share_steps": 1.0},
    "pdi_no_share": {"nursing": False, "share_attention": False},
    "pdi_share_layers_all": {"nursing": False, "share_layers": "all"},
    "detailpp_share_layers_all": {"share_layers": "all"},
}
#: Forced-layout diagnostics (``python -m research.toy.bench --force-layout-steps K ...``): ``detailpp_forcedK`` is
#: Detail++ with every branch's latent replaced by branch 0's at the end of each of the first K steps
#: (:func:`force_layout`), ``no_alm_forcedK`` the same with ALM off (the image is the last branch alone: what the
#: forcing alone carries over). Not the paper's method: Detail++ with its layout premise (one layout for all branches)
#: made true by hand.
FORCED_RE = re.compile(r"^(detailpp|no_alm)_forced(\d+)$")
FORCED_FIELDS: dict[str, dict[str, Any]] = {"detailpp": {}, "no_alm": {"latent_modification": False}}


def forced_settings(steps: Sequence[int]) -> tuple[str, ...]:
    """The forced-layout diagnostic names for each K of ``steps`` (Detail++ and its no-ALM control)."""
    return tuple(f"{kind}_forced{int(k)}" for k in steps for kind in FORCED_FIELDS)


def force_layout(k: int):
    """A ``callback_on_step_end`` that puts branch 0's latent into every branch at the end of the first ``k`` steps."""

    def callback(pipe, i, t, kwargs):
        latents = kwargs["latents"]
        if i < k:
            latents = latents.clone()
            latents[1:] = latents[0:1]
        return {"latents": latents}

    return callback


def forced_steps(name: str) -> int:
    """K of a forced-layout diagnostic name, 0 for any other method or setting."""
    m = FORCED_RE.match(name)
    return int(m.group(2)) if m else 0


# ----------------------------------------------------------------------------------------------------------------
# Running items


@dataclass
class BindingSettings:
    """What a run does (all of it goes into the results file)."""

    model: str = "toy"
    device: str | None = None
    dtype: str | None = "float32"
    steps: int = 20
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    methods: tuple[str, ...] = tuple(METHODS)
    diagnostics: tuple[str, ...] = tuple(DIAGNOSTICS)
    diagnostic_prompts: int = 0
    grid_prompts: int = 0
    threads: int = 1
    deadline: float | None = None  # time.time() after which no new item starts
    detail_config: dict = field(default_factory=dict)  # DetailConfig fields under every Detail++ method's own
    extra: dict = field(default_factory=dict)


def method_fields(name: str, overlay: dict | None = None) -> dict[str, Any] | None:
    """The DetailConfig fields of method or diagnostic setting ``name``: ``{**overlay, **its own}`` (its own win);
    ``None`` for plain sampling."""
    forced = FORCED_RE.match(name)
    own = METHODS[name] if name in METHODS else FORCED_FIELDS[forced.group(1)] if forced else DIAGNOSTICS[name]
    return None if own is None else {**(overlay or {}), **own}


def check_detail_config(overlay: dict, names: Sequence[str], model_defaults: dict | None = None) -> None:
    """Raise :class:`BenchError` unless the config every name runs with works: ``DetailConfig.from_fields(
    method_fields(name, overlay), defaults=model_defaults)`` (the model's recommended settings under the overlay, as
    in :func:`run_item`)."""
    import dataclasses

    from detailpp.config import DetailConfig

    known = [f.name for f in dataclasses.fields(DetailConfig)]
    unknown = [k for k in overlay if k not in known]
    if unknown:
        raise BenchError(
            f"--detail-config: unknown DetailConfig field(s) {', '.join(map(repr, unknown))}; "
            f"the fields are {', '.join(known)}."
        )
    for name in names:
        fields = method_fields(name, overlay)
        if fields is None:
            continue
        try:
            DetailConfig.from_fields(fields, defaults=model_defaults)
        except (TypeError, ValueError) as e:
            raise BenchError(f"--detail-config {json.dumps(overlay)} does not work for {name!r}: {e}") from e
