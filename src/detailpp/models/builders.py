"""Pieces every model builder shares: CLIP text configs, the seeded build, the schedulers' settings, a T5 tokenizer.

The tiny random models (:mod:`detailpp.models.tiny`), the full-size random-weight stand-ins
(:mod:`detailpp.models.full_size`) and the research toy model build their modules here the same way: from a fixed
seed, on the target device, in a fixed order (the order of the random draws decides every weight, and the golden
parity test, ``tests/method/test_reference_parity.py``, pins the tiny SDXL's weights), leaving the caller's global
random state as it was.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch

#: The CLIP vocabulary (SDXL's, SD's, FLUX.1's and SD3's CLIP tokenizers) and the packaged tokenizer's start and end
#: ids (the tiny encoders pad with the end token, as SDXL's first tokenizer does).
CLIP_VOCAB_SIZE = 49408
CLIP_START_ID = 49406
CLIP_END_ID = 49407

#: SDXL base's scheduler_config.json (EulerDiscreteScheduler).
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
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

#: FLUX.1-dev's scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler): the shift grows with the image's
#: token count (``use_dynamic_shifting``, mu from 0.5 at 256 tokens to 1.15 at 4096).
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

#: SD3-medium's and SD3.5-large's scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler, a fixed shift).
SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

#: The VAE latents' (scaling_factor, shift_factor): SD 1.x/2.x, SDXL, FLUX.1 (ae.safetensors' 16 channels) and SD3/3.5.
SD_VAE_FACTORS = (0.18215, None)
SDXL_VAE_FACTORS = (0.13025, None)
FLUX_VAE_FACTORS = (0.3611, 0.1159)
SD3_VAE_FACTORS = (1.5305, 0.0609)


def clip_text_kwargs(
    hidden_size: int,
    *,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int = 37,
    hidden_act: str = "gelu",
    projection_dim: int | None = None,
    vocab_size: int = CLIP_VOCAB_SIZE,
    pad_token_id: int = CLIP_END_ID,
) -> dict[str, Any]:
    """A small CLIP text tower's config fields on the packaged CLIP tokenizer: 77 positions, its start and end ids.

    Args:
        hidden_size: the tower's width.
        layers, heads, intermediate_size: its depth, heads and MLP width (the tiny models' 2, 4 and 37 by default).
        hidden_act: ``"quick_gelu"`` as CLIP ViT-L/14, ``"gelu"`` as OpenCLIP's towers.
        projection_dim: the projection's width (for ``CLIPTextModelWithProjection``); left at the config's default
            when ``None``.
        vocab_size, pad_token_id: the vocabulary and the padding id (CLIP's end token unless given).
    """
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        bos_token_id=CLIP_START_ID,
        eos_token_id=CLIP_END_ID,
        pad_token_id=pad_token_id,
        hidden_act=hidden_act,
    )
    return kwargs if projection_dim is None else {**kwargs, "projection_dim": projection_dim}


def clip_text_config(hidden_size: int, **kwargs: Any):
    """:func:`clip_text_kwargs` as a :class:`~transformers.CLIPTextConfig`."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**clip_text_kwargs(hidden_size, **kwargs))


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def seeded_modules(
    builders: dict[str, Callable[[], torch.nn.Module]],
    seed: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, torch.nn.Module]:
    """The modules ``builders`` make, initialised from ``seed`` in the order given, directly on ``device``.

    The global random state (CPU and ``device``'s) is left as it was. Each module is cast to ``dtype`` (kept when
    ``None``) and put in eval mode. ``device="meta"`` builds the shapes only (no memory).
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        with torch.device(device):
            modules = {name: build() for name, build in builders.items()}
    for module in modules.values():
        module.eval()
        if dtype is not None:
            module.to(dtype=dtype)
    return modules


def _tokenizer_corpus() -> list[str]:
    """The prompts packaged with detailpp: T2I-CompBench's three validation lists and the style benchmark's."""
    from detailpp.resources import DATA_DIR, T2I_COMPBENCH_DIR, read_prompt_file

    prompts = [
        p for name in ("color", "shape", "texture") for p in read_prompt_file(T2I_COMPBENCH_DIR / f"{name}_val.txt")
    ]
    scb = json.loads((DATA_DIR / "scb_prompts.json").read_text(encoding="utf-8"))
    return prompts + [item["prompt"] for item in scb["prompts"]]


#: Characters every tiny T5 vocabulary holds, so that any ASCII prompt tokenizes without ``<unk>``.
_T5_CHARACTERS = "".join(chr(c) for c in range(33, 127))


def _unigram_vocab(corpus: list[str]) -> list[tuple[str, float]]:
    """A Unigram model's pieces and log-probabilities, counted on ``corpus``.

    Every word (``"▁dog"``, and ``"dog"`` a little lower, for words glued to a mark) and punctuation mark at its
    frequency, then single characters (with and without ``"▁"``) far below any word, so that a known word is one
    piece and an unknown one is spelled out. Deterministic by construction (no EM, no thread order).
    """
    counts = Counter(piece for text in corpus for piece in re.findall(r"\w+|[^\w\s]", text))
    total = sum(counts.values())
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = [("▁" + w if w[0].isalnum() else w, math.log(counts[w] / total)) for w in words]
    vocab += [(w, math.log(counts[w] / total) - 1.0) for w in words if w[0].isalnum()]  # after "-", "'"...
    floor = math.log(1 / total) - 10.0
    known = {piece for piece, _ in vocab}
    for char in _T5_CHARACTERS:
        vocab += [(piece, floor) for piece in (char, "▁" + char) if piece not in known]
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", floor), *vocab]


@lru_cache(maxsize=1)
def tiny_t5_tokenizer():
    """A small T5 tokenizer for the random-weight FLUX.1 and SD3 models (real models bring their own).

    No T5 tokenizer files ship with detailpp and none can be downloaded, so one is built in code with the
    ``tokenizers`` library: a Unigram model over the packaged prompts' pieces (:func:`_unigram_vocab`: the same pieces
    and ids every time) with T5's conventions: ``<pad>`` id 0, ``</s>`` id 1 appended to every prompt, no start token,
    ``<unk>`` id 2, Metaspace pieces (``"▁dog"``); wrapped as :class:`~transformers.T5TokenizerFast`, 512 tokens at
    most. Its ids stay below two thousand, so it also feeds a full-size T5-XXL (32,128 ids) for timing. Cached: one
    tokenizer a process.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    spm = Tokenizer(models.Unigram(_unigram_vocab(_tokenizer_corpus()), unk_id=2, byte_fallback=False))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    spm.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    spm.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=spm,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=512,
    )
