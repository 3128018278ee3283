"""A language model's answer as a plan: the JSON read out of its text, then checked by the project's rules.

The model proposes the base prompt and the branches (``{"base": ..., "branches": [{"prompt", "subject",
"attributes"}]}``, the plan format without the prompt and without token indices); the project checks them:

1. The base is p0 with words removed (words compared case-insensitively, "a" and "an" alike, punctuation ignored).
2. Every branch prompt is p0 with words removed, contains the base, and adds exactly its attributes' words to it
   (and at most the small words that carry them: "is", "with", "a", ...). An attribute that the base already holds
   is a modifier left in the base.
3. Every word the base drops comes back in some branch: nothing of p0 is lost.
4. The subject's words are in its branch prompt and in p0; one branch per subject at ``"subject"`` granularity
   (the k-th branch naming a subject written twice in p0 is its k-th occurrence), one attribute per branch at
   ``"attribute"`` granularity.
5. The subject's token indices are computed by the project (:func:`detailpp.plan.subject_token_indices`), never taken
   from the model, and lie inside the text encoder's window (:func:`detailpp.plan.validate_plan`).

A violation raises :class:`AnswerError`, whose message is written so that it can be sent back to the model as is.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from detailpp.plan import (
    Branch,
    DecompositionPlan,
    PlanError,
    find_subject_span,
    subject_token_indices,
    validate_plan,
)

#: small words a branch may add beside its attributes' words ("is red", "with a necklace").
CARRIER_WORDS = frozenset("a the is are was were be been being and or of with in on at to its his her their".split())

_WORD = re.compile(r"\w+(?:['\u2019-]\w+)*")
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


class AnswerError(PlanError):
    """The model's answer is no usable plan; the message says why, in words the model can act on."""


def words(text: str) -> list[str]:
    """The words of ``text`` as the checks compare them: lower case, "an" read as "a", punctuation left out."""
    return ["a" if w == "an" else w for w in (m.group(0).lower().replace("\u2019", "'") for m in _WORD.finditer(text))]


def is_subsequence(part: Sequence[str], whole: Sequence[str]) -> bool:
    """Whether ``part`` is ``whole`` with items removed (order kept)."""
    it = iter(whole)
    return all(any(w == x for x in it) for w in part)


def extract_json(text: str) -> Any:
    """The JSON object in a model's answer: the whole text, else a fenced block, else the outermost braces.

    Raises:
        AnswerError: when no JSON object can be read.
    """
    text = text.strip()
    if not text:
        raise AnswerError("the answer is empty; answer with the plan as a JSON object")
    candidates = [text]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    errors = []
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError as e:
            errors.append(e)
    shown = text if len(text) <= 80 else text[:77] + "..."
    raise AnswerError(f"the answer is not JSON ({errors[0].msg}, character {errors[0].pos}): {shown!r}")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise AnswerError(f"{what} must be a non-empty string, got {json.dumps(value)}")
    return value.strip()


def read_answer(data: Any) -> tuple[str, list[tuple[str, str, tuple[str, ...]]]]:
    """``(base, [(prompt, subject, attributes), ...])`` from the answer's JSON; token indices are dropped."""
    if not isinstance(data, Mapping):
        raise AnswerError(f"the answer must be a JSON object with 'base' and 'branches', got {type(data).__name__}")
    base = _text(data.get("base"), "'base'")
    raw = data.get("branches", [])
    if not isinstance(raw, list):
        raise AnswerError(f"'branches' must be a list, got {type(raw).__name__}")
    branches = []
    for n, b in enumerate(raw, start=1):
        if not isinstance(b, Mapping):
            raise AnswerError(f"branch {n} must be an object with 'prompt', 'subject' and 'attributes'")
        attributes = b.get("attributes", [])
        if isinstance(attributes, str):
            attributes = [attributes]
        if not isinstance(attributes, list):
            raise AnswerError(f"branch {n}: 'attributes' must be a list of strings")
        attrs = tuple(_text(a, f"branch {n}: each attribute") for a in attributes)
        prompt = _text(b.get("prompt"), f"branch {n}: 'prompt'")
        branches.append((prompt, _text(b.get("subject"), f"branch {n}: 'subject'"), attrs))
    return base, branches


def _check_removal(text: str, prompt: str, what: str) -> None:
    if is_subsequence(words(text), words(prompt)):
        return
    extra = [w for w in dict.fromkeys(words(text)) if w not in set(words(prompt))]
    why = (
        f"it has words the prompt has not: {', '.join(extra[:5])}"
        if extra
        else "its words are not in the prompt's order"
    )
    raise AnswerError(f"{what} {text!r} is not the prompt with words removed ({why}); copy the prompt's words")


def _check_branch(base: str, prompt: str, subject: str, attributes: tuple[str, ...]) -> None:
    """Rules 1-2 and 4 for one branch."""
    what = f"the branch for {subject!r}"
    if find_subject_span(prompt, subject) is None:
        raise AnswerError(f"{what}: its prompt {prompt!r} does not contain the subject {subject!r}")
    if not attributes:
        raise AnswerError(f"{what} has no attributes; give only subjects that have modifiers a branch")
    if not is_subsequence(words(base), words(prompt)):
        raise AnswerError(f"{what}: its prompt {prompt!r} is not the base {base!r} plus the subject's modifiers")
    added = Counter(words(prompt)) - Counter(words(base))
    wanted = Counter(w for a in attributes for w in words(a))
    missing = wanted - added
    if missing:
        kept = [w for w in missing if w in Counter(words(base))]
        if kept:
            raise AnswerError(
                f"the base {base!r} keeps the modifier(s) {', '.join(kept)} of {subject!r}; remove every modifier "
                "from the base, and add each back in its subject's branch only"
            )
        raise AnswerError(f"{what}: its prompt {prompt!r} lacks its attribute word(s) {', '.join(missing)}")
    other = [w for w in added - wanted if w not in CARRIER_WORDS]
    if other:
        raise AnswerError(
            f"{what}: its prompt adds {', '.join(other)} to the base, which is none of its attributes "
            f"{list(attributes)}; a branch is the base plus exactly one subject's modifiers"
        )


def _check_coverage(prompt: str, base: str, branches: Sequence[tuple[str, str, tuple[str, ...]]]) -> None:
    """Rule 3: every content word the base drops is added back by some branch."""
    dropped = Counter(words(prompt)) - Counter(words(base))
    restored: Counter[str] = Counter()
    for _, _, attributes in branches:
        restored |= Counter(w for a in attributes for w in words(a))
    lost = [w for w in dropped - restored if w not in CARRIER_WORDS]
    if lost and branches:
        raise AnswerError(
            f"the base drops {', '.join(lost)}, which no branch adds back; give each modifier to its subject's branch "
            "(or keep the word in the base when it is no modifier)"
        )


def plan_from_answer(prompt: str, data: Any, granularity: str, tokenizer: Any) -> DecompositionPlan:
    """The validated plan the answer ``data`` (parsed JSON) proposes for ``prompt``.

    Raises:
        AnswerError: the answer breaks a rule of the module doc (the message can be sent back to the model).
    """
    base, raw = read_answer(data)
    _check_removal(base, prompt, "the base")
    seen: Counter[str] = Counter()
    branches = []
    for text, subject, attributes in raw:
        _check_removal(text, prompt, f"the branch prompt for {subject!r}")
        _check_branch(base, text, subject, attributes)
        if granularity == "attribute" and len(attributes) != 1:
            raise AnswerError(f"the branch for {subject!r} has {len(attributes)} attributes; give one per branch")
        key = " ".join(words(subject))
        occurrence = seen[key] if granularity == "subject" else 0
        seen[key] += 1
        try:
            indices = subject_token_indices(prompt, subject, tokenizer, occurrence)
        except PlanError:
            if find_subject_span(prompt, subject) is None:
                raise AnswerError(
                    f"the subject {subject!r} is not written in the prompt; a subject must be copied from the prompt"
                ) from None
            raise AnswerError(
                f"{seen[key]} branches name the subject {subject!r}, which the prompt has fewer times; give one "
                "branch per subject with all its attributes"
            ) from None
        branches.append(Branch(prompt=text, subject=subject, attributes=attributes, subject_token_indices=indices))
    _check_coverage(prompt, base, raw)
    plan = DecompositionPlan(prompt=prompt, base=base, granularity=granularity, branches=tuple(branches))
    try:
        return validate_plan(plan, tokenizer, prompt)
    except PlanError as e:
        raise AnswerError(str(e).rstrip(".")) from None
