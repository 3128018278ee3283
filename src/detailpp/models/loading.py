"""Loading a Detail++ pipeline from a name: a Hub id, a local diffusers folder, a single-file checkpoint, or one of
the built-in models (``tiny-random``, ``tiny-random-sd15``, ``tiny-random-sd21``, ``tiny-random-flux``,
``tiny-random-sd3``: random weights for tests; ``sdxl-random``, ``sd15-random``, ``flux-random``, ``sd35-random``:
full-size SDXL / SD 1.5 / FLUX.1-dev / SD3.5-large with random weights, speed/memory stand-ins; ``toy``: the small
model trained on synthetic scenes, when it is installed).

A folder or Hub id loads the Detail++ pipeline of its family (:data:`FAMILY_PIPELINES`, from its
``model_index.json``: :func:`detailpp.models.families.model_family`); an unsupported family is refused before any
weight loads. A single-file checkpoint loads offline as the family its keys tell, with the package's configuration
of that family or the one given (:mod:`detailpp.models.single_file`)."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch

from detailpp.errors import DetailError
from detailpp.models.families import BUILTIN_MODELS, ModelFamily, UnsupportedModelError, model_family
from detailpp.models.single_file import SingleFileError, is_single_file
from detailpp.pipelines.base import dtype_kwarg  # (re-exported: its home is the pipelines' room)
from detailpp.resources import DATA_DIR

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
TOY_MODEL_DIR = DATA_DIR / "toy-model"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
DTYPES |= {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


#: The Detail++ pipeline class of each model family, as ``module:attribute`` (imported only when used).
FAMILY_PIPELINES: dict[ModelFamily, str] = {
    ModelFamily("sdxl"): "detailpp.pipelines.sdxl:DetailPlusPlusPipeline",
    ModelFamily("sd"): "detailpp.pipelines.sd:DetailPlusPlusSDPipeline",
    ModelFamily("sdxl", True): "detailpp.pipelines.sdxl_controlnet:DetailPlusPlusControlNetPipeline",
    ModelFamily("flux"): "detailpp.pipelines.flux:DetailPlusPlusFluxPipeline",
    ModelFamily("sd3"): "detailpp.pipelines.sd3:DetailPlusPlusSD3Pipeline",
}


class ModelLoadError(DetailError, OSError):
    """The model could not be loaded; the message names it and the ways out."""


def pipeline_class_for(family: ModelFamily | None) -> type:
    """The Detail++ pipeline class of a model family (``None``: no ``model_index.json`` to tell, SDXL).

    Raises :class:`~detailpp.models.families.UnsupportedModelError` for a family without one (SD 1.x/2.x + ControlNet)
    or whose module is not installed.
    """
    family = ModelFamily("sdxl") if family is None else family
    if family not in FAMILY_PIPELINES:
        raise UnsupportedModelError(
            f"{family.label} has no Detail++ pipeline yet; Detail++ runs on "
            + ", ".join(f.label for f in FAMILY_PIPELINES)
            + "."
        )
    module_name, _, attribute = FAMILY_PIPELINES[family].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise UnsupportedModelError(
            f"{family.label} needs {module_name}.{attribute}, which this installation of detailpp does not have."
        ) from e
    return getattr(module, attribute)


def resolve_device(device: str | None) -> str:
    if device:
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """float16 on CUDA, float32 elsewhere, unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def toy_model_available() -> bool:
    return (TOY_MODEL_DIR / "model_index.json").is_file()


def packaged_tokenizers(folder: str | Path) -> dict:
    """``tokenizer=``/``tokenizer_2=`` for ``from_pretrained`` of a pipeline folder that ships no tokenizer (the
    embedded toy model, on SDXL's vocabulary): the package's one copy of SDXL's CLIP tokenizer files
    (:func:`~detailpp.resources.load_clip_tokenizer`); ``{}`` for a folder with its own ``tokenizer/``."""
    if (Path(folder) / "tokenizer").is_dir():
        return {}
    from detailpp.resources import load_clip_tokenizer

    return {"tokenizer": load_clip_tokenizer(), "tokenizer_2": load_clip_tokenizer(second=True)}


def model_detail_defaults(model: str, **hub_kwargs) -> dict:
    """The Detail++ settings a model recommends: its ``detail_config.json`` (``"toy"``, a local folder, or a Hub id's
    repo, fetched into the Hugging Face cache with ``hub_kwargs``: ``revision``, ``cache_dir``, ``token``,
    ``local_files_only``); ``{}`` for the other built-in models, single-file checkpoints and repos without the file
    or out of reach. Readable before loading (run identities, argument checks, the demo's controls). Raises
    :class:`~detailpp.config.ConfigError` when the file is found but holds bad fields."""
    from detailpp.hub import read_detail_defaults

    if model == "toy":
        return read_detail_defaults(TOY_MODEL_DIR)
    if model in BUILTIN_MODELS:
        return {}
    return read_detail_defaults(model, **hub_kwargs)


def load_pipeline(
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    pipeline_class: type | None = None,
    config: str | Path | None = None,
):
    """A ready-to-call Detail++ pipeline of the model's family (or ``pipeline_class``) on ``device``.

    Args:
        model: a built-in model (:data:`~detailpp.models.families.BUILTIN_MODELS`: ``"tiny-random"``,
            ``"tiny-random-sd15"``, ``"tiny-random-sd21"``, ``"tiny-random-flux"``, ``"tiny-random-sd3"``;
            ``"sdxl-random"``, ``"sd15-random"``, ``"flux-random"``, ``"sd35-random"``: full size, random weights;
            ``"toy"``), a local diffusers folder, a ``.safetensors`` single-file checkpoint in the original layout
            (SDXL, SD 1.x or 2.x, told from its keys; loaded offline with the package's configuration:
            :mod:`detailpp.models.single_file`; a pickle ``.ckpt`` is refused), or a Hub id (SDXL, SD 1.x/2.x,
            FLUX.1, SD3/3.5 or a fine-tune). A folder or Hub id gets its family's pipeline
            (:data:`FAMILY_PIPELINES`): ``DetailPlusPlusPipeline`` for SDXL, ``DetailPlusPlusSDPipeline`` for SD
            1.x/2.x...; an unsupported family (FLUX.2, Kandinsky...) raises
            :class:`~detailpp.models.families.UnsupportedModelError` before any weight loads.
        device: ``"cuda"``, ``"cpu"``, ``"mps"``...; the best available when ``None``.
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``; float16 on CUDA and float32 elsewhere when ``None``.
        pipeline_class: load with this class instead of the family's.
        config: for a single file only: the configuration to load it with instead of the package's (a diffusers
            folder or Hub id of the file's family).
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if is_single_file(Path(model).expanduser()):
        return _load_single_file(Path(model).expanduser(), pipeline_class, torch_dtype, config).to(device)
    if config is not None:
        raise SingleFileError(f"config= ({config}) applies to single-file checkpoints only; {model!r} is not one.")
    if model in BUILTIN_MODELS and model != "toy":
        return _load_builtin(model, pipeline_class or pipeline_class_for(BUILTIN_MODELS[model]), device, torch_dtype)
    source: str | Path = model
    if model == "toy":
        if not toy_model_available():
            raise ModelLoadError(
                f"The embedded toy model is not installed (no {TOY_MODEL_DIR / 'model_index.json'}); "
                "use --model tiny-random, or a Hub id or local SDXL folder."
            )
        source = TOY_MODEL_DIR
    path = Path(source)
    try:
        if pipeline_class is None:  # the family from model_index.json; refused here, before any weight loads
            pipeline_class = pipeline_class_for(BUILTIN_MODELS["toy"] if model == "toy" else model_family(source))
        if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
            raise FileNotFoundError(f"no folder {model!r} and it is no Hub id of the form 'owner/name'")
        variant = "fp16" if torch_dtype == torch.float16 and not path.exists() else None
        extra = packaged_tokenizers(path) if model == "toy" else {}
        try:
            pipe = pipeline_class.from_pretrained(str(source), variant=variant, **dtype_kwarg(torch_dtype), **extra)
        except (OSError, ValueError):
            if variant is None:
                raise
            pipe = pipeline_class.from_pretrained(str(source), **dtype_kwarg(torch_dtype), **extra)
    except Exception as e:  # every loader failure gets the same clear way out
        if isinstance(e, UnsupportedModelError) or type(e).__name__ == "DetailInputError":
            raise  # the model's family, the folder's detail_config.json: their own clear messages
        # diffusers' own message may point at a stack trace that is not shown: drop that sentence
        cause = str(e).splitlines()[0] if str(e) else ""
        cause = cause.replace(" Please check out the root cause in the stacktrace above.", "").rstrip(".")
        raise ModelLoadError(
            f"Cannot load the model {model!r}: {type(e).__name__}: {cause}. "
            "Give a local SDXL folder or checkpoint (--model PATH), a Hub id you can reach (with network access "
            "and, for gated models, `hf auth login`), or --model tiny-random to check the set-up without weights."
        ) from e
    return pipe.to(device)


def _load_single_file(path: Path, pipeline_class: type | None, torch_dtype: torch.dtype, config) -> Any:
    """A single-file checkpoint (:func:`detailpp.models.single_file.load_single_file`): its own refusals as they
    are, diffusers' failures as one :class:`ModelLoadError` that names the configuration it was loaded with."""
    from detailpp.models.single_file import layout_dir, load_single_file, read_kind

    kind = read_kind(path)
    pipeline_class = pipeline_class or pipeline_class_for(kind.family)
    try:
        return load_single_file(path, pipeline_class, torch_dtype, config, kind=kind)
    except DetailError:
        raise
    except Exception as e:
        cause = (str(e).strip().splitlines() or [""])[0]
        used = config if config is not None else f"the package's {kind.label} configuration ({layout_dir(kind)})"
        raise ModelLoadError(
            f"Cannot load the {kind.label} checkpoint {str(path)!r} with {used}: {type(e).__name__}: {cause}. If "
            "the file is a fine-tune of another layout, give its configuration with --config DIR|ID (config=)."
        ) from e


#: The tiny built-in models: their builder in :mod:`detailpp.models.tiny` and its fixed arguments.
_TINY_BUILDERS: dict[str, tuple[str, dict]] = {
    "tiny-random": ("build_tiny_pipeline", {}),
    "tiny-random-sd15": ("build_tiny_sd_pipeline", {"variant": "sd15"}),
    "tiny-random-sd21": ("build_tiny_sd_pipeline", {"variant": "sd21"}),
    "tiny-random-flux": ("build_tiny_flux_pipeline", {}),
    "tiny-random-sd3": ("build_tiny_sd3_pipeline", {}),
}
#: The full-size built-in models: their builder in :mod:`detailpp.models.full_size` and the model they stand in for.
_FULL_SIZE_BUILDERS: dict[str, tuple[str, str]] = {
    "sdxl-random": ("build_sdxl_random_pipeline", "SDXL"),
    "sd15-random": ("build_sd15_random_pipeline", "SD 1.5"),
    "flux-random": ("build_flux_random_pipeline", "FLUX.1-dev"),
    "sd35-random": ("build_sd35_random_pipeline", "SD3.5-large"),
}


def _load_builtin(model: str, pipeline_class: type, device: str, torch_dtype: torch.dtype):
    """A built-in model with random weights, built in code (no download)."""
    if model in _TINY_BUILDERS:
        from detailpp.models import tiny

        name, kwargs = _TINY_BUILDERS[model]
        return getattr(tiny, name)(pipeline_class=pipeline_class, dtype=torch_dtype, **kwargs).to(device)
    name, label = _FULL_SIZE_BUILDERS[model]
    logger.warning(
        "--model %s: full-size %s with RANDOM weights, a speed/memory stand-in; its images are noise and say nothing "
        "about quality.",
        model,
        label,
    )
    from detailpp.models import full_size

    return getattr(full_size, name)(pipeline_class=pipeline_class, device=device, dtype=torch_dtype)
