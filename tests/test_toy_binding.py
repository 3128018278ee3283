"""The toy binding benchmark: end to end on 2 prompts (tiny random model, CPU), and its metrics on hand-made cases."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from detailpp.toy import binding
from detailpp.toy.scenes import ObjectSpec, PromptSpec, held_out_prompts


@dataclass
class Seen:
    """A fake judged object (what :func:`detailpp.toy.judge.judge` returns)."""

    shape: str
    colour: str
    texture: str
    mask: np.ndarray


def box(y0, x0, y1, x1, size=16):
    m = np.zeros((size, size), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


RED_CIRCLE, BLUE_SQUARE = ObjectSpec("circle", "red"), ObjectSpec("square", "blue")


def test_score_seen_object_and_image_level():
    expected = [RED_CIRCLE, BLUE_SQUARE]
    right = [Seen("square", "blue", "plain", box(0, 0, 4, 4)), Seen("circle", "red", "plain", box(8, 8, 12, 12))]
    s = binding.score_seen(expected, right)
    assert s["found"] == [True, True] and s["image_correct"]
    swapped = [Seen("square", "red", "plain", box(0, 0, 4, 4)), Seen("circle", "blue", "plain", box(8, 8, 12, 12))]
    s = binding.score_seen(expected, swapped)
    assert s["found"] == [False, False] and not s["image_correct"]
    extra = [*right, Seen("star", "red", "plain", box(12, 0, 16, 4))]
    s = binding.score_seen(expected, extra)
    assert s["found"] == [True, True] and not s["image_correct"]  # an extra object: attribute on a wrong object
    s = binding.score_seen(expected, right[:1])
    assert s["found"] == [False, True] and not s["image_correct"]


def test_assign_regions_and_mask_iou():
    expected = [RED_CIRCLE, BLUE_SQUARE, ObjectSpec("circle", "green")]
    seen = [
        Seen("circle", "green", "plain", box(0, 0, 4, 4)),
        Seen("square", "red", "plain", box(0, 8, 4, 12)),  # wrong colour, right shape: still the square's region
        Seen("circle", "red", "plain", box(8, 8, 12, 12)),
    ]
    assert binding.assign_regions(expected, seen) == [2, 1, 0]
    assert binding.assign_regions([ObjectSpec("star", "red")], seen) == [None]
    regions = [seen[j].mask for j in binding.assign_regions(expected, seen)]
    maps = np.zeros((3, 8, 8), dtype=np.float32)
    maps[0, 4:6, 4:6] = 1.0  # exactly the red circle's region at half resolution
    maps[1, 0:2, 4:5] = 1.0  # half of the square's region
    maps[2, 4:8, 0:4] = 0.6  # misses the green circle; above tau 0.5 but not 0.7
    recs = binding.mask_records(binding.upsample_masks(maps, (16, 16)), 0.5, [0, 1, 2], regions)
    assert recs[0]["iou"] == pytest.approx(1.0) and recs[0]["peak_inside"]
    assert recs[1]["iou"] == pytest.approx(0.5)
    assert recs[2]["iou"] == pytest.approx(0.0) and not recs[2]["peak_inside"]
    assert recs[0]["iou_tau"]["0.7"] == pytest.approx(1.0) and recs[2]["mask_area"] == pytest.approx(0.25)
    none = binding.mask_records(maps[:1], 0.5, [None], regions)
    assert none[0]["iou"] is None


def test_branch_objects_follow_token_order_and_repeated_shapes():
    spec = PromptSpec(
        "a red heart, a blue heart and a green star",
        (ObjectSpec("heart", "red"), ObjectSpec("heart", "blue"), ObjectSpec("star", "green")),
    )
    plan = {
        "branches": [
            {"subject": "star", "subject_token_indices": [12]},
            {"subject": "heart", "subject_token_indices": [7]},
            {"subject": "heart", "subject_token_indices": [3]},
        ]
    }
    assert binding.branch_objects(plan, spec) == [2, 1, 0]


def test_scene_plan_matches_the_rule():
    from detailpp.resources import load_clip_tokenizer

    spec = PromptSpec(
        "an orange cross next to a striped purple cross",
        (ObjectSpec("cross", "orange"), ObjectSpec("cross", "purple", "striped")),
    )
    plan = binding.scene_plan(spec, load_clip_tokenizer())
    assert plan["base"] == "a cross next to a cross"
    assert [b["prompt"] for b in plan["branches"]] == [
        "an orange cross next to a cross",
        "a cross next to a striped purple cross",
    ]
    assert plan["branches"][0]["subject_token_indices"] != plan["branches"][1]["subject_token_indices"]


def _rec(p, seed, method, found, correct, n=2, masks=None):
    r = {
        "prompt_index": p,
        "seed": seed,
        "n_objects": n,
        "method": method,
        "found": found,
        "image_correct": correct,
        "seconds": 1.0,
    }
    if masks is not None:
        r["masks"] = masks
    return r


def _mask(k, value):
    return {
        "object": k,
        "iou": value,
        "iou_tau": {"0.3": value, "0.5": value, "0.7": value},
        "peak_inside": True,
        "mask_area": 0.1,
        "region_area": 0.1,
    }


def test_aggregate_counts_only_items_every_method_finished():
    settings = binding.Settings(methods=("sdxl", "detailpp"), diagnostics=())
    records = [
        _rec(0, 0, "sdxl", [True, False], False),
        _rec(0, 0, "detailpp", [True, True], True, masks=[_mask(0, 0.8), _mask(1, 0.4)]),
        _rec(1, 0, "sdxl", [True, True, True], True, n=3),
        _rec(1, 0, "detailpp", [True, True, False], False, n=3, masks=[_mask(0, 0.6), _mask(1, 0.6), _mask(2, None)]),
        _rec(0, 1, "sdxl", [True, True], True),  # its detailpp image never came: not counted
    ]
    res = binding.aggregate(records, settings, {"n_prompts": 2, "n_seeds": 2, "items": 4}, {"object_accuracy": 0.99})
    assert res["n_prompts"] == 2 and res["n_seeds"] == 1 and res["judge_accuracy"] == 0.99 and not res["complete"]
    sd, dp = res["methods"]["sdxl"], res["methods"]["detailpp"]
    assert sd["object_accuracy"] == pytest.approx(4 / 5) and sd["image_accuracy"] == pytest.approx(0.5)
    assert dp["object_accuracy"] == pytest.approx(4 / 5) and dp["image_accuracy"] == pytest.approx(0.5)
    assert dp["by_objects"]["2"]["image_accuracy"] == 1.0 and dp["by_objects"]["3"]["object_accuracy"] == 2 / 3
    assert dp["image_accuracy_vs_sdxl"]["delta"] == pytest.approx(0.0)
    m = res["mask_iou"]["detailpp"]
    assert m["mean_iou"] == pytest.approx((0.8 + 0.4 + 0.6 + 0.6) / 4) and m["n_matched"] == 4 and m["n_masks"] == 5
    assert m["by_objects"]["3"]["by_position"]["3"]["mean_iou"] is None
    assert m["by_objects"]["2"]["by_position"]["1"]["mean_iou"] == pytest.approx(0.8)
    assert "sdxl" not in res["mask_iou"]


def test_benchmark_end_to_end_on_two_prompts(tmp_path):
    settings = binding.Settings(
        model="tiny-random", device="cpu", steps=2, height=128, width=128, diagnostic_prompts=1, grid_prompts=1
    )
    results = tmp_path / "toy_binding.json"
    res = binding.run_benchmark(
        2,
        1,
        settings,
        tmp_path / "work",
        results,
        plans_source="scene",
        judge_scenes=2,
        grid_path=tmp_path / "grid.png",
        markdown_path=tmp_path / "table.md",
    )
    data = json.loads(results.read_text())
    assert {"n_prompts", "n_seeds", "judge_accuracy", "methods", "mask_iou"} <= set(data)
    assert data["n_prompts"] == 2 and data["n_seeds"] == 1 and data["complete"]
    assert set(data["methods"]) == {"sdxl", "detailpp", "pdi", "pdi_entropy"}
    for m in data["methods"].values():
        assert {"object_accuracy", "image_accuracy"} <= set(m) and m["n_images"] == 2
    assert set(data["mask_iou"]) == {"detailpp", "pdi", "pdi_entropy"}
    assert data["diagnostics"]["n_images"] == 1 and "layout" in data["diagnostics"]["detailpp"]
    assert (tmp_path / "grid.png").is_file() and "| method |" in (tmp_path / "table.md").read_text()
    assert res["n_prompts"] == 2
    # one generator per image: the same seed for every method of an item
    recs = binding.read_records(tmp_path / "work")
    seeds = {(r["prompt_index"], r["seed"]): set() for r in recs}
    for r in recs:
        seeds[(r["prompt_index"], r["seed"])].add(r["image_seed"])
    assert all(len(v) == 1 for v in seeds.values())
    assert held_out_prompts(2)[0].prompt  # the prompts are the held-out list's prefix
