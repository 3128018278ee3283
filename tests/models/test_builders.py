"""The model builders: the seeded build, the T5 tokenizer built in code, the tiny FLUX.1 and SD3 models (real block
and processor names, the plain diffusers pipelines run on them) and the full-size FLUX.1-dev and SD3.5-large
random-weight stand-ins (shapes only, on the meta device)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from detailpp.models.builders import _tokenizer_corpus, seeded_modules, tiny_t5_tokenizer
from detailpp.models.families import BUILTIN_MODELS, ModelFamily
from detailpp.models.loading import load_pipeline
from detailpp.models.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from detailpp.pipelines.flux import DetailPlusPlusFluxPipeline
from detailpp.pipelines.sd3 import DetailPlusPlusSD3Pipeline

SIZE = {"height": 128, "width": 128}


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules hold the same weights, bit for bit (compared in float64)."""
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return all(torch.equal(x.detach().double(), y.detach().double()) for x, y in pairs)


# ------------------------------------------------------------------------------------------------ the seeded build


def test_seeded_modules_are_reproducible_ordered_and_leave_the_global_rng_alone():
    builders = {"a": lambda: torch.nn.Linear(3, 4), "b": lambda: torch.nn.Linear(3, 4)}
    state = torch.random.get_rng_state()
    first = seeded_modules(builders, seed=5, dtype=torch.float64)
    assert torch.equal(state, torch.random.get_rng_state())
    again = seeded_modules(builders, seed=5)
    swapped = seeded_modules({"b": builders["b"], "a": builders["a"]}, seed=5)
    assert same(first["a"], again["a"]) and same(first["b"], again["b"])
    assert same(again["a"], swapped["b"]) and same(again["b"], swapped["a"])  # the draws follow the order given
    assert not same(again["a"], again["b"])
    assert first["a"].weight.dtype == torch.float64 and not first["a"].training


# ------------------------------------------------------------------------------------------------ the T5 tokenizer


def test_t5_tokenizer_follows_t5s_conventions():
    tok = tiny_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, None)
    ids = tok("a red dog and a blue cat").input_ids
    assert ids[-1] == 1 and ids.count(1) == 1 and 0 not in ids and 2 not in ids  # "</s>" appended, no start token
    assert tok.convert_ids_to_tokens(ids[:3]) == ["▁a", "▁red", "▁dog"]  # Metaspace word pieces
    padded = tok(["a dog", "a red dog"], padding="max_length", max_length=8).input_ids
    assert padded == [[*tok("a dog").input_ids, 0, 0, 0, 0, 0], [*tok("a red dog").input_ids, 0, 0, 0, 0]]
    assert tok.model_max_length == 512


def test_t5_tokenizer_round_trips_every_packaged_prompt_and_spells_unknown_words():
    tok = tiny_t5_tokenizer()
    for prompt in [*_tokenizer_corpus(), "A zebra-striped xylophone, 1234!"]:
        ids = tok(prompt).input_ids
        assert tok.decode(ids, skip_special_tokens=True) == prompt
        assert 2 not in ids and max(ids) < len(tok)


def test_t5_tokenizer_is_deterministic():
    first = tiny_t5_tokenizer()
    assert tiny_t5_tokenizer() is first  # cached
    tiny_t5_tokenizer.cache_clear()
    try:
        second = tiny_t5_tokenizer()
        assert second is not first and second.get_vocab() == first.get_vocab()
        prompts = _tokenizer_corpus()
        assert second(prompts).input_ids == first(prompts).input_ids
    finally:
        tiny_t5_tokenizer.cache_clear()


# ------------------------------------------------------------------------------------------- the tiny transformers


def test_tiny_flux_has_fluxs_block_and_processor_names():
    pipe = build_tiny_flux_pipeline()
    assert type(pipe) is DetailPlusPlusFluxPipeline
    assert sorted(pipe.transformer.attn_processors) == [
        "single_transformer_blocks.0.attn.processor",
        "single_transformer_blocks.1.attn.processor",
        "transformer_blocks.0.attn.processor",
        "transformer_blocks.1.attn.processor",
    ]
    assert pipe.transformer.config.guidance_embeds and pipe.scheduler.config.use_dynamic_shifting
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    assert pipe.vae.quant_conv is None and pipe.tokenizer_2 is tiny_t5_tokenizer()


@pytest.mark.parametrize("dual", [False, True])
def test_tiny_sd3_has_sd3s_block_and_processor_names(dual):
    pipe = build_tiny_sd3_pipeline(dual=dual)
    assert type(pipe) is DetailPlusPlusSD3Pipeline
    expected = [f"transformer_blocks.{i}.attn.processor" for i in range(3)]
    expected += ["transformer_blocks.0.attn2.processor"] if dual else []
    assert sorted(pipe.transformer.attn_processors) == sorted(expected)
    assert [block.context_pre_only for block in pipe.transformer.transformer_blocks] == [False, False, True]
    assert (pipe.transformer.transformer_blocks[0].attn.norm_q is not None) == dual  # SD3.5's RMS q/k norms
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting


def test_tiny_models_are_reproducible_and_seeded():
    a, b, c = (build_tiny_flux_pipeline(seed=s).transformer for s in (0, 0, 1))
    assert same(a, b) and not same(a, c)
    assert build_tiny_sd3_pipeline(dtype=torch.bfloat16).transformer.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "build, plain, kwargs",
    [
        (build_tiny_flux_pipeline, FluxPipeline, {}),
        (build_tiny_sd3_pipeline, StableDiffusion3Pipeline, {}),
        (build_tiny_sd3_pipeline, StableDiffusion3Pipeline, {"dual": True}),
    ],
)
def test_the_plain_diffusers_pipelines_run_two_steps_on_the_tiny_models(build, plain, kwargs):
    pipe = build(pipeline_class=plain, **kwargs)
    assert type(pipe) is plain

    def call(seed):
        generator = torch.Generator().manual_seed(seed)
        return pipe("a red dog", num_inference_steps=2, generator=generator, output_type="np", **SIZE).images

    first = call(0)
    assert first.shape == (1, 128, 128, 3) and np.isfinite(first).all()
    assert (call(0) == first).all() and not (call(1) == first).all()


# ---------------------------------------------------------------------------------------- the built-in model names


@pytest.mark.parametrize(
    "model, family, cls",
    [("tiny-random-flux", "flux", DetailPlusPlusFluxPipeline), ("tiny-random-sd3", "sd3", DetailPlusPlusSD3Pipeline)],
)
def test_tiny_transformers_load_by_name(model, family, cls):
    from detailpp.cli.common import BUILTIN_SIZES

    assert BUILTIN_MODELS[model] == ModelFamily(family) and BUILTIN_SIZES[model] == 128
    assert type(load_pipeline(model, device="cpu", dtype="float32")) is cls


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_flux_random_is_full_size_flux_dev_by_name(caplog):
    state = torch.random.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="detailpp.models.loading"):
        pipe = load_pipeline("flux-random", device="meta", dtype="bfloat16")  # the real builder, shapes only
    assert torch.equal(state, torch.random.get_rng_state())
    assert type(pipe) is DetailPlusPlusFluxPipeline and "FLUX.1-dev with RANDOM weights" in caplog.text
    # FLUX.1-dev's transformer 11.90 B and T5-XXL's encoder 4.76 B parameters (published figures, within 1 %)
    assert count(pipe.transformer) == 11_901_408_320 and count(pipe.text_encoder_2) == 4_762_310_656
    assert abs(count(pipe.transformer) / 11.90e9 - 1) < 0.01 and abs(count(pipe.text_encoder_2) / 4.76e9 - 1) < 0.01
    assert (count(pipe.text_encoder), count(pipe.vae)) == (123_060_480, 83_819_683)
    assert len(pipe.transformer.transformer_blocks) == 19 and len(pipe.transformer.single_transformer_blocks) == 38
    assert pipe.transformer.device.type == "meta" and pipe.transformer.dtype == torch.bfloat16
    assert max(pipe.tokenizer_2("a red dog").input_ids) < pipe.text_encoder_2.config.vocab_size


def test_sd35_random_is_full_size_sd35_large_by_name(caplog):
    with caplog.at_level(logging.WARNING, logger="detailpp.models.loading"):
        pipe = load_pipeline("sd35-random", device="meta", dtype="bfloat16")
    assert type(pipe) is DetailPlusPlusSD3Pipeline and "SD3.5-large with RANDOM weights" in caplog.text
    # SD3.5-large's transformer 8.05 B parameters (published figure, within 1 %)
    assert count(pipe.transformer) == 8_056_627_520 and abs(count(pipe.transformer) / 8.05e9 - 1) < 0.01
    assert [count(getattr(pipe, f"text_encoder{k}")) for k in ("", "_2", "_3")] == [
        123_650_304,
        694_659_840,
        4_762_310_656,
    ]
    assert len(pipe.transformer.transformer_blocks) == 38 and pipe.transformer.transformer_blocks[0].attn2 is None
    assert (pipe.vae.config.latent_channels, pipe.vae.config.scaling_factor) == (16, 1.5305)
