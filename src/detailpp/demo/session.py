"""The demo's session and its rules, with no Gradio: the plan as an editable table (:func:`plan_to_rows`,
:func:`rows_to_plan`), the settings' checks (:func:`check_settings`) and :class:`DemoSession`, which loads the model
once, runs one generation at a time and returns everything the page shows (:class:`DemoResult`).

:mod:`detailpp.demo.page` lays out the page and wires its events to a session.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from detailpp.config import DetailConfig
from detailpp.errors import DetailError
from detailpp.images import mask_overlay
from detailpp.inputs import (
    DetailInputError,
    check_guidance,
    check_image_side,
    check_prompt_window,
    check_scheduler_steps,
    check_seed,
    check_steps,
)
from detailpp.plan import (
    GRANULARITIES,
    Branch,
    DecompositionPlan,
    PlanError,
    check_prompt_text,
    find_subject_span,
    plan_rewrites,
)

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
#: one generation at a time in this process, whichever page, tab or Blocks asked for it.
GENERATION_LOCK = threading.Lock()
_LOAD_LOCK = threading.Lock()


class DemoInputError(DetailError, ValueError):
    """Input the demo cannot run with; the message is shown in the page as it is."""


# ---------------------------------------------------------------------------------------------------- the table


#: The short name of each family's plain model, as the page labels the comparison.
BASE_LABELS = {"sdxl": "SDXL", "sd": "SD", "flux": "FLUX.1", "sd3": "SD3"}


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

    Exactly one row has the role ``base``; every other non-empty row is a detail branch (role ``branch``, or empty;
    any other role is refused) and needs a prompt and a subject that is written in ``prompt``. Token indices are left
    to :func:`detailpp.plan.validate_plan`.
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
        role, sub_prompt, subject = row
        where = f"Row {i + 1} (branch p{n})"
        if role.lower() not in ("branch", ""):
            raise DemoInputError(
                f"Row {i + 1} has the role {role!r}; a row's role is 'base' (one row) or 'branch' (or empty, for a "
                "branch)."
            )
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
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # (exact: a float would round the seeds near 2^64)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number) or number != int(number):
        raise DemoInputError(f"{name} must be a whole number, got {value!r}.")
    return int(number)


def _as_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} must be a number, got {value!r}.") from None


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
    :meth:`DetailConfig.authors_preset`).
    """
    try:  # the rules of detailpp.inputs, as the CLI and the Python API word them (with the page's names)
        seed_value = check_seed("The seed", _as_int("The seed", seed))
        steps_value = check_steps("Steps", _as_int("Steps", steps))
        sizes = {
            name: check_image_side(name, _as_int(name, value), hint=" (e.g. 512, 768, 1024)")
            for name, value in (("Height", height), ("Width", width))
        }
        guidance = check_guidance("The guidance scale", _as_float("The guidance scale", guidance_scale))
    except DetailInputError as e:
        raise DemoInputError(str(e)) from None
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
        planner: the planner the prompt is parsed with: ``None`` (spaCy), or an
            :class:`~detailpp.parsing.llm.LLMPlanner`, which the page then offers beside spaCy.
    """

    def __init__(self, pipe_or_loader: Any, model_name: str | None = None, planner: Any = None) -> None:
        is_pipe = hasattr(pipe_or_loader, "unet") or hasattr(pipe_or_loader, "transformer")
        if callable(pipe_or_loader) and not is_pipe:
            self._loader: Callable[[], Any] | None = pipe_or_loader
            self._pipe = None
        else:
            self._loader, self._pipe = None, pipe_or_loader
        self.model = model_name
        self.model_name = model_name or "a custom pipeline"
        self.embedded = model_name == "toy" or (model_name or "").startswith("tiny-random")
        self.planner = None if planner is None or getattr(planner, "name", planner) == "spacy" else planner

    @property
    def planners(self) -> list[str]:
        """The planners the page offers: ``["spacy"]``, and ``"llm"`` when a language model is set up."""
        return ["spacy"] if self.planner is None else ["spacy", self.planner.name]

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

    @property
    def has_controlnet(self) -> bool:
        """Whether the loaded pipeline has a ControlNet (its calls then need a control image)."""
        return self._pipe is not None and getattr(self._pipe, "controlnet", None) is not None

    def default_size(self) -> int:
        """The model's native size when it is loaded (1024 for SDXL), else 1024."""
        if self._pipe is None:
            return 1024
        return int(self._pipe.default_sample_size * self._pipe.vae_scale_factor)

    def default_steps(self) -> int:
        """30 on the embedded models, else the loaded pipeline's default (SDXL 50, FLUX.1-dev and SD3 28,
        FLUX.1-schnell 4), 50 before it is loaded."""
        if self.embedded:
            return 30
        steps = getattr(self._pipe, "default_num_inference_steps", None)
        return int(steps) if steps is not None else 50

    def default_guidance(self) -> float:
        """The loaded pipeline's default guidance scale (SDXL 5.0, SD 7.5, FLUX.1 3.5, SD3 7.0), 5.0 before."""
        guidance = getattr(self._pipe, "default_guidance_scale", None)
        return float(guidance) if guidance is not None else 5.0

    @property
    def base_label(self) -> str:
        """The plain model the page compares with: "SDXL", "SD", "FLUX.1", "SD3" (SDXL before it is loaded)."""
        from detailpp.models.families import UnsupportedModelError, family_of_class

        if self._pipe is None:
            return "SDXL"
        try:
            family = family_of_class(type(self._pipe).__name__)
        except UnsupportedModelError:
            return "SDXL"
        return BASE_LABELS.get(family.name, "SDXL")

    def initial_config(self) -> DetailConfig:
        """The settings the page's controls start at: the model's recommended ones over DetailConfig's defaults.

        From the loaded pipeline (:meth:`~detailpp.DetailPlusPlusPipeline.make_detail_config`), or, before a lazy
        loader has run, from the model's ``detail_config.json`` (:func:`detailpp.models.loading.model_detail_defaults`,
        when the model's name was given). A file that cannot be read logs a warning and gives DetailConfig's defaults.
        """
        try:
            if self._pipe is not None:
                make = getattr(self._pipe, "make_detail_config", None)
                return make() if make is not None else DetailConfig()
            if self.model is not None:
                from detailpp.models.loading import model_detail_defaults

                return DetailConfig.from_fields(defaults=model_detail_defaults(self.model))
        except Exception as e:  # the page must open whatever the file holds
            logger.warning(
                "could not read the Detail++ settings recommended for %s (%s: %s); the page starts with "
                "DetailConfig's defaults",
                self.model_name,
                type(e).__name__,
                e,
            )
        return DetailConfig()

    def parse(self, prompt: Any, granularity: str = "subject", planner: str | None = None) -> DecompositionPlan:
        """The plan for ``prompt`` (with this model's tokenizer) by ``planner`` (``"spacy"``, ``"llm"``; default: the
        session's, see :attr:`planners`); a failure of the language model server is one :class:`DemoInputError`."""
        from detailpp.parsing.llm import LLMError

        prompt = check_prompt(prompt)
        if granularity not in GRANULARITIES:
            raise DemoInputError(f"Granularity must be one of {GRANULARITIES}, got {granularity!r}.")
        if planner is not None and planner not in self.planners:
            raise DemoInputError(f"Planner must be one of {self.planners}, got {planner!r}.")
        chosen = self.planner if planner != "spacy" else None
        try:
            if chosen is None:
                return self.pipe.decompose(prompt, granularity)
            return self.pipe.decompose(prompt, granularity, chosen)
        except (PlanError, LLMError) as e:
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
        control_image: Any | None = None,
    ) -> DemoResult:
        """Run Detail++ (every branch and mask returned) and, with ``compare``, plain SDXL from the same seed;
        with a ControlNet loaded, both under ``control_image`` (resized to the page's size).

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
            common |= control_arguments(pipe, control_image, settings)
            try:
                # the demo's fields over the model's recommended settings (the toy model's nursing step size)
                config = pipe.make_detail_config(settings.config.preset_name, **_demo_fields(settings.config))
                plan = pipe.prepare_plan(plan.prompt, plan, config)
                check_plan_texts(pipe, plan, negative_prompt, settings.steps)
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
                plain = pipe.plain_pipeline()(
                    prompt=plan.prompt,
                    generator=torch.Generator(device="cpu").manual_seed(settings.seed),
                    callback_on_step_end=callback(f"plain {self.base_label}", settings.steps),
                    **common,
                ).images[0]
            seconds = time.perf_counter() - started
        logger.info("generated %r (seed %d) in %.1f s", plan.prompt, settings.seed, seconds)
        stamp_parameters(out.images[0], plain, pipe, plan, config, settings, negative_prompt, self.model_name)
        notes = [n for n in [note, *plan_rewrites(plan)] if n]  # a hand-edited branch that rewrites the prompt
        return self.result(out, plain, plan, config, settings, "; ".join(notes) or None, seconds)

    def result(
        self,
        out: Any,
        plain: Any,
        plan: DecompositionPlan,
        config: DetailConfig,
        settings: Settings,
        note: str | None,
        seconds: float,
    ) -> DemoResult:
        """What the page shows of one generation: the image, the plain one, every branch, the masks, notes."""
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
        if self.model_name.startswith("tiny-random"):
            notes.append(f"{self.model_name} has random weights: its images are noise")
        return DemoResult(image, plain, branches, masks, plan, seconds, notes)


def stamp_parameters(
    image: Any,
    plain: Any | None,
    pipe: Any,
    plan: DecompositionPlan,
    config: DetailConfig,
    settings: Settings,
    negative_prompt: str | None,
    model: str,
) -> None:
    """The generation parameters in the images' PNG text chunks, as ``detailpp generate`` writes them (A1111's
    ``parameters``, the settings and plan as JSON in ``detailpp``): an image downloaded from the page carries them
    (Gradio copies a PIL image's text info into the PNG it serves)."""
    from detailpp.images import a1111_parameters, a1111_sampler, dumps

    sampler = a1111_sampler(pipe.scheduler) if getattr(pipe, "scheduler", None) is not None else "?"
    common = (settings.steps, sampler, settings.guidance_scale, settings.seed, settings.width, settings.height, model)
    extra = {
        "Detail++ tau": config.mask_threshold,
        "Detail++ share steps": config.share_steps,
        "Detail++ nursing": config.nursing,
        "Detail++ preset": config.preset_name,
        "Detail++ branches": len(plan.branches),
    }
    record = {"prompt": plan.prompt, "negative_prompt": negative_prompt, "model": model, "seed": settings.seed}
    record |= {"steps": settings.steps, "guidance_scale": settings.guidance_scale, "sampler": sampler}
    record |= {"width": settings.width, "height": settings.height}
    image.info["parameters"] = a1111_parameters(plan.prompt, negative_prompt, *common, extra)
    image.info["detailpp"] = dumps(record | {"detail_config": config.to_dict(), "plan": plan.to_dict()})
    if plain is not None:
        plain.info["parameters"] = a1111_parameters(plan.prompt, negative_prompt, *common, {"Method": "plain"})


def check_plan_texts(pipe: Any, plan: DecompositionPlan, negative_prompt: str | None, steps: int) -> None:
    """The rules the pipeline's call checks, with the page's names, before the run starts: the 75-token window of
    every text the plan encodes (refused, as everywhere: :func:`detailpp.inputs.check_prompt_window`) and the
    scheduler's own limit on the steps."""
    for text, what in plan.texts_to_encode(negative_prompt):
        check_prompt_window(text, what, getattr(pipe, "plan_tokenizer", pipe.tokenizer))
    check_scheduler_steps(pipe.scheduler, steps, "Steps")


def control_arguments(pipe: Any, control_image: Any | None, settings: Settings) -> dict:
    """``image=`` for a pipeline with a ControlNet: the control image at the page's size (``{}`` without one)."""
    if getattr(pipe, "controlnet", None) is None:
        return {}
    if control_image is None:
        raise DemoInputError("This model has a ControlNet: upload a control image (an edge map, a depth map...).")
    image = control_image.convert("RGB")
    if image.size != (settings.width, settings.height):
        image = image.resize((settings.width, settings.height))
    return {"image": image}
