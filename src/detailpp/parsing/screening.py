"""Prompts the parser does not read: prompt-weight syntax (refused) and other languages (a notice, no branches)."""

from __future__ import annotations

import re
import unicodedata

from detailpp.parsing.lexicon import ENGLISH_FUNCTION_WORDS, FOREIGN_FUNCTION_WORDS
from detailpp.plan import PlanError

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


def fallback_notice(reason: str) -> str:
    return (
        f"No detail branches (plain SDXL): {reason}. Write the prompt in plain English, or write the plan by hand (as "
        "`detailpp decompose --json` prints it) and pass it with --plan PLAN.json."
    )
