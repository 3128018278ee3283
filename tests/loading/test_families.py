"""Model families from model_index.json, before anything loads."""

from __future__ import annotations

import json

import pytest

from detailpp.models.families import ModelFamily, UnsupportedModelError, family_of_class, model_family


@pytest.mark.parametrize(
    ("class_name", "family"),
    [
        ("StableDiffusionXLPipeline", ModelFamily("sdxl")),
        ("StableDiffusionXLImg2ImgPipeline", ModelFamily("sdxl")),
        ("StableDiffusionXLControlNetPipeline", ModelFamily("sdxl", True)),
        ("StableDiffusionPipeline", ModelFamily("sd")),
        ("StableDiffusionControlNetPipeline", ModelFamily("sd", True)),
        ("DetailPlusPlusPipeline", ModelFamily("sdxl")),
        ("FluxPipeline", ModelFamily("flux")),
        ("StableDiffusion3Pipeline", ModelFamily("sd3")),
        ("DetailPlusPlusFluxPipeline", ModelFamily("flux")),
        ("DetailPlusPlusSD3Pipeline", ModelFamily("sd3")),
    ],
)
def test_supported_families(class_name, family):
    assert family_of_class(class_name) == family


@pytest.mark.parametrize(
    ("class_name", "words"),
    [
        ("StableDiffusion3ControlNetPipeline", "Stable Diffusion 3 + ControlNet (not wired"),
        ("Flux2Pipeline", "FLUX.2"),
        ("FluxKontextPipeline", "FLUX.1 Kontext"),
        ("FluxFillPipeline", "a FLUX.1 task pipeline"),
        ("QwenImagePipeline", "Qwen-Image"),
        ("SanaPipeline", "Sana"),
        ("KandinskyV22Pipeline", "Kandinsky"),
        ("MysteryPipeline", "not a model family Detail++ knows"),
    ],
)
def test_unsupported_families_say_what_is_supported(class_name, words):
    with pytest.raises(UnsupportedModelError) as e:
        family_of_class(class_name)
    assert words in str(e.value) and "Stable Diffusion XL and Stable Diffusion 1.x/2.x" in str(e.value)
    assert "FLUX.1 (dev, schnell) and Stable Diffusion 3/3.5" in str(e.value)  # every refusal names what runs


def test_a_folder_is_read_before_loading(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline"}))
    with pytest.raises(UnsupportedModelError, match="FLUX.2"):
        model_family(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert model_family(tmp_path).label == "Stable Diffusion 1.x/2.x"
    assert model_family(tmp_path / "missing.safetensors") is None
    (tmp_path / "ckpt.safetensors").write_bytes(b"")
    assert model_family(tmp_path / "ckpt.safetensors") is None


def test_a_hub_id_offline_gives_none(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert model_family("nobody/no-such-model", local_files_only=True) is None
