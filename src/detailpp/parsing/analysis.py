"""The analysis of a parsed prompt: noun phrases, subjects, their modifiers and attribute phrases (rules 1-8 of
:mod:`detailpp.parsing.decompose`)."""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from detailpp.parsing.lexicon import (
    ACTION_GERUNDS,
    CLOTHING,
    COLOURS,
    GERUND_COMPOUNDS,
    LEXICALISED,
    MATERIALS,
    NON_MODIFIERS,
    RELATION_NOUNS,
    SHADES,
    WEAR_VERBS,
)
from detailpp.parsing.scene import find_global_tokens, negated_tokens
from detailpp.parsing.words import has_letter, is_modifier_word, is_style_word

logger = logging.getLogger(__name__)

_HYPHENS = ("-", "\u2010", "\u2011", "\u2013")
#: Quotation marks: around a modifier they are read through (rule 15) and go with it.
_QUOTES = frozenset("\"'\u2018\u2019\u201c\u201d\u00ab\u00bb`")
#: Unicode categories of emoji and their joiners/variation selectors (rule 15).
_EMOJI_CATEGORIES = frozenset(("So", "Sk", "Mn", "Me", "Cf"))


def _is_quote(tok: Any) -> bool:
    return len(tok.text) == 1 and tok.text in _QUOTES


def _transparent(tok: Any) -> bool:
    """A quotation mark or an emoji: read through inside a noun phrase (``a "red" dog``, ``a red 🐶 dog``)."""
    if _is_quote(tok) and tok.pos_ in ("PUNCT", "X", "SYM"):  # (not the possessive of "the dogs' bowls": PART)
        return True
    return bool(tok.text) and all(unicodedata.category(c) in _EMOJI_CATEGORIES for c in tok.text)


def _with_quotes(doc: Any, tokens: Sequence[int]) -> list[int]:
    """``tokens`` plus the pair of quotation marks that hugs them (``"red"``): they go, or stay, with the words."""
    lo, hi = min(tokens), max(tokens)
    if lo == 0 or hi + 1 >= len(doc):
        return list(tokens)
    opening, closing = doc[lo - 1], doc[hi + 1]
    if _is_quote(opening) and _is_quote(closing) and not opening.whitespace_ and not doc[hi].whitespace_:
        return [lo - 1, *tokens, hi + 1]
    return list(tokens)


@dataclass(frozen=True)
class Attribute:
    """One modifier of one subject: the tokens that are deleted while it is off, and its words in p0."""

    head: int  # token index of the subject's head noun
    tokens: frozenset[int]
    text: str
    position: int  # first token, for ordering
    prenominal: bool = False  # a group of words before the subject (rules 3-5), not a phrase or a predicate


@dataclass(frozen=True)
class Subject:
    head: int
    start: int  # first token of the subject's words
    text: str
    char_span: tuple[int, int]


@dataclass(frozen=True)
class Analysis:
    doc: Any
    subjects: tuple[Subject, ...]  # every subject, in order
    attributes: tuple[Attribute, ...]  # every attribute, in order
    glue: frozenset[int]  # commas/"and" between modifiers: kept only while both neighbours are kept
    restore: dict[int, int]  # token -> original next token, for a/an agreement
    frozen: frozenset[int] = frozenset()  # global tags, leading media and negations (rules 12, 13)


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
            and has_letter(doc[j])
            and has_letter(doc[j + 2])
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
    if tok.pos_ in ("PUNCT", "SPACE", "SYM") or not has_letter(tok):
        return "prefix" if tok.like_num else "boundary"
    if low in ("'s", "'", "\u2019s", "\u2019") and tok.pos_ == "PART":
        return "possessive"
    if is_modifier_word(tok) and tok.pos_ not in ("DET", "PRON", "ADP"):
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
    after_noun = prv is not None and prv.pos_ in ("NOUN", "PROPN") and not is_modifier_word(prv)
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
    if not run.material or not has_letter(tok) or tok.pos_ not in ("VERB", "AUX", "ADV", "X", "INTJ"):
        return False
    articled = any(doc[i].pos_ == "DET" and doc[i].lower_ not in NON_MODIFIERS for i in run.prefix)
    complements = ("dobj", "prep", "attr", "acomp", "xcomp", "ccomp", "oprd", "agent", "prt", "dative")
    return (
        articled
        and all(is_modifier_word(doc[i]) or doc[i].pos_ == "ADJ" for i in run.material)
        and not any(c.dep_ in complements for c in tok.children)
    )


def _ends_phrase(tok: Any) -> bool:
    """A noun whose parse head lies to its left ends its phrase, whatever follows (unless it is a modifier word)."""
    return (
        tok.pos_ in ("NOUN", "PROPN")
        and tok.head.i < tok.i
        and tok.dep_ in ("nsubj", "nsubjpass", "dobj", "pobj", "conj", "appos", "attr")
        and not is_modifier_word(tok)
    )


def _only_modifiers(doc: Any, run: _Run) -> bool:
    return all(is_modifier_word(doc[i]) or doc[i].pos_ in ("ADJ", "ADV", "VERB") for i in run.material)


def _is_noun_phrase(doc: Any, run: _Run) -> bool:
    """Whether a run names a thing (vs. "stood tall", "were both necessary", "flash yellow")."""
    head = doc[run.head]
    if not has_letter(head):
        return False
    articled = any(doc[i].pos_ in ("DET", "NUM", "PRON") and doc[i].lower_ not in NON_MODIFIERS for i in run.prefix)
    articled = articled or any(doc[i].like_num for i in run.prefix)
    if is_modifier_word(head):
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
        if tok.i not in frozen and _transparent(tok) and cur is not None and cur.material:
            continue  # read through: the phrase goes on after a quote or an emoji (rule 15)
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
                    joinable = is_modifier_word(doc[prev.head]) or not _is_noun_phrase(doc, prev)
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
    return prv.pos_ in ("NOUN", "PROPN") and not is_modifier_word(prv) and not before_noun


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
        elif is_modifier_word(tok) or tok.pos_ in ("ADJ", "ADV", "VERB"):
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
        if is_style_word(tok) and m - 1 in mod_set:
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
            if is_style_word(obj):
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
        if tok.i in claimed or not is_modifier_word(tok) or tok.pos_ not in ("ADJ", "NOUN", "VERB", "ADV"):
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


def analyse(doc: Any) -> Analysis:
    doc = _merge_hyphenated(doc)
    global_tokens, negated = find_global_tokens(doc), negated_tokens(doc)
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
        if not relation_only and not is_style_word(head):
            subject_heads.add(run.head)
    claimed = set(owner)

    attributes: list[Attribute] = [
        Attribute(h, frozenset(_with_quotes(doc, g)), _span_text(doc, g), g[0], prenominal=True)
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
        attributes.append(Attribute(head, frozenset(tokens), _span_text(doc, tokens), min(tokens)))
        claimed |= tokens
    attributes = [a for a in attributes if a.head not in absorbed]

    # rule 8: predicative colours, materials and shapes
    predicate_owner = {i: h for i, h in owner.items() if h in subject_heads - absorbed}
    for head, tokens in _predicative(doc, predicate_owner, claimed | frozen):
        if not tokens:
            continue
        label = [t for t in tokens if is_modifier_word(doc[t])]
        attributes.append(Attribute(head, frozenset(tokens), _span_text(doc, label or tokens), min(tokens)))
        claimed |= tokens

    subjects = []
    for head in sorted(subject_heads - absorbed):
        words = phrases[head][0]
        start, end = doc[words[0]].idx, doc[head].idx + len(doc[head].text)
        subjects.append(Subject(head, words[0], doc.text[start:end], (start, end)))
    attributes.sort(key=lambda a: a.position)
    deleted = claimed_by(attributes)
    restore = {t.i: t.i + 1 for t in doc if t.lower_ in ("a", "an") and t.i + 1 < len(doc)}
    return Analysis(doc, tuple(subjects), tuple(attributes), frozenset(glue - deleted), restore, frozenset(frozen))


def claimed_by(attributes: Sequence[Attribute]) -> set[int]:
    """Every token some attribute deletes."""
    return {t for a in attributes for t in a.tokens}
