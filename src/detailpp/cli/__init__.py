"""The ``detailpp`` command: one sub-command per module of this package (``detailpp <command> --help``)."""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import logging
import re
import sys

from detailpp.errors import DetailError, operation_of

#: sub-command -> module of this package defining ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS = {
    "decompose": ("detailpp.cli.decompose", "split a prompt into the base prompt and one sub-prompt per subject"),
    "generate": ("detailpp.cli.generate", "generate an image with Detail++"),
    "bench": ("detailpp.cli.bench", "the paper's benchmarks: prompts, generation, scoring, reports"),
    "demo": ("detailpp.cli.demo", "start the browser demo"),
}

logger = logging.getLogger("detailpp")

#: logger -> messages the command drops: transformers' import-time notices that every command would print (the PIL
#: image processors are all we use), and diffusers' "Couldn't connect to the Hub" (a failed load then says it in one
#: line; a load from the cache needs no notice).
_SILENCED = {
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    "diffusers.pipelines.pipeline_utils": ("Couldn't connect to the Hub",),
    # an empty list of modules to keep in float32 (a cast of a model with none): nothing to warn about
    "diffusers.models.modeling_utils": ("that should be kept in float32: [].",),
    # a LoRA without text-encoder keys (most): apply_loras checks that every LoRA matches some layer
    "diffusers.loaders.peft": ("No LoRA keys associated to",),
    "diffusers.loaders.lora_base": ("No LoRA keys associated to",),
}
#: loggers whose INFO lines are noise on a command's output (each HTTP request of huggingface_hub's client).
_WARNINGS_ONLY = ("httpx", "httpcore")


class UserError(DetailError):
    """An error caused by the command's input: printed as one line, exit code 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every help shows its default; descriptions keep their layout; no reStructuredText backticks.

    ``(default: X)`` is added to an option's help unless the help already names its default, the default is ``None``
    (the help then says in words what is chosen) or the option is an on/off flag.
    """

    @staticmethod
    def _plain(text: str) -> str:
        return re.sub(r"`([^`]+)`", r"'\1'", re.sub(r"``([^`]+)``", r"\1", text))

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = self._plain(action.help or "")
        shows_default = "default" in help_text.lower() or "%(default)" in help_text
        flag = action.nargs == 0
        no_default = action.default in (None, argparse.SUPPRESS)
        if action.option_strings and not shows_default and not flag and not no_default:
            help_text += " (default: %(default)s)"
        return help_text

    def _format_text(self, text: str) -> str:
        return super()._format_text(self._plain(text))


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option, hidden from the help, still accepted; the command logs a notice once."""

    def __init__(self, option_strings, dest, new: str, const=None, nargs=None, **kwargs):
        self.new = new
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, nargs=nargs, const=const, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        notices = getattr(namespace, "_deprecated", None) or []
        notices.append(f"{option_string} is deprecated; use {self.new}.")
        namespace._deprecated = notices


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs) -> None:
    """``old`` as a hidden alias of the option ``new`` (stored in ``dest``)."""
    parser.add_argument(old, dest=dest, action=DeprecatedAlias, new=new, default=argparse.SUPPRESS, **kwargs)


def add_output_flags(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """``-v/--verbose`` and ``-q/--quiet``, before or after the sub-command (``top``: on the main parser)."""
    default = False if top else argparse.SUPPRESS  # a sub-command's flag must not reset the main parser's
    parser.add_argument("--verbose", "-v", action="store_true", default=default, help="log debug messages too")
    parser.add_argument(
        "--quiet", "-q", action="store_true", default=default, help="no progress bar; warnings and errors only"
    )


def _available_commands() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def _version() -> str:
    from detailpp import __version__

    return f"detailpp {__version__}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detailpp",
        description="Detail++ for SDXL: progressive detail injection.",
        epilog="detailpp COMMAND --help shows each command's options.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    add_output_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in _available_commands().items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name, help=help_text, description=(module.__doc__ or help_text).strip(), formatter_class=HelpFormatter
        )
        add_output_flags(p)
        module.add_arguments(p)
        p.formatter_class = HelpFormatter  # a RawDescriptionHelpFormatter, with defaults and without backticks
        p.set_defaults(_run=module.run)
    return parser


class _DropNotices(logging.Filter):
    def __init__(self, messages: tuple[str, ...]):
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(s in message for s in self.messages)


def silence_notices() -> None:
    """Drop the library notices of :data:`_SILENCED` (once per logger, however often it is called)."""
    for name, messages in _SILENCED.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in target.filters):
            target.addFilter(_DropNotices(messages))


def quiet_libraries() -> None:
    """After the command's logging is set: no INFO lines of the HTTP client, and huggingface_hub's warnings printed
    once (it adds its own stderr handler and also passes them on to the root logger's)."""
    for name in _WARNINGS_ONLY:
        logging.getLogger(name).setLevel(logging.WARNING)
    hub = logging.getLogger("huggingface_hub")
    if hub.propagate:
        hub.handlers = [h for h in hub.handlers if type(h) is not logging.StreamHandler]


def describe_os_error(e: OSError) -> str:
    """An OSError as one line that names the file (a full disk names the file it could not write)."""
    if type(e) is not OSError and not isinstance(e, (PermissionError, FileNotFoundError, IsADirectoryError)):
        return str(e)  # our own subclasses (ModelLoadError...) carry their message
    if e.errno == errno.ENOSPC:
        where = f" {e.filename}" if e.filename else ""
        return f"The disk is full: cannot write{where}. Free some space or choose another --output-dir."
    if e.filename and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return str(e)


def failing_library(error: BaseException) -> str:
    """The library an exception came from: the top-level package of the deepest frame of its traceback outside the
    standard library (numpy's C code leaves no frame: its caller is named); ``"detailpp"`` when it is our own."""
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    for module in reversed(frames):
        root = module.split(".")[0]
        if root and root not in sys.stdlib_module_names and root != "__main__":
            return root
    return "detailpp"


def describe_failure(error: BaseException, command: str) -> str:
    """A failure that is no bad input, in one line: the library, the operation, the error, and where to look."""
    library = failing_library(error)
    doing = operation_of(error) or f"running 'detailpp {command}'"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    what = f"{type(error).__name__}: {first}" if first else type(error).__name__
    bug = " (a bug of detailpp: please report it)" if library == "detailpp" else ""
    return f"{library} failed while {doing}{bug} ({what}); run with -v for the traceback."


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command. A bad input (the :class:`DetailError` family, a file that cannot be read or written) is one
    line and exit code 2; a failure inside a library is one line naming the library and the operation, exit code 1
    (``-v`` adds the traceback); an interrupt says what is missing and how to resume, exit code 130."""
    silence_notices()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    for notice in getattr(args, "_deprecated", None) or []:
        logger.warning(notice)
    try:
        return int(args._run(args) or 0)
    except (DetailError, OSError) as e:
        if args.verbose:
            logger.exception("failed")
        message = describe_os_error(e) if isinstance(e, OSError) else str(e)
        print(f"detailpp {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", None)
        print(f"detailpp {args.command}: interrupted{f'; {hint}' if hint else ''}", file=sys.stderr)
        return 130
    except Exception as e:  # a library's failure (or our bug): not the user's input
        if args.verbose:
            logger.exception("failed")
        message = str(e) if isinstance(e, FloatingPointError) else describe_failure(e, args.command)
        print(f"detailpp {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
