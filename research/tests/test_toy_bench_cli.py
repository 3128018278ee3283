"""``python -m research.toy.bench``: the binding benchmark's command (it was ``detailpp bench toy``)."""

from __future__ import annotations

from pathlib import Path

from research.toy.bench import build_parser, main


def test_work_dir_is_a_deprecated_alias_of_output_dir():
    parser = build_parser()
    assert parser.parse_args(["--work-dir", "w"]).work_dir == Path("w")
    assert parser.parse_args(["--output-dir", "w"]).work_dir == Path("w")


def test_the_device_is_checked_before_any_model_loads(tmp_path, capsys):
    assert main(["--device", "tpu9", "--output-dir", str(tmp_path / "toy")]) == 2
    assert "--device 'tpu9' is not a device name" in capsys.readouterr().err and not (tmp_path / "toy").exists()


def test_the_product_cli_has_no_toy_benchmark(capsys):
    from detailpp.cli import build_parser as product_parser

    sub = next(a for a in product_parser()._actions if a.dest == "command")
    bench = sub.choices["bench"]
    bench_sub = next(a for a in bench._actions if getattr(a, "choices", None) and "score" in a.choices)
    assert "toy" not in bench_sub.choices


def test_the_help_shows_defaults_and_has_no_backticks():
    import argparse

    parser = build_parser()
    assert "`" not in parser.format_help()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.nargs == 0:
            continue
        if action.default is None or action.dest in ("help", "version"):
            continue
        assert "default" in formatter._expand_help(action).lower(), action.option_strings
