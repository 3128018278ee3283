"""Single-file checkpoints (one ``.safetensors`` in the original Stability layout, as model sites offer them), loaded
offline: the family is told from the file's keys, and the configuration comes from the package.

The package carries the configurations (JSON only; the tokenizers are the package's one copy of CLIP's vocabulary,
passed to diffusers as objects) of three layouts, in ``data/single-file/``:

=============  ============================================================================================
``sdxl-base``  ``stabilityai/stable-diffusion-xl-base-1.0`` (Euler, epsilon): SDXL and its fine-tunes
``sd15``       ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (PNDM, epsilon): SD 1.x and its fine-tunes
``sd21-v``     ``stabilityai/stable-diffusion-2-1`` (DDIM, v-prediction, 768 px): SD 2.x
=============  ============================================================================================

A file that says it is a v-prediction model (the ``v_pred`` key that such fine-tunes carry) gets a v-prediction
scheduler whatever its family; ``ztsnr`` adds zero-terminal-SNR rescaling. ``config=`` (``--config DIR|ID``) names
another configuration: a local diffusers folder or a Hub id (then fetched, unless offline). A pickle ``.ckpt`` is
refused: loading one runs whatever code it holds. Extensions are compared case-insensitively.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detailpp.errors import DetailError
from detailpp.models.families import ModelFamily, UnsupportedModelError, model_family
from detailpp.resources import DATA_DIR

logger = logging.getLogger(__name__)

#: The bundled configurations, one folder per layout.
LAYOUTS_DIR = DATA_DIR / "single-file"
SAFE_SUFFIXES = (".safetensors",)
#: Pickled checkpoints: refused (unpickling runs code).
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
#: How to turn a pickle checkpoint into a safetensors file (torch's weights-only unpickler, then safetensors).
CONVERT_COMMAND = (
    "python -c \"import torch, safetensors.torch as s; d = torch.load('model.ckpt', weights_only=True); "
    "d = d.get('state_dict', d); s.save_file({k: v.contiguous() for k, v in d.items() if torch.is_tensor(v)}, "
    "'model.safetensors')\""
)


class SingleFileError(DetailError, ValueError):
    """A single-file checkpoint that cannot be loaded as it is; the message names the file, the reason and the fix."""


@dataclass(frozen=True)
class CheckpointKind:
    """What a single file holds, read from its keys: its family, the bundled layout for it, its prediction type."""

    family: ModelFamily
    layout: str
    label: str
    v_prediction: bool = False
    zero_snr: bool = False


def is_single_file(path: str | os.PathLike) -> bool:
    """A file with a checkpoint's extension (any case): ``.safetensors``, or a pickle format (then refused)."""
    path = Path(path)
    return path.is_file() and path.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES


def looks_like_single_file(name: str) -> bool:
    """A name that ends like a checkpoint file (any case), whether it exists or not."""
    return name.lower().endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES)


def check_single_file(path: str | os.PathLike) -> None:
    """Refuse a pickle checkpoint (with the reason and the fix) or another kind of file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise SingleFileError(
            f"{path} is a pickle checkpoint ({path.suffix}): unpickling runs any code the file holds, so detailpp "
            "does not open it. Download the model's .safetensors version, or convert it where you trust the file: "
            f"{CONVERT_COMMAND}."
        )
    if suffix not in SAFE_SUFFIXES:
        raise SingleFileError(f"{path} is not a .safetensors checkpoint; give a .safetensors file or a folder.")


def _keys_and_shapes(path: Path) -> tuple[set[str], Any]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors' own error type: a file that is not safetensors, or cut short
        raise SingleFileError(f"{path} does not read as a .safetensors file ({e}); is it complete?") from e
    return set(handle.keys()), handle


def read_kind(path: str | os.PathLike) -> CheckpointKind:
    """The family and layout of an original-layout single file, from its keys (no weight is read but one shape)."""
    path = Path(path)
    check_single_file(path)
    keys, handle = _keys_and_shapes(path)
    only = "Detail++ reads single files of SDXL and SD 1.x/2.x only; give it as a diffusers folder or Hub id"
    if any(k.startswith(("joint_blocks.", "model.diffusion_model.joint_blocks.")) for k in keys):
        raise UnsupportedModelError(f"{path} is a Stable Diffusion 3 single file: {only} (SD3 runs experimentally).")
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        raise UnsupportedModelError(f"{path} is a FLUX single file: {only} (FLUX.1 runs experimentally).")
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise SingleFileError(
            f"{path} holds no UNet in the original layout (model.diffusion_model.*): it is no full SD/SDXL checkpoint "
            "(a LoRA goes to --lora; a diffusers folder is given as the folder)."
        )
    first = "model.diffusion_model.input_blocks.0.0.weight"
    if first in keys and handle.get_slice(first).get_shape()[1] != 4:
        raise UnsupportedModelError(f"{path} is an inpainting checkpoint (a 9-channel UNet): Detail++ generates.")
    v_pred, zero_snr = "v_pred" in keys, "ztsnr" in keys
    if "conditioner.embedders.1.model.positional_embedding" in keys:
        return CheckpointKind(ModelFamily("sdxl"), "sdxl-base", "Stable Diffusion XL", v_pred, zero_snr)
    if "conditioner.embedders.0.model.positional_embedding" in keys:
        raise UnsupportedModelError(f"{path} is an SDXL refiner (an image-to-image stage), not a base model.")
    if "cond_stage_model.model.token_embedding.weight" in keys:
        return CheckpointKind(ModelFamily("sd"), "sd21-v", "Stable Diffusion 2.x", True, zero_snr)
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return CheckpointKind(ModelFamily("sd"), "sd15", "Stable Diffusion 1.x", v_pred, zero_snr)
    raise SingleFileError(f"{path} has a UNet but no text encoder Detail++ knows (CLIP or OpenCLIP).")


def layout_dir(kind: CheckpointKind) -> Path:
    """The bundled configuration folder of a checkpoint's layout."""
    return LAYOUTS_DIR / kind.layout


def check_config(config: str | os.PathLike, kind: CheckpointKind) -> None:
    """A ``config=`` folder or Hub id for a single file: it exists, and is of the file's family."""
    name = os.fspath(config)
    if not os.path.isdir(name) and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        raise SingleFileError(f"--config {name!r}: no such folder, and no Hub id of the form 'owner/name'.")
    if os.path.isdir(name) and not (Path(name) / "model_index.json").is_file():
        raise SingleFileError(f"--config {name!r} holds no model_index.json: give a diffusers model folder.")
    family = model_family(name)
    if family is not None and family.name != kind.family.name:
        raise SingleFileError(
            f"--config {name} is a {family.label} configuration, but the file is a {kind.label} checkpoint; give a "
            "configuration of the file's family, or none (the package carries one)."
        )


@contextlib.contextmanager
def _lower_case_suffix(path: Path) -> Iterator[Path]:
    """``path``, or a link to it named ``*.safetensors``: diffusers reads other spellings as pickles."""
    if path.suffix == ".safetensors":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="detailpp-") as folder:
        link = Path(folder) / (path.stem + ".safetensors")
        try:
            link.symlink_to(path.resolve())
        except OSError as e:
            raise SingleFileError(
                f"{path}: rename it to {path.stem}.safetensors (lower case) to load it ({e})."
            ) from e
        yield link


def _components(kind: CheckpointKind, config_dir: str, local: bool) -> dict[str, Any]:
    """What diffusers is given besides the file: the packaged tokenizers when the configuration has none, and the
    scheduler the file asks for (``v_pred``, ``ztsnr``)."""
    from detailpp.resources import load_clip_tokenizer

    extra: dict[str, Any] = {}
    if not local or not (Path(config_dir) / "tokenizer").is_dir():
        second = kind.layout == "sd21-v"  # OpenCLIP's tokenizer pads with "!", as SDXL's second one
        extra["tokenizer"] = load_clip_tokenizer(second=second)
        if kind.family.name == "sdxl":
            extra["tokenizer_2"] = load_clip_tokenizer(second=True)
    if kind.v_prediction or kind.zero_snr:
        import diffusers

        index = diffusers.DiffusionPipeline.load_config(config_dir)
        scheduler_class = getattr(diffusers, index["scheduler"][1])
        changes = {"prediction_type": "v_prediction"} if kind.v_prediction else {}
        if kind.zero_snr:
            changes |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
            if "rescale_betas_zero_snr" not in inspect.signature(scheduler_class.__init__).parameters:
                logger.info("%s has no zero-terminal-SNR schedule: Euler is used", scheduler_class.__name__)
                scheduler_class = diffusers.EulerDiscreteScheduler
        config = scheduler_class.load_config(config_dir, subfolder="scheduler")
        extra["scheduler"] = scheduler_class.from_config(config, **changes)
    return extra


def load_single_file(
    path: str | os.PathLike,
    pipeline_class: type,
    torch_dtype: Any,
    config: Any = None,
    kind: CheckpointKind | None = None,
):
    """A ``pipeline_class`` from an original-layout ``.safetensors`` file, offline with the bundled configuration of
    its family (or ``config``: a diffusers folder or Hub id). ``kind``: :func:`read_kind`'s answer, when known. Raises
    :class:`SingleFileError` or :class:`UnsupportedModelError` with the reason; diffusers' own failures pass
    through."""
    from detailpp.hub import hub_offline
    from detailpp.pipelines.base import dtype_kwarg

    path = Path(path)
    kind = kind or read_kind(path)
    if config is not None:
        check_config(config, kind)
    config_dir = os.fspath(config) if config is not None else str(layout_dir(kind))
    local = os.path.isdir(config_dir)
    extra = _components(kind, config_dir, local)
    logger.info(
        "%s: a %s checkpoint%s; configuration: %s",
        path,
        kind.label,
        " (v-prediction)" if kind.v_prediction else "",
        config_dir if config is not None else f"the package's {kind.layout} layout",
    )
    with _lower_case_suffix(path) as readable:
        return pipeline_class.from_single_file(
            str(readable),
            config=config_dir,
            local_files_only=local or hub_offline(),
            **dtype_kwarg(torch_dtype),
            **extra,
        )
