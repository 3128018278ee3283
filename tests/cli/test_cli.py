"""The command line's conventions and its answers to bad input: one clear line, checked before the model loads."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import detailpp
from detailpp.atomic import atomic_write_bytes
from detailpp.cli import build_parser, main
from detailpp.cli.common import native_size, scheduler_name, slug
from detailpp.images import mask_overlay, read_png_text
from tests.paths import REPO

FAST = ["--model", "tiny-random", "--steps", "1", "--height", "64", "--width", "64", "--quiet"]
ROOT = REPO


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "detailpp", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


@pytest.fixture
def no_load(monkeypatch):
    """The model must not be loaded: every check runs before."""
    import detailpp.models.loading

    monkeypatch.setattr(detailpp.models.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))


# --- conventions -----------------------------------------------------------------------------------------------------
def test_version_and_bare_command_print_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"detailpp {detailpp.__version__}\n"
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: detailpp") and "generate" in out and "decompose" in out


def test_python_dash_m_detailpp(tmp_path):
    proc = run_cli("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == f"detailpp {detailpp.__version__}\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["-v", "generate", "x"],
        ["generate", "x", "-v"],
        ["generate", "x", "--verbose"],
        ["bench", "generate", "--suite", "scb", "--output-dir", "o", "-v"],
    ],
)
def test_verbose_before_or_after_the_subcommand(argv):
    args = build_parser().parse_args(argv)
    assert args.verbose is True and args.quiet is False


@pytest.mark.parametrize(
    "argv",
    [
        ["-q", "generate", "x"],
        ["generate", "x", "--quiet"],
        ["demo", "-q"],
        ["bench", "score", "d", "--quiet"],
        ["bench", "generate", "--suite", "scb", "--out", "o", "--no-progress"],  # the old spellings still work
    ],
)
def test_quiet_before_or_after_the_subcommand(argv):
    args = build_parser().parse_args(argv)
    assert args.quiet is True and args.verbose is False


def test_old_flag_spellings_are_hidden_aliases(capsys, tmp_path):
    parser = build_parser()
    new = parser.parse_args(["bench", "generate", "--suite", "scb", "--output-dir", "runs/a"])
    old = parser.parse_args(["bench", "generate", "--suite", "scb", "--out", "runs/a"])
    assert new.output_dir == old.output_dir == Path("runs/a") and old._deprecated == [
        "--out is deprecated; use --output-dir."
    ]
    assert parser.parse_args(["bench", "plans", "--suite", "scb", "--out", "p.jsonl"]).output == Path("p.jsonl")
    assert parser.parse_args(["bench", "report", "a", "--out", "r"]).output_dir == Path("r")
    assert parser.parse_args(["demo", "--size", "512"]).size == 512
    for argv in (["bench", "generate", "--help"], ["bench", "report", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "--out " not in text and "--no-progress" not in text and "--size" not in text
        assert "--quiet" in text and "--verbose" in text
        assert ("--output-dir" in text) == (argv[0] == "bench")
    assert "--width" in text and "--height" in text  # the demo's help


def _parsers(parser: argparse.ArgumentParser, name: str = "detailpp"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_help_shows_defaults_and_has_no_backticks():
    parsers = list(_parsers(build_parser()))
    assert len(parsers) == 10  # detailpp, its 4 commands, bench's 5 actions (toy: research/tests)
    for name, parser in parsers:
        text = parser.format_help()
        assert "`" not in text, name
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or action.nargs == 0:
                continue
            if action.default is None or action.dest in ("help", "version"):
                continue
            expanded = formatter._expand_help(action)
            assert "default" in expanded.lower(), (name, action.option_strings, expanded)


def test_bench_generate_help_lists_toy(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "generate", "--help"])
    assert "toy (the embedded model)" in " ".join(capsys.readouterr().out.split())  # (argparse wraps lines)


def test_native_sizes():
    assert native_size("toy") == 128 and native_size("tiny-random") == 256
    assert native_size("stabilityai/stable-diffusion-xl-base-1.0") == 1024


def test_native_size_of_a_hub_id_is_read_from_its_unet_and_vae_configs(tmp_path, monkeypatch):
    import json

    import huggingface_hub

    configs = {"unet/config.json": {"sample_size": 96}, "vae/config.json": {"block_out_channels": [1, 2, 3, 4]}}
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        path = tmp_path / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(configs[filename]))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert native_size("someone/sd-2-1-like") == 768  # 96 latents x VAE factor 8
    assert asked == [("someone/sd-2-1-like", "unet/config.json"), ("someone/sd-2-1-like", "vae/config.json")]


def test_bench_generate_defaults_to_the_models_native_size(tmp_path):
    out = tmp_path / "run"
    argv = ["bench", "generate", "--suite", "t2i-color", "--model", "tiny-random", "--max-prompts", "1"]
    argv += ["--images-per-prompt", "1", "--steps", "1", "--method", "sdxl", "--device", "cpu", "-q"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["settings"]["height"], run["settings"]["width"]) == (256, 256)
    assert run["settings"]["guidance_scale"] == 7.5
    (image,) = (out / "samples").glob("*.png")
    assert PIL.Image.open(image).size == (256, 256)


def test_scheduler_names_and_a1111_sampler(tmp_path):
    assert scheduler_name("DPM++ 2M Karras") == scheduler_name("dpm++_2m_karras") == "dpm++-2m-karras"
    assert scheduler_name("Euler a") == scheduler_name("euler_ancestral") == "euler-a"
    assert main(["generate", "a red circle", *FAST, "--output-dir", str(tmp_path)]) == 0
    assert main(["generate", "a red circle", *FAST, "--output-dir", str(tmp_path), "--scheduler", "Euler a"]) == 0
    assert (
        main(["generate", "a red circle", *FAST, "--output-dir", str(tmp_path), "--scheduler", "dpm++ 2m karras"]) == 0
    )
    expected = [
        ("EulerDiscreteScheduler", "Euler"),
        ("EulerAncestralDiscreteScheduler", "Euler a"),
        ("DPMSolverMultistepScheduler", "DPM++ 2M Karras"),
    ]
    for number, (cls_name, sampler) in enumerate(expected):
        stem = tmp_path / f"{number:05d}-0-a-red-circle"
        sidecar = json.loads(stem.with_suffix(".json").read_text())
        assert sidecar["scheduler"] == cls_name and sidecar["sampler"] == sampler
        assert f", Sampler: {sampler}, CFG scale: 5.0," in read_png_text(f"{stem}.png")["parameters"]


def test_seed_minus_one_is_random_and_recorded(tmp_path, capsys):
    assert main(["generate", "a red circle", *FAST, "--seed", "-1", "--output-dir", str(tmp_path)]) == 0
    (image,) = tmp_path.glob("*.png")
    match = re.fullmatch(r"00000-(\d+)-a-red-circle\.png", image.name)
    assert match, image.name
    seed = int(match.group(1))
    assert f"Seed: {seed}," in read_png_text(image)["parameters"]
    assert json.loads(image.with_suffix(".json").read_text())["seed"] == seed


def test_demo_prompt_box_parses_on_enter(tiny_pipe):
    """Gradio submits a one-line textbox on Enter (a multi-line one inserts a newline); submit runs the parser."""
    from detailpp.demo import build_demo

    demo = build_demo(tiny_pipe, model_name="tiny-random", initial_prompt="", default_steps=1)
    (prompt,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "detailpp-prompt"]
    assert prompt.lines == 1
    submits = [fn.name for fn in demo.fns.values() if (prompt._id, "submit") in [tuple(t) for t in fn.targets]]
    assert submits == ["on_parse"]


# --- outputs and files -----------------------------------------------------------------------------------------------
def test_no_output_is_ever_overwritten(tmp_path, capsys):
    argv = ["generate", "a red circle and a blue square", *FAST, "--output-dir", str(tmp_path), "--save-masks"]
    assert main(argv) == 0
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(first) == [
        "00000-0-a-red-circle-and-a-blue-square-mask-0-circle.png",
        "00000-0-a-red-circle-and-a-blue-square-mask-1-square.png",
        "00000-0-a-red-circle-and-a-blue-square.json",
        "00000-0-a-red-circle-and-a-blue-square.png",
    ]
    assert main([*argv, "--tau", "0.3"]) == 0  # the same prompt and seed: a new number, the old files untouched
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in first} == first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in first) == [
        "00001-0-a-red-circle-and-a-blue-square-mask-0-circle.png",
        "00001-0-a-red-circle-and-a-blue-square-mask-1-square.png",
        "00001-0-a-red-circle-and-a-blue-square.json",
        "00001-0-a-red-circle-and-a-blue-square.png",
    ]
    # two non-Latin prompts no longer share "image-0.png"
    assert main(["generate", "一只红色的猫", *FAST, "--output-dir", str(tmp_path)]) == 0
    assert main(["generate", "красный круг", *FAST, "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "00002-0-一只红色的猫.png").is_file() and (tmp_path / "00003-0-красный-круг.png").is_file()
    assert slug("!!!") == "image" and slug("A Red_Circle, 2") == "a-red-circle-2"


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        assert main(["generate", "a red circle", *FAST, "--output-dir", str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == mode
    for path in (tmp_path / "out").iterdir():
        assert path.stat().st_mode & 0o777 == mode, path.name


def test_bench_manifest_has_the_mode_of_its_parts(tmp_path):
    from detailpp.bench.generation import run_generation, run_identity
    from detailpp.bench.suites import load_suite

    suite = load_suite("t2i-color", None)
    old = os.umask(0o022)
    try:
        identity = run_identity(suite, "sdxl", "fake", {"steps": 1}, 1)
        run_generation(
            tmp_path, suite, identity, lambda p, s: PIL.Image.new("RGB", (8, 8)), max_prompts=2, progress=False
        )
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.glob("*.json*")}
    assert "manifest.jsonl" in modes and set(modes.values()) == {0o644}, modes


def test_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    import detailpp.atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(detailpp.atomic.os, "fsync", full)
    out = tmp_path / "out"
    assert main(["generate", "a red circle", *FAST, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"detailpp generate: error: The disk is full: cannot write {out / '00000-0-a-red-circle.png'}. "
        "Free some space or choose another --output-dir.\n"
    )
    assert list(tmp_path.iterdir()) == []  # no temporary file, and no empty folder


def test_mask_outline_is_visible_over_the_same_colour():
    red = PIL.Image.new("RGB", (64, 64), (255, 32, 32))
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 2:6] = True  # pixels 16..47 of the image
    plain = np.asarray(mask_overlay(red, mask, outline=0))
    assert (plain == (255, 32, 32)).all()  # a red tint over a red object: invisible without the outline
    out = np.asarray(mask_overlay(red, mask))
    assert (out[16, 16:48] == 255).all() and (out[31, 16] == 255).all()  # white just inside the edge
    assert (out[15, 15:49] == 0).all() and (out[31, 15] == 0).all()  # black just outside it
    assert (out[31, 31] == (255, 32, 32)).all() and (out[2, 2] == (255, 32, 32)).all()


def test_the_sidecar_is_valid_json_whatever_a_number_became():
    from detailpp.images import dumps

    text = dumps({"nursing": [{"losses": [0.5, float("nan")]}], "guidance_scale": float("inf")})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "nursing": [{"losses": [0.5, None]}],
        "guidance_scale": None,
    }


def test_branch_grid_captions_keep_their_spaces():
    """At the grid's small font the default space is 2 px ("next toa square"): words stand at least 0.4 font sizes
    apart, and every line fits its image."""
    from detailpp.images import captioned_grid

    grid = captioned_grid([PIL.Image.new("RGB", (128, 128), "white")], ["to a to a to a"])
    ink = (np.asarray(grid.convert("L"))[128:, :] < 128).any(axis=0)
    gaps = np.diff(np.flatnonzero(ink)) - 1
    assert sorted(gaps[gaps > 0]) == [4, 4, 4, 5, 5]  # the five spaces between the six words, 4-5 px each
    long = captioned_grid([PIL.Image.new("RGB", (128, 128), "white")] * 2, ["p0: a red circle next to a striped blue "
                          "square in a field", "x"])  # fmt: skip
    first = np.asarray(long.convert("L"))[128:, :128] < 128
    assert first[:, -3:].sum() == 0 and (np.asarray(long.convert("L"))[128:, 128:132] < 128).sum() == 0


def test_saved_masks_are_outlined(tmp_path, capsys):
    assert (
        main(["generate", "a red circle and a blue square", *FAST, "--output-dir", str(tmp_path), "--save-masks"]) == 0
    )
    image = np.asarray(PIL.Image.open(tmp_path / "00000-0-a-red-circle-and-a-blue-square.png").convert("RGB"))
    overlay = np.asarray(
        PIL.Image.open(tmp_path / "00000-0-a-red-circle-and-a-blue-square-mask-0-circle.png").convert("RGB")
    )
    edge = (overlay == 0).all(-1) | (overlay == 255).all(-1)
    assert edge.any() and ((overlay != image).any(-1) >= edge).all()


# --- errors: one clear line, exit code 2, before the model loads, no folder left ------------------------------------
BAD = [
    (["--device", "tpu9"], "--device 'tpu9' is not a device name; use cpu, cuda, cuda:1, mps... or leave it out"),
    (["--seed", "99999999999999999999999"], "--seed must lie in 0..18446744073709551615 (or -1 for a random seed)"),
    (["--seed", "-2"], "--seed must lie in 0..18446744073709551615 (or -1 for a random seed), got -2."),
    (["--width", "100"], "--width must be a multiple of 8 in 8..4096, got 100."),
    (["--width", "100000"], "--width must be a multiple of 8 in 8..4096, got 100000."),
    (["--steps", "100000"], "--steps must be a whole number in 1..1000, got 100000."),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number >= 0, got nan."),
    (["--guidance-scale", "inf"], "--guidance-scale must be a finite number >= 0, got inf."),
    (["--tau", "nan"], "--tau must be a finite number, got nan."),
    (["--model", "nobody/nothing"], "--model nobody/nothing: not in the Hugging Face cache, and HF_HUB_OFFLINE=1"),
    (["--model", "./no-folder"], "--model './no-folder': no such folder or file, and no Hub id"),
    (["--scheduler", "warp"], "argument --scheduler: invalid choice: 'warp'"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
]
if not torch.cuda.is_available():
    BAD.append((["--device", "cuda"], "--device cuda: this machine has no usable CUDA GPU"))


@pytest.mark.parametrize(("flags", "message"), BAD)
def test_bad_input_is_refused_before_loading(flags, message, tmp_path, capsys, monkeypatch, no_load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "new-folder"
    try:
        code = main(["generate", "a red circle", "--model", "tiny-random", *flags, "--output-dir", str(out)])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()  # an error leaves no empty output folder


def test_float16_on_the_cpu_falls_back_to_float32(tmp_path, caplog, capsys):
    assert (
        main(
            ["generate", "a red circle", *FAST, "--dtype", "float16", "--device", "cpu", "--output-dir", str(tmp_path)]
        )
        == 0
    )
    assert "--dtype float16 is not supported on the CPU" in caplog.text and "using float32" in caplog.text
    assert json.loads((tmp_path / "00000-0-a-red-circle.json").read_text())["dtype"] == "float32"


def test_a_plan_is_checked_before_loading(tmp_path, capsys, no_load):
    path = tmp_path / "plan.json"
    path.write_text(
        json.dumps({"prompt": "a dog", "base": "a dog", "branches": [{"prompt": "a red cat", "subject": "cat"}]})
    )
    assert main(["generate", "--plan", str(path), *FAST, "--output-dir", str(tmp_path / "o")]) == 2
    assert "'cat' does not occur in the prompt" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_prompt_past_the_token_window_is_one_line(tmp_path):
    """A 338-word prompt: one line (no truncation warnings, no torchvision notices), before the model loads."""
    words = ("a red circle next to a blue square on a green field under a yellow star " * 23).split()[:338]
    proc = run_cli("generate", " ".join(words), "--model", "tiny-random", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("detailpp generate: error: The prompt is 338 CLIP tokens long; the text encoders ")
    assert proc.stderr.count("\n") == 1 and "Shorten it." in proc.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "tpu9"], "--device 'tpu9' is not a device name"),
        (["--base-seed", "99999999999999999999999"], "--base-seed must lie in 0..18446744073709551615"),
        (["--base-seed", str(2**64 - 2), "--images-per-prompt", "3"], "--base-seed + --images-per-prompt - 1 must"),
        (["--width", "0"], "--width must be a multiple of 8 in 8..4096, got 0."),
        (["--steps", "100000"], "--steps must be a whole number in 1..1000, got 100000."),
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number >= 0, got nan."),
    ],
)
def test_bench_generate_bad_input_before_loading(flags, message, tmp_path, capsys, no_load):
    out = tmp_path / "run"
    argv = ["bench", "generate", "--suite", "t2i-color", "--model", "tiny-random", "--output-dir", str(out)]
    assert main([*argv, *flags]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_bench_score_checks_the_device(tmp_path, capsys):
    (tmp_path / "run.json").write_text("{}")
    assert main(["bench", "score", str(tmp_path), "--device", "tpu9"]) == 2
    assert "--device 'tpu9' is not a device name" in capsys.readouterr().err


def test_run_json_resume_names_only_what_changed(tmp_path):
    from detailpp.bench import BenchError
    from detailpp.bench.manifest import check_or_write_json

    content = {"steps": 2, "detail_config": {"layers": (1, 2), "tau": 0.5}}
    check_or_write_json(tmp_path / "run.json", content, "images", "Use another folder.")
    check_or_write_json(tmp_path / "run.json", content, "images", "Use another folder.")  # the same: resumes
    with pytest.raises(BenchError) as e:
        check_or_write_json(tmp_path / "run.json", {**content, "steps": 3}, "images", "Use another folder.")
    assert (
        str(e.value)
        == f"{tmp_path} holds images made with other settings (steps: 2 there, 3 now). Use another folder."
    )


# --- set-up ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "torch_args"),
    [
        ({}, "-m pip install -q torch==2.13.0"),
        (
            {"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu"},
            "-m pip install -q --index-url https://download.pytorch.org/whl/cpu torch==2.13.0",
        ),
    ],
)
def test_setup_script_torch_index(tmp_path, env, torch_args):
    """scripts/setup.sh installs torch from the default index, or from TORCH_INDEX_URL when it is set."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_bytes((ROOT / "scripts" / "setup.sh").read_bytes())
    fake = tmp_path / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho "$*" >> "$(dirname "$0")/calls"\n')
    fake.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k != "TORCH_INDEX_URL"}
    subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, env={**clean, **env}, check=True, timeout=60)
    calls = (fake.parent / "calls").read_text().splitlines()
    assert calls == ["-m pip install -q --upgrade pip", torch_args, "-m pip install -q -e .[test,bench,demo]"]


@pytest.mark.parametrize("command", [["generate"], ["demo"], ["bench", "generate"]])
def test_every_command_lists_every_builtin_model(capsys, command):
    from detailpp.models.families import BUILTIN_MODELS

    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # (argparse wraps at hyphens)
    assert all(name in text for name in BUILTIN_MODELS), [n for n in BUILTIN_MODELS if n not in text]
    assert "bf16" in text  # the dtype aliases, in every command
