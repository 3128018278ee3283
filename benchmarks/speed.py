"""Issue 18's speed table from one run on one card: plain SDXL, detailpp (eager, CUDA-graphed nursing, compiled) and
the authors' pipeline side by side at 20 and 50 steps, nursing off and on, plus the offloaded run.

Full-size SDXL with random weights (:mod:`detailpp.models.full_size`), fp16 (VAE decode fp32), 1024x1024, Euler,
guidance 7.5, the 4-branch plan of the authors' style example (p0, p1, robot, tree; ``benchmarks/reference``),
each call decoding to an image; nursing on = centroid alignment and step size 1750 (random weights never meet the
early-stop thresholds: every capped pass runs, a worst case on both sides). One process, one card, in this order:

1. eager warm-ups (4 steps) of every pipeline, nursing off and on;
2. exactness: detailpp's final latent with CUDA-graphed nursing against eager nursing (4 steps), bit for bit;
3. eager rows: plain SDXL, detailpp nursing off, on, on with CUDA-graphed nursing, the authors' off and on;
4. ``pipe.compile_detail()``: the first call of each row at 20 steps (its compile time = first call - the eager
   row), the graphed-vs-eager exactness check again, then the compiled rows;
5. the 50-step nursing-on run after ``enable_model_cpu_offload()`` (eager).

Each row: ``SPEED_REPEATS`` timed calls (default 1; best kept), peak = ``torch.cuda.max_memory_allocated`` (and
reserved) of the row, after ``gc`` and ``torch.cuda.empty_cache()``, from the UNet's own processors. Nursing rows
also time every ``nurse_latent`` call (CUDA-synchronised): ms per pass, and per pass in steps >= 1 (no capture).
One profiled nursing step counts the host's kernel launches per pass, eager and graphed.

    python3 benchmarks/speed.py --authors CHECKOUT --json $OUT/speed.json          # GPU; table printed last
    python3 benchmarks/speed.py --report benchmarks/results/speed_h200.json \\
        --update-doc BENCHMARKS.md --readme README.md                             # the table into the docs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "reference"))

TABLE_MARKERS = ("<!-- speed table: benchmarks/speed.py --update-doc -->", "<!-- end of speed table -->")
HEADLINE_MARKERS = ("<!-- speed headline: benchmarks/speed.py --readme -->", "<!-- end of speed headline -->")
#: seconds past ``--budget-s`` the offloaded run may still start at
OFFLOAD_RESERVE_S = 45.0
PLAIN, OURS, AUTHORS = "plain SDXL (diffusers)", "detailpp default", "authors' pipeline"
#: (run, mode, nursing) in table order; mode "graphs": CUDA-graphed nursing
ROWS = (
    (PLAIN, "eager", None),
    (PLAIN, "compiled", None),
    (OURS, "eager", False),
    (OURS, "compiled", False),
    (OURS, "eager", True),
    (OURS, "eager+graphs", True),
    (OURS, "compiled", True),
    (OURS, "compiled+graphs", True),
    (AUTHORS, "eager", False),
    (AUTHORS, "eager", True),
)


class Bench:
    """The pipelines, the row timer and the results of one GPU run."""

    def __init__(self, authors_path: Path, out: Path, budget_s: float):
        import torch
        from authors import COMMIT, import_authors
        from diffusers import StableDiffusionXLPipeline
        from scenarios import versions

        import detailpp.method.nursing as nursing
        from detailpp.models.full_size import build_sdxl_random_pipeline
        from detailpp.pipelines.sdxl import DetailPlusPlusPipeline

        self.torch, self.out, self.budget_s = torch, out, budget_s
        self.started = time.perf_counter()
        self.repeats = int(os.environ.get("SPEED_REPEATS", "1"))
        self.modules = import_authors(authors_path)
        self.pipe = build_sdxl_random_pipeline(DetailPlusPlusPipeline, device="cuda", dtype=torch.float16)
        self.pipe.set_progress_bar_config(disable=True)
        self.plain = StableDiffusionXLPipeline.from_pipe(self.pipe, torch_dtype=torch.float16)
        self.plain.set_progress_bar_config(disable=True)
        self.original = dict(self.pipe.unet.attn_processors)
        self.authors_pipe: Any = None
        self.nursing_calls: list[tuple[int, float, int]] = []  # (step, ms, passes) of every nurse_latent call
        self.profile_step: int | None = None  # profile the nurse_latent call of this step (kernel launches)
        self.profiled: dict[str, Any] = {}
        self._wrap_nursing(nursing)
        self.results: dict[str, Any] = {
            "device": torch.cuda.get_device_name(),
            "versions": {**versions(), "python": platform.python_version()},
            "authors_commit": COMMIT,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "repeats": self.repeats,
            "rows": [],
            "first_calls": [],
            "exact": {},
            "launches": {},
            "skipped": [],
            "errors": [],
        }

    def _wrap_nursing(self, nursing: Any) -> None:
        original = nursing.nurse_latent
        torch = self.torch

        def timed(*args: Any, **kwargs: Any) -> Any:
            record = kwargs["record"]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if self.profile_step == record.step:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    out = original(*args, **kwargs)
                    torch.cuda.synchronize()
                self.profiled = count_launches(prof, len(record.losses))
            else:
                out = original(*args, **kwargs)
            torch.cuda.synchronize()
            self.nursing_calls.append((record.step, (time.perf_counter() - t0) * 1000, len(record.losses)))
            return out

        nursing.nurse_latent = timed

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s] {msg}", flush=True)

    def save(self) -> None:
        self.results["total_s"] = time.perf_counter() - self.started
        self.out.write_text(json.dumps(self.results, indent=1) + "\n", encoding="utf-8")

    def guarded(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``; an exception is recorded (and the run goes on) instead of ending the run."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # a benchmark records what failed and measures the rest
            import traceback

            self.results["errors"].append({"what": what, "error": f"{type(e).__name__}: {e}"})
            self.log(f"ERROR in {what}: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
            self.save()
            return None

    def over_budget(self, what: str, reserve_s: float = 0.0) -> bool:
        if time.perf_counter() - self.started < self.budget_s + reserve_s:
            return False
        self.results["skipped"].append(what)
        self.log(f"skipped (time budget): {what}")
        return True

    # ------------------------------------------------------------------ one call of each pipeline

    def reset(self) -> None:
        self.pipe.unet.set_attn_processor(dict(self.original))
        gc.collect()
        self.torch.cuda.empty_cache()
        self.torch.cuda.reset_peak_memory_stats()

    def scenario(self, steps: int, nursing: bool) -> Any:
        from scenarios import Scenario

        config = {"nursing": nursing, "centroid_alignment": True, "nursing_step_size": 1750.0}
        return Scenario(f"{steps}-{nursing}", config, steps=steps, height=1024, width=1024)

    def call(self, run: str, mode: str, nursing: bool | None, steps: int, output_type: str = "pil") -> tuple:
        """One call: (seconds, output)."""
        from authors import run_authors
        from scenarios import SUB_PROMPTS, SUBJECTS, authors_kwargs, initial_latent

        from detailpp import DetailConfig

        torch = self.torch
        s = self.scenario(steps, bool(nursing))
        self.reset()
        latents = initial_latent(s, torch.float16, "cuda")
        if run == AUTHORS:
            r = run_authors(
                self.modules,
                self.pipe.components,
                SUB_PROMPTS,
                SUBJECTS,
                latents=latents,
                record=False,
                pipe=self.authors_pipe,
                output_type=output_type,
                **authors_kwargs(s),
            )
            self.authors_pipe = r.pipe
            return r.seconds, r
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if run == PLAIN:
            out = self.plain(
                SUB_PROMPTS[0], height=1024, width=1024, num_inference_steps=steps, guidance_scale=7.5, latents=latents
            )
        else:
            out = self.pipe(
                plan=s.plan(),
                height=1024,
                width=1024,
                num_inference_steps=steps,
                guidance_scale=7.5,
                latents=latents,
                detail_config=DetailConfig(**s.config, nursing_graphs=mode.endswith("graphs")),
                output_type=output_type,
            )
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        return seconds, out

    def row(
        self, run: str, mode: str, nursing: bool | None, steps: int, label: str | None = None, reserve_s: float = 0
    ) -> None:
        """``repeats`` timed calls of one row: best seconds, peaks, the nursing passes' times."""
        if self.over_budget(f"{run} {mode} nursing={nursing} {steps} steps", reserve_s):
            return
        torch = self.torch
        times, peaks, reserved, nursing_ms = [], [], [], []
        for _ in range(self.repeats):
            self.nursing_calls.clear()
            seconds, _ = self.call(run, mode, nursing, steps)
            times.append(seconds)
            peaks.append(torch.cuda.max_memory_allocated() / 2**30)
            reserved.append(torch.cuda.max_memory_reserved() / 2**30)
            nursing_ms.append(list(self.nursing_calls))
        row = {
            "run": label or run,
            "mode": mode,
            "nursing": nursing,
            "steps": steps,
            "seconds": min(times),
            "all_seconds": times,
            "peak_gib": max(peaks),
            "peak_reserved_gib": max(reserved),
        }
        best = nursing_ms[times.index(min(times))]
        if best:
            row["nursing_passes"] = sum(n for _, _, n in best)
            row["nursing_ms"] = sum(ms for _, ms, _ in best)
            later = [(ms, n) for step, ms, n in best if step > 0]
            row["nursing_ms_per_pass_after_step0"] = sum(ms for ms, _ in later) / max(1, sum(n for _, n in later))
        self.results["rows"].append(row)
        extra = f", nursing {row['nursing_passes']} passes {row['nursing_ms']:.0f} ms" if best else ""
        self.log(f"{run} [{mode}] nursing={nursing} {steps} steps: {min(times):.2f} s, {max(peaks):.1f} GiB{extra}")
        self.save()

    def exact(self, key: str, compiled: bool) -> None:
        """Final latent and nursing losses with CUDA-graphed nursing against eager nursing (4 steps)."""
        mode = "compiled" if compiled else "eager"
        _, a = self.call(OURS, mode, True, 4, output_type="latent")
        _, b = self.call(OURS, mode + "+graphs", True, 4, output_type="latent")
        diff = (a.images.float() - b.images.float()).abs().max()
        self.results["exact"][key] = {
            "final_latent_equal": bool(self.torch.equal(a.images, b.images)),
            "final_max_abs": float(diff),
            "losses_equal": [r.losses for r in a.nursing] == [r.losses for r in b.nursing],
            "passes": sum(len(r.losses) for r in a.nursing),
        }
        self.log(f"exactness {key}: {self.results['exact'][key]}")
        self.save()

    def launches(self, mode: str) -> None:
        """Profile nursing step 1 of a 2-step call: host kernel launches and GPU kernels per pass."""
        self.profile_step = 1
        try:
            self.call(OURS, mode, True, 2, output_type="latent")
        finally:
            self.profile_step = None
        self.results["launches"][mode] = self.profiled
        self.log(f"launches per pass, {mode}: {self.profiled}")
        self.save()


def count_launches(prof: Any, passes: int) -> dict[str, float]:
    """Per pass: host-side kernel launches (runtime API calls), graph launches, and GPU kernels, from a profile."""
    import torch

    launches = graphs = kernels = 0
    gpu_us = 0.0
    for e in prof.events():
        name = e.name
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
            gpu_us += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        elif "GraphLaunch" in name:
            graphs += 1
        elif "LaunchKernel" in name or name in ("cuLaunchKernelEx", "cudaLaunchKernelExC"):
            launches += 1
    n = max(1, passes)
    return {
        "passes": passes,
        "host_kernel_launches_per_pass": launches / n,
        "graph_launches_per_pass": graphs / n,
        "gpu_kernels_per_pass": kernels / n,
        "gpu_busy_ms_per_pass": gpu_us / 1000 / n,
    }


def gpu_main(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("error: the GPU run needs a CUDA device")
        return 2
    from detailpp.method.compile import uncompile

    out = args.json or Path(os.environ.get("OUT", ".")) / "speed.json"
    bench = Bench(args.authors, out, args.budget_s)
    steps = args.steps
    bench.log("built")
    g = bench.guarded
    for run, mode, nursing in ROWS:  # warm-ups (eager); the backward pass has kernels of its own
        if mode in ("eager", "eager+graphs"):
            g(f"warm-up {run} {mode} {nursing}", bench.call, run, mode, nursing, 4)
    bench.log("warm")
    g("exactness eager", bench.exact, "eager", compiled=False)
    if os.environ.get("SPEED_PROFILE_EAGER", "1") == "1":
        g("launches eager", bench.launches, "eager")
    g("launches eager+graphs", bench.launches, "eager+graphs")
    for n in steps:
        for run, mode, nursing in ROWS:
            if mode.startswith("eager"):
                g(f"{run} {mode} {nursing} {n}", bench.row, run, mode, nursing, n)
    # compile_detail(): first calls, then the compiled rows
    compile_start = time.perf_counter()
    bench.pipe.compile_detail()
    for run, mode, nursing in ROWS:
        if mode.startswith("compiled") and not bench.over_budget(f"first call {run} {mode} {nursing}"):
            got = g(f"first call {run} {mode} {nursing}", bench.call, run, mode, nursing, steps[0])
            if got is not None:
                bench.results["first_calls"].append(
                    {"run": run, "mode": mode, "nursing": nursing, "steps": steps[0], "seconds": got[0]}
                )
                bench.log(f"first call {run} [{mode}] nursing={nursing}: {got[0]:.1f} s")
    bench.results["compile_section_s"] = time.perf_counter() - compile_start
    if not bench.over_budget("exactness compiled"):
        g("exactness compiled", bench.exact, "compiled", compiled=True)
        g("launches compiled+graphs", bench.launches, "compiled+graphs")
    for n in steps:
        for run, mode, nursing in ROWS:
            if mode.startswith("compiled"):
                g(f"{run} {mode} {nursing} {n}", bench.row, run, mode, nursing, n)
    uncompile(bench.pipe.unet)
    # the offloaded run (eager): 50 steps, 2 subjects, nursing on; nothing else left on the GPU
    bench.authors_pipe = None
    if not bench.over_budget("offload", reserve_s=OFFLOAD_RESERVE_S):
        bench.pipe.enable_model_cpu_offload()
        g(
            "offload",
            bench.row,
            OURS,
            "eager, enable_model_cpu_offload()",
            True,
            steps[-1],
            label=OURS,
            reserve_s=2 * OFFLOAD_RESERVE_S,
        )
    bench.save()
    print(markdown(bench.results))
    return 0


# ---------------------------------------------------------------------- the report


def find(rows: list[dict], run: str, mode: str, nursing: bool | None, steps: int) -> dict | None:
    for r in rows:
        if r["run"] == run and r["mode"] == mode and r["nursing"] == nursing and r["steps"] == steps:
            return r
    return None


def markdown(results: dict[str, Any]) -> str:
    """The table (ratios to eager plain SDXL and to the authors' eager pipeline at the same steps and nursing)."""
    rows, all_steps = results["rows"], sorted({r["steps"] for r in results["rows"]})
    v = results["versions"]
    head = "| run | mode | nursing | " + " | ".join(f"{n} steps s | x plain | x authors" for n in all_steps)
    lines = [
        f"{results['device']}, {results['date']}, torch {v['torch']}, diffusers {v['diffusers']}, transformers "
        f"{v['transformers']}, Python {v['python']}; authors' code at {results['authors_commit'][:7]}; best of "
        f"{results['repeats']}",
        "",
        head + f" | peak GiB ({all_steps[-1]}) | first call s ({all_steps[0]}) |",
        "|---|---|---|" + "---|---|---|" * len(all_steps) + "---|---|",
    ]
    first = {(f["run"], f["mode"], f["nursing"]): f["seconds"] for f in results.get("first_calls", [])}
    modes = list(dict.fromkeys((r["run"], r["mode"], r["nursing"]) for r in rows))
    for run, mode, nursing in modes:
        cells = []
        for n in all_steps:
            r = find(rows, run, mode, nursing, n)
            base = find(rows, PLAIN, "eager", None, n)
            auth = find(rows, AUTHORS, "eager", nursing, n)
            if r is None:
                cells += ["", "", ""]
                continue
            cells += [
                f"{r['seconds']:.2f}",
                f"{r['seconds'] / base['seconds']:.2f}" if base else "",
                f"{auth['seconds'] / r['seconds']:.2f}x faster" if auth and auth is not r else "",
            ]
        last = find(rows, run, mode, nursing, all_steps[-1])
        peak = f"{last['peak_gib']:.1f}" if last else ""
        f = first.get((run, mode, nursing))
        fc = f"{f:.1f}" if f is not None else ""
        nurse = "" if nursing is None else ("on" if nursing else "off")
        lines.append(f"| {run} | {mode} | {nurse} | " + " | ".join(cells) + f" | {peak} | {fc} |")
    lines += ["", "| nursing row | steps | passes | nursing ms | ms per pass | ms per pass, steps >= 1 |"]
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        if r.get("nursing_passes"):
            per = r["nursing_ms"] / r["nursing_passes"]
            lines.append(
                f"| {r['run']} [{r['mode']}] | {r['steps']} | {r['nursing_passes']} | {r['nursing_ms']:.0f} | "
                f"{per:.1f} | {r['nursing_ms_per_pass_after_step0']:.1f} |"
            )
    for mode, c in results.get("launches", {}).items():
        if c:
            lines.append(
                f"\nOne nursing step profiled ({mode}): per pass {c['host_kernel_launches_per_pass']:.0f} host kernel "
                f"launches, {c['graph_launches_per_pass']:.0f} graph launches, {c['gpu_kernels_per_pass']:.0f} GPU "
                f"kernels, GPU busy {c['gpu_busy_ms_per_pass']:.1f} ms."
            )
    for key, e in results.get("exact", {}).items():
        lines.append(
            f"\nCUDA-graphed nursing vs eager ({key}, 4 steps, {e['passes']} passes): final latent bit-identical: "
            f"{e['final_latent_equal']} (max abs {e['final_max_abs']:.3g}); nursing losses identical: "
            f"{e['losses_equal']}."
        )
    if results.get("skipped"):
        lines.append(f"\nSkipped (time budget): {', '.join(results['skipped'])}.")
    return "\n".join(lines)


def ratio_range(results: dict[str, Any], mode: str, nursing: bool) -> str:
    rows = results["rows"]
    got = []
    for n in sorted({r["steps"] for r in rows}):
        r, a = find(rows, OURS, mode, nursing, n), find(rows, AUTHORS, "eager", nursing, n)
        if r and a:
            got.append(a["seconds"] / r["seconds"])
    if not got:
        return "?"
    lo, hi = min(got), max(got)
    return f"{lo:.2f}x" if abs(hi - lo) < 0.005 else f"{lo:.2f}-{hi:.2f}x"


def headline(results: dict[str, Any]) -> str:
    """The README's one line: detailpp against the authors' pipeline, from the same run."""
    rows = results["rows"]
    peaks = [r["peak_gib"] for r in rows if r["run"] == OURS and r["mode"] == "eager"]
    theirs = [r["peak_gib"] for r in rows if r["run"] == AUTHORS]
    offload = [r for r in rows if "offload" in r["mode"]]
    off = f"; {offload[0]['peak_gib']:.1f} GiB with `enable_model_cpu_offload()`" if offload else ""
    return (
        f"Against the authors' pipeline (one {results['device']}, {results['date'][:10]}, full-size SDXL with random "
        f"weights, 1024x1024, fp16, 20 and 50 steps, the same 4-branch plan): detailpp is "
        f"**{ratio_range(results, 'eager', False)} faster** without nursing "
        f"({ratio_range(results, 'compiled', False)} after `pipe.compile_detail()`) and "
        f"**{ratio_range(results, 'eager+graphs', True)} faster** with every capped nursing pass, the passes "
        f"replayed as CUDA graphs (the default on a GPU; {ratio_range(results, 'compiled+graphs', True)} after "
        f"`pipe.compile_detail()`, {ratio_range(results, 'eager', True)} with `--eager-nursing`), at "
        f"{max(peaks, default=0):.1f} GiB against {max(theirs, default=0):.1f}{off}."
    )


def replace_between(path: Path, markers: tuple[str, str], text: str) -> None:
    from detailpp.atomic import atomic_write_text

    start, end = markers
    doc = path.read_text(encoding="utf-8")
    if start not in doc or end not in doc:
        raise SystemExit(f"{path} has no markers {start} ... {end}.")
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(path, f"{head}{start}\n{text}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--authors", type=Path, help="a checkout of clf28/Detail-plus-plus at e73155b (GPU run)")
    p.add_argument("--json", type=Path, help="where the GPU run's results go (default $OUT/speed.json)")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    p.add_argument("--budget-s", type=float, default=540.0, help="skip the rows that would start after this")
    p.add_argument("--report", type=Path, help="print the table of a results file (no GPU)")
    p.add_argument("--update-doc", type=Path, help="with --report: write the table between this file's markers")
    p.add_argument("--readme", type=Path, help="with --report: write the headline line between this file's markers")
    args = p.parse_args(argv)
    if args.report:
        results = json.loads(args.report.read_text(encoding="utf-8"))
        table = markdown(results)
        print(table)
        print()
        print(headline(results))
        if args.update_doc:
            replace_between(args.update_doc, TABLE_MARKERS, table)
        if args.readme:
            replace_between(args.readme, HEADLINE_MARKERS, headline(results))
        return 0
    if args.authors is None:
        p.error("the GPU run needs --authors CHECKOUT (or --report RESULTS.json)")
    return gpu_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
