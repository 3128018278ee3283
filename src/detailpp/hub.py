"""Files a model keeps beside its weights, read before anything loads: ``model_index.json`` (which family it is) and
``detail_config.json`` (the Detail++ settings it recommends), from a local folder or a Hub repo (fetched into the
Hugging Face cache).

Below the pipelines and the model registry: a pipeline's ``from_pretrained`` reads the recommended settings, and
:mod:`detailpp.models` tells a model's family before it builds the pipeline.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from detailpp.config import DETAIL_DEFAULTS_FILE, ConfigError, check_detail_fields
from detailpp.errors import DetailError

logger = logging.getLogger(__name__)


def hub_misses() -> tuple[type[BaseException], ...]:
    """What ``hf_hub_download`` raises when a repo has no such file or cannot be reached (huggingface_hub 0.x-2.x)."""
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    misses: tuple[type[BaseException], ...] = (EntryNotFoundError, HFValidationError, OSError)
    for module in ("httpx", "httpx2"):  # huggingface_hub >= 1 reports network errors as httpx's (not OSErrors)
        try:
            misses += (importlib.import_module(module).HTTPError,)
        except (ImportError, AttributeError):
            pass
    return misses  # RepositoryNotFoundError, LocalEntryNotFoundError, requests' errors... are OSErrors


class HubUnreachableError(DetailError, OSError):
    """A Hub id was given, the Hub cannot be reached and offline mode is off; the message says how to go on."""


def hub_offline() -> bool:
    """Whether offline mode is on (``HF_HUB_OFFLINE``, read now as well as at huggingface_hub's import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


@functools.lru_cache(maxsize=4)
def _probe(endpoint: str, timeout: float) -> str | None:
    """One request to the Hub without retries: ``None`` when anything answers, else why not (once per process)."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=timeout, follow_redirects=False)
    except Exception as e:  # httpx's ConnectError, TimeoutException...; OSError; whatever the client raises
        return f"{type(e).__name__}: {str(e).strip() or 'no answer'}"
    return None


def hub_unreachable_reason(timeout: float = 5.0) -> str | None:
    """Why the Hub cannot be reached, or ``None`` (also in offline mode, where it is never asked). One quick request
    per process, instead of huggingface_hub's retries (about 25 s a file when the name does not resolve)."""
    if hub_offline():
        return None
    from huggingface_hub import constants

    return _probe(constants.ENDPOINT, timeout)


def check_hub_reachable(repo_id: str, what: str, cached_file: str = "model_index.json") -> None:
    """Fail fast, in one line, when ``repo_id`` would be fetched from a Hub that cannot be reached: the fix is
    ``HF_HUB_OFFLINE=1`` (the cache) or a local folder. Nothing happens offline or when the Hub answers."""
    reason = hub_unreachable_reason()
    if reason is None:
        return
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo_id, cached_file), str)
    fix = (
        "it is in your Hugging Face cache: run with HF_HUB_OFFLINE=1 to use the cached copy"
        if cached
        else "run with HF_HUB_OFFLINE=1 to use only the Hugging Face cache, connect to the network, or give a local "
        "folder"
    )
    raise HubUnreachableError(
        f"{what} {repo_id}: the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached ({reason}); {fix}."
    )


def detail_defaults_path(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: bool | str | None = None,
    local_files_only: bool = False,
) -> Path | None:
    """Where ``model``'s :data:`DETAIL_DEFAULTS_FILE` is, or ``None`` when it has none.

    A local folder: the file in it, if there. A Hub id (a string that names no local path): the file fetched into the
    Hugging Face cache with ``hf_hub_download`` and the given ``revision``, ``cache_dir``, ``token`` and
    ``local_files_only`` (``HF_HUB_OFFLINE`` is honoured too); a repo without the file, one that does not exist or
    cannot be reached (offline, network errors) gives ``None``, logged at debug level. Anything else (a single-file
    checkpoint, a missing local path) gives ``None``.
    """
    name = os.fspath(model)
    if os.path.isdir(name):
        path = Path(name) / DETAIL_DEFAULTS_FILE
        return path if path.is_file() else None
    if not isinstance(model, str) or os.path.exists(name):
        return None
    from huggingface_hub import hf_hub_download

    try:
        fetched = hf_hub_download(
            name,
            DETAIL_DEFAULTS_FILE,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
    except hub_misses() as e:
        logger.debug("no %s for %r on the Hub: %s: %s", DETAIL_DEFAULTS_FILE, name, type(e).__name__, e)
        return None
    return Path(fetched)


def read_detail_defaults(model: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any]:
    """The DetailConfig fields a model recommends (its :data:`DETAIL_DEFAULTS_FILE`), ``{}`` if it has none.

    ``model`` is a local folder or a Hub id; ``hub_kwargs`` (``revision``, ``cache_dir``, ``token``,
    ``local_files_only``) say how to fetch a Hub id's file (see :func:`detail_defaults_path`). Raises
    :class:`ConfigError` naming the file when it is found but unreadable or holds fields DetailConfig rejects.
    """
    path = detail_defaults_path(model, **hub_kwargs)
    if path is None:
        return {}
    source = (
        str(path) if os.path.isdir(os.fspath(model)) else f"{path} (the Hub repo {model}'s {DETAIL_DEFAULTS_FILE})"
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"Cannot read the model's Detail++ settings {source}: {e}. Fix or delete the file.") from e
    check_detail_fields(data, source)
    return data


class ModelFileError(DetailError, ValueError):
    """A file of a model folder (``model_index.json``...) that cannot be read; the message names it."""


def read_json_file(path: Path, what: str) -> Any:
    """The JSON in ``path``; :class:`ModelFileError` naming the file (and the place in it) when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path} ({what}) is not valid JSON: {e}. Fix the file, or give another model.") from e


def read_model_index(model: str | os.PathLike, **hub_kwargs: Any) -> dict | None:
    """The model's ``model_index.json`` (a local folder's, or a Hub repo's fetched into the cache), or ``None``."""
    name = os.fspath(model)
    if os.path.isdir(name):
        path = Path(name) / "model_index.json"
        return read_json_file(path, "the model's index") if path.is_file() else None
    if os.path.exists(name):  # a single-file checkpoint: no index
        return None
    from huggingface_hub import hf_hub_download

    try:
        fetched = Path(hf_hub_download(name, "model_index.json", **hub_kwargs))
    except hub_misses():
        return None
    return read_json_file(fetched, f"the Hub repo {name}'s model index")
