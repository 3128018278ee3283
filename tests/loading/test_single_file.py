"""Single-file checkpoints, offline: a tiny model written in the original Stability layout
(:mod:`detailpp.models.original_layout`, the reverse of diffusers' key mapping) loads back with the network off
(``HF_HUB_OFFLINE=1``) through ``config=`` / ``--config``, equal to the folder it came from; the family is told from
the keys; pickles are refused with the reason and the fix; the bundled layouts are the real models' configurations."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig

from detailpp.cli import main
from detailpp.models.families import ModelFamily, UnsupportedModelError
from detailpp.models.loading import load_pipeline
from detailpp.models.original_layout import save_original, tiny_sdxl_pipeline
from detailpp.models.single_file import LAYOUTS_DIR, SingleFileError, read_kind

CALL = dict(height=64, width=64, num_inference_steps=2, output_type="latent")
PLAN = {
    "prompt": "a red dog and a blue cat",
    "base": "a dog and a cat",
    "branches": [
        {"prompt": "a red dog and a cat", "subject": "dog"},
        {"prompt": "a dog and a blue cat", "subject": "cat"},
    ],
}


def tiny(family: str):
    if family == "sdxl":
        return tiny_sdxl_pipeline()
    from detailpp.models.tiny import build_tiny_sd_pipeline

    return build_tiny_sd_pipeline(family)


@pytest.fixture(scope="module")
def save(tmp_path_factory):
    """``save(family)``: (family, its folder, its single file in the original layout), made once per module."""
    made = {}

    def get(family: str):
        if family not in made:
            folder = tmp_path_factory.mktemp(family)
            pipe = tiny(family)
            pipe.save_pretrained(folder / "model")
            made[family] = family, folder / "model", save_original(pipe, folder / f"{family}.safetensors")
        return made[family]

    return get


@pytest.fixture(scope="module", params=["sdxl", "sd15", "sd21"])
def saved(request, save):
    return save(request.param)


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_a_single_file_loads_offline_equal_to_its_folder(saved, offline):
    family, folder, file = saved
    from_file = load_pipeline(str(file), device="cpu", config=folder)
    from_folder = load_pipeline(str(folder), device="cpu")
    assert type(from_file) is type(from_folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(from_folder, name, None) is None:
            continue
        a, b = getattr(from_folder, name).state_dict(), getattr(from_file, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert from_file.scheduler.config == from_folder.scheduler.config
    outputs = [p(plan=PLAN, generator=torch.Generator().manual_seed(0), **CALL) for p in (from_file, from_folder)]
    assert torch.equal(outputs[0].images, outputs[1].images)


def test_the_family_is_told_from_the_keys(saved):
    family, _, file = saved
    kind = read_kind(file)
    expected = {"sdxl": ("sdxl", "sdxl-base", False), "sd15": ("sd", "sd15", False), "sd21": ("sd", "sd21-v", True)}
    assert (kind.family.name, kind.layout, kind.v_prediction) == expected[family]


def test_v_prediction_where_the_file_says_so(tmp_path, offline):
    pipe = tiny("sd15")
    pipe.save_pretrained(tmp_path / "model")
    file = save_original(pipe, tmp_path / "v.safetensors", v_prediction=True, zero_snr=True)
    kind = read_kind(file)
    assert kind.v_prediction and kind.zero_snr and kind.family == ModelFamily("sd")
    loaded = load_pipeline(str(file), device="cpu", config=tmp_path / "model")
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.scheduler.config.rescale_betas_zero_snr and loaded.scheduler.config.timestep_spacing == "trailing"


def test_an_upper_case_extension_is_a_single_file(save, tmp_path, offline):
    _, folder, file = save("sd15")
    upper = tmp_path / "MODEL.SAFETENSORS"
    upper.write_bytes(file.read_bytes())
    loaded = load_pipeline(str(upper), device="cpu", config=folder)
    assert torch.equal(loaded.unet.conv_in.weight, load_pipeline(str(folder), device="cpu").unet.conv_in.weight)


def test_the_command_line_loads_a_single_file_offline_through_config(saved, tmp_path, capsys, offline):
    family, folder, file = saved
    out = tmp_path / "out"
    argv = ["generate", PLAN["prompt"], "--model", str(file), "--config", str(folder), "--steps", "2"]
    assert main([*argv, "--height", "64", "--width", "64", "--no-nursing", "--output-dir", str(out), "-q"]) == 0
    sidecar = json.loads(next(out.glob("*.json")).read_text())
    assert sidecar["model"] == str(file) and len(sidecar["plan"]["branches"]) == 2


@pytest.mark.parametrize("suffix", [".ckpt", ".CKPT", ".pt"])
def test_a_pickle_is_refused_with_the_reason_and_the_fix(tmp_path, capsys, suffix, monkeypatch):
    import detailpp.models.loading

    monkeypatch.setattr(detailpp.models.loading, "load_pipeline", lambda *a, **k: pytest.fail("loaded"))
    file = tmp_path / f"model{suffix}"
    file.write_bytes(b"not read")
    assert main(["generate", "a dog", "--model", str(file), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"detailpp generate: error: {file} is a pickle checkpoint ({suffix}): unpickling runs any code the file "
        "holds, so detailpp does not open it. Download the model's .safetensors version, or convert it where you "
        "trust the file: python -c "
    )
    assert "torch.load('model.ckpt', weights_only=True)" in err and err.count("\n") == 1


def test_config_mismatches_are_refused_before_loading(save, tmp_path, capsys, offline):
    _, folder, file = save("sdxl")
    _, sd_folder, _ = save("sd15")
    argv = ["generate", "a dog", "--model", str(file), "--config", str(sd_folder), "--output-dir", str(tmp_path / "o")]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"detailpp generate: error: --config {sd_folder} is a Stable Diffusion 1.x/2.x configuration, but the file "
        "is a Stable Diffusion XL checkpoint; give a configuration of the file's family, or none (the package "
        "carries one).\n"
    )
    assert main(["generate", "a dog", "--model", "tiny-random", "--config", str(folder)]) == 2
    assert "--config applies to a .safetensors --model only" in capsys.readouterr().err


def test_files_that_are_no_checkpoint_of_a_supported_family(tmp_path):
    from safetensors.torch import save_file

    lora = tmp_path / "lora.safetensors"
    save_file({"unet.down_blocks.0.lora_A.weight": torch.zeros(1)}, str(lora))
    with pytest.raises(SingleFileError, match="holds no UNet in the original layout"):
        read_kind(lora)
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(1)}, str(flux))
    with pytest.raises(
        UnsupportedModelError,
        match="is a FLUX single file: Detail\\+\\+ reads single files of SDXL and SD 1.x/2.x only",
    ):
        read_kind(flux)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(SingleFileError, match="is not a .safetensors checkpoint"):
        read_kind(text)


def test_without_config_the_bundled_layout_is_used_and_named(save, offline):
    """The tiny file does not fit the full-size layout: the error names the configuration and --config (the full-size
    load itself is benchmarks/single_file_offline.py)."""
    from detailpp.models.loading import ModelLoadError

    _, _, file = save("sd15")
    with pytest.raises(ModelLoadError) as e:
        load_pipeline(str(file), device="cpu")
    assert str(e.value).startswith(
        f"Cannot load the Stable Diffusion 1.x checkpoint {str(file)!r} with the package's Stable Diffusion 1.x "
        f"configuration ({LAYOUTS_DIR / 'sd15'}): "
    )
    assert str(e.value).endswith("give its configuration with --config DIR|ID (config=).")


def test_the_bundled_layouts_are_the_real_models_configurations():
    """SDXL base and SD 1.5: the configurations the full-size random models are built from; SD 2.1: its UNet and text
    encoder at their published sizes (865,910,724 and 340,387,840 parameters)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextModel

    from detailpp.models.full_size import (
        CLIP_BIGG_TEXT_CONFIG,
        CLIP_L_TEXT_CONFIG,
        SD15_UNET_CONFIG,
        SD15_VAE_CONFIG,
        SDXL_UNET_CONFIG,
        SDXL_VAE_CONFIG,
    )

    def read(layout, part):
        name = "scheduler/scheduler_config.json" if part == "scheduler" else f"{part}/config.json"
        return json.loads((LAYOUTS_DIR / layout / name).read_text())

    expected = {
        ("sdxl-base", "unet"): SDXL_UNET_CONFIG,
        ("sdxl-base", "vae"): SDXL_VAE_CONFIG,
        ("sdxl-base", "text_encoder"): CLIP_L_TEXT_CONFIG,
        ("sdxl-base", "text_encoder_2"): CLIP_BIGG_TEXT_CONFIG,
        ("sd15", "unet"): SD15_UNET_CONFIG,
        ("sd15", "vae"): SD15_VAE_CONFIG,
        ("sd15", "text_encoder"): CLIP_L_TEXT_CONFIG,
    }
    for (layout, part), config in expected.items():
        assert {k: read(layout, part).get(k) for k in config} == config, (layout, part)  # absent: None
    assert read("sd21-v", "scheduler")["prediction_type"] == "v_prediction"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(read("sd21-v", "unet"))
        text = CLIPTextModel(CLIPTextConfig(**read("sd21-v", "text_encoder")))
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert sum(p.numel() for p in text.parameters()) == 340_387_840
    assert not list(LAYOUTS_DIR.rglob("tokenizer*")), "the tokenizers are the package's one copy, passed as objects"
