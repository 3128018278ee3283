"""The golden test: ``DetailConfig.reference_preset()`` computes what the authors' pipeline computed.

``tests/fixtures/authors_reference.safetensors`` holds what the authors' ``ProT2IPipeline`` (clf28/Detail-plus-plus at
e73155b) computed on the tiny random SDXL components, recorded by ``benchmarks/reference/record.py`` (which says how
to redo it): every branch's final latent, each step's binary subject masks, every nursing loss, and in its metadata
the commit and every setting. These tests rebuild the same inputs from that metadata and never read the authors'
code.

Nursing off, the two pipelines run the same operations in the same order: the latents agree bit for bit (the issue's
bound is 1e-5). Nursing on, summation order differs inside the loss and its gradient: 1e-4.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from detailpp import DetailConfig
from detailpp.config import ReferenceBehaviour
from detailpp.tiny import build_tiny_pipeline

FIXTURE = Path(__file__).parents[1] / "fixtures" / "authors_reference.safetensors"


def load_fixture() -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    with safe_open(str(FIXTURE), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["commit"].startswith("e73155b")
    return {s["name"]: s for s in json.loads(meta["scenarios"])}, tensors


SCENARIOS, TENSORS = load_fixture()

#: Which recorded run each reference switch acts in (nursing switches need nursing).
NURSING_SWITCHES = {
    "opencv_blur",
    "unscaled_nursing_input",
    "nursing_maps_all_passes",
    "update_then_test",
    "fresh_scheduler_step_size",
    "centroid_unit_grid",
    "nursing_no_epsilon",
}


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_pipeline(SCENARIOS["nursing_off"]["component_seed"])


def run_preset(pipe, name: str, config: DetailConfig) -> dict:
    """The scenario's call on our pipeline: every branch's final latent, each step's masks, the nursing losses."""
    s = SCENARIOS[name]
    masks: list[torch.Tensor] = []

    def keep(pipeline, step, timestep, tensors):
        if tensors["masks"] is not None:
            masks.append(tensors["masks"].cpu())
        return {}

    out = pipe(
        plan=s["plan"],
        height=s["height"],
        width=s["width"],
        num_inference_steps=s["steps"],
        guidance_scale=s["guidance_scale"],
        latents=TENSORS[f"{name}.initial_latent"],
        detail_config=config,
        output_type="latent",
        return_branch_images=True,
        callback_on_step_end=keep,
        callback_on_step_end_tensor_inputs=["masks"],
    )
    losses = [x for r in out.nursing for x in r.losses]
    return {"latents": out.branch_images.float(), "masks": masks, "losses": losses}


def mismatches(name: str, ours: dict) -> list[str]:
    """What differs from the authors' recorded run beyond the golden test's bounds (empty: parity)."""
    s = SCENARIOS[name]
    found = []
    diff = float((ours["latents"] - TENSORS[f"{name}.latents"]).abs().max())
    exact = not s["config"].get("nursing", True)
    if (exact and diff != 0.0) or diff > s["atol"]:
        found.append(f"latents differ by {diff:.3g} (bound: {'bit for bit' if exact else s['atol']})")
    theirs = TENSORS.get(f"{name}.masks")
    n_theirs = 0 if theirs is None else theirs.shape[0]
    if len(ours["masks"]) != n_theirs:
        found.append(f"masks in {len(ours['masks'])} steps, theirs in {n_theirs}")
    elif theirs is not None and not torch.equal(torch.stack(ours["masks"]), theirs.bool()):
        found.append("masks differ")
    recorded = TENSORS.get(f"{name}.losses")
    if recorded is not None or ours["losses"]:
        if recorded is None or len(ours["losses"]) != len(recorded):
            found.append(f"{len(ours['losses'])} nursing passes, theirs {0 if recorded is None else len(recorded)}")
        elif max(abs(a - b) for a, b in zip(ours["losses"], recorded.tolist(), strict=True)) > 1e-3:
            found.append("nursing losses differ")
    return found


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_preset_reproduces_the_authors_pipeline(tiny_pipe, name):
    s = SCENARIOS[name]
    config = DetailConfig.reference_preset(**s["config"])
    assert config.to_dict() == s["detail_config"], "the preset is not what the fixture was recorded with"
    assert mismatches(name, run_preset(tiny_pipe, name, config)) == []


@pytest.mark.parametrize("switch", [f.name for f in fields(ReferenceBehaviour) if f.name != "nursing_no_epsilon"])
def test_golden_test_fails_when_a_reference_switch_is_flipped(tiny_pipe, switch):
    name = "nursing_on" if switch in NURSING_SWITCHES else "nursing_off"
    preset = DetailConfig.reference_preset(**SCENARIOS[name]["config"])
    flipped = preset.replace(reference=ReferenceBehaviour(**{**preset.reference.__dict__, switch: False}))
    assert mismatches(name, run_preset(tiny_pipe, name, flipped)), f"flipping {switch} went unnoticed"


def test_the_epsilon_switch_is_the_authors_arithmetic():
    """``nursing_no_epsilon`` moves the loss by ~1e-8 relative (below the nursing run's float noise, so the golden
    test cannot see it); where it matters, a flat subject map, the authors' arithmetic gives NaN and ours does not."""
    from detailpp.nursing import nursing_loss

    probs = torch.full((16, 77), 1 / 77)  # every token equally attended: flat subject maps
    ours = nursing_loss(probs, [[2], [4]], 6, (4, 4), DetailConfig())
    theirs = nursing_loss(
        probs, [[2], [4]], 6, (4, 4), DetailConfig(reference=ReferenceBehaviour(nursing_no_epsilon=True))
    )
    assert torch.isfinite(ours) and torch.isnan(theirs)


def test_preset_refuses_what_the_authors_code_cannot_do():
    from detailpp.config import ConfigError

    with pytest.raises(ConfigError, match=r"cannot honour share_halves='both'.*fixes it to 'cond'"):
        DetailConfig.reference_preset(share_halves="both")
    with pytest.raises(ConfigError, match="Unknown preset 'paper'"):
        DetailConfig.preset("paper")
    assert DetailConfig.preset("authors", nursing=False).preset_name == "authors"
    assert DetailConfig.preset("detailpp").preset_name == "detailpp"
    config = DetailConfig.reference_preset(nursing=False)
    assert DetailConfig.from_dict(config.to_dict()) == config
