"""Running the benchmark: one item (prompt x seed, every method) at a time, in worker processes, records on
disk, the results file."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from detailpp.bench import BenchError
from research.toy.binding.methods import (
    BindingSettings,
    check_detail_config,
    force_layout,
    forced_steps,
    method_fields,
)
from research.toy.binding.prompts import (
    SPLITS,
    TEST_SEED,
    VALIDATION_SEED,
    _split_description,
    branch_objects,
    image_seed,
    make_plans,
    split_prompts,
)
from research.toy.binding.report import markdown_table, save_binding_grid
from research.toy.binding.scoring import (
    assign_regions,
    foreground,
    iou,
    mask_records,
    match_shapes,
    score_seen,
    upsample_masks,
)
from research.toy.binding.summary import aggregate
from research.toy.scenes import ObjectSpec, PromptSpec

logger = logging.getLogger(__name__)

RECORDS_GLOB = "records*.jsonl"


def build_items(specs: Sequence[PromptSpec], n_seeds: int, settings: BindingSettings) -> list[dict]:
    """Every (prompt, seed) item, seed-major (all prompts of seed 0 first), so a run cut short covers all prompts."""
    items = []
    for seed in range(n_seeds):
        for p, spec in enumerate(specs):
            diag = seed == 0 and p < settings.diagnostic_prompts
            items.append(
                {
                    "prompt_index": p,
                    "seed": seed,
                    "prompt": spec.prompt,
                    "objects": [[o.shape, o.colour, o.texture] for o in spec.objects],
                    "diagnostic": diag,
                    "grid": seed == 0 and p < settings.grid_prompts,
                }
            )
    return items


def _spec(item: dict) -> PromptSpec:
    return PromptSpec(item["prompt"], tuple(ObjectSpec(*o) for o in item["objects"]))


def run_item(pipe, item: dict, plan: dict, settings: BindingSettings, grid_dir: Path | None = None, judge_fn=None):
    """Yield one record per method for one (prompt, seed) item."""
    import torch

    if judge_fn is None:
        from research.toy.judge import judge as judge_fn
    spec = _spec(item)
    names = list(settings.methods) + (list(settings.diagnostics) if item["diagnostic"] else [])
    seed = image_seed(item["prompt_index"], item["seed"])
    common = dict(
        prompt=spec.prompt,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        height=settings.height,
        width=settings.width,
        output_type="pil",
    )
    b_obj = branch_objects(plan, spec)
    for name in names:
        fields = method_fields(name, settings.detail_config)
        started = time.perf_counter()
        generator = torch.Generator("cpu").manual_seed(seed)
        out = None
        if fields is None:
            image = pipe.plain_sdxl()(generator=generator, **common).images[0]
        else:
            config = pipe.make_detail_config(**fields)  # over the model's recommended settings
            k = forced_steps(name)
            out = pipe(
                **common,
                callback_on_step_end=force_layout(k) if k else None,
                plan=plan,
                detail_config=config,
                generator=generator,
                return_masks=True,
                return_branch_images=item["diagnostic"],
            )
            image = out.images[0]
        seconds = time.perf_counter() - started
        seen = judge_fn(image)
        rec = {
            "prompt_index": item["prompt_index"],
            "seed": item["seed"],
            "n_objects": len(spec.objects),
            "method": name,
            "image_seed": seed,
            "seconds": round(seconds, 4),
            **score_seen(spec.objects, seen),
        }
        hw = (image.height, image.width)
        if out is not None:
            regions = [seen[j].mask if j is not None else None for j in assign_regions(spec.objects, seen)]
            maps = out.masks.float().numpy() if out.masks is not None else np.zeros((0, 1, 1))
            rec["masks"] = mask_records(upsample_masks(maps, hw), config.mask_threshold, b_obj, regions)
            rec["nursing"] = [
                {
                    "updates": r.updates,
                    "first_loss": r.losses[0] if r.losses else None,
                    "stopped_early": r.stopped_early,
                }
                for r in (out.nursing or [])
            ]
            if out.branch_images is not None:
                p0, p1 = out.branch_images[0], out.branch_images[1]
                seen0, seen1 = judge_fn(p0), judge_fn(p1)
                fg0, fg1, fgf = foreground(seen0, hw), foreground(seen1, hw), foreground(seen, hw)
                rec["branches"] = {
                    "p0": score_seen(spec.objects, seen0),
                    "p1_n_seen": len(seen1),
                    "p1_shapes": match_shapes(spec.objects, seen1),
                    "layout_iou_p0_p1": iou(fg0, fg1),
                    "layout_iou_p0_final": iou(fg0, fgf),
                }
                rec["_fg_p0"] = fg0  # for the layout check against plain sampling (dropped before writing)
        if name == "sdxl":
            rec["_fg_sdxl"] = foreground(seen, hw)
        if item["grid"] and grid_dir is not None:
            grid_dir.mkdir(parents=True, exist_ok=True)
            stem = f"p{item['prompt_index']:04d}_{name}"
            image.save(grid_dir / f"{stem}.png")
            if out is not None and out.masks is not None:
                np.save(grid_dir / f"{stem}_masks.npy", (upsample_masks(maps, hw) > config.mask_threshold))
                np.save(grid_dir / f"{stem}_objects.npy", np.array([-1 if k is None else k for k in b_obj]))
            if out is not None and out.branch_images is not None:
                out.branch_images[1].save(grid_dir / f"{stem}_p1.png")
        yield rec


def _finish_item(records: list[dict]) -> list[dict]:
    """Add the plain-vs-branch-0 layout check to an item's records and drop the arrays."""
    fg_sdxl = next((r.get("_fg_sdxl") for r in records if "_fg_sdxl" in r), None)
    for r in records:
        fg0 = r.pop("_fg_p0", None)
        r.pop("_fg_sdxl", None)
        if fg0 is not None and fg_sdxl is not None:
            r["branches"]["layout_iou_p0_sdxl"] = iou(fg0, fg_sdxl)
    return records


def _load_pipe(settings: BindingSettings, device: str | None):
    import torch

    from detailpp.models.loading import load_pipeline

    torch.set_num_threads(max(1, settings.threads))
    pipe = load_pipeline(settings.model, device=device, dtype=settings.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def work(
    rank: int,
    items: Sequence[dict],
    plans: dict[str, dict],
    settings: BindingSettings,
    work_dir: Path,
    next_item: Callable[[], int],
    stop: Callable[[], bool] = lambda: False,
    pipe=None,
) -> int:
    """Run items (taken by index from ``next_item``) until none is left, the deadline passes or ``stop()``;
    append their records to ``work_dir/records.part<rank>.jsonl``. Returns how many items were finished."""
    device = settings.device
    if pipe is None:
        import torch

        if (device in (None, "cuda")) and torch.cuda.is_available() and torch.cuda.device_count() > 1:
            device = f"cuda:{rank % torch.cuda.device_count()}"
        pipe = _load_pipe(settings, device)
    done = 0
    started = time.time()
    with open(work_dir / f"records.part{rank}.jsonl", "a", encoding="utf-8") as f:
        while not stop() and (settings.deadline is None or time.time() < settings.deadline):
            i = next_item()
            if i >= len(items):
                break
            item = items[i]
            records = _finish_item(list(run_item(pipe, item, plans[item["prompt"]], settings, work_dir / "grid")))
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            done += 1
            if done % 10 == 0:
                logger.info("worker %d: %d items in %.0f s", rank, done, time.time() - started)
    return done


def _worker_main(rank, items, plans, settings, work_dir, counter, stop_event, log_level) -> None:
    logging.basicConfig(level=log_level, format=f"%(levelname)s w{rank} %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(settings.threads))

    def next_item() -> int:
        with counter.get_lock():
            i = counter.value
            counter.value += 1
        return i

    work(rank, items, plans, settings, Path(work_dir), next_item, stop_event.is_set)


# ----------------------------------------------------------------------------------------------------------------
# Aggregation


def read_records(work_dir: Path) -> list[dict]:
    out = []
    for path in sorted(Path(work_dir).glob(RECORDS_GLOB)):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a killed worker
                    continue
    return out


# ----------------------------------------------------------------------------------------------------------------
# The run


def run_benchmark(
    n_prompts: int,
    n_seeds: int,
    settings: BindingSettings,
    work_dir: Path,
    results_path: Path,
    plans_source: str = "parser",
    workers: int = 0,
    judge_scenes: int = 400,
    max_minutes: float | None = None,
    grid_path: Path | None = None,
    markdown_path: Path | None = None,
    snapshot_every: float = 30.0,
    split: str = "test",
) -> dict:
    """Make, judge and summarise every item; write the results JSON (and a grid / Markdown table when asked).

    ``split``: the prompts (:func:`split_prompts`): ``"test"`` for reported results, ``"validation"`` for choosing
    hyperparameters. ``settings.detail_config`` is checked against every method that will run before anything starts.
    ``workers=0`` runs in this process; ``workers=N`` spawns N processes (each loads the pipeline; on one GPU they
    overlap the toy UNet's small kernels). ``max_minutes`` stops starting items after that long; the results then
    cover the finished items (seed-major order: every prompt's seed 0 first).
    """
    t0 = time.time()
    if split not in SPLITS:
        raise BenchError(f"unknown prompt split {split!r}; choose from {', '.join(SPLITS)}.")
    runs = list(settings.methods) + (list(settings.diagnostics) if settings.diagnostic_prompts > 0 else [])
    from detailpp.config import ConfigError
    from detailpp.models.loading import model_detail_defaults

    try:
        model_defaults = model_detail_defaults(settings.model)
    except ConfigError as e:
        raise BenchError(str(e)) from e
    check_detail_config(settings.detail_config, runs, model_defaults)
    specs = split_prompts(n_prompts, split)
    tokenizer = _tokenizer(settings.model)
    plans = make_plans(specs, plans_source, tokenizer, split)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    for old in work_dir.glob(RECORDS_GLOB):
        old.unlink()
    settings.extra = {
        **settings.extra,
        "plans": plans_source if plans_source in ("parser", "scene") else "file",
        "split": split,
        "prompt_seed": TEST_SEED if split == "test" else VALIDATION_SEED,
        "prompts": _split_description(split),
        "workers": workers,
        "model_detail_defaults": model_defaults,
    }
    items = build_items(specs, n_seeds, settings)
    if max_minutes is not None:
        settings.deadline = t0 + 60.0 * max_minutes
    planned = {"n_prompts": len(specs), "n_seeds": n_seeds, "items": len(items)}
    judge: dict | None = None

    def snapshot() -> dict:
        res = aggregate(read_records(work_dir), settings, planned, judge)
        res["wall_seconds"] = round(time.time() - t0, 1)
        _write_json(results_path, res)
        return res

    if workers <= 0:
        counter = iter(range(10**9))
        work(0, items, plans, settings, work_dir, lambda: next(counter))
        judge = _judge_accuracy(judge_scenes)
    else:
        ctx = mp.get_context("spawn")
        counter = ctx.Value("i", 0)
        stop = ctx.Event()
        procs = [
            ctx.Process(
                target=_worker_main,
                args=(r, items, plans, settings, str(work_dir), counter, stop, logging.getLogger().level),
                daemon=True,
            )
            for r in range(workers)
        ]
        for p in procs:
            p.start()
        judge = _judge_accuracy(judge_scenes)  # on the CPU, while the workers sample
        last = time.time()
        grace = 60.0
        while any(p.is_alive() for p in procs):
            time.sleep(2.0)
            if time.time() - last > snapshot_every:
                res = snapshot()
                last = time.time()
                logger.info("%d/%d items, %.0f s", res["n_images_per_method"], len(items), time.time() - t0)
            if settings.deadline is not None and time.time() > settings.deadline:
                stop.set()
                if time.time() > settings.deadline + grace:
                    for p in procs:
                        if p.is_alive():
                            logger.warning("ending worker pid %d after the deadline", p.pid)
                            p.terminate()
        for p in procs:
            p.join(timeout=10)
    res = snapshot()
    if grid_path is not None:
        try:
            save_binding_grid(work_dir / "grid", specs, grid_path)
        except (OSError, ValueError) as e:
            logger.warning("no grid: %s", e)
    if markdown_path is not None:
        Path(markdown_path).write_text(markdown_table(res), encoding="utf-8")
    logger.info(
        "results: %s (%d items per method, %.0f s)", results_path, res["n_images_per_method"], time.time() - t0
    )
    return res


def _tokenizer(model: str):
    from transformers import CLIPTokenizer

    from detailpp.resources import load_clip_tokenizer

    if model in ("toy", "tiny-random", "sdxl-random"):  # SDXL's tokenizer (the toy model ships no copy)
        return load_clip_tokenizer()
    return CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")  # a Hub id or a local diffusers folder


def _judge_accuracy(n: int) -> dict | None:
    if n <= 0:
        return None
    from research.toy.judge import judge_accuracy

    started = time.time()
    # the world the shipped model is trained in (run 5 on): the slots layout
    res = judge_accuracy(n=n, seed=2024, split="held_out", perturbed=True, layout="slots")
    res["seconds"] = round(time.time() - started, 1)
    res["setting"] = f"judge_accuracy(n={n}, seed=2024, split='held_out', perturbed=True, layout='slots')"
    return res


def _write_json(path: Path, data: dict) -> None:
    from detailpp.atomic import atomic_write_bytes

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), (json.dumps(data, indent=1) + "\n").encode("utf-8"))
