"""The tiny CLIP pair (:class:`~transformers.CLIPModel`) and its text tower as the toy pipeline's two text encoders.

The text side has the toy model's text encoder sizes (:class:`~research.toy.model.ToyModelConfig`: hidden 64, 3
layers, 2 heads, pooled projection 64; :data:`TINY_SIZES` follows :data:`~research.toy.model.TINY`), SDXL's CLIP
vocabulary and 77 positions, and CLIP's causal attention. One pretrained text tower serves both of the toy
pipeline's encoders: ``text_encoder`` (:class:`~transformers.CLIPTextModel`, its transformer) and
``text_encoder_2`` (:class:`~transformers.CLIPTextModelWithProjection`, the same transformer and the contrastively
trained pooled projection), so the UNet's cross-attention width stays ``2 * text_hidden`` and its pooled input
``projection_dim``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from research.toy import model as toy_model


@dataclass(frozen=True)
class ClipSizes:
    """Sizes of the CLIP pair.

    Attributes:
        text_hidden, text_layers, text_heads: the text transformer (the toy pipeline's text encoder sizes).
        projection_dim: the shared embedding size of both towers' pooled projections.
        image_size: pixel size of the rendered scenes the vision tower sees.
        patch_size: ViT patch size.
        vision_hidden, vision_layers, vision_heads: the vision transformer.
        vocab_size: CLIP's vocabulary (SDXL's tokenizer).
    """

    text_hidden: int = toy_model.DEFAULT.text_hidden
    text_layers: int = toy_model.DEFAULT.text_layers
    text_heads: int = toy_model.DEFAULT.text_heads
    projection_dim: int = toy_model.DEFAULT.projection_dim
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 2
    vocab_size: int = toy_model.DEFAULT.vocab_size

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_SIZES = ClipSizes()
#: Test sizes: the text side of :data:`research.toy.model.TINY`, 16 x 16 images.
TINY_SIZES = replace(
    DEFAULT_SIZES,
    text_hidden=toy_model.TINY.text_hidden,
    text_layers=toy_model.TINY.text_layers,
    text_heads=toy_model.TINY.text_heads,
    projection_dim=toy_model.TINY.projection_dim,
    image_size=16,
    patch_size=8,
    vision_hidden=8,
    vision_layers=1,
    vision_heads=2,
)


def build_clip(sizes: ClipSizes = DEFAULT_SIZES):
    """A freshly initialised :class:`~transformers.CLIPModel` of ``sizes`` (text: CLIP's quick-GELU, 77 positions,
    the packaged tokenizer's special ids)."""
    from transformers import CLIPConfig, CLIPModel

    text = toy_model.clip_text_kwargs(
        sizes.vocab_size, sizes.text_hidden, sizes.text_layers, sizes.text_heads, sizes.projection_dim
    )
    vision = dict(
        hidden_size=sizes.vision_hidden,
        intermediate_size=4 * sizes.vision_hidden,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        num_channels=3,
        hidden_act="quick_gelu",
        projection_dim=sizes.projection_dim,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=sizes.projection_dim))


def text_encoders(clip) -> tuple:
    """``(text_encoder, text_encoder_2)``: a :class:`~transformers.CLIPTextModel` and a
    :class:`~transformers.CLIPTextModelWithProjection` holding ``clip``'s text tower (copies of its weights)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = clip.config.text_config
    te1, te2 = CLIPTextModel(cfg), CLIPTextModelWithProjection(cfg)
    te1.load_state_dict(clip.text_model.state_dict())  # transformers 5: CLIPModel.text_model is a CLIPTextModel
    te2.text_model.load_state_dict(clip.text_model.state_dict())
    te2.text_projection.load_state_dict(clip.text_projection.state_dict())
    return te1.eval(), te2.eval()


def save_encoders(clip, folder: str | Path) -> None:
    """Save the pair to ``folder/clip`` and its text tower as ``folder/text_encoder`` and ``folder/text_encoder_2``
    (safetensors, float32), the subfolders the toy pipeline (and ``--text-encoders`` of the toy trainer) load."""
    folder = Path(folder)
    clip.save_pretrained(folder / "clip", safe_serialization=True)
    te1, te2 = text_encoders(clip)
    te1.save_pretrained(folder / "text_encoder", safe_serialization=True)
    te2.save_pretrained(folder / "text_encoder_2", safe_serialization=True)


def load_text_encoders(folder: str | Path) -> tuple:
    """``(text_encoder, text_encoder_2)`` saved by :func:`save_encoders` (float32, eval mode)."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    te1 = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32)
    te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=torch.float32)
    return te1.eval(), te2.eval()
