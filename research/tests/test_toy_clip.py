"""The toy CLIP pair: pretraining (resumable bit for bit), the exported text encoders, the probe's swaps and scoring,
and the toy trainer's frozen ``--text-encoders``."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from research.toy.clip.swaps import CONTROL_KINDS, KINDS, SWAP_KINDS, caption_objects, probe_pairs

ARTICLES = ("a", "an")


def _words(caption: str) -> list[str]:
    """The caption's words but its articles ("an orange star" / "a striped orange star")."""
    return [w for w in caption.split() if w not in ARTICLES]


TINY = ["--model", "tiny", "--device", "cpu", "--batch-size", "4", "--steps", "4", "--warmup", "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from research.toy.clip.pretrain import main

    root = tmp_path_factory.mktemp("clip")
    whole = main([*TINY, "--output", str(root / "whole")])
    main([*TINY, "--output", str(root / "split"), "--max-steps", "2"])
    resumed = main([*TINY, "--output", str(root / "split"), "--resume", str(root / "split" / "checkpoint.pt")])
    return root, whole, resumed


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resumed_pretraining_equals_an_uninterrupted_run(runs):
    root, whole, resumed = runs
    assert whole["step"] == resumed["step"] == 4 and resumed["steps_this_run"] == 2
    a, b = _load(root / "whole" / "checkpoint.pt"), _load(root / "split" / "checkpoint.pt")
    assert a["clip"].keys() == b["clip"].keys()
    for k, v in a["clip"].items():
        assert torch.equal(v, b["clip"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    fresh = _load(root / "split" / "checkpoint.pt")  # training moved the weights away from the initialisation
    from research.toy.clip.models import TINY_SIZES, build_clip

    torch.manual_seed(0)
    init = build_clip(TINY_SIZES).state_dict()
    assert not torch.equal(init["text_projection.weight"], fresh["clip"]["text_projection.weight"])


def test_saved_encoders_load_and_compute_the_pairs_text_tower(runs):
    from transformers import CLIPModel

    from research.toy.clip.models import load_text_encoders
    from research.toy.model import TINY
    from research.toy.scenes import CaptionTokenizer

    root = runs[0] / "whole"
    clip = CLIPModel.from_pretrained(root / "clip").eval()
    te1, te2 = load_text_encoders(root)
    assert te1.config.hidden_size == TINY.text_hidden and te2.config.projection_dim == TINY.projection_dim
    ids = torch.as_tensor(CaptionTokenizer()(["a red circle and a striped blue square", "a star"]))
    with torch.no_grad():
        ref = clip.text_model(ids)
        torch.testing.assert_close(te1(ids).last_hidden_state, ref.last_hidden_state, rtol=0, atol=0)
        torch.testing.assert_close(te2(ids).text_embeds, clip.text_projection(ref.pooler_output), rtol=0, atol=0)
        # the second tokenizer pads with "!" (id 0): causal attention keeps the pooled embedding the same
        pad0 = torch.as_tensor(CaptionTokenizer()(["a red circle and a striped blue square", "a star"], pad_id=0))
        torch.testing.assert_close(te2(pad0).text_embeds, te2(ids).text_embeds)


@pytest.fixture(scope="module")
def scenes():
    from research.toy.clip.probe import probe_scenes

    return probe_scenes(300, seed=3, split="train")


@pytest.mark.parametrize("kind", SWAP_KINDS)
def test_a_swap_exchanges_one_attribute_and_keeps_the_bag_of_words(scenes, kind):
    attr = {"colour_swap": "colour", "texture_swap": "texture", "shape_swap": "shape"}[kind]
    pairs = probe_pairs(scenes, kind)
    eligible = [i for i in range(len(scenes)) if len({getattr(o, attr) for o in scenes.objects(i)}) == 2]
    assert [p.index for p in pairs] == eligible and len(pairs) > 50
    for p in pairs:
        assert p.alt != p.true and Counter(_words(p.alt)) == Counter(_words(p.true))
        objs, _ = caption_objects(scenes, p.index)
        a, b = (getattr(o, attr) for o in objs)
        if attr != "texture":  # same words but the two swapped ones, position by position
            diff = [(x, y) for x, y in zip(_words(p.true), _words(p.alt), strict=True) if x != y]
            assert diff == [(a, b), (b, a)]


@pytest.mark.parametrize("kind", CONTROL_KINDS)
def test_a_replacement_changes_one_word_to_an_absent_attribute(scenes, kind):
    attr = "colour" if kind == "colour_replace" else "shape"
    for p in probe_pairs(scenes, kind, rng=1):
        true, alt = Counter(_words(p.true)), Counter(_words(p.alt))
        gone, new = true - alt, alt - true
        assert sum(gone.values()) == sum(new.values()) == 1
        assert next(iter(new)) not in {getattr(o, attr) for o in scenes.objects(p.index)}


def test_probe_scores_a_perfect_scorer_100_a_constant_50_and_a_reversed_0(scenes):
    from research.toy.clip.probe import probe

    def perfect(idx, caps):
        return np.array([c == scenes.captions[i] for i, c in zip(idx, caps, strict=True)], dtype=float)

    for scorer, want in ((perfect, 1.0), (lambda i, c: np.zeros(len(c)), 0.5), (lambda i, c: -perfect(i, c), 0.0)):
        res = probe(scenes, scorer)
        assert [r.kind for r in res] == list(KINDS)
        assert all(r.accuracy == want and r.low <= want <= r.high for r in res)


def test_wilson_interval():
    from research.toy.clip.probe import wilson_interval

    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


def test_probe_needs_full_two_object_captions():
    from research.toy.scenes import sample_scenes

    with pytest.raises(ValueError, match="2 objects"):
        probe_pairs(sample_scenes(4, 0, n_objects=3), "colour_swap")
    with pytest.raises(ValueError, match="attribute_drop=0"):
        probe_pairs(sample_scenes(64, 0, n_objects=2, attribute_drop=1.0), "colour_swap")


def test_toy_trainer_trains_the_unet_on_frozen_text_encoders(runs, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from research.toy.clip.models import load_text_encoders
    from research.toy.train import load_checkpoint, main

    folder = runs[0] / "whole"
    args = ["--model", "tiny", "--device", "cpu", "--vae-steps", "2", "--vae-batch", "2", "--batch-size", "2"]
    args += ["--warmup", "1", "--data-workers", "1", "--steps", "2", "--text-encoders", str(folder)]
    main([*args, "--output", str(tmp_path / "run")])
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt.gz")
    te1, te2 = load_text_encoders(folder)
    for name, te in (("text_encoder", te1), ("text_encoder_2", te2)):
        for k, v in te.state_dict().items():
            assert torch.equal(ckpt[name][k], v), (name, k)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "run" / "pipeline"))
    assert pipe.unet.config.cross_attention_dim == 2 * te1.config.hidden_size
    torch.testing.assert_close(pipe.text_encoder_2.text_projection.weight, te2.text_projection.weight.half().float())
    # resuming keeps them frozen and takes the folder's encoders
    main(
        [
            *args,
            "--output",
            str(tmp_path / "run2"),
            "--resume",
            str(tmp_path / "run" / "checkpoint.pt.gz"),
            "--steps",
            "3",
        ]
    )
    ckpt2 = load_checkpoint(tmp_path / "run2" / "checkpoint.pt.gz")
    assert ckpt2["step"] == 3 and torch.equal(
        ckpt2["text_encoder_2"]["text_projection.weight"], te2.text_projection.weight
    )
    assert not torch.equal(ckpt2["unet"]["conv_in.weight"], ckpt["unet"]["conv_in.weight"])


def test_probe_cli_reports_every_kind_of_both_splits(runs, tmp_path):
    import json

    from research.toy.clip.probe import main

    main(["--model", str(runs[0] / "whole"), "--n", "24", "--json", str(tmp_path / "probe.json")])
    res = json.loads((tmp_path / "probe.json").read_text())
    for split in ("train", "held_out"):
        rows = {r["kind"]: r for r in res[split]}
        assert list(rows) == list(KINDS) and rows["plain"]["n"] == rows["colour_replace"]["n"] == 24
        for r in rows.values():
            assert 0 <= r["low"] <= r["accuracy"] <= r["high"] <= 1 and -1 <= r["text_cosine"] <= 1 + 1e-6


def test_shuffled_captions_keep_their_bag_of_words_and_the_step_decides_them():
    from research.toy.clip.data import scene_batch, shuffle_words
    from research.toy.scenes import CaptionTokenizer

    caps = ["a striped red circle, a blue square and a heart"] * 20
    out = shuffle_words(caps, np.random.default_rng(0))
    assert all(Counter(o.split()) == Counter(caps[0].replace(",", " ,").split()) for o in out)
    assert len(set(out)) > 1
    tok = CaptionTokenizer()
    px, ids = scene_batch(tok, 0, 5, 8, 16, 0.0, shuffle=True)
    px2, ids2 = scene_batch(tok, 0, 5, 8, 16, 0.0, shuffle=True)
    _, plain = scene_batch(tok, 0, 5, 8, 16, 0.0)
    assert torch.equal(ids, ids2) and torch.equal(px, px2) and not torch.equal(ids, plain)
    assert all(sorted(a.tolist()) == sorted(b.tolist()) for a, b in zip(ids, plain, strict=True))


def test_a_resume_must_keep_the_data_settings(runs, tmp_path):
    from research.toy.clip.pretrain import main

    ckpt = str(runs[0] / "whole" / "checkpoint.pt")
    with pytest.raises(ValueError, match="shuffle_words"):
        main([*TINY, "--output", str(tmp_path / "x"), "--resume", ckpt, "--shuffle-words", "1", "--steps", "5"])
