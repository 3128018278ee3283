"""Regional torch.compile with Detail++'s processors: same output as eager, no recompile on a second call, no graph
break inside the compiled blocks (tiny random SDXL on the CPU, dynamo with the "eager" backend: graphs are captured
and guarded exactly as with inductor, without inductor's compile time)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from detailpp import Branch, DecompositionPlan, DetailConfig
from detailpp.backbones.unet import find_mask_layers
from detailpp.backbones.unet_attention import detail_processors
from detailpp.method.attention import AttentionState
from detailpp.method.compile import recompile_limit_key, uncompile
from detailpp.models.tiny import build_tiny_pipeline
from tests.plans import TEDDY_PLAN

PLAN = TEDDY_PLAN
#: same shape (two subjects), other prompts and token positions
OTHER = DecompositionPlan(
    prompt="a small blue cat next to a yellow old car",
    base="a small cat next to an old car",
    branches=(
        Branch("a small blue cat next to an old car", "cat", ("blue",)),
        Branch("a small cat next to a yellow old car", "car", ("yellow",)),
    ),
)
#: one step of sharing, capture and nursing (gradients through the blocks), one step after the window
CONFIG = DetailConfig(
    share_steps=0.5,
    nursing_steps=1,
    nursing_thresholds=(0.0,),
    nursing_max_iterations_early=1,
    nursing_max_iterations_late=1,
)


def run(pipe, plan=PLAN, seed=0):
    return pipe(
        plan=plan,
        height=128,
        width=128,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        detail_config=CONFIG,
    )


def compiled_so_far() -> tuple[int, int]:
    """Graphs dynamo made so far, and ops it captured into them: both grow with every (re)compile."""
    return counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"]


def test_mask_layers_share_one_processor_instance():
    pipe = build_tiny_pipeline(seed=0)
    layers = find_mask_layers(pipe.unet)
    state = AttentionState(layers, layers.token_grid(16, 16), layers.expected_tokens(16, 16))
    with detail_processors(pipe.unet, state) as installed:
        assert len(installed) == 16 and len({id(p) for p in installed.values()}) == 1
    layers = find_mask_layers(pipe.unet, share="all")
    state = AttentionState(layers, layers.token_grid(16, 16), layers.expected_tokens(16, 16))
    with detail_processors(pipe.unet, state) as installed:
        assert len({id(p) for p in installed.values()}) == 2  # one per resolution level


def test_compiled_detail_equals_eager_without_recompiles_or_graph_breaks():
    pipe = build_tiny_pipeline(seed=0)
    eager = [run(pipe).images, run(pipe, OTHER, seed=1).images]
    torch._dynamo.reset()
    counters.clear()
    try:
        key = recompile_limit_key()
        with torch._dynamo.config.patch(**{key: 8}):
            # fullgraph: a graph break inside a block would raise instead of splitting the graph
            compiled = pipe.compile_detail(backend="eager", fullgraph=True)
            blocks = [n for n, m in pipe.unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
            assert compiled == blocks and getattr(torch._dynamo.config, key) == 32
            first = run(pipe)
            after_first = compiled_so_far()
            second = run(pipe, OTHER, seed=1)
            assert compiled_so_far() == after_first, "the second call recompiled"
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert 0 < after_first[0] <= 8  # a handful of variants (window, after it, nursing, plain layers)
        assert [r.updates for r in first.nursing] == [1]
        # the "eager" backend runs the captured ops: equal to eager bit for bit
        assert torch.equal(first.images, eager[0]) and torch.equal(second.images, eager[1])
    finally:
        uncompile(pipe.unet)
        torch._dynamo.reset()


def test_compile_detail_rejects_a_model_without_blocks():
    from detailpp.method.compile import compile_detail

    with pytest.raises(ValueError, match="no BasicTransformerBlock"):
        compile_detail(torch.nn.Linear(2, 2))
