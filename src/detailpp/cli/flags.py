"""The flags several sub-commands share, each defined once: ``--model``, ``--device`` and ``--dtype``, the image size,
``--compile``. A sub-command says only what differs for it (the default model, what the size's default is)."""

from __future__ import annotations

import argparse

from detailpp.cli.common import DTYPE_NAMES, dtype_name
from detailpp.models.families import builtin_models_help


def add_model_flag(p: argparse.ArgumentParser, default: str | None, default_text: str) -> None:
    """``--model``: a Hub id, a local folder or single file, or a built-in model (every one of them listed); and
    ``--config``, a single file's configuration."""
    p.add_argument(
        "--model",
        default=default,
        metavar="ID|PATH|NAME",
        help="a Hub id or local diffusers folder (SDXL or SD 1.x/2.x, told apart by its model_index.json), a "
        ".safetensors single file in the original layout (SDXL, SD 1.x or 2.x, told apart by its keys; loaded "
        f"offline), or a built-in model: {builtin_models_help()} (default: {default_text})",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="DIR|ID",
        help="with a .safetensors --model: the diffusers folder or Hub id whose configuration it is loaded with "
        "(default: the package's SDXL base, SD 1.5 or SD 2.1 configuration, by the file's family)",
    )


def add_device_flags(p: argparse.ArgumentParser, device_default: str = "the best available") -> None:
    """``--device`` and ``--dtype`` (with the aliases fp16, half, bf16, fp32)."""
    p.add_argument("--device", default=None, help=f"cpu, cuda, cuda:1, mps (default: {device_default})")
    p.add_argument(
        "--dtype",
        type=dtype_name,
        choices=DTYPE_NAMES,
        default=None,
        help="float16 (fp16, half), bfloat16 (bf16) or float32 (fp32) (default: float16 on CUDA, float32 elsewhere; "
        "float16 on the CPU falls back to float32)",
    )


def add_size_flags(p: argparse.ArgumentParser, what: str = "pixels, a multiple of 8") -> None:
    """``--height`` and ``--width`` (default: the model's native size)."""
    p.add_argument("--height", type=int, default=None, help=f"{what} (default: the model's size)")
    p.add_argument("--width", type=int, default=None, help=f"{what} (default: the model's size)")


def add_compile_flag(p: argparse.ArgumentParser, note: str = "") -> None:
    """``--compile``: regional ``torch.compile`` of the denoiser's repeated blocks."""
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the denoiser's repeated blocks (pipe.compile_detail()): the first image compiles, the "
        f"later ones run faster on a GPU (BENCHMARKS.md has the measured figures); not useful on the CPU{note}",
    )
