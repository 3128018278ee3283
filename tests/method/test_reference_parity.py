"""The golden test: ``DetailConfig.authors_preset()`` computes what the authors' pipeline computed.

``tests/fixtures/authors_reference.safetensors`` holds what the authors' ``ProT2IPipeline`` (clf28/Detail-plus-plus at
e73155b) computed on the tiny random SDXL components, recorded by ``benchmarks/reference/record.py`` (which says how
to redo it): every branch's final latent, each step's binary subject masks, every nursing loss, and in its metadata
the commit, every setting and what the recording measured. These tests rebuild the same inputs from that metadata
and never read the authors' code. Every run here, and the fingerprint, is made on the thread count the fixture was
recorded with (its ``threads``, 1), so that the thread count is not one more way for two machines to round apart.

The same code rounds differently on different CPUs (ATen, MKL and oneDNN choose kernels by instruction set), so
exact equality can only be asked of a machine that rounds as the recording machine did. The fixture holds that
machine's platform fingerprint (``benchmarks/reference/fingerprint.py``: a hash of the tiny components' outputs on a
fixed input), and each scenario two sets of bounds on any branch's final latent and any nursing loss:

- the running machine reproduces the fingerprint: nursing off, the two pipelines run the same operations in the
  same order and the latents must agree **bit for bit**; nursing on, summation order differs inside the loss and its
  gradient: 1e-4;
- it does not: the scenario's ``cross_platform_atol`` (latents) and ``cross_platform_loss_atol`` (losses), twice the
  worst difference ``record.py`` measured between this machine and its emulations of other platforms (other
  instruction sets for ATen, MKL and oneDNN, other thread counts: ``benchmarks/reference/noise.py``), rounded up.

In both cases the masks of every step must be identical. ``record.py`` picks each scenario's seed so that no pixel
of any step's normalised map lies within 2e-5 of the threshold's cut (the fixture's ``mask_margin``), and, nursing
on, so that no blurred nursing map's argmax (L_align's target) is a near tie (its two largest values differ by 1e-3
relative or more, the fixture's ``argmax_gap``): no mask pixel and no target can then move between machines. A
fingerprint is a heuristic (one UNet call and one encoding, not every kernel of a run): a machine that matches it
and still misses bit-for-bit parity fails loudly rather than passing on the looser bound.

Each :class:`~detailpp.config.AuthorsBehaviour` switch is guarded on every machine, none skipped: ten are flipped
here, each in the scenario chosen for it (the fixture's ``switches``), where ``record.py`` measured that flipping it
moves the latents or the losses by ten times the cross-platform bounds or more (the fixture's ``effects``), and
where the test asks for five times or more on the machine it runs on; the four whose effect is rounding (or a value
within float noise of a cut) are tested on their arithmetic, through the pipeline call, in
``tests/method/test_authors_switches.py``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import fields

import pytest
import torch
from safetensors import safe_open

from detailpp import DetailConfig
from detailpp.config import AuthorsBehaviour
from detailpp.models.tiny import build_tiny_pipeline
from tests.method.test_authors_switches import ARITHMETIC_SWITCHES
from tests.paths import BENCHMARKS, FIXTURES, load_script

platform_fingerprint = load_script(BENCHMARKS / "reference" / "fingerprint.py").platform_fingerprint

FIXTURE = FIXTURES / "authors_reference.safetensors"


def load_fixture() -> tuple[dict[str, str], dict[str, dict], dict[str, torch.Tensor]]:
    with safe_open(str(FIXTURE), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["commit"].startswith("e73155b")
    return meta, {s["name"]: s for s in json.loads(meta["scenarios"])}, tensors


META, SCENARIOS, TENSORS = load_fixture()

#: The least factor, on any machine, by which flipping a golden-tested switch must move the latents or the losses
#: beyond the cross-platform bounds (``record.py`` refuses to record one under 10 on the recording machine).
MIN_EFFECT = 5.0

#: Which scenario each golden-tested switch is flipped in.
GOLDEN_SWITCHES = {switch: s["name"] for s in SCENARIOS.values() for switch in s["switches"]}


@contextlib.contextmanager
def recorded_threads() -> Iterator[None]:
    """Run the block on the thread count the fixture was recorded with."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(META["threads"]))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_pipeline(SCENARIOS["nursing_off"]["component_seed"])


@pytest.fixture(scope="module")
def same_platform(tiny_pipe) -> bool:
    """Whether this machine rounds the tiny components as the recording machine did (its fingerprint matches)."""
    with recorded_threads():
        return platform_fingerprint(tiny_pipe) == META["fingerprint"]


def run_preset(pipe, name: str, config: DetailConfig) -> dict:
    """The scenario's call on our pipeline: every branch's final latent, each step's masks, the nursing losses."""
    s = SCENARIOS[name]
    masks: list[torch.Tensor] = []

    def keep(pipeline, step, timestep, tensors):
        if tensors["masks"] is not None:
            masks.append(tensors["masks"].cpu())
        return {}

    with recorded_threads():
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


def effect(name: str, ours: dict) -> float:
    """How far ``ours`` lies from the authors' recorded run, in units of the scenario's cross-platform bounds: the
    larger of the latents' and the losses' max abs difference over its bound (masks aside: a flipped switch's own
    masks may have a pixel near the cut)."""
    s = SCENARIOS[name]
    ratios = [float((ours["latents"] - TENSORS[f"{name}.latents"]).abs().max()) / s["cross_platform_atol"]]
    recorded = TENSORS.get(f"{name}.losses")
    if recorded is not None and s["cross_platform_loss_atol"]:
        if len(ours["losses"]) != len(recorded):
            return float("inf")
        d = max(abs(a - b) for a, b in zip(ours["losses"], recorded.tolist(), strict=True))
        ratios.append(d / s["cross_platform_loss_atol"])
    return max(ratios)


def mismatches(name: str, ours: dict, same_platform: bool) -> list[str]:
    """What differs from the authors' recorded run beyond the golden test's bounds (empty: parity)."""
    s = SCENARIOS[name]
    found = []
    where = "this machine reproduces" if same_platform else "this machine differs from"
    diff = float((ours["latents"] - TENSORS[f"{name}.latents"]).abs().max())
    bound = s["atol"] if same_platform else s["cross_platform_atol"]
    if diff > bound:
        found.append(f"latents differ by {diff:.3g} (bound: {bound or 'bit for bit'}; {where} the recording platform)")
    theirs = TENSORS.get(f"{name}.masks")
    n_theirs = 0 if theirs is None else theirs.shape[0]
    if len(ours["masks"]) != n_theirs:
        found.append(f"masks in {len(ours['masks'])} steps, theirs in {n_theirs}")
    elif theirs is not None and not torch.equal(torch.stack(ours["masks"]), theirs.bool()):
        found.append("masks differ")
    recorded = TENSORS.get(f"{name}.losses")
    if recorded is not None or ours["losses"]:
        loss_bound = s["atol"] if same_platform else s["cross_platform_loss_atol"]
        if recorded is None or len(ours["losses"]) != len(recorded):
            found.append(f"{len(ours['losses'])} nursing passes, theirs {0 if recorded is None else len(recorded)}")
        elif (d := max(abs(a - b) for a, b in zip(ours["losses"], recorded.tolist(), strict=True))) > loss_bound:
            found.append(f"nursing losses differ by {d:.3g} (bound: {loss_bound}; {where} the recording platform)")
    return found


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_preset_reproduces_the_authors_pipeline(tiny_pipe, same_platform, name):
    s = SCENARIOS[name]
    config = DetailConfig.authors_preset(**s["config"])
    assert config.to_dict() == s["detail_config"], "the preset is not what the fixture was recorded with"
    assert mismatches(name, run_preset(tiny_pipe, name, config), same_platform) == []


def test_the_fixture_records_its_platform_margins_and_bounds():
    assert len(META["fingerprint"]) == 16 and int(META["fingerprint"], 16) >= 0
    assert META["threads"] == "1"
    for s in SCENARIOS.values():
        assert s["mask_margin"] >= 2e-5, f"{s['name']}: a mask pixel lies within float noise of the threshold"
        assert 0.0 <= s["atol"] <= s["cross_platform_atol"] <= 1e-3
        assert s["worst_noise"]["latents"] <= s["cross_platform_atol"] / 2  # measured, with a factor of 2 to spare
        assert s["worst_noise"]["losses"] <= s["cross_platform_loss_atol"] / 2
        if s["config"]["nursing"]:  # L_align's target, a blurred map's argmax, is no near tie
            assert s["argmax_gap"] >= 1e-3, f"{s['name']}: a blurred nursing map's argmax is a near tie"
        for switch in s["switches"]:  # flipping it moves the result 10x the bounds or more: it fails everywhere
            assert s["effects"][switch]["ratio"] >= 10, f"{switch}: too small an effect for {s['name']}"
    assert SCENARIOS["nursing_off"]["atol"] == 0.0


def test_every_switch_is_guarded_once():
    """Each switch is flipped in the golden test or tested on its arithmetic (test_authors_switches.py), once."""
    golden = [switch for s in SCENARIOS.values() for switch in s["switches"]]
    assert sorted(golden + list(ARITHMETIC_SWITCHES)) == sorted(f.name for f in fields(AuthorsBehaviour))


@pytest.mark.parametrize("switch", sorted(GOLDEN_SWITCHES))
def test_golden_test_fails_when_a_reference_switch_is_flipped(tiny_pipe, same_platform, switch):
    name = GOLDEN_SWITCHES[switch]
    preset = DetailConfig.authors_preset(**SCENARIOS[name]["config"])
    flipped = preset.replace(authors=AuthorsBehaviour(**{**preset.authors.__dict__, switch: False}))
    ours = run_preset(tiny_pipe, name, flipped)
    assert mismatches(name, ours, same_platform), f"flipping {switch} went unnoticed"
    # and by a wide margin on this machine too: any other machine's rounding moves it by less than one bound
    assert effect(name, ours) >= MIN_EFFECT, f"flipping {switch} moves {name} by only {effect(name, ours):.3g} bounds"


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
