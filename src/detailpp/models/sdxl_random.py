"""SDXL base 1.0 at full size with *random* weights, built from its public configs: a speed and memory stand-in.

Same modules, shapes, FLOPs and memory as ``stabilityai/stable-diffusion-xl-base-1.0`` (UNet 2,567,463,684
parameters, both CLIP text encoders, the VAE with ``force_upcast``); nothing is downloaded. Its images are noise:
use it to time and size a run (``--model sdxl-random``, ``benchmarks/gpu_benchmark.py``,
``benchmarks/multi_gpu_scaling.py``), never to judge quality. What depends on the weights' values does not transfer
either: with random weights the nursing loss never falls under its early-stop thresholds, so nursing runs every
capped iteration (a worst case).

The weights are initialised directly on the target device (fast on a GPU; on a CPU, 3.5 B parameters take a while)
from a fixed seed, so every process of a multi-GPU run builds the same model; the global RNG state is left as it was.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 (2,567,463,684 parameters).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

#: vae/config.json (83,653,863 parameters; fp16 decoding overflows, hence force_upcast).
SDXL_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

#: text_encoder/config.json: CLIP ViT-L/14's text tower (123,060,480 parameters).
SDXL_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

#: text_encoder_2/config.json: OpenCLIP ViT-bigG/14's text tower with projection (694,659,840 parameters).
SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 1280,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def sdxl_components(device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """The seven SDXL base components at full size with random weights, initialised on ``device`` (PyTorch's default
    init keeps fp16 activations finite), cast to ``dtype``. ``device="meta"`` builds the shapes only (no memory)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from detailpp.models.tiny import SDXL_SCHEDULER_CONFIG
    from detailpp.resources import load_clip_tokenizer

    device = torch.device(device)
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        with torch.device(device):
            unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
            vae = AutoencoderKL(**SDXL_VAE_CONFIG)
            text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG))
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for m in modules.values():
        m.to(device=device, dtype=dtype).eval()
    return {
        **modules,
        "tokenizer": load_clip_tokenizer(),
        "tokenizer_2": load_clip_tokenizer(second=True),
        "scheduler": EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
    }


def build_sdxl_random_pipeline(
    pipeline_class: type | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A Detail++ pipeline (or ``pipeline_class``) on full-size SDXL with random weights (see the module's docstring).

    No invisible watermark (it would only add CPU time to every image); ``force_zeros_for_empty_prompt`` as in SDXL
    base's ``model_index.json``.
    """
    if pipeline_class is None:
        from detailpp.pipelines.sdxl import DetailPlusPlusPipeline as pipeline_class
    components = sdxl_components(device, dtype, seed)
    return pipeline_class(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)


def random_ip_adapter_state(
    unet: torch.nn.Module, image_embed_dim: int, seed: int = 3, scale: float = 0.3
) -> dict[str, torch.Tensor]:
    """A random IP-Adapter for ``unet`` in the original checkpoint layout, as ``pipe.load_ip_adapter`` reads it:
    ``image_proj.*`` (4 image tokens from an image embedding of ``image_embed_dim``) and
    ``ip_adapter.{1,3,5,..}.to_{k,v}_ip.weight``, one pair per cross-attention layer in processor order. Weights are
    ``scale`` x N(0, 1), the projection's bias and the norm's offsets ``scale / 3`` x N(0, 1) (float32, CPU)."""
    g = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim
    state = {
        "image_proj.proj.weight": torch.randn(4 * dim, image_embed_dim, generator=g) * scale,
        "image_proj.proj.bias": torch.randn(4 * dim, generator=g) * (scale / 3),
        "image_proj.norm.weight": 1 + (scale / 3) * torch.randn(dim, generator=g),
        "image_proj.norm.bias": (scale / 3) * torch.randn(dim, generator=g),
    }
    modules = dict(unet.named_modules())
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = modules[name.removesuffix(".processor")].to_k.out_features
        for kind in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{key_id}.{kind}.weight"] = torch.randn(hidden, dim, generator=g) * scale
        key_id += 2
    return state
