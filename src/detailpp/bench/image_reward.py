"""ImageReward (Xu et al., 2023) through the ``image-reward`` package, an optional extra imported lazily.

The package's ``score(prompt, image)`` returns the normalised reward ``(r - 0.16717362830052426) /
1.0333394966054072`` of BLIP ViT-L/16 (224 px) + BERT cross-attending to the image, [CLS] -> MLP. Its weights
(``THUDM/ImageReward``: ``ImageReward.pt``, ``med_config.json``) and ``bert-base-uncased`` come from the Hub at run
time. Its setup installs OpenAI CLIP from a git URL, which a machine that reaches only package registries cannot
do; so it is not a dependency of detailpp, and a missing package gives a message that says how to install it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import Any

from detailpp.bench import BenchError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "ImageReward-v1.0"
#: The package's normalisation (applied inside ``score``), recorded with every score.
MEAN = 0.16717362830052426
STD = 1.0333394966054072

INSTALL_HINT = (
    "ImageReward is an optional extra: `pip install image-reward` (its setup also installs OpenAI CLIP from GitHub, "
    "so it needs access to GitHub; on a machine without it, install `clip` from a wheel built elsewhere first)."
)


def import_image_reward() -> Any:
    """The ``ImageReward`` module, or a :class:`BenchError` saying how to install it."""
    try:
        return importlib.import_module("ImageReward")
    except ImportError as e:
        raise BenchError(f"The image-reward metric cannot run: {e}. {INSTALL_HINT}") from e


class ImageRewardScorer:
    name = "image-reward"

    def __init__(self, model: Any):
        self.model = model

    @classmethod
    def load(cls, name: str = DEFAULT_MODEL, device: str = "cpu", download_root: str | None = None):
        """``name``: ``ImageReward-v1.0`` (fetched from the Hub) or the path of a local ``ImageReward.pt``."""
        module = import_image_reward()
        try:
            model = module.load(name, device=device, download_root=download_root)
        except Exception as e:
            raise BenchError(
                f"Cannot load the ImageReward model {name!r}: {type(e).__name__}: {str(e).strip()[:300]}. Give "
                "--image-reward-model 'ImageReward-v1.0' (needs the Hub) or the path of ImageReward.pt, with "
                "med_config.json beside it in --image-reward-root."
            ) from e
        return cls(model)

    def score(self, images: Sequence[Any], prompts: Sequence[str]) -> list[tuple[float | None, dict]]:
        import torch

        out = []
        with torch.no_grad():
            for image, prompt in zip(images, prompts, strict=True):
                value = self.model.score(prompt, image.convert("RGB"))
                if isinstance(value, list | tuple):
                    value = value[0]
                out.append((float(value), {}))
        return out
