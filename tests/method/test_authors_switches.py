"""The authors' switches the golden comparison cannot see on every machine, tested on their arithmetic.

``tests/method/test_reference_parity.py`` flips each :class:`~detailpp.config.AuthorsBehaviour` switch and checks that
the golden comparison then fails; four switches change the result by rounding only (or only where a value lies
within float noise of a cut, which the fixture's scenarios are chosen to avoid), less than one CPU's rounding differs
from another's. Each of those is tested here instead, on values where the authors' arithmetic and ours differ, and
through the public pipeline call where the engine passes the switch on. Every test here fails when its switch is
ignored. ``floor_share_steps`` is also checked here on every T (the golden test sees it at its one T).
"""

from __future__ import annotations

import pytest
import torch

from detailpp import DetailConfig
from detailpp.config import AuthorsBehaviour
from detailpp.method import engine
from detailpp.method.latent_modification import FIRST_DETAIL_BRANCH, accumulate_latents
from detailpp.method.masks import binary_masks, normalized_maps
from detailpp.method.nursing import centroid_alignment_loss, nursing_loss
from detailpp.models.tiny import build_tiny_pipeline

#: The switches tested here rather than by the golden comparison (which it sees, if at all, below platform noise).
ARITHMETIC_SWITCHES = ("blend_latents", "one_batch_after_window", "nursing_no_epsilon", "relative_mask_threshold")

#: 4 branches (p0, p1, two subjects), as the golden scenarios.
PLAN = {
    "prompt": "a red robot beside a green tree",
    "base": "a robot beside a tree",
    "branches": [
        {"prompt": "a red robot beside a tree", "subject": "robot"},
        {"prompt": "a red robot beside a green tree", "subject": "tree"},
    ],
}


def without(switch: str, config: DetailConfig) -> DetailConfig:
    return config.replace(authors=AuthorsBehaviour(**{**config.authors.__dict__, switch: False}))


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(0)


def call(pipe, config: DetailConfig, steps: int = 5) -> None:
    generator = torch.Generator("cpu").manual_seed(0)
    pipe(
        plan=PLAN,
        height=128,
        width=128,
        num_inference_steps=steps,
        detail_config=config,
        output_type="latent",
        generator=generator,
    )


# ---- blend_latents ------------------------------------------------------------------------------------------------


def authors_blend(latents: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Their ``x_{i} = x_{i-1} + mask * (x_i - x_{i-1})`` chained over the detail branches, in float32."""
    out = latents.clone()
    for j in range(masks.shape[0]):
        i = FIRST_DETAIL_BRANCH + j
        out[i] = out[i - 1] + masks[j].float().unsqueeze(0) * (out[i] - out[i - 1])
    return out


def test_blend_latents_is_the_authors_formula_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    # magnitudes from 1e-3 to 1e3: z_prev + (z - z_prev) rounds away from z for many of them
    latents = torch.randn(4, 4, 8, 8, generator=generator) * 10.0 ** torch.randint(
        -3, 4, (4, 4, 8, 8), generator=generator
    )
    masks = torch.rand(2, 8, 8, generator=generator) > 0.5
    blended = accumulate_latents(latents, masks, blend=True)
    selected = accumulate_latents(latents, masks)
    assert torch.equal(blended, authors_blend(latents, masks))
    assert not torch.equal(blended, selected)  # the values tell the two apart ...
    for j in range(2):  # ... and the selection keeps each side's values bit for bit
        i = FIRST_DETAIL_BRANCH + j
        assert torch.equal(selected[i], torch.where(masks[j], latents[i], selected[i - 1]))


def test_the_pipeline_blends_as_the_authors_in_the_preset(pipe, monkeypatch):
    """Through the public call: every ALM of the preset is the authors' formula bit for bit, ours the selection."""
    seen: list[tuple[bool, bool, bool]] = []
    original = engine.accumulate_latents

    def checked(latents, masks, blend=False):
        out = original(latents, masks, blend=blend)
        theirs = authors_blend(latents, masks)
        seen.append((blend, torch.equal(out, theirs), torch.equal(out, original(latents, masks))))
        return out

    monkeypatch.setattr(engine, "accumulate_latents", checked)
    preset = DetailConfig.authors_preset(nursing=False)
    call(pipe, preset)
    assert seen and all(blend and authors for blend, authors, _ in seen)
    assert not all(ours for *_, ours in seen)  # the run's values tell the two apart
    seen.clear()
    call(pipe, without("blend_latents", preset))
    assert seen and all(not blend and ours for blend, _, ours in seen)


# ---- one_batch_after_window ---------------------------------------------------------------------------------------


def unet_batches(pipe, config: DetailConfig, steps: int) -> list[int]:
    """The batch size of every UNet call of one pipeline call (nursing off: one or more calls per step)."""
    sizes: list[int] = []

    def count(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        sizes.append(sample.shape[0])

    handle = pipe.unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        call(pipe, config, steps)
    finally:
        handle.remove()
    return sizes


def test_one_batch_after_window_denoises_every_branch_in_one_unet_call(pipe):
    """After the S = int(0.8 * 5) = 4 shared steps: the preset denoises the 4 branches (x2 for CFG) in one call, as
    the authors' code; ours the last branch in its own call, then the others."""
    preset = DetailConfig.authors_preset(nursing=False)
    assert preset.num_share_steps(5) == 4
    assert unet_batches(pipe, preset, 5) == [8] * 4 + [8]
    assert unet_batches(pipe, without("one_batch_after_window", preset), 5) == [8] * 4 + [2, 6]


# ---- nursing_no_epsilon -------------------------------------------------------------------------------------------


def test_the_epsilon_switch_is_the_authors_arithmetic():
    """``nursing_no_epsilon`` moves the loss by ~1e-8 relative (below float noise across machines); where it
    matters, a flat subject map (its min-max normalisation) or a map of no mass (the centroid), the authors'
    arithmetic gives NaN and ours does not."""
    probs = torch.full((16, 77), 1 / 77)  # every token equally attended: flat subject maps
    entropy_only = DetailConfig(centroid_alignment=False)  # the centroid's own epsilon: below
    ours = nursing_loss(probs, [[2], [4]], 6, (4, 4), entropy_only)
    theirs = entropy_only.replace(authors=AuthorsBehaviour(nursing_no_epsilon=True))
    theirs = nursing_loss(probs, [[2], [4]], 6, (4, 4), theirs)
    assert torch.isfinite(ours) and torch.isnan(theirs)
    empty = torch.zeros(16, 2)  # two subjects' maps with no mass
    ours = centroid_alignment_loss(empty, (4, 4), 0.05, 5, 1.1, AuthorsBehaviour())
    theirs = centroid_alignment_loss(empty, (4, 4), 0.05, 5, 1.1, AuthorsBehaviour(nursing_no_epsilon=True))
    assert torch.isfinite(ours) and torch.isnan(theirs)


# ---- relative_mask_threshold --------------------------------------------------------------------------------------


def test_the_relative_threshold_switch_is_the_authors_rule():
    """``relative_mask_threshold`` moves the cut by ``tau * 1e-8 / r`` for a map of range ``r`` (a few 1e-6 of the
    normalised map on the tiny model): only a pixel within float noise of the cut tells the two rules apart, and the
    fixture's seeds are chosen to have none (its mask margin). Where a pixel does lie between the cuts, the preset
    follows the authors' ``mask > min + (max - min) * tau`` and our default the plain ``> tau``."""
    r = 1e-6  # a map whose range is small: its normalised maximum is r / (r + 1e-8) = 0.990
    maps = torch.tensor([[0.0, 0.4975 * (r + 1e-8), r, 0.0]])
    normalized = normalized_maps(maps, (2, 2), (2, 2))
    authors = normalized > normalized.min() + (normalized.max() - normalized.min()) * 0.5
    assert torch.equal(binary_masks(normalized, 0.5, relative=True), authors)
    assert authors[0, 0, 1] and not binary_masks(normalized, 0.5)[0, 0, 1]


def test_the_pipeline_binarises_by_the_authors_rule_in_the_preset(pipe, monkeypatch):
    """Through the public call: the engine asks :func:`binary_masks` for the authors' rule in every step of the
    preset, for ours without the switch (the test above shows that the two rules differ)."""
    rules: list[bool] = []
    original = engine.binary_masks

    def recorded(normalized, tau, relative=False):
        rules.append(relative)
        return original(normalized, tau, relative=relative)

    monkeypatch.setattr(engine, "binary_masks", recorded)
    preset = DetailConfig.authors_preset(nursing=False)
    call(pipe, preset)
    assert len(rules) == 3 and all(rules)  # ALM after steps 0..S-2 = 0..2 (alm_one_step_short)
    rules.clear()
    call(pipe, without("relative_mask_threshold", preset))
    assert len(rules) == 3 and not any(rules)


# ---- floor_share_steps --------------------------------------------------------------------------------------------


def test_int_and_round_of_0_8_t_differ_exactly_for_t_1_or_2_mod_5():
    """The rule docs/method.md and ``AuthorsBehaviour.floor_share_steps`` state: S = int(0.8 T) (the authors') and
    round(0.8 T) (ours) differ, by one step, exactly for every T = 1 or 2 (mod 5), checked on the arithmetic and on
    :meth:`DetailConfig.num_share_steps` with and without the switch."""
    rule = [t for t in range(1, 101) if t % 5 in (1, 2)]
    assert rule[:8] == [1, 2, 6, 7, 11, 12, 16, 17]
    assert [t for t in range(1, 101) if int(0.8 * t) != round(0.8 * t)] == rule
    theirs, ours = DetailConfig(authors=AuthorsBehaviour(floor_share_steps=True)), DetailConfig()
    assert ours.share_steps == 0.8
    assert [t for t in range(1, 101) if theirs.num_share_steps(t) != ours.num_share_steps(t)] == rule
    assert all(ours.num_share_steps(t) - theirs.num_share_steps(t) == 1 for t in rule)
    assert all(theirs.num_share_steps(t) == int(0.8 * t) for t in range(1, 101))
