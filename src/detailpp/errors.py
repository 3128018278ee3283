"""The one family of errors detailpp raises on purpose: :class:`DetailError`; and :func:`operation`, which says what
detailpp was doing when something else failed.

Every error of the package derives from it (and keeps the built-in base it always had, so ``except ValueError`` code
still catches it): :class:`~detailpp.config.ConfigError`, :class:`~detailpp.plan.PlanError`,
:class:`~detailpp.inputs.DetailInputError`, :class:`~detailpp.method.attention.HookError`,
:class:`~detailpp.models.loading.ModelLoadError`, :class:`~detailpp.bench.BenchError`, the demo's ``DemoInputError``
and the command line's ``UserError``. The command line and the demo translate this family into their messages
(a bad input: one line, exit code 2); anything else failed inside a library (or is a bug of ours) and is reported as
such, naming the library and the :func:`operation` it interrupted (exit code 1; ``-v`` shows the traceback).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

#: The attribute :func:`operation` sets on an exception that leaves it.
OPERATION_ATTRIBUTE = "detailpp_operation"


class DetailError(Exception):
    """Base of every error detailpp raises on purpose; the message names the problem and the fix."""


@contextmanager
def operation(description: str) -> Iterator[None]:
    """Name what the block does (``"loading the model 'x'"``) on any exception that leaves it: the innermost name is
    kept, so that a failure deep inside a library can be reported as "diffusers failed while loading the model"."""
    try:
        yield
    except BaseException as e:
        if getattr(e, OPERATION_ATTRIBUTE, None) is None:
            try:
                setattr(e, OPERATION_ATTRIBUTE, description)
            except AttributeError:  # pragma: no cover - an exception type with __slots__
                pass
        raise


def operation_of(error: BaseException) -> str | None:
    """What detailpp was doing when ``error`` was raised (the innermost :func:`operation`), or ``None``."""
    return getattr(error, OPERATION_ATTRIBUTE, None)


__all__ = ["DetailError", "operation", "operation_of"]
