"""What belongs to the whole image: global tags, leading media ("photo of"), and negated words (never split)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from detailpp.parsing.lexicon import (
    COLOURS,
    GLOBAL_FIGURE,
    GLOBAL_FUNCTION_WORDS,
    GLOBAL_HEADS,
    GLOBAL_LEADS,
    GLOBAL_NAMES,
    GLOBAL_WORDS,
    MEDIUM_FILLERS,
    MEDIUM_NOUNS,
    STYLE_NAMES,
    TAG_INTENSIFIERS,
)
from detailpp.parsing.words import is_modifier_word, word_parts

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
    parts = word_parts(tok)
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


def find_global_tokens(doc: Any) -> set[int]:
    """Tokens of global tags and leading media: kept in every prompt, never modifiers or subjects (rule 12)."""
    out: set[int] = set()
    for seg in _segments(doc):
        if _is_global_segment(doc, seg):
            out.update(seg)
        else:
            out.update(_medium_prefix(doc, seg) or _global_opening(doc, seg))
            out.update(_inline_tags(doc, seg))
    return out


def negated_tokens(doc: Any) -> set[int]:
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
            elif t.pos_ in ("DET", "NUM") or t.pos_ == "ADJ" or is_modifier_word(t):
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
