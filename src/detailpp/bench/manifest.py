"""Manifests (JSON Lines), atomic file writes, and what a killed run leaves behind.

A benchmark folder holds::

    run.json                              what was generated (suite, method, model, settings): fixed for the folder
    samples/<prompt>_<item:06d>.png       the images, T2I-CompBench's own naming (its scripts read this folder as is)
    manifest.jsonl                        the merged manifest: one record per image, sorted by item
    manifest.part-<rank>-of-<n>.jsonl     what each process appended (merged into manifest.jsonl at the end)
    scores/<metric>.config.json           the settings a metric was computed with
    scores/<metric>.part-<rank>-of-<n>.jsonl, scores/<metric>.jsonl   the same pattern for scores

Safety rules: an image is written to a temporary file in the same folder, flushed to disk and renamed over its final
name, so a kill leaves either the old file, the new one, or a stray temporary file (removed on the next run), never a
half-written image. A manifest record is appended as one ``write`` of one line after its image is in place; a line cut
by a kill (no final newline, or not JSON) is detected on the next start, dropped with a warning and trimmed from the
part file, and its item is generated again. Each process appends only to its own part file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from detailpp.atomic import TMP_MARK as _TMP_MARK
from detailpp.atomic import atomic_write_text
from detailpp.bench import BenchError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"
SAMPLES_DIR = "samples"
SCORES_DIR = "scores"
#: Keys of a record that legitimately differ between two runs of the same item (who made it, how long it took).
VOLATILE_KEYS: tuple[str, ...] = ("timings", "worker")


def remove_stale_temporaries(folder: Path, names: Iterable[str]) -> int:
    """Delete the temporary files a killed writer left for the final ``names`` in ``folder``; returns how many."""
    count = 0
    for name in names:
        for tmp in folder.glob(f".{glob_escape(name)}{_TMP_MARK}*"):
            try:
                tmp.unlink()
                count += 1
            except OSError:  # pragma: no cover - another process removed it first
                pass
    return count


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- JSON Lines ------------------------------------------------------------------------------------------------------
def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def read_jsonl(path: str | Path, repair: bool = False) -> list[dict]:
    """The records of a JSON Lines file; a line cut by a kill or not a JSON object is dropped with a warning.

    With ``repair=True`` (only for a file this process owns) a cut last line is also trimmed from the file, so the next
    append starts on a fresh line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records: list[dict] = []
    good_end = 0
    pos = 0
    number = 0
    while pos < len(data):
        number += 1
        end = data.find(b"\n", pos)
        if end < 0:
            logger.warning(
                "%s: line %d was cut before its end (a process was killed while writing it); it is dropped and its "
                "item will be done again.",
                path,
                number,
            )
            break
        line = data[pos:end]
        pos = end + 1
        if not line.strip():
            good_end = pos
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict):
            logger.warning("%s: line %d is not a JSON object; it is dropped.", path, number)
        else:
            records.append(record)
        good_end = pos
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return records


class JsonlAppender:
    """Appends records to a JSON Lines file this process owns, one ``write`` per line, flushed to disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        read_jsonl(self.path, repair=True)  # trim a line a killed predecessor left cut

    def append(self, record: dict) -> None:
        line = (canonical_json(record) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):  # pragma: no cover - a full disk
                raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Replace ``path`` atomically with ``records``, one a line."""
    atomic_write_text(path, "".join(canonical_json(r) + "\n" for r in records))


# --- part files ------------------------------------------------------------------------------------------------------
def part_name(stem: str, rank: int, num_shards: int) -> str:
    return f"{stem}.part-{rank:03d}-of-{num_shards:03d}.jsonl"


def part_files(folder: Path, stem: str) -> list[Path]:
    return sorted(folder.glob(f"{glob_escape(stem)}.part-*-of-*.jsonl"))


def read_all(folder: Path, stem: str) -> Iterator[dict]:
    """The records of ``<stem>.jsonl`` then of every part file, in that order (later records win on merging)."""
    yield from read_jsonl(folder / f"{stem}.jsonl")
    for part in part_files(folder, stem):
        yield from read_jsonl(part)


def strip_volatile(record: dict) -> dict:
    """``record`` without :data:`VOLATILE_KEYS` (for comparing runs made by different processes)."""
    return {k: v for k, v in record.items() if k not in VOLATILE_KEYS}


# --- run.json --------------------------------------------------------------------------------------------------------
def check_or_write_json(path: Path, content: dict, what: str, hint: str, write: bool = True) -> None:
    """Check that ``path`` says the same as ``content`` (resuming a run), or, when there is no such file and
    ``write``, write it. A difference is refused with every differing setting named (``settings.steps: 20 there, 50
    now``)."""
    if path.exists():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise BenchError(f"{path} is unreadable ({e}); it records {what}. Move it away to start afresh.") from e
        if canonical_json(existing) != canonical_json(content):
            content = json.loads(canonical_json(content))  # tuples as the lists JSON reads back: only real changes
            diffs = differences(existing, content)
            details = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diffs[:4])
            more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
            raise BenchError(f"{path.parent} holds {what} made with other settings ({details}{more}). {hint}")
        return
    if write:
        atomic_write_text(path, json.dumps(content, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


_ABSENT = object()


def differences(before: Any, after: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, value before, value after)`` for every leaf that differs between two JSON objects, sorted;
    a key only one side has shows ``None`` on the other."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after)):
            a, b = before.get(key, _ABSENT), after.get(key, _ABSENT)
            if a is _ABSENT or b is _ABSENT:
                out.append((f"{prefix}{key}", None if a is _ABSENT else a, None if b is _ABSENT else b))
            else:
                out += differences(a, b, f"{prefix}{key}.")
        return out
    return [] if before == after else [(prefix.rstrip("."), before, after)]


def load_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BenchError(f"{path.parent} has no {path.name}; is it a folder made by `detailpp bench generate`?") from e
    except (OSError, json.JSONDecodeError) as e:
        raise BenchError(f"{path} ({what}) is unreadable: {e}.") from e


# --- images ----------------------------------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^\w ,.'()&+-]")


def sample_name(prompt: str, item: int) -> str:
    """T2I-CompBench's file name ``<prompt>_<item:06d>.png``, made safe for any file system.

    Characters outside letters, digits, spaces and ``,.'()&+-`` become ``-``; an underscore (T2I-CompBench splits the
    name at ``_``) becomes a space; the prompt part is cut to 150 characters. Packaged prompts are unchanged.
    """
    safe = _UNSAFE.sub("-", prompt.replace("_", " ")).strip(" .") or "prompt"
    return f"{safe[:150]}_{item:06d}.png"


def verify_file(path: Path, size: int | None, sha256: str | None, full: bool = True) -> str | None:
    """``None`` when the file at ``path`` is the one a record describes, else why not."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    if size is not None and st.st_size != size:
        return f"{st.st_size} bytes instead of {size} (truncated or replaced)"
    if full and sha256 is not None and sha256_file(path) != sha256:
        return "content differs from the recorded sha256 (replaced or corrupted)"
    return None
