"""The rules a call's inputs obey wherever they are entered (the pipeline's call, the CLI's flags, the demo's fields).

One home per rule; each surface words the field its own way (`` `height` ``, ``--height``, ``Height``) and
translates the error into its own (the CLI's ``UserError``, the demo's ``DemoInputError``), the rest of the sentence
being the same everywhere. Importable without torch, so that the CLI checks its flags before a model is loaded.
The prompt's text rule is :func:`detailpp.plan.check_prompt_text`; its length rule is :func:`check_prompt_window`.

The documented limits:

* :data:`MAX_STEPS` denoising steps: the schedulers of SD 1.x/2.x and SDXL are trained on 1000 timesteps; more steps
  only revisit them (and some schedulers then fail or silently repeat timestep 0).
* :data:`MAX_SIDE` pixels a side: four times SDXL's native 1024 (16 times its pixels and more than 256 times its
  attention cost at full resolution), already beyond what one GPU can hold for SDXL.
* seeds in ``0..``:data:`SEED_MAX` (``torch.Generator.manual_seed``'s range).
* prompts of at most :data:`TOKEN_WINDOW` CLIP tokens (see :func:`check_prompt_window`).
"""

from __future__ import annotations

import math
from typing import Any

from detailpp.errors import DetailError
from detailpp.plan import CLIP_MAX_TOKENS

#: The most denoising steps a call takes (the schedulers' 1000 training timesteps).
MAX_STEPS = 1000
#: The longest image side in pixels.
MAX_SIDE = 4096
#: The largest seed (``torch.Generator.manual_seed`` takes 0..2^64-1).
SEED_MAX = 2**64 - 1
#: CLIP's text window without its start and end tokens.
TOKEN_WINDOW = CLIP_MAX_TOKENS - 2


class DetailInputError(DetailError, ValueError):
    """A call argument Detail++ cannot use; raised before any denoising starts."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_image_side(label: str, value: Any, hint: str = "", multiple: int = 8) -> int:
    """An image side in pixels: a multiple of ``multiple`` (the VAE's factor, 8; 16 where a transformer patches the
    latents 2x2) in ``multiple..MAX_SIDE``."""
    if not _is_int(value) or not multiple <= value <= MAX_SIDE or value % multiple:
        raise DetailInputError(
            f"{label} must be a multiple of {multiple} in {multiple}..{MAX_SIDE}{hint}, got {value!r}."
        )
    return value


def check_steps(label: str, value: Any) -> int:
    """A number of denoising steps: a whole number in ``1..MAX_STEPS``."""
    if not _is_int(value) or not 1 <= value <= MAX_STEPS:
        raise DetailInputError(f"{label} must be a whole number in 1..{MAX_STEPS}, got {value!r}.")
    return value


def check_seed(label: str, value: Any, hint: str = "") -> int:
    """A seed in ``0..SEED_MAX``."""
    if not _is_int(value) or not 0 <= value <= SEED_MAX:
        raise DetailInputError(f"{label} must lie in 0..{SEED_MAX}{hint}, got {value!r}.")
    return value


def check_finite(label: str, value: Any, minimum: float | None = None) -> float:
    """A finite number (not NaN, not infinite), at least ``minimum`` when given; returns it as a float."""
    at_least = "" if minimum is None else f" >= {minimum:g}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, (bool, str)) or not math.isfinite(number) or (minimum is not None and number < minimum):
        raise DetailInputError(f"{label} must be a finite number{at_least}, got {value!r}.")
    return number


def check_guidance(label: str, value: Any) -> float:
    """A classifier-free guidance scale: a finite number >= 0 (NaN would silently turn guidance off)."""
    return check_finite(label, value, minimum=0)


def check_negative_prompt(label: str, value: Any) -> str | None:
    """The negative prompt of a Detail++ call: one string (shared by every branch) or ``None``."""
    if value is None or isinstance(value, str):
        return value
    raise DetailInputError(
        f"{label} must be one string (Detail++ runs one prompt per call and every branch shares the negative "
        f"prompt), got {type(value).__name__} {value!r}."
    )


def check_prompt_window(text: str, what: str, tokenizer: Any) -> None:
    """The window rule, the same for the CLI, the demo and the Python API: a prompt (or base prompt, sub-prompt,
    negative prompt) longer than the text encoder's window is refused, never truncated.

    Detail++'s prompts are rewrites of one prompt; truncating each at the window would cut them at different words,
    so the branches would no longer differ from the base prompt by their subject's details only. ``tokenizer`` is the
    one the plan's subject tokens are counted with (the model's, or the packaged CLIP one before the model loads):
    CLIP reads :data:`TOKEN_WINDOW` (75) tokens besides its start and end tokens; FLUX.1's T5 reads the
    ``max_sequence_length`` its pipeline sets (512) less its end token.
    """
    from detailpp.plan import special_tokens, token_window, tokenizer_name

    window = token_window(tokenizer) - special_tokens(tokenizer)
    ids = tokenizer(text, truncation=False, verbose=False, add_special_tokens=False).input_ids
    if len(ids) > window:
        name = tokenizer_name(tokenizer)
        dropped = tokenizer.decode(ids[window : window + 6]).strip()
        about = " (about 50 words)" if name == "CLIP" else ""
        raise DetailInputError(
            f"The {what} is {len(ids)} {name} tokens long; the text encoders read only the first {window}{about}: "
            f"everything from {dropped!r}... would be ignored. Shorten it."
        )


def check_scheduler_steps(scheduler: Any, steps: int, label: str) -> None:
    """Known limits of diffusers' schedulers, checked before the first step: PNDM with its Runge-Kutta warm-up
    (``skip_prk_steps`` off, as ``--scheduler pndm`` makes it from SDXL's config) needs ``pndm_order`` (4) steps."""
    config = getattr(scheduler, "config", None)
    if type(scheduler).__name__ == "PNDMScheduler" and not getattr(config, "skip_prk_steps", True):
        order = int(getattr(scheduler, "pndm_order", 4))
        if steps < order:
            raise DetailInputError(
                f"{label} is {steps}, but the PNDM (PLMS) scheduler's Runge-Kutta warm-up needs at least {order} "
                f"steps; use {order} or more, or another scheduler (euler, ddim, dpm++-2m...)."
            )


__all__ = [
    "MAX_SIDE",
    "MAX_STEPS",
    "SEED_MAX",
    "TOKEN_WINDOW",
    "DetailInputError",
    "check_finite",
    "check_guidance",
    "check_image_side",
    "check_negative_prompt",
    "check_prompt_window",
    "check_scheduler_steps",
    "check_seed",
    "check_steps",
]
