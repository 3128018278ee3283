"""The prompts of a run (test and validation splits), the image seeds, and the plans (subjects and their spans)
Detail++ runs with."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from detailpp.bench import BenchError
from research.toy.scenes import PromptSpec, held_out_prompts

logger = logging.getLogger(__name__)

#: The prompt splits: ``test`` = ``held_out_prompts(n, 0)``; ``validation`` = :func:`validation_prompts`.
SPLITS: tuple[str, ...] = ("test", "validation")
#: Validation prompts avoid every prompt among the first ``TEST_POOL`` test prompts.
TEST_POOL = 1000
TEST_SEED, VALIDATION_SEED = 0, 1


def image_seed(prompt_index: int, seed: int) -> int:
    """The generator seed of image ``seed`` of prompt ``prompt_index`` (the same for every method)."""
    return 10_000 * seed + prompt_index


# ----------------------------------------------------------------------------------------------------------------
# Prompts


def validation_prompts(n: int) -> list[PromptSpec]:
    """``n`` held-out prompts for choosing the toy's hyperparameters, disjoint from the test prompts.

    Hyperparameters of the toy benchmark (a nursing step size, a mask threshold, ...) are chosen on these prompts,
    never on the test prompts whose results are reported: picking them on the test prompts would fit the reported
    numbers to those very prompts. The list is :func:`~research.toy.scenes.held_out_prompts` of seed
    ``VALIDATION_SEED`` without every prompt among the first ``TEST_POOL`` test prompts (``held_out_prompts(TEST_POOL,
    TEST_SEED)``), cut to ``n``. Deterministic, and a shorter list is a prefix of a longer one (both lists are).
    """
    if n <= 0:
        return []
    test = {s.prompt for s in held_out_prompts(TEST_POOL, TEST_SEED)}
    # removing at most TEST_POOL prompts leaves at least n of n + TEST_POOL
    return [s for s in held_out_prompts(n + TEST_POOL, VALIDATION_SEED) if s.prompt not in test][:n]


def split_prompts(n: int, split: str = "test") -> list[PromptSpec]:
    """The first ``n`` prompts of ``split``: ``"test"`` (``held_out_prompts(n, 0)``, what the results report) or
    ``"validation"`` (:func:`validation_prompts`, for choosing hyperparameters)."""
    if split == "test":
        if n > TEST_POOL:
            logger.warning("test prompts beyond the first %d may also be validation prompts", TEST_POOL)
        return held_out_prompts(n, TEST_SEED)
    if split == "validation":
        return validation_prompts(n)
    raise BenchError(f"unknown prompt split {split!r}; choose from {', '.join(SPLITS)}.")


def _split_description(split: str) -> str:
    if split == "test":
        return f"held_out_prompts(n, {TEST_SEED})"
    return (
        f"validation_prompts(n): held_out_prompts(n + {TEST_POOL}, {VALIDATION_SEED}) without the prompts of "
        f"held_out_prompts({TEST_POOL}, {TEST_SEED}), first n"
    )


# ----------------------------------------------------------------------------------------------------------------
# Plans


def _object_phrases(spec: PromptSpec) -> list[tuple[int, int]]:
    """Character spans of each object's full phrase in the prompt, left to right."""
    spans, pos = [], 0
    for o in spec.objects:
        phrase = o.phrase()
        start = spec.prompt.index(phrase, pos)
        spans.append((start, start + len(phrase)))
        pos = start + len(phrase)
    return spans


def scene_plan(spec: PromptSpec, tokenizer) -> dict:
    """The decomposition of a toy prompt read off its scene: p1 drops every colour and texture word, branch k puts
    object k's back. Same rule as :func:`detailpp.parsing.decompose.decompose` (keep the sentence, delete modifiers);
    needs no spaCy. Returns a plan dict with each subject's token indices (repeated shapes point at their own word)."""
    from detailpp.plan import subject_token_indices

    spans = _object_phrases(spec)

    def compose(full: int | None) -> str:
        out, pos = [], 0
        for k, ((s, e), o) in enumerate(zip(spans, spec.objects, strict=True)):
            out.append(spec.prompt[pos:s])
            out.append(o.phrase() if k == full else o.phrase(say_colour=False, say_texture=False))
            pos = e
        out.append(spec.prompt[pos:])
        return "".join(out)

    branches = []
    for k, o in enumerate(spec.objects):
        occurrence = [p.shape for p in spec.objects[:k]].count(o.shape)
        attributes = [w for w in (o.texture if o.texture != "plain" else None, o.colour) if w]
        branches.append(
            {
                "prompt": compose(k),
                "subject": o.shape,
                "attributes": attributes,
                "subject_token_indices": list(subject_token_indices(spec.prompt, o.shape, tokenizer, occurrence)),
            }
        )
    return {"prompt": spec.prompt, "base": compose(None), "granularity": "subject", "branches": branches}


def make_plans(specs: Sequence[PromptSpec], source: str, tokenizer, split: str = "test") -> dict[str, dict]:
    """``{prompt: plan dict}``: ``source`` is ``"parser"`` (spaCy, :func:`detailpp.parsing.decompose.decompose`),
    ``"scene"`` (:func:`scene_plan`) or the path of a JSON file written by an earlier call (``--write-plans``).

    A plans file is keyed by prompt text: it serves a run only if it holds a plan for each of the run's prompts
    (written for the same ``--split`` and at least as many ``--prompts``); otherwise :class:`BenchError` names the
    file and how to write it (``split`` only goes into that message).
    """
    if source == "scene":
        return {s.prompt: scene_plan(s, tokenizer) for s in specs}
    if source == "parser":
        from detailpp.parsing.decompose import decompose

        return {s.prompt: decompose(s.prompt, tokenizer=tokenizer).to_dict() for s in specs}
    rewrite = (
        f"write it with `python -m research.toy.bench --write-plans {source} --prompts {len(specs)} --split {split}` "
        "(the same --prompts and --split as this run)"
    )
    path = Path(source)
    if not path.is_file():
        raise BenchError(f"--plans {source!r} is neither 'parser', 'scene' nor a plans file; {rewrite}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchError(f"cannot read the plans file {source} ({e}); {rewrite}.") from e
    if not isinstance(data, dict):
        raise BenchError(f"the plans file {source} is not a JSON object of prompt -> plan; {rewrite}.")
    missing = [s.prompt for s in specs if s.prompt not in data]
    if missing:
        raise BenchError(
            f"the plans file {source} has no plan for {len(missing)} of the {len(specs)} {split} prompt(s), e.g. "
            f"{missing[0]!r} (plans are keyed by prompt text: was it written for another --split or fewer "
            f"--prompts?); {rewrite}."
        )
    return {s.prompt: data[s.prompt] for s in specs}


def branch_objects(plan: dict, spec: PromptSpec) -> list[int | None]:
    """For each branch of ``plan``, the index of the prompted object it details (``None`` if none fits).

    Branches are taken in the order of their subject's first token and matched, in prompt order, with the objects
    whose shape is the subject.
    """
    branches = plan["branches"]
    order = sorted(range(len(branches)), key=lambda b: min(branches[b].get("subject_token_indices") or [10**6]))
    out: list[int | None] = [None] * len(branches)
    next_obj = 0
    for b in order:
        subject = branches[b]["subject"].split()[-1]
        for k in range(next_obj, len(spec.objects)):
            if spec.objects[k].shape == subject:
                out[b] = k
                next_obj = k + 1
                break
    return out
