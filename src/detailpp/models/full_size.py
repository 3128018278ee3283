"""Full-size models with *random* weights, built from their public configs: speed and memory stand-ins.

Same modules, shapes, FLOPs and memory as the real models; nothing is downloaded. Their images are noise: use them to
time and size a run (``--model sdxl-random``, ``sd15-random``, ``flux-random``, ``sd35-random``,
``benchmarks/gpu_benchmark.py``, ``benchmarks/multi_gpu_scaling.py``), never to judge quality. What depends on the
weights' values does not transfer either: with random weights the nursing loss never falls under its early-stop
thresholds, so nursing runs every capped iteration (a worst case).

* SDXL base 1.0 (``stabilityai/stable-diffusion-xl-base-1.0``): UNet 2,567,463,684 parameters, both CLIP text
  encoders, the VAE with ``force_upcast``.
* SD 1.5 (``stable-diffusion-v1-5/stable-diffusion-v1-5``): UNet 859,520,964 parameters, CLIP ViT-L/14's text tower,
  the VAE; no safety checker.
* FLUX.1-dev (``black-forest-labs/FLUX.1-dev``): the 11.9 B transformer (19 double-stream + 38 single-stream blocks),
  CLIP-L, T5-XXL's encoder (4.76 B), the 16-channel VAE.
* SD3.5-large (``stabilityai/stable-diffusion-3.5-large``): the 8.05 B transformer (38 joint blocks), CLIP-L,
  OpenCLIP-bigG, T5-XXL's encoder, the 16-channel VAE.

Every config below is the model repository's ``<component>/config.json`` (the fields that shape the modules; the
values agree with diffusers' conversion scripts ``scripts/convert_flux_to_diffusers.py`` and
``scripts/convert_sd3_to_diffusers.py``), and the tests check the parameter counts. FLUX.1 and SD3.5 take their T5
prompt through :func:`~detailpp.models.builders.tiny_t5_tokenizer` (real models bring their own): its ids are fewer
than a thousand, all valid for T5-XXL's 32,128, and a prompt's token count (up to the 512- or 256-token window the
pipelines pad to) is what timing depends on.

The weights are initialised directly on the target device (fast on a GPU; on a CPU, billions of parameters take a
while) from a fixed seed, so every process of a multi-GPU run builds the same model; the global RNG state is left as
it was (:func:`~detailpp.models.builders.seeded_modules`). ``device="meta"`` builds the shapes only.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from detailpp.models.builders import (
    FLUX_SCHEDULER_CONFIG,
    FLUX_VAE_FACTORS,
    SD3_SCHEDULER_CONFIG,
    SD3_VAE_FACTORS,
    SD15_SCHEDULER_CONFIG,
    SDXL_SCHEDULER_CONFIG,
    seeded_modules,
    tiny_t5_tokenizer,
)
from detailpp.resources import load_clip_tokenizer

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


def _vae_config(scaling_factor: float, shift_factor: float | None = None, **fields: Any) -> dict[str, Any]:
    """vae/config.json of the SD family (83,653,863 parameters with 4 latent channels): four levels of 128-512
    channels, factor 8; ``fields`` set the rest (``latent_channels``, ``force_upcast``, the quant convs)."""
    return {
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        **fields,
    }


#: SDXL's vae/config.json (fp16 decoding overflows, hence force_upcast).
SDXL_VAE_CONFIG = _vae_config(0.13025, force_upcast=True, sample_size=1024)
#: SD 1.5's vae/config.json.
SD15_VAE_CONFIG = _vae_config(0.18215, sample_size=512)
#: FLUX.1-dev's vae/config.json: 16 latent channels, no quant convs (84 M parameters).
FLUX_VAE_CONFIG = _vae_config(
    *FLUX_VAE_FACTORS,
    latent_channels=16,
    force_upcast=True,
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
#: SD3.5-large's (and SD3-medium's) vae/config.json: FLUX's architecture with its own latent factors.
SD3_VAE_CONFIG = _vae_config(
    *SD3_VAE_FACTORS,
    latent_channels=16,
    force_upcast=True,
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

#: CLIP ViT-L/14's text tower (123,060,480 parameters): SDXL's and SD 1.5's text_encoder/config.json, FLUX.1's
#: text_encoder (``CLIPTextModel``, its pooled output the transformer's pooled input) and SD3's text_encoder (with the
#: projection). The real configs' start/end/pad ids (0, 2, 1) make transformers find the end token by argmax.
CLIP_L_TEXT_CONFIG: dict[str, Any] = {
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

#: OpenCLIP ViT-bigG/14's text tower with projection (694,659,840 parameters): SDXL's and SD3's text_encoder_2.
CLIP_BIGG_TEXT_CONFIG: dict[str, Any] = {
    **CLIP_L_TEXT_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

#: google/t5-v1_1-xxl's encoder: FLUX.1's text_encoder_2/config.json and SD3's text_encoder_3 (4,762,310,656
#: parameters in ``T5EncoderModel``).
T5_XXL_CONFIG: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-06,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

#: FLUX.1-dev's transformer/config.json: 19 double-stream and 38 single-stream blocks, 24 heads of 128 (3072 wide),
#: packed 2x2 patches of 16 latent channels (64 in), RoPE over (index, row, column) axes of 16, 56, 56 dimensions.
FLUX_TRANSFORMER_CONFIG: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

#: SD3.5-large's transformer/config.json: 38 joint blocks of 38 heads of 64 (2432 wide), patch 2, RMS q/k norms, no
#: dual-attention blocks (SD3.5-medium has them in blocks 0-12).
SD35_LARGE_TRANSFORMER_CONFIG: dict[str, Any] = {
    "attention_head_dim": 64,
    "caption_projection_dim": 2432,
    "dual_attention_layers": [],
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 38,
    "num_layers": 38,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}


def sdxl_components(device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """The seven SDXL base components at full size with random weights, initialised on ``device`` (PyTorch's default
    init keeps fp16 activations finite), cast to ``dtype``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    modules = seeded_modules(
        {
            "unet": lambda: UNet2DConditionModel(**SDXL_UNET_CONFIG),
            "vae": lambda: AutoencoderKL(**SDXL_VAE_CONFIG),
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG)),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT_CONFIG)),
        },
        seed,
        device,
        dtype,
    )
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


def sd15_components(device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """The SD 1.5 components at full size with random weights, initialised on ``device``, cast to ``dtype``; no
    safety checker."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    modules = seeded_modules(
        {
            "unet": lambda: UNet2DConditionModel(**SD15_UNET_CONFIG),
            "vae": lambda: AutoencoderKL(**SD15_VAE_CONFIG),
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG)),
        },
        seed,
        device,
        dtype,
    )
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


def flux_components(device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """The seven FLUX.1-dev components at full size with random weights, initialised on ``device``, cast to
    ``dtype`` (FLUX.1 is trained in bfloat16)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    modules = seeded_modules(
        {
            "transformer": lambda: FluxTransformer2DModel(**FLUX_TRANSFORMER_CONFIG),
            "vae": lambda: AutoencoderKL(**FLUX_VAE_CONFIG),
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG)),
            "text_encoder_2": lambda: T5EncoderModel(T5Config(**T5_XXL_CONFIG)),
        },
        seed,
        device,
        dtype,
    )
    return {
        **modules,
        "tokenizer": load_clip_tokenizer(),
        "tokenizer_2": tiny_t5_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
    }


def build_flux_random_pipeline(
    pipeline_class: type | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A Detail++ FLUX pipeline (or ``pipeline_class``, e.g. ``FluxPipeline``) on full-size FLUX.1-dev with random
    weights (see the module's docstring)."""
    if pipeline_class is None:
        from detailpp.pipelines.flux import DetailPlusPlusFluxPipeline as pipeline_class
    pipe = pipeline_class(**flux_components(device, dtype, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd35_components(device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """The nine SD3.5-large components at full size with random weights, initialised on ``device``, cast to
    ``dtype``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    modules = seeded_modules(
        {
            "transformer": lambda: SD3Transformer2DModel(**SD35_LARGE_TRANSFORMER_CONFIG),
            "vae": lambda: AutoencoderKL(**SD3_VAE_CONFIG),
            "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_TEXT_CONFIG)),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT_CONFIG)),
            "text_encoder_3": lambda: T5EncoderModel(T5Config(**T5_XXL_CONFIG)),
        },
        seed,
        device,
        dtype,
    )
    return {
        **modules,
        "tokenizer": load_clip_tokenizer(),
        "tokenizer_2": load_clip_tokenizer(second=True),
        "tokenizer_3": tiny_t5_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
    }


def build_sd35_random_pipeline(
    pipeline_class: type | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A Detail++ SD3 pipeline (or ``pipeline_class``, e.g. ``StableDiffusion3Pipeline``) on full-size SD3.5-large
    with random weights (see the module's docstring)."""
    if pipeline_class is None:
        from detailpp.pipelines.sd3 import DetailPlusPlusSD3Pipeline as pipeline_class
    pipe = pipeline_class(**sd35_components(device, dtype, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
