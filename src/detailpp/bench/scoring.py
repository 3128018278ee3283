"""The scoring loop: a metric over a run's images, sharded and resumable like generation (one score record per
image in ``scores/<metric>.part-*.jsonl``, the metric's settings in ``scores/<metric>.config.json``)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detailpp.bench import BenchError
from detailpp.bench.generation import worker
from detailpp.bench.manifest import (
    RUN_FILE,
    SCORES_DIR,
    JsonlAppender,
    check_or_write_json,
    load_json,
    part_name,
    write_jsonl,
)
from detailpp.bench.runs import Progress, Summary, load_manifest, load_scores, merge_manifest, other_parts
from detailpp.bench.sharding import Shard
from detailpp.errors import operation

logger = logging.getLogger(__name__)


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
    if not rescore:  # the settings there must be these (written with the first score: a failure leaves none)
        _check_metric_config(scores_dir, metric, write=False)
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
        with operation(f"loading the {metric.name} scorer"):
            scorer = metric.load()
        part = JsonlAppender(scores_dir / part_name(metric.name, shard.index, shard.count))
        manual = shard.launcher == "manual"
        bar = Progress(
            progress and (shard.is_main or manual),
            len(todo) if manual else len(records),
            0 if manual else summary.done_before,
            other_parts(scores_dir, metric.name, shard),
            metric.name,
        )
        try:
            _score_items(out, todo, metric, scorer, part, worker(shard), batch_size, summary, bar, rescore)
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


def _check_metric_config(scores_dir: Path, metric: Any, write: bool = True, replace: bool = False) -> None:
    """Check the metric's settings against those beside its scores; ``write``: write them when there are none
    (``replace``, for ``--rescore``: write them over the old ones)."""
    config_path = scores_dir / f"{metric.name}.config.json"
    if replace:
        from detailpp.atomic import atomic_write_text

        scores_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_path, json.dumps(metric.config, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
        return
    if write:
        scores_dir.mkdir(parents=True, exist_ok=True)
    check_or_write_json(
        config_path,
        metric.config,
        f"{metric.name} scores",
        "Pass the same settings to resume, or --rescore to score again with the new ones.",
        write=write,
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
    bar: Progress,
    rescore: bool = False,
) -> None:
    """Score ``todo`` in batches of ``batch_size``, one record per image appended to ``part``; the metric's settings
    are written beside the scores with the first batch's (``rescore``: over the old ones)."""
    for k in range(0, len(todo), batch_size):
        batch = todo[k : k + batch_size]
        images = _read_images(out, batch)
        t0 = time.perf_counter()
        with operation(f"scoring {out / batch[0]['file']} and the {len(batch) - 1} image(s) after it"):
            results = scorer.score(images, [r["prompt"] for r in batch])
        if k == 0:
            _check_metric_config(out / SCORES_DIR, metric, replace=rescore)
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
