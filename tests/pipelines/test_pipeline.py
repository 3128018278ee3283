"""The Detail++ pipeline on the tiny random SDXL (CPU, fp32, the real CLIP tokenizer): ``tiny_pipe`` of
tests/conftest.py, shared by the module's tests (each leaves it as it found it)."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from detailpp import Branch, DecompositionPlan, DetailConfig, PlanError
from detailpp.backbones.unet import find_mask_layers
from detailpp.method.attention import HookError
from detailpp.pipelines.sdxl import DetailInputError
from tests.plans import TEDDY_PLAN

PLAN = TEDDY_PLAN
PROMPT = PLAN.prompt
SIZE = {"height": 128, "width": 128}
PLAIN = DetailConfig(share_attention=False, latent_modification=False, nursing=False)


def run(pipe, steps=3, seed=0, **kwargs):
    kwargs.setdefault("plan", PLAN)
    kwargs.setdefault("output_type", "np")
    kwargs = {**SIZE, **kwargs}
    return pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs)


def processors_of(pipe):
    return dict(pipe.unet.attn_processors)


def test_mask_layers_are_sdxl_lowest_resolution_blocks(tiny_pipe):
    layers = find_mask_layers(tiny_pipe.unet)
    expected = [
        name
        for name, module in tiny_pipe.unet.named_modules()
        if name.startswith(("down_blocks.2.", "mid_block.", "up_blocks.0.")) and name.endswith((".attn1", ".attn2"))
    ]
    assert sorted(layers.self_attention + layers.cross_attention) == sorted(expected)
    assert all(n.endswith("attn1") for n in layers.self_attention) and len(layers.self_attention) == 8
    assert layers.last_block == "up_blocks.0"
    assert layers.token_grid(16, 16) == (4, 4) and layers.token_grid(21, 33) == (6, 9)


def test_plain_mode_branches_equal_plain_sdxl_per_prompt(tiny_pipe):
    out = run(tiny_pipe, detail_config=PLAIN.replace(prune_branches=False), return_branch_images=True)
    sdxl = StableDiffusionXLPipeline(**tiny_pipe.components)
    sdxl.set_progress_bar_config(disable=True)
    for prompt, image in zip(PLAN.prompts, out.branch_images, strict=True):
        ref = sdxl(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np", **SIZE)
        assert abs(ref.images[0] - image).max() < 1e-4, prompt
    assert (out.images[0] == out.branch_images[-1]).all()


def test_zero_branch_plan_is_plain_sdxl_bit_for_bit(tiny_pipe):
    plan = DecompositionPlan(prompt="a dog", base="a dog", branches=())
    out = run(tiny_pipe, plan=plan)
    sdxl = StableDiffusionXLPipeline(**tiny_pipe.components)
    sdxl.set_progress_bar_config(disable=True)
    ref = sdxl("a dog", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np", **SIZE)
    assert out.plan == plan and (out.images == ref.images).all()


def test_same_seed_same_image_other_seed_other_image(tiny_pipe):
    a, b, c = run(tiny_pipe, seed=1), run(tiny_pipe, seed=1), run(tiny_pipe, seed=2)
    assert (a.images == b.images).all()
    assert not (a.images == c.images).all()


def test_pruning_does_not_change_the_final_image(tiny_pipe):
    config = DetailConfig(share_steps=0.5, nursing=False)
    pruned = run(tiny_pipe, steps=4, detail_config=config)
    full = run(tiny_pipe, steps=4, detail_config=config, return_branch_images=True)
    unpruned = run(tiny_pipe, steps=4, detail_config=config.replace(prune_branches=False))
    assert (pruned.images == full.images).all() and (pruned.images == unpruned.images).all()
    assert len(full.branch_images) == 4


def test_sharing_and_alm_change_the_result(tiny_pipe):
    plain = run(tiny_pipe, detail_config=PLAIN)
    shared = run(tiny_pipe, detail_config=PLAIN.replace(share_attention=True))
    alm = run(tiny_pipe, detail_config=PLAIN.replace(latent_modification=True))
    assert not (plain.images == shared.images).all()
    assert not (plain.images == alm.images).all()


def test_reference_attention_matches_sdpa_end_to_end(tiny_pipe):
    config = DetailConfig(nursing=False)
    fast = run(tiny_pipe, detail_config=config, output_type="latent")
    ref = run(tiny_pipe, detail_config=config.replace(materialised_attention=True), output_type="latent")
    assert torch.allclose(fast.images, ref.images, atol=1e-4)


def test_masks_and_nursing_records(tiny_pipe):
    config = DetailConfig(
        nursing_thresholds=(0.0,), nursing_steps=2, nursing_max_iterations_early=2, nursing_max_iterations_late=2
    )
    out = run(tiny_pipe, detail_config=config, return_masks=True)
    assert out.masks.shape == (2, 16, 16)
    assert out.masks.min() >= 0 and out.masks.max() <= 1 and (out.masks.amax(dim=(1, 2)) > 0.99).all()
    assert [r.step for r in out.nursing] == [0, 1]
    assert all(r.updates == 2 and len(r.losses) == 2 for r in out.nursing)


def test_nursing_changes_only_through_branch_zero(tiny_pipe):
    base = DetailConfig(share_attention=False, latent_modification=False, prune_branches=False)
    off = run(tiny_pipe, detail_config=base.replace(nursing=False), return_branch_images=True)
    on = run(
        tiny_pipe, detail_config=base.replace(nursing_thresholds=(0.0,), nursing_steps=1), return_branch_images=True
    )
    assert not (off.branch_images[0] == on.branch_images[0]).all()
    for i in range(1, 4):  # without sharing or ALM the nursed latent of branch 0 reaches no other branch
        assert (off.branch_images[i] == on.branch_images[i]).all()


def test_processors_restored_after_success_and_exception(tiny_pipe):
    before = processors_of(tiny_pipe)
    run(tiny_pipe)
    assert processors_of(tiny_pipe) == before

    def boom(p, i, t, kwargs):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        run(tiny_pipe, callback_on_step_end=boom)
    assert processors_of(tiny_pipe) == before


def test_custom_processor_on_untouched_layer_survives(tiny_pipe):
    calls = []

    class Counting(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            calls.append(1)
            return super().__call__(attn, hidden_states, *args, **kwargs)

    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    custom = Counting()
    original = tiny_pipe.unet.attn_processors[name]
    tiny_pipe.unet.set_attn_processor({**tiny_pipe.unet.attn_processors, name: custom})
    try:
        run(tiny_pipe, steps=2)
        assert tiny_pipe.unet.attn_processors[name] is custom and len(calls) > 0
    finally:
        tiny_pipe.unet.set_attn_processor({**tiny_pipe.unet.attn_processors, name: original})


def test_hook_that_did_not_fire_raises(tiny_pipe):
    layer = find_mask_layers(tiny_pipe.unet).self_attention[0]

    def swap(p, i, t, kwargs):  # something replaces a Detail++ processor mid-run
        p.unet.get_submodule(layer).set_processor(AttnProcessor2_0())
        return {}

    with pytest.raises(HookError, match="Shared self-attention ran in"):
        run(tiny_pipe, callback_on_step_end=swap, detail_config=DetailConfig(nursing=False))


def test_callback_sees_one_latent_per_branch(tiny_pipe):
    seen = []

    def cb(p, i, t, kwargs):
        seen.append(kwargs["latents"].shape[0])
        return {}

    run(tiny_pipe, callback_on_step_end=cb)
    assert seen == [4, 4, 4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 100}, "multiple of 8"),
        ({"width": 0}, "multiple of 8"),
        ({"steps": 0}, "num_inference_steps"),
        ({"plan": None, "prompt": "   "}, "prompt is empty"),
        ({"plan": None, "prompt": ["a", "b"]}, "one string"),
        ({"num_images_per_prompt": 2}, "one image per call"),
        ({"prompt_embeds": torch.zeros(1)}, "not supported"),
        ({"prompt": "a blue cat"}, "was made for the prompt"),
    ],
)
def test_bad_inputs_fail_before_denoising(tiny_pipe, kwargs, message):
    steps = kwargs.pop("steps", 2)
    calls = []
    with pytest.raises(ValueError, match=message) as excinfo:
        run(tiny_pipe, steps=steps, callback_on_step_end=lambda *a: calls.append(1) or {}, **kwargs)
    assert isinstance(excinfo.value, (DetailInputError, PlanError))  # ours, not one from deep inside diffusers
    assert not calls


def test_plan_subject_missing_or_cut_off(tiny_pipe):
    bad = DecompositionPlan(PROMPT, PLAN.base, branches=(Branch("a red cat", "cat", ("red",)),))
    with pytest.raises(PlanError, match="'cat' does not occur"):
        run(tiny_pipe, plan=bad)
    long_prompt = "a photo " + "of a very nice place " * 16 + "with a red dog"
    cut = DecompositionPlan(long_prompt, long_prompt.replace("red ", ""), branches=(Branch(long_prompt, "dog"),))
    with pytest.raises(PlanError, match="beyond the text encoder's window of 77"):
        run(tiny_pipe, plan=cut)


def test_config_validation():
    for kwargs, message in [
        ({"mask_threshold": 0.0}, "mask_threshold"),
        ({"mask_threshold": 1.5}, "mask_threshold"),
        ({"share_steps": 1.2}, "share_steps"),
        ({"share_steps": -0.1}, "share_steps"),
        ({"mask_source": "x"}, "mask_source"),
    ]:
        with pytest.raises(ValueError, match=message):
            DetailConfig(**kwargs)


def test_from_pipe_previous_mask_source_and_no_cfg(tiny_pipe):
    from detailpp import DetailPlusPlusPipeline

    sdxl = StableDiffusionXLPipeline(**tiny_pipe.components)
    detail = DetailPlusPlusPipeline.from_pipe(sdxl)
    detail.set_progress_bar_config(disable=True)
    assert detail.unet is tiny_pipe.unet
    prev = run(detail, detail_config=DetailConfig(nursing=False, mask_source="previous"), return_masks=True)
    full = run(detail, detail_config=DetailConfig(nursing=False, mask_source="full"), return_masks=True)
    assert prev.masks.shape == full.masks.shape and not torch.equal(prev.masks, full.masks)
    no_cfg = run(detail, guidance_scale=1.0, output_type="latent")
    assert no_cfg.images.shape == (1, 4, 16, 16) and torch.isfinite(no_cfg.images).all()


def test_nan_image_raises_with_the_fp16_vae_advice(tiny_pipe, monkeypatch):
    decode = tiny_pipe.vae.decode

    def nan_decode(latents, return_dict=False):
        image = decode(latents, return_dict=False)[0]
        return (image * float("nan"),)

    monkeypatch.setattr(tiny_pipe.vae, "decode", nan_decode)
    with pytest.raises(FloatingPointError, match="fp16-fix VAE"):
        run(tiny_pipe, steps=1, detail_config=DetailConfig(nursing=False))


def test_share_layers_all_shares_every_self_attention_layer(tiny_pipe):
    all_self = [n for n, _ in tiny_pipe.unet.named_modules() if n.endswith(".attn1")]
    layers = find_mask_layers(tiny_pipe.unet, share="all")
    assert sorted(layers.shared_self_attention) == sorted(all_self) and len(all_self) > len(layers.self_attention)
    assert layers.expected_tokens(16, 16)["down_blocks.1.attentions.0.transformer_blocks.0.attn1"] == 8 * 8
    before = processors_of(tiny_pipe)
    config = DetailConfig(nursing=False, latent_modification=False, prune_branches=False)
    lowest = run(tiny_pipe, detail_config=config, return_branch_images=True)
    every = run(tiny_pipe, detail_config=config.replace(share_layers="all"), return_branch_images=True)
    assert processors_of(tiny_pipe) == before
    assert (lowest.branch_images[0] == every.branch_images[0]).all()  # branch 0 keeps its own attention
    assert not (lowest.branch_images[1] == every.branch_images[1]).all()
    with pytest.raises(ValueError, match="share_layers"):
        DetailConfig(share_layers="some")


def test_model_folder_detail_defaults_round_trip_and_apply(tiny_pipe, tmp_path):
    from detailpp.pipelines.sdxl import DetailPlusPlusPipeline

    folder = tmp_path / "model"
    tiny_pipe.set_detail_defaults({"nursing": False, "mask_threshold": 0.3})
    try:
        tiny_pipe.save_pretrained(folder)
    finally:
        tiny_pipe.detail_defaults = DetailPlusPlusPipeline.detail_defaults
    loaded = DetailPlusPlusPipeline.from_pretrained(str(folder))
    loaded.set_progress_bar_config(disable=True)
    assert dict(loaded.detail_defaults) == {"nursing": False, "mask_threshold": 0.3}
    # a call without detail_config uses them; explicit fields win over them
    assert loaded.make_detail_config(mask_threshold=0.7) == DetailConfig(nursing=False, mask_threshold=0.7)
    implicit = run(loaded).images
    explicit = run(loaded, detail_config=DetailConfig(nursing=False, mask_threshold=0.3)).images
    paper = run(loaded, detail_config=DetailConfig()).images
    assert (implicit == explicit).all() and not (implicit == paper).all()
    # from_pipe keeps them; saving a pipeline without any removes a stale file
    assert dict(DetailPlusPlusPipeline.from_pipe(loaded).detail_defaults) == dict(loaded.detail_defaults)
    tiny_pipe.save_pretrained(folder)
    assert not (folder / "detail_config.json").exists()
    (folder / "detail_config.json").write_text('{"tau": 0.3}', encoding="utf-8")
    with pytest.raises(DetailInputError, match=r"detail_config\.json.*tau"):
        DetailPlusPlusPipeline.from_pretrained(str(folder))
