"""LoRA files for a Detail++ pipeline: ``--lora PATH[:SCALE]``, checked before the model loads, applied after.

diffusers' LoRA support (``load_lora_weights`` / ``set_adapters`` / ``fuse_lora`` / ``unload_lora_weights``, through
``peft``) wraps the UNet's and text encoders' linear layers, not the attention processors, so it composes with
Detail++'s processors as it is: every branch sees the LoRA'd weights, and a plan with no branch is plain SDXL with
the same LoRA. This module only parses the command-line form and turns diffusers' failures into one clear sentence.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detailpp.errors import DetailError

logger = logging.getLogger(__name__)


class LoraError(DetailError, ValueError):
    """A LoRA argument or file that cannot be used; the message names it and the fix."""


#: The file name diffusers' ``save_lora_weights`` gives every LoRA; its folder names such a LoRA instead.
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights"


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to load: a ``.safetensors`` file or a folder holding ``pytorch_lora_weights.safetensors``."""

    path: Path
    scale: float = 1.0

    @property
    def adapter_name(self) -> str:
        """A name for the adapter: the file's stem, or its folder's name for diffusers' default file name."""
        name = self.path.parent.name if self.path.stem == DEFAULT_WEIGHT_NAME else self.path.stem
        return "".join(c if c.isalnum() else "_" for c in name) or "lora"


def adapter_names(specs: list[LoraSpec]) -> list[str]:
    """One distinct adapter name per LoRA (``name``, ``name_2``, ...): two files of one name are two adapters."""
    names: list[str] = []
    for spec in specs:
        name, k = spec.adapter_name, 1
        while name in names:
            k += 1
            name = f"{spec.adapter_name}_{k}"
        names.append(name)
    return names


def parse_lora(text: str) -> LoraSpec:
    """``PATH`` or ``PATH:SCALE`` (scale a finite number, default 1.0), checked without loading anything."""
    from detailpp.inputs import DetailInputError, check_finite

    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and not Path(text).expanduser().exists():
        try:
            path, scale = head, float(tail)
        except ValueError:
            if Path(head).expanduser().exists():
                raise LoraError(
                    f"--lora {text}: the scale {tail!r} is not a number; write PATH:SCALE, e.g. {head}:0.8."
                ) from None
            path = text  # a ':' that is part of the path
        else:
            try:
                check_finite(f"--lora {text}: the scale", scale)
            except DetailInputError as e:
                raise LoraError(str(e)) from None
    p = Path(path).expanduser()
    if not p.exists():
        raise LoraError(f"--lora {text}: no such file or folder {str(p)!r}.")
    if p.is_file() and p.suffix.lower() != ".safetensors":
        raise LoraError(f"--lora {text}: expected a .safetensors file (or a folder holding one), got {p.name!r}.")
    return LoraSpec(p, scale)


def check_peft() -> None:
    if importlib.util.find_spec("peft") is None:
        raise LoraError("LoRA needs the peft package: pip install peft (or pip install 'detailpp[lora]').")


def apply_loras(pipe: Any, specs: list[LoraSpec]) -> None:
    """Load every LoRA into ``pipe`` under its own adapter name and set their scales; clear errors on mismatch."""
    if not specs:
        return
    check_peft()
    names = []
    for spec, name in zip(specs, adapter_names(specs), strict=True):
        try:
            pipe.load_lora_weights(str(spec.path), adapter_name=name)
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LoraError(
                f"The LoRA {str(spec.path)!r} does not fit this model ({first[:300]}); is it a LoRA for this "
                "model family (SDXL LoRAs for SDXL models)?"
            ) from e
        if not any(name in loaded for loaded in pipe.get_list_adapters().values()):
            raise LoraError(
                f"The LoRA {str(spec.path)!r} matches no layer of this model's UNet or text encoders; is it a LoRA "
                "for this model family (SDXL LoRAs for SDXL models)?"
            )
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[s.scale for s in specs])
    logger.info("LoRA: %s", ", ".join(f"{s.path} x {s.scale}" for s in specs))
