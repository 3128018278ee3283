"""The parser's edges (rule 15 of detailpp.parsing.decompose): quoted and emoji-adjacent modifiers are read; and
``decompose --file`` names file lines, says what it skipped, and reports each bad line without failing the others."""

from __future__ import annotations

import logging

import pytest

from detailpp.cli import main
from detailpp.parsing.decompose import decompose
from detailpp.plan import DecompositionPlan


@pytest.mark.parametrize(
    ("prompt", "base", "branches"),
    [
        (
            "a \"red\" dog and a 'blue' cat",
            "a dog and a cat",
            [("dog", ("red",), 'a "red" dog and a cat'), ("cat", ("blue",), "a dog and a 'blue' cat")],
        ),
        (
            "a \u201cred\u201d dog and a blue cat",
            "a dog and a cat",
            [("dog", ("red",), "a \u201cred\u201d dog and a cat"), ("cat", ("blue",), "a dog and a blue cat")],
        ),
        (
            "a red \U0001f436 dog and a blue cat",
            "a \U0001f436 dog and a cat",
            [
                ("dog", ("red",), "a red \U0001f436 dog and a cat"),
                ("cat", ("blue",), "a \U0001f436 dog and a blue cat"),
            ],
        ),
        (
            'a "red dog" and a blue cat',
            'a "dog" and a cat',
            [("dog", ("red",), 'a "red dog" and a cat'), ("cat", ("blue",), 'a "dog" and a blue cat')],
        ),
    ],
)
def test_quoted_and_emoji_adjacent_modifiers_are_read(prompt, base, branches):
    plan = decompose(prompt)
    assert plan.base == base and plan.notice is None
    assert [(b.subject, b.attributes, b.prompt) for b in plan.branches] == branches


def test_a_possessive_apostrophe_is_no_quotation_mark():
    plan = decompose("the dogs' red bowls and a blue cat")
    assert [(b.subject, b.attributes) for b in plan.branches] == [("bowls", ("red",)), ("cat", ("blue",))]


def test_decompose_file_names_lines_skips_blank_ones_and_reports_each_bad_line(tmp_path, capsys, caplog):
    path = tmp_path / "prompts.txt"
    lines = ["a red car and a blue bench", "", "(red:1.2) car", "", "a green dog and a yellow cat", "   "]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="detailpp.cli.decompose"):
        assert main(["decompose", "--file", str(path)]) == 2
    captured = capsys.readouterr()
    plans = [DecompositionPlan.from_json(line) for line in captured.out.splitlines()]
    assert [p.prompt for p in plans] == [lines[0], lines[4]]  # the good lines are printed
    err = captured.err.splitlines()
    assert err[0].startswith("detailpp decompose: line 3: The prompt uses prompt-weight syntax")
    assert err[1] == f"detailpp decompose: error: 1 of 3 line(s) of {path} could not be decomposed (above)"
    assert "skipped 3 blank line(s): line 2, 4, 6" in caplog.text
