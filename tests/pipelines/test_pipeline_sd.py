"""Detail++ on Stable Diffusion 1.5 / 2.1: the tiny random models (CPU, fp32), their mask layers, loading by family."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from detailpp import DecompositionPlan, DetailConfig
from detailpp.backbones.unet import _block_levels, find_mask_layers
from detailpp.models.families import ModelFamily, UnsupportedModelError
from detailpp.models.loading import FAMILY_PIPELINES, load_pipeline, pipeline_class_for
from detailpp.models.tiny import build_tiny_sd_pipeline
from detailpp.pipelines.sd import DetailPlusPlusSDPipeline
from tests.plans import TEDDY_PLAN

PLAN = TEDDY_PLAN
PROMPT = PLAN.prompt
SIZE = {"height": 128, "width": 128}
PLAIN = DetailConfig(share_attention=False, latent_modification=False, nursing=False)
NO_NURSING = DetailConfig(nursing=False)


@pytest.fixture(scope="module")
def sd15():
    return build_tiny_sd_pipeline("sd15")


@pytest.fixture(scope="module")
def sd21():
    return build_tiny_sd_pipeline("sd21")


def run(pipe, steps=1, seed=0, **kwargs):
    kwargs.setdefault("plan", PLAN)
    kwargs.setdefault("output_type", "np")
    return pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **{**SIZE, **kwargs})


def plain_sd(pipe):
    sd = StableDiffusionPipeline(**pipe.components, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    return sd


# ---------------------------------------------------------------------------------------------------- mask layers


def lowest_level_layers(unet):
    """The former rule: every attention layer at the UNet's lowest resolution level."""
    levels = _block_levels(unet)
    found = []
    for name, _ in unet.named_modules():
        if name.endswith((".attn1", ".attn2")):
            block = "mid_block" if name.startswith("mid_block") else ".".join(name.split(".")[:2])
            found.append((levels[block], name))
    top = max(lv for lv, _ in found)
    return sorted(n for lv, n in found if lv == top)


def sdxl_unets():
    from detailpp.models.full_size import SDXL_UNET_CONFIG
    from detailpp.models.loading import TOY_MODEL_DIR
    from detailpp.models.tiny import build_tiny_pipeline

    toy = json.loads((TOY_MODEL_DIR / "unet" / "config.json").read_text())
    with torch.device("meta"):
        full = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        toy_unet = UNet2DConditionModel.from_config(toy)
    return {"tiny": build_tiny_pipeline().unet, "sdxl": full, "toy": toy_unet}


def test_sdxl_tiny_and_toy_mask_layers_are_unchanged():
    counts = {"tiny": (8, "up_blocks.0"), "sdxl": (60, "up_blocks.0"), "toy": (None, "up_blocks.0")}
    for key, unet in sdxl_unets().items():
        layers = find_mask_layers(unet)
        names = sorted(layers.self_attention + layers.cross_attention)
        assert names == lowest_level_layers(unet), key
        assert all(n.startswith(("down_blocks.2.", "mid_block.", "up_blocks.0.")) for n in names), key
        assert {n.split(".")[0] for n in names} == {"down_blocks", "mid_block", "up_blocks"}, key
        count, last = counts[key]
        assert count is None or len(layers.self_attention) == count, key
        assert layers.last_block == last


def sd_layer_names(unet, blocks):
    return sorted(n for n, _ in unet.named_modules() if n.startswith(blocks) and n.endswith((".attn1", ".attn2")))


def test_sd15_mask_layers_are_the_down_and_up_paths_lowest_attention_level(sd15):
    from detailpp.models.full_size import SD15_UNET_CONFIG

    with torch.device("meta"):
        full = UNet2DConditionModel(**SD15_UNET_CONFIG)
    for unet, n_self in ((full, 5), (sd15.unet, 3)):
        layers = find_mask_layers(unet)
        names = sorted(layers.self_attention + layers.cross_attention)
        assert names == sd_layer_names(unet, ("down_blocks.2.attentions.", "up_blocks.1.attentions."))
        assert len(layers.self_attention) == n_self and all(n.endswith("attn1") for n in layers.self_attention)
        assert lowest_level_layers(unet) == sd_layer_names(unet, ("mid_block.",))  # the mid block alone, not taken
        assert layers.level == 2 and layers.last_block == "up_blocks.1"
        assert layers.token_grid(64, 64) == (16, 16)  # 512x512
        assert set(layers.expected_tokens(64, 64).values()) == {256}


# ---------------------------------------------------------------------------------------------------- the pipeline


@pytest.mark.parametrize("variant", ["sd15", "sd21"])
def test_zero_branch_plan_is_plain_sd_bit_for_bit(variant, sd15, sd21):
    pipe = {"sd15": sd15, "sd21": sd21}[variant]
    plan = DecompositionPlan(prompt="a dog", base="a dog", branches=())
    out = run(pipe, steps=2, plan=plan, negative_prompt="blurry")
    ref = plain_sd(pipe)(
        "a dog",
        negative_prompt="blurry",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **SIZE,
    )
    assert out.plan == plan and (out.images == ref.images).all()
    assert out.images.shape == (1, 128, 128, 3)


def test_sd21_is_v_prediction_with_linear_projection_and_its_own_width(sd21, sd15):
    assert sd21.scheduler.config.prediction_type == "v_prediction"
    assert sd21.unet.config.use_linear_projection and not sd15.unet.config.use_linear_projection
    assert sd21.unet.config.cross_attention_dim == sd21.text_encoder.config.hidden_size == 48
    assert sd15.unet.config.cross_attention_dim == sd15.text_encoder.config.hidden_size == 32
    assert sd21.tokenizer.pad_token == "!" and isinstance(sd15.scheduler, PNDMScheduler)
    assert sd15.default_size() == (256, 256) and sd15.default_sample_size == 32


def test_plain_mode_branches_equal_plain_sd_per_prompt(sd15):
    out = run(sd15, steps=1, detail_config=PLAIN.replace(prune_branches=False), return_branch_images=True)
    sd = plain_sd(sd15)
    for prompt, image in zip(PLAN.prompts, out.branch_images, strict=True):
        ref = sd(prompt, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np", **SIZE)
        assert abs(ref.images[0] - image).max() < 1e-4, prompt
    assert (out.images[0] == out.branch_images[-1]).all()


def test_detail_on_sd_differs_from_plain_and_returns_masks(sd15):
    plain = run(sd15, detail_config=PLAIN)
    seen = []
    out = run(
        sd15,
        detail_config=NO_NURSING,
        return_masks=True,
        callback_on_step_end=lambda p, i, t, kw: seen.append(kw["masks"]) or {},
        callback_on_step_end_tensor_inputs=["latents", "masks"],
    )
    assert not (plain.images == out.images).all()
    assert out.masks.shape == (2, 16, 16)  # latent 16x16 (128 px); the maps come from the 4x4 grid of up_blocks.1
    assert out.masks.min() >= 0 and out.masks.max() <= 1 and (out.masks.amax(dim=(1, 2)) > 0.99).all()
    assert seen[0].shape[0] == 2 and seen[0].shape[-2:] == (16, 16)
    assert find_mask_layers(sd15.unet).token_grid(16, 16) == (4, 4)


def test_sd21_v_prediction_runs_with_nursing(sd21):
    config = DetailConfig(
        nursing_thresholds=(0.0,), nursing_steps=1, nursing_max_iterations_early=2, nursing_max_iterations_late=2
    )
    out = run(sd21, detail_config=config, return_masks=True)
    off = run(sd21, detail_config=config.replace(nursing=False))
    assert [r.step for r in out.nursing] == [0] and out.nursing[0].updates == 2
    assert torch.isfinite(torch.as_tensor(out.images)).all() and out.masks.shape == (2, 16, 16)
    assert not (out.images == off.images).all()


def test_processors_restored_after_success_and_exception(sd15):
    before = dict(sd15.unet.attn_processors)
    run(sd15, detail_config=NO_NURSING, steps=1)
    after = sd15.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)

    def boom(p, i, t, kwargs):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        run(sd15, detail_config=NO_NURSING, callback_on_step_end=boom)
    after = sd15.unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_safety_checker_flags_give_black_images(sd15, monkeypatch, caplog):
    calls = []

    def checker(image, device, dtype):
        calls.append(image.shape)
        return torch.zeros_like(image), [True] * image.shape[0]

    monkeypatch.setattr(sd15, "run_safety_checker", checker)
    with caplog.at_level(logging.WARNING, logger="detailpp.pipelines.sd"):
        out = run(sd15, steps=1, detail_config=PLAIN)
    assert calls == [(1, 3, 128, 128)] and (out.images == 0).all()  # not denormalised: black, not grey
    assert "safety checker flagged 1 of 1" in caplog.text


def test_sd_unsupported_arguments_are_refused(sd15):
    with pytest.raises(ValueError, match="`prompt_embeds` is not supported by DetailPlusPlusSDPipeline"):
        run(sd15, prompt_embeds=torch.zeros(1, 77, 32))


# ---------------------------------------------------------------------------------------------------- loading


def test_unsupported_family_is_refused_before_loading(tmp_path):
    from detailpp.cli.common import check_model

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    for check in (load_pipeline, check_model):
        with pytest.raises(UnsupportedModelError, match=r"Qwen-Image \(a transformer on a language model"):
            check(str(tmp_path))


def test_family_pipelines_and_the_controlnet_hook(monkeypatch):
    assert pipeline_class_for(ModelFamily("sd")) is DetailPlusPlusSDPipeline
    assert pipeline_class_for(None).__name__ == "DetailPlusPlusPipeline"
    with pytest.raises(UnsupportedModelError, match=r"Stable Diffusion 1.x/2.x \+ ControlNet has no Detail\+\+"):
        pipeline_class_for(ModelFamily("sd", True))
    monkeypatch.setitem(FAMILY_PIPELINES, ModelFamily("sdxl", True), "detailpp.no_such_module:Pipeline")
    with pytest.raises(UnsupportedModelError, match="needs detailpp.no_such_module.Pipeline"):
        pipeline_class_for(ModelFamily("sdxl", True))


def test_saved_sd_folder_loads_as_detail_sd_pipeline(sd15, tmp_path):
    plain_sd(sd15).save_pretrained(tmp_path / "sd")
    assert json.loads((tmp_path / "sd" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    pipe = load_pipeline(str(tmp_path / "sd"), device="cpu", dtype="float32")
    assert type(pipe) is DetailPlusPlusSDPipeline and isinstance(pipe.scheduler, PNDMScheduler)
    for name in ("unet", "vae", "text_encoder"):
        loaded, original = getattr(pipe, name).state_dict(), getattr(sd15, name).state_dict()
        assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in original)


def test_builtin_sd_models():
    pipe = load_pipeline("tiny-random-sd21", device="cpu", dtype="float32")
    assert type(pipe) is DetailPlusPlusSDPipeline and pipe.scheduler.config.prediction_type == "v_prediction"
    full = load_pipeline("sd15-random", device="meta", dtype="float32")  # the real builder, shapes only
    assert type(full) is DetailPlusPlusSDPipeline
    assert sum(p.numel() for p in full.unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in full.text_encoder.parameters()) == 123_060_480
    assert full.default_size() == (512, 512)


def test_generate_cli_on_tiny_sd15(tmp_path, capsys):
    from detailpp.cli import main

    out = tmp_path / "out"
    args = ["generate", PROMPT, "--model", "tiny-random-sd15", "--steps", "1", "--height", "128", "--width", "128"]
    assert main([*args, "--quiet", "--no-nursing", "--output-dir", str(out)]) == 0
    sidecar = json.loads(next(out.glob("*.json")).read_text())
    assert sidecar["model"] == "tiny-random-sd15" and sidecar["scheduler"] == "PNDMScheduler"
    assert sidecar["width"] == 128 and len(sidecar["plan"]["branches"]) == 2
