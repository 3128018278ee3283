"""Tiny random Stable Diffusion 1.5 and 2.1: their block names and schedulers, random weights, built offline at once.

Like :mod:`detailpp.models.tiny` (SDXL), these exist to run the SD code paths (tests, ``--model tiny-random-sd15`` and
``tiny-random-sd21``) where no weights can be had; their images are noise.

* SD 1.5: ``CrossAttnDownBlock2D`` x3 + ``DownBlock2D``, ``UpBlock2D`` + ``CrossAttnUpBlock2D`` x3, a convolutional
  transformer projection, one CLIP text encoder (ViT-L/14's ``quick_gelu``), PNDM as in SD 1.5's
  ``scheduler_config.json``.
* SD 2.1: the same blocks with a linear projection, one head count per block, upcast attention, a wider text encoder
  (OpenCLIP-H's ``gelu``; its tokenizer pads with ``"!"``) and DDIM with v-prediction as in SD 2.1's scheduler.

Both have no safety checker. At 256x256 (latent 32x32) the mid block sees 4x4 tokens and the Detail++ layers
(``down_blocks.2``, ``up_blocks.1``) 8x8, as 512x512 gives SD 1.5 8x8 and 16x16.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from detailpp.models.tiny import tiny_vae
from detailpp.resources import load_clip_tokenizer

#: SD 1.5's scheduler_config.json (stable-diffusion-v1-5): PNDM (PLMS) on the scaled-linear schedule.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

#: SD 2.1's scheduler_config.json (stable-diffusion-2-1, 768 px): DDIM, v-prediction.
SD21_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
    "trained_betas": None,
}

#: SD 1.x/2.x's VAE latent scale.
SD_SCALING_FACTOR = 0.18215

#: (text width, activation) of the tiny text encoders: CLIP ViT-L/14 (768 in SD 1.5) and OpenCLIP-H (1024 in SD 2.1)
#: scaled down alike.
_TEXT = {"sd15": (32, "quick_gelu"), "sd21": (48, "gelu")}
VARIANTS = tuple(_TEXT)


def _text_encoder(width: int, act: str) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act=act,
    )
    return CLIPTextModel(config)


def _unet(variant: str, cross_attention_dim: int) -> UNet2DConditionModel:
    sd21 = variant == "sd21"
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        # diffusers reads SD's attention_head_dim as the number of heads (one number in SD 1.5, one per block in 2.1)
        attention_head_dim=(2, 4, 4, 4) if sd21 else 2,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=sd21,
        upcast_attention=sd21,
        norm_num_groups=16,
    )


def tiny_sd_components(variant: str = "sd15", seed: int = 0) -> dict[str, Any]:
    """The components of a ``StableDiffusionPipeline`` at toy size (``variant``: ``"sd15"`` or ``"sd21"``), no
    safety checker, on the packaged CLIP tokenizer (SD 2.1's pads with ``"!"``)."""
    if variant not in _TEXT:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    width, act = _TEXT[variant]
    torch.manual_seed(seed)
    text_encoder = _text_encoder(width, act)
    unet = _unet(variant, width)
    vae = tiny_vae(SD_SCALING_FACTOR)
    scheduler = DDIMScheduler(**SD21_SCHEDULER_CONFIG) if variant == "sd21" else PNDMScheduler(**SD15_SCHEDULER_CONFIG)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": load_clip_tokenizer(second=variant == "sd21"),
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def build_tiny_sd_pipeline(
    variant: str = "sd15", seed: int = 0, pipeline_class: type | None = None, dtype: torch.dtype = torch.float32
):
    """A tiny random :class:`~detailpp.DetailPlusPlusSDPipeline` (or ``pipeline_class``, e.g.
    ``StableDiffusionPipeline``) on the CPU. Default image size 256x256."""
    if pipeline_class is None:
        from detailpp.pipelines.sd import DetailPlusPlusSDPipeline as pipeline_class
    pipe = pipeline_class(**tiny_sd_components(variant, seed), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
