"""The scorers' loading paths: clear errors for a missing folder, a folder without weights, a file, another
vocabulary; Hub ids and paths told apart (the tiny models: tests/bench/tiny_models.py)."""

from __future__ import annotations

import pytest

from tests.bench.tiny_models import make_tiny_blip


# --- loading paths ---------------------------------------------------------------------------------------------------
def test_missing_local_folder_is_a_clear_error(tmp_path):
    from detailpp.bench import BenchError
    from detailpp.bench.blip_vqa import load_blip_vqa

    with pytest.raises(BenchError, match="does not exist.*--blip-model"):
        load_blip_vqa(str(tmp_path / "nowhere" / "blip"))


def test_folder_without_weights_is_a_clear_error(tmp_path):
    from detailpp.bench import BenchError
    from detailpp.bench.scb import load_clip

    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match="Cannot load the CLIP model from the local folder .*--clip-model"):
        load_clip(str(tmp_path / "empty"))


def test_file_instead_of_folder(tmp_path):
    from detailpp.bench import BenchError
    from detailpp.bench.scb import load_detector

    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(BenchError, match="is a file"):
        load_detector(str(tmp_path / "model.bin"))


def test_checkpoint_with_another_vocabulary_is_refused(tmp_path):
    from transformers import BertTokenizer

    from detailpp.bench import BenchError
    from detailpp.bench.blip_vqa import load_blip_vqa

    make_tiny_blip(tmp_path / "blip")
    BertTokenizer(vocab={"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "yes": 4, "no": 5}).save_pretrained(
        str(tmp_path / "blip")
    )
    with pytest.raises(BenchError, match="does not use BLIP's vocabulary"):
        load_blip_vqa(str(tmp_path / "blip"))


def test_hub_ids_and_paths_are_told_apart():
    from detailpp.bench.models import looks_like_path

    assert not looks_like_path("Salesforce/blip-vqa-capfilt-large")
    assert not looks_like_path("openai/clip-vit-base-patch32")
    assert looks_like_path("./models/blip") and looks_like_path("/abs/blip") and looks_like_path("a/b/c")
