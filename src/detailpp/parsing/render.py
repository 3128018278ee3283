"""Rendering a prompt with some modifier tokens removed: spacing from p0, articles re-chosen (rule 9)."""

from __future__ import annotations

from detailpp.parsing.analysis import Analysis

_VOWEL_SOUND_EXCEPTIONS_AN = ("hour", "honest", "honor", "honour", "heir", "herb")

_CONSONANT_SOUND_PREFIXES = ("uni", "use", "usu", "ura", "ure", "uti", "eu", "ewe", "one", "once", "ubi", "uk")


def _article_for(word: str) -> str:
    low = word.lower()
    if not low or not low[0].isalpha():
        return "a"
    if low.startswith(_VOWEL_SOUND_EXCEPTIONS_AN):
        return "an"
    if low.startswith(_CONSONANT_SOUND_PREFIXES):
        return "a"
    return "an" if low[0] in "aeiou" else "a"


def render(analysis: Analysis, removed: set[int]) -> str:
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
