"""The rules a call's inputs obey wherever they are entered (the pipeline's call, the CLI's flags, the demo's fields).

One home per rule; each surface words the field its own way (`` `height` ``, ``--height``, ``Height``) and
translates the error into its own (the CLI's ``UserError``, the demo's ``DemoInputError``). Importable without torch,
so that the CLI checks its flags before a model is loaded.
The prompt's rule is :func:`detailpp.plan.check_prompt_text`.
"""

from __future__ import annotations

from typing import Any

from detailpp.errors import DetailError


class DetailInputError(DetailError, ValueError):
    """A call argument Detail++ cannot use; raised before any denoising starts."""


def check_image_side(label: str, value: Any, hint: str = "", multiple: int = 8) -> int:
    """An image side in pixels: a positive multiple of ``multiple`` (the VAE's factor, 8; 16 where a transformer
    patches the latents 2x2); raises :class:`DetailInputError`."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % multiple:
        raise DetailInputError(f"{label} must be a positive multiple of {multiple}{hint}, got {value!r}.")
    return value
