"""The result of :class:`detailpp.DetailPlusPlusPipeline`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from detailpp.method.nursing import NursingRecord
from detailpp.plan import DecompositionPlan


@dataclass
class DetailPlusPlusPipelineOutput(BaseOutput):
    """Output of a Detail++ call.

    Args:
        images: the final image (the last branch, which has accumulated every subject's details), in the
            ``output_type`` asked for.
        plan: the decomposition plan that was used.
        branch_images: one image per branch, p0, p1, p2..pn, when ``return_branch_images=True``.
        masks: each detail branch's normalised subject map (detail branches x latent height x latent width, values
            in [0, 1]; the binary mask is ``masks > tau``) as of the last modified step, when ``return_masks=True``.
        nursing: what attention nursing did at each step where it ran.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    plan: DecompositionPlan | None = None
    branch_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    masks: torch.Tensor | None = None
    nursing: list[NursingRecord] | None = None
