"""Detail++ on MMDiT transformers (FLUX.1, SD3/3.5) on tiny random models with the real block and processor names:
the equivalences that pin the mapping down (docs/method.md, "Detail++ on MMDiT"), the processors' formula, nursing's
early stop, LoRA, and the refusals. Binding quality is not tested: no trained weights reach these machines."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from detailpp import DetailConfig, DetailPlusPlusFluxPipeline, DetailPlusPlusSD3Pipeline
from detailpp.backbones.mmdit import BlockChoiceError
from detailpp.backbones.mmdit_attention import FluxDetailProcessor, SD3DetailProcessor, joint_text_probabilities
from detailpp.inputs import DetailInputError
from detailpp.method.attention import AttentionState, MaskLayers
from detailpp.models.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from detailpp.plan import DecompositionPlan, PlanError

PLAN = {
    "prompt": "a red dog and a blue cat",
    "base": "a dog and a cat",
    "branches": [
        {"prompt": "a red dog and a cat", "subject": "dog"},
        {"prompt": "a dog and a blue cat", "subject": "cat"},
    ],
}
SIZE = {"height": 128, "width": 128}
#: every Detail++ step of the method off: each branch is its own prompt's plain run
PLAIN = DetailConfig(share_attention=False, latent_modification=False, nursing=False, prune_branches=False)
FAMILIES = ("flux", "sd3")
#: with SD3.5-medium's dual attention (an image-only attn2 in the first blocks, which shares too)
WITH_DUAL = (*FAMILIES, "sd35-medium")


@pytest.fixture(scope="module")
def pipes() -> dict:
    out = {
        "flux": build_tiny_flux_pipeline(pipeline_class=DetailPlusPlusFluxPipeline),
        "sd3": build_tiny_sd3_pipeline(pipeline_class=DetailPlusPlusSD3Pipeline),
        "sd35-medium": build_tiny_sd3_pipeline(pipeline_class=DetailPlusPlusSD3Pipeline, dual=True),
    }
    for pipe in out.values():
        pipe.set_progress_bar_config(disable=True)
    return out


def plain_of(pipe):
    plain = pipe.plain_pipeline()
    plain.set_progress_bar_config(disable=True)
    return plain


def run(pipe, steps: int = 3, seed: int = 0, **kwargs):
    kwargs = {"plan": PLAN, "output_type": "latent", **SIZE, **kwargs}
    return pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("family", WITH_DUAL)
def test_zero_branch_plan_is_the_plain_pipeline_bit_for_bit(pipes, family):
    pipe = pipes[family]
    plan = DecompositionPlan(prompt="a dog", base="a dog", branches=())
    out = run(pipe, plan=plan, output_type="np")
    ref = plain_of(pipe)(
        "a dog", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np", **SIZE
    )
    assert isinstance(plain_of(pipe), FluxPipeline if family == "flux" else StableDiffusion3Pipeline)
    assert out.plan == plan and (out.images == ref.images).all()


@pytest.mark.parametrize("family", WITH_DUAL)
def test_with_sharing_and_alm_off_each_branch_is_the_plain_pipeline_on_its_prompt(pipes, family):
    pipe = pipes[family]
    out = run(pipe, detail_config=PLAIN, return_branch_images=True, return_masks=True)
    plain = plain_of(pipe)
    prompts = [PLAN["prompt"], PLAN["base"], *(b["prompt"] for b in PLAN["branches"])]
    for prompt, latent in zip(prompts, out.branch_images, strict=True):
        ref = plain(
            prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent", **SIZE
        )
        assert (ref.images[0] - latent).abs().max() < 1e-4, prompt
    assert out.masks is not None and out.masks.shape[0] == 2  # captured, yet nothing changed


@pytest.mark.parametrize("family", WITH_DUAL)
def test_sharing_and_alm_change_the_branches_and_the_final_image_is_the_last_branch(pipes, family):
    pipe = pipes[family]
    off = run(pipes[family], detail_config=PLAIN, return_branch_images=True)
    on = run(
        pipe, detail_config=PLAIN.replace(share_attention=True, latent_modification=True), return_branch_images=True
    )
    assert not torch.allclose(off.branch_images[2:], on.branch_images[2:], atol=1e-4)
    assert torch.equal(on.images[0], on.branch_images[-1])
    assert torch.equal(off.branch_images[0], on.branch_images[0])  # p0 is never modified


@pytest.mark.parametrize("family", FAMILIES)
def test_alm_changes_a_branch_only_inside_its_mask(pipes, family):
    """Each step's masks, seen by the callback, select where branch i may differ from branch i - 1."""
    pipe = pipes[family]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(p, i, t, tensors):
        if tensors["masks"] is not None:
            seen.append((tensors["latents"].clone(), tensors["masks"].clone()))
        return {}

    config = DetailConfig(nursing=False, share_steps=1.0)
    run(pipe, detail_config=config, callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents", "masks"])
    assert seen
    backbone_spatial = (
        (lambda x: x.transpose(1, 2).reshape(x.shape[0], x.shape[2], 8, 8)) if family == "flux" else None
    )
    for latents, masks in seen:
        image = backbone_spatial(latents) if backbone_spatial else latents
        for j, mask in enumerate(masks):
            i = 2 + j
            outside = ~mask.expand_as(image[i])
            assert torch.equal(image[i][outside], image[i - 1][outside])
        assert masks.any() and not masks.all()


def joint_attention(pipe) -> torch.nn.Module:
    return pipe.transformer.transformer_blocks[0].attn


@pytest.mark.parametrize("family", FAMILIES)
def test_the_shared_processor_equals_the_materialised_formula(pipes, family):
    """Branch b's image tokens get ``softmax(Q_img^0 [K_txt^b; K_img^0]^T / sqrt(d)) [V_txt^b; V_img^b]``, from the
    projections computed by hand; branch 0 is untouched, and with nothing armed the output is the diffusers
    processor's, bit for bit."""
    pipe = pipes[family]
    attn = joint_attention(pipe)
    dim = attn.to_q.in_features
    g = torch.Generator().manual_seed(1)
    n, n_img, n_txt = 3, 16, 5
    image = torch.randn(n, n_img, dim, generator=g)
    text = torch.randn(n, n_txt, attn.add_q_proj.in_features, generator=g)
    layers = MaskLayers(("a",), (), level=0, last_block="b", shared_self_attention=("a",))
    state = AttentionState(layers, (4, 4))
    processor = (FluxDetailProcessor if family == "flux" else SD3DetailProcessor)(state, {attn: frozenset({"share"})})
    original = attn.processor
    plain = original(attn, image, text)
    assert all(torch.equal(a, b) for a, b in zip(processor(attn, image, text), plain, strict=True))
    state.begin(share=[(0, n)])
    shared_image, _ = processor(attn, image, text)
    state.end()
    assert state.self_calls == 1

    def heads(t):
        return t.unflatten(-1, (-1, attn.head_dim if family == "flux" else dim // attn.heads)).transpose(1, 2)

    q, k, v = (heads(p(image)) for p in (attn.to_q, attn.to_k, attn.to_v))
    tq, tk, tv = (heads(p(text)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    norms = [attn.norm_q, attn.norm_k, attn.norm_added_k]
    q, k, tk = (t if norm is None else norm(t) for norm, t in zip(norms, (q, k, tk), strict=True))
    for b in range(1, n):
        keys = torch.cat([tk[b], k[0]], 1) if family == "flux" else torch.cat([k[0], tk[b]], 1)
        values = torch.cat([tv[b], v[b]], 1) if family == "flux" else torch.cat([v[b], tv[b]], 1)
        probs = (q[0] @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        expected = attn.to_out[0]((probs @ values).transpose(0, 1).flatten(1))
        assert torch.allclose(shared_image[b], expected, atol=1e-5), b
    assert torch.equal(shared_image[0], plain[0][0])


def test_joint_capture_is_the_joint_softmax_restricted_to_the_text_keys():
    g = torch.Generator().manual_seed(2)
    q, kt, ki = (
        torch.randn(1, 2, 7, 4, generator=g),
        torch.randn(1, 2, 3, 4, generator=g),
        torch.randn(1, 2, 9, 4, generator=g),
    )
    full = (q @ torch.cat([kt, ki], 2).transpose(-1, -2) / 2.0).softmax(-1)[..., :3]
    assert torch.allclose(joint_text_probabilities(q, kt, ki, chunk=2), full, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_capture_softmax_switch_changes_the_masks_not_the_branches(pipes, family):
    text = run(pipes[family], detail_config=PLAIN, return_masks=True, return_branch_images=True)
    joint = run(
        pipes[family],
        detail_config=PLAIN.replace(mmdit_capture_softmax="joint"),
        return_masks=True,
        return_branch_images=True,
    )
    assert torch.equal(text.branch_images, joint.branch_images)
    assert not torch.allclose(text.masks, joint.masks)


@pytest.mark.parametrize("family", FAMILIES)
def test_processors_are_restored_after_success_and_after_an_exception(pipes, family):
    pipe = pipes[family]
    before = dict(pipe.transformer.attn_processors)
    run(pipe)
    assert pipe.transformer.attn_processors == before

    def boom(p, i, t, tensors):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        run(pipe, callback_on_step_end=boom)
    assert pipe.transformer.attn_processors == before


@pytest.mark.parametrize("family", FAMILIES)
def test_nursing_runs_and_stops_after_the_last_capture_block(pipes, family):
    pipe = pipes[family]
    blocks = pipe.transformer.transformer_blocks
    ran: list[int] = []
    grads: list[bool] = []
    hooks = [
        b.register_forward_hook(lambda m, a, o, i=i: ran.append(i) or grads.append(torch.is_grad_enabled()))
        for i, b in enumerate(blocks)
    ]
    try:
        config = DetailConfig(mmdit_capture_blocks=(0,), nursing_steps=1, nursing_thresholds=(0.0,))
        out = run(pipe, steps=2, detail_config=config)
    finally:
        for h in hooks:
            h.remove()
    nursing_blocks = [i for i, g in zip(ran, grads, strict=True) if g]
    assert out.nursing and out.nursing[0].losses and all(math.isfinite(x) for x in out.nursing[0].losses)
    assert nursing_blocks and set(nursing_blocks) == {0}  # a nursing pass never runs a block after the capture
    assert len(blocks) > 1 and set(ran) == set(range(len(blocks)))  # the denoising passes run them all


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lora_with_a_no_branch_plan_is_the_plain_pipeline_with_that_lora(pipes, family):
    from peft import LoraConfig

    pipe = pipes[family]
    plan = DecompositionPlan(prompt="a dog", base="a dog", branches=())
    pipe.transformer.add_adapter(
        LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "add_q_proj"], init_lora_weights=False), "test"
    )
    try:
        with_lora = run(pipe, plan=plan)
        plain = plain_of(pipe)(
            "a dog", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent", **SIZE
        )
        assert torch.equal(with_lora.images, plain.images)
        pipe.transformer.disable_adapters()
        without = run(pipe, plan=plan)
        assert not torch.equal(with_lora.images, without.images)
        pipe.transformer.enable_adapters()
        run(pipe)  # the Detail++ processors call the LoRA-wrapped projections
    finally:
        pipe.transformer.delete_adapters("test")


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_inputs_get_one_clear_error(pipes, family):
    pipe = pipes[family]
    with pytest.raises(DetailInputError, match="multiple of 16"):
        run(pipe, height=120)
    n_blocks = len(pipe.transformer.transformer_blocks)
    with pytest.raises(BlockChoiceError, match=f"has {n_blocks} joint blocks"):
        run(pipe, detail_config=DetailConfig(mmdit_capture_blocks=(n_blocks,)))
    argument = "ip_adapter_image"
    with pytest.raises(DetailInputError, match=f"`{argument}` is not supported by {type(pipe).__name__}"):
        run(pipe, ip_adapter_image=torch.zeros(3, 8, 8))


def test_a_subject_beyond_flux_s_t5_window_is_refused(pipes):
    prompt = "a red dog " + "on a long road " * 70 + "and a blue cat"
    plan = {**PLAN, "prompt": prompt, "base": prompt.replace("red ", "").replace("blue ", "")}
    plan["branches"] = [
        {"prompt": prompt.replace("blue ", ""), "subject": "dog"},
        {"prompt": prompt.replace("red ", ""), "subject": "cat"},
    ]
    with pytest.raises(PlanError, match="beyond the text encoder's window of 256 tokens"):
        run(pipes["flux"], plan=plan, max_sequence_length=256)


@pytest.mark.parametrize(
    ("family", "blocks"),
    [("flux", {"FluxTransformerBlock", "FluxSingleTransformerBlock"}), ("sd3", {"JointTransformerBlock"})],
)
def test_compiled_transformer_blocks_equal_eager_without_graph_breaks(pipes, family, blocks):
    """`compile_detail` compiles the joint blocks with Detail++'s processors inside (the "eager" backend runs the
    captured ops: bit for bit), nursing included, with no graph break (fullgraph would raise)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from detailpp.method.compile import uncompile

    pipe = pipes[family]
    config = DetailConfig(nursing_steps=1, nursing_max_iterations_early=1, nursing_max_iterations_late=1)
    eager = run(pipe, steps=2, detail_config=config)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = pipe.compile_detail(backend="eager", fullgraph=True)
        assert {type(pipe.transformer.get_submodule(n)).__name__ for n in compiled} == blocks
        out = run(pipe, steps=2, detail_config=config)
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert [r.updates for r in out.nursing] == [r.updates for r in eager.nursing] == [1]
        assert torch.equal(out.images, eager.images)
    finally:
        uncompile(pipe.transformer)
        torch._dynamo.reset()
