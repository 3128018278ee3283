"""Detail++ beyond plain SDXL, timed on one GPU: SD 1.5 at 512x512 and SDXL + ControlNet at 1024x1024.

Full-size models with random weights (:mod:`detailpp.models.full_size`: SD 1.5, SDXL, and a
ControlNet made from the random SDXL UNet with ``ControlNetModel.from_unet``): the FLOPs and memory of the real models,
images that are noise. One process, one card, fp16, Euler, 50 steps, guidance 7.5, a 4-branch plan (p0, p1, two
subjects). Each row: a warm-up call, then ``--repeats`` timed calls (the best kept), peak memory after ``empty_cache``.
Detail++ rows with nursing off and on (random weights never meet nursing's early-stop thresholds: every capped pass
runs).

    python benchmarks/breadth_gpu.py --json $OUT/breadth_gpu.json

Writes the results as JSON and prints a Markdown table last (``--report FILE`` prints the table of a results file).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
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
        {"prompt": "a red robot with a blue hat and a green tree with golden apples", "subject": "tree"},
    ],
}


def peak_reset() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def timed(call: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Best wall time of ``repeats`` calls after one warm-up, and the peak GiB over them."""
    call()
    peak_reset()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, torch.cuda.max_memory_allocated() / 2**30


def rows_for(name: str, detail: Any, plain: Any, size: int, steps: int, repeats: int, **extra: Any) -> list[dict]:
    """Plain and Detail++ (nursing off, on) on one model family."""
    seed = 0

    def generator() -> torch.Generator:
        return torch.Generator("cuda").manual_seed(seed)

    common = {"height": size, "width": size, "num_inference_steps": steps, "guidance_scale": 7.5, **extra}
    calls = {
        "plain": lambda: plain(PLAN["prompt"], generator=generator(), **common),
        "detailpp, nursing off": lambda: detail(
            plan=PLAN, generator=generator(), detail_config=DetailConfig(nursing=False), **common
        ),
        "detailpp, nursing on": lambda: detail(
            plan=PLAN, generator=generator(), detail_config=DetailConfig(nursing=True), **common
        ),
    }
    rows = []
    for label, call in calls.items():
        seconds, peak = timed(call, repeats)
        rows.append({"model": name, "run": label, "size": size, "steps": steps, "s": seconds, "peak_gib": peak})
        print(f"{name} {label}: {seconds:.2f} s, peak {peak:.1f} GiB", flush=True)
    base = rows[0]["s"]
    for row in rows:
        row["x_plain"] = row["s"] / base
    return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import ControlNetModel, StableDiffusionPipeline, StableDiffusionXLControlNetPipeline
    from PIL import Image

    from detailpp.models.full_size import build_sd15_random_pipeline, build_sdxl_random_pipeline
    from detailpp.models.loading import dtype_kwarg
    from detailpp.pipelines.sd import DetailPlusPlusSDPipeline
    from detailpp.pipelines.sdxl import DetailPlusPlusPipeline
    from detailpp.pipelines.sdxl_controlnet import DetailPlusPlusControlNetPipeline

    fp16 = dtype_kwarg(torch.float16)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "rows": [],
    }
    import diffusers

    results["versions"]["diffusers"] = diffusers.__version__

    sd = build_sd15_random_pipeline(DetailPlusPlusSDPipeline, device="cuda", dtype=torch.float16)
    sd.set_progress_bar_config(disable=True)
    plain_sd = StableDiffusionPipeline.from_pipe(sd, **fp16)
    plain_sd.set_progress_bar_config(disable=True)
    results["rows"] += rows_for("SD 1.5", sd, plain_sd, 512, args.steps, args.repeats)
    del sd, plain_sd
    peak_reset()

    xl = build_sdxl_random_pipeline(DetailPlusPlusPipeline, device="cuda", dtype=torch.float16)
    controlnet = ControlNetModel.from_unet(xl.unet).to("cuda", torch.float16)
    detail = DetailPlusPlusControlNetPipeline.from_pipe(xl, controlnet=controlnet, **fp16)
    detail.set_progress_bar_config(disable=True)
    plain = StableDiffusionXLControlNetPipeline.from_pipe(detail, **fp16)
    plain.set_progress_bar_config(disable=True)
    del xl
    image = Image.fromarray((torch.rand(1024, 1024, 3) * 255).to(torch.uint8).numpy())
    results["rows"] += rows_for("SDXL + ControlNet", detail, plain, 1024, args.steps, args.repeats, image=image)
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"{results['device']}, {results['date']}, torch {results['versions']['torch']}, diffusers "
        f"{results['versions'].get('diffusers', '?')}; fp16, Euler, guidance 7.5, random weights, 4 branches.",
        "",
        "| model | size | steps | run | s | x plain | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['model']} | {r['size']} | {r['steps']} | {r['run']} | {r['s']:.2f} | {r['x_plain']:.2f} | "
            f"{r['peak_gib']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "breadth_gpu.json")
    parser.add_argument("--report", type=Path, help="print the table of a results file (no GPU needed)")
    args = parser.parse_args(argv)
    if args.report:
        print(markdown(json.loads(args.report.read_text(encoding="utf-8"))))
        return 0
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    results = measure(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    tmp.replace(args.json)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
