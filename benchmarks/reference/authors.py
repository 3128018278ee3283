"""The authors' Detail++ pipeline (``clf28/Detail-plus-plus`` at e73155b), run from a checkout the user provides.

Nothing of their code is kept in this repository: :func:`check_checkout` verifies that a folder holds their files at
the expected commit, :func:`import_authors` imports them from it, and :func:`run_authors` drives their
``ProT2IPipeline`` the way their ``run.py`` does (one controller per pair of consecutive sub-prompts, local blend on
each subject word), recording what it computes: every branch's final latent, the binary mask of each subject at
each step of latent modification, and every nursing loss.

Their code is used unmodified. Where this machine lacks what it imports, a stand-in module is put in
``sys.modules`` before importing it (``torchvision`` and ``IPython``, which their pipeline imports and never uses;
``cv2`` only when OpenCV is not installed, replaced by its 5-tap ``GaussianBlur`` — logged). On a machine without
CUDA, ``Tensor.cuda()`` (their local blend calls it) returns the tensor itself while their pipeline runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import io
import logging
import subprocess
import sys
import time
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

REPOSITORY = "clf28/Detail-plus-plus"
COMMIT = "e73155b90f65b416f0f2658e17253e3ed3ff8722"
#: sha256 of the files whose code runs, at :data:`COMMIT`.
FILES = {
    "ProT2I/prot2i_pipeline_sdxl.py": "279753a3e60d15443048ab37c30bbf5ad430a2d1620c5988d56ac56a740d440b",
    "ProT2I/processors.py": "66d0f47db685e72858fa3486b4c87f2cf90b09c0736d79ecfcd3432ad1cea122",
    "utils/ptp_utils.py": "a028bf4cb753657f5d6f6dabc140cc877074d7a2334bb2c65ec670a26aba4f67",
}


class CheckoutError(ValueError):
    """The folder given is not the authors' repository at the expected commit; the message says what to do."""


def check_checkout(path: str | Path) -> str:
    """Raise :class:`CheckoutError` unless ``path`` holds the authors' files at :data:`COMMIT`; return the commit."""
    root = Path(path)
    clone = f"git clone https://github.com/{REPOSITORY} {root} && git -C {root} checkout {COMMIT[:7]}"
    if not root.is_dir():
        raise CheckoutError(f"{root} is not a folder. Expected a checkout of {REPOSITORY} at {COMMIT[:7]}: {clone}")
    missing = [name for name in FILES if not (root / name).is_file()]
    if missing:
        raise CheckoutError(
            f"{root} is not the authors' repository {REPOSITORY}: it lacks {', '.join(missing)}. "
            f"Expected a checkout at {COMMIT[:7]}: {clone}"
        )
    if (root / ".git").exists():
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if head and head != COMMIT:
            raise CheckoutError(
                f"{root} is at commit {head[:7]}, expected {COMMIT[:7]} (the code the fixture records): "
                f"git -C {root} checkout {COMMIT[:7]}"
            )
    for name, digest in FILES.items():
        if hashlib.sha256((root / name).read_bytes()).hexdigest() != digest:
            raise CheckoutError(
                f"{root / name} differs from {REPOSITORY} at {COMMIT[:7]} (modified, or another commit). "
                f"Restore it: git -C {root} checkout {COMMIT[:7]} -- {name}"
            )
    return COMMIT


def _stand_in(name: str, **attributes: Any) -> None:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attributes)
    module.__dict__["__detailpp_stand_in__"] = True
    sys.modules[name] = module


def _opencv_gaussian_blur(image: np.ndarray, ksize: tuple[int, int], sigma: float) -> np.ndarray:
    """``cv2.GaussianBlur(image, (k, k), 0)`` for k in 1, 3, 5, 7: OpenCV's fixed kernels, reflect-101 borders."""
    from detailpp.method.nursing import OPENCV_SMALL_KERNELS

    if sigma != 0 or ksize[0] != ksize[1] or ksize[0] not in OPENCV_SMALL_KERNELS:
        raise NotImplementedError("the OpenCV stand-in only blurs with sigma 0 and square kernels of 1-7")
    kernel = np.asarray(OPENCV_SMALL_KERNELS[ksize[0]], dtype=np.float32)
    pad = ksize[0] // 2
    out = np.pad(image.astype(np.float32), pad, mode="reflect")
    out = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="valid"), 1, out)
    return np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="valid"), 0, out).astype(np.float32)


def import_authors(path: str | Path) -> tuple[types.ModuleType, types.ModuleType]:
    """Their pipeline and processor modules, imported from the checkout at ``path`` (checked first)."""
    check_checkout(path)
    # diffusers and transformers look for torchvision when first imported: let them find none before the stand-in.
    importlib.import_module("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl")
    stand_ins = []
    for name, attributes in (("torchvision", {"transforms": types.ModuleType("transforms")}), ("IPython", {})):
        if importlib.util.find_spec(name) is None:
            _stand_in(name, **attributes)
            stand_ins.append(name)
            if name == "IPython":
                _stand_in("IPython.display", display=lambda *a, **k: None)
                stand_ins.append("IPython.display")
    if importlib.util.find_spec("cv2") is None:
        logger.warning("OpenCV is not installed: their cv2.GaussianBlur runs as a numpy stand-in (same kernel)")
        _stand_in("cv2", GaussianBlur=_opencv_gaussian_blur, FONT_HERSHEY_SIMPLEX=0)
    root = str(Path(path).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        pipeline = importlib.import_module("ProT2I.prot2i_pipeline_sdxl")
        processors = importlib.import_module("ProT2I.processors")
    finally:
        for name in stand_ins:  # nobody else may take them for the real packages
            sys.modules.pop(name, None)
    return pipeline, processors


@contextlib.contextmanager
def _cpu_cuda() -> Iterator[None]:
    """Without CUDA, ``Tensor.cuda()`` returns the tensor (their local blend moves its mask with it)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


@dataclass
class AuthorsRun:
    """What one call of their pipeline computed."""

    latents: torch.Tensor  # every branch's final latent (branches x C x H x W); empty unless output_type="latent"
    masks: list[torch.Tensor] = field(default_factory=list)  # per step of latent modification: (subjects x H x W)
    losses: list[float] = field(default_factory=list)  # every nursing loss, in order
    seconds: float = 0.0


def run_authors(
    modules: tuple[types.ModuleType, types.ModuleType],
    components: dict[str, Any],
    sub_prompts: Sequence[str],
    subjects: Sequence[str],
    *,
    latents: torch.Tensor,
    steps: int,
    height: int,
    width: int,
    guidance_scale: float,
    share_steps: float,
    mask_threshold: float,
    nursing: bool,
    centroid_alignment: bool,
    step_size: float,
    thresholds: Sequence[float],
    max_iterations: tuple[int, int] = (6, 3),
    record: bool = True,
    pipe: Any = None,
    output_type: str = "latent",
) -> AuthorsRun:
    """Run their ``ProT2IPipeline`` as their ``run.py`` does, on ``components`` (a fresh scheduler each call).

    ``sub_prompts`` are p0, p1, p2..pn, ``subjects`` the subject word of p2..pn; ``latents`` one initial latent
    (1 x C x h x w), given to every branch. ``record=True`` records the masks and nursing losses (their mask
    picture writer is swapped for a recorder for the call). ``pipe``: reuse a pipeline built by this function
    before (timing); its scheduler is replaced by a fresh one, as on a first call. ``output_type="pil"`` decodes
    every branch as their pipeline does (``latents`` stays empty).
    """
    pipeline_module, processors = modules
    run = AuthorsRun(latents=torch.empty(0))
    base = pipeline_module.ProT2IPipeline

    class Recording(base):  # their class, with the loss recorded on the way out
        def _entropy_loss(self, *args, **kwargs):
            loss = super()._entropy_loss(*args, **kwargs)
            if record:
                run.losses.append(float(loss))
            return loss

    parts = dict(components)
    parts["scheduler"] = type(components["scheduler"]).from_config(components["scheduler"].config)
    if pipe is None:
        pipe = Recording(**parts)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe.scheduler = parts["scheduler"]
    device = pipe._execution_device
    attn_res = (int(np.ceil(width / 32)), int(np.ceil(height / 32)))
    nps = [None, *subjects]
    controllers = []
    for i in range(1, len(sub_prompts)):
        controller_kwargs = {
            "edit_type": "refine",
            "local_blend_words": nps[i - 1],
            "n_cross_replace": {"default_": 0.0},
            "n_self_replace": share_steps,
            "lb_threshold": mask_threshold,
            "lb_prompt": [sub_prompts[0]] * 2,
            "is_nursing": nursing,
            "lb_res": attn_res,
            "run_name": "unused",
            "save_map": record,
        }
        controllers.append(
            processors.create_controller(
                prompts=[sub_prompts[i - 1], sub_prompts[i]],
                cross_attention_kwargs=controller_kwargs,
                num_inference_steps=steps,
                tokenizer=pipe.tokenizer,
                device=device,
                attn_res=attn_res,
            )
        )
    cross_attention_kwargs = {
        "subprompts": list(sub_prompts),
        "set_controller": controllers,
        "subject_words": nps if nursing else None,
        "nursing_threshold": dict(enumerate(thresholds)),
        "max_refinement_steps": list(max_iterations),
        "scale_factor": step_size,
        "scale_range": (1.0, 0.0),
        "centroid_alignment": centroid_alignment,
        "angle_loss_weight": 0.0,
    }

    def save_binary_masks(attention_masks, word, res=16, orig_image=None, save_path=None, txt_under_img=False):
        run.masks.append(attention_masks.detach().bool().cpu())

    writer = processors.vis_utils.save_binary_masks
    processors.vis_utils.save_binary_masks = save_binary_masks
    try:
        with _cpu_cuda(), contextlib.redirect_stdout(io.StringIO()):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            out = pipe(
                prompt=sub_prompts[0],
                width=width,
                height=height,
                cross_attention_kwargs=cross_attention_kwargs,
                num_inference_steps=steps,
                num_images_per_prompt=1,
                guidance_scale=guidance_scale,
                latents=latents.to(device).repeat(len(sub_prompts), 1, 1, 1),
                attn_res=attn_res,
                output_type=output_type,
            )[0]
            if device.type == "cuda":
                torch.cuda.synchronize()
            run.seconds = time.perf_counter() - started
    finally:
        processors.vis_utils.save_binary_masks = writer
    if output_type == "latent":
        run.latents = out.images.detach().float().cpu()
    n_subjects = len(subjects)  # one local blend per subject (the first controller, p0 -> p1, blends nothing)
    if run.masks:
        run.masks = [torch.stack(run.masks[k : k + n_subjects]) for k in range(0, len(run.masks), n_subjects)]
    run.pipe = pipe  # type: ignore[attr-defined]
    return run
