"""The generation and scoring loops: sharded by item index, resumable, nothing lost or duplicated.

Generation writes ``samples/<prompt>_<item:06d>.png`` (T2I-CompBench's naming) and appends one manifest record per
image to this process's part file; scoring appends one record per image to ``scores/<metric>.part-*.jsonl``. A rerun
with the same settings skips every item whose record is there *and* whose file is the one recorded (size and sha256);
everything else is done again. At the end the manifests are merged into ``manifest.jsonl`` (one record per item,
sorted, with the scores of every metric attached under ``"scores"``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detailpp.atomic import atomic_write_bytes
from detailpp.bench import BenchError
from detailpp.bench.manifest import (
    MANIFEST,
    RUN_FILE,
    SAMPLES_DIR,
    SCORES_DIR,
    JsonlAppender,
    canonical_json,
    check_or_write_json,
    load_json,
    part_files,
    part_name,
    read_all,
    remove_stale_temporaries,
    sample_name,
    verify_file,
    write_jsonl,
)
from detailpp.bench.sharding import Shard
from detailpp.bench.suites import BASE_SEED, Suite, seed_for_image

logger = logging.getLogger(__name__)

GenerateFn = Callable[[str, int], Any]
FORMAT_VERSION = 1


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


def run_identity(
    suite: Suite,
    method: str,
    model: str,
    settings: dict,
    images_per_prompt: int,
    base_seed: int = BASE_SEED,
    detail_config: dict | None = None,
    label: str | None = None,
    plans: str | None = None,
) -> dict:
    """What ``run.json`` records: everything an image depends on (not the device, not the number of processes).

    ``plans``: where Detail++'s plans come from when not from the spaCy parser (``"file"``: ``--plans``; the plans
    themselves are kept in the folder's ``plans.jsonl``); absent from ``run.json`` otherwise.
    """
    identity = {
        "format": FORMAT_VERSION,
        "suite": suite.name,
        "suite_source": suite.source,
        "suite_fingerprint": suite.fingerprint,
        "num_prompts": len(suite.prompts),
        "images_per_prompt": images_per_prompt,
        "base_seed": base_seed,
        "seed_schedule": "image k of every prompt: seed base_seed + k (T2I-CompBench: 42, then 42 + n + 1)",
        "method": method,
        "label": label or method,
        "model": model,
        "settings": settings,
        "detail_config": detail_config,
    }
    if plans is not None:
        identity["plans"] = plans
    return identity


def _worker(shard: Shard) -> dict:
    return {
        "rank": shard.index,
        "num_shards": shard.count,
        "launcher": shard.launcher,
        "device": shard.device,
        "host": platform.node(),
        "pid": os.getpid(),
    }


def encode_png(image: Any, item: Item, identity: dict) -> bytes:
    """PNG bytes with the generation parameters (A1111 ``parameters`` text + ``detailpp`` JSON); no timestamps."""
    from PIL.PngImagePlugin import PngInfo

    s = identity.get("settings", {})
    params = (
        f"{item.prompt}\nSteps: {s.get('steps')}, CFG scale: {s.get('guidance_scale')}, Seed: {item.seed}, "
        f"Size: {s.get('width')}x{s.get('height')}, Model: {identity.get('model')}, "
        f"Method: {identity.get('method')}"
    )
    info = PngInfo()
    info.add_text("parameters", params)
    info.add_text(
        "detailpp",
        canonical_json(
            {
                "prompt": item.prompt,
                "seed": item.seed,
                "item": item.index,
                "method": identity.get("method"),
                "model": identity.get("model"),
                "settings": s,
                "detail_config": identity.get("detail_config"),
            }
        ),
    )
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


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


def _current_metric_configs(out: Path) -> dict[str, dict]:
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
        config = _current_metric_configs(out).get(metric)
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
    scores = {m: load_scores(out, m, c) for m, c in _current_metric_configs(out).items()}
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
class _Progress:
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


def _other_parts(folder: Path, stem: str, shard: Shard) -> list[Path]:
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


def check_run_identity(out_dir: str | Path, identity: dict) -> None:
    """Write ``identity`` to the run folder's ``run.json``, or check it against the one there (creates the folder)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_or_write_json(
        out / RUN_FILE, identity, "images", "Use another --output-dir folder, or the same settings to resume the run."
    )


def run_generation(
    out_dir: str | Path,
    suite: Suite,
    identity: dict,
    generate_fn: GenerateFn,
    *,
    max_prompts: int | None = None,
    shard: Shard | None = None,
    progress: bool = True,
    prepare: Callable[[], Any] | None = None,
) -> Summary:
    """Generate the suite's images into ``out_dir`` (the shard's share), resuming whatever is already done.

    ``generate_fn(prompt, seed)`` returns a PIL image; ``identity`` comes from :func:`run_identity` and is checked
    against the folder's ``run.json`` (a folder holds one method with one set of settings). ``prepare()`` (loading
    the model) runs once before this process's first image, and not at all when nothing is left to do; its time is
    kept apart (``summary.extra["load_s"]`` and ``timings.load_s`` of this process's first record), so
    ``summary.seconds`` and every ``generate_s`` count generation only.
    """
    shard = shard or Shard()
    out = Path(out_dir)
    (out / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    check_run_identity(out, identity)
    prompts = suite.prompts[:max_prompts] if max_prompts else suite.prompts
    items = plan_items(prompts, identity["images_per_prompt"], identity["base_seed"])
    done, todo = _generation_todo(out, items, shard)
    summary = Summary(done_before=sum(1 for it in items if it.index in done), total=len(items))
    logger.info(
        "%s: %d of %d images already done; this process (shard %d of %d) makes %d.",
        out,
        summary.done_before,
        len(items),
        shard.index,
        shard.count,
        len(todo),
    )
    part = JsonlAppender(out / part_name("manifest", shard.index, shard.count))
    bar = _generation_bar(out, items, todo, shard, summary, f"{identity.get('label')} {suite.name}", progress)
    try:
        load = _prepare(prepare, todo, summary)
        start = time.perf_counter()
        _generate_items(out, todo, identity, generate_fn, part, _worker(shard), summary, bar, load)
        summary.seconds = time.perf_counter() - start
    finally:
        bar.close()
    shard.wait()
    _finish(out, "manifest", items, shard, summary)
    return summary


def _generation_todo(out: Path, items: Sequence[Item], shard: Shard) -> tuple[dict[int, dict], list[Item]]:
    """The valid records of ``items`` already made, and this shard's items still to make (their stale temporaries
    removed)."""
    by_index = {it.index: it for it in items}

    def matches(r: dict) -> bool:
        it = by_index.get(r.get("item"))
        return it is None or (r.get("prompt") == it.prompt and r.get("seed") == it.seed and r.get("file") == it.file)

    done = valid_records(out, "manifest", accept=matches, full_check=shard.owns)
    todo = [it for it in items if shard.owns(it.index) and it.index not in done]
    removed = remove_stale_temporaries(out / SAMPLES_DIR, (Path(it.file).name for it in todo))
    if removed:
        logger.info("removed %d temporary file(s) a killed run left in %s", removed, out / SAMPLES_DIR)
    return done, todo


def _generation_bar(
    out: Path, items: Sequence[Item], todo: Sequence[Item], shard: Shard, summary: Summary, desc: str, enabled: bool
) -> _Progress:
    """The suite-wide bar (the main process of a distributed run), or this shard's own (manually scheduled shards)."""
    manual = shard.launcher == "manual"
    total = sum(1 for it in items if shard.owns(it.index)) if manual else len(items)
    initial = total - len(todo) if manual else summary.done_before
    return _Progress(enabled and (shard.is_main or manual), total, initial, _other_parts(out, "manifest", shard), desc)


def _prepare(prepare: Callable[[], Any] | None, todo: Sequence[Item], summary: Summary) -> dict[str, float]:
    """Run ``prepare()`` when there is something to make; its time (``{"load_s": ...}``, or nothing)."""
    if not todo or prepare is None:
        return {}
    t0 = time.perf_counter()
    prepare()
    load = {"load_s": round(time.perf_counter() - t0, 4)}
    summary.extra.update(load)
    return load


def _generate_items(
    out: Path,
    todo: Sequence[Item],
    identity: dict,
    generate_fn: GenerateFn,
    part: JsonlAppender,
    worker: dict,
    summary: Summary,
    bar: _Progress,
    load: dict[str, float],
) -> None:
    """Make, write and record each item of ``todo`` (the load time goes into the first record only)."""
    for it in todo:
        t0 = time.perf_counter()
        image = generate_fn(it.prompt, it.seed)
        t1 = time.perf_counter()
        data = encode_png(image, it, identity)
        atomic_write_bytes(out / it.file, data)
        t2 = time.perf_counter()
        timings = {"generate_s": round(t1 - t0, 4), "write_s": round(t2 - t1, 4), **load}
        part.append(_generation_record(it, identity, image, data, timings, worker))
        load = {}
        summary.made += 1
        bar.step()


def _generation_record(it: Item, identity: dict, image: Any, data: bytes, timings: dict, worker: dict) -> dict:
    """The manifest record of one written image."""
    return {
        "item": it.index,
        "prompt_index": it.prompt_index,
        "image_index": it.image_index,
        "prompt": it.prompt,
        "seed": it.seed,
        "method": identity["method"],
        "model": identity["model"],
        "config": {**identity["settings"], "detail_config": identity.get("detail_config")},
        "file": it.file,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": image.width,
        "height": image.height,
        "timings": timings,
        "worker": worker,
    }


def _finish(out: Path, stem: str, items: Sequence[Item], shard: Shard, summary: Summary) -> None:
    """Merge on the main process (or, for manually scheduled shards, on whichever finds the suite complete)."""
    if shard.launcher == "manual" or shard.is_main:
        records = valid_records(out, "manifest")
        summary.complete = all(it.index in records for it in items)
        if shard.launcher != "manual" or summary.complete:
            merged = merge_manifest(out)
            summary.merged = True
            foreign = foreign_samples(out, merged)
            if foreign:
                logger.warning(
                    "%d file(s) in %s are not in the manifest (e.g. %s); detailpp ignores them, "
                    "T2I-CompBench's own scripts would not.",
                    len(foreign),
                    out / SAMPLES_DIR,
                    ", ".join(foreign[:3]),
                )
        if not summary.complete:
            logger.info(
                "%s: %d of %d images done so far (other shards may still be running).",
                out,
                sum(1 for it in items if it.index in records),
                len(items),
            )


# --- scoring ---------------------------------------------------------------------------------------------------------
def run_scoring(
    out_dir: str | Path,
    metric: Any,
    *,
    shard: Shard | None = None,
    batch_size: int = 8,
    rescore: bool = False,
    progress: bool = True,
) -> Summary:
    """Score the folder's images with ``metric`` (:class:`detailpp.bench.metrics.Metric`), resuming what is done."""
    shard = shard or Shard()
    out = Path(out_dir)
    records = _scoring_records(out, metric)
    scores_dir = out / SCORES_DIR
    _check_metric_config(scores_dir, metric, shard, rescore)
    done = load_scores(out, metric.name, metric.config)

    def is_scored(r: dict) -> bool:  # scored, and the image is still the one that was scored
        return r["item"] in done and done[r["item"]].get("sha256") == r["sha256"]

    todo = [r for r in records if shard.owns(r["item"]) and not is_scored(r)]
    summary = Summary(done_before=sum(1 for r in records if is_scored(r)), total=len(records))
    logger.info(
        "%s: %s already scored for %d of %d images; this process scores %d.",
        out,
        metric.name,
        summary.done_before,
        len(records),
        len(todo),
    )
    start = time.perf_counter()
    if todo:
        scorer = metric.load()
        part = JsonlAppender(scores_dir / part_name(metric.name, shard.index, shard.count))
        manual = shard.launcher == "manual"
        bar = _Progress(
            progress and (shard.is_main or manual),
            len(todo) if manual else len(records),
            0 if manual else summary.done_before,
            _other_parts(scores_dir, metric.name, shard),
            metric.name,
        )
        try:
            _score_items(out, todo, metric, scorer, part, _worker(shard), batch_size, summary, bar)
        finally:
            bar.close()
    summary.seconds = time.perf_counter() - start
    shard.wait()
    _finish_scoring(out, metric, records, shard, summary)
    return summary


def _scoring_records(out: Path, metric: Any) -> list[dict]:
    """The folder's generation records, checked: a run folder with images, prompts the metric can score."""
    load_json(out / RUN_FILE, "the run's settings")
    records = load_manifest(out)
    if not records:
        raise BenchError(f"{out} has no generated image yet; run `detailpp bench generate` first.")
    metric.check_prompts(sorted({r["prompt"] for r in records}))
    return records


def _check_metric_config(scores_dir: Path, metric: Any, shard: Shard, rescore: bool) -> None:
    """Write the metric's settings beside its scores, or check them against those there (``rescore``: replace)."""
    config_path = scores_dir / f"{metric.name}.config.json"
    scores_dir.mkdir(parents=True, exist_ok=True)
    if rescore and shard.is_main and config_path.exists():
        config_path.unlink()
    shard.wait()
    check_or_write_json(
        config_path,
        metric.config,
        f"{metric.name} scores",
        "Pass the same settings to resume, or --rescore to score again with the new ones.",
    )


def _score_items(
    out: Path,
    todo: Sequence[dict],
    metric: Any,
    scorer: Any,
    part: JsonlAppender,
    worker: dict,
    batch_size: int,
    summary: Summary,
    bar: _Progress,
) -> None:
    """Score ``todo`` in batches of ``batch_size``, one record per image appended to ``part``."""
    for k in range(0, len(todo), batch_size):
        batch = todo[k : k + batch_size]
        images = _read_images(out, batch)
        t0 = time.perf_counter()
        results = scorer.score(images, [r["prompt"] for r in batch])
        dt = (time.perf_counter() - t0) / len(batch)
        for r, (value, details) in zip(batch, results, strict=True):
            part.append(
                {
                    "item": r["item"],
                    "prompt": r["prompt"],
                    "file": r["file"],
                    "sha256": r["sha256"],
                    "metric": metric.name,
                    "score": value,
                    "details": details,
                    "metric_config": metric.config,
                    "timings": {"score_s": round(dt, 4)},
                    "worker": worker,
                }
            )
            summary.made += 1
            bar.step()


def _read_images(out: Path, batch: Sequence[dict]) -> list[Any]:
    """The batch's images as RGB; an unreadable one is a :class:`BenchError` that says how to remake it."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for r in batch:
        try:
            with Image.open(out / r["file"]) as im:
                images.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise BenchError(
                f"Cannot read {out / r['file']} ({e}); run `detailpp bench generate` again "
                "on this folder to remake it."
            ) from e
    return images


def _finish_scoring(out: Path, metric: Any, records: Sequence[dict], shard: Shard, summary: Summary) -> None:
    """On the main process (or a manual shard): the metric's merged scores once complete, and the manifest."""
    if not (shard.is_main or shard.launcher == "manual"):
        return
    scored = load_scores(out, metric.name, metric.config)
    summary.complete = all(r["item"] in scored and scored[r["item"]].get("sha256") == r["sha256"] for r in records)
    if summary.complete:
        write_jsonl(out / SCORES_DIR / f"{metric.name}.jsonl", [scored[i] for i in sorted(scored)])
    if shard.launcher != "manual" or summary.complete:
        merge_manifest(out)
        summary.merged = True


def remove_parts(folder: Path, stem: str) -> None:  # pragma: no cover - maintenance helper
    for p in part_files(folder, stem):
        p.unlink()
