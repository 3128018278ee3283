"""The browser demo: a Gradio app that shows the plan, every branch, the masks and plain SDXL side by side.

``detailpp demo`` starts it (:mod:`detailpp.cli.demo`); in Python::

    from detailpp.demo import build_demo, launch
    from detailpp.models.loading import load_pipeline

    launch(build_demo(load_pipeline("tiny-random")), host="127.0.0.1", port=7860)

The page has a prompt box; the decomposition as an editable table (the base prompt p1, then one row per detail branch
with its sub-prompt and subject; "Parse" refills it from the prompt); the settings (seed, steps, guidance, tau,
share-steps, nursing, granularity, size; tau, share-steps, nursing and granularity start at the model's recommended
values, from its ``detail_config.json``, over DetailConfig's defaults); and, after "Generate", the final image next
to plain SDXL sampled from the same seed, a gallery of every branch (p0, p1, p2..pn) captioned with its sub-prompt,
and each subject's mask over the image. Bad input gets one clear sentence in the page (``#detailpp-error``), never a
traceback. Generations run one at a time per process (a queue of concurrency 1 plus a process-wide lock), so two tabs
cannot mix their runs.

The logic lives in :mod:`detailpp.demo.session` (no Gradio); :func:`build_demo` only lays out the page and wires the
events.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from detailpp.config import PRESETS, DetailConfig
from detailpp.demo.session import (
    EXAMPLE_PROMPTS,
    TABLE_HEADERS,
    TOY_EXAMPLE_PROMPTS,
    DemoInputError,
    DemoSession,
    check_settings,
    plan_to_rows,
)
from detailpp.inputs import MAX_STEPS
from detailpp.plan import GRANULARITIES

logger = logging.getLogger(__name__)

CSS = """
#detailpp-error .detailpp-error-box { color: #b91c1c; font-weight: 600; border: 1px solid #fca5a5;
  background: #fef2f2; padding: 8px 12px; border-radius: 6px; }
#detailpp-branches .grid-wrap.fixed-height, #detailpp-masks .grid-wrap.fixed-height {
  min-height: 0; max-height: none; }
#detailpp-branches .caption-label, #detailpp-masks .caption-label { white-space: normal; max-width: 92%;
  font-size: 11px; line-height: 1.25; }
#detailpp-image img, #detailpp-plain img { width: 100%; height: 100%; object-fit: contain; }
"""


# ---------------------------------------------------------------------------------------------------- the page


def error_html(message: str) -> str:
    return f'<div class="detailpp-error-box" role="alert">{html.escape(message)}</div>'


@dataclass
class PageStart:
    """The values the page opens with."""

    prompt: str
    steps: int
    width: int
    height: int
    config: DetailConfig
    rows: list[list[str]]
    table_prompt: str | None
    controlnet: bool
    planners: tuple[str, ...] = ("spacy",)
    guidance: float = 5.0
    base: str = "SDXL"


def page_start(
    session: DemoSession,
    examples: list[str],
    initial_prompt: str | None,
    default_steps: int | None,
    default_size: int | None,
    default_width: int | None,
    default_height: int | None,
    controlnet: bool | None,
) -> PageStart:
    """The page's initial values: the model's recommended settings, and the initial prompt's plan when loaded."""
    prompt = examples[0] if initial_prompt is None else initial_prompt
    size = default_size or session.default_size()
    config = session.initial_config()  # tau, share steps, nursing, granularity: the model's recommendation
    rows: list[list[str]] = []
    table_prompt = None
    if session.loaded and prompt:
        try:
            rows, table_prompt = plan_to_rows(session.parse(prompt, config.granularity)), prompt
        except DemoInputError:
            logger.warning("could not parse the initial prompt %r", prompt)
    return PageStart(
        prompt=prompt,
        steps=default_steps or session.default_steps(),
        width=default_width or size,
        height=default_height or size,
        config=config,
        rows=rows,
        table_prompt=table_prompt,
        controlnet=session.has_controlnet if controlnet is None else controlnet,
        planners=tuple(session.planners),
        guidance=session.default_guidance(),
        base=session.base_label,
    )


def error_updates(gr: Any) -> tuple[Callable[[], Any], Callable[[str], Any]]:
    """The error box's updates: hidden, and shown with a message."""

    def hidden_error() -> Any:
        return gr.update(value="", visible=False)

    def shown_error(message: str) -> Any:
        return gr.update(value=error_html(message), visible=True)

    return hidden_error, shown_error


def parse_handlers(session: DemoSession, gr: Any) -> tuple[Callable[..., tuple], Callable[..., tuple]]:
    """The "Parse" handler and the granularity's (which re-parses a prompt already there)."""
    hidden_error, shown_error = error_updates(gr)

    def on_parse(prompt: str, granularity: str, planner: str | None = None) -> tuple:
        try:
            plan = session.parse(prompt, granularity, planner)
        except DemoInputError as e:
            return gr.update(), gr.update(), shown_error(str(e)), ""
        except Exception as e:  # a bug must not show a traceback in the page
            logger.exception("parsing %r failed", prompt)
            return gr.update(), gr.update(), shown_error(f"Parsing failed: {type(e).__name__}: {e}"), ""
        n = len(plan.branches)
        status = f"Parsed: {n} detail branch{'es' if n != 1 else ''}." if n else "Parsed: no detail branch."
        if plan.notice:  # the planner fell back (or the parser did not read the prompt): say why
            status = f"{status} {plan.notice}"
        return plan_to_rows(plan), plan.prompt, hidden_error(), status

    def on_regranulate(prompt: str, granularity: str, planner: str | None = None) -> tuple:
        """A new granularity (or planner) re-parses the prompt; with no prompt yet there is nothing to say."""
        if not isinstance(prompt, str) or not prompt.strip():
            return gr.update(), gr.update(), gr.update(), gr.update()
        return on_parse(prompt, granularity, planner)

    return on_parse, on_regranulate


def generate_handler(session: DemoSession, gr: Any) -> Callable[..., tuple]:
    """The "Generate" handler: the page's fields checked, one generation, the results or one clear sentence."""
    hidden_error, shown_error = error_updates(gr)

    def on_generate(
        prompt: str,
        rows: Any,
        table_prompt: str | None,
        negative_prompt: str,
        seed: Any,
        steps: Any,
        guidance_scale: Any,
        tau: Any,
        share_steps: Any,
        nursing: bool,
        granularity: str,
        height: Any,
        width: Any,
        compare: bool,
        preset: str = "detailpp",
        control_image: Any = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio injects progress through this default)
    ) -> tuple:
        keep = (gr.update(),) * 7  # the last result stays; the error says why nothing new came
        try:
            settings = check_settings(
                seed=seed,
                steps=steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                tau=tau,
                share_steps=share_steps,
                nursing=nursing,
                granularity=granularity,
                preset=preset,
            )
            result = session.generate(
                prompt,
                rows,
                table_prompt=table_prompt,
                settings=settings,
                negative_prompt=negative_prompt,
                compare=compare,
                on_step=lambda i, n, stage: progress((i, n), desc=stage, unit="steps"),
                control_image=control_image,
            )
        except DemoInputError as e:
            return (*keep, shown_error(str(e)), "")
        except Exception as e:  # a bug or an out-of-memory must not show a traceback in the page
            logger.exception("generation failed")
            first_line = str(e).splitlines()[0] if str(e) else ""
            message = f"Generation failed: {type(e).__name__}: {first_line} (details in the server log)."
            return (*keep, shown_error(message), "")
        plan = result.plan
        outputs = (result.image, result.plain_image, result.branches, result.masks, plan.to_json(indent=2))
        return (*outputs, plan_to_rows(plan), plan.prompt, hidden_error(), result.summary)

    return on_generate


def prompt_and_plan(gr: Any, start: PageStart) -> dict[str, Any]:
    """The prompt, negative prompt, granularity, "Parse" and the plan table."""
    c: dict[str, Any] = {}
    c["prompt"] = gr.Textbox(
        value=start.prompt, label="Prompt", lines=1, elem_id="detailpp-prompt", placeholder="a red ..."
    )
    c["negative"] = gr.Textbox(label="Negative prompt", lines=1, elem_id="detailpp-negative")
    with gr.Row():
        c["granularity"] = gr.Radio(
            list(GRANULARITIES), value=start.config.granularity, label="Granularity", elem_id="detailpp-granularity"
        )
        if len(start.planners) > 1:  # a language model is set up (detailpp demo --planner llm)
            c["planner"] = gr.Radio(
                list(start.planners), value=start.planners[-1], label="Planner", elem_id="detailpp-planner"
            )
        c["parse"] = gr.Button("Parse", elem_id="detailpp-parse")
    c["table"] = gr.Dataframe(
        value=start.rows or None,
        headers=TABLE_HEADERS,
        datatype="str",
        type="array",
        interactive=True,
        row_count=max(len(start.rows), 1),
        column_count=len(TABLE_HEADERS),
        label="Plan: the base prompt p1, then one row per detail branch (its prompt and subject)",
        elem_id="detailpp-plan",
        wrap=True,
        column_widths=["16%", "59%", "25%"],
    )
    return c


def settings_controls(gr: Any, start: PageStart) -> dict[str, Any]:
    """Seed, steps, guidance, tau, share steps, nursing, size, the comparison, the preset and the control image."""
    config, c = start.config, {}
    with gr.Row():
        c["seed"] = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="detailpp-seed")
        c["steps"] = gr.Slider(1, MAX_STEPS, value=start.steps, step=1, label="Steps", elem_id="detailpp-steps")
        guidance = gr.Slider(0, 15, value=start.guidance, step=0.5, label="Guidance", elem_id="detailpp-guidance")
        c["guidance"] = guidance
    with gr.Row():
        c["tau"] = gr.Slider(  # (a recommended tau outside the usual range widens it)
            min(0.05, config.mask_threshold),
            max(0.95, config.mask_threshold),
            value=config.mask_threshold,
            step=0.05,
            label="Mask threshold τ",
            elem_id="detailpp-tau",
        )
        c["share"] = gr.Slider(
            0, 1, value=config.share_steps, step=0.05, label="Share steps S/T", elem_id="detailpp-share"
        )
        c["nursing"] = gr.Checkbox(value=config.nursing, label="Attention nursing", elem_id="detailpp-nursing")
    with gr.Row():
        c["width"] = gr.Number(value=start.width, precision=0, step=8, label="Width", elem_id="detailpp-width")
        c["height"] = gr.Number(value=start.height, precision=0, step=8, label="Height", elem_id="detailpp-height")
        c["compare"] = gr.Checkbox(value=True, label=f"Also plain {start.base}, same seed", elem_id="detailpp-compare")
        c["preset"] = gr.Radio(
            list(PRESETS),
            value="detailpp",
            label="Preset (authors: reproduce the authors' code)",
            elem_id="detailpp-preset",
        )
    c["control"] = gr.Image(  # only with a ControlNet loaded: it guides every branch (resized to the size above)
        type="pil",
        label="Control image (ControlNet; resized to Width x Height)",
        visible=start.controlnet,
        interactive=True,
        height=200,
        elem_id="detailpp-control",
    )
    return c


def output_column(gr: Any, base: str = "SDXL") -> dict[str, Any]:
    """The results: Detail++ and the plain base model (``base``: "SDXL", "FLUX.1"...), the branches, the masks, the
    plan as JSON."""
    c: dict[str, Any] = {}
    shown = {"type": "pil", "format": "png", "height": 300, "interactive": False}
    shown["buttons"] = ["download", "fullscreen"]  # no "share": it uploads to Hugging Face
    with gr.Row():
        c["image"] = gr.Image(label="Detail++", **shown, elem_id="detailpp-image")
        c["plain"] = gr.Image(label=f"plain {base}, same seed", **shown, elem_id="detailpp-plain")
    gallery = {"columns": 4, "height": "auto", "fit_columns": False, "object_fit": "contain", "format": "png"}
    gallery["buttons"] = ["download", "download_all", "fullscreen"]
    c["branches"] = gr.Gallery(label="Branches p0, p1, p2..pn", **gallery, elem_id="detailpp-branches")
    c["masks"] = gr.Gallery(label="Each subject's mask over the image", **gallery, elem_id="detailpp-masks")
    with gr.Accordion("Plan as JSON (for `detailpp generate --plan`)", open=False):
        c["plan_json"] = gr.Code(language="json", elem_id="detailpp-plan-json")
    return c


def intro(gr: Any, session: DemoSession, controlnet: bool, base: str = "SDXL") -> None:
    """The page's heading and what it does."""
    model_note = f"Model: `{session.model_name}`."
    if session.model_name.startswith("tiny-random"):
        model_note += " Its weights are random, so its images are noise: it shows the plumbing only."
    if controlnet:
        model_note += " A ControlNet is loaded: upload a control image; it guides every branch."
    gr.Markdown(
        f"# Detail++ for {base}\n"
        "The prompt is split into a base prompt and one sub-prompt per subject; every branch is denoised in one "
        "batch sharing the full prompt's layout, and each branch may change the image only inside its subject's "
        f"mask. Edit the plan below to correct the parse. {model_note}",
        elem_id="detailpp-intro",
    )


def wire(session: DemoSession, gr: Any, c: dict[str, Any], table_prompt: Any) -> None:
    """The page's events: parse (button, Enter, granularity) and generate, one at a time."""
    on_parse, on_regranulate = parse_handlers(session, gr)
    parse_inputs, parse_outputs = [c["prompt"], c["granularity"]], [c["table"], table_prompt, c["error"], c["status"]]
    parse_inputs += [c["planner"]] if "planner" in c else []
    c["parse"].click(on_parse, parse_inputs, parse_outputs, concurrency_limit=1)
    c["prompt"].submit(on_parse, parse_inputs, parse_outputs, concurrency_limit=1)
    c["granularity"].change(on_regranulate, parse_inputs, parse_outputs, concurrency_limit=1)
    if "planner" in c:
        c["planner"].change(on_regranulate, parse_inputs, parse_outputs, concurrency_limit=1)
    inputs = [c["prompt"], c["table"], table_prompt]
    inputs += [c[k] for k in ("negative", "seed", "steps", "guidance", "tau", "share", "nursing", "granularity")]
    inputs += [c[k] for k in ("height", "width", "compare", "preset", "control")]
    outputs = [c[k] for k in ("image", "plain", "branches", "masks", "plan_json", "table")]
    c["generate"].click(
        generate_handler(session, gr),
        inputs,
        [*outputs, table_prompt, c["error"], c["status"]],
        concurrency_limit=1,
        concurrency_id="detailpp-generate",
    )


def build_demo(
    pipe_or_loader: Any,
    *,
    model_name: str | None = None,
    initial_prompt: str | None = None,
    default_steps: int | None = None,
    default_size: int | None = None,
    default_width: int | None = None,
    default_height: int | None = None,
    max_queue_size: int = 16,
    controlnet: bool | None = None,
    planner: Any = None,
) -> Any:
    """The demo page, as a ``gradio.Blocks`` with its queue set (one generation at a time); see the module doc.

    Args:
        pipe_or_loader: a :class:`~detailpp.DetailPlusPlusPipeline` or a callable returning one (loaded on first use).
        model_name: the model's name as shown in the page (``"tiny-random"``, a Hub id...).
        initial_prompt: the prompt the page opens with (default: the first example prompt for the model); its plan
            fills the table when the pipeline is loaded.
        default_steps, default_size: the page's initial steps and height/width (default: 30 steps on the embedded
            models and 50 otherwise; the model's native size); default_width, default_height: the initial width and
            height when they differ (default: default_size).
        max_queue_size: requests waiting beyond this many are refused with a message.
        controlnet: show the control image (default: whether the loaded pipeline has a ControlNet, e.g.
            :class:`~detailpp.pipelines.sdxl_controlnet.DetailPlusPlusControlNetPipeline`; hidden otherwise).
        planner: an :class:`~detailpp.parsing.llm.LLMPlanner`: the page offers it beside spaCy (and starts with it);
            ``None``: spaCy only.

    Launch it with :func:`launch` (localhost, no share link, no analytics).
    """
    try:
        import gradio as gr
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("The demo needs Gradio: pip install 'detailpp[demo]'.") from e

    session = DemoSession(pipe_or_loader, model_name, planner=planner)
    examples = TOY_EXAMPLE_PROMPTS if model_name == "toy" else EXAMPLE_PROMPTS
    start = page_start(
        session, examples, initial_prompt, default_steps, default_size, default_width, default_height, controlnet
    )
    theme = gr.themes.Default()
    # Result images are files in Gradio's cache: those older than a day go, checked every hour.
    with gr.Blocks(title="Detail++ demo", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        demo.detailpp_theme = theme  # picked up by launch(); Gradio 6 takes theme and css there
        intro(gr, session, start.controlnet, start.base)
        table_prompt = gr.State(start.table_prompt)
        with gr.Row():
            with gr.Column(scale=5):
                c = prompt_and_plan(gr, start) | settings_controls(gr, start)
                c["generate"] = gr.Button("Generate", variant="primary", elem_id="detailpp-generate")
                c["error"] = gr.HTML(visible=False, elem_id="detailpp-error")
                c["status"] = gr.Markdown(elem_id="detailpp-status")
            with gr.Column(scale=6):
                c |= output_column(gr, start.base)
        gr.Examples(examples, inputs=[c["prompt"]], label="Example prompts")
        wire(session, gr, c, table_prompt)
    demo.queue(default_concurrency_limit=1, max_size=max_queue_size)
    return demo


def launch_kwargs(demo: Any) -> dict[str, Any]:
    """Offline, local-only launch settings: no share link, no server-side rendering, no MCP server, and none of
    Gradio's printed notices (the command logs the address; the share-link hint would point at a link it refuses)."""
    return {
        "share": False,
        "quiet": True,
        "ssr_mode": False,
        "mcp_server": False,
        "show_error": False,
        "footer_links": [],
        "theme": getattr(demo, "detailpp_theme", None),
        "css": CSS,
    }


def launch(demo: Any, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> Any:
    """Serve ``demo`` on ``host:port`` (localhost by default); blocks unless ``block=False``."""
    return demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, **launch_kwargs(demo))
