"""A diffusers pipeline's weights in the original Stability layout: the single ``.safetensors`` file a model site
offers (``model.diffusion_model.*``, ``first_stage_model.*``, ``conditioner.embedders.*`` for SDXL,
``cond_stage_model.*`` for SD 1.x/2.x).

The reverse of the key mapping diffusers reads such a file with (``diffusers.loaders.single_file_utils``:
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``), written for the tests and ``benchmarks/single_file_offline.py``: a model built in
code (tiny, or full size with random weights) becomes a single file that :func:`detailpp.models.single_file` must load
back equal to the folder it came from. Tensors are shared with the pipeline where the layouts agree (no copy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
#: The text encoders' prefixes: SD 1.x's CLIP, SD 2.x's OpenCLIP, SDXL's CLIP and OpenCLIP.
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
_RESNET |= {"time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}
_UNET_TOP |= {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_UNET_TOP |= {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet_key(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def _unet_key(key: str, layers: int, has_attention: dict[int, bool]) -> str:
    """One UNet key in the original layout (``layers``: resnets per down block; up blocks have one more)."""
    parts = key.split(".")
    for new, old in _UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    if parts[0] == "down_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "downsamplers":
            return f"input_blocks.{1 + block * (layers + 1) + layers}.0.op.{rest.removeprefix('conv.')}"
        place = f"input_blocks.{1 + block * (layers + 1) + index}"
        return f"{place}.0.{_resnet_key(rest)}" if kind == "resnets" else f"{place}.1.{rest}"
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        return f"middle_block.{2 * index}.{_resnet_key(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "upsamplers":
            slot = 2 if has_attention[block] else 1
            return f"output_blocks.{block * (layers + 1) + layers}.{slot}.{rest}"
        place = f"output_blocks.{block * (layers + 1) + index}"
        return f"{place}.0.{_resnet_key(rest)}" if kind == "resnets" else f"{place}.1.{rest}"
    raise KeyError(f"no original-layout name for the UNet key {key!r}")


def unet_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A ``UNet2DConditionModel``'s state dict (with its ``config``) in the original layout."""
    layers = int(config["layers_per_block"])
    has_attention = {i: "CrossAttn" in t for i, t in enumerate(config["up_block_types"])}
    return {UNET_PREFIX + _unet_key(k, layers, has_attention): v for k, v in state.items()}


def _vae_key(key: str, num_up_blocks: int) -> str:
    parts = key.split(".")
    half, rest = parts[0], parts[1:]
    if rest[0] == "conv_norm_out":
        return ".".join([half, "norm_out", *rest[1:]])
    if rest[0] in ("down_blocks", "up_blocks"):
        index = int(rest[1]) if rest[0] == "down_blocks" else num_up_blocks - 1 - int(rest[1])
        level = "down" if rest[0] == "down_blocks" else "up"
        if rest[2] == "resnets":
            inner = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{half}.{level}.{index}.block.{rest[3]}.{inner}"
        return f"{half}.{level}.{index}.{'downsample' if level == 'down' else 'upsample'}.{'.'.join(rest[4:])}"
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            inner = ".".join(rest[3:]).replace("conv_shortcut", "nin_shortcut")
            return f"{half}.mid.block_{int(rest[2]) + 1}.{inner}"
        inner = ".".join(rest[3:])
        for new, old in _VAE_ATTENTION.items():
            if inner.startswith(new + "."):
                return f"{half}.mid.attn_1.{old}{inner[len(new) :]}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv: the same names


def vae_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKL``'s state dict in the original layout (the mid-block attention as 1x1 convolutions)."""
    out = {}
    for key, value in state.items():
        new = _vae_key(key, len(config["up_block_types"]))
        is_attention_weight = ".mid.attn_1." in new and new.endswith(".weight") and value.dim() == 2
        out[VAE_PREFIX + new] = value[:, :, None, None] if is_attention_weight else value
    return out


def _text_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text model's keys as ``text_model.*`` (newer transformers flatten ``CLIPTextModel``'s)."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        out[key if key.startswith(("text_model.", "text_projection")) else "text_model." + key] = value
    return out


def clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP's text tower (SD 1.x, SDXL's first encoder): the transformers names under ``prefix``."""
    return {prefix + k: v for k, v in _text_model_keys(state).items()}


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_LAYER |= {"self_attn.out_proj": "attn.out_proj"}


def open_clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP's text tower (SD 2.x, SDXL's second encoder): ``resblocks`` with fused q/k/v ``in_proj``, the
    projection transposed."""
    state = _text_model_keys(state)
    top = {
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    out = {prefix + old: state[new] for new, old in top.items()}
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            for new, old in _OPEN_CLIP_LAYER.items():
                out[f"{dst}{old}.{kind}"] = state[f"{src}{new}.{kind}"]
    return out


def original_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """Every weight of an SDXL or SD 1.x/2.x pipeline in the original layout (SD 2.x: a ``gelu`` text encoder, as
    OpenCLIP's)."""
    out = unet_to_original(pipe.unet.state_dict(), pipe.unet.config)
    out |= vae_to_original(pipe.vae.state_dict(), pipe.vae.config)
    if getattr(pipe, "text_encoder_2", None) is not None:
        out |= clip_to_original(pipe.text_encoder.state_dict(), SDXL_CLIP_PREFIX)
        out |= open_clip_to_original(pipe.text_encoder_2.state_dict(), SDXL_OPEN_CLIP_PREFIX)
    elif pipe.text_encoder.config.hidden_act == "gelu":
        out |= open_clip_to_original(pipe.text_encoder.state_dict(), SD2_OPEN_CLIP_PREFIX)
    else:
        out |= clip_to_original(pipe.text_encoder.state_dict(), SD1_CLIP_PREFIX)
    return out


def save_original(pipe: Any, path: str | Path, v_prediction: bool = False, zero_snr: bool = False) -> Path:
    """Write ``pipe`` as one original-layout ``.safetensors`` file; ``v_prediction``/``zero_snr`` add the empty
    ``v_pred``/``ztsnr`` marker tensors that v-prediction fine-tunes carry."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in original_state_dict(pipe).items()}
    if v_prediction:
        state["v_pred"] = torch.tensor([])
    if zero_snr:
        state["ztsnr"] = torch.tensor([])
    save_file(state, str(path))
    return Path(path)


def tiny_sdxl_pipeline(seed: int = 0) -> Any:
    """The tiny random SDXL (:func:`detailpp.models.tiny.tiny_components`) with a wider second text encoder (48
    against 32): diffusers tells SDXL's two encoders apart in a single file by their widths, as the real ones'
    (768 and 1280), so a tiny single file needs two widths too."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from detailpp.models.tiny import tiny_components
    from detailpp.pipelines.sdxl import DetailPlusPlusPipeline

    components = tiny_components(seed)
    torch.manual_seed(seed + 1)
    known = CLIPTextConfig().to_dict()
    text = {k: v for k, v in components["text_encoder"].config.to_dict().items() if k in known}
    second = CLIPTextModelWithProjection(CLIPTextConfig(**text | {"hidden_size": 48, "projection_dim": 48}))
    unet = dict(components["unet"].config) | {"cross_attention_dim": 80, "projection_class_embeddings_input_dim": 96}
    components |= {"text_encoder_2": second.eval(), "unet": UNet2DConditionModel.from_config(unet).eval()}
    pipe = DetailPlusPlusPipeline(**components, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
