"""SCB (Grounding DINO crops + CLIP cosine) on tiny random models, and ImageReward as an optional extra."""

from __future__ import annotations

import sys
import types

import pytest

from tests.bench.tiny_models import make_tiny_clip, make_tiny_grounding_dino, random_image

PROMPT = "A Lego style dog in a Watercolor style forest"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A scorer loaded once through detailpp's loading code from the saved tiny models."""
    from detailpp.bench.scb import ScbScorer, ScbSettings

    root = tmp_path_factory.mktemp("scb")
    clip, gdino = str(make_tiny_clip(root / "clip")), str(make_tiny_grounding_dino(root / "gdino"))
    return ScbScorer.load(ScbSettings(clip_model=clip, detector=gdino), "cpu")


def scorer(base, **overrides):
    from dataclasses import replace

    from detailpp.bench.scb import ScbScorer

    return ScbScorer(
        base.clip,
        base.clip_processor,
        base.detector,
        base.detector_processor,
        replace(base.settings, **overrides),
        "cpu",
    )


def manual_cosine(s, image, text: str) -> float:
    import torch

    inputs = s.clip_processor(text=[text], images=[image], return_tensors="pt", padding=True)
    with torch.no_grad():
        img = s.clip.get_image_features(pixel_values=inputs["pixel_values"])
        txt = s.clip.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return float(torch.nn.functional.cosine_similarity(img, txt)[0])


def test_detected_components_are_cropped_and_compared_with_clip(models):
    s = scorer(models, box_threshold=0.0, text_threshold=0.0, min_box=1)
    image = random_image(11, (80, 64))
    score, details = s.score_one(image, PROMPT)
    comps = details["components"]
    assert [(c["word"], c["style"], c["text"]) for c in comps] == [
        ("dog", "Lego", "A Lego style dog"),
        ("forest", "Watercolor", "A Watercolor style forest"),
    ]
    assert all(c["detected"] for c in comps)
    for c in comps:
        assert 0.0 <= c["detector_score"] <= 1.0 and len(c["box"]) == 4
        x0, y0, x1, y1 = c["crop"]  # the box, outward to whole pixels
        assert abs(x0 - c["box"][0]) <= 1.05 and abs(x1 - c["box"][2]) <= 1.05 and 0 <= x0 < x1 <= image.width
        assert abs(y0 - c["box"][1]) <= 1.05 and abs(y1 - c["box"][3]) <= 1.05 and 0 <= y0 < y1 <= image.height
        crop = image.crop(c["crop"])
        assert c["cosine"] == pytest.approx(manual_cosine(s, crop, c["text"]), abs=1e-5)
    assert score == pytest.approx(sum(c["cosine"] for c in comps) / 2)
    assert -1.0 <= score <= 1.0  # a raw cosine, not x100


def test_nothing_detected_policies(models):
    image = random_image(12, (64, 64))
    whole, d = scorer(models, box_threshold=1.0, missing="whole-image").score_one(image, PROMPT)
    assert not any(c["detected"] for c in d["components"])
    expected = [manual_cosine(models, image, c["text"]) for c in d["components"]]
    assert whole == pytest.approx(sum(expected) / 2, abs=1e-5)
    for missing, expected_score in (("zero", 0.0), ("skip", None)):
        s = scorer(models, missing=missing)
        s.detect = lambda image, word: None  # nothing found, without running the detector again
        assert s.score_one(image, PROMPT)[0] == expected_score


def test_scb_inputs_are_checked():
    from detailpp.bench import BenchError
    from detailpp.bench.metrics import make_metric
    from detailpp.bench.scb import ScbSettings, detector_text

    assert detector_text("Dog") == "dog."
    with pytest.raises(BenchError, match="does not follow the SCB template"):
        make_metric("scb").check_prompts(["a red car and a blue bench"])
    with pytest.raises(BenchError, match="Unknown --missing policy"):
        ScbSettings(missing="ignore")
    with pytest.raises(BenchError, match="between 0 and 1"):
        ScbSettings(box_threshold=2.0)
    with pytest.raises(BenchError, match="Unknown metric"):
        make_metric("fid")


def test_image_reward_missing_package_says_how_to_install(monkeypatch):
    from detailpp.bench import BenchError
    from detailpp.bench.metrics import make_metric

    monkeypatch.setitem(sys.modules, "ImageReward", None)  # import fails as if not installed
    metric = make_metric("image-reward")
    with pytest.raises(BenchError, match="pip install image-reward"):
        metric.load()


def test_image_reward_through_the_package(monkeypatch):
    from detailpp.bench import BenchError
    from detailpp.bench.image_reward import ImageRewardScorer

    calls = []

    class FakeModel:
        def score(self, prompt, image):
            calls.append((prompt, image.mode, image.size))
            return 0.25

    def load(name, device="cpu", download_root=None):
        if name != "ImageReward-v1.0":
            raise RuntimeError(f"Model {name} not found")
        return FakeModel()

    monkeypatch.setitem(sys.modules, "ImageReward", types.SimpleNamespace(load=load))
    s = ImageRewardScorer.load()
    assert s.score([random_image(1).convert("L")], ["a dog"]) == [(0.25, {})]
    assert calls == [("a dog", "RGB", (64, 48))]
    with pytest.raises(BenchError, match="Cannot load the ImageReward model 'nope'"):
        ImageRewardScorer.load("nope")
