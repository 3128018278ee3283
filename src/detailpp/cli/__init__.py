"""The ``detailpp`` command: one sub-command per module of this package (``detailpp <command> --help``)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from detailpp.plan import PlanError

#: sub-command -> module of this package defining ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS = {
    "decompose": ("detailpp.cli.decompose", "split a prompt into the base prompt and one sub-prompt per subject"),
    "generate": ("detailpp.cli.generate", "generate an image with Detail++"),
    "bench": ("detailpp.cli.bench", "the paper's benchmarks: prompts, generation, scoring, reports"),
    "demo": ("detailpp.cli.demo", "start the browser demo"),
}

logger = logging.getLogger("detailpp")


class UserError(Exception):
    """An error caused by the command's input: printed as one line, exit code 2."""


def _available_commands() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detailpp", description="Detail++ for SDXL: progressive detail injection.")
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in _available_commands().items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args._run(args) or 0)
    except (UserError, PlanError, ValueError, OSError, FloatingPointError) as e:
        # Input problems get one clear line, not a traceback; --verbose shows the traceback too.
        if args.verbose:
            logger.exception("failed")
        print(f"detailpp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"detailpp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
