"""The plan cache: a JSON Lines file of the plans a planner made, keyed by prompt, granularity, planner, model and the
planner's prompt version, so that a re-run reads its plans instead of asking the model again.

One line per plan, appended whole (one ``write`` of the full line, then ``fsync``): a run stopped half-way keeps every
plan made before, and a cut last line is skipped with a warning. Several threads (``decompose --file``) and several
processes (a sharded bench run) may append to the same file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: the file name of the cache in an output folder (``generate``) or a run folder (``bench generate``).
CACHE_FILE = "llm-plans.jsonl"


def cache_key(prompt: str, granularity: str, identity: Mapping[str, Any]) -> str:
    """The key of a plan: a hash of the prompt, the granularity and the planner's identity (planner, model and
    prompt version)."""
    text = json.dumps({"prompt": prompt, "granularity": granularity, **identity}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class PlanCache:
    """The plans of one JSON Lines file (``path=None``: in memory only), read once, appended to as they are made."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._entries: dict[str, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._entries is not None:
            return self._entries
        entries: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for n, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        entries[record["key"]] = record
                    except (json.JSONDecodeError, KeyError, TypeError):
                        logger.warning("%s, line %d: not a cached plan (cut short?); skipped", self.path, n)
        self._entries = entries
        return entries

    def get(self, key: str) -> dict[str, Any] | None:
        """The record stored under ``key`` (its ``"plan"`` is a plan dict), or ``None``."""
        with self._lock:
            return self._load().get(key)

    def put(self, key: str, record: Mapping[str, Any]) -> None:
        """Store ``record`` under ``key``, in memory and appended to the file."""
        record = {"key": key, **record}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._load()[key] = record
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a line cut short by a kill: start a new one
                    line = "\n" + line
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
