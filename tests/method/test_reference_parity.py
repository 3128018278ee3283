"""The golden test: ``DetailConfig.authors_preset()`` computes what the authors' pipeline computed.

``tests/fixtures/authors_reference.safetensors`` holds what the authors' ``ProT2IPipeline`` (clf28/Detail-plus-plus at
e73155b) computed on the tiny random SDXL components, recorded by ``benchmarks/reference/record.py`` (which says how
to redo it): every branch's final latent, each step's binary subject masks, every nursing loss, and in its metadata
the commit and every setting. These tests rebuild the same inputs from that metadata and never read the authors'
code.

The same code rounds differently on different CPUs (MKL/oneDNN choose kernels by instruction set and thread count),
so exact equality can only be asked of a machine that rounds as the recording machine did. The fixture holds that
machine's platform fingerprint (``benchmarks/reference/fingerprint.py``: a hash of the tiny components' outputs on a
fixed input), and each scenario two bounds on any branch's final latent:

- the running machine reproduces the fingerprint: nursing off, the two pipelines run the same operations in the
  same order and the latents must agree **bit for bit**; nursing on, summation order differs inside the loss and its
  gradient: 1e-4;
- it does not: the bound the recording measured across thread counts and instruction sets (2e-4 nursing off, a few
  1e-6 of the latents' scale; 1e-3 nursing on), and the switches whose effect is below that noise
  cannot be told apart from it (they are then skipped, saying so).

In both cases the masks of every step must be identical. ``record.py`` picks each scenario's seed so that no pixel
of any step's normalised map lies within 2e-5 of the threshold's cut (the fixture's ``mask_margin``, about three
times the largest CPU-to-CPU difference of the maps it measured, 6.2e-6), and, nursing on, so that no blurred
nursing map's argmax (L_align's target) is a near tie (its two largest values differ by 1e-3 relative or more, the
fixture's ``argmax_gap``): no mask pixel and no target can then move between machines. A fingerprint is a
heuristic (one UNet call and one encoding, not every kernel of a run): a machine that matches it and still misses
bit-for-bit parity fails loudly rather than passing on the looser bound.
"""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch
from safetensors import safe_open

from detailpp import DetailConfig
from detailpp.config import AuthorsBehaviour
from detailpp.models.tiny import build_tiny_pipeline
from tests.paths import BENCHMARKS, FIXTURES, load_script

platform_fingerprint = load_script(BENCHMARKS / "reference" / "fingerprint.py").platform_fingerprint

FIXTURE = FIXTURES / "authors_reference.safetensors"


def load_fixture() -> tuple[dict[str, str], dict[str, dict], dict[str, torch.Tensor]]:
    with safe_open(str(FIXTURE), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["commit"].startswith("e73155b")
    scenarios = {s["name"]: s for s in json.loads(meta["scenarios"])}
    for s in scenarios.values():  # recorded before two DetailConfig fields were renamed and one was added
        s["detail_config"] = {**ADDED, **{RENAMED.get(k, k): v for k, v in s["detail_config"].items()}}
    return meta, scenarios, tensors


#: DetailConfig fields renamed since the fixture was recorded: old name -> new name.
RENAMED = {"reference": "authors", "reference_attention": "materialised_attention"}
#: DetailConfig fields added since, with the value the recording ran with (CUDA graphs: on no CPU; the MMDiT fields:
#: transformers only).
ADDED = {
    "nursing_graphs": None,
    "mmdit_share_blocks": None,
    "mmdit_capture_blocks": None,
    "mmdit_capture_softmax": "text",
}


META, SCENARIOS, TENSORS = load_fixture()

#: Switches whose effect on the final latent (docs/method.md's deviation table) is below the CPU-to-CPU noise: only
#: the bit-for-bit comparison of the recording platform sees them.
BELOW_PLATFORM_NOISE = {"blend_latents", "one_batch_after_window", "opencv_blur"}

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


@pytest.fixture(scope="module")
def same_platform(tiny_pipe) -> bool:
    """Whether this machine rounds the tiny components as the recording machine did (its fingerprint matches)."""
    return platform_fingerprint(tiny_pipe) == META["fingerprint"]


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


def mismatches(name: str, ours: dict, same_platform: bool) -> list[str]:
    """What differs from the authors' recorded run beyond the golden test's bounds (empty: parity)."""
    s = SCENARIOS[name]
    found = []
    diff = float((ours["latents"] - TENSORS[f"{name}.latents"]).abs().max())
    bound = s["atol"] if same_platform else s["cross_platform_atol"]
    if diff > bound:
        where = "this machine reproduces" if same_platform else "this machine differs from"
        found.append(f"latents differ by {diff:.3g} (bound: {bound or 'bit for bit'}; {where} the recording platform)")
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
def test_preset_reproduces_the_authors_pipeline(tiny_pipe, same_platform, name):
    s = SCENARIOS[name]
    config = DetailConfig.authors_preset(**s["config"])
    assert config.to_dict() == s["detail_config"], "the preset is not what the fixture was recorded with"
    assert mismatches(name, run_preset(tiny_pipe, name, config), same_platform) == []


def test_the_fixture_records_its_platform_and_margins():
    assert len(META["fingerprint"]) == 16 and int(META["fingerprint"], 16) >= 0
    for s in SCENARIOS.values():
        assert s["mask_margin"] >= 2e-5, f"{s['name']}: a mask pixel lies within float noise of the threshold"
        assert 0.0 <= s["atol"] <= s["cross_platform_atol"] <= 1e-3
        if s["config"]["nursing"]:  # L_align's target, a blurred map's argmax, is no near tie
            assert s["argmax_gap"] >= 1e-3, f"{s['name']}: a blurred nursing map's argmax is a near tie"
    assert SCENARIOS["nursing_off"]["atol"] == 0.0


#: Switches the golden comparison cannot see by construction, each checked on its arithmetic below instead.
ARITHMETIC_ONLY = {"nursing_no_epsilon", "relative_mask_threshold"}


@pytest.mark.parametrize("switch", [f.name for f in fields(AuthorsBehaviour) if f.name not in ARITHMETIC_ONLY])
def test_golden_test_fails_when_a_reference_switch_is_flipped(tiny_pipe, same_platform, switch):
    if not same_platform and switch in BELOW_PLATFORM_NOISE:
        pytest.skip(f"{switch} moves the latents less than this machine's rounding differs from the recording's")
    name = "nursing_on" if switch in NURSING_SWITCHES else "nursing_off"
    preset = DetailConfig.authors_preset(**SCENARIOS[name]["config"])
    flipped = preset.replace(authors=AuthorsBehaviour(**{**preset.authors.__dict__, switch: False}))
    found = mismatches(name, run_preset(tiny_pipe, name, flipped), same_platform)
    assert found, f"flipping {switch} went unnoticed"


def test_the_epsilon_switch_is_the_authors_arithmetic():
    """``nursing_no_epsilon`` moves the loss by ~1e-8 relative (below the nursing run's float noise, so the golden
    test cannot see it); where it matters, a flat subject map, the authors' arithmetic gives NaN and ours does not."""
    from detailpp.method.nursing import nursing_loss

    probs = torch.full((16, 77), 1 / 77)  # every token equally attended: flat subject maps
    ours = nursing_loss(probs, [[2], [4]], 6, (4, 4), DetailConfig())
    theirs = nursing_loss(
        probs, [[2], [4]], 6, (4, 4), DetailConfig(authors=AuthorsBehaviour(nursing_no_epsilon=True))
    )
    assert torch.isfinite(ours) and torch.isnan(theirs)


def test_the_relative_threshold_switch_is_the_authors_rule():
    """``relative_mask_threshold`` moves the cut by ``tau * 1e-8 / r`` for a map of range ``r`` (a few 1e-6 of the
    normalised map on the tiny model): only a pixel within float noise of the cut tells the two rules apart, and the
    fixture's seeds are chosen to have none (its mask margin), so the golden test cannot see this switch. Where a
    pixel does lie between the cuts, the preset follows the authors' ``mask > min + (max - min) * tau`` and our
    default the plain ``> tau``."""
    from detailpp.method.masks import binary_masks, normalized_maps

    r = 1e-6  # a map whose range is small: its normalised maximum is r / (r + 1e-8) = 0.990
    maps = torch.tensor([[0.0, 0.4975 * (r + 1e-8), r, 0.0]])
    normalized = normalized_maps(maps, (2, 2), (2, 2))
    authors = normalized > normalized.min() + (normalized.max() - normalized.min()) * 0.5
    assert torch.equal(binary_masks(normalized, 0.5, relative=True), authors)
    assert authors[0, 0, 1] and not binary_masks(normalized, 0.5)[0, 0, 1]


def test_preset_refuses_what_the_authors_code_cannot_do():
    from detailpp.config import ConfigError

    with pytest.raises(ConfigError, match=r"cannot honour share_halves='both'.*fixes it to 'cond'"):
        DetailConfig.authors_preset(share_halves="both")
    with pytest.raises(ConfigError, match="Unknown preset 'paper'"):
        DetailConfig.preset("paper")
    assert DetailConfig.preset("authors", nursing=False).preset_name == "authors"
    assert DetailConfig.preset("detailpp").preset_name == "detailpp"
    config = DetailConfig.authors_preset(nursing=False)
    assert DetailConfig.from_dict(config.to_dict()) == config
