"""The toy model: an SDXL-architecture pipeline small enough to train in minutes on one GPU.

Components, with SDXL's names and wiring (``StableDiffusionXLPipeline.from_pretrained`` loads the folder):

* ``vae``: :class:`~diffusers.AutoencoderKL`, 128 x 128 RGB to 4 x 64 x 64 latents (scale factor 2).
* ``text_encoder``: :class:`~transformers.CLIPTextModel` and ``text_encoder_2``:
  :class:`~transformers.CLIPTextModelWithProjection`, both on SDXL's CLIP vocabulary (49,408 tokens, the packaged
  tokenizer), with a small hidden size; the UNet sees the concatenation of their penultimate hidden states.
* ``unet``: :class:`~diffusers.UNet2DConditionModel` with SDXL's block layout (``down_blocks.0`` without attention,
  cross-attention in ``down_blocks.1-2``, ``mid_block``, ``up_blocks.0-1``) and ``text_time`` added conditioning. At
  64 x 64 latents its lowest-resolution attention layers (``down_blocks.2``, ``mid_block``, ``up_blocks.0``) have
  16 x 16 tokens, the mid-level ones 32 x 32.
* ``scheduler``: SDXL's :class:`~diffusers.EulerDiscreteScheduler` configuration (scaled-linear betas, epsilon).

:class:`ToyModelConfig` holds every size; :data:`TINY` is a few-kilobyte variant for tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class ToyModelConfig:
    """Sizes of the toy model's components.

    Attributes:
        image_size: pixel size of the (square) images.
        vae_channels: ``block_out_channels`` of the VAE; its scale factor is ``2 ** (len - 1)``.
        latent_channels: channels of the latent (SDXL: 4).
        text_hidden: hidden size of each text encoder (the token embedding is 49,408 x this).
        text_layers: transformer layers of each text encoder (the UNet reads the penultimate layer).
        text_heads: attention heads of the text encoders.
        projection_dim: ``text_encoder_2``'s pooled projection size.
        unet_channels: ``block_out_channels`` of the UNet's three levels.
        unet_layers: resnets per down block (up blocks have one more).
        unet_head_dim: channels per attention head in the UNet.
        transformer_layers: transformer blocks per attention layer, per level (level 0 has none).
        time_embed_dim: ``addition_time_embed_dim`` of each of the 6 SDXL size/crop conditions.
        vocab_size: CLIP's vocabulary (SDXL's tokenizer).
    """

    image_size: int = 128
    vae_channels: tuple[int, ...] = (32, 64)
    latent_channels: int = 4
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 2
    projection_dim: int = 64
    unet_channels: tuple[int, int, int] = (32, 64, 128)
    unet_layers: int = 1
    unet_head_dim: int = 32
    transformer_layers: tuple[int, int, int] = (1, 1, 2)
    time_embed_dim: int = 16
    vocab_size: int = 49408

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale_factor

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_pipeline(cls, folder) -> ToyModelConfig:
        """The sizes of a saved toy pipeline, read off its components' configs."""
        import json
        from pathlib import Path

        def read(name: str) -> dict:
            return json.loads((Path(folder) / name / "config.json").read_text(encoding="utf-8"))

        vae, te1, te2, unet = read("vae"), read("text_encoder"), read("text_encoder_2"), read("unet")
        heads = unet["attention_head_dim"]
        heads = heads if isinstance(heads, list) else [heads] * 3
        layers = unet["transformer_layers_per_block"]
        return cls(
            image_size=vae["sample_size"],
            vae_channels=tuple(vae["block_out_channels"]),
            latent_channels=vae["latent_channels"],
            text_hidden=te1["hidden_size"],
            text_layers=te1["num_hidden_layers"],
            text_heads=te1["num_attention_heads"],
            projection_dim=te2["projection_dim"],
            unet_channels=tuple(unet["block_out_channels"]),
            unet_layers=unet["layers_per_block"],
            unet_head_dim=unet["block_out_channels"][-1] // heads[-1],
            transformer_layers=tuple(layers) if isinstance(layers, list) else (layers,) * 3,
            time_embed_dim=unet["addition_time_embed_dim"],
            vocab_size=te1["vocab_size"],
        )

    @classmethod
    def from_dict(cls, d: dict) -> ToyModelConfig:
        d = dict(d)
        for k in ("vae_channels", "unet_channels", "transformer_layers"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


DEFAULT = ToyModelConfig()
#: A tiny variant for CPU tests: 32 x 32 images, 16 x 16 latents; the vocabulary stays SDXL's (the tokenizer's ids
#: go up to 49,407), so the hidden size is what shrinks.
TINY = replace(
    DEFAULT,
    image_size=32,
    vae_channels=(8, 8),
    text_hidden=8,
    text_layers=2,
    text_heads=2,
    projection_dim=8,
    unet_channels=(8, 16, 16),
    unet_head_dim=8,
    transformer_layers=(1, 1, 1),
    time_embed_dim=4,
)


def build_vae(cfg: ToyModelConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(8, min(cfg.vae_channels)),
        sample_size=cfg.image_size,
        scaling_factor=1.0,
        force_upcast=False,
        mid_block_add_attention=False,
    )


def clip_text_kwargs(vocab_size: int, hidden: int, layers: int, heads: int, projection_dim: int) -> dict:
    """A toy CLIP text tower's config fields: CLIP's quick-GELU, 77 positions, the packaged tokenizer's special ids
    (shared by the toy pipeline's text encoders and the contrastive pretraining of :mod:`research.toy.clip`)."""
    from detailpp.models.builders import clip_text_kwargs as shared

    return shared(
        hidden,
        layers=layers,
        heads=heads,
        intermediate_size=4 * hidden,
        hidden_act="quick_gelu",
        projection_dim=projection_dim,
        vocab_size=vocab_size,
        pad_token_id=1,
    )


def build_text_encoders(cfg: ToyModelConfig):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = clip_text_kwargs(cfg.vocab_size, cfg.text_hidden, cfg.text_layers, cfg.text_heads, cfg.projection_dim)
    te1 = CLIPTextModel(CLIPTextConfig(**common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**common, "hidden_act": "gelu"}))
    return te1, te2


def build_unet(cfg: ToyModelConfig):
    from diffusers import UNet2DConditionModel

    heads = tuple(max(1, c // cfg.unet_head_dim) for c in cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers,
        transformer_layers_per_block=cfg.transformer_layers,
        attention_head_dim=heads,  # diffusers' legacy name: the number of heads (as in SDXL's config)
        cross_attention_dim=2 * cfg.text_hidden,
        norm_num_groups=min(16, min(cfg.unet_channels)),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=cfg.time_embed_dim,
        projection_class_embeddings_input_dim=cfg.projection_dim + 6 * cfg.time_embed_dim,
    )


def build_scheduler():
    from diffusers import EulerDiscreteScheduler

    from detailpp.models.builders import SDXL_SCHEDULER_CONFIG

    return EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)


def build_components(cfg: ToyModelConfig = DEFAULT) -> dict:
    """Freshly initialised components, keyed as :class:`~diffusers.StableDiffusionXLPipeline` expects."""
    from detailpp.resources import load_clip_tokenizer

    te1, te2 = build_text_encoders(cfg)
    return {
        "vae": build_vae(cfg),
        "text_encoder": te1,
        "text_encoder_2": te2,
        "tokenizer": load_clip_tokenizer(),
        "tokenizer_2": load_clip_tokenizer(second=True),
        "unet": build_unet(cfg),
        "scheduler": build_scheduler(),
    }


def build_pipeline(components: dict):
    """A :class:`~diffusers.StableDiffusionXLPipeline` of toy components (no watermarker, zeros for empty prompts)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
