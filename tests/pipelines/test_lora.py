"""LoRA with Detail++ (diffusers' peft-backed LoRA wraps linear layers, so it composes with our processors)."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from detailpp import DetailConfig
from detailpp.models.lora import LoraError, LoraSpec, apply_loras, parse_lora
from detailpp.models.tiny import build_tiny_pipeline

PLAN = {
    "prompt": "a red dog and a blue cat",
    "base": "a dog and a cat",
    "branches": [
        {"prompt": "a red dog and a cat", "subject": "dog"},
        {"prompt": "a dog and a blue cat", "subject": "cat"},
    ],
}
NO_BRANCH = {"prompt": "a red dog and a blue cat", "base": "a red dog and a blue cat", "branches": []}
CALL = dict(
    height=64, width=64, num_inference_steps=2, output_type="latent", detail_config=DetailConfig(nursing=False)
)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A tiny LoRA on the tiny UNet's attention projections, with random (non-zero) A and B, as safetensors."""
    folder = tmp_path_factory.mktemp("lora")
    pipe = build_tiny_pipeline(0, pipeline_class=StableDiffusionXLPipeline)
    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    pipe.unet.add_adapter(config)
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return folder / "pytorch_lora_weights.safetensors"


def detail(pipe, plan=PLAN):
    return pipe(plan=plan, generator=torch.Generator().manual_seed(0), **CALL).images


def test_lora_changes_the_output_and_unloading_restores_it(lora_file):
    pipe = build_tiny_pipeline(0)
    original = detail(pipe)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(lora_file))
    with_lora = detail(pipe)
    assert not torch.equal(original, with_lora)
    pipe.set_adapters(["default_0"], adapter_weights=[0.0])  # off: the original up to peft's arithmetic
    torch.testing.assert_close(detail(pipe), original, rtol=1e-5, atol=1e-5)
    pipe.set_adapters(["default_0"], adapter_weights=[1.0])
    assert torch.equal(detail(pipe), with_lora)
    pipe.unload_lora_weights()
    # the UNet's weights come back bit for bit; peft's rebuilt layers round the output differently (7e-6 measured)
    assert all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())
    torch.testing.assert_close(detail(pipe), original, rtol=1e-5, atol=1e-5)
    assert all(type(p).__name__ != "DetailAttnProcessor" for p in pipe.unet.attn_processors.values())
    # fused into the weights: the same output up to rounding (unfusing subtracts it again, up to rounding too)
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora()
    torch.testing.assert_close(detail(pipe), with_lora, rtol=1e-4, atol=1e-4)


def test_a_zero_branch_plan_with_lora_is_plain_sdxl_with_the_same_lora(lora_file):
    pipe = build_tiny_pipeline(0)
    pipe.load_lora_weights(str(lora_file))
    plain = build_tiny_pipeline(0, pipeline_class=StableDiffusionXLPipeline)
    plain.load_lora_weights(str(lora_file))
    ours = detail(pipe, NO_BRANCH)
    call = {k: v for k, v in CALL.items() if k != "detail_config"}
    theirs = plain(NO_BRANCH["prompt"], generator=torch.Generator().manual_seed(0), **call).images
    assert torch.equal(ours, theirs)


def test_lora_loaded_before_the_pipeline_is_made_works_the_same(lora_file):
    from detailpp import DetailPlusPlusPipeline

    plain = build_tiny_pipeline(0, pipeline_class=StableDiffusionXLPipeline)
    plain.load_lora_weights(str(lora_file))
    after = build_tiny_pipeline(0)
    after.load_lora_weights(str(lora_file))
    assert torch.equal(detail(DetailPlusPlusPipeline.from_pipe(plain)), detail(after))


def test_lora_arguments_are_checked_before_loading(tmp_path, lora_file):
    assert parse_lora(f"{lora_file}:0.7") == LoraSpec(lora_file, 0.7)
    assert parse_lora(str(lora_file)) == LoraSpec(lora_file, 1.0)
    with pytest.raises(LoraError, match="no such file or folder"):
        parse_lora(str(tmp_path / "missing.safetensors"))
    (tmp_path / "x.ckpt").write_bytes(b"")
    with pytest.raises(LoraError, match=r"expected a \.safetensors file"):
        parse_lora(str(tmp_path / "x.ckpt"))


def test_a_lora_for_another_unet_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "other.safetensors"  # SD-style keys of layers the tiny SDXL UNet does not have
    save_file(
        {
            "unet.down_blocks.9.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8),
            "unet.down_blocks.9.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 4),
        },
        bad,
    )
    pipe = build_tiny_pipeline(0)
    with pytest.raises(LoraError, match="does not fit this model|matches no layer"):
        apply_loras(pipe, [parse_lora(str(bad))])
    wrong_shape = tmp_path / "shape.safetensors"
    save_file(
        {
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 7),
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4),
        },
        wrong_shape,
    )
    with pytest.raises(LoraError, match="does not fit this model|matches no layer"):
        apply_loras(build_tiny_pipeline(0), [parse_lora(str(wrong_shape))])


def test_generate_takes_lora_flags(tmp_path, lora_file, capsys, monkeypatch):
    import json

    from detailpp.cli import main

    fast = ["--model", "tiny-random", "--steps", "2", "--height", "64", "--width", "64", "--quiet", "--no-nursing"]
    out = tmp_path / "out"
    assert (
        main(["generate", "a red dog and a blue cat", *fast, "--lora", f"{lora_file}:0.5", "--output-dir", str(out)])
        == 0
    )
    sidecar = json.loads(next(out.glob("*.json")).read_text())
    assert sidecar["loras"] == [{"path": str(lora_file), "scale": 0.5}]

    import detailpp.models.loading

    monkeypatch.setattr(detailpp.models.loading, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    missing = tmp_path / "nope.safetensors"
    assert main(["generate", "a dog", *fast, "--lora", str(missing), "--output-dir", str(tmp_path / "o")]) == 2
    assert f"--lora {missing}: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_two_loras_with_diffusers_default_file_name_are_two_adapters(tmp_path, lora_file):
    import shutil

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(lora_file, tmp_path / folder / lora_file.name)
    specs = [parse_lora(f"{tmp_path / 'a' / lora_file.name}:0.5"), parse_lora(str(tmp_path / "b" / lora_file.name))]
    pipe = build_tiny_pipeline(0)
    apply_loras(pipe, specs)
    assert sorted(pipe.get_list_adapters()["unet"]) == ["a", "b"]
    twice = [parse_lora(str(lora_file)), parse_lora(str(lora_file))]  # the same file twice: two names too
    pipe = build_tiny_pipeline(0)
    apply_loras(pipe, twice)
    name = lora_file.parent.name
    assert sorted(pipe.get_list_adapters()["unet"]) == [name, f"{name}_2"]


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        (":abc", "the scale 'abc' is not a number; write PATH:SCALE, e.g. {path}:0.8."),
        (":nan", "the scale must be a finite number, got nan."),
        (":inf", "the scale must be a finite number, got inf."),
    ],
)
def test_a_lora_scale_that_is_no_finite_number_is_named(lora_file, tmp_path, capsys, suffix, message):
    from detailpp.cli import main

    with pytest.raises(LoraError) as e:
        parse_lora(f"{lora_file}{suffix}")
    assert str(e.value) == f"--lora {lora_file}{suffix}: " + message.format(path=lora_file)
    argv = ["generate", "a dog", "--model", "tiny-random", "--lora", f"{lora_file}{suffix}"]
    assert main([*argv, "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"detailpp generate: error: {e.value}\n"
