"""Detail++ on MMDiT transformers, timed on one GPU: FLUX.1-dev and SD3.5-large at 1024x1024, bf16, 28 steps.

Full-size models with random weights (:func:`detailpp.models.full_size.build_flux_random_pipeline`,
``build_sd35_random_pipeline``): the FLOPs and memory of the real models, images that are noise; random weights never
meet nursing's early-stop thresholds, so every capped nursing pass runs (a worst case). One process, one card, the
2-subject plan below (4 branches). Rows, each a warm-up call and then the best of ``--repeats`` timed calls, peak
memory after ``empty_cache``:

- plain (diffusers' ``FluxPipeline`` / ``StableDiffusion3Pipeline`` on the same components);
- Detail++ with nursing off; with nursing on, eager (``nursing_graphs=False``) and replayed as CUDA graphs (the
  default on a GPU);
- nursing on with the capture blocks cut to the first 4, and extended to all double-stream (joint) blocks, against
  the default capture blocks (FLUX 2-9, SD3.5-large 8-17): what a nursing pass costs;
- nursing off with a window of 0.4 T instead of 0.8 T (FLUX fixes its layout early: docs/method.md);
- the floor of nursing off: the plain call plus, for the window's S steps, the difference between one transformer
  forward at the window's batch and at the plain batch (both timed here, CUDA events, median of 10);
- with ``enable_model_cpu_offload()``: plain, nursing off, nursing on (peak memory).

    python benchmarks/mmdit_gpu.py --family flux --json $OUT/mmdit_flux.json
    python benchmarks/mmdit_gpu.py --report benchmarks/results/mmdit_flux_h200.json   # the Markdown table

Writes the results as JSON (after every row: a run cut short keeps what it measured) and prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from detailpp import DetailConfig

PLAN = {
    "prompt": "a red robot with a blue hat and a green tree with golden apples",
    "base": "a robot and a tree",
    "branches": [
        {"prompt": "a red robot with a blue hat and a tree", "subject": "robot"},
        {"prompt": "a robot and a green tree with golden apples", "subject": "tree"},
    ],
}
FAMILIES = {
    "flux": {"label": "FLUX.1-dev", "guidance_scale": 3.5, "cfg": False},
    "sd3": {"label": "SD3.5-large", "guidance_scale": 7.0, "cfg": True},
}


def peak_reset() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def timed(call: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Best wall time of ``repeats`` calls after one warm-up, the peak GiB over them, and the last output."""
    call()
    peak_reset()
    best, out = float("inf"), None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = call()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, torch.cuda.max_memory_allocated() / 2**30, out


def forward_ms(pipe: Any, family: str, batch: int, size: int) -> float:
    """Median ms of one transformer forward at ``batch`` rows (random inputs of the right shapes), CUDA events."""
    t, dtype, device = pipe.transformer, pipe.transformer.dtype, "cuda"
    g = torch.Generator(device).manual_seed(0)
    if family == "flux":
        tokens, text = (size // 16) ** 2, 512
        kwargs = {
            "hidden_states": torch.randn(batch, tokens, t.config.in_channels, generator=g, device=device, dtype=dtype),
            "encoder_hidden_states": torch.randn(
                batch, text, t.config.joint_attention_dim, generator=g, device=device, dtype=dtype
            ),
            "pooled_projections": torch.randn(
                batch, t.config.pooled_projection_dim, generator=g, device=device, dtype=dtype
            ),
            "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
            "guidance": torch.full((batch,), 3.5, device=device, dtype=torch.float32),
            "txt_ids": torch.zeros(text, 3, device=device, dtype=dtype),
            "img_ids": torch.zeros(tokens, 3, device=device, dtype=dtype),
        }
    else:
        side = size // 8
        kwargs = {
            "hidden_states": torch.randn(
                batch, t.config.in_channels, side, side, generator=g, device=device, dtype=dtype
            ),
            "encoder_hidden_states": torch.randn(
                batch, 333, t.config.joint_attention_dim, generator=g, device=device, dtype=dtype
            ),
            "pooled_projections": torch.randn(
                batch, t.config.pooled_projection_dim, generator=g, device=device, dtype=dtype
            ),
            "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype),
        }
    times = []
    with torch.no_grad():
        for i in range(13):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t(**kwargs, return_dict=False)
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end))
    return statistics.median(times)


def build(family: str) -> tuple[Any, Any]:
    """The Detail++ pipeline (full size, random weights, bf16, on the GPU) and the plain pipeline on it."""
    from detailpp.models import full_size

    if family == "flux":
        from detailpp.pipelines.flux import DetailPlusPlusFluxPipeline as cls

        pipe = full_size.build_flux_random_pipeline(cls, device="cuda", dtype=torch.bfloat16)
    else:
        from detailpp.pipelines.sd3 import DetailPlusPlusSD3Pipeline as cls

        pipe = full_size.build_sd35_random_pipeline(cls, device="cuda", dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe.plain_pipeline()
    plain.set_progress_bar_config(disable=True)
    return pipe, plain


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import transformers

    family, spec = args.family, FAMILIES[args.family]
    started = time.perf_counter()
    pipe, plain = build(family)
    results: dict[str, Any] = {
        "family": spec["label"],
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "size": args.size,
        "steps": args.steps,
        "build_s": round(time.perf_counter() - started, 1),
        "rows": [],
        "floor": {},
    }
    n = 2 + len(PLAN["branches"])
    window = DetailConfig().num_share_steps(args.steps)
    rows_per_call = 2 * n if spec["cfg"] else n
    plain_rows = 2 if spec["cfg"] else 1
    common = {"height": args.size, "width": args.size, "num_inference_steps": args.steps}
    common["guidance_scale"] = spec["guidance_scale"]

    def generator() -> torch.Generator:
        return torch.Generator("cuda").manual_seed(0)

    def detail(**config: Any) -> Callable[[], Any]:
        return lambda: pipe(plan=PLAN, generator=generator(), detail_config=DetailConfig(**config), **common)

    n_blocks = len(pipe.transformer.transformer_blocks)
    calls = {
        "plain": lambda: plain(PLAN["prompt"], generator=generator(), **common),
        "detailpp, nursing off": detail(nursing=False),
        "detailpp, nursing on, eager": detail(nursing=True, nursing_graphs=False),
        "detailpp, nursing on, CUDA graphs": detail(nursing=True),
        f"nursing on, capture blocks 0-3 of {n_blocks}": detail(nursing=True, mmdit_capture_blocks=tuple(range(4))),
        f"nursing on, capture all {n_blocks} blocks": detail(
            nursing=True, mmdit_capture_blocks=tuple(range(n_blocks))
        ),
        "detailpp, nursing off, S = 0.4 T": detail(nursing=False, share_steps=0.4),
    }
    save = (lambda: Path(args.json).write_text(json.dumps(results, indent=1) + "\n")) if args.json else lambda: None
    for label, call in calls.items():
        seconds, peak, out = timed(call, args.repeats)
        passes = sum(len(r.losses) for r in (getattr(out, "nursing", None) or []))
        results["rows"].append({"run": label, "seconds": seconds, "peak_gib": peak, "nursing_passes": passes})
        print(f"{label}: {seconds:.2f} s, {peak:.1f} GiB, {passes} nursing passes", flush=True)
        save()
    window_ms, plain_ms = (
        forward_ms(pipe, family, rows_per_call, args.size),
        forward_ms(pipe, family, plain_rows, args.size),
    )
    plain_s = results["rows"][0]["seconds"]
    results["floor"] = {
        "window_steps": window,
        "forward_ms_window_batch": window_ms,
        "forward_ms_plain_batch": plain_ms,
        "floor_s": plain_s + window * (window_ms - plain_ms) / 1000,
    }
    print(f"floor: {results['floor']}", flush=True)
    save()
    pipe.enable_model_cpu_offload()
    plain.enable_model_cpu_offload()
    for label in ("plain", "detailpp, nursing off", "detailpp, nursing on, CUDA graphs"):
        seconds, peak, _ = timed(calls[label], 1)
        results["rows"].append({"run": label + ", model CPU offload", "seconds": seconds, "peak_gib": peak})
        print(f"{label}, offload: {seconds:.2f} s, {peak:.1f} GiB", flush=True)
        save()
    results["total_s"] = round(time.perf_counter() - started, 1)
    save()
    return results


def table(results: dict[str, Any]) -> str:
    """The Markdown table of one results file: time and peak against plain (and time against the floor), and what
    one nursing pass costs (the row's excess over Detail++ with nursing off, per pass)."""
    rows = results["rows"]
    plain, plain_peak = rows[0]["seconds"], rows[0]["peak_gib"]
    floor = results["floor"].get("floor_s")
    off = next((r["seconds"] for r in rows if r["run"] == "detailpp, nursing off"), None)
    lines = [
        f"{results['family']}, {results['size']}x{results['size']}, bf16, {results['steps']} steps, "
        f"{results['device']} ({results['date']}; torch {results['versions']['torch']}, diffusers "
        f"{results['versions']['diffusers']})",
        "",
        "| run | s | x plain | x floor | peak GiB | peak x plain | nursing passes | ms a pass |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        offload = "offload" in r["run"]
        ratio_floor = f"{r['seconds'] / floor:.2f}" if floor and not offload else ""
        passes = r.get("nursing_passes", "")
        per_pass = f"{1000 * (r['seconds'] - off) / passes:.0f}" if passes and off and not offload else ""
        peak_ratio = "" if offload else f"{r['peak_gib'] / plain_peak:.2f}"
        lines.append(
            f"| {r['run']} | {r['seconds']:.2f} | {r['seconds'] / plain:.2f} | {ratio_floor} | {r['peak_gib']:.1f} | "
            f"{peak_ratio} | {passes} | {per_pass} |"
        )
    f = results["floor"]
    if f:
        lines += [
            "",
            f"Floor of nursing off: the plain call + {f['window_steps']} window steps x (one transformer forward at "
            f"the window's batch, {f['forward_ms_window_batch']:.0f} ms, - one at the plain batch, "
            f"{f['forward_ms_plain_batch']:.0f} ms) = {f['floor_s']:.2f} s.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="flux")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--report", help="print the Markdown table of this results file and stop")
    args = p.parse_args(argv)
    if args.report:
        print(table(json.loads(Path(args.report).read_text())))
        return 0
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    print(table(measure(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
