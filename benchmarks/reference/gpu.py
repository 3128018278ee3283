"""``record.py --gpu``: the reference preset against the authors' pipeline at full size, and both timed.

Full-size SDXL with random weights (:mod:`detailpp.models.full_size`; same FLOPs and memory as SDXL base), fp16,
1024x1024, Euler, the 4-branch plan of the authors' style example (p0, p1, robot, tree), one process, one card:

1. parity: the preset's final latent against the authors' at 20 steps, nursing off and on (fp16: expect rounding);
2. timings: plain SDXL (diffusers), detailpp's default, detailpp's reference preset and the authors' pipeline at
   20 and 50 steps, nursing off and on (nursing on: centroid alignment, step size 1750), each decoding to an image;
   one warm-up per pipeline, then ``--repeats`` timed calls (best kept), peak memory per row.

Every row starts from the UNet's own processors (the authors' pipeline leaves its processors on every layer), after
``gc`` and ``torch.cuda.empty_cache()``. Random weights never meet nursing's early-stop thresholds: both sides run
every capped pass. Results go to ``--json`` (default ``$OUT/reference_gpu.json`` or ``reference_gpu.json``) and a
Markdown table is printed last.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from authors import COMMIT, import_authors, run_authors
from scenarios import SUB_PROMPTS, SUBJECTS, Scenario, authors_kwargs, initial_latent, versions

from detailpp import DetailConfig


def _peak_reset() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _peak() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def gpu_main(args: Any) -> int:
    from diffusers import StableDiffusionXLPipeline

    from detailpp.models.full_size import build_sdxl_random_pipeline
    from detailpp.pipelines.sdxl import DetailPlusPlusPipeline

    if not torch.cuda.is_available():
        print("error: --gpu needs a CUDA device")
        return 2
    repeats = int(os.environ.get("REFERENCE_GPU_REPEATS", "1"))
    out_path = args.json or Path(os.environ.get("OUT", ".")) / "reference_gpu.json"
    modules = import_authors(args.authors)
    started = time.perf_counter()
    pipe = build_sdxl_random_pipeline(DetailPlusPlusPipeline, device="cuda", dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    plain = StableDiffusionXLPipeline.from_pipe(pipe, torch_dtype=torch.float16)  # (its default: float32)
    plain.set_progress_bar_config(disable=True)
    original = dict(pipe.unet.attn_processors)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "versions": {**versions(), "python": platform.python_version()},
        "authors_commit": COMMIT,
        "date": time.strftime("%Y-%m-%d"),
        "build_s": time.perf_counter() - started,
        "rows": [],
        "parity": {},
    }
    authors_pipe: list[Any] = [None]

    def scenario(steps: int, nursing: bool) -> Scenario:
        config = {"nursing": nursing, "centroid_alignment": True, "nursing_step_size": 1750.0}
        return Scenario(f"{steps}-{nursing}", config, steps=steps, height=1024, width=1024)

    def reset() -> None:
        pipe.unet.set_attn_processor(dict(original))
        _peak_reset()

    def ours(
        s: Scenario, config: DetailConfig, output_type: str = "pil", masks: list | None = None
    ) -> tuple[float, Any]:
        reset()
        latents = initial_latent(s, pipe.unet.dtype, "cuda")

        def keep(pipeline, step, timestep, tensors):
            if masks is not None and tensors["masks"] is not None:
                masks.append(tensors["masks"].cpu())
            return {}

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = pipe(
            callback_on_step_end=keep,
            callback_on_step_end_tensor_inputs=["masks"],
            plan=s.plan(),
            height=s.height,
            width=s.width,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance_scale,
            latents=latents,
            detail_config=config,
            output_type=output_type,
        )
        torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    def sdxl(s: Scenario) -> tuple[float, Any]:
        reset()
        latents = initial_latent(s, torch.float16, "cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = plain(
            SUB_PROMPTS[0],
            height=s.height,
            width=s.width,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance_scale,
            latents=latents,
        )
        torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    def authors(s: Scenario, output_type: str = "pil", record: bool = False) -> tuple[float, Any]:
        reset()
        kwargs = authors_kwargs(s)
        latents = initial_latent(s, pipe.unet.dtype, "cuda")
        run = run_authors(
            modules,
            pipe.components,
            SUB_PROMPTS,
            SUBJECTS,
            latents=latents,
            record=record,
            pipe=authors_pipe[0],
            output_type=output_type,
            **kwargs,
        )
        authors_pipe[0] = run.pipe
        return run.seconds, run

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", flush=True)

    def parity(dtype_name: str) -> None:
        """Preset vs authors at 20 steps: final latent, and the share of mask pixels that agree."""
        for nursing in (False, True):
            s = scenario(20, nursing)
            _, theirs = authors(s, output_type="latent", record=True)
            masks: list[torch.Tensor] = []
            _, mine = ours(s, s.detail_config(), output_type="latent", masks=masks)
            diff = (mine.images.float().cpu()[-1] - theirs.latents[-1]).abs()
            agree = None
            if len(masks) == len(theirs.masks) and masks:
                agree = float((torch.stack(masks) == torch.stack(theirs.masks)).float().mean())
            key = f"{dtype_name}, nursing {'on' if nursing else 'off'}"
            results["parity"][key] = {
                "final_max_abs": float(diff.max()),
                "final_mean_abs": float(diff.mean()),
                "latent_abs_max": float(theirs.latents[-1].abs().max()),
                "theirs_finite": bool(torch.isfinite(theirs.latents).all()),
                "ours_finite": bool(torch.isfinite(mine.images).all()),
                "mask_pixels_agreeing": agree,
            }
            log(f"parity {key}: {results['parity'][key]}")

    # 1. Parity at 20 steps (latents), fp16.
    parity("fp16")

    # 2. Timings.
    rows = [
        ("plain SDXL (diffusers)", None, lambda s: sdxl(s)),
        ("detailpp default", "default", lambda s: ours(s, DetailConfig(**{k: v for k, v in s.config.items()}))),
        ("detailpp reference preset", "preset", lambda s: ours(s, s.detail_config())),
        ("authors' pipeline", "authors", lambda s: authors(s)),
    ]
    for _, kind, fn in rows:  # warm-ups, nursing off and on (the backward pass has kernels of its own)
        fn(scenario(4, False))
        if kind is not None:
            fn(scenario(4, True))
    for steps in (20, 50):
        for nursing in (False, True):
            for label, kind, fn in rows:
                if kind is None and nursing:
                    continue
                s = scenario(steps, nursing)
                times, peaks = [], []
                for _ in range(repeats):
                    seconds, _ = fn(s)
                    times.append(seconds)
                    peaks.append(_peak())
                row = {
                    "run": label,
                    "steps": steps,
                    "nursing": nursing if kind else None,
                    "seconds": min(times),
                    "all_seconds": times,
                    "peak_gib": max(peaks),
                }
                results["rows"].append(row)
                log(f"{label}, {steps} steps, nursing {nursing}: {min(times):.2f} s, peak {max(peaks):.1f} GiB")
                out_path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    # 3. Parity again in fp32 (same weights): what of the fp16 difference is rounding.
    authors_pipe[0] = None
    plain.to(torch.float32)
    parity("fp32")
    results["total_s"] = time.perf_counter() - started
    out_path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(markdown(results))
    return 0


def markdown(results: dict[str, Any]) -> str:
    """The timing table (ratios to plain SDXL and to the authors' pipeline at the same steps and nursing)."""
    rows = results["rows"]

    def find(run: str, steps: int, nursing: bool | None) -> dict | None:
        for r in rows:
            if r["run"] == run and r["steps"] == steps and (r["nursing"] == nursing or r["nursing"] is None):
                return r
        return None

    lines = [
        f"{results['device']}, {results['date']}, torch {results['versions']['torch']}, diffusers "
        f"{results['versions']['diffusers']}; authors' code at {results['authors_commit'][:7]}",
        "",
        "| run | nursing | 20 steps s | x plain | x authors | 50 steps s | x plain | x authors | peak GiB (50) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in dict.fromkeys(r["run"] for r in rows):
        for nursing in (False, True):
            cells = []
            r50 = None
            for steps in (20, 50):
                r = find(run, steps, nursing)
                if r is None:
                    cells += ["", "", ""]
                    continue
                base = find("plain SDXL (diffusers)", steps, None)
                auth = find("authors' pipeline", steps, nursing)
                cells += [
                    f"{r['seconds']:.2f}",
                    f"{r['seconds'] / base['seconds']:.2f}" if base else "",
                    f"{auth['seconds'] / r['seconds']:.2f}x faster" if auth and auth is not r else "",
                ]
                r50 = r if steps == 50 else r50
            if not any(cells):
                continue
            nurse = "" if run.startswith("plain") else ("on" if nursing else "off")
            if run.startswith("plain") and nursing:
                continue
            peak = f"{r50['peak_gib']:.1f}" if r50 else ""
            lines.append(f"| {run} | {nurse} | " + " | ".join(cells) + f" | {peak} |")
    parity = results["parity"]
    lines.append("")
    for k, v in parity.items():
        agree = "" if v["mask_pixels_agreeing"] is None else f", mask pixels agreeing {v['mask_pixels_agreeing']:.4%}"
        lines.append(
            f"Preset vs authors, 20 steps, {k}: final latent max abs diff {v['final_max_abs']:.3g} (mean "
            f"{v['final_mean_abs']:.2g}; latent max {v['latent_abs_max']:.3g}; finite: ours "
            f"{v['ours_finite']}, theirs {v['theirs_finite']}{agree})"
        )
    return "\n".join(lines)
