"""`detailpp generate` on the tiny random model: every file, the PNG chunks, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detailpp.cli import main
from detailpp.images import read_png_text

PROMPT = "a red teddy bear wearing a green tracksuit"
FAST = ["--model", "tiny-random", "--steps", "2", "--height", "128", "--width", "128", "--quiet"]


def test_generate_writes_every_file_and_chunks_read_back(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "generate",
            PROMPT,
            *FAST,
            "--seed",
            "3",
            "4",
            "--save-branches",
            "--save-masks",
            "--output-dir",
            str(out),
            "--tau",
            "0.4",
            "--no-nursing",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    for number, seed in ((0, 3), (1, 4)):
        stem = out / f"{number:05d}-{seed}-a-red-teddy-bear-wearing-a-green-tracksuit"
        chunks = read_png_text(f"{stem}.png")
        params = chunks["parameters"].splitlines()
        assert params[0] == PROMPT
        assert f"Seed: {seed}" in params[-1] and "Steps: 2" in params[-1] and "Size: 128x128" in params[-1]
        settings = json.loads(chunks["detailpp"])
        assert settings["detail_config"]["mask_threshold"] == 0.4 and settings["detail_config"]["nursing"] is False
        assert settings["plan"]["base"] == "a teddy bear wearing a tracksuit"
        sidecar = json.loads((stem.parent / f"{stem.name}.json").read_text())
        assert sidecar["seed"] == seed and sidecar["plan"] == settings["plan"]
        assert sidecar["files"] == {
            "image": f"{stem}.png",
            "branches": f"{stem}-branches.png",
            "mask-0": f"{stem}-mask-0-teddy-bear.png",
            "mask-1": f"{stem}-mask-1-tracksuit.png",
            "sidecar": f"{stem}.json",
        }
        for path in sidecar["files"].values():
            assert os.path.getsize(path) > 0
        assert read_png_text(sidecar["files"]["mask-0"])["subject"] == "teddy bear"
        # every file written is printed: the image first, the sidecar last
        files = sidecar["files"]
        assert printed[(number * 5) : (number + 1) * 5] == [
            files["image"],
            files["branches"],
            files["mask-0"],
            files["mask-1"],
            files["sidecar"],
        ]
    assert len(printed) == 10 and len(list(out.iterdir())) == 10


def test_generate_with_a_plan_file(tmp_path):
    plan = {
        "prompt": "a dog and a cat",
        "base": "a dog and a cat",
        "granularity": "subject",
        "branches": [{"prompt": "a black dog and a cat", "subject": "dog", "attributes": ["black"]}],
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    assert main(["generate", "--plan", str(path), *FAST, "--output-dir", str(tmp_path)]) == 0
    sidecar = json.loads((tmp_path / "00000-0-a-dog-and-a-cat.json").read_text())
    assert sidecar["plan"]["branches"][0]["subject_token_indices"] == [2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["   "], "prompt is empty"),
        ([PROMPT, "--height", "100"], "--height must be a multiple of 8 in 8..4096"),
        ([PROMPT, "--steps", "0"], "--steps must be a whole number in 1..1000, got 0."),
        ([PROMPT, "--tau", "1.5"], "--tau must lie in (0, 1)"),
        ([PROMPT, "--share-steps", "2"], "--share-steps must lie in [0, 1]"),
        ([], "Give a prompt"),
    ],
)
def test_generate_bad_input_is_one_clear_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["generate", *argv, "--output-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.png"))


def test_unloadable_model_is_one_clear_message(tmp_path):
    """In a real process (library loggers bound to the real stderr): one message naming the model and the ways out."""
    src = Path(__file__).resolve().parents[2] / "src"  # this checkout's code, whatever the cwd
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(src)}
    cmd = [
        sys.executable,
        "-m",
        "detailpp.cli",
        "generate",
        PROMPT,
        "--model",
        "no/such-model-here",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == (
        "detailpp generate: error: --model no/such-model-here: not in the Hugging Face cache, and HF_HUB_OFFLINE=1 "
        "forbids downloading it; unset HF_HUB_OFFLINE to download it, give a local SDXL folder or .safetensors file, "
        "or use --model toy.\n"
    )  # one line: no "Couldn't connect to the Hub", no torchvision notices, no traceback
    assert not list(tmp_path.rglob("*.png"))


def test_generate_plan_subject_not_in_prompt(tmp_path, capsys):
    plan = {"prompt": "a dog", "base": "a dog", "branches": [{"prompt": "a red cat", "subject": "cat"}]}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    assert main(["generate", "--plan", str(path), *FAST, "--output-dir", str(tmp_path)]) == 2
    assert "'cat' does not occur in the prompt" in capsys.readouterr().err


def test_unwritable_output_dir_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["generate", PROMPT, *FAST, "--output-dir", str(blocker / "sub")]) == 2
    assert "Cannot write to the output folder" in capsys.readouterr().err


def test_compile_flag_calls_compile_detail(tmp_path, capsys, monkeypatch):
    """`--compile` reaches `pipe.compile_detail()` once, after loading (recorded, not run: no inductor here)."""
    from detailpp.pipelines.sdxl import DetailPlusPlusPipeline

    calls = []
    monkeypatch.setattr(DetailPlusPlusPipeline, "compile_detail", lambda self, *a, **k: calls.append((a, k)) or [])
    argv = ["generate", PROMPT, *FAST, "--no-nursing", "--output-dir", str(tmp_path)]
    assert main(argv) == 0 and calls == []
    assert main([*argv, "--seed", "1", "--compile"]) == 0
    assert calls == [((), {})]
    for number, seed, compiled in ((0, 0, False), (1, 1, True)):
        stem = f"{number:05d}-{seed}-a-red-teddy-bear-wearing-a-green-tracksuit"
        sidecar = json.loads((tmp_path / f"{stem}.json").read_text())
        assert sidecar["compiled"] is compiled
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--compile" in capsys.readouterr().out


def test_eager_nursing_flag_switches_the_nursing_graphs_off(tmp_path):
    argv = ["generate", PROMPT, *FAST, "--no-nursing", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    assert main([*argv, "--seed", "1", "--eager-nursing"]) == 0
    for number, seed, eager in ((0, 0, False), (1, 1, True)):
        stem = f"{number:05d}-{seed}-a-red-teddy-bear-wearing-a-green-tracksuit"
        sidecar = json.loads((tmp_path / f"{stem}.json").read_text())
        assert sidecar["eager_nursing"] is eager
        assert sidecar["detail_config"]["nursing_graphs"] is (False if eager else None)


def test_generate_takes_the_model_folders_detail_defaults_under_its_flags(tmp_path):
    from detailpp.models.tiny import build_tiny_pipeline

    folder = tmp_path / "model"
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_detail_defaults({"nursing_step_size": 12.5, "mask_threshold": 0.3})
    pipe.save_pretrained(folder)
    argv = ["generate", PROMPT, "--model", str(folder), "--steps", "1", "--height", "128", "--width", "128", "--quiet"]
    for flags, tau in (([], 0.3), (["--tau", "0.6"], 0.6)):
        out = tmp_path / f"out{tau}"
        assert main([*argv, *flags, "--output-dir", str(out)]) == 0
        (sidecar,) = out.glob("*.json")
        config = json.loads(sidecar.read_text())["detail_config"]
        assert config["nursing_step_size"] == 12.5  # the model's recommendation ...
        assert config["mask_threshold"] == tau  # ... under the flags given, and only those


def test_preset_authors_reaches_the_pipeline_and_the_metadata(tmp_path, monkeypatch):
    from detailpp.config import AuthorsBehaviour
    from detailpp.pipelines.sdxl import DetailPlusPlusPipeline

    seen = []
    real_call = DetailPlusPlusPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["detail_config"])
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(DetailPlusPlusPipeline, "__call__", spy)
    out = tmp_path / "out"
    assert main(["generate", PROMPT, *FAST, "--preset", "authors", "--tau", "0.4", "--output-dir", str(out)]) == 0
    (config,) = seen
    assert config.authors == AuthorsBehaviour.all() and config.materialised_attention
    assert config.mask_threshold == 0.4 and not config.scale_thresholds
    chunks = read_png_text(str(next(out.glob("*.png"))))
    assert "Detail++ preset: authors" in chunks["parameters"]
    assert json.loads(chunks["detailpp"])["detail_config"]["authors"]["aliased_mask_sum"] is True


def test_unknown_preset_is_refused_by_argparse(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", PROMPT, "--preset", "paper", "--output-dir", str(tmp_path / "o")])
    assert e.value.code == 2 and "invalid choice: 'paper'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def write_control_image(path: Path, size: int = 64, seed: int = 0) -> Path:
    import numpy as np
    import PIL.Image

    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return path


def test_generate_with_two_controlnets_records_them(tmp_path, capsys):
    images = [write_control_image(tmp_path / f"control-{i}.png", seed=i) for i in range(2)]
    argv = ["generate", "a red dog and a blue cat", "--model", "tiny-random", "--steps", "2", "--quiet"]
    argv += ["--no-nursing", "--output-dir", str(tmp_path / "out")]
    argv += ["--controlnet", "tiny-random", "--control-image", str(images[0]), "--controlnet-scale", "0.5"]
    argv += ["--controlnet", "tiny-random", "--control-image", str(images[1]), "--controlnet-scale", "0.8"]
    argv += ["--control-start", "0.0", "--control-end", "0.5"]
    assert main(argv) == 0
    png = Path(capsys.readouterr().out.splitlines()[0])
    chunks = read_png_text(png)
    settings = json.loads(chunks["detailpp"])
    assert settings["width"] == settings["height"] == 64  # the control image's size
    assert settings["controlnets"] == [
        {"controlnet": "tiny-random", "image": str(images[0]), "scale": 0.5, "start": 0.0, "end": 0.5},
        {"controlnet": "tiny-random", "image": str(images[1]), "scale": 0.8, "start": 0.0, "end": 0.5},
    ]
    assert (
        'ControlNet 1: "Model: tiny-random, Image: control-1.png, Weight: 0.8, Guidance Start: 0.0, '
        in (chunks["parameters"])
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--controlnet", "tiny-random"], "Got 1 --controlnet and 0 --control-image"),
        (["--control-image", "{img}"], "--control-image needs a ControlNet"),
        (["--controlnet", "tiny-random", "--control-image", "{dir}/missing.png"], "missing.png': no such file"),
        (["--controlnet", "tiny-random", "--control-image", "{dir}/bad.png"], "does not open as an image"),
        (
            [
                "--controlnet",
                "tiny-random",
                "--control-image",
                "{img}",
                "--controlnet-scale",
                "1",
                "--controlnet-scale",
                "2",
            ],
            "Got 2 --controlnet-scale for 1 ControlNets",
        ),
        (["--controlnet", "tiny-random", "--control-image", "{img}", "--width", "128"], "--width 128 differs"),
        (
            [
                "--controlnet",
                "tiny-random",
                "--control-image",
                "{img}",
                "--control-start",
                "0.6",
                "--control-end",
                "0.5",
            ],
            "0 <= start < end <= 1",
        ),  # fmt: skip
        (["--controlnet", "./no/such/folder", "--control-image", "{img}"], "no such folder"),
    ],
)
def test_controlnet_flags_are_checked_before_loading(flags, message, tmp_path, capsys, monkeypatch):
    write_control_image(tmp_path / "img.png")
    (tmp_path / "bad.png").write_text("not an image")
    flags = [f.format(img=tmp_path / "img.png", dir=tmp_path) for f in flags]

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("detailpp.models.loading.load_pipeline", no_loading)
    code = main(["generate", PROMPT, "--quiet", "--output-dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_the_guidance_default_is_the_pipelines_own(tiny_pipe):
    from detailpp.cli.generate import default_guidance
    from detailpp.models.tiny import build_tiny_sd_pipeline

    assert default_guidance(tiny_pipe) == 5.0  # SDXL's
    assert default_guidance(build_tiny_sd_pipeline()) == 7.5  # SD 1.x/2.x's


def test_generate_on_tiny_sd_records_sds_guidance_default(tmp_path):
    assert (
        main(
            [
                "generate",
                "a red cube and a blue ball",
                "--model",
                "tiny-random-sd15",
                "--steps",
                "2",
                "--height",
                "64",
                "--width",
                "64",
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    (png,) = sorted(tmp_path.glob("*.png"))
    assert json.loads(read_png_text(png)["detailpp"])["guidance_scale"] == 7.5
