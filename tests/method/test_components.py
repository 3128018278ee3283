"""The paper's equations one by one: shared attention, capture and masks (eq. 3), ALM (eq. 4), nursing losses."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention

from detailpp.backbones.unet_attention import DetailAttnProcessor
from detailpp.config import DetailConfig
from detailpp.method.attention import AttentionState, CaptureSpec, MaskLayers
from detailpp.method.latent_modification import accumulate_latents
from detailpp.method.masks import MaskAccumulator, binary_masks, normalized_maps
from detailpp.method.nursing import (
    NursingRecord,
    centroid_alignment_loss,
    entropy_loss,
    nurse_latent,
    step_size,
    subject_distributions,
)

GRID = (8, 8)


def make_state(grid=GRID):
    layers = MaskLayers(self_attention=("self",), cross_attention=("cross",), level=0, last_block="mid_block")
    return AttentionState(layers, grid)


@pytest.fixture
def attn():
    torch.manual_seed(0)
    return Attention(query_dim=32, heads=4, dim_head=8).eval()


def test_shared_qk_sdpa_equals_materialised_map_and_the_formula(attn):
    torch.manual_seed(1)
    n_branches = 3
    x = torch.randn(2 * n_branches, 64, 32)  # [uncond x 3, cond x 3]
    outputs = {}
    for reference in (False, True):
        state = make_state()
        state.begin(share=[(n_branches, 2 * n_branches)])
        outputs[reference] = DetailAttnProcessor("self", state, materialise=reference)(attn, x.clone())
        assert state.self_calls == 1
    assert torch.allclose(outputs[False], outputs[True], atol=1e-5)

    # By hand: branch b of the conditional half uses softmax(Q0 K0^T / sqrt(d)) V_b.
    def heads(t):
        return t.view(t.shape[0], -1, 4, 8).transpose(1, 2)

    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
    for row in range(2 * n_branches):
        src = n_branches if row >= n_branches else row
        probs = (q[src] @ k[src].transpose(-1, -2) / math.sqrt(8)).softmax(-1)
        expected = attn.to_out[0]((probs @ v[row]).transpose(0, 1).reshape(64, 32))
        assert torch.allclose(outputs[False][row], expected, atol=1e-5), row
    # The unconditional half is untouched: it equals plain attention.
    plain = DetailAttnProcessor("self", None)(attn, x.clone())
    assert torch.allclose(outputs[False][:n_branches], plain[:n_branches], atol=1e-6)
    assert not torch.allclose(outputs[False][n_branches + 1], plain[n_branches + 1], atol=1e-3)


def test_capture_returns_planted_regions_and_masks_threshold_them(attn):
    """Keys make token 5 win wherever the query points at it: the map of token 5 is the planted region."""
    torch.manual_seed(2)
    region = torch.zeros(GRID, dtype=torch.bool)
    region[1:4, 2:6] = True
    inner = 8 * 4
    attn_id = Attention(query_dim=inner, cross_attention_dim=inner, heads=4, dim_head=8, bias=False).eval()
    for lin in (attn_id.to_q, attn_id.to_k, attn_id.to_v):
        lin.weight.data = torch.eye(inner)
    tokens = torch.zeros(1, 77, inner)
    tokens[0, 5] = 10.0  # the subject token's key
    hidden = torch.zeros(1, 64, inner)
    hidden[0, region.flatten()] = 3.0  # queries inside the region align with it
    state = make_state()
    state.begin(capture=CaptureSpec(rows=[0], tokens=[[5]]))
    DetailAttnProcessor("cross", state)(attn_id, hidden, encoder_hidden_states=tokens)
    state.end()
    state._counts.zero_()  # end() read the counter once; mean_maps() reuses that (no second device sync)
    maps = state.mean_maps()
    assert maps.shape == (1, 64)
    assert maps[0, region.flatten()].min() > 0.99 and maps[0, ~region.flatten()].max() < 0.02
    norm = normalized_maps(maps, GRID, GRID)
    assert torch.equal(binary_masks(norm, 0.5)[0], region)
    up = binary_masks(normalized_maps(maps, GRID, (32, 32)), 0.5)[0]
    assert up.shape == (32, 32) and up[8:12, 12:20].all() and not up[20:, :].any()


def test_capture_only_runs_when_armed_and_counts_layers(attn):
    state = make_state()
    x = torch.randn(2, 64, 32)
    ctx = torch.randn(2, 77, 32)
    attn_c = Attention(query_dim=32, cross_attention_dim=32, heads=4, dim_head=8).eval()
    DetailAttnProcessor("cross", state)(attn_c, x, encoder_hidden_states=ctx)
    assert state.maps is None and state.cross_calls == 0
    state.begin(capture=CaptureSpec(rows=[1, 1], tokens=[[1, 2], [3]]))
    for _ in range(2):
        DetailAttnProcessor("cross", state)(attn_c, x, encoder_hidden_states=ctx)
    assert state.cross_calls == 2 and state.mean_maps().shape == (2, 64)
    with pytest.raises(Exception, match="Cross-attention capture ran in 2 of 1"):
        state.end()


def test_processor_rejects_unexpected_token_count(attn):
    state = make_state(grid=(4, 4))
    with pytest.raises(Exception, match="met 64 tokens, expected 16"):
        DetailAttnProcessor("self", state)(attn, torch.randn(1, 64, 32))


def test_mask_accumulator_running_mean_and_current():
    a, b = torch.rand(2, 16), torch.rand(2, 16)
    running = MaskAccumulator("running")
    running.update(a)
    assert torch.allclose(running.update(b), (a + b) / 2)
    current = MaskAccumulator("current")
    current.update(a)
    assert torch.equal(current.update(b), b)


def test_alm_outside_mask_is_previous_branch_exactly_and_chains():
    torch.manual_seed(3)
    z = torch.randn(5, 4, 8, 8)
    masks = torch.rand(3, 8, 8) > 0.5
    out = accumulate_latents(z, masks)
    assert torch.equal(out[:2], z[:2])  # p0 and p1 are not blended
    for j in range(3):
        i = 2 + j
        m = masks[j].expand(4, 8, 8)
        assert torch.equal(out[i][m], z[i][m])
        assert torch.equal(out[i][~m], out[i - 1][~m])  # already modified previous branch
    # The last branch holds branch 2's pixels wherever only mask 0 holds.
    only_first = masks[0] & ~masks[1] & ~masks[2]
    assert torch.equal(out[4][:, only_first], z[2][:, only_first])
    with pytest.raises(ValueError, match="3 masks for 2 detail branches"):
        accumulate_latents(z[:4], masks)


def planted_probs(peaks, grid=GRID, spread=1.5):
    """Cross-attention (grid tokens x 77) with one Gaussian blob per subject token (tokens 2, 4, ...)."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    logits = torch.zeros(h * w, 77)
    for j, (py, px) in enumerate(peaks):
        logits[:, 2 + 2 * j] = 4 * torch.exp(-((ys - py) ** 2 + (xs - px) ** 2) / (2 * spread**2)).flatten()
    return logits.softmax(-1)


def test_entropy_loss_prefers_compact_maps():
    compact = subject_distributions(planted_probs([(2, 2)], spread=0.8), [[2]], 6, 0.5)
    diffuse = subject_distributions(planted_probs([(2, 2)], spread=4.0), [[2]], 6, 0.5)
    assert torch.allclose(compact.sum(-1), torch.ones(1))
    assert entropy_loss(compact) < entropy_loss(diffuse)
    uniform = torch.full((1, 64), 1 / 64)
    assert math.isclose(float(entropy_loss(uniform)), 2 * math.log(64), rel_tol=1e-3)


def test_alignment_gradient_moves_centroid_towards_peak():
    """A peak at (1, 1) and a broad secondary blob: one gradient step on the map moves its centroid to the peak."""
    h, w = GRID
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    logits = 3 * torch.exp(-((ys - 1) ** 2 + (xs - 1) ** 2) / 1.0) + 1.5 * torch.exp(
        -((ys - 6) ** 2 + (xs - 5) ** 2) / 4.0
    )
    logits = logits.flatten()[None].clone().requires_grad_(True)

    def centroid_distance(lg):
        p = lg.softmax(-1).view(h, w)
        c = torch.stack([(p.sum(1) * torch.arange(h)).sum(), (p.sum(0) * torch.arange(w)).sum()])
        return float(((c - torch.tensor([1.0, 1.0])) ** 2).sum().sqrt())

    before = centroid_distance(logits.detach())
    loss = centroid_alignment_loss(logits.softmax(-1), GRID, weight=0.05, kernel_size=5, sigma=1.1)
    (grad,) = torch.autograd.grad(loss, logits)
    after = centroid_distance(logits.detach() - 50 * grad)
    assert after < before - 0.1


def test_nurse_latent_descends_stops_at_threshold_and_caps():
    target = torch.tensor([1.0, -2.0])

    def loss_of(z):
        return ((z.float() - target) ** 2).sum()

    rec = NursingRecord(step=0)
    z = nurse_latent(torch.zeros(2), loss_of, iterations=50, threshold=1e-3, alpha=0.25, record=rec)
    assert rec.losses == sorted(rec.losses, reverse=True) and rec.stopped_early and rec.updates < 50
    assert torch.allclose(z, target, atol=0.05)
    capped = NursingRecord(step=0)
    nurse_latent(torch.zeros(2), loss_of, iterations=2, threshold=0.0, alpha=0.1, record=capped)
    assert capped.updates == 2 and len(capped.losses) == 2 and not capped.stopped_early
    idle = NursingRecord(step=0)
    z0 = torch.zeros(2)
    assert torch.equal(nurse_latent(z0, loss_of, iterations=5, threshold=1e9, alpha=1.0, record=idle), z0)
    assert idle.updates == 0


def test_nursing_loss_is_fp32_for_fp16_maps():
    probs = planted_probs([(2, 2), (5, 5)]).half()
    p = subject_distributions(probs, [[2], [4]], 6, 0.5)
    assert p.dtype == torch.float32
    assert centroid_alignment_loss(p, GRID, 0.05, 5, 1.1).dtype == torch.float32


def test_step_size_schedule_and_threshold_scaling():
    config = DetailConfig()
    assert step_size(config, 0, 50) == 1750.0 and step_size(config, 49, 50) == 0.0
    assert math.isclose(step_size(config, 5, 50), 1750.0 * math.sqrt(1 - 5 / 49))
    assert config.threshold_at(0, 2, 1024) == 26.0
    assert math.isclose(config.threshold_at(0, 3, 256), 26.0 * 1.5 * math.log(256) / math.log(1024))
    assert config.replace(scale_thresholds=False).threshold_at(9, 3, 256) == 22.0


def test_token_indices_with_a_slow_tokenizer_match_the_fast_one():
    from detailpp.plan import subject_token_indices
    from detailpp.resources import load_clip_tokenizer

    fast = load_clip_tokenizer()

    class Slow:  # transformers 4.x loads SDXL's tokenizer as a Python tokenizer, without offsets
        is_fast = False

        def __call__(self, text, **kwargs):
            assert "return_offsets_mapping" not in kwargs
            return fast(text, **kwargs)

    prompt = "A sky-blue teddy bear wearing a green tracksuit, next to a Rubik's cube"
    for subject in ("teddy bear", "tracksuit", "cube", "Rubik's cube", "sky"):
        assert subject_token_indices(prompt, subject, Slow()) == subject_token_indices(prompt, subject, fast), subject
    assert len(subject_token_indices(prompt, "tracksuit", fast)) == 2
