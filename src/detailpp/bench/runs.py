"""A run's items and what is done of them: the item list and seed schedule, the records that still match their
files, the merged manifest with every metric's scores, the progress bar and the summary both loops report.

Generation (:mod:`detailpp.bench.generation`) writes ``samples/<prompt>_<item:06d>.png`` (T2I-CompBench's naming) and
appends one manifest record per image to this process's part file; scoring (:mod:`detailpp.bench.scoring`) appends
one record per image to ``scores/<metric>.part-*.jsonl``. A rerun with the same settings skips every item whose record
is there *and* whose file is the one recorded (size and sha256); everything else is done again. At the end the
manifests are merged into ``manifest.jsonl`` (one record per item, sorted, with the scores of every metric attached
under ``"scores"``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from detailpp.bench import BenchError
from detailpp.bench.manifest import (
    MANIFEST,
    SAMPLES_DIR,
    SCORES_DIR,
    canonical_json,
    part_files,
    part_name,
    read_all,
    sample_name,
    verify_file,
    write_jsonl,
)
from detailpp.bench.sharding import Shard
from detailpp.bench.suites import BASE_SEED, seed_for_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One image to make: ``index = prompt_index * images_per_prompt + image_index``."""

    index: int
    prompt_index: int
    image_index: int
    prompt: str
    seed: int

    @property
    def file(self) -> str:
        return f"{SAMPLES_DIR}/{sample_name(self.prompt, self.index)}"


def plan_items(prompts: Sequence[str], images_per_prompt: int, base_seed: int = BASE_SEED) -> list[Item]:
    if images_per_prompt < 1:
        raise BenchError(f"--images-per-prompt must be at least 1, got {images_per_prompt}.")
    return [
        Item(p * images_per_prompt + k, p, k, prompt, seed_for_image(k, base_seed))
        for p, prompt in enumerate(prompts)
        for k in range(images_per_prompt)
    ]


# --- reading what is done --------------------------------------------------------------------------------------------
def valid_records(
    out: Path,
    stem: str,
    folder: Path | None = None,
    accept: Callable[[dict], bool] | None = None,
    full_check: Callable[[int], bool] = lambda item: False,
    file_of: Callable[[dict], str] | None = None,
) -> dict[int, dict]:
    """The last record of each item whose file is the one it describes (size always, sha256 where ``full_check``)."""
    folder = folder or out
    file_of = file_of or (lambda r: r["file"])
    by_item: dict[int, list[dict]] = {}
    for r in read_all(folder, stem):
        if isinstance(r.get("item"), int) and (accept is None or accept(r)):
            by_item.setdefault(r["item"], []).append(r)
    valid: dict[int, dict] = {}
    for item, candidates in by_item.items():
        problem = None
        for r in reversed(candidates):
            try:
                problem = verify_file(out / file_of(r), r.get("bytes"), r.get("sha256"), full=full_check(item))
            except (KeyError, TypeError):
                problem = "record without a file"
            if problem is None:
                valid[item] = r
                break
        else:
            logger.warning(
                "%s: item %d is recorded but its file %s is %s; it will be done again.",
                stem,
                item,
                candidates[-1].get("file"),
                problem,
            )
    return valid


def current_metric_configs(out: Path) -> dict[str, dict]:
    configs = {}
    for path in sorted((out / SCORES_DIR).glob("*.config.json")):
        try:
            configs[path.name[: -len(".config.json")]] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            logger.warning("%s is unreadable; its scores are left out.", path)
    return configs


def load_scores(out: Path, metric: str, config: dict | None = None) -> dict[int, dict]:
    """The valid score records of ``metric`` (computed with ``config``, default: the folder's current one)."""
    if config is None:
        config = current_metric_configs(out).get(metric)
        if config is None:
            return {}
    wanted = canonical_json(config)
    return valid_records(
        out, metric, folder=out / SCORES_DIR, accept=lambda r: canonical_json(r.get("metric_config")) == wanted
    )


def merge_manifest(out: str | Path) -> list[dict]:
    """Rewrite ``manifest.jsonl``: one valid record per item, sorted, with every metric's score attached."""
    out = Path(out)
    records = valid_records(out, "manifest")
    scores = {m: load_scores(out, m, c) for m, c in current_metric_configs(out).items()}
    merged = []
    for item in sorted(records):
        r = {k: v for k, v in records[item].items() if k != "scores"}
        attached = {
            m: s[item]["score"] for m, s in scores.items() if item in s and s[item].get("sha256") == r.get("sha256")
        }
        if attached:
            r["scores"] = attached
        merged.append(r)
    write_jsonl(out / MANIFEST, merged)
    return merged


def load_manifest(out: str | Path) -> list[dict]:
    """The valid generation records of a folder, sorted by item (parts included, files size-checked)."""
    out = Path(out)
    records = valid_records(out, "manifest")
    return [records[i] for i in sorted(records)]


def foreign_samples(out: Path, records: Iterable[dict]) -> list[str]:
    """Files in ``samples/`` that no valid record names (T2I-CompBench's own scripts would read them too)."""
    known = {Path(r["file"]).name for r in records}
    folder = out / SAMPLES_DIR
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in known and ".tmp-" not in p.name)


# --- progress --------------------------------------------------------------------------------------------------------
class Progress:
    """A bar over the whole suite on the main process, counting the lines the other processes append."""

    def __init__(self, enabled: bool, total: int, initial: int, watch: Sequence[Path], desc: str):
        self.bar = None
        self.watch = {p: (p.stat().st_size if p.exists() else 0) for p in watch}
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="img", dynamic_ncols=True)

    def _others(self) -> int:
        new = 0
        for path, offset in self.watch.items():
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except FileNotFoundError:
                continue
            lines = chunk.count(b"\n")
            if lines:
                new += lines
                self.watch[path] = offset + chunk.rfind(b"\n") + 1
        return new

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1 + self._others())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def other_parts(folder: Path, stem: str, shard: Shard) -> list[Path]:
    if shard.launcher != "distributed":
        return []
    return [folder / part_name(stem, r, shard.count) for r in range(shard.count) if r != shard.index]


# --- generation ------------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    done_before: int = 0
    made: int = 0
    total: int = 0
    complete: bool = False
    seconds: float = 0.0
    merged: bool = False
    extra: dict = field(default_factory=dict)


def remove_parts(folder: Path, stem: str) -> None:  # pragma: no cover - maintenance helper
    for p in part_files(folder, stem):
        p.unlink()
