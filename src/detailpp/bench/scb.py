"""The Style Composition Benchmark's score: Grounding DINO crops + CLIP cosine, per component, averaged.

For each component of an SCB prompt (the subject, then the background):

1. detect it with Grounding DINO (transformers' zero-shot object detection): text = the word in lower case ending with
   ``"."``, ``post_process_grounded_object_detection(threshold=box_threshold, text_threshold=text_threshold)``; the
   highest-scoring box is kept (boxes smaller than ``min_box`` pixels on a side count as not detected);
2. crop the image to that box (a crop, not a segmentation: CLIP reads blanked images badly);
3. raw cosine similarity (not x100) between CLIP's embedding of the crop (CLIP's own preprocessing: shortest side
   resize + centre crop) and of ``"A [style] style [component]"``.

The image's score is the mean over its components. Choices the paper leaves open, each a flag: the CLIP checkpoint
(default ``openai/clip-vit-base-patch32``, the one T2I-CompBench's CLIP scorer uses), the detector
(``IDEA-Research/grounding-dino-tiny``), the thresholds (0.35 / 0.25, Grounding DINO's own demo defaults) and what
happens when a component is not detected (:data:`MISSING_POLICIES`; default ``whole-image``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from detailpp.bench import BenchError
from detailpp.bench.models import load_model
from detailpp.bench.suites import parse_scb_prompt

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
DEFAULT_BOX_THRESHOLD = 0.35
DEFAULT_TEXT_THRESHOLD = 0.25
DEFAULT_MIN_BOX = 8
#: What a component that the detector does not find gets:
#: ``whole-image`` — the cosine with the whole image (lenient: the style is still judged);
#: ``zero`` — 0 (strict: a missing subject is a failure);
#: ``skip`` — left out of the image's mean (an image with no component found has no score and is left out).
MISSING_POLICIES: tuple[str, ...] = ("whole-image", "zero", "skip")
DEFAULT_MISSING = "whole-image"


@dataclass(frozen=True)
class ScbSettings:
    clip_model: str = DEFAULT_CLIP_MODEL
    detector: str = DEFAULT_DETECTOR
    box_threshold: float = DEFAULT_BOX_THRESHOLD
    text_threshold: float = DEFAULT_TEXT_THRESHOLD
    missing: str = DEFAULT_MISSING
    min_box: int = DEFAULT_MIN_BOX

    def __post_init__(self) -> None:
        if self.missing not in MISSING_POLICIES:
            raise BenchError(f"Unknown --missing policy {self.missing!r}; use one of {', '.join(MISSING_POLICIES)}.")
        for name in ("box_threshold", "text_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise BenchError(f"--{name.replace('_', '-')} must be between 0 and 1, got {value}.")


def component_text(style: str, word: str) -> str:
    """The CLIP text of one component: ``"A [style] style [component]"``."""
    return f"A {style} style {word}"


def detector_text(word: str) -> str:
    """Grounding DINO's query: lower case, ending with a period."""
    return f"{word.lower().strip()}."


def load_clip(name: str = DEFAULT_CLIP_MODEL, device: str = "cpu"):
    from transformers import AutoProcessor, CLIPModel

    def loader(source: str):
        return CLIPModel.from_pretrained(source), AutoProcessor.from_pretrained(source)

    model, processor = load_model("CLIP", name, "--clip-model", loader)
    return model.to(device).eval(), processor


def load_detector(name: str = DEFAULT_DETECTOR, device: str = "cpu"):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    def loader(source: str):
        return AutoModelForZeroShotObjectDetection.from_pretrained(source), AutoProcessor.from_pretrained(source)

    model, processor = load_model("Grounding DINO", name, "--detector", loader)
    return model.to(device).eval(), processor


class ScbScorer:
    """Scores images of SCB prompts (see the module's docstring)."""

    name = "scb"

    def __init__(
        self,
        clip: Any,
        clip_processor: Any,
        detector: Any,
        detector_processor: Any,
        settings: ScbSettings = ScbSettings(),
        device: str = "cpu",
    ):
        self.clip, self.clip_processor = clip, clip_processor
        self.detector, self.detector_processor = detector, detector_processor
        self.settings = settings
        self.device = device

    @classmethod
    def load(cls, settings: ScbSettings = ScbSettings(), device: str = "cpu") -> ScbScorer:
        clip, clip_processor = load_clip(settings.clip_model, device)
        detector, detector_processor = load_detector(settings.detector, device)
        return cls(clip, clip_processor, detector, detector_processor, settings, device)

    def detect(self, image: Any, word: str) -> tuple[list[float], float] | None:
        """The best box ``[x0, y0, x1, y1]`` (pixels) for ``word`` and its score, or ``None``."""
        import torch

        inputs = self.detector_processor(images=image, text=detector_text(word), return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.detector(**inputs)
        result = self.detector_processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=self.settings.box_threshold,
            text_threshold=self.settings.text_threshold,
            target_sizes=[(image.height, image.width)],
        )[0]
        scores = result["scores"]
        if len(scores) == 0:
            return None
        best = int(torch.argmax(scores))
        box = [float(v) for v in result["boxes"][best].tolist()]
        return box, float(scores[best])

    def crop_box(self, image: Any, box: Sequence[float]) -> tuple[int, int, int, int] | None:
        """The pixels of ``box`` (outward to whole pixels, inside the image), or ``None`` when under ``min_box``."""
        x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
        x1, y1 = min(image.width, math.ceil(box[2])), min(image.height, math.ceil(box[3]))
        if x1 - x0 < self.settings.min_box or y1 - y0 < self.settings.min_box:
            return None
        return (x0, y0, x1, y1)

    def cosines(self, images: Sequence[Any], texts: Sequence[str]) -> list[float]:
        """Raw CLIP cosine of each (image, text) pair."""
        import torch

        inputs = self.clip_processor(text=list(texts), images=list(images), return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        with torch.no_grad():
            out = self.clip(**inputs)
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return [float(v) for v in (img * txt).sum(-1).cpu()]

    def score_one(self, image: Any, prompt: str) -> tuple[float | None, dict]:
        image = image.convert("RGB")
        parsed = parse_scb_prompt(prompt)
        crops, texts, components = [], [], []
        for style, word in parsed.components:
            found = self.detect(image, word)
            pixels = self.crop_box(image, found[0]) if found else None
            crop = image.crop(pixels) if pixels else None
            entry = {
                "word": word,
                "style": style,
                "text": component_text(style, word),
                "box": [round(v, 1) for v in found[0]] if found else None,
                "crop": list(pixels) if pixels else None,
                "detector_score": round(found[1], 4) if found else None,
                "detected": crop is not None,
            }
            if crop is None and self.settings.missing == "whole-image":
                crop = image
            if crop is not None:
                crops.append(crop)
                texts.append(entry["text"])
            components.append(entry)
        values = iter(self.cosines(crops, texts) if crops else [])
        scored = []
        for entry in components:
            if entry["detected"] or self.settings.missing == "whole-image":
                entry["cosine"] = next(values)
                scored.append(entry["cosine"])
            elif self.settings.missing == "zero":
                entry["cosine"] = 0.0
                scored.append(0.0)
            else:
                entry["cosine"] = None
        score = sum(scored) / len(scored) if scored else None
        return score, {"components": components}

    def score(self, images: Sequence[Any], prompts: Sequence[str]) -> list[tuple[float | None, dict]]:
        return [self.score_one(im, p) for im, p in zip(images, prompts, strict=True)]
