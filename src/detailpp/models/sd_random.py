"""Stable Diffusion 1.5 at full size with *random* weights, built from its public configs: a speed and memory stand-in.

Same modules, shapes and FLOPs as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (UNet 859,520,964 parameters, CLIP
ViT-L/14's text tower, the VAE); nothing is downloaded, and there is no safety checker. Its images are noise: use it to
time and size a run (``--model sd15-random``), never to judge quality. As with :mod:`detailpp.models.sdxl_random`,
random weights keep the nursing loss above its early-stop thresholds, so nursing runs every capped iteration.

The weights are initialised directly on the target device from a fixed seed; the global RNG state is left as it was.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from detailpp.models.sdxl_random import SDXL_TEXT_ENCODER_CONFIG, _rng_devices

logger = logging.getLogger(__name__)

#: unet/config.json of stable-diffusion-v1-5 (859,520,964 parameters).
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

#: vae/config.json (83,653,863 parameters).
SD15_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

#: text_encoder/config.json: CLIP ViT-L/14's text tower (123,060,480 parameters), the same as SDXL's first encoder.
SD15_TEXT_ENCODER_CONFIG: dict[str, Any] = SDXL_TEXT_ENCODER_CONFIG


def sd15_components(device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """The SD 1.5 components at full size with random weights, initialised on ``device``, cast to ``dtype``; no
    safety checker. ``device="meta"`` builds the shapes only (no memory)."""
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from diffusers.models import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from detailpp.models.tiny_sd import SD15_SCHEDULER_CONFIG
    from detailpp.resources import load_clip_tokenizer

    device = torch.device(device)
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        with torch.device(device):
            unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
            vae = AutoencoderKL(**SD15_VAE_CONFIG)
            text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    for m in modules.values():
        m.to(device=device, dtype=dtype).eval()
    return {
        **modules,
        "tokenizer": load_clip_tokenizer(),
        "scheduler": PNDMScheduler(**SD15_SCHEDULER_CONFIG),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def build_sd15_random_pipeline(
    pipeline_class: type | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A Detail++ SD pipeline (or ``pipeline_class``) on full-size SD 1.5 with random weights (see the module's
    docstring)."""
    if pipeline_class is None:
        from detailpp.pipelines.sd import DetailPlusPlusSDPipeline as pipeline_class
    return pipeline_class(**sd15_components(device, dtype, seed), requires_safety_checker=False)
