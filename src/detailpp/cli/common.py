"""Checks and conventions shared by the sub-commands: device, dtype, seeds, model defaults, output file names.

Everything here runs before the model is loaded, so that bad input costs no loading time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from detailpp.cli import UserError
from detailpp.errors import DetailError
from detailpp.images import SCHEDULERS, a1111_sampler  # noqa: F401 (the CLI's --scheduler names)
from detailpp.inputs import check_image_side, check_seed

logger = logging.getLogger(__name__)

#: -1 asks for a random seed (A1111's convention); the range is :data:`detailpp.inputs.SEED_MAX`'s.
RANDOM_SEED = -1
DTYPE_NAMES = ("float16", "bfloat16", "float32")
#: the built-in models' native size; a diffusers folder's own size is read from its config.
BUILTIN_SIZES = {"tiny-random": 256, "sdxl-random": 1024, "tiny-random-sd15": 256, "tiny-random-sd21": 256}
BUILTIN_SIZES |= {"sd15-random": 512, "tiny-random-flux": 128, "tiny-random-sd3": 128}
BUILTIN_SIZES |= {"flux-random": 1024, "sd35-random": 1024}
EMBEDDED_MODELS = ("toy", "tiny-random", "tiny-random-sd15", "tiny-random-sd21", "tiny-random-flux", "tiny-random-sd3")


def resolve_seeds(seeds: Iterable[int]) -> list[int]:
    """The seeds to use: ``-1`` becomes a random seed (logged and recorded like a given one); a seed given twice
    makes one image (the same seed makes the same image), with a notice."""
    out = []
    for seed in seeds:
        if seed == RANDOM_SEED:
            seed = secrets.randbelow(2**32)
            logger.info("--seed -1: random seed %d", seed)
        else:
            check_seed("--seed", seed, hint=" (or -1 for a random seed)")
        if seed in out:
            logger.warning("--seed %d is given twice; it makes one image (the same seed makes the same image).", seed)
            continue
        out.append(seed)
    return out


def quiet_loading() -> None:
    """No loading progress bars (diffusers' components, transformers' weights): for ``--quiet``."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def check_device(device: str | None) -> str:
    """The device to run on (the best available when ``None``); a name torch cannot use is refused here."""
    import torch

    from detailpp.models.loading import resolve_device

    if device is None:
        return resolve_device(None)
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(
            f"--device {device!r} is not a device name; use cpu, cuda, cuda:1, mps... or leave it out for the best "
            "available."
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {device}: this machine has no usable CUDA GPU (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu, or leave --device out."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {device}: there is no GPU {parsed.index} (this machine has {torch.cuda.device_count()}); "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}."
            )
    elif parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(f"--device {device}: MPS is not available here; use --device cpu.")
    elif parsed.type != "cpu":
        raise UserError(f"--device {device}: only cpu, cuda[:N] and mps are supported.")
    return device


def check_dtype(dtype: str | None, device: str) -> str | None:
    """``dtype``, or float32 with a notice where float16 cannot run (the CPU)."""
    if dtype is None:
        return None
    if dtype not in DTYPE_NAMES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}.")
    if dtype == "float16" and device.startswith("cpu"):
        logger.warning(
            "--dtype float16 is not supported on the CPU (it runs far slower and may fail); using float32. Use "
            "--dtype float16 with --device cuda."
        )
        return "float32"
    return dtype


def native_size(model: str, config_source: str | None = None) -> int:
    """The model's native image size in pixels, read before it is loaded: its UNet's sample size times the VAE's
    factor (a folder's files, or a Hub repo's fetched into the cache: SD 1.5 512, SD 2.1 768, SDXL 1024; a single
    file: its ``config_source``'s, else its family's bundled layout's); 1024 when they cannot be read."""
    if model in BUILTIN_SIZES:
        return BUILTIN_SIZES[model]
    source = model
    if Path(model).expanduser().is_file():  # a single file: its --config's size, else its family's layout's
        from detailpp.models.single_file import layout_dir, read_kind

        try:
            source = config_source or str(layout_dir(read_kind(Path(model).expanduser())))
        except DetailError:
            return 1024
    folder = Path(source)
    if model == "toy":
        from detailpp.models.loading import TOY_MODEL_DIR as folder

    def config(name: str) -> dict:
        path = folder / name / "config.json"
        if not folder.exists() and source.count("/") == 1:  # a Hub id: the cache only when the Hub is out of reach
            from huggingface_hub import hf_hub_download

            from detailpp.hub import hub_unreachable_reason

            local = hub_unreachable_reason() is not None
            path = Path(hf_hub_download(source, f"{name}/config.json", local_files_only=local))
        return json.loads(path.read_text(encoding="utf-8"))

    try:
        unet, vae = config("unet"), config("vae")
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except Exception:  # not readable (no network, gated, a single file): SDXL's size
        return 1024


def default_steps(model: str, family=None, pipe=None) -> int:
    """The steps a run takes when ``--steps`` is absent: 20 on the embedded models, else the loaded pipeline's
    default (:attr:`~detailpp.pipelines.base.DetailPipelineMixin.default_num_inference_steps`: SDXL and SD 50, FLUX.1
    and SD3 28, FLUX.1-schnell 4), or before loading its family's (``family``, a
    :class:`~detailpp.models.families.ModelFamily`)."""
    if model in EMBEDDED_MODELS:
        return 20
    if pipe is not None and hasattr(pipe, "default_num_inference_steps"):
        return pipe.default_num_inference_steps
    if family is not None:
        return _family_default(family, "num_inference_steps")
    return 50


def side_multiple(family) -> int:
    """What an image side must be a multiple of: 16 for a transformer (it patches the 8x latents 2x2), else 8."""
    return 16 if family is not None and family.transformer else 8


def check_family_flags(
    family, height: int | None, width: int | None, scheduler: str | None = None, controlnet: bool = False
) -> None:
    """What a transformer family (FLUX.1, SD3) cannot take, refused before loading: sides that are not multiples
    of 16, ``--scheduler`` (its flow-matching scheduler is part of the model), ``--controlnet``."""
    if family is None or not family.transformer:
        return
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            check_image_side(f"--{name}", value, f" for {family.label}", multiple=side_multiple(family))
    if scheduler is not None:
        raise UserError(
            f"--scheduler {scheduler}: {family.label} samples with its own flow-matching scheduler "
            "(FlowMatchEulerDiscreteScheduler); the UNet schedulers of --scheduler do not apply to it. Leave "
            "--scheduler out."
        )
    if controlnet:
        raise UserError(
            f"--controlnet: Detail++ runs ControlNet with Stable Diffusion XL only, not with {family.label}; leave "
            "--controlnet out or use an SDXL model."
        )


def family_guidance(family, default: float) -> float:
    """The guidance scale of a transformer family's diffusers pipeline (FLUX.1 3.5, SD3 7.0); ``default`` for the
    UNet families (a bench keeps its own)."""
    if family is None or not family.transformer:
        return default
    return float(_family_default(family, "guidance_scale"))


def _family_default(family, name: str):
    """The default of ``name`` in the call of ``family``'s diffusers pipeline (before any model loads)."""
    from detailpp.models.loading import pipeline_class_for
    from detailpp.pipelines.base import call_default

    return call_default(pipeline_class_for(family).base_pipeline_class, name)


def check_size(name: str, value: int | None) -> None:
    """``--height``/``--width`` (None: the model's size), by :func:`detailpp.inputs.check_image_side`."""
    if value is not None:
        check_image_side(f"--{name}", value)


def check_output_dir(folder: Path) -> None:
    """Fail early when ``folder`` cannot be created or written, without creating it (an error leaves nothing)."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    problem = None
    if not probe.is_dir():
        problem = "Not a directory" if probe != folder else "it is a file"
    elif not os.access(probe, os.W_OK | os.X_OK):
        problem = "Permission denied"
    if problem:
        raise UserError(
            f"Cannot write to the output folder {str(folder)!r} ({problem}); choose another with --output-dir."
        )


# --- output file names -----------------------------------------------------------------------------------------------
_NUMBERED = re.compile(r"^(\d{5,})-")


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe slug of ``text``; letters of every script are kept (a Chinese prompt keeps its words)."""
    s = re.sub(r"[\W_]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "image"


def next_number(folder: Path) -> int:
    """A1111's running number: one more than the highest ``NNNNN-`` prefix in ``folder`` (0 when none)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    numbers = [int(m.group(1)) for name in names if (m := _NUMBERED.match(name))]
    return max(numbers, default=-1) + 1


def numbered_stem(folder: Path, seed: int, text: str) -> Path:
    """``folder/NNNNN-<seed>-<slug>``: the stem of an image and of every file that goes with it."""
    return folder / f"{next_number(folder):05d}-{seed}-{slug(text)}"


def dtype_name(text: str) -> str:
    """argparse type of ``--dtype``: the aliases fp16/bf16/fp32 as their full names."""
    aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32"}
    return aliases.get(text.lower(), text.lower())


# --- schedulers ------------------------------------------------------------------------------------------------------
def scheduler_name(text: str) -> str:
    """argparse type of ``--scheduler``: 'DPM++ 2M Karras', 'dpm++_2m_karras' and 'dpm++-2m-karras' are one name."""
    return re.sub(r"[\s_]+", "-", text.strip().lower()).replace("euler-ancestral", "euler-a")


def set_scheduler(pipe, name: str) -> None:
    """Swap ``pipe``'s scheduler for ``name`` (a key of :data:`SCHEDULERS`), keeping the model's schedule config."""
    import diffusers

    cls_name, overrides, _ = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)


# --- models ----------------------------------------------------------------------------------------------------------


def check_model(model: str, config: str | None = None):
    """Refuse, before loading, a model name that names nothing, a Hub id that offline mode cannot load, or a model of
    a family Detail++ cannot run on (its ``model_index.json``, or a single file's keys:
    :class:`~detailpp.models.families.UnsupportedModelError`); a single file's ``--config`` too. Returns the model's
    :class:`~detailpp.models.families.ModelFamily` (``None`` when it cannot be read before loading)."""
    from detailpp.models.families import BUILTIN_MODELS, model_family

    path = Path(model).expanduser()
    if path.is_file():
        from detailpp.models.single_file import check_config, read_kind

        kind = read_kind(path)  # a pickle, another file, SD3, an inpainting model...: refused with the reason
        if config is not None:
            if not Path(config).expanduser().is_dir() and not looks_like_path(config):
                _check_hub_id(config, "--config")
            check_config(str(Path(config).expanduser()) if Path(config).expanduser().is_dir() else config, kind)
        return kind.family
    if config is not None:
        raise UserError(f"--config applies to a .safetensors --model only; {model!r} is not a file.")
    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model]
    if not path.exists():
        _check_model_name(model)
    return model_family(path if path.exists() else model)


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path (a Hub id is ``owner/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1


def _check_model_name(model: str) -> None:
    from detailpp.models.single_file import looks_like_single_file

    if looks_like_path(model) or looks_like_single_file(model):
        raise UserError(
            f"--model {model!r}: no such folder or file, and no Hub id of the form 'owner/name'; give a local SDXL "
            "folder or .safetensors file, a Hub id, or --model toy (the embedded model)."
        )
    _check_hub_id(model, "--model")


def _check_hub_id(name: str, flag: str) -> None:
    """A Hub id: reachable (one quick request, not a minute of retries), or in the cache when offline."""
    from detailpp.hub import check_hub_reachable, hub_offline

    if not hub_offline():
        check_hub_reachable(name, flag)
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "model_index.json"), str):
        raise UserError(
            f"{flag} {name}: not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it; unset "
            "HF_HUB_OFFLINE to download it, give a local SDXL folder or .safetensors file, or use --model toy."
        )


# --- ControlNet ------------------------------------------------------------------------------------------------------
def check_controlnet_source(source: str, flag: str = "--controlnet") -> None:
    """A ControlNet given as ``tiny-random``, an existing folder or a Hub id ``owner/name`` (before loading)."""
    if source == "tiny-random" or Path(source).expanduser().is_dir():
        return
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise UserError(
            f"{flag} {source!r}: no such folder and no Hub id of the form 'owner/name' (e.g. "
            "diffusers/controlnet-canny-sdxl-1.0); or use tiny-random to check the set-up."
        )
    from detailpp.hub import check_hub_reachable

    check_hub_reachable(source, flag, "config.json")


def check_control_image(path: Path, flag: str = "--control-image") -> tuple[int, int]:
    """A control image file that exists and opens as an image; returns its (width, height)."""
    import PIL.Image

    if not path.is_file():
        raise UserError(f"{flag} {str(path)!r}: no such file.")
    try:
        with PIL.Image.open(path) as image:
            image.verify()
        with PIL.Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{flag} {str(path)!r} does not open as an image ({e}).") from None


def check_controlnet_args(args) -> None:
    """``--controlnet``, ``--control-image``, ``--controlnet-scale``, ``--control-start``/``--control-end``: one
    image per ControlNet, one scale (for all) or one per ControlNet, 0 <= start < end <= 1, files that open.
    Sets ``args.controlnet_scales`` (one per ControlNet)."""
    nets, images, scales = args.controlnet, args.control_image, args.controlnet_scale
    if images and not nets:
        raise UserError("--control-image needs a ControlNet: add --controlnet ID|PATH (one per image).")
    for flag, given in (("--controlnet-scale", scales), ("--control-start", args.control_start is not None)):
        if given and not nets:
            raise UserError(f"{flag} needs a ControlNet: add --controlnet ID|PATH.")
    if args.control_end is not None and not nets:
        raise UserError("--control-end needs a ControlNet: add --controlnet ID|PATH.")
    if not nets:
        args.controlnet_scales = []
        return
    for source in nets:
        check_controlnet_source(source)
    if len(images) != len(nets):
        raise UserError(
            f"Got {len(nets)} --controlnet and {len(images)} --control-image: give one control image per ControlNet, "
            "in the same order."
        )
    if len(scales) not in (0, 1, len(nets)):
        raise UserError(
            f"Got {len(scales)} --controlnet-scale for {len(nets)} ControlNets: give one for all, or one per "
            "ControlNet."
        )
    args.controlnet_scales = scales * len(nets) if len(scales) == 1 else scales or [1.0] * len(nets)
    start = 0.0 if args.control_start is None else args.control_start
    end = 1.0 if args.control_end is None else args.control_end
    if not 0.0 <= start < end <= 1.0:
        raise UserError(f"--control-start and --control-end must satisfy 0 <= start < end <= 1, got {start}, {end}.")
    sizes = [check_control_image(path) for path in images]
    for size, path in zip(sizes, images, strict=True):
        if size != sizes[0]:
            raise UserError(
                f"The control images differ in size ({images[0]}: {sizes[0][0]}x{sizes[0][1]}, {path}: "
                f"{size[0]}x{size[1]}): resize them to one size, the image's."
            )
    width, height = sizes[0]
    if width % 8 or height % 8:
        raise UserError(
            f"The control image {images[0]} is {width}x{height} pixels; its sides must be multiples of 8: resize or "
            "crop it."
        )
    for name, side, given in (("width", width, args.width), ("height", height, args.height)):
        if given is not None and given != side:
            raise UserError(
                f"--{name} {given} differs from the control image's {name} {side} ({images[0]}): leave --{name} out "
                f"(the control image's size is used) or resize the control image."
            )
