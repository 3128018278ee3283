"""The call's input rules (``detailpp.inputs``), the same in Python, on the command line and in the demo: finite
guidance, one negative prompt string, the 75-token window (refused everywhere), upper limits on steps and size,
a scheduler's own limit (PNDM's warm-up), all checked before anything is encoded."""

from __future__ import annotations

import pytest
import torch
from diffusers import PNDMScheduler

from detailpp.cli import main
from detailpp.demo.session import DemoInputError, check_settings
from detailpp.inputs import DetailInputError
from tests.plans import TEDDY_PLAN

ZERO_BRANCH = {"prompt": "a dog", "base": "a dog", "branches": []}
SIZE = {"height": 64, "width": 64}
LONG = " ".join(["a red circle next to a blue square on a green field"] * 15)  # 180 CLIP tokens


def call(pipe, **kwargs):
    kwargs = {"plan": TEDDY_PLAN, "num_inference_steps": 1, **SIZE, **kwargs}
    return pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs)


@pytest.fixture
def no_unet(tiny_pipe, monkeypatch):
    """Every refusal comes before the UNet runs (and before any text is encoded)."""
    monkeypatch.setattr(tiny_pipe, "encode_prompt", lambda *a, **k: pytest.fail("a text was encoded"))
    return tiny_pipe


@pytest.mark.parametrize("plan", [TEDDY_PLAN, ZERO_BRANCH], ids=["branches", "plain"])
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guidance_scale": float("nan")}, "`guidance_scale` must be a finite number >= 0, got nan."),
        ({"guidance_scale": float("inf")}, "`guidance_scale` must be a finite number >= 0, got inf."),
        ({"guidance_rescale": float("nan")}, "`guidance_rescale` must be a finite number >= 0, got nan."),
        ({"negative_prompt": ["ugly", "blurry"]}, "`negative_prompt` must be one string (Detail++ runs one prompt"),
        ({"negative_prompt": ["ugly"]}, "got list ['ugly']."),
        ({"negative_prompt": 5}, "`negative_prompt` must be one string (Detail++ runs one prompt per call and every"),
        ({"num_inference_steps": 100_000}, "`num_inference_steps` must be a whole number in 1..1000, got 100000."),
        ({"height": 100_000}, "`height` must be a multiple of 8 in 8..4096, got 100000."),
    ],
)
def test_bad_call_arguments_are_refused_before_encoding(no_unet, plan, kwargs, message):
    with pytest.raises(DetailInputError) as e:
        call(no_unet, plan=plan, **kwargs)
    assert message in str(e.value)


def test_a_prompt_past_the_window_is_refused_in_python_as_on_the_command_line(no_unet, tmp_path, capsys):
    long_plan = {"prompt": LONG, "base": LONG, "branches": []}
    with pytest.raises(DetailInputError) as python:
        call(no_unet, plan=long_plan)
    assert str(python.value).startswith("The prompt is 180 CLIP tokens long; the text encoders read only the first 75")
    with pytest.raises(DetailInputError, match="The negative prompt is 180 CLIP tokens long"):
        call(no_unet, negative_prompt=LONG)
    assert main(["generate", LONG, "--model", "tiny-random", "--output-dir", str(tmp_path), "--quiet"]) == 2
    assert capsys.readouterr().err == f"detailpp generate: error: {python.value}\n"  # the same sentence


def test_pndm_with_fewer_steps_than_its_warm_up_is_refused_up_front(no_unet):
    scheduler = no_unet.scheduler
    no_unet.scheduler = PNDMScheduler.from_config(scheduler.config)  # as --scheduler pndm makes it: with warm-up
    try:
        with pytest.raises(DetailInputError) as e:
            call(no_unet, num_inference_steps=3)
    finally:
        no_unet.scheduler = scheduler
    assert str(e.value) == (
        "`num_inference_steps` is 3, but the PNDM (PLMS) scheduler's Runge-Kutta warm-up needs at least 4 steps; "
        "use 4 or more, or another scheduler (euler, ddim, dpm++-2m...)."
    )


def test_pndm_on_the_command_line_is_one_line_before_the_first_image(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "a red circle", "--model", "tiny-random", "--scheduler", "pndm", "--steps", "1"]
    assert main([*argv, "--height", "64", "--width", "64", "--output-dir", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("detailpp generate: error: --steps is 1, but the PNDM (PLMS) scheduler's Runge-Kutta")
    assert err.count("\n") == 1 and not out.exists()


def test_the_same_rule_has_the_same_words_on_every_surface(tiny_pipe, tmp_path, capsys):
    """Only the field's name differs: `guidance_scale` (Python), --guidance-scale (CLI), The guidance scale (demo)."""
    with pytest.raises(DetailInputError) as python:
        call(tiny_pipe, guidance_scale=float("nan"))
    assert main(["generate", "a dog", "--guidance-scale", "nan", "--output-dir", str(tmp_path)]) == 2
    cli = capsys.readouterr().err.removeprefix("detailpp generate: error: ").strip()
    with pytest.raises(DemoInputError) as demo:
        check_settings(
            seed=0, steps=2, guidance_scale=float("nan"), height=64, width=64, tau=0.5, share_steps=0.8,
            nursing=False, granularity="subject",
        )  # fmt: skip
    rest = {str(python.value).removeprefix("`guidance_scale`"), cli.removeprefix("--guidance-scale")}
    assert rest | {str(demo.value).removeprefix("The guidance scale")} == {" must be a finite number >= 0, got nan."}
