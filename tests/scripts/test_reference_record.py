"""benchmarks/reference/record.py's checks and writers (no authors' code involved: their files are faked)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.paths import BENCHMARKS, load_script

# benchmarks/reference holds scripts, not a package: loaded by file (authors.py first, since record.py imports it)
load_script(BENCHMARKS / "reference" / "authors.py")
load_script(BENCHMARKS / "reference" / "record.py")

from authors import FILES, CheckoutError, check_checkout  # noqa: E402
from record import DOC_END, DOC_START, main, table_markdown, update_doc  # noqa: E402


def fake_checkout(root: Path) -> Path:
    for name in FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("# not their code\n")
    return root


def test_a_folder_that_is_not_their_repository_is_named(tmp_path):
    with pytest.raises(CheckoutError, match=r"is not the authors' repository clf28/Detail-plus-plus: it lacks "):
        check_checkout(tmp_path)
    with pytest.raises(
        CheckoutError, match=r"is not a folder\. Expected a checkout of clf28/Detail-plus-plus at e73155b"
    ):
        check_checkout(tmp_path / "missing")


def test_modified_files_are_refused_with_the_restore_command(tmp_path):
    root = fake_checkout(tmp_path)
    with pytest.raises(
        CheckoutError, match=r"differs from clf28/Detail-plus-plus at e73155b .*git -C .* checkout e73155b --"
    ):
        check_checkout(root)


def test_another_commit_is_refused(tmp_path):
    root = fake_checkout(tmp_path)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    with pytest.raises(CheckoutError, match=r"is at commit [0-9a-f]{7}, expected e73155b"):
        check_checkout(root)


def test_the_script_says_so_in_one_line(tmp_path, capsys):
    assert main(["--authors", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_the_deviation_table_goes_between_the_markers(tmp_path):
    table = table_markdown([{"deviation": "x", "nursing_off": 1.0, "nursing_on": 2e-5}])
    assert table.splitlines() == [
        "| deviation of our default, alone | nursing off | nursing on |",
        "|---|---|---|",
        "| x | 1 | 2e-05 |",
    ]
    doc = tmp_path / "method.md"
    doc.write_text(f"before\n{DOC_START}\nold\n{DOC_END}\nafter\n")
    update_doc(doc, table)
    assert doc.read_text() == f"before\n{DOC_START}\n{table}\n{DOC_END}\nafter\n"
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="has no deviation-table markers"):
        update_doc(doc, table)
