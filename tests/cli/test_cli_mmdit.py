"""FLUX.1 and SD3 from the command line, the bench and the demo (tiny random transformers): the family recorded with
every image, the subjects counted in the model's own tokenizer, the family's defaults, and what a transformer
cannot take refused before the model loads."""

from __future__ import annotations

import argparse
import json

import pytest

from detailpp.cli import main
from detailpp.images import read_png_text
from detailpp.plan import retokenized, subject_token_indices
from detailpp.resources import load_clip_tokenizer

PROMPT = "a red dog with sunglasses and a blue cat with a necklace"
FAST = ["--steps", "1", "--quiet", "--no-nursing"]


@pytest.fixture(scope="module")
def flux():
    from detailpp.models.loading import load_pipeline

    return load_pipeline("tiny-random-flux", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def sd3():
    from detailpp.models.loading import load_pipeline

    return load_pipeline("tiny-random-sd3", device="cpu", dtype="float32")


@pytest.mark.parametrize(("model", "family"), [("tiny-random-flux", "flux"), ("tiny-random-sd3", "sd3")])
def test_generate_records_the_family_and_counts_subjects_in_the_models_tokenizer(tmp_path, capsys, model, family):
    out = tmp_path / "out"
    assert main(["generate", PROMPT, "--model", model, *FAST, "--save-masks", "--output-dir", str(out)]) == 0
    files = capsys.readouterr().out.split()
    chunks = read_png_text(files[0])
    settings = json.loads(chunks["detailpp"])
    assert settings["family"] == family and f"Detail++ family: {family}" in chunks["parameters"]
    assert "Size: 128x128" in chunks["parameters"]  # the built-in's native size, not the pipeline's 1024
    from detailpp.models.loading import load_pipeline

    tokenizer = load_pipeline(model, device="cpu", dtype="float32").plan_tokenizer
    for branch in settings["plan"]["branches"]:  # p0's subject tokens as the model's tokenizer counts them
        expected = subject_token_indices(PROMPT, branch["subject"], tokenizer)
        assert tuple(branch["subject_token_indices"]) == expected
    assert sum(f.endswith(".png") and "-mask-" in f for f in files) == 2


def test_a_clip_plan_is_retokenized_for_t5_at_the_same_occurrence(flux):
    prompt = "a dog beside a red dog"
    clip, t5 = load_clip_tokenizer(), flux.plan_tokenizer
    from detailpp.plan import Branch, DecompositionPlan

    second = subject_token_indices(prompt, "dog", clip, 1)
    plan = DecompositionPlan(
        prompt, "a dog beside a dog", "subject", (Branch("a dog beside a red dog", "dog", (), second),)
    )
    moved = retokenized(plan, clip, t5)
    assert moved.branches[0].subject_token_indices == subject_token_indices(prompt, "dog", t5, 1)
    assert moved.branches[0].subject_token_indices != subject_token_indices(prompt, "dog", t5, 0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "tiny-random-flux", "--scheduler", "euler"], "--scheduler euler: FLUX.1 samples with its own"),
        (["--model", "tiny-random-sd3", "--height", "136"], "--height must be a multiple of 16 in 16..4096 for"),
        (
            ["--model", "tiny-random-sd3", "--controlnet", "tiny-random", "--control-image", "x.png"],
            "--controlnet: Detail++ runs ControlNet with Stable Diffusion XL only, not with Stable Diffusion 3/3.5",
        ),
    ],
)
def test_what_a_transformer_cannot_take_is_refused_before_loading(tmp_path, capsys, monkeypatch, argv, message):
    import detailpp.models.loading as loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "x.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    if "--controlnet" in argv:  # an unreadable control image is refused too: make it one that opens
        from PIL import Image

        Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    assert main(["generate", PROMPT, *argv, "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_flux_reads_512_t5_tokens_so_a_long_prompt_is_not_refused_by_clips_window():
    from detailpp.cli.generate import early_plan
    from detailpp.config import DetailConfig
    from detailpp.inputs import DetailInputError
    from detailpp.models.families import ModelFamily

    long = PROMPT + ", " + ", ".join(["highly detailed oil painting in warm evening light"] * 10)
    args = argparse.Namespace(prompt=long, plan=None, negative_prompt=None)
    plan = early_plan(args, DetailConfig(), None, ModelFamily("flux"))
    assert [b.subject for b in plan.branches] == ["dog", "cat"]
    with pytest.raises(DetailInputError, match="CLIP tokens long; the text encoders read only the first 75"):
        early_plan(args, DetailConfig(), None, ModelFamily("sd3"))


def test_the_families_defaults_steps_and_guidance(flux, sd3):
    from detailpp.cli.common import default_steps
    from detailpp.cli.generate import default_guidance
    from detailpp.models.families import ModelFamily

    assert (flux.default_num_inference_steps, sd3.default_num_inference_steps) == (28, 28)
    assert (default_guidance(flux), default_guidance(sd3)) == (3.5, 7.0)
    assert default_steps("owner/flux-fine-tune", pipe=flux) == 28
    assert default_steps("owner/sd3-fine-tune", ModelFamily("sd3")) == 28
    assert default_steps("owner/sdxl-fine-tune", ModelFamily("sdxl")) == 50
    assert default_steps("tiny-random-flux", pipe=flux) == 20  # the embedded models: 20
    flux.transformer.register_to_config(guidance_embeds=False)  # as FLUX.1-schnell's transformer
    try:
        assert default_steps("owner/schnell", pipe=flux) == 4
    finally:
        flux.transformer.register_to_config(guidance_embeds=True)


def test_the_bench_takes_the_familys_guidance_and_a_multiple_of_16():
    from detailpp.cli.bench import _generation_settings
    from detailpp.models.families import ModelFamily

    def args(**changes):
        base = dict(model="tiny-random-flux", config=None, height=None, width=None, steps=None, guidance_scale=None)
        base |= dict(images_per_prompt=1, base_seed=0, device="cpu", dtype=None, family=ModelFamily("flux"))
        return argparse.Namespace(**base | changes)

    settings = _generation_settings(args())
    assert (settings["guidance_scale"], settings["steps"], settings["height"]) == (3.5, 20, 128)
    assert _generation_settings(args(model="tiny-random-sd3", family=ModelFamily("sd3")))["guidance_scale"] == 7.0
    from detailpp.inputs import DetailInputError

    with pytest.raises(DetailInputError, match="--width must be a multiple of 16"):
        _generation_settings(args(width=136))


def test_the_demo_runs_flux_with_its_branches_masks_and_labels(flux):
    from detailpp.demo.page import page_start
    from detailpp.demo.session import DemoSession, check_settings

    session = DemoSession(flux, "tiny-random-flux")
    assert session.loaded and session.base_label == "FLUX.1" and session.default_guidance() == 3.5
    start = page_start(session, [PROMPT], None, None, 128, None, None, None)
    assert (start.base, start.guidance, [r[2] for r in start.rows]) == ("FLUX.1", 3.5, ["", "dog", "cat"])
    settings = check_settings(
        seed=0, steps=1, guidance_scale=3.5, height=128, width=128, tau=0.5, share_steps=0.8, nursing=False,
        granularity="subject",
    )  # fmt: skip
    result = session.generate(PROMPT, start.rows, table_prompt=PROMPT, settings=settings, compare=True)
    assert len(result.branches) == 4 and [c.split()[0] for _, c in result.masks] == ["dog", "cat"]
    assert result.plain_image.size == result.image.size == (128, 128)
