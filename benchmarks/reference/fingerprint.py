"""A platform's float fingerprint: the sha256 of the tiny random SDXL's outputs on one fixed input.

The same code gives different float results on different CPUs (MKL/oneDNN pick kernels by instruction set and
thread count, and sum in another order). ``record.py`` stores the recording machine's fingerprint in the golden
fixture; ``tests/method/test_reference_parity.py`` computes the running machine's: equal fingerprints mean the machine
rounds the UNet and the text encoders as the recording machine did, and the golden test then expects the latents
bit for bit; different ones, a tight bound. It is a heuristic: it covers the kernels of one UNet call and one
encoding, not every kernel of a run.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

#: The prompt encoded for the fingerprint (any fixed prompt does).
PROMPT = "A sketch-style robot is leaning a oil-painting style tree."


@torch.no_grad()
def platform_fingerprint(pipe: Any) -> str:
    """sha256 (hex, first 16 digits) of the text encoders' and the UNet's fp32 outputs on fixed inputs.

    ``pipe``: a pipeline built by :func:`detailpp.models.tiny.build_tiny_pipeline` (CPU, fp32). Runs in well under a
    second.
    """
    digest = hashlib.sha256()
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    out_2 = pipe.text_encoder_2(ids, output_hidden_states=True)
    embeds = torch.cat([hidden, out_2.hidden_states[-2]], dim=-1)
    generator = torch.Generator("cpu").manual_seed(1234)
    sample = torch.randn((1, 4, 32, 32), generator=generator)
    time_ids = torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]])
    added = {"text_embeds": out_2.text_embeds, "time_ids": time_ids}
    eps = pipe.unet(sample, 999, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]
    for tensor in (embeds, out_2.text_embeds, eps):
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
