"""A tiny random SDXL: SDXL's block names and real CLIP tokenizers, random weights, built offline, fast.

Its images are noise. It exists to run every code path of the package (tests, ``--model tiny-random``) where no
SDXL weights can be had; it proves plumbing and equivalences, never image quality.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from detailpp.resources import load_clip_tokenizer

#: SDXL base's scheduler settings.
SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def tiny_components(seed: int = 0) -> dict:
    """The seven SDXL components at toy size: ``down_blocks.0-2``, ``mid_block``, ``up_blocks.0-2`` as in SDXL
    (no attention in ``down_blocks.0``/``up_blocks.2``, two transformer layers at the lowest resolution), VAE
    factor 8, two CLIP text encoders (the second with a projection) on SDXL's 49,408-token vocabulary."""
    torch.manual_seed(seed)
    text_kwargs = dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="gelu",
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_kwargs))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=32, **text_kwargs))
    unet = UNet2DConditionModel(
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
    vae = tiny_vae(scaling_factor=0.13025)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": load_clip_tokenizer(),
        "tokenizer_2": load_clip_tokenizer(second=True),
        "scheduler": EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
    }


def tiny_vae(scaling_factor: float) -> AutoencoderKL:
    """A tiny random VAE with the real VAE's four levels (factor 8) and ``scaling_factor`` (SDXL 0.13025, SD 0.18215),
    from the global random state."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=scaling_factor,
    )


def build_tiny_pipeline(seed: int = 0, pipeline_class=None, dtype: torch.dtype = torch.float32):
    """A tiny random Detail++ pipeline (or ``pipeline_class``, e.g. ``StableDiffusionXLPipeline``) on the CPU.

    Default image size 256x256 (latent 32x32; the lowest-resolution attention layers see 8x8 tokens).
    """
    if pipeline_class is None:
        from detailpp.pipelines.sdxl import DetailPlusPlusPipeline as pipeline_class
    pipe = pipeline_class(**tiny_components(seed), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
