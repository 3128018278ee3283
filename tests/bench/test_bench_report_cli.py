"""The report (Table 1 as Markdown + CSV, bar chart, gallery) and the `bench` command's handling of bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from detailpp.bench.generation import run_generation, run_identity
from detailpp.bench.metrics import Metric
from detailpp.bench.scoring import run_scoring
from detailpp.bench.suites import Suite
from tests.bench.fakes import SUITE, CountingScorer, fake_generate


def make_run(folder: Path, label: str, suite: Suite, metric: str, offset: float = 0.0, max_prompts=None):
    identity = run_identity(suite, label, "fake", {"steps": 1}, 2, label=label)
    run_generation(folder, suite, identity, fake_generate, progress=False, max_prompts=max_prompts)

    class Shifted(CountingScorer):
        def score(self, images, prompts):
            return [(s + offset, d) for s, d in super().score(images, prompts)]

    run_scoring(folder, Metric(metric, {"v": 1}, Shifted), progress=False)
    return folder


def test_report_renders(tmp_path):
    from detailpp.cli import main

    color = Suite("t2i-color", SUITE.prompts)
    a = make_run(tmp_path / "sdxl-color", "SDXL", color, "blip-vqa")
    b = make_run(tmp_path / "dpp-color", "Detail++", color, "blip-vqa", offset=0.1, max_prompts=3)
    c = make_run(tmp_path / "dpp-ir", "Detail++", color, "image-reward", offset=-1.0)
    assert (
        main(["bench", "report", str(a), str(b), str(c), "--out", str(tmp_path / "rep"), "--paper", "--worst", "2"])
        == 0
    )
    md = (tmp_path / "rep" / "table1.md").read_text()
    header = md.splitlines()[0]
    assert header.startswith("| method | BLIP-VQA colour | BLIP-VQA texture | BLIP-VQA shape | IR colour")
    assert header.rstrip(" |").endswith("SCB")
    assert "| Detail++ (paper) | 0.7389 | 0.7241 | 0.5582 | 1.773 | 0.300 | 1.424 | 0.2687 |" in md
    assert "Detail++, BLIP-VQA colour: 6 of 8 images" in md  # a partial run is marked
    rows = list(csv.reader((tmp_path / "rep" / "table1.csv").open()))
    sdxl = dict(zip(rows[0], next(r for r in rows if r[0] == "SDXL"), strict=True))
    dpp = dict(zip(rows[0], next(r for r in rows if r[0] == "Detail++"), strict=True))
    assert sdxl["n BLIP-VQA colour"] == "8" and dpp["n BLIP-VQA colour"] == "6" and dpp["n IR colour"] == "8"
    assert float(dpp["IR colour"]) < 0 < float(sdxl["BLIP-VQA colour"])
    for png in ["table1.png", "gallery/SDXL_blip-vqa_t2i-color.png", "gallery/Detailpp_image-reward_t2i-color.png"]:
        assert (tmp_path / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "Worst-scored prompts" in (tmp_path / "rep" / "gallery.md").read_text()


def test_report_refuses_the_same_column_twice(tmp_path):
    from detailpp.bench import BenchError
    from detailpp.bench.report import write_report

    color = Suite("t2i-color", SUITE.prompts[:2])
    a = make_run(tmp_path / "a", "SDXL", color, "blip-vqa")
    b = make_run(tmp_path / "b", "SDXL", color, "blip-vqa")
    with pytest.raises(BenchError, match="Two folders give 'SDXL' scores for BLIP-VQA colour"):
        write_report([a, b], tmp_path / "rep")


def test_bad_command_inputs_give_one_line_errors(tmp_path, capsys):
    from detailpp.cli import main

    def err(args):
        assert main(args) == 2
        return capsys.readouterr().err

    assert "is not a folder" in err(["bench", "score", str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    assert "no run.json" in err(["bench", "score", str(tmp_path / "empty")])
    color = Suite("t2i-color", SUITE.prompts[:1])
    run = tmp_path / "run"
    run_generation(run, color, run_identity(color, "sdxl", "fake", {"steps": 1}, 1), fake_generate, progress=False)
    msg = err(
        [
            "bench",
            "score",
            str(run),
            "--metric",
            "blip-vqa",
            "--blip-model",
            str(tmp_path / "no" / "blip"),
            "--device",
            "cpu",
        ]
    )
    assert "BLIP-VQA model folder" in msg and "does not exist" in msg
    msg = err(["bench", "score", str(run), "--metric", "scb", "--device", "cpu"])
    assert "does not follow the SCB template" in msg
    assert "--shard-index and --num-shards" in err(["bench", "score", str(run), "--shard-index", "0"])
    assert "None of the folders has scores" in err(["bench", "report", str(run), "--out", str(tmp_path / "r")])
    assert "--detail-config applies to --method detailpp only" in err(
        [
            "bench",
            "generate",
            "--suite",
            "scb",
            "--method",
            "sdxl",
            "--out",
            str(tmp_path / "g"),
            "--detail-config",
            '{"tau": 0.5}',
        ]
    )
    assert "not valid JSON" in err(
        ["bench", "generate", "--suite", "scb", "--out", str(tmp_path / "g"), "--detail-config", "{nope"]
    )


def test_generate_on_the_tiny_random_pipeline(tmp_path):
    """The real wiring: `bench generate` on detailpp.models.loading's tiny random SDXL, both methods, then a resume."""
    from PIL import Image

    from detailpp.bench.manifest import read_jsonl
    from detailpp.cli import main

    common = [
        "--suite",
        "t2i-color",
        "--max-prompts",
        "1",
        "--images-per-prompt",
        "1",
        "--model",
        "tiny-random",
        "--steps",
        "1",
        "--height",
        "64",
        "--width",
        "64",
        "--device",
        "cpu",
        "--no-progress",
    ]
    for method in ("detailpp", "sdxl"):
        out = tmp_path / method
        assert main(["bench", "generate", "--method", method, "--out", str(out), *common]) == 0
        [record] = read_jsonl(out / "manifest.jsonl")
        assert (record["method"], record["seed"], record["prompt"]) == (method, 42, "a green bench and a blue bowl")
        assert (record["config"]["detail_config"] is None) == (method == "sdxl")
        with Image.open(out / record["file"]) as im:
            assert im.size == (64, 64)
    before = (tmp_path / "sdxl" / "manifest.jsonl").read_bytes()
    assert main(["bench", "generate", "--method", "sdxl", "--out", str(tmp_path / "sdxl"), *common]) == 0
    assert (tmp_path / "sdxl" / "manifest.jsonl").read_bytes() == before


def test_generate_compile_flag_reaches_compile_detail(tmp_path, monkeypatch, capsys):
    """`bench generate --compile` calls `pipe.compile_detail()` once per process, after loading; not without it."""
    from detailpp.cli import main
    from detailpp.pipelines.sdxl import DetailPlusPlusPipeline

    calls = []
    monkeypatch.setattr(DetailPlusPlusPipeline, "compile_detail", lambda self, *a, **k: calls.append((a, k)) or [])
    common = ["--suite", "t2i-color", "--max-prompts", "1", "--images-per-prompt", "1", "--model", "tiny-random"]
    common += ["--steps", "1", "--height", "64", "--width", "64", "--device", "cpu", "--no-progress"]
    common += ["--method", "sdxl"]
    assert main(["bench", "generate", "--out", str(tmp_path / "eager"), *common]) == 0 and calls == []
    assert main(["bench", "generate", "--out", str(tmp_path / "compiled"), *common, "--compile"]) == 0
    assert calls == [((), {})]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["bench", "generate", "--help"])
    assert "--compile" in capsys.readouterr().out
