"""Word-level predicates on spaCy tokens, from the word lists of :mod:`detailpp.parsing.lexicon`."""

from __future__ import annotations

import re
from typing import Any

from detailpp.parsing.lexicon import MODIFIER_SUFFIXES, MODIFIER_WORDS, STYLE_WORDS


def word_parts(tok: Any) -> list[str]:
    return [p for p in re.split(r"[-\u2010\u2011\u2013]", tok.lower_) if p]


def is_modifier_word(tok: Any) -> bool:
    low = tok.lower_
    if low in MODIFIER_WORDS or low.endswith(MODIFIER_SUFFIXES):
        return True
    parts = word_parts(tok)
    return len(parts) > 1 and any(p in MODIFIER_WORDS for p in parts)


def is_style_word(tok: Any) -> bool:
    low = tok.lower_
    return low in STYLE_WORDS or low.endswith(("-style", "-styled"))


def has_letter(tok: Any) -> bool:
    return any(ch.isalpha() for ch in tok.text)
