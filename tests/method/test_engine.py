"""The Detail++ engine's pieces without a pipeline: branch layout, conditioning per row set, the plan's token
positions, what a call needs, and the error family (the engine's outputs are tested through the pipeline:
test_pipeline.py, test_reference_parity.py)."""

from __future__ import annotations

import pytest
import torch

from detailpp import DetailConfig
from detailpp.backbones.unet import Conditioning
from detailpp.errors import DetailError
from detailpp.method.engine import BranchLayout, DetailEngine
from detailpp.plan import BranchTokens, validate_plan
from detailpp.resources import load_clip_tokenizer
from tests.plans import TEDDY_PLAN

PLAN = TEDDY_PLAN


def test_layout_rows_and_share_ranges():
    cfg, plain = BranchLayout(4, cfg=True), BranchLayout(4, cfg=False)
    assert cfg.rows_of([0, 3]) == [0, 3, 4, 7] and plain.rows_of([0, 3]) == [0, 3]
    assert cfg.last == 3 and cfg.detail_branches == [2, 3]
    assert cfg.share_ranges(DetailConfig()) == [(4, 8)]
    assert cfg.share_ranges(DetailConfig(share_halves="both")) == [(0, 4), (4, 8)]
    assert plain.share_ranges(DetailConfig()) == [(0, 4)]
    assert cfg.share_ranges(DetailConfig(share_attention=False)) == []


def test_conditioning_gathers_each_row_set_once():
    cond = Conditioning(torch.arange(4.0).view(4, 1, 1).expand(4, 77, 2), {"text_embeds": torch.arange(4.0)[:, None]})
    first = cond.rows([1, 3])
    assert cond.rows([1, 3]) is first and cond.num_keys == 77
    assert first["added_cond_kwargs"]["text_embeds"].flatten().tolist() == [1.0, 3.0]
    assert first["timestep_cond"] is None
    assert "added_cond_kwargs" not in Conditioning(torch.zeros(2, 77, 2)).rows([0])  # SD 1.x: none


def test_branch_tokens_in_the_previous_prompt():
    tokenizer = load_clip_tokenizer()
    plan = validate_plan(PLAN, tokenizer)
    tokens = BranchTokens.of(plan, tokenizer)
    assert tokens.in_full == tuple(b.subject_token_indices for b in plan.branches)
    # "teddy bear" in p1 ("a teddy bear ..."), "tracksuit" in p2 ("a red teddy bear wearing a tracksuit")
    assert tokens.in_previous == ((2, 3), (7, 8))  # "tracksuit" is two CLIP tokens
    assert tokens.prompt_length == len(tokenizer(plan.prompt).input_ids) - 2
    assert BranchTokens.of(plan, tokenizer, previous=False).in_previous == ()


def test_what_a_call_needs():
    assert DetailEngine.num_nursing_steps(DetailConfig(), 2) == 6
    assert DetailEngine.num_nursing_steps(DetailConfig(), 0) == 0
    assert DetailEngine.num_nursing_steps(DetailConfig(entropy_loss=False, centroid_alignment=False), 2) == 0
    off = DetailConfig(nursing=False, latent_modification=False)
    assert not DetailEngine.wants_masks(off, 2, return_masks=False) and DetailEngine.wants_masks(off, 2, True)
    assert DetailEngine.needs_previous_tokens(DetailConfig(nursing=False), 2, False)
    assert not DetailEngine.needs_previous_tokens(DetailConfig(), 2, False)  # nursing on: masks from p0


@pytest.mark.parametrize(
    "module_and_name",
    [
        ("detailpp.config", "ConfigError"),
        ("detailpp.plan", "PlanError"),
        ("detailpp.pipelines.sdxl", "DetailInputError"),
        ("detailpp.method.attention", "HookError"),
        ("detailpp.models.loading", "ModelLoadError"),
        ("detailpp.bench", "BenchError"),
        ("detailpp.demo.session", "DemoInputError"),
        ("detailpp.cli", "UserError"),
    ],
)
def test_every_error_is_a_detail_error_and_keeps_its_base(module_and_name):
    import importlib

    module, name = module_and_name
    error = getattr(importlib.import_module(module), name)
    assert issubclass(error, DetailError)
    old_base = {"HookError": RuntimeError, "ModelLoadError": OSError, "UserError": Exception}.get(name, ValueError)
    assert issubclass(error, old_base)
