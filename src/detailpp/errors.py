"""The one family of errors detailpp raises on purpose: :class:`DetailError`.

Every error of the package derives from it (and keeps the built-in base it always had, so ``except ValueError`` code
still catches it): :class:`~detailpp.config.ConfigError`, :class:`~detailpp.plan.PlanError`,
:class:`~detailpp.pipelines.sdxl.DetailInputError`, :class:`~detailpp.method.attention.HookError`,
:class:`~detailpp.models.loading.ModelLoadError`, :class:`~detailpp.bench.BenchError`, the demo's ``DemoInputError``
and the command line's ``UserError``. The command line and the demo translate this family into their messages; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DetailError(Exception):
    """Base of every error detailpp raises on purpose; the message names the problem and the fix."""


__all__ = ["DetailError"]
