"""The toy binding benchmark: end to end on 2 prompts (tiny random model, CPU), and its metrics on hand-made cases."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from research.toy import binding
from research.toy.judge import classify_errors
from research.toy.scenes import ObjectSpec, PromptSpec, held_out_prompts


@dataclass
class Seen:
    """A fake judged object (what :func:`research.toy.judge.judge` returns)."""

    shape: str
    colour: str
    texture: str
    mask: np.ndarray


def box(y0, x0, y1, x1, size=16):
    m = np.zeros((size, size), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


RED_CIRCLE, BLUE_SQUARE = ObjectSpec("circle", "red"), ObjectSpec("square", "blue")
# a correct image's failure kinds (their exact values are tested with the judge, research/tests/test_toy_world.py); the
# aggregation tests below lay their own kinds over it
NO_ERRORS = classify_errors([RED_CIRCLE, BLUE_SQUARE], [RED_CIRCLE, BLUE_SQUARE])


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
    assert s["errors"]["shape_missing"] == 1 and s["errors"]["missing"] == 1 and not s["errors"]["binding_only"]
    assert binding.score_seen(expected, swapped)["errors"]["colour_leak"] == 2
    assert not binding.score_seen(expected, right)["errors"]["failed"]
    json.dumps(binding.score_seen(expected, extra))  # a record line


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


def _rec(p, seed, method, found, correct, n=2, masks=None, errors=None):
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
    if errors is not None:
        r["errors"] = errors
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
    settings = binding.BindingSettings(methods=("sdxl", "detailpp"), diagnostics=())
    records = [
        _rec(0, 0, "sdxl", [True, False], False),
        _rec(0, 0, "detailpp", [True, True], True, masks=[_mask(0, 0.8), _mask(1, 0.4)]),
        _rec(1, 0, "sdxl", [True, True, True], True, n=3),
        _rec(1, 0, "detailpp", [True, True, False], False, n=3, masks=[_mask(0, 0.6), _mask(1, 0.6), _mask(2, None)]),
        _rec(0, 1, "sdxl", [True, True], True),  # its detailpp image never came: not counted
    ]
    leak = {"not_found": 1, "colour_leak": 1, "failed": True, "attributes_only": True, "binding_only": True}
    records[0]["errors"] = {**NO_ERRORS, **leak}
    records[1]["errors"] = NO_ERRORS
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
    assert sd["errors"]["n_images"] == 1 and sd["errors"]["failed_images"]["binding_only"] == 1.0  # item (1, 0): none
    assert dp["errors"]["n_images"] == 1 and dp["errors"]["n_failed"] == 0
    assert dp["errors"]["failed_images"]["count"] is None  # no failed image: no share


def test_error_summary_shares_and_failure_table():
    from research.toy.judge import classify_errors

    red, blue, green = ObjectSpec("circle", "red"), ObjectSpec("square", "blue"), ObjectSpec("star", "green")
    cases = [  # (expected, seen) of 4 images of one method
        ([red, blue], [red, blue]),  # correct
        ([red, blue], [ObjectSpec("circle", "blue"), ObjectSpec("square", "red")]),  # swap: binding only
        ([red, blue, green], [red, ObjectSpec("square", "green"), green, green]),  # leak + an extra object
        ([red, blue, green], [red, blue]),  # green star missing
    ]
    records = []
    for p, (expected, seen) in enumerate(cases):
        scored = binding.score_seen(expected, seen)
        records.append({"prompt_index": p, "seed": 0, "n_objects": len(expected), "method": "sdxl", **scored})
        assert scored["errors"] == classify_errors(expected, seen)
    e = binding.error_summary(records)
    assert e["n_images"] == 4 and e["n_failed"] == 3 and e["n_objects"] == 10
    assert e["images"]["failed"] == pytest.approx(3 / 4) and e["images"]["binding_only"] == pytest.approx(1 / 4)
    assert e["images"]["attributes_only"] == pytest.approx(1 / 4)  # the swap; the others miscount or miss a shape
    assert e["failed_images"]["count"] == pytest.approx(2 / 3) and e["failed_images"]["extra"] == pytest.approx(1 / 3)
    assert e["failed_images"]["colour_leak"] == pytest.approx(2 / 3)
    assert e["failed_images"]["shape_missing"] == pytest.approx(1 / 3)
    assert e["objects"]["not_found"] == pytest.approx(4 / 10) and e["objects"]["colour_leak"] == pytest.approx(3 / 10)
    assert e["objects"]["shape_missing"] == pytest.approx(1 / 10) and e["objects"]["colour_other"] == 0.0
    summary = binding.binding_summary(records)
    assert summary["errors"] == e and summary["image_accuracy"] == pytest.approx(1 - e["images"]["failed"])
    assert (
        summary["by_objects"]["2"]["errors"]["n_failed"] == 1 and summary["by_objects"]["3"]["errors"]["n_failed"] == 2
    )
    # records without errors (older runs) are left out; no image: shares are None
    empty = binding.error_summary([{"found": [True], "image_correct": True}])
    assert empty["n_images"] == 0 and empty["images"]["failed"] is None and empty["failed_images"]["count"] is None
    lines = binding.failure_table({"sdxl": summary, "detailpp": {"errors": empty}})
    assert (
        "| plain sampling (SDXL pipeline) | 3/4 | 66.7 (33.3 / 33.3) | 33.3 | 66.7 | 0.0 | 0.0 | 0.0 | 33.3 | 33.3 |"
        in lines
    )
    assert lines[-1].startswith("| Detail++") and lines[-1].count("| - ") >= 7


def test_benchmark_end_to_end_on_two_prompts(tmp_path):
    settings = binding.BindingSettings(
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
    table = (tmp_path / "table.md").read_text()
    assert (tmp_path / "grid.png").is_file() and "| method |" in table and "Failure kinds" in table
    # the failure kinds, from the same judged images
    recs = binding.read_records(tmp_path / "work")
    for name, m in data["methods"].items():
        assert sum(v["errors"]["n_images"] for v in m["by_objects"].values()) == m["errors"]["n_images"] == 2
        for v in [m, *m["by_objects"].values()]:  # overall and per 2-/3-object prompts
            e = v["errors"]
            assert (
                e["n_images"] == v["n_images"] and e["n_objects"] == v["n_objects"] and e["n_failed"] <= e["n_images"]
            )
            shares = [*e["images"].values(), *e["objects"].values(), *e["failed_images"].values()]
            assert all(x is None or 0.0 <= x <= 1.0 for x in shares)
            assert e["images"]["binding_only"] <= e["images"]["failed"]
            assert e["images"]["failed"] == pytest.approx(1 - v["image_accuracy"])
            assert e["objects"]["not_found"] == pytest.approx(1 - v["object_accuracy"])
        mine = [r for r in recs if r["method"] == name]
        assert m["errors"]["n_failed"] == sum(not r["image_correct"] for r in mine)
        for r in mine:
            e = r["errors"]
            assert e["failed"] == (not r["image_correct"]) and e["not_found"] == r["found"].count(False)
            assert e["count"] == (r["n_seen"] != r["n_objects"])
    assert res["n_prompts"] == 2
    # one generator per image: the same seed for every method of an item
    recs = binding.read_records(tmp_path / "work")
    seeds = {(r["prompt_index"], r["seed"]): set() for r in recs}
    for r in recs:
        seeds[(r["prompt_index"], r["seed"])].add(r["image_seed"])
    assert all(len(v) == 1 for v in seeds.values())
    assert held_out_prompts(2)[0].prompt  # the prompts are the held-out list's prefix


def test_validation_prompts_are_disjoint_from_the_test_prompts_and_deterministic():
    val = binding.validation_prompts(60)
    test = {s.prompt for s in held_out_prompts(binding.TEST_POOL, 0)}
    assert len(val) == 60 and len({s.prompt for s in val}) == 60
    assert not test & {s.prompt for s in val}
    assert [s.prompt for s in binding.validation_prompts(60)] == [s.prompt for s in val]
    assert [s.prompt for s in binding.validation_prompts(7)] == [s.prompt for s in val[:7]]  # a prefix
    assert binding.split_prompts(3, "test") == held_out_prompts(3, 0)
    assert binding.split_prompts(3, "validation") == val[:3]
    with pytest.raises(ValueError, match="split"):
        binding.split_prompts(3, "train")


def test_detail_config_overlay_is_checked_for_every_method():
    from detailpp.bench import BenchError

    assert binding.method_fields("pdi", {"nursing": True, "mask_threshold": 0.3}) == {
        "nursing": False,
        "mask_threshold": 0.3,
    }
    assert binding.method_fields("sdxl", {"mask_threshold": 0.3}) is None
    with pytest.raises(BenchError, match="'tau'"):
        binding.check_detail_config({"tau": 0.3}, ["detailpp"])
    binding.check_detail_config({"nursing_thresholds": []}, ["sdxl", "pdi"])  # pdi does not nurse
    with pytest.raises(BenchError, match="'detailpp'.*nursing_thresholds"):
        binding.check_detail_config({"nursing_thresholds": []}, ["pdi", "detailpp"])
    # the model's recommended settings count too (run_item lays them under the overlay)
    with pytest.raises(BenchError, match="'detailpp'.*nursing_thresholds"):
        binding.check_detail_config({}, ["detailpp"], model_defaults={"nursing_thresholds": []})
    binding.check_detail_config(
        {"nursing_thresholds": [20.0]}, ["detailpp"], model_defaults={"nursing_thresholds": []}
    )


def _toy_cli(tmp_path, *argv):
    from research.toy.bench import main

    common = ["--model", "tiny-random", "--device", "cpu", "--seeds", "1", "--steps", "2", "--height", "128"]
    common += ["--width", "128", "--judge-scenes", "0", "--work-dir", str(tmp_path / "work")]
    return main([*common, "--results", str(tmp_path / "results.json"), *argv])


def test_toy_cli_validation_split_plans_file_and_detail_config(tmp_path, capsys):
    plans = tmp_path / "plans.json"
    assert (
        _toy_cli(tmp_path, "--prompts", "2", "--split", "validation", "--plans", "scene", "--write-plans", str(plans))
        == 0
    )
    assert list(json.loads(plans.read_text())) == [s.prompt for s in binding.validation_prompts(2)]
    # a plans file of the validation split does not serve the test split: a clear error, before any image
    assert _toy_cli(tmp_path, "--prompts", "1", "--plans", str(plans)) == 2
    err = capsys.readouterr().err
    assert str(plans) in err and "--write-plans" in err and "--split test" in err
    assert not (tmp_path / "work").exists()
    # an unknown DetailConfig field: a clear error naming it, before any image
    assert _toy_cli(tmp_path, "--prompts", "1", "--plans", "scene", "--detail-config", '{"tau": 0.3}') == 2
    assert "'tau'" in capsys.readouterr().err and not (tmp_path / "work").exists()

    overlay = {"nursing": True, "nursing_max_iterations_early": 1, "nursing_max_iterations_late": 1}
    argv = ["--prompts", "1", "--split", "validation", "--plans", str(plans), "--methods", "pdi,detailpp"]
    assert _toy_cli(tmp_path, *argv, "--detail-config", json.dumps(overlay)) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["complete"] and data["n_prompts"] == 1
    settings = data["settings"]
    assert settings["split"] == "validation" and settings["detail_config"] == overlay
    assert settings["prompt_seed"] == 1 and settings["plans"] == "file"
    recs = {r["method"]: r for r in binding.read_records(tmp_path / "work")}
    assert recs["pdi"]["nursing"] == []  # the method's own nursing=False wins over the overlay
    assert recs["detailpp"]["nursing"] and all(n["updates"] <= 1 for n in recs["detailpp"]["nursing"])


def test_forced_layout_script_forces_every_branch_onto_branch_zero(tmp_path):
    """research/toy/forced_layout.py: forcing every step with ALM and nursing off leaves the last branch equal to
    branch 0, i.e. plain SDXL sampling; and the script runs end to end."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    from detailpp import DetailConfig
    from detailpp.models.tiny import build_tiny_pipeline
    from research.toy import forced_layout as module

    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, height=64, width=64, output_type="np")
    prompt = "a red circle next to a blue square"
    plain = StableDiffusionXLPipeline.__call__(pipe, prompt, generator=torch.Generator().manual_seed(1), **kw).images
    config = DetailConfig(nursing=False, latent_modification=False)
    forced = pipe(
        prompt,
        detail_config=config,
        callback_on_step_end=module.forcing(3),
        generator=torch.Generator().manual_seed(1),
        **kw,
    ).images
    free = pipe(prompt, detail_config=config, generator=torch.Generator().manual_seed(1), **kw).images
    np.testing.assert_allclose(forced, plain, atol=1e-3)  # (batched vs single-row kernels: float noise only)
    assert np.abs(free - plain).max() > 1e-2
    res = module.main(
        [
            "--model",
            "tiny-random",
            "--prompts",
            "1",
            "--steps",
            "2",
            "--force-steps",
            "1",
            "--out",
            str(tmp_path / "forced.json"),
        ]
    )
    assert set(res["image_accuracy"]) == {"sdxl", "detailpp", "detailpp_forced1", "no_alm_forced1"}


def test_toy_cli_forced_layout_diagnostics(tmp_path, capsys):
    """--force-layout-steps adds Detail++ with the branches forced onto branch 0 and its ALM-off control to the
    diagnostic items; --diagnostic-settings picks the others; both checked before any image."""
    argv = ["--prompts", "1", "--plans", "scene", "--methods", "sdxl,detailpp", "--diagnostic-prompts", "1"]
    assert _toy_cli(tmp_path, *argv, "--diagnostic-settings", "pdi_no_share", "--force-layout-steps", "1") == 0
    data = json.loads((tmp_path / "results.json").read_text())
    diag = data["diagnostics"]
    assert {"pdi_no_share", "detailpp_forced1", "no_alm_forced1"} <= set(diag)
    assert "detailpp_share_both" not in diag
    assert data["settings"]["diagnostic_settings"]["detailpp_forced1"] == {"force_layout_steps": 1}
    assert data["settings"]["diagnostic_settings"]["no_alm_forced1"] == {
        "latent_modification": False,
        "force_layout_steps": 1,
    }
    recs = {r["method"]: r for r in binding.read_records(tmp_path / "work")}
    assert "branches" in recs["no_alm_forced1"] and "errors" in recs["detailpp_forced1"]
    assert "forced onto branch 0 for 1 step" in capsys.readouterr().out
    for bad, message in ((["--force-layout-steps", "3"], "1..--steps"), (["--diagnostic-settings", "x"], "'x'")):
        assert _toy_cli(tmp_path / "bad", *argv, *bad) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "bad" / "work").exists()


def test_force_layout_puts_branch_zero_into_every_branch_for_k_steps():
    import torch

    latents = torch.arange(12.0).view(3, 4)
    cb = binding.force_layout(2)
    forced = cb(None, 1, None, {"latents": latents})["latents"]
    assert torch.equal(forced, latents[:1].expand(3, 4)) and not torch.equal(latents, forced)  # input untouched
    assert cb(None, 2, None, {"latents": latents})["latents"] is latents
    assert binding.forced_steps("detailpp_forced12") == 12 and binding.forced_steps("detailpp") == 0
    assert binding.method_fields("no_alm_forced3", {"tau": 1}) == {"tau": 1, "latent_modification": False}
