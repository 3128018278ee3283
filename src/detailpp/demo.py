"""The browser demo: a Gradio app that shows the plan, every branch, the masks and plain SDXL side by side.

``detailpp demo`` starts it (:mod:`detailpp.cli.demo`); in Python::

    from detailpp.demo import build_demo, launch
    from detailpp.loading import load_pipeline

    launch(build_demo(load_pipeline("tiny-random")), host="127.0.0.1", port=7860)

The page has a prompt box; the decomposition as an editable table (the base prompt p1, then one row per detail branch
with its sub-prompt and subject; "Parse" refills it from the prompt); the settings (seed, steps, guidance, tau,
share-steps, nursing, granularity, size; tau, share-steps, nursing and granularity start at the model's recommended
values, from its ``detail_config.json``, over DetailConfig's defaults); and, after "Generate", the final image next
to plain SDXL sampled from the same seed, a gallery of every branch (p0, p1, p2..pn) captioned with its sub-prompt,
and each subject's mask over the image. Bad input gets one clear sentence in the page (``#detailpp-error``), never a
traceback. Generations run one at a time per process (a queue of concurrency 1 plus a process-wide lock), so two tabs
cannot mix their runs.

The logic lives in :class:`DemoSession` and a few plain functions (:func:`plan_to_rows`, :func:`rows_to_plan`,
:func:`check_settings`) that need no Gradio; :func:`build_demo` only lays out the page and wires the events.
"""

from __future__ import annotations

import html
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from detailpp.config import PRESETS, DetailConfig
from detailpp.errors import DetailError
from detailpp.images import mask_overlay
from detailpp.inputs import DetailInputError, check_image_side
from detailpp.plan import GRANULARITIES, Branch, DecompositionPlan, PlanError, check_prompt_text, find_subject_span

# Gradio phones home for analytics and a version check unless told not to; the demo must work offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

logger = logging.getLogger(__name__)

#: columns of the plan table: which prompt the row holds ("base" or "branch"), the prompt, the branch's subject.
TABLE_HEADERS = ["role", "prompt", "subject"]
EXAMPLE_PROMPTS = [
    "a red teddy bear wearing a green tracksuit",
    "a red dog with sunglasses and a blue cat with a necklace",
    "a man wearing a brown hat stands in front of a red sports car",
]
#: the embedded toy model only knows coloured, textured shapes
TOY_EXAMPLE_PROMPTS = [
    "a red circle next to a striped blue square",
    "a dotted yellow star and a green heart",
    "a purple triangle, a white cross and an orange circle",
]
MAX_SIDE = 4096
MAX_STEPS = 200
#: one generation at a time in this process, whichever page, tab or Blocks asked for it.
GENERATION_LOCK = threading.Lock()
_LOAD_LOCK = threading.Lock()

CSS = """
#detailpp-error .detailpp-error-box { color: #b91c1c; font-weight: 600; border: 1px solid #fca5a5;
  background: #fef2f2; padding: 8px 12px; border-radius: 6px; }
#detailpp-branches .grid-wrap.fixed-height, #detailpp-masks .grid-wrap.fixed-height {
  min-height: 0; max-height: none; }
#detailpp-branches .caption-label, #detailpp-masks .caption-label { white-space: normal; max-width: 92%;
  font-size: 11px; line-height: 1.25; }
#detailpp-image img, #detailpp-plain img { width: 100%; height: 100%; object-fit: contain; }
"""


class DemoInputError(DetailError, ValueError):
    """Input the demo cannot run with; the message is shown in the page as it is."""


# ---------------------------------------------------------------------------------------------------- the table


def plan_to_rows(plan: DecompositionPlan) -> list[list[str]]:
    """The plan as table rows: ``["base", p1, ""]`` then ``["branch", p_i, subject]`` for each detail branch."""
    return [["base", plan.base, ""], *(["branch", b.prompt, b.subject] for b in plan.branches)]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN, as pandas fills empty cells
        return ""
    return str(value).strip()


def normalize_rows(rows: Any) -> list[list[str]]:
    """Table rows as lists of three stripped strings, from a list of lists, a pandas frame or Gradio's dict."""
    if rows is None:
        return []
    if hasattr(rows, "values") and hasattr(rows, "columns"):  # pandas
        rows = rows.values.tolist()
    elif isinstance(rows, dict):
        rows = rows.get("data", [])
    out = []
    for row in rows:
        cells = [_cell(c) for c in list(row)[: len(TABLE_HEADERS)]]
        out.append(cells + [""] * (len(TABLE_HEADERS) - len(cells)))
    return out


def _filled(row: list[str]) -> bool:
    """A row with neither prompt nor subject is an empty row, not a branch."""
    return bool(row[1] or row[2])


def rows_to_plan(prompt: str, rows: Any, granularity: str = "subject") -> DecompositionPlan:
    """The plan the table describes for ``prompt``; :class:`DemoInputError` names the row and the fix.

    Exactly one row has the role ``base``; every other non-empty row is a detail branch and needs a prompt and a
    subject that is written in ``prompt``. Token indices are left to :func:`detailpp.plan.validate_plan`.
    """
    prompt = check_prompt(prompt)
    table = normalize_rows(rows)
    bases = [i for i, r in enumerate(table) if r[0].lower() == "base"]
    if len(bases) != 1:
        found = "no row" if not bases else f"{len(bases)} rows"
        raise DemoInputError(
            f"The plan table needs exactly one row with role 'base' (the base prompt p1), found {found}; "
            "press Parse to refill the table from the prompt."
        )
    base = table[bases[0]][1]
    if not base:
        raise DemoInputError("The base prompt (the row with role 'base') is empty; write the prompt without details.")
    branches = []
    others = ((i, r) for i, r in enumerate(table) if i != bases[0] and _filled(r))
    for n, (i, row) in enumerate(others, start=2):
        _, sub_prompt, subject = row
        where = f"Row {i + 1} (branch p{n})"
        if not sub_prompt:
            raise DemoInputError(f"{where} has no prompt; write the base prompt plus this subject's details.")
        if not subject:
            raise DemoInputError(
                f"{where} has no subject; write the words of the prompt its details belong to (e.g. 'teddy bear')."
            )
        if find_subject_span(prompt, subject) is None:
            raise DemoInputError(
                f"{where}: the subject {subject!r} does not occur in the prompt {prompt!r}; write it exactly as in "
                "the prompt."
            )
        branches.append(Branch(prompt=sub_prompt, subject=subject))
    return DecompositionPlan(prompt=prompt, base=base, granularity=granularity, branches=tuple(branches))


# ---------------------------------------------------------------------------------------------------- settings


def check_prompt(prompt: Any) -> str:
    try:
        return check_prompt_text(prompt).strip()
    except PlanError as e:
        raise DemoInputError(str(e)) from None


def _as_int(name: str, value: Any) -> int:
    if value is None or value == "":
        raise DemoInputError(f"{name} is empty; give a number.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} must be a number, got {value!r}.") from None
    if number != int(number):
        raise DemoInputError(f"{name} must be a whole number, got {value!r}.")
    return int(number)


@dataclass(frozen=True)
class Settings:
    """Checked generation settings (see :func:`check_settings`)."""

    seed: int
    steps: int
    guidance_scale: float
    height: int
    width: int
    config: DetailConfig


def check_settings(
    *,
    seed: Any,
    steps: Any,
    guidance_scale: Any,
    height: Any,
    width: Any,
    tau: Any,
    share_steps: Any,
    nursing: bool,
    granularity: str,
    preset: str = "detailpp",
) -> Settings:
    """Every setting checked before anything runs; :class:`DemoInputError` says which one and why.

    ``preset``: ``"detailpp"`` (our defaults) or ``"authors"`` (the authors' code, see
    :meth:`DetailConfig.reference_preset`).
    """
    seed_value = _as_int("The seed", seed)
    if not 0 <= seed_value < 2**63:
        raise DemoInputError(f"The seed must lie in [0, 2^63), got {seed_value}.")
    steps_value = _as_int("Steps", steps)
    if not 1 <= steps_value <= MAX_STEPS:
        raise DemoInputError(f"Steps must lie in [1, {MAX_STEPS}], got {steps_value}.")
    sizes = {}
    for name, value in (("Height", height), ("Width", width)):
        side = _as_int(name, value)
        try:
            check_image_side(name, side, hint=" (e.g. 512, 768, 1024)")
        except DetailInputError as e:
            raise DemoInputError(str(e)) from None
        if side > MAX_SIDE:
            raise DemoInputError(f"{name} must be at most {MAX_SIDE} pixels, got {side}.")
        sizes[name] = side
    try:
        guidance = float(guidance_scale)
    except (TypeError, ValueError):
        raise DemoInputError(f"The guidance scale must be a number, got {guidance_scale!r}.") from None
    if guidance < 0:
        raise DemoInputError(f"The guidance scale must be >= 0, got {guidance}.")
    if granularity not in GRANULARITIES:
        raise DemoInputError(f"Granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    try:
        config = DetailConfig.preset(
            preset,
            mask_threshold=float(tau),
            share_steps=float(share_steps),
            nursing=bool(nursing),
            granularity=granularity,
        )
    except (TypeError, ValueError) as e:
        message = str(e).replace("mask_threshold (tau)", "tau").replace("share_steps", "share-steps")
        raise DemoInputError(message) from None
    return Settings(seed_value, steps_value, guidance, sizes["Height"], sizes["Width"], config)


#: The DetailConfig fields the demo's controls set; the model's recommended settings fill in the rest. The controls
#: start at the model's recommended values for these fields (its ``detail_config.json``) over DetailConfig's
#: defaults: see :meth:`DemoSession.initial_config`.
DEMO_FIELDS = ("mask_threshold", "share_steps", "nursing", "granularity")


def _demo_fields(config: DetailConfig) -> dict:
    return {name: getattr(config, name) for name in DEMO_FIELDS}


# ---------------------------------------------------------------------------------------------------- the session


@dataclass
class DemoResult:
    """What one generation shows: images with their captions, the plan used and a one-line summary."""

    image: Any
    plain_image: Any | None
    branches: list[tuple[Any, str]]
    masks: list[tuple[Any, str]]
    plan: DecompositionPlan
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        n = len(self.plan.branches)
        branches = f"{n} detail branch{'es' if n != 1 else ''}" if n else "no detail branch (plain SDXL)"
        return " · ".join([f"Done in {self.seconds:.1f} s", branches, *self.notes])


def branch_captions(plan: DecompositionPlan) -> list[str]:
    """One caption per branch image, p0, p1, p2..pn, each with its sub-prompt."""
    if not plan.branches:
        return [f"p0 (no detail branch: plain SDXL): {plan.prompt}"]
    captions = [f"p0 (full prompt): {plan.prompt}", f"p1 (base): {plan.base}"]
    captions += [f"p{i + 2} ({b.subject}): {b.prompt}" for i, b in enumerate(plan.branches)]
    return captions


class DemoSession:
    """The demo's state and handlers, free of Gradio: one pipeline (loaded on first use) and the settings' defaults.

    Args:
        pipe_or_loader: a :class:`~detailpp.DetailPlusPlusPipeline`, or a callable without arguments returning one
            (called once, on the first request).
        model_name: shown in the page and used to pick defaults (the embedded models get 30 steps, others 50).
    """

    def __init__(self, pipe_or_loader: Any, model_name: str | None = None) -> None:
        if callable(pipe_or_loader) and not hasattr(pipe_or_loader, "unet"):
            self._loader: Callable[[], Any] | None = pipe_or_loader
            self._pipe = None
        else:
            self._loader, self._pipe = None, pipe_or_loader
        self.model = model_name
        self.model_name = model_name or "a custom pipeline"
        self.embedded = model_name in ("toy", "tiny-random")

    @property
    def pipe(self) -> Any:
        if self._pipe is None:
            with _LOAD_LOCK:
                if self._pipe is None:
                    logger.info("loading the model %s", self.model_name)
                    pipe = self._loader()
                    pipe.set_progress_bar_config(disable=True)
                    self._pipe = pipe
        return self._pipe

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    def default_size(self) -> int:
        """The model's native size when it is loaded (1024 for SDXL), else 1024."""
        if self._pipe is None:
            return 1024
        return int(self._pipe.default_sample_size * self._pipe.vae_scale_factor)

    def default_steps(self) -> int:
        return 30 if self.embedded else 50

    def initial_config(self) -> DetailConfig:
        """The settings the page's controls start at: the model's recommended ones over DetailConfig's defaults.

        From the loaded pipeline (:meth:`~detailpp.DetailPlusPlusPipeline.make_detail_config`), or, before a lazy
        loader has run, from the model's ``detail_config.json`` (:func:`detailpp.loading.model_detail_defaults`, when
        the model's name was given). A file that cannot be read logs a warning and gives DetailConfig's defaults.
        """
        try:
            if self._pipe is not None:
                make = getattr(self._pipe, "make_detail_config", None)
                return make() if make is not None else DetailConfig()
            if self.model is not None:
                from detailpp.loading import model_detail_defaults

                return DetailConfig(**model_detail_defaults(self.model))
        except Exception as e:  # the page must open whatever the file holds
            logger.warning(
                "could not read the Detail++ settings recommended for %s (%s: %s); the page starts with "
                "DetailConfig's defaults",
                self.model_name,
                type(e).__name__,
                e,
            )
        return DetailConfig()

    def parse(self, prompt: Any, granularity: str = "subject") -> DecompositionPlan:
        """The spaCy parser's plan for ``prompt`` (with this model's tokenizer)."""
        prompt = check_prompt(prompt)
        if granularity not in GRANULARITIES:
            raise DemoInputError(f"Granularity must be one of {GRANULARITIES}, got {granularity!r}.")
        try:
            return self.pipe.decompose(prompt, granularity)
        except PlanError as e:
            raise DemoInputError(str(e)) from e

    def plan_for(
        self, prompt: Any, rows: Any, table_prompt: str | None, granularity: str
    ) -> tuple[DecompositionPlan, str | None]:
        """The plan to run: the table when it was filled for this prompt, else a fresh parse (and a note saying so)."""
        prompt = check_prompt(prompt)
        if table_prompt is None or table_prompt.strip() != prompt or not any(map(_filled, normalize_rows(rows))):
            note = "the table was made for another prompt, so the prompt was parsed again" if table_prompt else None
            return self.parse(prompt, granularity), note
        return rows_to_plan(prompt, rows, granularity), None

    def generate(
        self,
        prompt: Any,
        rows: Any,
        *,
        table_prompt: str | None,
        settings: Settings,
        negative_prompt: str | None = None,
        compare: bool = True,
        on_step: Callable[[int, int, str], None] | None = None,
    ) -> DemoResult:
        """Run Detail++ (every branch and mask returned) and, with ``compare``, plain SDXL from the same seed.

        Raises:
            DemoInputError: a prompt, plan or setting the pipeline cannot run with.
        """
        plan, note = self.plan_for(prompt, rows, table_prompt, settings.config.granularity)
        negative_prompt = negative_prompt.strip() if negative_prompt and negative_prompt.strip() else None
        total = settings.steps * (2 if compare else 1)

        def callback(stage: str, offset: int) -> Callable[..., dict]:
            def on_step_end(pipe: Any, i: int, t: Any, tensors: dict) -> dict:
                if on_step is not None:
                    on_step(offset + i + 1, total, stage)
                return tensors

            return on_step_end

        common = dict(
            negative_prompt=negative_prompt,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
        )
        with GENERATION_LOCK:
            pipe = self.pipe
            try:
                # the demo's fields over the model's recommended settings (the toy model's nursing step size)
                config = pipe.make_detail_config(settings.config.preset_name, **_demo_fields(settings.config))
                plan = pipe.prepare_plan(plan.prompt, plan, config)
            except (DetailError, ValueError) as e:
                raise DemoInputError(str(e)) from e
            started = time.perf_counter()
            if on_step is not None:
                on_step(0, total, "Detail++")
            out = pipe(
                prompt=plan.prompt,
                plan=plan,
                detail_config=config,
                generator=torch.Generator(device="cpu").manual_seed(settings.seed),
                return_branch_images=True,
                return_masks=True,
                callback_on_step_end=callback("Detail++", 0),
                **common,
            )
            plain = None
            if compare:
                plain = pipe.plain_sdxl()(
                    prompt=plan.prompt,
                    generator=torch.Generator(device="cpu").manual_seed(settings.seed),
                    callback_on_step_end=callback("plain SDXL", settings.steps),
                    **common,
                ).images[0]
            seconds = time.perf_counter() - started
        image = out.images[0]
        branches = list(zip(out.branch_images, branch_captions(plan), strict=True))
        masks = []
        if out.masks is not None:
            tau = config.mask_threshold
            for branch, mask in zip(plan.branches, out.masks, strict=True):
                masks.append((mask_overlay(image, mask > tau), f"{branch.subject} (mask > tau = {tau:g})"))
        notes = [f"seed {settings.seed}", f"{settings.width}x{settings.height}", f"{settings.steps} steps"]
        if note:
            notes.append(note)
        if self.model_name == "tiny-random":
            notes.append("tiny-random has random weights: its images are noise")
        logger.info("generated %r (seed %d) in %.1f s", plan.prompt, settings.seed, seconds)
        return DemoResult(image, plain, branches, masks, plan, seconds, notes)


# ---------------------------------------------------------------------------------------------------- the page


def error_html(message: str) -> str:
    return f'<div class="detailpp-error-box" role="alert">{html.escape(message)}</div>'


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

    Launch it with :func:`launch` (localhost, no share link, no analytics).
    """
    try:
        import gradio as gr
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("The demo needs Gradio: pip install 'detailpp[demo]'.") from e

    session = DemoSession(pipe_or_loader, model_name)
    examples = TOY_EXAMPLE_PROMPTS if model_name == "toy" else EXAMPLE_PROMPTS
    if initial_prompt is None:
        initial_prompt = examples[0]
    steps0 = default_steps or session.default_steps()
    size0 = default_size or session.default_size()
    width0, height0 = default_width or size0, default_height or size0
    config0 = session.initial_config()  # tau, share steps, nursing, granularity: the model's recommendation
    rows0: list[list[str]] = []
    table_prompt0 = None
    if session.loaded and initial_prompt:
        try:
            rows0, table_prompt0 = plan_to_rows(session.parse(initial_prompt, config0.granularity)), initial_prompt
        except DemoInputError:
            logger.warning("could not parse the initial prompt %r", initial_prompt)

    def hidden_error() -> Any:
        return gr.update(value="", visible=False)

    def shown_error(message: str) -> Any:
        return gr.update(value=error_html(message), visible=True)

    def on_parse(prompt: str, granularity: str) -> tuple:
        try:
            plan = session.parse(prompt, granularity)
        except DemoInputError as e:
            return gr.update(), gr.update(), shown_error(str(e)), ""
        except Exception as e:  # a bug must not show a traceback in the page
            logger.exception("parsing %r failed", prompt)
            return gr.update(), gr.update(), shown_error(f"Parsing failed: {type(e).__name__}: {e}"), ""
        n = len(plan.branches)
        status = f"Parsed: {n} detail branch{'es' if n != 1 else ''}." if n else "Parsed: no detail branch."
        return plan_to_rows(plan), plan.prompt, hidden_error(), status

    def on_regranulate(prompt: str, granularity: str) -> tuple:
        """A new granularity re-parses the prompt; with no prompt yet there is nothing to say."""
        if not isinstance(prompt, str) or not prompt.strip():
            return gr.update(), gr.update(), gr.update(), gr.update()
        return on_parse(prompt, granularity)

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
            )
        except DemoInputError as e:
            return (*keep, shown_error(str(e)), "")
        except Exception as e:  # a bug or an out-of-memory must not show a traceback in the page
            logger.exception("generation failed")
            first_line = str(e).splitlines()[0] if str(e) else ""
            message = f"Generation failed: {type(e).__name__}: {first_line} (details in the server log)."
            return (*keep, shown_error(message), "")
        return (
            result.image,
            result.plain_image,
            result.branches,
            result.masks,
            result.plan.to_json(indent=2),
            plan_to_rows(result.plan),
            result.plan.prompt,
            hidden_error(),
            result.summary,
        )

    theme = gr.themes.Default()
    # Result images are files in Gradio's cache: those older than a day go, checked every hour.
    with gr.Blocks(title="Detail++ demo", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        demo.detailpp_theme = theme  # picked up by launch(); Gradio 6 takes theme and css there
        model_note = f"Model: `{session.model_name}`."
        if session.model_name == "tiny-random":
            model_note += " Its weights are random, so its images are noise: it shows the plumbing only."
        gr.Markdown(
            "# Detail++ for SDXL\n"
            "The prompt is split into a base prompt and one sub-prompt per subject; every branch is denoised in one "
            "batch sharing the full prompt's layout, and each branch may change the image only inside its subject's "
            f"mask. Edit the plan below to correct the parse. {model_note}",
            elem_id="detailpp-intro",
        )
        table_prompt = gr.State(table_prompt0)
        with gr.Row():
            with gr.Column(scale=5):
                prompt = gr.Textbox(
                    value=initial_prompt, label="Prompt", lines=1, elem_id="detailpp-prompt", placeholder="a red ..."
                )
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="detailpp-negative")
                with gr.Row():
                    granularity = gr.Radio(
                        list(GRANULARITIES),
                        value=config0.granularity,
                        label="Granularity",
                        elem_id="detailpp-granularity",
                    )
                    parse = gr.Button("Parse", elem_id="detailpp-parse")
                table = gr.Dataframe(
                    value=rows0 or None,
                    headers=TABLE_HEADERS,
                    datatype="str",
                    type="array",
                    interactive=True,
                    row_count=max(len(rows0), 1),
                    column_count=len(TABLE_HEADERS),
                    label="Plan: the base prompt p1, then one row per detail branch (its prompt and subject)",
                    elem_id="detailpp-plan",
                    wrap=True,
                    column_widths=["16%", "59%", "25%"],
                )
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="detailpp-seed")
                    steps = gr.Slider(1, 100, value=steps0, step=1, label="Steps", elem_id="detailpp-steps")
                    guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance", elem_id="detailpp-guidance")
                with gr.Row():
                    tau = gr.Slider(  # (a recommended tau outside the usual range widens it)
                        min(0.05, config0.mask_threshold),
                        max(0.95, config0.mask_threshold),
                        value=config0.mask_threshold,
                        step=0.05,
                        label="Mask threshold τ",
                        elem_id="detailpp-tau",
                    )
                    share = gr.Slider(
                        0, 1, value=config0.share_steps, step=0.05, label="Share steps S/T", elem_id="detailpp-share"
                    )
                    nursing = gr.Checkbox(value=config0.nursing, label="Attention nursing", elem_id="detailpp-nursing")
                with gr.Row():
                    width = gr.Number(value=width0, precision=0, step=8, label="Width", elem_id="detailpp-width")
                    height = gr.Number(value=height0, precision=0, step=8, label="Height", elem_id="detailpp-height")
                    compare = gr.Checkbox(value=True, label="Also plain SDXL, same seed", elem_id="detailpp-compare")
                    preset = gr.Radio(
                        list(PRESETS),
                        value="detailpp",
                        label="Preset (authors: reproduce the authors' code)",
                        elem_id="detailpp-preset",
                    )
                generate = gr.Button("Generate", variant="primary", elem_id="detailpp-generate")
                error = gr.HTML(visible=False, elem_id="detailpp-error")
                status = gr.Markdown(elem_id="detailpp-status")
            with gr.Column(scale=6):
                shown = {"type": "pil", "format": "png", "height": 300, "interactive": False}
                shown["buttons"] = ["download", "fullscreen"]  # no "share": it uploads to Hugging Face
                with gr.Row():
                    image = gr.Image(label="Detail++", **shown, elem_id="detailpp-image")
                    plain = gr.Image(label="plain SDXL, same seed", **shown, elem_id="detailpp-plain")
                gallery = {
                    "columns": 4,
                    "height": "auto",
                    "fit_columns": False,
                    "object_fit": "contain",
                    "format": "png",
                }
                gallery["buttons"] = ["download", "download_all", "fullscreen"]
                branches = gr.Gallery(label="Branches p0, p1, p2..pn", **gallery, elem_id="detailpp-branches")
                masks = gr.Gallery(label="Each subject's mask over the image", **gallery, elem_id="detailpp-masks")
                with gr.Accordion("Plan as JSON (for `detailpp generate --plan`)", open=False):
                    plan_json = gr.Code(language="json", elem_id="detailpp-plan-json")
        gr.Examples(examples, inputs=[prompt], label="Example prompts")

        parse_outputs = [table, table_prompt, error, status]
        parse.click(on_parse, [prompt, granularity], parse_outputs, concurrency_limit=1)
        prompt.submit(on_parse, [prompt, granularity], parse_outputs, concurrency_limit=1)
        granularity.change(on_regranulate, [prompt, granularity], parse_outputs, concurrency_limit=1)
        generate.click(
            on_generate,
            [prompt, table, table_prompt, negative, seed, steps, guidance, tau, share, nursing, granularity]
            + [height, width, compare, preset],
            [image, plain, branches, masks, plan_json, table, table_prompt, error, status],
            concurrency_limit=1,
            concurrency_id="detailpp-generate",
        )
    demo.queue(default_concurrency_limit=1, max_size=max_queue_size)
    return demo


def launch_kwargs(demo: Any) -> dict[str, Any]:
    """Offline, local-only launch settings: no share link, no server-side rendering, no MCP server."""
    return {
        "share": False,
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
