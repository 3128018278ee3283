"""Nothing left behind by a failure: a run that fails before its first image leaves no ``run.json`` (nor plans, nor
a folder it made), a scoring run whose scorer cannot load leaves no scorer settings, so the next run with other
settings is not refused; a refusal to resume names every setting that differs; the report names the generation
model and the scorer of every metric."""

from __future__ import annotations

import json

import pytest

from detailpp.bench import BenchError
from detailpp.bench.generation import run_generation
from detailpp.bench.manifest import check_or_write_json
from detailpp.bench.metrics import Metric
from detailpp.bench.scoring import run_scoring
from detailpp.cli import main
from tests.bench.fakes import SUITE, CountingScorer, fake_generate, identity


def cannot_load():
    raise OSError("the model cannot be loaded")


def test_a_run_that_fails_before_its_first_image_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(OSError, match="cannot be loaded"):
        run_generation(out, SUITE, identity(), fake_generate, progress=False, prepare=cannot_load)
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(OSError):
        run_generation(existing, SUITE, identity(), fake_generate, progress=False, prepare=cannot_load)
    assert list(existing.iterdir()) == []  # a folder the user made stays, empty
    summary = run_generation(out, SUITE, identity(steps=7), fake_generate, progress=False)  # other settings: fine
    assert summary.complete and json.loads((out / "run.json").read_text())["settings"]["steps"] == 7


def test_the_command_line_after_a_model_that_did_not_load(tmp_path, capsys):
    """bench generate with a model that fails to load, then another model into the same folder: it runs."""
    out = tmp_path / "run"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    argv = ["bench", "generate", "--prompt-file", str(tmp_path / "p.txt"), "--output-dir", str(out), "-q"]
    (tmp_path / "p.txt").write_text("a red circle\n")
    fast = ["--steps", "1", "--height", "64", "--width", "64", "--images-per-prompt", "1", "--method", "sdxl"]
    assert main([*argv, *fast, "--model", str(broken)]) == 2
    assert "Cannot load the model" in capsys.readouterr().err and not out.exists()
    assert main([*argv, *fast, "--model", "tiny-random"]) == 0
    assert json.loads((out / "run.json").read_text())["model"] == "tiny-random"


def test_a_scorer_that_cannot_load_leaves_no_settings(tmp_path):
    out = tmp_path / "run"
    run_generation(out, SUITE, identity(), fake_generate, progress=False)
    broken = Metric("fake-metric", {"model": "broken/scorer"}, cannot_load)
    with pytest.raises(OSError):
        run_scoring(out, broken, progress=False)
    assert not (out / "scores" / "fake-metric.config.json").exists()
    working = Metric("fake-metric", {"model": "other/scorer"}, CountingScorer)
    summary = run_scoring(out, working, progress=False)  # other settings: not refused
    assert summary.complete
    assert json.loads((out / "scores" / "fake-metric.config.json").read_text()) == {"model": "other/scorer"}
    with pytest.raises(BenchError) as e:  # and now those settings are the folder's
        run_scoring(out, Metric("fake-metric", {"model": "third/scorer"}, CountingScorer), progress=False)
    assert "(model: 'other/scorer' there, 'third/scorer' now)" in str(e.value)
    rescored = run_scoring(out, Metric("fake-metric", {"model": "third/scorer"}, CountingScorer), progress=False,
                           rescore=True)  # fmt: skip
    assert rescored.made == rescored.total


def test_a_refusal_to_resume_names_every_setting_that_differs(tmp_path):
    there = {"model": "a", "settings": {"steps": 20, "height": 1024, "dtype": None}, "detail_config": {"tau": 0.5}}
    check_or_write_json(tmp_path / "run.json", there, "images", "Use another folder.")
    now = {"model": "a", "settings": {"steps": 50, "height": 768, "dtype": None}, "detail_config": {"tau": 0.5}}
    with pytest.raises(BenchError) as e:
        check_or_write_json(tmp_path / "run.json", now, "images", "Use another folder.")
    assert str(e.value) == (
        f"{tmp_path} holds images made with other settings (settings.height: 1024 there, 768 now; settings.steps: "
        "20 there, 50 now). Use another folder."
    )


def test_the_report_names_the_generation_model_and_the_scorer(tmp_path):
    from detailpp.bench.report import write_report

    out = tmp_path / "run"
    run_generation(out, SUITE, identity(), fake_generate, progress=False)
    run_scoring(out, Metric("blip-vqa", {"model": "Salesforce/blip-vqa-base"}, CountingScorer), progress=False)
    paths = write_report([out], tmp_path / "report")
    markdown = paths["markdown"].read_text()
    assert f"- fake, custom ({out}): fake on `fake-model`; BLIP-VQA by `Salesforce/blip-vqa-base`" in markdown
    runs = json.loads(paths["json"].read_text())["runs"]
    assert runs == [
        {"folder": str(out), "label": "fake", "suite": "custom", "method": "fake", "model": "fake-model"}
        | {"scorers": {"blip-vqa": "Salesforce/blip-vqa-base"}}
    ]
