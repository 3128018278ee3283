"""Errors that say whose they are: a bad input is one line and exit 2; a failure inside a library is one line naming
the library and the operation, exit 1, with the way to the traceback; an interrupt says what is missing; the
libraries' notices are printed once, or not at all when they are noise."""

from __future__ import annotations

import json
import logging

import pytest

import detailpp.cli.generate
import detailpp.pipelines.base
from detailpp.cli import describe_failure, failing_library, main

FAST = ["--model", "tiny-random", "--steps", "1", "--height", "64", "--width", "64", "--quiet"]


def test_a_failure_inside_a_library_names_the_library_and_the_operation(tmp_path, capsys, caplog, monkeypatch):
    """PNDM's warm-up with one step, our up-front check switched off: diffusers' own error (numpy broadcasting)."""
    for module in (detailpp.cli.generate, detailpp.pipelines.base):
        monkeypatch.setattr(module, "check_scheduler_steps", lambda *a, **k: None)
    argv = ["generate", "a red circle", *FAST, "--scheduler", "pndm", "--output-dir", str(tmp_path / "o")]
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        "detailpp generate: error: diffusers failed while generating the image of seed 0 (ValueError: operands "
        "could not be broadcast together with shapes (2,) (8,)); run with -v for the traceback.\n"
    )
    caplog.clear()
    assert main([*argv, "-v"]) == 1  # the traceback too
    assert "Traceback (most recent call last)" in caplog.text and "scheduling_pndm.py" in caplog.text


def test_our_own_bug_is_named_as_ours():
    from detailpp.images import captioned_grid

    with pytest.raises(ValueError) as e:
        captioned_grid([], [])
    assert failing_library(e.value) == "detailpp"
    assert describe_failure(e.value, "generate") == (
        "detailpp failed while running 'detailpp generate' (a bug of detailpp: please report it) (ValueError: No "
        "image to put in a grid.); run with -v for the traceback."
    )


def test_a_malformed_model_index_names_the_file(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline",\n}', encoding="utf-8")
    assert main(["generate", "a red circle", "--model", str(folder), "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        f"detailpp generate: error: {folder / 'model_index.json'} (the model's index) is not valid JSON: Expecting "
        "property name enclosed in double quotes: line 2 column 1 (char 45). Fix the file, or give another model.\n"
    )


def test_an_interrupt_says_which_seeds_are_missing_and_how_to_make_them(tmp_path, capsys, monkeypatch):
    made = []

    def generate_one(args, pipe, call, seed, load_seconds):
        if len(made) == 2:
            raise KeyboardInterrupt
        made.append(seed)

    monkeypatch.setattr(detailpp.cli.generate, "generate_one", generate_one)
    out = tmp_path / "o"
    assert main(["generate", "a red circle", *FAST, "--seed", "5", "6", "7", "8", "--output-dir", str(out)]) == 130
    assert capsys.readouterr().err == (
        f"detailpp generate: interrupted; the images of seed(s) 5, 6 are in {out}; seed(s) 7, 8 made no image: run "
        "the same command with --seed 7 8 to make them\n"
    )


def test_a_seed_given_twice_makes_one_image(tmp_path, capsys, caplog):
    out = tmp_path / "o"
    assert main(["generate", "a red circle", *FAST, "--seed", "3", "3", "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00000-3-a-red-circle.png"]
    assert "--seed 3 is given twice; it makes one image (the same seed makes the same image)." in caplog.text


def test_library_notices_are_printed_once_or_dropped(tmp_path, caplog):
    """After a command has set up its logging: huggingface_hub's retry warnings reach stderr through the root logger
    only (its own stderr handler printed each a second time); empty or irrelevant notices are dropped."""
    assert main(["decompose", "a red circle"]) == 0  # any command: it sets the logging up
    hub = logging.getLogger("huggingface_hub")
    assert hub.propagate and not [h for h in hub.handlers if type(h) is logging.StreamHandler]
    logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    logging.getLogger("diffusers.models.modeling_utils").warning(
        "There are modules in AutoencoderKL that should be kept in float32: []. Casting directly with `to()` can..."
    )
    logging.getLogger("diffusers.loaders.peft").warning("No LoRA keys associated to CLIPTextModel found with ...")
    logging.getLogger("httpx").info("HTTP Request: HEAD https://huggingface.co/... 200 OK")
    assert [r.getMessage() for r in caplog.records if r.name != "detailpp.parsing.decompose"] == [
        "Retrying in 1s [Retry 1/5]."
    ]


def test_the_sidecar_records_the_granularity_of_the_plan_that_ran(tmp_path, capsys, caplog):
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "prompt": "a red circle and a blue square",
                "base": "a circle and a square",
                "granularity": "subject",
                "branches": [{"prompt": "a red circle and a square", "subject": "circle"}],
            }
        )
    )
    out = tmp_path / "o"
    assert main(["generate", "--plan", str(plan), *FAST, "--granularity", "attribute", "--output-dir", str(out)]) == 0
    sidecar = json.loads(next(out.glob("*.json")).read_text())
    assert sidecar["detail_config"]["granularity"] == "subject" == sidecar["plan"]["granularity"]
    assert "--granularity attribute is ignored with --plan: the plan's own granularity (subject) is used." in (
        caplog.text
    )
