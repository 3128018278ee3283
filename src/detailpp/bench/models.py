"""Loading the scoring models: Hub ids by default, local folders accepted, one clear message when it fails."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from detailpp.bench import BenchError

logger = logging.getLogger(__name__)
T = TypeVar("T")


def looks_like_path(name: str) -> bool:
    """True for what can only be a local path (a Hub id is ``name`` or ``owner/name``)."""
    return (
        name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1 or name in (".", "..")
    )


def resolve_source(name: str, what: str, flag: str) -> str:
    """``name`` as a local folder when one exists there, else as a Hub id; a path that does not exist is an error."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BenchError(f"The {what} model {name!r} is a file; give {flag} the folder that holds config.json.")
        return str(path)
    if looks_like_path(name):
        raise BenchError(
            f"The {what} model folder {name!r} does not exist; give {flag} an existing folder or a Hub id."
        )
    return name


def load_model(what: str, name: str, flag: str, loader: Callable[[str], T]) -> T:
    """``loader(source)`` with any failure turned into a :class:`BenchError` that says what to do."""
    source = resolve_source(name, what, flag)
    if not os.path.isdir(source):
        from detailpp.hub import check_hub_reachable

        check_hub_reachable(source, f"{flag} (the {what} model)", "config.json")
    try:
        return loader(source)
    except BenchError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, HTTP errors, ... depending on the failure
        offline = " (this machine may have no network: download the model elsewhere and pass its folder)"
        where = "local folder" if os.path.isdir(source) else "Hub id"
        raise BenchError(
            f"Cannot load the {what} model from the {where} {name!r}: {type(e).__name__}: {str(e).strip()[:300]}. "
            f"Give {flag} a Hub id or a folder written by save_pretrained(){'' if os.path.isdir(source) else offline}."
        ) from e


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
