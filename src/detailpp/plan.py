"""The decomposition plan: the prompt p0, the base prompt p1 and one sub-prompt per subject (paper, step 1).

A plan is what the prompt parser (:mod:`detailpp.parsing.decompose`) produces and what the pipeline consumes. It can
also be written by hand (a JSON file or a Python object); :func:`validate_plan` then checks it against the prompt and
the tokenizer before any denoising starts.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from detailpp.errors import DetailError

logger = logging.getLogger(__name__)

Granularity = Literal["subject", "attribute"]
GRANULARITIES: tuple[str, ...] = ("subject", "attribute")

#: CLIP's context window: start token + 75 text tokens + end token.
CLIP_MAX_TOKENS = 77
#: The most detail branches a plan may have: each adds two rows (with CFG) to every denoising step of the sharing
#: window, and a nursing target; 16 subjects is far beyond what one image shows distinctly.
MAX_BRANCHES = 16


class PlanError(DetailError, ValueError):
    """A plan (or a prompt) that cannot be used; the message names the problem and the fix."""


@dataclass(frozen=True)
class Branch:
    """One detail branch: ``prompt`` is the base prompt plus the ``attributes`` of one ``subject``.

    Attributes:
        prompt: the sub-prompt this branch is denoised with.
        subject: the subject's words as they appear in p0 (``"teddy bear"``); its cross-attention mask confines
            the branch's latent changes.
        attributes: the modifier words or phrases this branch adds (``["red"]``, ``["with a necklace"]``).
        subject_token_indices: positions of the subject's tokens in SDXL's CLIP tokenization of p0 (start token =
            0; sub-word tokens included).
    """

    prompt: str
    subject: str
    attributes: tuple[str, ...] = ()
    subject_token_indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", tuple(self.attributes))
        object.__setattr__(self, "subject_token_indices", tuple(int(i) for i in self.subject_token_indices))


@dataclass(frozen=True)
class DecompositionPlan:
    """p0, p1 and the detail branches p2..pn, JSON round-trippable (:meth:`to_json` / :meth:`from_json`).

    Attributes:
        notice: set when the parser declined to read the prompt (not English, or not readable with confidence)
            and fell back to zero branches (plain SDXL): the reason, for the user, with a pointer to ``--plan``.
            ``None`` otherwise (also for the ordinary zero-branch plans of prompts without modifiers or with one
            subject, which are logged at INFO level only); left out of the JSON when ``None``.
    """

    prompt: str
    base: str
    granularity: Granularity = "subject"
    branches: tuple[Branch, ...] = field(default_factory=tuple)
    notice: str | None = None

    def __post_init__(self) -> None:
        branches = tuple(b if isinstance(b, Branch) else Branch(**b) for b in self.branches)
        object.__setattr__(self, "branches", branches)

    @property
    def prompts(self) -> list[str]:
        """The prompts of every branch of the UNet batch, in order: p0, p1, p2..pn."""
        return [self.prompt, self.base, *(b.prompt for b in self.branches)]

    @property
    def subjects(self) -> list[str]:
        return [b.subject for b in self.branches]

    def texts_to_encode(self, negative_prompt: str | None = None) -> list[tuple[str, str]]:
        """``(text, what)`` for every text a call encodes with this plan: p0, then (with detail branches) p1 and each
        sub-prompt, then the negative prompt when given; ``what`` names it in messages."""
        texts = [(self.prompt, "prompt")]
        if self.branches:
            texts.append((self.base, "base prompt"))
            texts += [(b.prompt, f"sub-prompt of {b.subject!r}") for b in self.branches]
        if negative_prompt:
            texts.append((negative_prompt, "negative prompt"))
        return texts

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["branches"] = [
            {**b, "attributes": list(b["attributes"]), "subject_token_indices": list(b["subject_token_indices"])}
            for b in out["branches"]
        ]
        if out["notice"] is None:
            del out["notice"]
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecompositionPlan:
        if not isinstance(data, Mapping):
            raise PlanError(f"A plan must be a JSON object, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"The plan has unknown field(s) {unknown}; a plan's fields are {sorted(known)}.")
        missing = [k for k in ("prompt", "base") if k not in data]
        if missing:
            raise PlanError(f"The plan lacks the field(s) {missing}; a plan needs 'prompt', 'base' and 'branches'.")
        branches = []
        for i, b in enumerate(data.get("branches", [])):
            if not isinstance(b, Mapping) or "prompt" not in b or "subject" not in b:
                raise PlanError(f"Branch {i} of the plan needs at least 'prompt' and 'subject', got {b!r}.")
            unknown = set(b) - {"prompt", "subject", "attributes", "subject_token_indices"}
            if unknown:
                raise PlanError(f"Branch {i} of the plan has unknown field(s) {sorted(unknown)}.")
            branches.append(Branch(**b))
        granularity = data.get("granularity", "subject")
        if granularity not in GRANULARITIES:
            raise PlanError(f"Unknown granularity {granularity!r}; use one of {GRANULARITIES}.")
        notice = data.get("notice")
        if notice is not None and not isinstance(notice, str):
            raise PlanError(f"The plan's 'notice' must be text, got {type(notice).__name__}.")
        return cls(
            prompt=data["prompt"], base=data["base"], granularity=granularity, branches=tuple(branches), notice=notice
        )

    @classmethod
    def from_json(cls, text: str) -> DecompositionPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"The plan is not valid JSON ({e}).") from e
        return cls.from_dict(data)


def check_prompt_text(text: Any, what: str = "The prompt", example: str = "") -> str:
    """The rule for a prompt's text, wherever it is entered: words to draw. Raises :class:`PlanError`."""
    if not isinstance(text, str) or not text.strip():
        raise PlanError(f"{what} is empty; write what the image should show{example}.")
    return text


def load_plan(source: DecompositionPlan | Mapping[str, Any] | str | Path) -> DecompositionPlan:
    """A plan from a :class:`DecompositionPlan`, a dict, a JSON string or the path of a JSON file."""
    if isinstance(source, DecompositionPlan):
        return source
    if isinstance(source, Mapping):
        return DecompositionPlan.from_dict(source)
    path = Path(source)
    if isinstance(source, Path) or (not str(source).lstrip().startswith("{") and path.suffix == ".json"):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise PlanError(f"Cannot read the plan file {str(path)!r}: {e.strerror}.") from e
        return DecompositionPlan.from_json(text)
    return DecompositionPlan.from_json(str(source))


def find_subject_span(prompt: str, subject: str, occurrence: int = 0) -> tuple[int, int] | None:
    """Character span of the ``occurrence``-th whole-word, case-insensitive match of ``subject`` in ``prompt``."""
    words = subject.split()
    if not words:
        return None
    pattern = r"(?<!\w)" + r"[\s]+".join(re.escape(w) for w in words) + r"(?!\w)"
    matches = list(re.finditer(pattern, prompt, flags=re.IGNORECASE))
    if occurrence >= len(matches):
        return None
    return matches[occurrence].span()


def token_indices_for_span(prompt: str, start: int, end: int, tokenizer: Any) -> tuple[int, ...]:
    """Positions (start token = 0) of the CLIP tokens of ``prompt`` that overlap the characters ``[start, end)``.

    The tokenization is not truncated, so positions past CLIP's window come back as they are; callers check them.
    """
    if getattr(tokenizer, "is_fast", True):
        enc = tokenizer(prompt, return_offsets_mapping=True, truncation=False, add_special_tokens=True)
        return tuple(i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start)

    # Slow (Python) tokenizers have no offsets. CLIP's BPE never merges across the words of its pre-tokenizer and a
    # span starts and ends on word boundaries, so counting the tokens of the text before and up to the span works.
    def count(text: str) -> int:
        return len(tokenizer(text, truncation=False, add_special_tokens=False)["input_ids"])

    first = 1 + count(prompt[:start])
    return tuple(range(first, 1 + count(prompt[:end])))


def subject_token_indices(prompt: str, subject: str, tokenizer: Any, occurrence: int = 0) -> tuple[int, ...]:
    """Token positions of ``subject`` in ``prompt``; raises :class:`PlanError` when it does not occur."""
    span = find_subject_span(prompt, subject, occurrence)
    if span is None:
        raise PlanError(
            f"The subject {subject!r} does not occur in the prompt {prompt!r}; every branch's subject must be "
            "written in the prompt exactly as there (fix the plan's 'subject' or the prompt)."
        )
    return token_indices_for_span(prompt, *span, tokenizer)


def matching_occurrence(prompt: str, subject: str, indices: Sequence[int], tokenizer: Any) -> int | None:
    """Which occurrence of ``subject`` in ``prompt`` the token ``indices`` point at, or ``None``."""
    k = 0
    while (span := find_subject_span(prompt, subject, k)) is not None:
        if set(token_indices_for_span(prompt, *span, tokenizer)) == set(indices):
            return k
        k += 1
    return None


def subject_occurrence(prompt: str, subject: str, indices: Sequence[int], tokenizer: Any) -> int:
    """Which occurrence of ``subject`` in ``prompt`` the token ``indices`` point at (0 when none matches)."""
    found = matching_occurrence(prompt, subject, indices, tokenizer)
    return 0 if found is None else found


def retokenized(plan: DecompositionPlan, from_tokenizer: Any, to_tokenizer: Any) -> DecompositionPlan:
    """``plan`` with each subject's token indices counted by ``to_tokenizer``, at the occurrence of the subject in p0
    that its indices (counted by ``from_tokenizer``) point at: a plan parsed before the model loads (with the
    packaged CLIP tokenizer) made ready for the model's own tokenizer (FLUX.1's T5)."""
    branches = []
    for b in plan.branches:
        occurrence = 0
        if b.subject_token_indices:
            occurrence = subject_occurrence(plan.prompt, b.subject, b.subject_token_indices, from_tokenizer)
        indices = subject_token_indices(plan.prompt, b.subject, to_tokenizer, occurrence)
        branches.append(replace(b, subject_token_indices=indices))
    return replace(plan, branches=tuple(branches))


def token_window(tokenizer: Any) -> int:
    """The tokens a text encoder reads: the tokenizer's ``model_max_length`` (CLIP 77; T5 as the pipeline set it),
    or CLIP's 77 when the tokenizer sets no sensible one."""
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if isinstance(length, int) and 0 < length <= 100_000 else CLIP_MAX_TOKENS


def special_tokens(tokenizer: Any) -> int:
    """How many special tokens the tokenizer adds to a prompt (CLIP: start and end, 2; T5: end, 1)."""
    count = getattr(tokenizer, "num_special_tokens_to_add", None)
    return int(count()) if callable(count) else 2


def check_token_window(
    subject: str, indices: Sequence[int], max_tokens: int = CLIP_MAX_TOKENS, name: str = "CLIP"
) -> None:
    """Raise when a subject's tokens fall outside the text encoder's window (the end token takes the last slot)."""
    if not indices:
        raise PlanError(f"The subject {subject!r} has no {name} tokens; give a subject made of words.")
    if max(indices) >= max_tokens - 1:
        raise PlanError(
            f"The subject {subject!r} sits at {name} tokens {min(indices)}-{max(indices)}, beyond the text encoder's "
            f"window of {max_tokens} tokens; the model would never see it. Shorten the prompt or move the subject "
            "earlier."
        )


def tokenizer_name(tokenizer: Any) -> str:
    """``"CLIP"``, ``"T5"``...: what the error messages call a tokenizer's tokens."""
    name = type(tokenizer).__name__.removesuffix("Fast").removesuffix("Tokenizer")
    return name or "text"


def validate_plan(plan: DecompositionPlan, tokenizer: Any, prompt: str | None = None) -> DecompositionPlan:
    """Check a plan and return it with token indices computed by ``tokenizer``.

    The prompt and the base prompt must be text (``prompt``, when given, must equal p0); at most
    :data:`MAX_BRANCHES` detail branches; every branch's subject must occur in p0 and lie inside the tokenizer's
    window. Token indices supplied in the plan pick which occurrence of a repeated subject is meant (indices that
    point at no occurrence are refused); missing ones are computed from the first occurrence. A base or sub-prompt
    that adds words not in p0 is run, with a warning (:func:`plan_rewrites`): Detail++ expects each sub-prompt to be
    the base prompt plus one subject's details from p0.
    """
    if prompt is not None and prompt.strip() != plan.prompt.strip():
        raise PlanError(
            f"The plan was made for the prompt {plan.prompt!r}, not {prompt!r}; pass the plan's prompt or none."
        )
    check_prompt_text(plan.prompt, "The plan's prompt")
    if not isinstance(plan.base, str) or not plan.base.strip():
        raise PlanError("The plan's base prompt is empty; write the prompt without its details (p1).")
    if len(plan.branches) > MAX_BRANCHES:
        raise PlanError(
            f"The plan has {len(plan.branches)} detail branches; Detail++ runs at most {MAX_BRANCHES} (each one adds "
            "to every denoising step's batch). Keep the subjects whose details matter most."
        )
    branches = []
    for n, b in enumerate(plan.branches, start=2):
        if not isinstance(b.prompt, str) or not b.prompt.strip():
            raise PlanError(f"The branch for {b.subject!r} has an empty prompt.")
        indices = subject_token_indices(plan.prompt, b.subject, tokenizer, 0)
        if b.subject_token_indices:
            occurrence = matching_occurrence(plan.prompt, b.subject, b.subject_token_indices, tokenizer)
            if occurrence is None:
                raise PlanError(
                    f"Branch p{n}'s subject_token_indices {list(b.subject_token_indices)} do not point at "
                    f"{b.subject!r} in the prompt (its first occurrence is at tokens {list(indices)}); correct them, "
                    "or leave them out to have them computed."
                )
            indices = subject_token_indices(plan.prompt, b.subject, tokenizer, occurrence)
        check_token_window(b.subject, indices, token_window(tokenizer), tokenizer_name(tokenizer))
        branches.append(replace(b, subject_token_indices=indices))
    for message in plan_rewrites(plan):
        _warn_once(message)
    return replace(plan, branches=tuple(branches))


_WORD = re.compile(r"[\w'-]+")
_WARNED: set[str] = set()


def _words(text: str) -> set[str]:
    """A prompt's words, lower case; "a" and "an" as one (the renderer re-chooses the article)."""
    return {"a" if w == "an" else w for w in (m.lower() for m in _WORD.findall(text))}


def plan_rewrites(plan: DecompositionPlan) -> list[str]:
    """One sentence per prompt of the plan (the base, each sub-prompt) that adds words p0 does not have."""
    full = _words(plan.prompt)
    texts = [("The base prompt", plan.base)] + [
        (f"Branch p{n} ({b.subject!r})", b.prompt) for n, b in enumerate(plan.branches, start=2)
    ]
    out = []
    for what, text in texts:
        added = sorted(_words(text) - full)
        if added:
            out.append(
                f"{what} adds words the prompt does not have ({', '.join(map(repr, added))}): it rewrites the "
                "prompt, where Detail++ expects the base prompt plus one subject's details from the prompt."
            )
    return out


def _warn_once(message: str) -> None:
    """A plan's warning, once per process (a plan is validated before loading, after, and at every call)."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def tokens_in_prompt(plan: DecompositionPlan, branch: Branch, prompt: str, tokenizer: Any) -> tuple[int, ...]:
    """Token positions of ``branch``'s subject in another ``prompt`` of the plan (the same occurrence as in p0, else
    the first one)."""
    occurrence = subject_occurrence(plan.prompt, branch.subject, branch.subject_token_indices, tokenizer)
    try:
        return subject_token_indices(prompt, branch.subject, tokenizer, occurrence)
    except PlanError:
        return subject_token_indices(prompt, branch.subject, tokenizer, 0)


@dataclass(frozen=True)
class BranchTokens:
    """The token positions one Detail++ call reads, computed once from a validated plan and the prompts it encodes.

    Attributes:
        in_full: each detail branch's subject tokens in p0 (masks from ``"full"``, and the nursing loss).
        in_previous: each detail branch's subject tokens in the previous branch's prompt (masks from ``"previous"``):
            branch 2's subject in p1, branch 3's in p2, ...
        prompt_length: how many of p0's own tokens CLIP reads (start and end tokens excluded; at most 75).
    """

    in_full: tuple[tuple[int, ...], ...]
    in_previous: tuple[tuple[int, ...], ...]
    prompt_length: int

    @classmethod
    def of(
        cls, plan: DecompositionPlan, tokenizer: Any, prompts: Sequence[str] | None = None, previous: bool = True
    ) -> BranchTokens:
        """The positions for ``plan`` (validated) whose branches are encoded with ``prompts`` (default:
        :attr:`DecompositionPlan.prompts`; the authors' preset encodes them normalised). ``previous=False`` leaves
        :attr:`in_previous` empty (the masks come from p0, and a branch's subject need not occur in the prompt
        before it)."""
        prompts = list(plan.prompts if prompts is None else prompts)
        in_previous = ()
        if previous:  # branch j + 2's previous branch is j + 1
            in_previous = tuple(
                tokens_in_prompt(plan, b, prompts[j + 1], tokenizer) for j, b in enumerate(plan.branches)
            )
        special = special_tokens(tokenizer)
        length = min(
            len(tokenizer(prompts[0], truncation=False).input_ids) - special, token_window(tokenizer) - special
        )
        return cls(tuple(b.subject_token_indices for b in plan.branches), in_previous, length)
