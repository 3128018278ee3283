"""The generation loop: sharded by item index, resumable, nothing lost or duplicated (the run's identity in
``run.json``, one PNG and one manifest record per item; :mod:`detailpp.bench.runs` says how a rerun resumes)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from detailpp.atomic import atomic_write_bytes
from detailpp.bench.manifest import (
    RUN_FILE,
    SAMPLES_DIR,
    JsonlAppender,
    canonical_json,
    check_or_write_json,
    part_name,
    remove_stale_temporaries,
)
from detailpp.bench.runs import (
    Item,
    Progress,
    Summary,
    foreign_samples,
    merge_manifest,
    other_parts,
    plan_items,
    valid_records,
)
from detailpp.bench.sharding import Shard
from detailpp.bench.suites import BASE_SEED, Suite

logger = logging.getLogger(__name__)


GenerateFn = Callable[[str, int], Any]


FORMAT_VERSION = 1


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
    planner: dict | None = None,
) -> dict:
    """What ``run.json`` records: everything an image depends on (not the device, not the number of processes).

    ``plans``: where Detail++'s plans come from when not from the spaCy parser (``"file"``: ``--plans``; the plans
    themselves are kept in the folder's ``plans.jsonl``); absent from ``run.json`` otherwise. ``planner``: the
    planner's identity when it is not spaCy (``{"planner": "llm", "model": ..., "prompt_version": ...}``).
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
    if planner is not None:
        identity["planner"] = dict(planner)
    return identity


def worker(shard: Shard) -> dict:
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


def check_run_identity(out_dir: str | Path, identity: dict, write: bool = True) -> None:
    """Check ``identity`` against the run folder's ``run.json``; with ``write``, write it when there is none (the
    folder is made then). :func:`run_generation` writes it with the folder's first image only, so that a run that
    fails before (a model that does not load) leaves nothing that would refuse the next one."""
    out = Path(out_dir)
    if write:
        out.mkdir(parents=True, exist_ok=True)
    check_or_write_json(
        out / RUN_FILE,
        identity,
        "images",
        "Use another --output-dir folder, or the same settings to resume the run.",
        write=write,
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
    on_first_image: Callable[[], Any] | None = None,
) -> Summary:
    """Generate the suite's images into ``out_dir`` (the shard's share), resuming whatever is already done.

    ``generate_fn(prompt, seed)`` returns a PIL image; ``identity`` comes from :func:`run_identity` and is checked
    against the folder's ``run.json`` (a folder holds one method with one set of settings). ``prepare()`` (loading
    the model) runs once before this process's first image, and not at all when nothing is left to do; its time is
    kept apart (``summary.extra["load_s"]`` and ``timings.load_s`` of this process's first record), so
    ``summary.seconds`` and every ``generate_s`` count generation only. ``run.json`` is written (and
    ``on_first_image()`` called: the CLI records the run's plans there) once this process has its first image, before
    the image is written; a run that fails before leaves no file, and no folder it made.
    """
    shard = shard or Shard()
    out = Path(out_dir)
    existed = out.exists()
    check_run_identity(out, identity, write=False)
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

    def first_image() -> None:
        check_run_identity(out, identity)  # written now (or checked again: another process may have written it)
        (out / SAMPLES_DIR).mkdir(exist_ok=True)
        if on_first_image is not None:
            on_first_image()

    try:
        load = _prepare(prepare, todo, summary)
        start = time.perf_counter()
        _generate_items(out, todo, identity, generate_fn, part, worker(shard), summary, bar, load, first_image)
        summary.seconds = time.perf_counter() - start
    except BaseException:
        if not existed and not (out / RUN_FILE).exists():
            remove_empty_run_folder(out)
        raise
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
) -> Progress:
    """The suite-wide bar (the main process of a distributed run), or this shard's own (manually scheduled shards)."""
    manual = shard.launcher == "manual"
    total = sum(1 for it in items if shard.owns(it.index)) if manual else len(items)
    initial = total - len(todo) if manual else summary.done_before
    return Progress(enabled and (shard.is_main or manual), total, initial, other_parts(out, "manifest", shard), desc)


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
    bar: Progress,
    load: dict[str, float],
    first_image: Callable[[], None],
) -> None:
    """Make, write and record each item of ``todo`` (the load time goes into the first record only; ``first_image()``
    runs once, before the first image is written)."""
    for k, it in enumerate(todo):
        t0 = time.perf_counter()
        image = generate_fn(it.prompt, it.seed)
        if k == 0:
            first_image()
        t1 = time.perf_counter()
        data = encode_png(image, it, identity)
        atomic_write_bytes(out / it.file, data)
        t2 = time.perf_counter()
        timings = {"generate_s": round(t1 - t0, 4), "write_s": round(t2 - t1, 4), **load}
        part.append(_generation_record(it, identity, image, data, timings, worker))
        load = {}
        summary.made += 1
        bar.step()


def remove_empty_run_folder(out: Path) -> None:
    """Remove what a failed run made in a folder it created, when it holds nothing else (an empty manifest part, the
    empty ``samples/``, the folder)."""
    for part in out.glob("manifest.part-*.jsonl"):
        if part.stat().st_size == 0:
            part.unlink()
    for folder in (out / SAMPLES_DIR, out):
        with contextlib.suppress(OSError):
            folder.rmdir()


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
