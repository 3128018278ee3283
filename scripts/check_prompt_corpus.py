"""Decompose every prompt of the prompt corpus and print the failures and the score.

Usage::

    PYTHONPATH=src .venv/bin/python scripts/check_prompt_corpus.py [--corpus tests/data/prompt_corpus.jsonl]
        [--min 0.95] [--quiet]

The corpus is JSON Lines, one object a line, written by hand as a user of Detail++ would want the prompt split:

- ``prompt``: p0, as people write them on prompt-sharing sites;
- ``subjects``: the subjects of the branches, in p0 order (``[]``: a plan with zero branches);
- ``globals``: phrases (quality / lighting / camera / medium tags, a leading medium, negations) that must be
  found verbatim in p1 and in every branch prompt;
- ``base``: the expected p1, exactly;
- ``fallback: true``: the parser must not read the prompt (not English, or not readable with confidence): zero
  branches and a notice that points to ``--plan``;
- ``rejected: true``: prompt-weight syntax; :func:`detailpp.parsing.decompose.decompose` must raise a
  :class:`~detailpp.plan.PlanError` that names the syntax.

An entry passes when every check it states holds. The exit status is 1 when the score is below ``--min``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detailpp.parsing.decompose import decompose, load_nlp
from detailpp.plan import PlanError
from detailpp.resources import load_clip_tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "prompt_corpus.jsonl"


@dataclass(frozen=True)
class Result:
    """One corpus entry's outcome: ``problems`` is empty when it passed."""

    entry: dict[str, Any]
    problems: tuple[str, ...]
    summary: str

    @property
    def passed(self) -> bool:
        return not self.problems


def load_corpus(path: Path = CORPUS) -> list[dict[str, Any]]:
    """The corpus entries, one per non-empty line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def check_entry(entry: dict[str, Any], nlp: Any, tokenizer: Any) -> Result:
    """Decompose one entry's prompt and compare the plan with what the entry expects."""
    prompt = entry["prompt"]
    try:
        plan = decompose(prompt, nlp=nlp, tokenizer=tokenizer)
    except PlanError as e:
        if entry.get("rejected"):
            ok = "weight" in str(e) and "--plan" in str(e)
            return Result(entry, () if ok else (f"unclear rejection: {e}",), f"rejected: {e}")
        return Result(entry, (f"raised PlanError: {e}",), f"error: {e}")
    summary = f"base {plan.base!r}; branches " + (
        "; ".join(f"{b.subject}: {', '.join(b.attributes)}" for b in plan.branches) or "none"
    )
    if plan.notice:
        summary += f"; notice {plan.notice!r}"
    problems = []
    if entry.get("rejected"):
        problems.append("weight syntax was not rejected")
    elif entry.get("fallback"):
        if plan.branches:
            problems.append("expected zero branches (fallback)")
        if not plan.notice or "--plan" not in plan.notice:
            problems.append("no fallback notice pointing to --plan")
    else:
        subjects = [b.subject for b in plan.branches]
        if subjects != entry["subjects"]:
            problems.append(f"subjects {subjects} != {entry['subjects']}")
        if "base" in entry and plan.base != entry["base"]:
            problems.append(f"base {plan.base!r} != {entry['base']!r}")
        for phrase in entry.get("globals", []):
            missing = [p for p in [plan.base, *(b.prompt for b in plan.branches)] if phrase not in p]
            if missing:
                problems.append(f"global {phrase!r} missing from {len(missing)} prompt(s)")
    return Result(entry, tuple(problems), summary)


def check_corpus(entries: list[dict[str, Any]], nlp: Any = None, tokenizer: Any = None) -> list[Result]:
    """:func:`check_entry` for every entry (spaCy and the CLIP tokenizer loaded once when not given)."""
    nlp = nlp if nlp is not None else load_nlp()
    tokenizer = tokenizer if tokenizer is not None else load_clip_tokenizer()
    return [check_entry(e, nlp, tokenizer) for e in entries]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="the corpus (JSON Lines)")
    parser.add_argument("--min", type=float, default=0.95, help="exit 1 below this share of passing entries")
    parser.add_argument("--quiet", action="store_true", help="print the score only")
    parser.add_argument("--verbose", action="store_true", help="also show the parser's log (fallback warnings)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(message)s")
    results = check_corpus(load_corpus(args.corpus))
    failures = [r for r in results if not r.passed]
    if not args.quiet:
        for r in failures:
            print(f"FAIL {r.entry['prompt']!r}")
            for problem in r.problems:
                print(f"     {problem}")
            print(f"     got {r.summary}")
    passed = len(results) - len(failures)
    score = passed / len(results)
    print(f"prompt corpus: {passed}/{len(results)} = {100 * score:.1f} % (target {100 * args.min:.0f} %)")
    return 0 if score >= args.min else 1


if __name__ == "__main__":
    sys.exit(main())
