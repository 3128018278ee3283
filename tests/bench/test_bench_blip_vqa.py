"""BLIP-VQA on a tiny random BLIP equals a hand-computed reference of T2I-CompBench's computation."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from tests.bench.tiny_models import make_tiny_blip, random_image, word_id

ENC, DEC, SEP, YES, NO = 30523, 30522, 102, 2748, 2053


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    from detailpp.bench.blip_vqa import BlipVqaScorer, load_blip_vqa, load_spacy

    folder = make_tiny_blip(tmp_path_factory.mktemp("blip"))
    model, tokenizer = load_blip_vqa(str(folder))
    return BlipVqaScorer(model, tokenizer, "cpu", nlp=load_spacy()), folder


@lru_cache(maxsize=2)
def reference_model(folder: Path):
    """The model rebuilt the way BLIP builds it for VQA (see :func:`reference_probability`)."""
    import torch
    import torch.nn.functional as F
    from transformers import BlipConfig, BlipForQuestionAnswering

    config = BlipConfig.from_pretrained(str(folder))
    config.vision_config.image_size = 480
    config.vision_config.layer_norm_eps = 1e-6
    state = BlipForQuestionAnswering.from_pretrained(str(folder)).state_dict()
    table = state["vision_model.embeddings.position_embedding"]  # (1, 1 + 24*24, D)
    grid = table[:, 1:].reshape(1, 24, 24, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(30, 30), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    state["vision_model.embeddings.position_embedding"] = torch.cat([table[:, :1], grid.reshape(1, 900, -1)], 1)
    model = BlipForQuestionAnswering(config).eval()
    model.load_state_dict(state)
    return model


def reference_probability(folder: Path, image, token_ids: list[int]) -> float:
    """T2I-CompBench's vqa_prob for one question, written from scratch on the original's terms.

    The model is rebuilt the way BLIP builds it for VQA: a 480 px ViT whose position table is interpolated (bicubic)
    from the checkpoint's 24 x 24 grid at load time, LayerNorm eps 1e-6; the question is unpadded.
    """
    import torch
    from PIL import Image

    model = reference_model(folder)
    pixels = torch.from_numpy(np.array(image.convert("RGB").resize((480, 480), Image.BICUBIC))).permute(2, 0, 1)
    pixels = pixels.float().div(255)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    pixels = ((pixels - mean) / std)[None]
    with torch.no_grad():
        image_embeds = model.vision_model(pixel_values=pixels)[0]
        ids = torch.tensor([token_ids])
        ones = torch.ones_like(ids)
        states = model.text_encoder(
            input_ids=ids,
            attention_mask=ones,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long),
        )[0]
        logits = model.text_decoder(
            input_ids=torch.tensor([[DEC]]), encoder_hidden_states=states, encoder_attention_mask=ones
        ).logits[:, 0, :]
        prob = torch.softmax(logits, dim=1)[0]
    return float(prob[YES] / (prob[YES] + prob[NO]))


def test_questions_follow_t2i_compbench():
    from detailpp.bench.blip_vqa import load_spacy, pre_question, questions_for_prompt

    nlp = load_spacy()
    assert questions_for_prompt("a red car and a green dog", nlp) == ["a red car?", "a green dog?"]
    # "the left" and "top" are dropped; lower case; BLIP's pre_question removes . ! " ( ) * # : ; ~
    assert questions_for_prompt("A Metallic lamp on the left and a towel on top.", nlp) == [
        "a metallic lamp?",
        "a towel?",
    ]
    assert pre_question('The "Big" (Red) car.?  ') == "the big red car?"
    many = " and ".join(
        f"a {c} {o}"
        for c, o in zip(
            ["red", "blue", "green", "pink", "black"] * 2, ["car", "dog", "cat", "bowl", "cup"] * 2, strict=True
        )
    )
    assert len(questions_for_prompt(many, nlp)) == 8


def test_image_score_arithmetic():
    from detailpp.bench.blip_vqa import image_score, round4

    answers = [0.51914, 0.4997, 0.33335]
    rounded = [round4(a) for a in answers]
    assert rounded == [0.5191, 0.4997, 0.3333]  # 0.33335 is 0.333349999... in binary: format rounds down
    expected = np.float32(np.float32(np.float32(0.5191) * np.float32(0.4997)) * np.float32(0.3333))
    assert image_score(rounded) == float(f"{float(expected):.4f}")
    assert image_score([]) == 1.0  # a prompt without noun chunks: every question missing counts 1
    assert image_score([0.5] * 10) == float(f"{0.5**8:.4f}")  # at most 8 questions


def test_tokens_masks_and_one_decoder_step_match_the_reference(blip):
    scorer, folder = blip
    image = random_image(3, (96, 64))
    calls = {"enc": [], "dec": []}
    enc_forward, dec_forward = scorer.model.text_encoder.forward, scorer.model.text_decoder.forward

    def spy_encoder(*args, **kwargs):
        calls["enc"].append(kwargs)
        return enc_forward(*args, **kwargs)

    def spy_decoder(*args, **kwargs):
        calls["dec"].append(kwargs)
        return dec_forward(*args, **kwargs)

    scorer.model.text_encoder.forward, scorer.model.text_decoder.forward = spy_encoder, spy_decoder
    try:
        [result] = scorer.score([image], ["a red car and a dog"])
    finally:
        del scorer.model.text_encoder.forward, scorer.model.text_decoder.forward

    q1 = [ENC, word_id("a"), word_id("red"), word_id("car"), word_id("?"), SEP]
    q2 = [ENC, word_id("a"), word_id("dog"), word_id("?"), SEP]
    assert result.questions == ("a red car?", "a dog?")
    # [ENC] first (not [CLS] = 101); questions batched by length, so never padded and the real mask is all ones
    assert sorted(c["input_ids"].tolist() for c in calls["enc"]) == sorted([[q1], [q2]])
    for enc, dec in zip(calls["enc"], calls["dec"], strict=True):
        assert enc["attention_mask"].tolist() == [[1] * enc["input_ids"].shape[1]]
        assert enc["encoder_hidden_states"].shape[1] == 1 + 30 * 30  # 480 px, interpolated position table
        # the decoder: one step from [DEC], cross-attending to the question states with the question's mask
        assert dec["input_ids"].tolist() == [[DEC]]
        assert dec["encoder_attention_mask"].tolist() == enc["attention_mask"].tolist()
    assert scorer.model.vision_model.encoder.layers[0].layer_norm1.eps == 1e-6
    assert scorer.model.vision_model.post_layernorm.eps == 1e-6

    ref = [reference_probability(folder, image, q) for q in (q1, q2)]
    np.testing.assert_allclose(result.raw, ref, atol=2e-6)
    assert len({round(r, 3) for r in ref}) == 2, "the tiny model should answer the two questions differently"
    rounded = [float(f"{r:.4f}") for r in ref]
    assert list(result.answers) == rounded
    product = np.float32(1.0)
    for r in rounded + [1.0] * 6:
        product = np.float32(product * np.float32(r))
    assert result.score == float(f"{float(product):.4f}")


def test_answers_do_not_depend_on_the_batch(blip):
    """A question's answer is the same alone, beside longer questions, or beside other images."""
    scorer, _ = blip
    a, b = random_image(7), random_image(8, (48, 80))
    alone = scorer.score([a], ["a dog"])[0].raw[0]
    mixed = scorer.score([b, a], ["a blue bench and a red car and a green bowl", "a dog and a red car"])
    assert abs(mixed[1].raw[0] - alone) < 2e-6


def test_the_enc_token_matters(blip):
    """[CLS] (transformers' processor) instead of [ENC] changes the answer: the reference above is sensitive to it."""
    _, folder = blip
    image = random_image(5, (64, 64))
    q = [ENC, word_id("a"), word_id("dog"), word_id("?"), SEP]
    assert abs(reference_probability(folder, image, [101, *q[1:]]) - reference_probability(folder, image, q)) > 1e-5


def test_score_command_on_a_tiny_model(blip, tmp_path):
    """`detailpp bench score --metric blip-vqa` end to end on a generated folder, resumable."""
    from detailpp.bench.generation import run_generation, run_identity
    from detailpp.bench.runs import load_manifest
    from detailpp.bench.suites import Suite
    from detailpp.cli import main

    _, folder = blip
    suite = Suite("custom", ("a red car and a dog", "a blue bench"))
    identity = run_identity(suite, "fake", "fake", {"steps": 1}, 2)
    run_generation(tmp_path / "run", suite, identity, lambda p, s: random_image(s), progress=False)
    args = [
        "bench",
        "score",
        str(tmp_path / "run"),
        "--metric",
        "blip-vqa",
        "--blip-model",
        str(folder),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(args) == 0
    merged = [json.loads(line) for line in (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()]
    assert [r["item"] for r in merged] == [r["item"] for r in load_manifest(tmp_path / "run")] == [0, 1, 2, 3]
    assert all(0.0 <= r["scores"]["blip-vqa"] <= 1.0 for r in merged)
    before = (tmp_path / "run" / "scores" / "blip-vqa.jsonl").read_bytes()
    assert main(args) == 0  # nothing left to do: same scores file
    assert (tmp_path / "run" / "scores" / "blip-vqa.jsonl").read_bytes() == before
