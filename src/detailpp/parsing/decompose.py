"""Prompt decomposition (paper, step 1): from a prompt p0 to the base prompt p1 and one sub-prompt per subject.

The parser keeps the sentence. It never rebuilds a prompt from noun chunks (as the authors' code does, which loses
every verb and preposition); it deletes modifier tokens from p0 and puts back only one subject's modifiers per
branch, so "a man wearing a brown hat stands in front of a red sports car" keeps "stands in front of" everywhere::

    p0  a man wearing a brown hat stands in front of a red sports car
    p1  a man wearing a hat stands in front of a sports car
    p2  a man wearing a brown hat stands in front of a sports car      subject "hat",        attributes ["brown"]
    p3  a man wearing a hat stands in front of a red sports car        subject "sports car", attributes ["red"]

Rules (spaCy ``en_core_web_sm`` tags and parse + the word lists of :mod:`detailpp.parsing.lexicon`; every ambiguous
case below is a choice, and is tested):

1. **Words joined by hyphens are one word** ("sky-blue", "sketch-style", "oil-painting", "T-shirt").
2. **Noun phrases are found linearly**, not from the parse tree: the small model parses the fragment prompts of
   benchmarks badly ("a white rose/VERB and ...", "a red apple/nmod and yellow bananas"). A phrase is an optional
   prefix (determiners, numbers, possessive pronouns, quantifiers) followed by content words (nouns, adjectives,
   list words, participles before a noun); its last content word is the head. The parse is used only where the
   tags are not enough: a noun whose parse head lies to its left ends its phrase ("the kettle and wooden spoon |
   boil the water"), a noun tagged as a verb or adjective counts as a noun when it has a determiner or adjective
   of its own ("a blue scarf/ADJ"), and "'s" after a proper noun continues the name ("Rubik's cube"). A run of
   modifiers joined by "and" or "," to the next phrase belongs to it ("black and white floor tiles",
   "a long, narrow yellow kitchen"; so "a red orange and yellow bananas" reads as one thing with three colours).
   A run of modifiers only ("stood tall", "flash yellow", "both necessary") is no phrase.
   **Subjects** are the heads of phrases. Not subjects: a word of relation on its own ("the left", "in front",
   "the top"; "counter top" and "oval back" are subjects), style words ("style") and nouns inside attribute
   phrases (rule 6). A subject's words are its head plus the non-modifier nouns directly left of it ("teddy bear",
   "sports car", "desk lamp", "baking dish"); the subject text is copied from p0.
3. **Pre-nominal modifiers.** Reading leftwards from the subject inside its phrase, every content word that is
   not part of the subject is a modifier: adjectives ("red", "fluffy", "vintage", "big"), adverbs ("very"),
   participles ("striped", "snow covered"), and words of the colour / material / shape / style lists ("leather",
   "glass", "teardrop", "Lego") even when spaCy calls them nouns. Once a modifier has been seen, nouns further left
   belong to it ("Lego style", "pastel teal"). Not modifiers: the prefix words, including quantifiers and words of
   order or place ("only", "other", "many", "first", "left", "top", "favorite", ...).
4. **Lexicalised compounds** are kept whole: a compound noun that is not in the modifier lists ("teddy bear",
   "ice cream", "sports car"), and a short list of adjective + noun names (``LEXICALISED``: "hot dog",
   "red panda", "polar bear", "remote control", ...). A material noun before another noun is always a material:
   "rubber band" gives base "band" (T2I-CompBench uses it as a rubber-texture prompt; the branch mask restores it).
5. **One attribute is one group of modifier words**: words whose syntactic head is another modifier join it
   ("light yellow", "black and white", "stainless steel"), a shade word joins the colour after it ("pastel teal"),
   a style word joins the word before it ("oil-painting style"). Commas and "and" between two groups are kept only
   while both neighbours are kept ("a big, round table" -> "a round table").
6. **Object attributes.** A phrase "with X", "wearing X" (also "who wears X", "donning X", "dressed in X"),
   "in X" where X is clothing, and "made of X" where X is a material, attached to a subject, is an attribute of
   that subject ("with a necklace", "wearing sunglasses") **unless X carries modifiers of its own**: then X is a
   subject in its own right and the phrase stays in every prompt ("a teddy bear wearing a green tracksuit" gives the
   subject "tracksuit" with ["green"]; the wearer keeps "wearing a tracksuit"). A colour belongs in X's mask, not on
   the wearer's whole body. Nouns inside an attribute phrase are not subjects.
7. **Style phrases** "in Lego style", "in the style of Van Gogh" attached to a subject are that subject's
   attribute; attached to the verb or to nothing they are a global style and stay in every prompt.
8. **Predicative colours, materials and shapes** ("the car is red", "a car painted red", "lights flash yellow")
   belong to the verb's subject; the copula goes with the adjective when nothing else hangs on it
   ("The car is red and the bench is blue." -> base "The car and the bench."). Other predicative adjectives
   ("were both necessary") are part of the scene and stay.
9. **Rendering.** A prompt is p0 minus the modifier tokens that are off; spacing is taken from p0, and an "a"/"an"
   whose next word changed is re-chosen ("an oil-painting style tree" -> "a tree"); a prompt whose first word was
   removed starts with a capital when p0 did.
10. **Branches.** granularity ``"subject"`` (default): one branch per subject that has modifiers, in p0 order, each
    adding all of its attributes to p1. ``"attribute"``: one branch per attribute. A prompt with fewer than two
    subjects, or without modifiers, gets **zero branches** (the pipeline then runs plain SDXL) and an INFO notice.
11. **CLIP window.** ``subject_token_indices`` are computed from the subject's character span in p0 with SDXL's CLIP
    tokenizer (start token = 0, sub-words included). A branch subject beyond the 77-token window raises
    :class:`~detailpp.plan.PlanError` naming the subject and the limit. Text beyond the window that has no branch
    subject is no error (a 1000-word prompt without modifiers gets a zero-branch plan).
12. **Global tags and leading media** belong to the whole image: they stay in p1 and in every branch, are never
    subjects, and their adjectives ("sharp", "soft", "best", "highly") are never modifiers. Read per segment (the
    text between ",", ";", "|", "." ...) with the global lexicon of :mod:`detailpp.parsing.lexicon`: a segment made
    only of tag words, figures and function words ("masterpiece", "best quality", "8k", "highly detailed", "depth of
    field", "award winning photography"); one that opens with a lead ("by greg rutkowski", "trending on artstation",
    "in the style of ...", "shot on ..."); a short tag of adjectives and nouns without a determiner ending in a tag
    head ("neon lights", "dark background", "warm tones", "wide angle lens", "anime style"); a tag name with tag words
    around it ("still life painting", "black and white photography"). At a segment's start: a leading medium "[a] [tag
    words] MEDIUM of" ("photo of", "watercolor painting of", "cinematic still of", "a black and white photo of"), and
    an opening noun phrase of tag words only before "with"/"of"/"in"/"at"/"on" ("an epic fantasy landscape with ...").
    Inside a sentence: two or more tag words (no colour) ending in a tag head and followed by no noun or colour ("in
    soft light", "with sharp focus"), or opening with an intensifier ("a highly detailed red car"). A style word before
    one subject stays that subject's ("a lego-style car", "a realistic tree"); "A long, narrow kitchen" is no tag (a
    determiner and no noun).
13. **Negation is never split**: "not"/"n't"/"never" (with the verb right after it: "not wearing"), "without" and
    the determiner "no" take the words after them up to the end of one noun phrase ("not black", "not a white one",
    "without a red hat", "no chimney"); those words stay in every prompt, are no subjects, and an attribute phrase
    containing them ("with no bananas") is kept whole.
14. **Prompts the parser does not read** get zero branches and a :attr:`~detailpp.plan.DecompositionPlan.notice`
    (also logged at WARNING level) saying why and pointing to ``--plan``: text mostly outside the Latin script, two
    or more function words of another language and more of them than English ones (:func:`language_notice`), most
    words unknown to the
    tagger (lower-case words tagged as names or foreign words), or such an unknown word inside a subject's modifier
    group ("asdfgh red qwerty"). Prompt-weight syntax ("(red:1.2)", "((red))", "[red]", "red++", "(red)1.2",
    "<lora:...>") raises :class:`PlanError` naming the syntax (:func:`check_weight_syntax`): SDXL would read the
    brackets as text, and the parser would make subjects of them. Plain parentheses are text.

15. **Quotation marks and emoji are read through.** Inside a noun phrase a quotation mark or an emoji does not end
    it: ``a "red" dog`` and ``a red 🐶 dog`` have the subject "dog" with ["red"]. Quotation marks that hug a
    modifier go with it (base ``a dog``); an emoji is kept everywhere (``a 🐶 dog``).

Anything spaCy parses (emoji, markup, very long prompts) gives a plan or a :class:`PlanError`, never another
exception.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from detailpp.parsing.analysis import Analysis, Attribute, Subject, analyse, claimed_by
from detailpp.parsing.nlp import default_tokenizer, load_nlp
from detailpp.parsing.render import render
from detailpp.parsing.screening import check_weight_syntax, fallback_notice, language_notice
from detailpp.parsing.words import is_modifier_word
from detailpp.plan import (
    GRANULARITIES,
    Branch,
    DecompositionPlan,
    PlanError,
    check_prompt_text,
    check_token_window,
    token_indices_for_span,
    token_window,
    tokenizer_name,
)

logger = logging.getLogger(__name__)


def _check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise PlanError(f"A prompt must be text, got {type(prompt).__name__}.")
    return check_prompt_text(prompt, example=" (e.g. 'a red car and a blue bench')")


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise PlanError(f"Unknown granularity {granularity!r}; use one of {GRANULARITIES}.")


def check_prompt_for_planning(prompt: Any, granularity: str) -> str:
    """The checks every planner makes before reading a prompt: text, no prompt-weight syntax, a known granularity."""
    _check_granularity(granularity)
    check_weight_syntax(_check_prompt(prompt))
    return prompt


class _OnePromptTokenizer:
    """Calls ``tokenizer`` once per prompt: every branch of a plan asks for offsets of the same p0."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.is_fast = getattr(tokenizer, "is_fast", True)
        self.key: tuple[Any, ...] | None = None
        self.value: Any = None

    def __call__(self, text: str, **kwargs: Any) -> Any:
        key = (text, *sorted(kwargs.items()))
        if key != self.key:
            self.key, self.value = key, self.tokenizer(text, **kwargs)
        return self.value


#: share of a prompt's words (global tags left out) that the tagger takes for lower-case names or foreign words,
#: above which the prompt is not read (rule 14).
UNREADABLE_SHARE = 0.5


def _unknown(tok: Any) -> bool:
    """A lower-case word the tagger could not place: tagged as a name, a foreign word or "other"."""
    return tok.is_alpha and tok.text.islower() and (tok.pos_ in ("PROPN", "X") or tok.tag_ == "FW")


def _confidence_notice(analysis: Analysis, attributes: Iterable[Attribute]) -> str | None:
    """Why the parse of a prompt with branches is not trusted (rule 14), or ``None``."""
    doc = analysis.doc
    words = [t for t in doc if t.is_alpha and t.i not in analysis.frozen]
    unknown = [t for t in words if _unknown(t) and not is_modifier_word(t)]
    if len(unknown) >= 3 and len(unknown) > UNREADABLE_SHARE * len(words):
        shown = ", ".join(dict.fromkeys(t.text for t in unknown[:4]))
        return f"the parser cannot read most of its words ({shown}) with confidence"
    for a in attributes:
        if not a.prenominal:
            continue  # "in the style of van gogh": names are expected in phrases
        odd = [doc[i].text for i in sorted(a.tokens) if _unknown(doc[i]) and not is_modifier_word(doc[i])]
        if odd:
            return f"the parser cannot tell what {', '.join(odd)!s} in {a.text!r} describes"
    return None


def _plan(doc: Any, prompt: str, granularity: str, tokenizer: Any) -> DecompositionPlan:
    analysis = analyse(doc)
    all_tokens = claimed_by(analysis.attributes)
    base = render(analysis, all_tokens)
    if not analysis.attributes:
        logger.info("No modifiers found in %r: the plan has no branches (plain SDXL).", prompt)
        return DecompositionPlan(prompt=prompt, base=base, granularity=granularity, branches=())
    if len(analysis.subjects) < 2:
        logger.info("Only one subject in %r: the plan has no branches (plain SDXL).", prompt)
        return DecompositionPlan(prompt=prompt, base=base, granularity=granularity, branches=())
    reason = _confidence_notice(analysis, analysis.attributes)
    if reason is not None:
        notice = fallback_notice(reason)
        logger.warning("%s (%r)", notice, prompt)
        return DecompositionPlan(prompt=prompt, base=prompt, granularity=granularity, branches=(), notice=notice)
    by_head: dict[int, list[Attribute]] = {}
    for a in analysis.attributes:
        by_head.setdefault(a.head, []).append(a)
    units: list[tuple[Subject, list[Attribute]]] = []
    for subject in analysis.subjects:
        attrs = by_head.get(subject.head, [])
        if not attrs:
            continue
        if granularity == "attribute":
            units.extend((subject, [a]) for a in attrs)
        else:
            units.append((subject, attrs))
    branches = []
    text = analysis.doc.text
    window, name = token_window(tokenizer), tokenizer_name(tokenizer)
    tokenizer = _OnePromptTokenizer(tokenizer)
    for subject, attrs in units:
        indices = token_indices_for_span(text, *subject.char_span, tokenizer)
        check_token_window(subject.text, indices, window, name)
        removed = all_tokens - {t for a in attrs for t in a.tokens}
        branches.append(
            Branch(
                prompt=render(analysis, removed),
                subject=subject.text,
                attributes=tuple(a.text for a in attrs),
                subject_token_indices=indices,
            )
        )
    return DecompositionPlan(prompt=prompt, base=base, granularity=granularity, branches=tuple(branches))


def decompose(
    prompt: str, granularity: str = "subject", *, nlp: Any | None = None, tokenizer: Any | None = None
) -> DecompositionPlan:
    """Split ``prompt`` into the base prompt and one sub-prompt per subject (or per attribute); see the module doc.

    Args:
        prompt: p0, the user's prompt.
        granularity: ``"subject"`` (one branch per subject, all its modifiers) or ``"attribute"`` (one per modifier).
        nlp: a spaCy pipeline with tagger and parser; default :func:`load_nlp`.
        tokenizer: SDXL's CLIP tokenizer, for ``subject_token_indices``; default the packaged one.

    Returns:
        The plan; zero branches (with an INFO log notice) when the prompt has no modifiers or fewer than two
        subjects; zero branches with ``plan.notice`` set (and a WARNING) when the parser does not read the prompt.

    Raises:
        PlanError: empty prompt, prompt-weight syntax, unknown granularity, or a branch subject beyond CLIP's
            77-token window.
    """
    return decompose_many([prompt], granularity, nlp=nlp, tokenizer=tokenizer)[0]


def decompose_many(
    prompts: Sequence[str],
    granularity: str = "subject",
    nlp: Any | None = None,
    tokenizer: Any | None = None,
    batch_size: int = 256,
) -> list[DecompositionPlan]:
    """:func:`decompose` for many prompts, parsed in batches with ``nlp.pipe``.

    Raises:
        PlanError: as :func:`decompose`, for the first prompt that fails; the message names the prompt's position
            when there is more than one (:func:`decompose_each` reports every prompt's failure instead).
    """
    results = decompose_each(prompts, granularity, nlp, tokenizer, batch_size)
    for n, result in enumerate(results):
        if isinstance(result, PlanError):
            raise PlanError(f"prompt {n + 1}: {result}" if len(results) > 1 else str(result)) from None
    return results  # type: ignore[return-value] - no PlanError left


def decompose_each(
    prompts: Sequence[str],
    granularity: str = "subject",
    nlp: Any | None = None,
    tokenizer: Any | None = None,
    batch_size: int = 256,
) -> list[DecompositionPlan | PlanError]:
    """Each prompt's plan, or the :class:`PlanError` that prompt raised: one bad prompt fails alone (``decompose
    --file``). A granularity spaCy cannot use, or no spaCy model, raises for all."""
    _check_granularity(granularity)
    prompts = list(prompts)
    results: list[DecompositionPlan | PlanError | None] = [None] * len(prompts)
    for n, prompt in enumerate(prompts):
        try:
            _check_prompt(prompt)
            check_weight_syntax(prompt)
        except PlanError as e:
            results[n] = e
    if all(r is not None for r in results):
        return results  # type: ignore[return-value] - nothing to parse: no spaCy needed
    nlp = nlp if nlp is not None else load_nlp()
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    readable = []
    for n, prompt in enumerate(prompts):
        if results[n] is not None:
            continue
        if len(prompt) > nlp.max_length:
            results[n] = PlanError(
                f"A prompt of {len(prompt)} characters is longer than spaCy's limit of {nlp.max_length}."
            )
        elif (reason := language_notice(prompt)) is not None:
            notice = fallback_notice(reason)
            logger.warning("%s (%r)", notice, prompt)
            results[n] = DecompositionPlan(prompt, prompt, granularity, branches=(), notice=notice)
        else:
            readable.append(n)
    for n, doc in zip(readable, nlp.pipe([prompts[n] for n in readable], batch_size=batch_size), strict=True):
        try:
            results[n] = _plan(doc, prompts[n], granularity, tokenizer)
        except PlanError as e:
            results[n] = e
    return results  # type: ignore[return-value] - every slot is filled


__all__ = [
    "check_prompt_for_planning",
    "check_weight_syntax",
    "decompose",
    "decompose_each",
    "decompose_many",
    "language_notice",
    "load_nlp",
]
