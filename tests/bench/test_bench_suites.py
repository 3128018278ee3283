"""Suites: T2I-CompBench prompt files, the SCB sample, prompt-file errors, the `bench prompts` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from detailpp.bench import BenchError
from detailpp.bench.suites import (
    SCB_BACKGROUNDS,
    SCB_DATA_FILE,
    SCB_PATTERN,
    SCB_STYLES,
    SCB_SUBJECTS,
    load_scb_prompts,
    load_suite,
    parse_scb_prompt,
    read_prompts_checked,
    render_scb_json,
    scb_combinations,
)
from tests.paths import REPO


def test_t2i_compbench_suites():
    for name in ("t2i-color", "t2i-texture", "t2i-shape"):
        suite = load_suite(name)
        assert len(suite.prompts) == 300 == len(set(suite.prompts))
        assert all(p == p.strip() and "\r" not in p for p in suite.prompts)
    assert load_suite("t2i-color").prompts[0] == "a green bench and a blue bowl"


def test_scb_prompts_satisfy_the_template():
    prompts = load_scb_prompts()
    assert len(prompts) == 300 == len({p.prompt for p in prompts})
    assert len(scb_combinations()) == 7 * 6 * 5 * 5 == 1050
    lower = {w.lower() for w in SCB_SUBJECTS}, {w.lower() for w in SCB_BACKGROUNDS}
    for p in prompts:
        assert p.subject_style != p.background_style
        assert p.subject_style in SCB_STYLES and p.background_style in SCB_STYLES
        assert p.subject in lower[0] and p.background in lower[1]
        assert p.prompt == f"A {p.subject_style} style {p.subject} in a {p.background_style} style {p.background}"
        assert SCB_PATTERN.match(p.prompt) and parse_scb_prompt(p.prompt) == p
    assert load_suite("scb").prompts == tuple(p.prompt for p in prompts)


def test_scb_data_is_reproduced_by_its_script():
    assert SCB_DATA_FILE.read_text(encoding="utf-8") == render_scb_json()
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_scb_prompts.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(render_scb_json(seed=1))["prompts"] != json.loads(render_scb_json())["prompts"]


def test_prompt_file_problems_get_clear_messages(tmp_path, caplog):
    f = tmp_path / "p.txt"
    f.write_bytes(b"a red car\r\n\r\n  a blue dog  \r\n\r\na cat")
    assert read_prompts_checked(f) == ["a red car", "a blue dog", "a cat"]
    assert "blank line(s) 2, 4 skipped" in caplog.text
    f.write_text("a red car\na blue dog\na red car\n")
    with pytest.raises(BenchError, match=r"duplicate prompts: line 3 repeats line 1 \('a red car'\)"):
        read_prompts_checked(f)
    f.write_text("\n \n")
    with pytest.raises(BenchError, match="has no prompt"):
        read_prompts_checked(f)
    f.write_bytes(b"\xff\xfe bad")
    with pytest.raises(BenchError, match="not UTF-8"):
        read_prompts_checked(f)
    with pytest.raises(BenchError, match="Cannot read the prompt file"):
        read_prompts_checked(tmp_path / "missing.txt")
    with pytest.raises(BenchError, match="Unknown suite 'colour'"):
        load_suite("colour")


def test_prompts_command(tmp_path, capsys):
    from detailpp.cli import main

    assert main(["bench", "prompts", "--suite", "scb"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 300 and out[0].startswith("A ")
    assert main(["bench", "prompts", "--suite", "scb", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["subject_style"] in SCB_STYLES
    f = tmp_path / "dup.txt"
    f.write_text("x\nx\n")
    assert main(["bench", "prompts", "--prompt-file", str(f)]) == 2
    assert "duplicate prompts" in capsys.readouterr().err
