"""Which model family a diffusers folder or Hub repo is, read from its ``model_index.json`` before anything loads.

``model_index.json`` names the pipeline class it was saved from (``_class_name``). Detail++ runs on a UNet with
cross-attention at several resolutions and a CLIP-tokenised prompt (SDXL with or without ControlNet, Stable Diffusion
1.x / 2.x) and, experimental, on the MMDiT transformers FLUX.1 and SD3/3.5; other transformer families (FLUX.2,
PixArt, Sana...) and prior/decoder families (Kandinsky, Wuerstchen, Stable Cascade) do not, and get a clear
:class:`UnsupportedModelError` instead of a failure deep inside loading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from detailpp.errors import DetailError
from detailpp.hub import read_model_index


class UnsupportedModelError(DetailError, ValueError):
    """The model is of a family Detail++ cannot run on; the message names the family and what is supported."""


@dataclass(frozen=True)
class ModelFamily:
    """A family Detail++ knows: ``"sdxl"`` or ``"sd"`` (1.x / 2.x), with or without ControlNet; the transformers
    ``"flux"`` (FLUX.1 dev and schnell) and ``"sd3"`` (Stable Diffusion 3 / 3.5)."""

    name: str
    controlnet: bool = False

    @property
    def label(self) -> str:
        base = FAMILY_LABELS[self.name]
        return base + (" + ControlNet" if self.controlnet else "")

    @property
    def transformer(self) -> bool:
        """An MMDiT family (experimental: docs/method.md, "Detail++ on MMDiT")."""
        return self.name in ("flux", "sd3")


#: Each family's name in messages.
FAMILY_LABELS = {
    "sdxl": "Stable Diffusion XL",
    "sd": "Stable Diffusion 1.x/2.x",
    "flux": "FLUX.1",
    "sd3": "Stable Diffusion 3/3.5",
}
#: The families Detail++ runs on, in one phrase (the refusals name them).
SUPPORTED_TEXT = (
    "Stable Diffusion XL and Stable Diffusion 1.x/2.x (with or without ControlNet), and, experimental, FLUX.1 (dev, "
    "schnell) and Stable Diffusion 3/3.5"
)


#: ``_class_name`` prefixes of the supported families (diffusers' text-to-image, img2img, inpaint... classes).
SUPPORTED = (
    ("StableDiffusionXLControlNet", ModelFamily("sdxl", True)),
    ("StableDiffusionXL", ModelFamily("sdxl")),
    ("StableDiffusion3Pipeline", ModelFamily("sd3")),
    ("StableDiffusionControlNet", ModelFamily("sd", True)),
    ("StableDiffusion", ModelFamily("sd")),
    ("FluxPipeline", ModelFamily("flux")),
    ("DetailPlusPlusControlNet", ModelFamily("sdxl", True)),
    ("DetailPlusPlusFlux", ModelFamily("flux")),
    ("DetailPlusPlusSD3", ModelFamily("sd3")),
    ("DetailPlusPlusSD", ModelFamily("sd")),
    ("DetailPlusPlus", ModelFamily("sdxl")),
)

#: Families seen in the wild that Detail++ cannot run on, by ``_class_name`` prefix, with the reason.
UNSUPPORTED = (
    ("StableDiffusion3ControlNet", "Stable Diffusion 3 + ControlNet (not wired into Detail++'s branch batch)"),
    ("StableDiffusion3", "a Stable Diffusion 3 task pipeline (Detail++ runs SD3's text-to-image pipeline)"),
    ("Flux2", "FLUX.2 (another transformer and text encoder than FLUX.1)"),
    ("FluxControlNet", "FLUX.1 + ControlNet (not wired into Detail++'s branch batch)"),
    ("FluxKontext", "FLUX.1 Kontext (an editing model: its image tokens are part of the prompt)"),
    ("Flux", "a FLUX.1 task pipeline (Fill, Control, Redux...; Detail++ runs FLUX.1's text-to-image pipeline)"),
    ("Chroma", "Chroma (a FLUX variant without CLIP, not wired)"),
    ("HiDream", "HiDream (a transformer with four text encoders, not wired)"),
    ("QwenImage", "Qwen-Image (a transformer on a language model's text, not wired)"),
    ("CogView", "CogView (a transformer, not wired)"),
    ("PixArt", "PixArt (a transformer)"),
    ("Sana", "Sana (a linear-attention transformer)"),
    ("HunyuanDiT", "Hunyuan-DiT (a transformer)"),
    ("Lumina", "Lumina (a transformer)"),
    ("AuraFlow", "AuraFlow (a transformer)"),
    ("Kandinsky", "Kandinsky (a prior and a decoder, no CLIP-tokenised UNet prompt)"),
    ("Wuerstchen", "Wuerstchen (a prior and a decoder)"),
    ("StableCascade", "Stable Cascade (a prior and a decoder)"),
    ("IF", "DeepFloyd IF (pixel-space cascade with a T5 prompt)"),
)


def family_of_class(class_name: str) -> ModelFamily:
    """The family of a pipeline class name, or :class:`UnsupportedModelError` saying why not."""
    for prefix, family in SUPPORTED:  # the supported text-to-image classes first (their prefixes are refused below)
        if prefix.endswith("Pipeline") and class_name == prefix:
            return family
    for prefix, reason in UNSUPPORTED:
        if class_name.startswith(prefix):
            raise UnsupportedModelError(f"{class_name} is {reason}: Detail++ runs on {SUPPORTED_TEXT}.")
    for prefix, family in SUPPORTED:
        if class_name.startswith(prefix):
            return family
    raise UnsupportedModelError(f"{class_name} is not a model family Detail++ knows; it runs on {SUPPORTED_TEXT}.")


def model_family(model: str | os.PathLike, **hub_kwargs: Any) -> ModelFamily | None:
    """The family of a model folder or Hub id from its ``model_index.json``; ``None`` when it has none to read."""
    index = read_model_index(model, **hub_kwargs)
    if index is None:
        return None
    class_name = index.get("_class_name")
    if not isinstance(class_name, str):
        raise UnsupportedModelError(f"{model}'s model_index.json names no pipeline class (_class_name).")
    return family_of_class(class_name)


#: The built-in models (no download) and their families.
BUILTIN_MODELS: dict[str, ModelFamily] = {
    "toy": ModelFamily("sdxl"),
    "tiny-random": ModelFamily("sdxl"),
    "sdxl-random": ModelFamily("sdxl"),
    "tiny-random-sd15": ModelFamily("sd"),
    "tiny-random-sd21": ModelFamily("sd"),
    "sd15-random": ModelFamily("sd"),
    "tiny-random-flux": ModelFamily("flux"),
    "tiny-random-sd3": ModelFamily("sd3"),
    "flux-random": ModelFamily("flux"),
    "sd35-random": ModelFamily("sd3"),
}

#: What each built-in model is for, as the command line's ``--model`` help groups them.
BUILTIN_ROLES: dict[str, str] = {
    "toy": "trained",
    "tiny-random": "tiny",
    "tiny-random-sd15": "tiny",
    "tiny-random-sd21": "tiny",
    "sdxl-random": "full",
    "sd15-random": "full",
    "tiny-random-flux": "tiny",
    "tiny-random-sd3": "tiny",
    "flux-random": "full",
    "sd35-random": "full",
}


def builtin_models_help() -> str:
    """The built-in models in one phrase, from :data:`BUILTIN_MODELS` (so that no command's help can miss one)."""
    by_role = {role: [n for n, r in BUILTIN_ROLES.items() if r == role] for role in ("trained", "tiny", "full")}
    return (
        f"{', '.join(by_role['trained'])} (the embedded model), random weights for checking the set-up: "
        f"{', '.join(by_role['tiny'])} (tiny) and {', '.join(by_role['full'])} (full size, for timing)"
    )
