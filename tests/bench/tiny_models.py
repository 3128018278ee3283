"""Tiny random scoring models built from configs (BLIP VQA, CLIP, Grounding DINO), for the bench tests.

The ``test_bench_*`` files import the builders from here (``tests.bench.tiny_models``). No weights are downloaded:
each model is random, saved with ``save_pretrained`` into a temporary folder and loaded back through detailpp's own
loading code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Words the tiny BERT vocabulary knows, at ids 1000 + k; "yes"/"no" sit at the real checkpoint's ids.
WORDS = (
    "a",
    "red",
    "green",
    "blue",
    "car",
    "dog",
    "bench",
    "bowl",
    "and",
    "the",
    "left",
    "top",
    "on",
    "of",
    "?",
    "cat",
    "lego",
    "style",
    "in",
    "forest",
    "sketch",
    "robot",
    "city",
    ".",
    "watercolor",
    "space",
)


def word_id(word: str) -> int:
    return 1000 + WORDS.index(word)


def write_bert_vocab(folder: Path) -> Path:
    """A 30522-token BERT-uncased-shaped vocabulary: special tokens, yes/no and the test words at fixed ids."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(104, 30522)]
    vocab[2053], vocab[2748] = "no", "yes"
    for k, w in enumerate(WORDS):
        vocab[1000 + k] = w
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return folder


def bert_tokenizer(folder: Path):
    from transformers import BertTokenizer

    return BertTokenizer.from_pretrained(str(write_bert_vocab(folder)))


def make_tiny_blip(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BlipConfig, BlipForQuestionAnswering

    torch.manual_seed(seed)
    # large random weights (initializer_range 0.5) so that answers differ visibly between questions and images
    config = BlipConfig(
        text_config=dict(
            vocab_size=30524,
            hidden_size=32,
            encoder_hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            initializer_range=0.5,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=384,
            patch_size=16,
            initializer_range=0.5,
        ),
        initializer_range=0.5,
    )
    model = BlipForQuestionAnswering(config).eval()
    model.save_pretrained(str(folder))
    bert_tokenizer(folder).save_pretrained(str(folder))
    return folder


def make_tiny_clip(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from detailpp.resources import load_clip_tokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=16,
            intermediate_size=20,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=20,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=8,
    )
    CLIPModel(config).eval().save_pretrained(str(folder))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=load_clip_tokenizer(),
    )
    processor.save_pretrained(str(folder))
    return folder


def make_tiny_grounding_dino(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    torch.manual_seed(seed)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=64,
            patch_size=4,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=2,
            out_indices=[2, 3, 4],
        ),
        text_config=BertConfig(
            vocab_size=30522,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=20,
            max_position_embeddings=64,
        ),
        num_queries=10,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        d_model=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_feature_levels=3,
        max_text_len=32,
    )
    GroundingDinoForObjectDetection(config).eval().save_pretrained(str(folder))
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}),
        tokenizer=bert_tokenizer(folder / "_tok"),
    )
    processor.save_pretrained(str(folder))
    return folder


def random_image(seed: int, size: tuple[int, int] = (64, 48)):
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))
