"""The metrics ``detailpp bench score`` knows: their recorded settings, how to load them, what prompts they accept."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from detailpp.bench import BenchError
from detailpp.bench import blip_vqa as _blip
from detailpp.bench import image_reward as _ir
from detailpp.bench import scb as _scb
from detailpp.bench.suites import parse_scb_prompt

METRIC_NAMES: tuple[str, ...] = ("blip-vqa", "image-reward", "scb")
#: Digits the report shows (the paper: 4 for BLIP-VQA and SCB, 3 for ImageReward).
DECIMALS = {"blip-vqa": 4, "image-reward": 3, "scb": 4}
LABELS = {"blip-vqa": "BLIP-VQA", "image-reward": "ImageReward", "scb": "SCB"}


class Scorer(Protocol):
    def score(self, images: Sequence[Any], prompts: Sequence[str]) -> list[tuple[float | None, dict]]: ...


@dataclass
class Metric:
    """A metric before its models are loaded: ``config`` is recorded with every score, ``load()`` builds the scorer."""

    name: str
    config: dict
    loader: Callable[[], Scorer]
    check_prompt: Callable[[str], None] = field(default=lambda prompt: None)

    def check_prompts(self, prompts: Sequence[str]) -> None:
        for p in prompts:
            self.check_prompt(p)

    def load(self) -> Scorer:
        return self.loader()


class _BlipAdapter:
    def __init__(self, scorer: _blip.BlipVqaScorer):
        self.scorer = scorer

    def score(self, images, prompts):
        return [(r.score, r.details()) for r in self.scorer.score(images, prompts)]


def make_metric(
    name: str,
    device: str = "cpu",
    blip_model: str = _blip.DEFAULT_MODEL,
    scb_settings: _scb.ScbSettings | None = None,
    image_reward_model: str = _ir.DEFAULT_MODEL,
    image_reward_root: str | None = None,
) -> Metric:
    if name == "blip-vqa":
        config = {
            "model": blip_model,
            "image_size": _blip.IMAGE_SIZE,
            "max_questions": _blip.MAX_QUESTIONS,
            "excluded_chunks": list(_blip.EXCLUDED_CHUNKS),
            "vision_layer_norm_eps": _blip.VISION_LAYER_NORM_EPS,
            "tokens": {
                "enc": _blip.ENC_TOKEN_ID,
                "dec": _blip.DEC_TOKEN_ID,
                "yes": _blip.YES_TOKEN_ID,
                "no": _blip.NO_TOKEN_ID,
            },
        }

        def load_blip() -> Scorer:
            model, tokenizer = _blip.load_blip_vqa(blip_model, device)
            return _BlipAdapter(_blip.BlipVqaScorer(model, tokenizer, device, nlp=_blip.load_spacy()))

        return Metric(name, config, load_blip)
    if name == "scb":
        settings = scb_settings or _scb.ScbSettings()
        return Metric(
            name,
            asdict(settings),
            lambda: _scb.ScbScorer.load(settings, device),
            lambda prompt: (parse_scb_prompt(prompt), None)[1],
        )
    if name == "image-reward":
        config = {"model": image_reward_model, "normalisation": {"mean": _ir.MEAN, "std": _ir.STD}}

        def load_ir() -> Scorer:
            return _ir.ImageRewardScorer.load(image_reward_model, device, image_reward_root)

        return Metric(name, config, load_ir)
    raise BenchError(f"Unknown metric {name!r}; use one of {', '.join(METRIC_NAMES)}.")
