"""Precomputed plans (`bench plans`, `bench generate --plans`: no spaCy on the GPU machine), the full-size random SDXL
(`--model sdxl-random`) and the figures of benchmarks/multi_gpu_scaling.py."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from detailpp.bench import BenchError
from detailpp.bench.manifest import read_jsonl
from detailpp.bench.plans import plans_for, read_plans, record_run_plans, write_plans
from detailpp.plan import Branch, DecompositionPlan
from tests.paths import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "multi_gpu_scaling.py"
PLAN = DecompositionPlan(
    prompt="a red car and a blue bench",
    base="a car and a bench",
    branches=(Branch("a red car and a bench", "car", ("red",), (2,)), Branch("a car and a blue bench", "bench")),
)
OTHER = DecompositionPlan(prompt="a green dog", base="a dog", branches=(Branch("a green dog", "dog", ("green",)),))


def test_sdxl_random_is_full_size_sdxl_by_name(caplog):
    torch = pytest.importorskip("torch")
    from detailpp.models.loading import load_pipeline
    from detailpp.pipelines.sdxl import DetailPlusPlusPipeline

    state = torch.random.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="detailpp.models.loading"):
        pipe = load_pipeline("sdxl-random", device="meta")  # the real builder, shapes only
    assert torch.equal(state, torch.random.get_rng_state())  # the seeded build leaves the global RNG alone
    assert isinstance(pipe, DetailPlusPlusPipeline)
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    counts = [sum(p.numel() for p in getattr(pipe, k).parameters()) for k in names]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]  # SDXL base 1.0's own counts
    assert pipe.unet.device.type == "meta" and pipe.vae.config.force_upcast
    assert pipe.config.force_zeros_for_empty_prompt and pipe.watermark is None
    assert "RANDOM weights" in caplog.text and "stand-in" in caplog.text


def test_plans_files_in_every_accepted_form(tmp_path):
    lines = tmp_path / "plans.jsonl"
    write_plans(lines, [PLAN, OTHER])
    assert read_plans(lines) == {PLAN.prompt: PLAN, OTHER.prompt: OTHER}
    array = tmp_path / "plans.json"
    array.write_text(json.dumps([PLAN.to_dict(), OTHER.to_dict()]))
    mapping = tmp_path / "by_prompt.json"
    mapping.write_text(json.dumps({PLAN.prompt: PLAN.to_dict(), OTHER.prompt: OTHER.to_dict()}))
    assert read_plans(array) == read_plans(mapping) == read_plans(lines)
    assert plans_for([OTHER.prompt], read_plans(lines), "f") == {OTHER.prompt: OTHER}
    with pytest.raises(BenchError, match="no plan for 1 of the 2 prompt"):
        plans_for([OTHER.prompt, "a cat"], read_plans(lines), "f")
    clash = tmp_path / "clash.jsonl"
    clash.write_text(PLAN.to_json() + "\n" + DecompositionPlan(PLAN.prompt, "a bench").to_json() + "\n")
    with pytest.raises(BenchError, match="two different plans"):
        read_plans(clash)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(PLAN.to_json() + "\n{oops\n")
    with pytest.raises(BenchError, match="line 2: not JSON"):
        read_plans(bad)
    with pytest.raises(BenchError, match="Cannot read the plans file"):
        read_plans(tmp_path / "none.jsonl")
    run = tmp_path / "run"
    run.mkdir()
    record_run_plans(run, {PLAN.prompt: PLAN})
    record_run_plans(run, {PLAN.prompt: PLAN, OTHER.prompt: OTHER})  # a longer run adds its prompts
    assert read_plans(run / "plans.jsonl") == {PLAN.prompt: PLAN, OTHER.prompt: OTHER}
    with pytest.raises(BenchError, match="other plans for 1 prompt"):
        record_run_plans(run, {PLAN.prompt: DecompositionPlan(PLAN.prompt, "a car and a bench")})


def test_generate_with_plans_needs_no_spacy_and_makes_the_same_images(tmp_path, monkeypatch):
    """`bench plans` on this machine, then `bench generate --plans` with spaCy made unimportable: same PNG bytes."""
    from detailpp.cli import main

    common = ["--suite", "t2i-color", "--max-prompts", "1", "--images-per-prompt", "1", "--model", "tiny-random"]
    common += ["--steps", "1", "--height", "64", "--width", "64", "--device", "cpu", "--no-progress"]
    plans = tmp_path / "plans.jsonl"
    assert main(["bench", "plans", "--suite", "t2i-color", "--max-prompts", "2", "--out", str(plans)]) == 0
    written = read_plans(plans)
    assert list(written) == ["a green bench and a blue bowl", "a blue bench and a green bowl"]
    assert [b.subject for b in written["a green bench and a blue bowl"].branches] == ["bench", "bowl"]
    assert main(["bench", "generate", "--out", str(tmp_path / "parsed"), *common]) == 0

    import detailpp.parsing.decompose

    def no_parser(*args, **kwargs):
        raise AssertionError("the parser ran although plans were given")

    monkeypatch.setitem(sys.modules, "spacy", None)  # `import spacy` now fails
    monkeypatch.setattr(detailpp.parsing.decompose, "decompose", no_parser)
    out = tmp_path / "given"
    assert main(["bench", "generate", "--out", str(out), "--plans", str(plans), *common]) == 0
    [parsed], [given] = read_jsonl(tmp_path / "parsed" / "manifest.jsonl"), read_jsonl(out / "manifest.jsonl")
    assert given["sha256"] == parsed["sha256"]
    assert given["timings"]["load_s"] > 0 and parsed["timings"]["load_s"] > 0  # the model load is timed apart
    assert json.loads((out / "run.json").read_text())["plans"] == "file"
    assert "plans" not in json.loads((tmp_path / "parsed" / "run.json").read_text())
    assert list(read_plans(out / "plans.jsonl")) == ["a green bench and a blue bowl"]

    # a resumed run with other plans, plans for another method, or plans missing a prompt: clear errors
    changed = tmp_path / "changed.jsonl"
    plan = written["a green bench and a blue bowl"]
    write_plans(changed, [DecompositionPlan(plan.prompt, plan.base, branches=plan.branches[:1])])
    with pytest.raises(BenchError, match="other plans"):
        main_raw(["bench", "generate", "--out", str(out), "--plans", str(changed), *common])
    with pytest.raises(BenchError, match="--plans applies to --method detailpp only"):
        main_raw(["bench", "generate", "--method", "sdxl", "--out", str(out), "--plans", str(plans), *common])
    with pytest.raises(BenchError, match="no plan for 1 of the 3"):
        main_raw(["bench", "generate", "--out", str(out), "--plans", str(plans), *common, "--max-prompts", "3"])


def main_raw(argv: list[str]) -> int:
    """The command without main()'s error printing: the exception itself."""
    from detailpp.cli import build_parser

    args = build_parser().parse_args(argv)
    return args._bench(args)


@pytest.fixture(scope="module")
def scaling():
    return load_script(SCRIPT)


def test_scaling_script_commands_and_figures(scaling, tmp_path):
    from PIL import Image

    a = scaling.parse_args(["--out", str(tmp_path)])
    assert (a.model, a.steps, a.size, a.prompts, a.methods) == ("sdxl-random", 50, 1024, 8, ["detailpp"])
    one, two = scaling.command(a, "detailpp", 1, tmp_path / "a"), scaling.command(a, "detailpp", 2, tmp_path / "a")
    assert one[1:4] == ["-m", "detailpp.cli", "bench"] and "--plans" in one and "--device" not in one
    assert two[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert two[6:] == one[1:]  # the same bench command under the launcher
    assert "--plans" not in scaling.command(a, "sdxl", 2, tmp_path / "c")
    dry = scaling.parse_args(["--cpu-dry-run"])
    assert (dry.model, dry.device, dry.steps, dry.size) == ("tiny-random", "cpu", 2, 64)

    def record(item, rank, gen, load=None):
        timings = {"generate_s": gen, "write_s": 0.5, **({"load_s": load} if load else {})}
        return {"item": item, "file": f"samples/{item}.png", "sha256": str(item), "timings": timings,
                "worker": {"rank": rank, "device": f"cuda:{rank}"}}  # fmt: skip

    single = [record(i, 0, 10.0 if i else 12.0, 5.0 if i == 0 else None) for i in range(4)]
    split = [record(i, i % 2, 10.0 if i > 1 else 12.0, 6.0 if i < 2 else None) for i in range(4)]
    f1, f2 = scaling.run_figures(single, wall_s=60.0), scaling.run_figures(split, wall_s=40.0)
    assert (f1["generation_s"], f1["load_s"], f1["steady_s_per_image"]) == (44.0, 5.0, 10.0)
    assert f1["images_per_min_generation"] == round(60 * 4 / 44.0, 3) and f1["images_per_min_wall"] == 4.0
    assert f2["generation_s"] == 23.0 and f2["ranks"][1]["images"] == 2 and f2["load_s"] == 6.0

    for name, value in (("one", 10), ("two", 10)):
        (tmp_path / name / "samples").mkdir(parents=True)
        for item in range(2):
            pixel = value + (3 if name == "two" and item == 1 else 0)
            Image.new("RGB", (4, 4), (pixel, 0, 0)).save(tmp_path / name / "samples" / f"{item}.png")
    c = scaling.compare_images(
        tmp_path / "one", tmp_path / "two", single[:2], [split[0], {**split[1], "sha256": "changed"}]
    )
    assert (c["compared"], c["byte_identical"], c["max_abs_pixel_diff"]) == (2, 1, 3)
    results = {"settings": {"gpus": 2}, "methods": {"detailpp": {"runs": {"1": f1, "2": f2}, "identical": c}}}
    results["methods"]["detailpp"]["scaling"] = {"generation": 1.91, "wall": 1.5}
    text = scaling.table(results)
    assert "| detailpp | 2 | 4 |" in text and "1.91x gen, 1.50x wall" in text
    assert "1 of 2 images byte-identical" in text
