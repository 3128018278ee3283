"""Accumulative Latent Modification (paper, eq. 4).

After each scheduler step within the first S steps, the detail branches are chained in order:
``z_{i+1} <- z_i + B_i * (zhat_{i+1} - z_i)``, each using the already modified ``z_i``. Branch 0 (p0) and branch 1
(p1, the base) are not blended; branch 2 is blended into branch 1's latent, branch 3 into branch 2's, and so on, so
the last branch accumulates every subject's details. With binary masks the update is a selection, written as
``torch.where`` so that outside its mask a branch equals the previous branch's latent bit for bit.
"""

from __future__ import annotations

import torch

#: index of the first branch that is blended: p0 = 0 and p1 = 1 are not.
FIRST_DETAIL_BRANCH = 2


def accumulate_latents(latents: torch.Tensor, masks: torch.Tensor, blend: bool = False) -> torch.Tensor:
    """Chain the branches' latents (branches x C x H x W) through the detail masks (detail branches x H x W).

    ``masks[j]`` belongs to branch ``FIRST_DETAIL_BRANCH + j``. Returns a new tensor; the input is not modified.
    ``blend=True`` computes eq. 4 as written, ``z_i + B_i (zhat_{i+1} - z_i)`` with float masks (the authors' code),
    which equals the selection up to rounding.
    """
    n_detail = latents.shape[0] - FIRST_DETAIL_BRANCH
    if masks.shape[0] != n_detail:
        raise ValueError(f"{masks.shape[0]} masks for {n_detail} detail branches.")
    out = latents.clone()
    for j in range(n_detail):
        i = FIRST_DETAIL_BRANCH + j
        mask = masks[j].to(latents.device).unsqueeze(0)
        if blend:
            out[i] = out[i - 1] + mask.float() * (out[i] - out[i - 1])  # fp32 masks promote, as theirs
        else:
            out[i] = torch.where(mask, out[i], out[i - 1])
    return out
