"""Where does a whole call with CUDA-graphed nursing first depart from the eager call, and does re-capturing the
graph at every nursing step keep it exact?

Full-size random SDXL, fp16, 1024x1024, the 2-subject plan of ``benchmarks/reference``, nursing on (centroid
alignment, step size 1750), 4 steps (``--steps``). Four whole calls from one initial latent, every nursing pass's
loss recorded:

1. eager; 2. eager again (is the eager call deterministic?); 3. graphed (one graph per call, captured at the first
nursing pass: ``DetailConfig.nursing_graphs``); 4. graphed, the graph re-captured at every nursing step.

Prints, for 2-4 against 1, the first (step, pass) whose loss differs and the final latent's max abs difference, then
times 20-step calls of 1, 3 and 4. Writes ``nursing_graph_diagnose.json`` under ``$OUT``.

    python3 benchmarks/nursing_graph_diagnose.py --authors CHECKOUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "reference"))


def first_difference(a: list[list[float]], b: list[list[float]]) -> tuple[int, int] | None:
    """The first (step, pass) whose loss differs between two calls' per-step loss lists, or ``None``."""
    for step, (x, y) in enumerate(zip(a, b, strict=False)):
        for k, (u, v) in enumerate(zip(x, y, strict=False)):
            if u != v:
                return step, k
        if len(x) != len(y):
            return step, min(len(x), len(y))
    return None


def main(argv: list[str] | None = None) -> int:
    import speed
    import torch

    import detailpp.method.engine as engine_module

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--authors", type=Path, required=True)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args(argv)
    out = Path(os.environ.get("OUT", ".")) / "nursing_graph_diagnose.json"
    bench = speed.Bench(args.authors, out, 600.0)
    original_nurse = engine_module.DetailEngine.nurse

    def recapture_each_step(self, i, t, latents):
        latents = original_nurse(self, i, t, latents)
        self.nursing.release()
        return latents

    def run(mode: str, recapture: bool, steps: int) -> tuple[float, Any]:
        engine_module.DetailEngine.nurse = recapture_each_step if recapture else original_nurse
        try:
            return bench.call(speed.OURS, mode, True, steps, output_type="latent")
        finally:
            engine_module.DetailEngine.nurse = original_nurse

    for mode in ("eager", "eager+graphs"):  # warm-ups
        run(mode, False, 2)
    calls = {
        "eager": run("eager", False, args.steps),
        "eager_again": run("eager", False, args.steps),
        "graphed": run("eager+graphs", False, args.steps),
        "graphed_recapture_each_step": run("eager+graphs", True, args.steps),
    }
    losses = {k: [r.losses for r in o.nursing] for k, (_, o) in calls.items()}
    reference = calls["eager"][1].images.float()
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "steps": args.steps, "losses": losses}
    for name in ("eager_again", "graphed", "graphed_recapture_each_step"):
        diff = float((calls[name][1].images.float() - reference).abs().max())
        first = first_difference(losses["eager"], losses[name])
        results[name] = {"first_loss_difference": first, "final_max_abs": diff}
        print(f"{name}: first differing (step, pass) {first}, final max abs {diff:.3g}")
    timings = {}
    for name, mode, recapture in (
        ("eager", "eager", False),
        ("graphed", "eager+graphs", False),
        ("recapture", "eager+graphs", True),
    ):
        started = time.perf_counter()
        seconds, _ = run(mode, recapture, 20)
        timings[name] = seconds
        print(f"20 steps, nursing on, {name}: {seconds:.2f} s (wall {time.perf_counter() - started:.2f})")
    results["seconds_20_steps"] = timings
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
