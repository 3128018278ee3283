"""Split a prompt into the base prompt and one sub-prompt per subject (Detail++ step 1), and show the plan.

Examples:
  detailpp decompose "a red teddy bear wearing a green tracksuit"
  detailpp decompose "a red car and a blue bench" --granularity attribute --json
  detailpp decompose --file prompts.txt > plans.jsonl
  detailpp decompose "a red car and a blue bench" --planner llm --llm-base-url http://127.0.0.1:11434/v1 \
      --llm-model llama3.1 --compare

A prompt the parser does not read (not English, or not readable with confidence) gets zero branches and a notice
saying why (printed with the plan, and logged as a warning); prompt-weight syntax ("(red:1.2)", "((red))",
"[red]") is an error that names the syntax. With --planner llm a language model proposes the plan, checked by the
same rules; a plan it cannot repair falls back to spaCy's with a notice (docs/decomposition.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TextIO

from detailpp.cli import UserError
from detailpp.cli.flags import add_planner_flags, planner_from_args
from detailpp.plan import GRANULARITIES, DecompositionPlan

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``decompose`` sub-command's options."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("prompt", nargs="?", help="the prompt to decompose (or use --file)")
    parser.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        default="subject",
        help="one branch per subject (default, all its modifiers) or one per attribute",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.add_argument(
        "--file",
        metavar="PROMPTS.txt",
        help="decompose every line of this file ('-': standard input); prints JSON Lines, one plan a line",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="with --planner llm: print spaCy's plan and the model's side by side (JSON: {'spacy': ..., 'llm': ...})",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=4,
        metavar="N",
        help="with --planner llm and --file: at most N requests at once (default 4; one request per distinct prompt)",
    )
    add_planner_flags(parser, cache_flag=True)


def _table(plan: DecompositionPlan) -> str:
    """A readable view of a plan."""
    lines = [
        f"prompt       {plan.prompt}",
        f"base         {plan.base}",
        f"granularity  {plan.granularity}",
    ]
    if plan.notice:
        lines.append("branches     none (plain SDXL)")
        lines.append(f"notice       {plan.notice}")
        return "\n".join(lines)
    if not plan.branches:
        lines.append("branches     none (no modifiers or a single subject: plain SDXL)")
        return "\n".join(lines)
    rows = [("#", "subject", "attributes", "tokens", "prompt")]
    for n, b in enumerate(plan.branches, start=1):
        rows.append(
            (
                str(n),
                b.subject,
                "; ".join(b.attributes),
                ",".join(str(i) for i in b.subject_token_indices),
                b.prompt,
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines.append("")
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    return "\n".join(lines)


def _read_lines(path: str) -> list[tuple[int, str]]:
    """``(line number, prompt)`` of every line of the file ('-': standard input) that holds text; the blank lines
    skipped are logged by number."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise UserError(f"no such prompt file: {path!r}") from e
    except UnicodeDecodeError as e:
        raise UserError(f"the prompt file {path!r} is not UTF-8 text ({e.reason})") from e
    lines = list(enumerate(text.replace("\r", "").split("\n"), start=1))
    if lines and not lines[-1][1]:
        lines.pop()  # the newline that ends the file
    blank = [n for n, line in lines if not line.strip()]
    if blank:
        logger.info("skipped %d blank line(s): line %s", len(blank), ", ".join(map(str, blank)))
    return [(n, line.strip()) for n, line in lines if line.strip()]


def _decompose_file(args: argparse.Namespace, out: TextIO) -> int:
    """Every line's plan as JSON Lines (with --compare: ``{"spacy": ..., "llm": ...}``); a line that cannot be
    decomposed is reported by its line number, the others are printed; exit code 2 when any failed."""
    from detailpp.parsing.planner import SpacyPlanner, plan_each

    lines = _read_lines(args.file)
    if not lines:
        raise UserError(f"the prompt file {args.file!r} has no prompts (one prompt a line)")
    prompts = [text for _, text in lines]
    results = plan_each(prompts, planner_from_args(args), args.granularity, concurrency=args.concurrency)
    spacy = plan_each(prompts, SpacyPlanner(), args.granularity) if args.compare else None
    failed = 0
    for n, ((number, _), result) in enumerate(zip(lines, results, strict=True)):
        if isinstance(result, Exception):
            failed += 1
            print(f"detailpp decompose: line {number}: {result}", file=sys.stderr)
        elif spacy is not None:  # a notice is logged as a warning (standard error)
            left = spacy[n].to_dict() if not isinstance(spacy[n], Exception) else {"error": str(spacy[n])}
            print(json.dumps({"spacy": left, "llm": result.to_dict()}, ensure_ascii=False), file=out)
        else:
            print(result.to_json(ensure_ascii=False), file=out)
    if failed:
        raise UserError(f"{failed} of {len(lines)} line(s) of {args.file} could not be decomposed (above)")
    return 0


def _compare_table(spacy: DecompositionPlan, llm: DecompositionPlan, model: str) -> str:
    """Two plans of one prompt side by side: spaCy's on the left, the model's on the right."""

    def branch(plan: DecompositionPlan, i: int) -> str:
        if i >= len(plan.branches):
            return ""
        b = plan.branches[i]
        return f"{b.subject} [{'; '.join(b.attributes)}]: {b.prompt}"

    rows = [("", "spacy", f"llm ({model})"), ("base", spacy.base, llm.base)]
    rows += [
        (f"branch {i + 1}", branch(spacy, i), branch(llm, i))
        for i in range(max(map(len, (spacy.branches, llm.branches))))
    ]
    if spacy.notice or llm.notice:
        rows.append(("notice", spacy.notice or "", llm.notice or ""))
    widths = [max(len(r[c]) for r in rows) for c in range(2)]
    lines = [f"prompt     {spacy.prompt}", ""]
    lines += [f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}".rstrip() for r in rows]
    same = [(b.subject, b.attributes, b.prompt) for b in spacy.branches] == [
        (b.subject, b.attributes, b.prompt) for b in llm.branches
    ] and spacy.base == llm.base
    verdict = "the plans agree" if same else "the plans differ"
    lines += ["", "the model's plan was not used (see its notice)" if llm.notice else verdict]
    return "\n".join(lines)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Decompose the prompt (or every prompt of ``--file``) and print the plan(s)."""
    from detailpp.parsing.planner import SpacyPlanner, plan_prompts

    out = out or sys.stdout
    if args.file is not None and args.prompt is not None:
        raise UserError("give a prompt or --file, not both")
    if args.compare and args.planner != "llm":
        raise UserError("--compare shows spaCy's plan beside a language model's: add --planner llm and --llm-model")
    if args.concurrency < 1:
        raise UserError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.file is not None:
        return _decompose_file(args, out)
    if args.prompt is None:
        raise UserError('give a prompt, e.g. detailpp decompose "a red car and a blue bench", or --file PROMPTS.txt')
    (plan,) = plan_prompts([args.prompt], planner_from_args(args), args.granularity)
    spacy = plan_prompts([args.prompt], SpacyPlanner(), args.granularity) if args.compare else None
    if spacy and args.json:
        print(json.dumps({"spacy": spacy[0].to_dict(), "llm": plan.to_dict()}, ensure_ascii=False, indent=2), file=out)
    elif spacy:
        print(_compare_table(spacy[0], plan, args.llm_model), file=out)
    else:
        print(plan.to_json(ensure_ascii=False, indent=2) if args.json else _table(plan), file=out)
    return 0
