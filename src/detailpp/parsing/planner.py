"""Planners: what turns a prompt into a decomposition plan (paper, step 1: "with a language model, such as spaCy or
ChatGPT"). Two ship: :class:`SpacyPlanner` (the grammar of :mod:`detailpp.parsing.decompose`, the default) and
:class:`~detailpp.parsing.llm.LLMPlanner` (any OpenAI-compatible server). :func:`plan_prompt` is the one way a
prompt, a planner, a granularity and a tokenizer become a validated plan (with a ``notice`` when the planner fell
back); :func:`plan_prompts` does it for many prompts.

A planner is any object with ``name``, ``identity()``, ``check(prompts, granularity)`` and
``propose(prompt, granularity, tokenizer)`` (:class:`Planner`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

from detailpp.plan import DecompositionPlan, PlanError, validate_plan

#: the planners the command line offers.
PLANNERS: tuple[str, ...] = ("spacy", "llm")


@runtime_checkable
class Planner(Protocol):
    """Makes the plan of a prompt."""

    name: str

    def identity(self) -> dict[str, str]:
        """What the plans depend on (``{"planner": ..., "model": ..., ...}``): cache keys and run manifests."""
        ...

    def check(self, prompts: Sequence[str] = (), granularity: str = "subject") -> None:
        """Fail early (before any model loads) when the planner cannot work; one line."""
        ...

    def propose(self, prompt: str, granularity: str, tokenizer: Any) -> DecompositionPlan:
        """The plan of ``prompt``, its token indices computed with ``tokenizer``."""
        ...


class SpacyPlanner:
    """The spaCy grammar of :mod:`detailpp.parsing.decompose` (the default planner)."""

    name = "spacy"

    def __repr__(self) -> str:
        return "SpacyPlanner()"

    def identity(self) -> dict[str, str]:
        return {"planner": self.name}

    def check(self, prompts: Sequence[str] = (), granularity: str = "subject") -> None:
        return None

    def propose(self, prompt: str, granularity: str, tokenizer: Any) -> DecompositionPlan:
        from detailpp.parsing.decompose import decompose

        return decompose(prompt, granularity, tokenizer=tokenizer)


def resolve_planner(planner: Planner | str | None) -> Planner:
    """``None`` and ``"spacy"``: :class:`SpacyPlanner`; a planner object as it is."""
    if planner is None or planner == "spacy":
        return SpacyPlanner()
    if isinstance(planner, str):
        hint = " (pass LLMPlanner(model=..., base_url=...) from detailpp.parsing.llm)" if planner == "llm" else ""
        raise PlanError(f"Unknown planner {planner!r}: give 'spacy' or a planner object{hint}.")
    if not isinstance(planner, Planner):
        raise PlanError(
            f"`planner` must be 'spacy' or a planner (SpacyPlanner, LLMPlanner), got {type(planner).__name__}."
        )
    return planner


def plan_prompt(
    prompt: str, planner: Planner | str | None = None, granularity: str = "subject", tokenizer: Any | None = None
) -> DecompositionPlan:
    """The validated plan of ``prompt`` made by ``planner`` (default spaCy), token indices by ``tokenizer``.

    Args:
        prompt: p0.
        planner: ``None``/``"spacy"``, or a :class:`Planner` such as :class:`~detailpp.parsing.llm.LLMPlanner`.
        granularity: ``"subject"`` or ``"attribute"``.
        tokenizer: the text encoder's tokenizer (default: SDXL's CLIP tokenizer, packaged).

    Returns:
        The plan; its ``notice`` says why when the planner fell back (the LLM planner to spaCy's plan).

    Raises:
        PlanError: the prompt cannot be planned (empty, prompt-weight syntax, a subject beyond the window).
        LLMError: the language model server failed (one line).
    """
    from detailpp.parsing.nlp import default_tokenizer

    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    planner = resolve_planner(planner)
    plan = planner.propose(prompt, granularity, tokenizer)
    return plan if isinstance(planner, SpacyPlanner) else validate_plan(plan, tokenizer, prompt)


def decompose(
    prompt: str,
    granularity: str = "subject",
    *,
    planner: Planner | str | None = None,
    nlp: Any | None = None,
    tokenizer: Any | None = None,
) -> DecompositionPlan:
    """:func:`detailpp.parsing.decompose.decompose` (spaCy, ``nlp=`` injectable) with a choice of planner:
    ``planner=LLMPlanner(...)`` asks a language model (:func:`plan_prompt`). ``detailpp.decompose`` is this."""
    if planner is None or planner == "spacy" or isinstance(planner, SpacyPlanner):
        from detailpp.parsing.decompose import decompose as spacy_decompose

        return spacy_decompose(prompt, granularity, nlp=nlp, tokenizer=tokenizer)
    return plan_prompt(prompt, planner, granularity, tokenizer)


def plan_each(
    prompts: Sequence[str],
    planner: Planner | str | None = None,
    granularity: str = "subject",
    tokenizer: Any | None = None,
    concurrency: int = 4,
) -> list[DecompositionPlan | PlanError]:
    """Each prompt's plan, or the :class:`PlanError` that prompt raised (one bad prompt fails alone: ``decompose
    --file``): spaCy in batches, another planner with up to ``concurrency`` requests at once (each distinct prompt
    asked once). A planner that cannot work at all (a server out of reach) raises for all."""
    from detailpp.parsing.decompose import decompose_each
    from detailpp.parsing.nlp import default_tokenizer

    planner = resolve_planner(planner)
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    prompts = list(prompts)
    if isinstance(planner, SpacyPlanner):
        return decompose_each(prompts, granularity, tokenizer=tokenizer)
    if concurrency < 1:
        raise PlanError(f"The concurrency must be at least 1, got {concurrency}.")
    planner.check(prompts, granularity)
    distinct = list(dict.fromkeys(prompts))

    def one(prompt: str) -> DecompositionPlan | PlanError:
        try:
            return plan_prompt(prompt, planner, granularity, tokenizer)
        except PlanError as e:
            return e

    with ThreadPoolExecutor(max_workers=min(concurrency, len(distinct) or 1)) as pool:
        plans = dict(zip(distinct, pool.map(one, distinct), strict=True))
    return [plans[p] for p in prompts]


def plan_prompts(
    prompts: Sequence[str],
    planner: Planner | str | None = None,
    granularity: str = "subject",
    tokenizer: Any | None = None,
    concurrency: int = 4,
) -> list[DecompositionPlan]:
    """:func:`plan_each` that raises the first prompt's failure.

    Raises:
        PlanError: for the first prompt that fails, naming its position when there are several.
    """
    results = plan_each(prompts, planner, granularity, tokenizer, concurrency)
    for n, result in enumerate(results):
        if isinstance(result, PlanError):
            raise PlanError(f"prompt {n + 1}: {result}" if len(results) > 1 else str(result)) from None
    return results  # type: ignore[return-value] - no PlanError left
