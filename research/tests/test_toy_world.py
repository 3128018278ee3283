"""The toy world: scene generator, judge, and the toy model's training script (tiny sizes, CPU)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from detailpp.resources import DATA_DIR, load_clip_tokenizer
from research.toy.judge import (
    assign_objects,
    classify_errors,
    judge,
    judge_accuracy,
    match_objects,
    score_image,
)
from research.toy.scenes import (
    COLOUR_NAMES,
    COLOURS,
    HELD_OUT_PAIRS,
    LAYOUT_GRID,
    MARGIN,
    SHAPES,
    SLOT_CENTRES,
    SLOT_REACH,
    SLOT_SIZE_RANGE,
    TEXTURE_SHADE,
    TEXTURES,
    CaptionTokenizer,
    ObjectSpec,
    held_out_prompts,
    is_held_out_pair,
    layout_field_of,
    noise_with_layout_field,
    render,
    sample_scenes,
    seen_prompts,
    slot_scores,
)


def test_masks_match_render_and_never_overlap():
    batch = sample_scenes(6, rng=3)
    img, masks = render(batch, supersample=1)  # no anti-aliasing: every pixel is exactly one thing
    img = img.numpy()
    masks = masks.numpy()
    for i in range(len(batch)):
        n = batch.n_objects[i]
        assert masks[i, n:].sum() == 0
        assert (masks[i].sum(0) <= 1).all(), "objects overlap"
        for k, obj in enumerate(batch.objects(i)):
            m = masks[i, k]
            assert m.sum() > 100
            rgb = np.asarray(COLOURS[obj.colour])
            px = img[i][:, m].T
            plain = np.abs(px - rgb).max(1) < 1e-5
            dark = np.abs(px - rgb * TEXTURE_SHADE).max(1) < 1e-5
            assert (plain | dark).all()
            if obj.texture == "plain":
                assert plain.all()
            else:
                assert 0.1 < dark.mean() < 0.7
        background = ~masks[i].any(0)
        assert np.abs(img[i][:, background] - batch.background[i]).max() < 1e-5


@pytest.mark.parametrize("layout", ["uniform", "field", "slots"])
def test_layout_keeps_margins(layout):
    b = sample_scenes(500, rng=4, layout=layout)
    assert (b.layout_field is not None) == (layout != "uniform")
    for i in range(len(b)):
        n = b.n_objects[i]
        x, y, s = b.cx[i, :n], b.cy[i, :n], b.size[i, :n]
        assert ((x - s >= MARGIN - 1e-9) & (x + s <= 128 - MARGIN + 1e-9)).all()
        for j in range(n):
            for k in range(j + 1, n):
                gap = s[j] + s[k] + MARGIN
                assert abs(x[j] - x[k]) > gap or abs(y[j] - y[k]) > gap


def test_noise_with_layout_field_is_standard_normal_and_carries_the_field():
    field = np.random.default_rng(0).standard_normal((64, LAYOUT_GRID, LAYOUT_GRID))
    noise = noise_with_layout_field(field, (64, 4, 64, 64), torch.Generator().manual_seed(1))
    assert torch.allclose(layout_field_of(noise), torch.as_tensor(field, dtype=torch.float32), atol=1e-4)
    # still N(0, I): per-element moments, and the residual inside a cell keeps unit variance
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01
    cells = noise.reshape(64, 4, 8, 8, 8, 8).permute(0, 2, 4, 1, 3, 5).reshape(64, 64, 256)
    residual = cells - cells.mean(-1, keepdim=True)
    assert abs(residual.var(-1, unbiased=True).mean().item() - 1) < 0.01
    # plain N(0, I) noise has a standard-normal field
    f = layout_field_of(torch.randn(256, 4, 64, 64, generator=torch.Generator().manual_seed(2)))
    assert abs(f.std().item() - 1) < 0.03
    with pytest.raises(ValueError, match="multiple of the layout grid"):
        layout_field_of(torch.zeros(1, 4, 20, 20))


def test_noise_layout_puts_the_first_named_object_on_the_fields_peak():
    n = 200
    field = np.random.default_rng(3).standard_normal((n, LAYOUT_GRID, LAYOUT_GRID)) * 0.1
    peak = np.random.default_rng(4).integers(2, LAYOUT_GRID - 2, size=(n, 2))  # (row, col), away from the border
    field[np.arange(n), peak[:, 0], peak[:, 1]] = 5.0
    cell = 128 / LAYOUT_GRID
    for seed in (5, 6):
        b = sample_scenes(n, rng=seed, n_objects=(0, 0.5, 0.5), layout_field=field)
        first = b.order[:, 0]
        x, y, s = (a[np.arange(n), first] for a in (b.cx, b.cy, b.size))
        px, py = (peak[:, 1] + 0.5) * cell, (peak[:, 0] + 0.5) * cell
        assert ((np.abs(x - px) <= s) & (np.abs(y - py) <= s)).all(), "the first object does not cover the peak"
        # the peak cell is inside its box as far as its size allows (lattice of 4 px)
        assert (np.abs(x - px) <= np.maximum(s - cell / 2, 0) + 4).all()
        assert (np.abs(y - py) <= np.maximum(s - cell / 2, 0) + 4).all()
    # the others avoid it: the peak lies in no other object's box
    for k in range(1, 3):
        slot = b.order[:, k]
        has = slot >= 0
        x, y, s = (a[np.arange(n), np.maximum(slot, 0)] for a in (b.cx, b.cy, b.size))
        assert not ((np.abs(x - px) < s) & (np.abs(y - py) < s) & has).any()


def test_slots_layout_puts_the_kth_named_object_on_the_kth_best_place():
    n = 300
    field = np.random.default_rng(7).standard_normal((n, LAYOUT_GRID, LAYOUT_GRID))
    b = sample_scenes(n, rng=8, layout="slots", layout_field=field)
    scores = slot_scores(field)
    # an independent reading of the places: the score of the 32 x 32 pixels around each centre, by brute force
    px = np.repeat(np.repeat(field, 128 // LAYOUT_GRID, axis=1), 128 // LAYOUT_GRID, axis=2)  # (n, 128, 128)
    for i in range(n):
        for j, (cy, cx) in enumerate((y, x) for y in SLOT_CENTRES for x in SLOT_CENTRES):
            r = int(SLOT_REACH)
            assert abs(scores[i, j] - px[i, int(cy) - r : int(cy) + r, int(cx) - r : int(cx) + r].mean()) < 1e-9
        best = np.argsort(-scores[i])
        for k in range(b.n_objects[i]):
            slot = b.order[i, k]
            assert (b.cx[i, slot], b.cy[i, slot]) == (SLOT_CENTRES[best[k] % 3], SLOT_CENTRES[best[k] // 3])
            assert SLOT_SIZE_RANGE[0] <= b.size[i, slot] <= SLOT_SIZE_RANGE[1]
    # the layout depends on the field only: other attributes, same field, same places
    c = sample_scenes(n, rng=9, layout="slots", layout_field=field)
    same = b.n_objects == c.n_objects
    for i in np.flatnonzero(same):
        for k in range(b.n_objects[i]):
            assert (
                b.cx[i, b.order[i, k]] == c.cx[i, c.order[i, k]] and b.cy[i, b.order[i, k]] == c.cy[i, c.order[i, k]]
            )
    with pytest.raises(ValueError, match="layout must be one of"):
        sample_scenes(2, rng=0, layout="grid")


def test_scene_stream_order_is_deterministic_with_several_workers():
    from research.toy.train import SceneStream

    runs = []
    for _ in range(2):
        stream = SceneStream(8, seed=11, attribute_drop=0.15, layout="slots", workers=3)
        runs.append([stream.next()[0] for _ in range(5)])
        stream.close()
    for a, b in zip(*runs, strict=True):
        assert a.captions == b.captions
        assert np.array_equal(a.cx, b.cx) and np.array_equal(a.layout_field, b.layout_field)
    assert runs[0][0].captions != runs[0][1].captions


def test_captions_name_the_scene():
    b = sample_scenes(300, rng=5)
    for i in range(len(b)):
        spec = b.prompt_spec(i)
        cap = b.captions[i]
        assert sorted(spec.objects, key=repr) == sorted(b.objects(i), key=repr)
        pos = 0
        for obj in spec.objects:  # each object's full phrase, in caption order
            phrase = obj.phrase()
            found = cap.find(phrase, pos)
            assert found >= 0, (cap, phrase)
            pos = found + len(phrase)
        words = re.findall(r"[a-z]+", cap)
        assert sum(w in SHAPES for w in words) == b.n_objects[i]
    # with attribute dropout, the caption says a subset of the attributes, never a wrong one
    d = sample_scenes(300, rng=6, attribute_drop=0.5)
    for i in range(len(d)):
        words = re.findall(r"[a-z]+", d.captions[i])
        said = {w for w in words if w in COLOUR_NAMES or w in TEXTURES}
        truth = {o.colour for o in d.objects(i)} | {o.texture for o in d.objects(i)}
        assert said <= truth
    assert any(not d.say_colour[i, : d.n_objects[i]].all() for i in range(len(d)))


def test_held_out_split():
    b = sample_scenes(3000, rng=7, split="train")
    multi_held, single_held = 0, 0
    for i in range(len(b)):
        held = [o.held_out for o in b.objects(i)]
        if b.n_objects[i] > 1:
            multi_held += any(held)
        else:
            single_held += any(held)
    assert multi_held == 0
    assert single_held > 0  # held-out pairs are drawn alone, so the model knows them
    prompts = held_out_prompts(200, seed=0)
    assert len({p.prompt for p in prompts}) == 200
    assert all(p.held_out and len(p.objects) in (2, 3) for p in prompts)
    assert [p.prompt for p in prompts[:5]] == [p.prompt for p in held_out_prompts(5, seed=0)][:5]
    assert not any(p.held_out for p in seen_prompts(50))
    assert is_held_out_pair(*HELD_OUT_PAIRS[0]) and not is_held_out_pair("red", "circle")


def test_caption_tokenizer_matches_clip():
    tok = CaptionTokenizer()
    tok2 = load_clip_tokenizer(second=True)
    caps = sample_scenes(40, rng=8, attribute_drop=0.3).captions + [""]
    ids = tok(caps)
    ids2 = tok(caps, pad_id=0)
    for c, a, b in zip(caps, ids, ids2, strict=True):
        assert a.tolist() == tok.tokenizer(c, padding="max_length", max_length=77, truncation=True).input_ids
        assert b.tolist() == tok2(c, padding="max_length", max_length=77, truncation=True).input_ids


@pytest.mark.parametrize("layout", ["uniform", "slots"])
def test_judge_reads_clean_and_perturbed_renders(layout):
    clean = judge_accuracy(n=16, seed=11, layout=layout)
    assert clean["object_accuracy"] >= 0.98, clean["errors"]
    assert clean["scene_accuracy"] >= 0.9
    noisy = judge_accuracy(n=48, seed=12, perturbed=True, layout=layout)
    assert noisy["object_accuracy"] >= 0.95, noisy["errors"]
    assert noisy["mask_iou"] > 0.8


def test_judge_corrects_a_tinted_background():
    b = sample_scenes(2, rng=13, n_objects=2)
    img, _ = render(b)
    tinted = (img + torch.tensor([0.05, -0.03, 0.06]).view(1, 3, 1, 1)).clamp(0, 1)
    for i in range(2):
        assert sorted(map(repr, (o.spec for o in judge(tinted[i])))) == sorted(map(repr, b.objects(i)))


def test_score_image_binding():
    b = sample_scenes(1, rng=14, n_objects=2)
    img, _ = render(b)
    objs = b.objects(0)
    good = score_image(img[0], objs)
    assert good["image_correct"] and good["object_accuracy"] == 1.0
    other = next(c for c in COLOUR_NAMES if c not in {o.colour for o in objs})
    swapped = [ObjectSpec(objs[0].shape, other, objs[0].texture), objs[1]]
    bad = score_image(img[0], swapped)
    assert bad["found"] == [False, True] and not bad["image_correct"]
    assert good["errors"]["failed"] is False and bad["errors"]["colour_other"] == 1 and bad["errors"]["not_found"] == 1


NO_ERRORS = {
    "not_found": 0,
    "shape_missing": 0,
    "colour_leak": 0,
    "colour_other": 0,
    "texture_leak": 0,
    "texture_other": 0,
    "count": False,
    "extra": 0,
    "missing": 0,
    "failed": False,
    "attributes_only": False,
    "binding_only": False,
}


def _errors(expected, seen, **changed):
    """classify_errors, checked against NO_ERRORS with ``changed`` entries."""
    got = classify_errors(expected, seen)
    assert got == {**NO_ERRORS, **changed}
    return got


def test_classify_errors_kinds():
    red_circle, blue_square = ObjectSpec("circle", "red"), ObjectSpec("square", "blue")
    expected = [red_circle, blue_square]
    _errors(expected, [blue_square, red_circle])  # correct, in any order
    # a colour swap between the two objects: two leaks, right count, so binding only
    swapped = [ObjectSpec("circle", "blue"), ObjectSpec("square", "red")]
    _errors(expected, swapped, not_found=2, colour_leak=2, failed=True, attributes_only=True, binding_only=True)
    # one object takes the other's colour: one leak
    _errors(
        expected,
        [ObjectSpec("circle", "blue"), blue_square],
        not_found=1,
        colour_leak=1,
        failed=True,
        attributes_only=True,
        binding_only=True,
    )
    # a colour from nowhere: the right objects (attributes only) but no leak (not binding only)
    _errors(
        expected,
        [ObjectSpec("circle", "green"), blue_square],
        not_found=1,
        colour_other=1,
        failed=True,
        attributes_only=True,
    )
    # an extra object: everything found, wrong count
    _errors(expected, [red_circle, blue_square, ObjectSpec("star", "red")], count=True, extra=1, failed=True)
    # a missing object: shape missing and wrong count
    _errors(expected, [red_circle], not_found=1, shape_missing=1, count=True, missing=1, failed=True)
    # the square drawn as a star: shape missing with the right count (not binding only)
    _errors(expected, [red_circle, ObjectSpec("star", "blue")], not_found=1, shape_missing=1, failed=True)
    # a leak with a wrong count is not binding only
    _errors(
        expected,
        [ObjectSpec("circle", "blue"), blue_square, blue_square],
        not_found=1,
        colour_leak=1,
        count=True,
        extra=1,
        failed=True,
    )
    _errors(expected, [], not_found=2, shape_missing=2, count=True, missing=2, failed=True)


def test_classify_errors_textures_and_assignment():
    striped_red = ObjectSpec("circle", "red", "striped")
    expected = [striped_red, ObjectSpec("square", "blue")]
    # the stripes move to the square: a texture leak on the square; the circle loses them: texture_other
    moved = [ObjectSpec("circle", "red"), ObjectSpec("square", "blue", "striped")]
    _errors(expected, moved, not_found=2, texture_leak=1, texture_other=1, failed=True, attributes_only=True)
    dotted = [striped_red, ObjectSpec("square", "blue", "dotted")]
    _errors(expected, dotted, not_found=1, texture_other=1, failed=True, attributes_only=True)
    # colour and texture both taken from the other object: one object, one leak of each kind, binding only
    both = [ObjectSpec("circle", "red", "striped"), ObjectSpec("circle", "red", "striped")]
    expected2 = [ObjectSpec("circle", "blue"), striped_red]
    leaks = dict(not_found=1, colour_leak=1, texture_leak=1, failed=True, attributes_only=True, binding_only=True)
    _errors(expected2, both, **leaks)
    # the exact match is kept (as many found as match_objects finds); the other object gets the judged object left,
    # whose lost texture (plain) is no leak
    expected3 = [ObjectSpec("heart", "red", "striped"), ObjectSpec("heart", "red", "dotted")]
    seen3 = [ObjectSpec("heart", "red", "plain"), ObjectSpec("heart", "red", "striped")]
    assert assign_objects(expected3, seen3) == [1, 0]
    _errors(expected3, seen3, not_found=1, texture_other=1, failed=True, attributes_only=True)
    assert assign_objects([ObjectSpec("star", "red")], seen3) == [None]


def test_classify_errors_agree_with_the_scores():
    rng = np.random.default_rng(3)
    names = (SHAPES[:3], COLOUR_NAMES[:3], TEXTURES)
    for _ in range(300):
        expected = [ObjectSpec(*(str(rng.choice(n)) for n in names)) for _ in range(rng.integers(2, 4))]
        seen = [ObjectSpec(*(str(rng.choice(n)) for n in names)) for _ in range(rng.integers(0, 5))]
        seen += [o for o in expected if rng.random() < 0.5]
        e = classify_errors(expected, seen)
        found = match_objects(expected, seen)
        assert e["not_found"] == len(expected) - found.sum()
        assert e["failed"] == (not (found.all() and len(seen) == len(expected)))
        wrong_attr = e["not_found"] - e["shape_missing"]
        assert wrong_attr <= e["colour_leak"] + e["colour_other"] + e["texture_leak"] + e["texture_other"]
        assert e["colour_leak"] + e["colour_other"] <= wrong_attr
        assert e["texture_leak"] + e["texture_other"] <= wrong_attr
        assert e["count"] == (e["extra"] + e["missing"] > 0)
        assert e["attributes_only"] == (e["failed"] and not e["count"] and e["shape_missing"] == 0)
        if e["binding_only"]:
            assert e["attributes_only"] and e["colour_leak"] + e["texture_leak"] > 0


def test_training_script_writes_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from research.toy.train import main

    out = tmp_path / "run"
    args = [
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--output",
        str(out),
        "--vae-steps",
        "2",
        "--vae-batch",
        "2",
        "--steps",
        "3",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--log-every",
        "1",
        "--warmup",
        "1",
    ]
    summary = main(args)
    assert summary["step"] == 2 and np.isfinite(summary["final_loss"])
    folder = out / "pipeline"
    assert (folder / "model_index.json").exists()
    for f in folder.rglob("*.safetensors"):
        assert f.stat().st_size < 16 * 2**20
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=1, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    # resume from the checkpoint: the step count goes on
    resumed = main(
        [
            *args[:4],
            "--output",
            str(tmp_path / "run2"),
            "--resume",
            str(out / "checkpoint.pt.gz"),
            "--resume-ema",
            str(folder),
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--log-every",
            "1",
        ]
    )
    assert resumed["step"] == 3
    # going on from a saved pipeline (its EMA weights) when the raw checkpoint is gone
    from research.toy.train import checkpoint_from_pipeline

    ckpt = checkpoint_from_pipeline(folder, step=2)
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(ckpt["unet"][k], v.float().cpu())
    again = main(
        [
            *args[:4],
            "--output",
            str(tmp_path / "run3"),
            "--resume",
            str(folder),
            "--resume-step",
            "2",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--high-noise-fraction",
            "0.5",
            "--layout-loss-weight",
            "1",
            "--log-every",
            "1",
        ]
    )
    assert again["step"] == 3
    logged = [json.loads(line) for line in (tmp_path / "run3" / "log.jsonl").read_text().splitlines()]
    assert any(np.isfinite(r.get("layout_loss", np.nan)) for r in logged)
    with pytest.raises(ValueError, match="--layout-loss-weight"):
        main([*args, "--layout-loss-weight", "-1"])


def test_layout_loss_is_the_coarse_x0_error():
    from research.toy.train import layout_loss

    g = torch.Generator().manual_seed(0)
    z0, noise, pred = (torch.randn(3, 4, 64, 64, generator=g) for _ in range(3))
    abar = torch.tensor([0.9, 0.3, 0.005])
    a = abar.view(3, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    x0_hat = (zt - (1 - a).sqrt() * pred) / a.sqrt()
    cell = 64 // LAYOUT_GRID
    coarse = (x0_hat - z0).unflatten(2, (LAYOUT_GRID, cell)).unflatten(4, (LAYOUT_GRID, cell)).mean(dim=(3, 5))
    torch.testing.assert_close(layout_loss(pred, noise, abar), coarse.square().mean(dim=(1, 2, 3)))
    assert layout_loss(noise, noise, abar).abs().max() == 0
    # fine detail within a cell costs nothing: only where the mass sits does
    detail = torch.randn(3, 4, LAYOUT_GRID, LAYOUT_GRID, cell, cell, generator=g)
    detail = (detail - detail.mean(dim=(4, 5), keepdim=True)).permute(0, 1, 2, 4, 3, 5).reshape(3, 4, 64, 64)
    torch.testing.assert_close(layout_loss(noise + detail, noise, abar), torch.zeros(3), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="divisible"):
        layout_loss(pred[..., :60], noise[..., :60], abar)


def test_grow_unet_keeps_the_function_and_the_new_blocks_learn():
    from dataclasses import replace

    from research.toy.model import TINY, build_unet
    from research.toy.train import grow_unet

    torch.manual_seed(0)
    small = build_unet(TINY)
    big = build_unet(replace(TINY, transformer_layers=(1, 2, 3)))
    assert grow_unet(big, small.state_dict()) > 0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ehs = torch.randn(2, 77, 2 * TINY.text_hidden, generator=g)
    added = {"text_embeds": torch.randn(2, TINY.projection_dim, generator=g), "time_ids": torch.rand(2, 6) * 32}
    t = torch.tensor([10, 700])
    torch.testing.assert_close(
        big(x, t, ehs, added_cond_kwargs=added).sample, small(x, t, ehs, added_cond_kwargs=added).sample
    )
    big(x, t, ehs, added_cond_kwargs=added).sample.square().mean().backward()
    new_out = big.mid_block.attentions[0].transformer_blocks[2].ff.net[-1].weight
    assert new_out.abs().max() == 0 and new_out.grad.abs().max() > 0
    with pytest.raises(ValueError, match="lacks"):
        grow_unet(small, big.state_dict())


def test_packaged_toy_model_fits_the_budget():
    folder = DATA_DIR / "toy-model"
    if not (folder / "model_index.json").exists():
        pytest.skip("toy model weights not packaged")
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert max(f.stat().st_size for f in files) <= 16 * 2**20
    assert sum(f.stat().st_size for f in files) <= 40 * 2**20
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    # lowest-resolution attention (down_blocks.2 / mid_block / up_blocks.0) sees (sample_size / 4)^2 >= 16x16 tokens
    assert unet["sample_size"] // 4 >= 16
    assert (
        unet["cross_attention_dim"]
        == 2 * json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_size"]
    )
    assert vae["scaling_factor"] > 0


def test_base_prompt_and_layout_agreement():
    from PIL import Image

    from research.toy.evaluate import base_prompt, layout_agreement
    from research.toy.scenes import PromptSpec, to_uint8

    spec = PromptSpec(
        "a striped red circle next to an orange star",
        (ObjectSpec("circle", "red", "striped"), ObjectSpec("star", "orange")),
    )
    assert base_prompt(spec) == "a circle next to a star"
    with pytest.raises(ValueError, match="not a toy-world caption"):
        base_prompt(PromptSpec("two red circles", spec.objects))
    batch = sample_scenes(4, rng=8, n_objects=2)
    images = [Image.fromarray(a) for a in to_uint8(render(batch)[0])]
    same = layout_agreement(images, images)
    assert same == {"foreground_iou": 1.0, "same_count": 1.0}
    moved = sample_scenes(4, rng=9, n_objects=2)  # other places: overlap well below 1
    other = [Image.fromarray(a) for a in to_uint8(render(moved)[0])]
    assert layout_agreement(images, other)["foreground_iou"] < 0.5


class _RulePipe:
    """A stand-in pipeline that renders each prompt's objects where the slots rule puts them (or, ``follow=False``,
    on fixed places whatever the noise)."""

    def __init__(self, specs, follow: bool = True):
        from types import SimpleNamespace

        from research.toy.evaluate import base_prompt

        self.by_prompt = {s.prompt: s for s in specs} | {base_prompt(s): s for s in specs}
        self.follow = follow
        self.device = "cpu"
        self.unet = SimpleNamespace(config=SimpleNamespace(in_channels=4, sample_size=64), dtype=torch.float32)

    def __call__(self, prompts, latents, num_inference_steps, guidance_scale):
        from types import SimpleNamespace

        from PIL import Image

        from research.toy.scenes import SceneBatch, _place_on_slots, to_uint8

        field = layout_field_of(latents).numpy().astype(np.float64)
        images = []
        for prompt, f in zip(prompts, field, strict=True):
            objs = self.by_prompt[prompt].objects
            n = len(objs)
            pad = [-1] * (3 - n)
            order = np.array([[*range(n), *pad]])
            counts = np.array([n])
            f = f if self.follow else np.linspace(1, 0, f.size).reshape(f.shape)  # the same places every time
            cx, cy, size = _place_on_slots(np.random.default_rng(0), counts, order, f[None])
            batch = SceneBatch(
                counts,
                np.array([[SHAPES.index(o.shape) for o in objs] + pad]),
                np.array([[COLOUR_NAMES.index(o.colour) for o in objs] + pad]),
                np.array([[TEXTURES.index(o.texture) for o in objs] + pad]),
                cx,
                cy,
                size,
                np.zeros((1, 3)),
                np.array([0.2]),
                order,
                np.ones((1, 3), bool),
                np.ones((1, 3), bool),
            )
            images.append(Image.fromarray(to_uint8(render(batch)[0])[0]))
        return SimpleNamespace(images=images)


def test_slot_rule_reads_the_places_off_the_noise():
    from research.toy.evaluate import slot_rule

    specs = held_out_prompts(12, seed=3)
    follows = slot_rule(_RulePipe(specs), specs, seed=5)
    assert follows["full"] == {"on_top_places": 1.0, "in_named_order": 1.0}
    assert follows["base"] == follows["full"] and follows["same_places"] == 1.0
    fixed = slot_rule(_RulePipe(specs, follow=False), specs, seed=5)
    assert fixed["same_places"] == 1.0  # both kinds use the fixed places ...
    assert fixed["full"]["on_top_places"] < 0.7 and fixed["full"]["in_named_order"] < 0.5  # ... not the noise's


def test_layout_divergence_compares_step_estimates():
    from research.toy.evaluate import foreground_strength, layout_divergence
    from research.toy.model import TINY, build_components, build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline(build_components(TINY))
    pipe.set_progress_bar_config(disable=True)
    specs = held_out_prompts(3, seed=0)
    same = layout_divergence(pipe, specs, steps=3, guidance_scale=2.0, second_prompt=lambda s: s.prompt)
    assert "step" not in vars(pipe.scheduler)  # the recording wrapper is gone
    assert same["full_vs_second"] == pytest.approx([1.0] * 3, abs=1e-5)  # same prompt, same noise: same estimates
    assert same["full_vs_final"][-1] == pytest.approx(1.0, abs=1e-5)
    assert same["second_vs_final"] == pytest.approx(same["full_vs_final"], abs=1e-5)
    other = layout_divergence(pipe, specs, steps=3, guidance_scale=2.0)
    assert len(other["full_vs_second"]) == len(other["other_noise"]) == 3
    assert all(-1 <= v <= 1 for v in other["full_vs_second"] + other["other_noise"])
    # foreground strength: a bright square on a grey background lights up its own cells only
    img = torch.full((1, 3, 32, 32), 0.2)
    img[..., 8:16, 16:24] = 0.9
    fg = foreground_strength(img, cells=4).view(4, 4)
    assert fg[1, 2] > 0.5 and fg.sum() == pytest.approx(fg[1, 2].item())


def test_coarse_error_compares_own_and_other_noise():
    from research.toy.evaluate import coarse_error
    from research.toy.model import TINY, build_components, build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline(build_components(TINY))
    r = coarse_error(pipe, n=4, timesteps=(999, 500))
    again = coarse_error(pipe, n=4, timesteps=(999, 500))
    assert r == again  # seeded: the same scenes and noise
    for t in ("999", "500"):
        assert set(r[t]) == {"matched", "mismatched"} and all(np.isfinite(v) and v >= 0 for v in r[t].values())
        assert r[t]["matched"] != r[t]["mismatched"]  # the noises differ only in their layout field
    # at t = 999 the x0 estimate amplifies the prediction's error far more than at t = 500
    assert r["999"]["matched"] > r["500"]["matched"]
