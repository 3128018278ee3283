"""The browser demo: the handlers on their own, the command, and the page driven in headless Chromium.

The browser test needs Debian's Chromium at /usr/bin/chromium (``apt-get install chromium``; ``scripts/test.sh``
installs it) and the ``playwright`` package; nothing is downloaded. ``DETAILPP_DEMO_SCREENSHOT=PATH`` makes it save a
screenshot of the finished page there (how ``docs/img/demo.png`` is made).
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from detailpp.cli import main
from detailpp.config import DetailConfig
from detailpp.demo.session import (
    DemoInputError,
    DemoSession,
    branch_captions,
    check_settings,
    plan_to_rows,
    rows_to_plan,
)
from detailpp.plan import Branch, DecompositionPlan
from detailpp.resources import load_clip_tokenizer

logger = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
PROMPT = "a red dog with sunglasses and a blue cat"
PLAN = DecompositionPlan(
    prompt=PROMPT,
    base="a dog with sunglasses and a cat",
    branches=(
        Branch("a red dog with sunglasses and a cat", "dog", ("red",)),
        Branch("a dog with sunglasses and a blue cat", "cat", ("blue",)),
    ),
)
GOOD = dict(seed=0, steps=2, guidance_scale=5.0, height=64, width=64, tau=0.5, share_steps=0.8)


def settings(**changes):
    return check_settings(**(GOOD | {"nursing": False, "granularity": "subject"} | changes))


@pytest.fixture(scope="module")
def tiny_pipe():
    from detailpp.models.loading import load_pipeline

    return load_pipeline("tiny-random", device="cpu", dtype="float32")


# ---------------------------------------------------------------------------------------------------- the table


def test_table_round_trip():
    rows = plan_to_rows(PLAN)
    assert rows == [
        ["base", PLAN.base, ""],
        ["branch", PLAN.branches[0].prompt, "dog"],
        ["branch", PLAN.branches[1].prompt, "cat"],
    ]
    plan = rows_to_plan(PROMPT, rows)
    assert plan.base == PLAN.base and plan.prompts == PLAN.prompts and plan.subjects == ["dog", "cat"]


def test_table_cells_are_cleaned_and_empty_rows_ignored():
    rows = [
        ["base ", "  a dog and a cat ", None],
        ["branch", "a black dog and a cat", " dog"],
        [None, None, None],
        ["", "", float("nan")],
        ["", "a dog and a white cat", "cat"],  # a row added in the page has no role: a branch
    ]
    plan = rows_to_plan("a black dog and a white cat ", rows, "attribute")
    assert plan.prompt == "a black dog and a white cat" and plan.base == "a dog and a cat"
    assert [(b.prompt, b.subject) for b in plan.branches] == [
        ("a black dog and a cat", "dog"),
        ("a dog and a white cat", "cat"),
    ]
    assert plan.granularity == "attribute"
    assert rows_to_plan("a dog", {"headers": ["role", "prompt", "subject"], "data": [["base", "a dog", ""]]}).base


@pytest.mark.parametrize(
    ("prompt", "rows", "message"),
    [
        ("  ", [["base", "a dog", ""]], "The prompt is empty"),
        (PROMPT, [["branch", "a red dog", "dog"]], "exactly one row with role 'base'"),
        (PROMPT, [["base", "a dog", ""], ["base", "a cat", ""]], "found 2 rows"),
        (PROMPT, [["base", "", ""], ["branch", "a red dog", "dog"]], "The base prompt"),
        (PROMPT, [["base", "a dog", ""], ["branch", "a red dog", ""]], "Row 2 (branch p2) has no subject"),
        (PROMPT, [["base", "a dog", ""], ["branch", "", "dog"]], "Row 2 (branch p2) has no prompt"),
        (
            PROMPT,
            [["base", "a dog", ""], ["branch", "a red dog", "dog"], ["branch", "a red dragon", "dragon"]],
            "Row 3 (branch p3): the subject 'dragon' does not occur in the prompt",
        ),
        (PROMPT, [["base", "a dog", ""], ["branch", "a red do", "do"]], "the subject 'do' does not occur"),
        (
            PROMPT,
            [["base", "a dog", ""], ["brnach", "a red dog", "dog"]],
            "Row 2 has the role 'brnach'; a row's role is 'base' (one row) or 'branch' (or empty, for a branch).",
        ),
    ],
)
def test_table_errors_name_the_row_and_the_fix(prompt, rows, message):
    with pytest.raises(DemoInputError) as e:
        rows_to_plan(prompt, rows)
    assert message in str(e.value)


def test_captions_name_every_branch_and_its_sub_prompt():
    assert branch_captions(PLAN) == [
        f"p0 (full prompt): {PROMPT}",
        f"p1 (base): {PLAN.base}",
        f"p2 (dog): {PLAN.branches[0].prompt}",
        f"p3 (cat): {PLAN.branches[1].prompt}",
    ]
    assert branch_captions(DecompositionPlan("a dog", "a dog")) == ["p0 (no detail branch: plain SDXL): a dog"]


# ---------------------------------------------------------------------------------------------------- settings


def test_the_seed_range_is_the_command_lines():
    assert check_settings(**GOOD | {"seed": 2**63, "nursing": False, "granularity": "subject"}).seed == 2**63
    assert check_settings(**GOOD | {"seed": 2**64 - 1, "nursing": False, "granularity": "subject"}).seed == 2**64 - 1


def test_settings_become_a_detail_config():
    s = check_settings(**GOOD | {"seed": 7.0, "height": "128", "nursing": True, "granularity": "attribute"})
    assert (s.seed, s.steps, s.height, s.width, s.guidance_scale) == (7, 2, 128, 64, 5.0)
    assert s.config == DetailConfig(mask_threshold=0.5, share_steps=0.8, nursing=True, granularity="attribute")
    authors = check_settings(**GOOD | {"nursing": True, "granularity": "subject", "preset": "authors"})
    assert authors.config == DetailConfig.authors_preset(mask_threshold=0.5, share_steps=0.8, nursing=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"height": 100}, "Height must be a multiple of 8 in 8..4096 (e.g. 512, 768, 1024), got 100."),
        ({"width": 0}, "Width must be a multiple of 8 in 8..4096"),
        ({"width": 64.5}, "Width must be a whole number"),
        ({"width": float("inf")}, "Width must be a whole number"),
        ({"width": None}, "Width is empty"),
        ({"height": 8192}, "Height must be a multiple of 8 in 8..4096 (e.g. 512, 768, 1024), got 8192."),
        ({"steps": 0}, "Steps must be a whole number in 1..1000, got 0."),
        ({"seed": -1}, "The seed must lie in 0..18446744073709551615, got -1."),
        ({"seed": 2**64}, "The seed must lie in 0..18446744073709551615, got 18446744073709551616."),
        ({"seed": "abc"}, "The seed must be a number"),
        ({"guidance_scale": -1}, "The guidance scale must be a finite number >= 0, got -1.0."),
        ({"guidance_scale": float("nan")}, "The guidance scale must be a finite number >= 0, got nan."),
        ({"tau": 1.0}, "tau must lie in (0, 1)"),
        ({"share_steps": 2}, "share-steps must lie in [0, 1]"),
        ({"granularity": "word"}, "Granularity must be one of"),
        ({"preset": "paper"}, "Unknown preset 'paper'; use one of ('detailpp', 'authors')."),
    ],
)
def test_bad_settings_get_one_clear_sentence(change, message):
    with pytest.raises(DemoInputError) as e:
        settings(**change)
    assert message in str(e.value)


# ---------------------------------------------------------------------------------------------------- the session


class FakePipe:
    """Enough of the pipeline for the session: parse, validate, and a slow call that counts overlapping runs."""

    unet = None
    default_sample_size = 16
    vae_scale_factor = 8
    scheduler = None
    tokenizer = load_clip_tokenizer()

    def __init__(self) -> None:
        self.active = 0
        self.most_active = 0
        self.calls = 0

    def set_progress_bar_config(self, **kwargs) -> None:
        pass

    def decompose(self, prompt: str, granularity: str = "subject") -> DecompositionPlan:
        if prompt == PROMPT:
            return PLAN
        return DecompositionPlan(prompt, prompt, granularity)

    def prepare_plan(self, prompt, plan, config):
        return plan

    def make_detail_config(self, preset="detailpp", **fields):
        return DetailConfig.preset(preset, **fields)

    def __call__(self, **kwargs):
        import PIL.Image
        import torch

        self.calls += 1
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        time.sleep(0.2)
        self.active -= 1
        plan = kwargs["plan"]
        images = [PIL.Image.new("RGB", (kwargs["width"], kwargs["height"])) for _ in plan.prompts]
        masks = torch.rand(len(plan.branches), kwargs["height"] // 8, kwargs["width"] // 8)
        return SimpleNamespace(images=images[-1:], branch_images=images, masks=masks)


def test_session_runs_the_edited_table_or_parses_a_changed_prompt():
    session = DemoSession(FakePipe(), "fake")
    rows = plan_to_rows(PLAN)
    rows[2][1] = "a dog with sunglasses and a fluffy blue cat"
    plan, note = session.plan_for(PROMPT, rows, PROMPT, "subject")
    assert plan.branches[1].prompt == "a dog with sunglasses and a fluffy blue cat" and note is None
    plan, note = session.plan_for(PROMPT, rows, "another prompt", "subject")
    assert plan == PLAN and "parsed again" in note
    plan, note = session.plan_for(PROMPT, [], None, "subject")
    assert plan == PLAN and note is None
    with pytest.raises(DemoInputError, match="The prompt is empty"):
        session.plan_for("", rows, PROMPT, "subject")


def test_session_loads_lazily_and_once():
    loads = []

    def loader():
        loads.append(1)
        return FakePipe()

    session = DemoSession(loader, "fake")
    assert not session.loaded and session.default_size() == 1024 and session.default_steps() == 50
    session.parse(PROMPT)
    session.parse(PROMPT)
    assert loads == [1] and session.loaded


def test_one_generation_at_a_time_across_sessions():
    pipe = FakePipe()
    sessions = [DemoSession(pipe, "fake"), DemoSession(pipe, "fake")]
    errors = []

    def work(session):
        try:
            session.generate(PROMPT, [], table_prompt=None, settings=settings(), compare=False)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in sessions * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and pipe.calls == 4 and pipe.most_active == 1


def test_generate_on_the_tiny_model_returns_every_branch_mask_and_plain_sdxl(tiny_pipe):
    session = DemoSession(tiny_pipe, "tiny-random")
    rows = plan_to_rows(PLAN)
    rows[2][1] = "a dog with sunglasses and a fluffy blue cat"
    steps = []
    result = session.generate(
        PROMPT, rows, table_prompt=PROMPT, settings=settings(), on_step=lambda i, n, stage: steps.append((i, n, stage))
    )
    assert [c for _, c in result.branches] == [
        f"p0 (full prompt): {PROMPT}",
        f"p1 (base): {PLAN.base}",
        f"p2 (dog): {PLAN.branches[0].prompt}",
        "p3 (cat): a dog with sunglasses and a fluffy blue cat",
    ]
    assert all(img.size == (64, 64) for img, _ in result.branches)
    assert [c for _, c in result.masks] == ["dog (mask > tau = 0.5)", "cat (mask > tau = 0.5)"]
    assert result.image.size == result.plain_image.size == (64, 64)
    assert steps[0] == (0, 4, "Detail++") and steps[-1] == (4, 4, "plain SDXL")
    assert "2 detail branches" in result.summary and "noise" in result.summary
    rows[2][2] = "dragon"
    with pytest.raises(DemoInputError, match="'dragon' does not occur"):
        session.generate(PROMPT, rows, table_prompt=PROMPT, settings=settings())


def test_images_downloaded_from_the_page_carry_their_parameters(tiny_pipe):
    """Gradio serves a PIL image as the PNG it encodes with the image's text info: the parameters go with it."""
    import PIL.Image
    from gradio.processing_utils import encode_pil_to_bytes

    session = DemoSession(tiny_pipe, "tiny-random")
    result = session.generate(
        PROMPT, plan_to_rows(PLAN), table_prompt=PROMPT, settings=settings(), negative_prompt="blurry"
    )
    for image, kind in ((result.image, "Detail++ branches: 2"), (result.plain_image, "Method: plain")):
        served = PIL.Image.open(io.BytesIO(encode_pil_to_bytes(image, "png")))
        lines = served.text["parameters"].splitlines()
        assert lines[:2] == [PROMPT, "Negative prompt: blurry"]
        assert "Steps: 2, Sampler: Euler, CFG scale: 5.0, Seed: 0, Size: 64x64, Model: tiny-random" in lines[2]
        assert kind in lines[2]
    record = json.loads(PIL.Image.open(io.BytesIO(encode_pil_to_bytes(result.image, "png"))).text["detailpp"])
    assert record["plan"] == result.plan.to_dict() and record["seed"] == 0


# ---------------------------------------------------------------------------------------------------- the page


def page_value(demo, elem_id):
    """The initial value of the page's component ``elem_id``."""
    (component,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    return component.value


def page_settings(demo) -> tuple:
    return tuple(page_value(demo, f"detailpp-{name}") for name in ("tau", "share", "nursing", "granularity"))


def test_the_settings_start_at_the_models_recommendation(tiny_pipe):
    from detailpp.demo import build_demo
    from detailpp.pipelines.sdxl import DetailPlusPlusPipeline

    assert page_settings(build_demo(tiny_pipe, model_name="tiny-random", initial_prompt="")) == (
        0.5,
        0.8,
        True,
        "subject",
    )
    tiny_pipe.set_detail_defaults({"mask_threshold": 0.3, "nursing": False, "share_steps": 0.6})
    try:
        demo = build_demo(tiny_pipe, model_name="tiny-random", initial_prompt="")
    finally:
        tiny_pipe.detail_defaults = DetailPlusPlusPipeline.detail_defaults
    assert page_settings(demo) == (0.3, 0.6, False, "subject")


class AttributePipe(FakePipe):
    """A model that recommends a parse per attribute; it records the granularity each parse was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.parsed = []

    def decompose(self, prompt, granularity="subject"):
        self.parsed.append(granularity)
        return super().decompose(prompt, granularity)

    def make_detail_config(self, preset="detailpp", **fields):
        return DetailConfig.preset(preset, **{"granularity": "attribute", "mask_threshold": 0.02, **fields})


def test_the_initial_parse_and_a_lazy_models_settings_follow_its_recommendation(tmp_path, caplog):
    from detailpp.demo import build_demo

    pipe = AttributePipe()
    demo = build_demo(pipe, model_name="fake", initial_prompt=PROMPT)
    assert page_settings(demo) == (0.02, 0.8, True, "attribute") and pipe.parsed == ["attribute"]
    # a model loaded on the first request: its folder's detail_config.json, read without loading it
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "detail_config.json").write_text('{"share_steps": 0.5, "nursing": false}', encoding="utf-8")
    loads = []
    demo = build_demo(lambda: loads.append(1) or FakePipe(), model_name=str(folder))
    assert page_settings(demo) == (0.5, 0.5, False, "subject") and not loads
    # an unreadable file: a warning, and the page opens with DetailConfig's defaults
    (folder / "detail_config.json").write_text('{"tau": 0.3}', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="detailpp.demo"):
        demo = build_demo(lambda: loads.append(1) or FakePipe(), model_name=str(folder))
    assert page_settings(demo) == (0.5, 0.8, True, "subject") and not loads
    assert "could not read the Detail++ settings recommended for" in caplog.text and "tau" in caplog.text


# ---------------------------------------------------------------------------------------------------- the command


def test_cli_demo_loads_the_model_and_serves_on_localhost(monkeypatch, caplog):
    import detailpp.demo
    import detailpp.models.loading

    launched, loaded = [], []
    monkeypatch.setattr(detailpp.models.loading, "load_pipeline", lambda *a, **k: loaded.append((a, k)) or FakePipe())
    monkeypatch.setattr(detailpp.demo, "launch", lambda demo, host, port: launched.append((demo, host, port)))
    assert main(["demo", "--model", "tiny-random", "--port", "7861", "--steps", "3", "--size", "128"]) == 0
    assert loaded == [(("tiny-random",), {"device": "cpu", "dtype": None, "config": None})]
    ((demo, host, port),) = launched
    assert (host, port) == ("127.0.0.1", 7861)
    generate = [f for f in demo.fns.values() if f.name == "on_generate"]
    assert len(generate) == 1 and generate[0].concurrency_limit == 1
    with caplog.at_level(logging.WARNING):
        assert main(["demo", "--model", "tiny-random", "--host", "0.0.0.0"]) == 0
    assert "anyone who can reach" in caplog.text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "--port must lie in"),
        (["--width", "100"], "--width must be a multiple of 8 in 8..4096"),
        (["--size", "100"], "--width must be a multiple of 8 in 8..4096"),  # the deprecated --size sets both
        (["--device", "tpu9"], "--device 'tpu9' is not a device name"),
    ],
)
def test_cli_demo_rejects_bad_arguments(args, message, capsys):
    assert main(["demo", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_demo_says_when_the_port_is_taken_before_loading_the_model(monkeypatch, capsys):
    import detailpp.models.loading

    monkeypatch.setattr(detailpp.models.loading, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["demo", "--port", str(s.getsockname()[1])]) == 2
    assert "the port may be in use: choose another with --port" in capsys.readouterr().err


def test_a_controlnet_pipeline_takes_the_control_image_and_shows_its_field(tiny_pipe):
    import PIL.Image

    from detailpp.demo import build_demo
    from detailpp.pipelines.sdxl_controlnet import with_controlnets

    cn_pipe = with_controlnets(tiny_pipe, ["tiny-random"])
    session = DemoSession(cn_pipe, "tiny-random")
    assert session.has_controlnet and not DemoSession(tiny_pipe, "tiny-random").has_controlnet
    with pytest.raises(DemoInputError, match="upload a control image"):
        session.generate(PROMPT, [], table_prompt=None, settings=settings(), compare=False)
    control = PIL.Image.new("RGB", (96, 80), "white")  # resized to the page's 64x64
    result = session.generate(PROMPT, [], table_prompt=None, settings=settings(), control_image=control)
    assert result.image.size == result.plain_image.size == (64, 64)
    assert page_value(build_demo(cn_pipe, model_name="tiny-random", initial_prompt=""), "detailpp-control") is None
    visible = {
        pipe_name: [b.visible for b in build_demo(p, model_name="tiny-random", initial_prompt="").blocks.values()
                    if getattr(b, "elem_id", None) == "detailpp-control"]
        for pipe_name, p in (("controlnet", cn_pipe), ("plain", tiny_pipe))
    }  # fmt: skip
    assert visible == {"controlnet": [True], "plain": [False]}


def test_cli_demo_controlnet_flag_makes_a_controlnet_pipeline(monkeypatch):
    import detailpp.demo
    import detailpp.models.loading
    import detailpp.pipelines.sdxl_controlnet

    attached, built = [], []
    monkeypatch.setattr(detailpp.models.loading, "load_pipeline", lambda *a, **k: FakePipe())
    monkeypatch.setattr(detailpp.pipelines.sdxl_controlnet, "with_controlnets", lambda p, s: attached.append(s) or p)
    monkeypatch.setattr(detailpp.demo, "build_demo", lambda pipe, **k: built.append(k) or "page")
    monkeypatch.setattr(detailpp.demo, "launch", lambda demo, host, port: None)
    assert main(["demo", "--model", "tiny-random", "--controlnet", "tiny-random", "--port", "0"]) == 0
    assert attached == [["tiny-random"]] and built[0]["controlnet"] is True
    assert main(["demo", "--model", "tiny-random", "--controlnet", "./no/such/folder", "--port", "0"]) == 2


# ---------------------------------------------------------------------------------------------------- the browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_small_png(png: bytes, path: Path) -> None:
    """A screenshot in 128 colours, without dithering: a few hundred KB at most, for the docs."""
    import PIL.Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with PIL.Image.open(io.BytesIO(png)) as img:
        small = img.convert("RGB").quantize(colors=128, dither=PIL.Image.Dither.NONE)
    small.save(path, optimize=True)
    logger.info("wrote %s (%d KB)", path, path.stat().st_size // 1024)


def test_the_page_in_a_real_browser(tiny_pipe):
    """Type a prompt, parse it, edit a sub-prompt, generate, read the gallery; then bad input shows its message."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"Chromium is missing at {CHROMIUM}: install it with `apt-get install chromium` (CI does).")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("The browser test needs playwright: pip install -e '.[test]'.")
    from detailpp.demo import build_demo, launch

    started = time.perf_counter()
    demo = build_demo(tiny_pipe, model_name="tiny-random", initial_prompt="", default_steps=2, default_size=64)
    port = free_port()
    launch(demo, host="127.0.0.1", port=port, block=False)
    url = f"http://127.0.0.1:{port}/"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                # Nothing but the app itself: a request elsewhere (fonts, analytics) fails at once.
                page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(url) else r.abort())
                page.goto(url)
                page.locator("#detailpp-prompt textarea").fill(PROMPT)
                page.locator("#detailpp-prompt textarea").press("Enter")  # Enter parses, as the Parse button does
                expect(page.locator("#detailpp-prompt textarea")).to_have_value(PROMPT)  # no newline inserted
                cell = page.locator('#detailpp-plan [data-testid="cell-2-1"]')
                expect(cell).to_contain_text(PLAN.branches[1].prompt, timeout=30_000)
                expect(page.locator('#detailpp-plan [data-testid="cell-0-1"]')).to_contain_text(PLAN.base)
                expect(page.locator('#detailpp-plan [data-testid="cell-1-2"]')).to_contain_text("dog")

                edited = "a dog with sunglasses and a fluffy blue cat"
                cell.dblclick()
                page.keyboard.press("Control+A")
                page.keyboard.type(edited)
                page.keyboard.press("Enter")
                expect(cell).to_contain_text(edited)
                page.locator("#detailpp-nursing input").uncheck()  # faster on the CPU; nursing has its own tests
                page.locator("#detailpp-generate").click()

                captions = page.locator("#detailpp-branches .caption-label")
                expect(captions).to_have_count(4, timeout=90_000)
                assert captions.all_text_contents() == [
                    f"p0 (full prompt): {PROMPT}",
                    f"p1 (base): {PLAN.base}",
                    f"p2 (dog): {PLAN.branches[0].prompt}",
                    f"p3 (cat): {edited}",
                ]
                expect(page.locator("#detailpp-branches img")).to_have_count(4)
                expect(page.locator("#detailpp-masks .caption-label")).to_have_text(
                    ["dog (mask > tau = 0.5)", "cat (mask > tau = 0.5)"]
                )
                expect(page.locator("#detailpp-image img")).to_be_visible()
                expect(page.locator("#detailpp-plain img")).to_be_visible()
                expect(page.locator("#detailpp-status")).to_contain_text("2 detail branches")
                expect(page.locator("#detailpp-error")).to_be_hidden()
                if shot := os.environ.get("DETAILPP_DEMO_SCREENSHOT"):
                    save_small_png(page.screenshot(full_page=True), Path(shot))

                error = page.locator("#detailpp-error")
                page.locator("#detailpp-width input").fill("100")
                page.locator("#detailpp-generate").click()
                expect(error).to_contain_text("Width must be a multiple of 8 in 8..4096", timeout=30_000)
                page.locator("#detailpp-width input").fill("64")

                page.locator("#detailpp-prompt textarea").fill("")
                page.locator("#detailpp-generate").click()
                expect(error).to_contain_text("The prompt is empty; write what the image should show.")
                assert "Traceback" not in page.content()
            finally:
                browser.close()
    finally:
        demo.close()
    logger.info("browser test: %.1f s", time.perf_counter() - started)
