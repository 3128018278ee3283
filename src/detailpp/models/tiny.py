"""Tiny random models with the real block and processor names, built offline in code in under a second.

Their images are noise. They exist to run every code path of the package (tests, ``--model tiny-random``,
``tiny-random-sd15``, ``tiny-random-sd21``, ``tiny-random-flux``, ``tiny-random-sd3``) where no weights can be had;
they prove plumbing and equivalences, never image quality.

* SDXL (:func:`tiny_components`): ``down_blocks.0-2``, ``mid_block``, ``up_blocks.0-2`` as in SDXL, two CLIP text
  encoders. Its weights are pinned by the golden parity test (``tests/method/test_reference_parity.py``): the seed
  and the order of the random draws (text_encoder, text_encoder_2, unet, vae) must not change.
* SD 1.5 and 2.1 (:func:`tiny_sd_components`): ``CrossAttnDownBlock2D`` x3 + ``DownBlock2D``, ``UpBlock2D`` +
  ``CrossAttnUpBlock2D`` x3; SD 1.5 with a convolutional transformer projection, CLIP ViT-L/14's ``quick_gelu`` and
  PNDM; SD 2.1 with a linear projection, one head count per block, upcast attention, a wider OpenCLIP-H-like text
  encoder (its tokenizer pads with ``"!"``) and DDIM with v-prediction. No safety checker.
* FLUX.1 (:func:`tiny_flux_components`): a ``FluxTransformer2DModel`` with 2 double-stream
  (``transformer_blocks.*``) and 2 single-stream (``single_transformer_blocks.*``) blocks and a guidance embedding
  as FLUX.1-dev, a pooled CLIP text encoder, a T5 encoder, FLUX's VAE factors and scheduler (dynamic shifting).
* SD3 / SD3.5 (:func:`tiny_sd3_components`): an ``SD3Transformer2DModel`` with 3 joint blocks, patch 2, two CLIP
  text encoders with projections and a T5 encoder, SD3's VAE factors and scheduler; ``dual=True`` makes block 0 an
  SD3.5-medium dual-attention block (its image-only ``attn2``, RMS q/k norms).

At 256x256 (SDXL, SD) the lowest-resolution UNet attention layers see 8x8 tokens (SD's mid block 4x4); at 128x128
(FLUX, SD3) the transformers see 8x8 image tokens. FLUX and SD3 use :func:`~detailpp.models.builders.tiny_t5_tokenizer`
(a T5 tokenizer built in code: real models bring their own).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from detailpp.models.builders import (
    SD15_SCHEDULER_CONFIG,
    SD21_SCHEDULER_CONFIG,
    SD_VAE_FACTORS,
    SDXL_SCHEDULER_CONFIG,
    SDXL_VAE_FACTORS,
    clip_text_config,
    seeded_modules,
)
from detailpp.resources import load_clip_tokenizer

#: The tiny SD variants and their text encoders' (width, activation): CLIP ViT-L/14 (768 in SD 1.5) and OpenCLIP-H
#: (1024 in SD 2.1) scaled down alike.
_SD_TEXT = {"sd15": (32, "quick_gelu"), "sd21": (48, "gelu")}
VARIANTS = tuple(_SD_TEXT)


def tiny_vae(
    scaling_factor: float, shift_factor: float | None = None, latent_channels: int = 4, quant_convs: bool = True
) -> AutoencoderKL:
    """A tiny random VAE with the real VAE's four levels (factor 8) and its latent ``scaling_factor`` and
    ``shift_factor`` (:mod:`detailpp.models.builders`' ``*_VAE_FACTORS``), from the global random state. FLUX's and
    SD3's VAEs have no quant convs (``quant_convs=False``)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
    )


def _tiny_sdxl_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=16,
    )


def tiny_components(seed: int = 0) -> dict[str, Any]:
    """The seven SDXL components at toy size: ``down_blocks.0-2``, ``mid_block``, ``up_blocks.0-2`` as in SDXL
    (no attention in ``down_blocks.0``/``up_blocks.2``, two transformer layers at the lowest resolution), VAE
    factor 8, two CLIP text encoders (the second with a projection) on SDXL's 49,408-token vocabulary."""
    modules = seeded_modules(
        {
            "text_encoder": lambda: CLIPTextModel(clip_text_config(32)),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(clip_text_config(32, projection_dim=32)),
            "unet": _tiny_sdxl_unet,
            "vae": lambda: tiny_vae(*SDXL_VAE_FACTORS),
        },
        seed,
    )
    return {
        **modules,
        "tokenizer": load_clip_tokenizer(),
        "tokenizer_2": load_clip_tokenizer(second=True),
        "scheduler": EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
    }


def build_tiny_pipeline(seed: int = 0, pipeline_class=None, dtype: torch.dtype = torch.float32):
    """A tiny random Detail++ pipeline (or ``pipeline_class``, e.g. ``StableDiffusionXLPipeline``) on the CPU.

    Default image size 256x256 (latent 32x32; the lowest-resolution attention layers see 8x8 tokens).
    """
    if pipeline_class is None:
        from detailpp.pipelines.sdxl import DetailPlusPlusPipeline as pipeline_class
    pipe = pipeline_class(**tiny_components(seed), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def _tiny_sd_unet(variant: str, cross_attention_dim: int) -> UNet2DConditionModel:
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
    if variant not in _SD_TEXT:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    width, act = _SD_TEXT[variant]
    modules = seeded_modules(
        {
            "text_encoder": lambda: CLIPTextModel(clip_text_config(width, hidden_act=act)),
            "unet": lambda: _tiny_sd_unet(variant, width),
            "vae": lambda: tiny_vae(*SD_VAE_FACTORS),
        },
        seed,
    )
    scheduler = DDIMScheduler(**SD21_SCHEDULER_CONFIG) if variant == "sd21" else PNDMScheduler(**SD15_SCHEDULER_CONFIG)
    return {
        **modules,
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


def _tiny_t5(width: int, vocab_size: int):
    """A tiny T5 v1.1-style encoder (gated GELU, as T5-XXL) of ``width`` on ``vocab_size`` ids."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_ff=37,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
    )
    return T5EncoderModel(config)


def tiny_flux_components(seed: int = 0) -> dict[str, Any]:
    """The seven FLUX.1 components at toy size: a ``FluxTransformer2DModel`` with ``transformer_blocks.0-1``
    (double-stream) and ``single_transformer_blocks.0-1``, a guidance embedding (FLUX.1-dev's), RoPE axes (4, 4, 8)
    over 2 heads of 16; a pooled CLIP text encoder (32 wide) on the packaged CLIP tokenizer; a T5 encoder (32 wide)
    on :func:`~detailpp.models.builders.tiny_t5_tokenizer`; a 4-channel VAE with FLUX's latent factors (no quant
    convs); FLUX.1-dev's scheduler (dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from detailpp.models.builders import FLUX_SCHEDULER_CONFIG, FLUX_VAE_FACTORS, tiny_t5_tokenizer

    t5_tokenizer = tiny_t5_tokenizer()
    modules = seeded_modules(
        {
            "transformer": lambda: FluxTransformer2DModel(
                patch_size=1,
                in_channels=16,  # the VAE's 4 channels, 2x2 patches packed
                num_layers=2,
                num_single_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                pooled_projection_dim=32,
                guidance_embeds=True,
                axes_dims_rope=(4, 4, 8),
            ),
            "text_encoder": lambda: CLIPTextModel(clip_text_config(32, hidden_act="quick_gelu", projection_dim=32)),
            "text_encoder_2": lambda: _tiny_t5(32, len(t5_tokenizer)),
            "vae": lambda: tiny_vae(*FLUX_VAE_FACTORS, quant_convs=False),
        },
        seed,
    )
    return {
        **modules,
        "tokenizer": load_clip_tokenizer(),
        "tokenizer_2": t5_tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
    }


def build_tiny_flux_pipeline(seed: int = 0, pipeline_class: type | None = None, dtype: torch.dtype = torch.float32):
    """A tiny random :class:`~detailpp.DetailPlusPlusFluxPipeline` (or ``pipeline_class``, e.g. ``FluxPipeline``) on
    the CPU. Native size 128x128 (8x8 image tokens)."""
    if pipeline_class is None:
        from detailpp.pipelines.flux import DetailPlusPlusFluxPipeline as pipeline_class
    pipe = pipeline_class(**tiny_flux_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def tiny_sd3_components(seed: int = 0, dual: bool = False) -> dict[str, Any]:
    """The nine SD3 components at toy size: an ``SD3Transformer2DModel`` with ``transformer_blocks.0-2`` (patch 2,
    4 heads of 8, the last block's text stream dropped as in SD3), ``dual=True`` making block 0 an SD3.5-medium
    dual-attention block (``attn2``, RMS q/k norms everywhere); two CLIP text encoders with projections (CLIP-L's
    ``quick_gelu``, OpenCLIP-G's ``gelu``, 32 wide each) on the packaged CLIP tokenizers (the second pads with
    ``"!"``); a T5 encoder (64 wide) on :func:`~detailpp.models.builders.tiny_t5_tokenizer`; a 4-channel VAE with
    SD3's latent factors (no quant convs); SD3's scheduler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from detailpp.models.builders import SD3_SCHEDULER_CONFIG, SD3_VAE_FACTORS, tiny_t5_tokenizer

    t5_tokenizer = tiny_t5_tokenizer()
    modules = seeded_modules(
        {
            "transformer": lambda: SD3Transformer2DModel(
                sample_size=16,  # the pipeline's default size: 16 x 8 = 128 px
                patch_size=2,
                in_channels=4,
                out_channels=4,
                num_layers=3,
                attention_head_dim=8,
                num_attention_heads=4,
                caption_projection_dim=32,
                joint_attention_dim=64,  # the CLIP embeddings (32 + 32) padded to T5's width
                pooled_projection_dim=64,  # the two CLIP projections concatenated
                pos_embed_max_size=64,
                dual_attention_layers=(0,) if dual else (),
                qk_norm="rms_norm" if dual else None,
            ),
            "text_encoder": lambda: CLIPTextModelWithProjection(
                clip_text_config(32, hidden_act="quick_gelu", projection_dim=32)
            ),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(clip_text_config(32, projection_dim=32)),
            "text_encoder_3": lambda: _tiny_t5(64, len(t5_tokenizer)),
            "vae": lambda: tiny_vae(*SD3_VAE_FACTORS, quant_convs=False),
        },
        seed,
    )
    return {
        **modules,
        "tokenizer": load_clip_tokenizer(),
        "tokenizer_2": load_clip_tokenizer(second=True),
        "tokenizer_3": t5_tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
    }


def build_tiny_sd3_pipeline(
    seed: int = 0, pipeline_class: type | None = None, dtype: torch.dtype = torch.float32, dual: bool = False
):
    """A tiny random :class:`~detailpp.DetailPlusPlusSD3Pipeline` (or ``pipeline_class``, e.g.
    ``StableDiffusion3Pipeline``) on the CPU; ``dual=True``: block 0 is a dual-attention block as in SD3.5-medium.
    Native size 128x128 (8x8 image tokens after the 2x2 patches)."""
    if pipeline_class is None:
        from detailpp.pipelines.sd3 import DetailPlusPlusSD3Pipeline as pipeline_class
    pipe = pipeline_class(**tiny_sd3_components(seed, dual))
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
