"""Images per minute of `detailpp bench generate` on one GPU and on N GPUs (torchrun), and the scaling between them.

Runs the same command twice on the same prompts, each into its own folder under ``--out``:

1. one process: ``python -m detailpp.cli bench generate ... --out OUT/gpus-1``;
2. ``python -m torch.distributed.run --standalone --nproc_per_node N -m detailpp.cli bench generate ...
   --output-dir OUT/gpus-N`` (each rank takes the items ``i % N == rank``; Accelerate gives each its GPU).

The model is ``sdxl-random`` by default: SDXL base at full size with random weights
(:mod:`detailpp.models.full_size`), a speed/memory stand-in whose images are noise. With random weights nursing never
stops early, so Detail++ runs every capped nursing pass: a worst case. The plans come from
``benchmarks/plans/t2i-color.jsonl`` (written with ``detailpp bench plans --suite t2i-color``), so the GPU machine
needs no spaCy.

Figures per run, from the manifests' timings and the launch's wall clock:

- **generation** images/min: images / the busiest rank's generation time (sum of its ``generate_s + write_s``; the
  model load is timed apart by the runner and excluded);
- **wall** images/min: images / the launch's wall time (process start, imports, model build, process-group set-up,
  generation, barrier and manifest merge);
- steady s/image: the median ``generate_s`` without each rank's first image (which pays the CUDA warm-up);
- scaling: N-GPU images/min over 1-GPU images/min (efficiency = scaling / N);
- identical: how many images of the N-GPU run have the same sha256 as the 1-GPU run's; for the others, the largest
  and the mean absolute pixel difference (GPU kernels, e.g. in nursing's backward pass, need not be bit-exact).

Writes ``multi_gpu_scaling.json`` and one log per launch under ``--out`` (default ``$OUT``, else
``outputs/multi-gpu-scaling``); prints a Markdown table last. On the GPU machine (wheels from ``.whl/``)::

    . .whl/setup.sh && python3 benchmarks/multi_gpu_scaling.py --out $OUT

``--cpu-dry-run`` walks the same code on the CPU (tiny random SDXL, 2 processes over gloo, 2 steps, 64x64) in about a
minute, and fails unless the two runs' images are byte-identical.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("multi_gpu_scaling")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PLANS = ROOT / "benchmarks" / "plans" / "t2i-color.jsonl"
#: NVLink multicast stays off on shared machines (KINDS.md); children inherit these unless already set.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_out = os.environ.get("OUT") or str(ROOT / "outputs" / "multi-gpu-scaling")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(default_out), help="results folder (default $OUT)")
    p.add_argument("--gpus", type=int, default=2, help="processes of the multi-GPU launch (2)")
    p.add_argument("--suite", default="t2i-color", help="the bench suite (t2i-color)")
    p.add_argument("--prompts", type=int, default=8, help="the suite's first N prompts (8)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="(1)")
    p.add_argument("--methods", default="detailpp", help="comma-separated: detailpp, sdxl (detailpp)")
    p.add_argument("--model", default="sdxl-random", help="(sdxl-random: full size, random weights)")
    p.add_argument("--plans", type=Path, default=DEFAULT_PLANS, help="plans file for detailpp (no spaCy needed)")
    p.add_argument("--steps", type=int, default=50, help="(50)")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (1024)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--timeout-s", type=float, default=420.0, help="kill a launch after this long (420)")
    p.add_argument("--budget-s", type=float, default=510.0, help="start nothing and kill launches past this (510)")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny random SDXL on the CPU, gloo, 2 steps, 64x64")
    a = p.parse_args(argv)
    a.device = None
    if a.cpu_dry_run:
        a.model, a.device, a.dtype = "tiny-random", "cpu", "float32"
        a.steps, a.size, a.prompts = min(a.steps, 2), min(a.size, 64), min(a.prompts, 4)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = set(a.methods) - {"detailpp", "sdxl"}
    if unknown or not a.methods:
        p.error(f"--methods: unknown {sorted(unknown) or 'empty list'}")
    if a.gpus < 2:
        p.error("--gpus must be at least 2")
    return a


# --------------------------------------------------------------------------- launching


def bench_args(a: argparse.Namespace, method: str, out: Path) -> list[str]:
    args = ["bench", "generate", "--suite", a.suite, "--max-prompts", str(a.prompts)]
    args += ["--images-per-prompt", str(a.images_per_prompt), "--method", method, "--model", a.model]
    args += ["--steps", str(a.steps), "--height", str(a.size), "--width", str(a.size), "--dtype", a.dtype]
    args += ["--output-dir", str(out), "--quiet"]
    if method == "detailpp" and a.plans:
        args += ["--plans", str(a.plans)]
    if a.device:
        args += ["--device", a.device]
    return args


def command(a: argparse.Namespace, method: str, processes: int, out: Path) -> list[str]:
    cli = ["-m", "detailpp.cli", *bench_args(a, method, out)]
    if processes == 1:
        return [sys.executable, *cli]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return [sys.executable, *launcher, *cli]


def child_env(a: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in SAFE_ENV.items():
        env.setdefault(key, value)
    # the same CPU threads per process in both launches (torchrun would otherwise set 1 for its ranks only)
    env.setdefault("OMP_NUM_THREADS", "1" if a.cpu_dry_run else str(max(1, (os.cpu_count() or 2) // a.gpus)))
    src = str(ROOT / "src")
    if src not in env.get("PYTHONPATH", "").split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), src) if p)
    return env


def launch(cmd: list[str], env: dict[str, str], log_path: Path, timeout_s: float) -> tuple[int, float]:
    """Run ``cmd`` (its own process group, output to ``log_path``); (exit code, wall seconds). Killed at timeout."""
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.error("%s ran past %.0f s: stopping it", log_path.name, timeout_s)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    return rc, time.perf_counter() - t0


def fresh_folder(path: Path) -> None:
    """Remove an earlier run of this script (a bench folder) so that nothing is resumed; refuse anything else."""
    if path.exists():
        if not (path / "run.json").exists():
            raise SystemExit(f"{path} exists and is not a bench run folder; choose another --out.")
        shutil.rmtree(path)


# --------------------------------------------------------------------------- figures


def read_records(folder: Path) -> list[dict]:
    path = folder / "manifest.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_figures(records: list[dict], wall_s: float) -> dict[str, Any]:
    ranks: dict[int, list[dict]] = {}
    for r in records:
        ranks.setdefault(r["worker"]["rank"], []).append(r)
    per_rank = {}
    steady = []
    for rank, rs in sorted(ranks.items()):
        rs.sort(key=lambda r: r["item"])
        gen = sum(r["timings"]["generate_s"] + r["timings"]["write_s"] for r in rs)
        load = sum(r["timings"].get("load_s", 0.0) for r in rs)
        per_rank[rank] = {
            "images": len(rs),
            "generation_s": round(gen, 3),
            "load_s": round(load, 3),
            "first_image_s": rs[0]["timings"]["generate_s"],
            "device": rs[0]["worker"]["device"],
        }
        steady += [r["timings"]["generate_s"] for r in rs[1:]]
    n = len(records)
    busiest = max((v["generation_s"] for v in per_rank.values()), default=0.0)
    return {
        "images": n,
        "wall_s": round(wall_s, 2),
        "generation_s": round(busiest, 2),
        "load_s": max((v["load_s"] for v in per_rank.values()), default=None),
        "images_per_min_generation": round(60 * n / busiest, 3) if busiest else None,
        "images_per_min_wall": round(60 * n / wall_s, 3) if wall_s and n else None,
        "steady_s_per_image": round(statistics.median(steady), 3) if steady else None,
        "ranks": per_rank,
    }


def compare_images(one: Path, many: Path, records_one: list[dict], records_many: list[dict]) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    by_item = {r["item"]: r for r in records_many}
    same, diffs, missing = 0, [], 0
    for r in records_one:
        other = by_item.get(r["item"])
        if other is None:
            missing += 1
            continue
        if other["sha256"] == r["sha256"]:
            same += 1
            continue
        with Image.open(one / r["file"]) as x, Image.open(many / other["file"]) as y:
            d = np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16))
        diffs.append({"item": r["item"], "max_abs": int(d.max()), "mean_abs": round(float(d.mean()), 4)})
    return {
        "compared": len(records_one) - missing,
        "byte_identical": same,
        "missing": missing,
        "max_abs_pixel_diff": max((d["max_abs"] for d in diffs), default=0),
        "mean_abs_pixel_diff": round(statistics.mean(d["mean_abs"] for d in diffs), 4) if diffs else 0.0,
        "differing": diffs,
    }


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus_visible": torch.cuda.device_count(),
        "cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for name in ("diffusers", "transformers", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict[str, Any]) -> str:
    head = ["method", "GPUs", "images", "img/min gen", "img/min wall", "steady s/img", "load s", "wall s", "scaling"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, res in results["methods"].items():
        for key, run in res["runs"].items():
            scaling = "1.00x" if key == "1" else "-"
            if key != "1" and res.get("scaling"):
                s = res["scaling"]
                scaling = f"{fmt(s['generation'])}x gen, {fmt(s['wall'])}x wall"
            row = [
                method,
                key,
                str(run.get("images", 0)),
                fmt(run.get("images_per_min_generation")),
                fmt(run.get("images_per_min_wall")),
                fmt(run.get("steady_s_per_image")),
                fmt(run.get("load_s"), ".1f"),
                fmt(run.get("wall_s"), ".1f"),
                scaling,
            ]
            lines.append("| " + " | ".join(row) + " |")
    out = ["\n".join(lines)]
    for method, res in results["methods"].items():
        c = res.get("identical")
        if c:
            out.append(
                f"{method}: {c['byte_identical']} of {c['compared']} images byte-identical between 1 and "
                f"{results['settings']['gpus']} GPUs; max abs pixel diff {c['max_abs_pixel_diff']}, "
                f"mean {c['mean_abs_pixel_diff']}"
            )
        for err in res.get("errors", []):
            out.append(f"{method}: ERROR {err}")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if "detailpp" in a.methods and a.plans and not a.plans.is_file():
        raise SystemExit(
            f"no plans file {a.plans}: write it with `detailpp bench plans --suite {a.suite} --output ...`"
        )
    env = child_env(a)
    skip = ("out", "timeout_s", "budget_s")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k not in skip}
    results: dict[str, Any] = {"settings": settings, "methods": {}}
    t_start = time.perf_counter()
    for method in a.methods:
        res: dict[str, Any] = {"runs": {}, "errors": []}
        results["methods"][method] = res
        folders = {}
        for processes in (1, a.gpus):
            folder = a.out / f"{method}-gpus-{processes}"
            fresh_folder(folder)
            folders[processes] = folder
            cmd = command(a, method, processes, folder)
            log_path = a.out / f"{method}-gpus-{processes}.log"
            logger.info("%s, %d process(es): %s", method, processes, " ".join(cmd[1:]))
            left = a.budget_s - (time.perf_counter() - t_start)
            if left < 30:
                res["errors"].append(f"{processes} process(es): not run, the {a.budget_s:.0f} s budget is spent")
                logger.error("%s", res["errors"][-1])
                continue
            rc, wall = launch(cmd, env, log_path, min(a.timeout_s, left))
            records = read_records(folder)
            run = run_figures(records, wall)
            run.update({"exit_code": rc, "command": cmd[1:], "log": log_path.name})
            res["runs"][str(processes)] = run
            logger.info(
                "%s, %d process(es): exit %d, %d image(s), wall %.1f s, generation %.1f s, load %s s",
                method,
                processes,
                rc,
                run["images"],
                wall,
                run["generation_s"],
                run["load_s"],
            )
            if rc != 0:
                tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
                sys.stderr.write("\n".join(tail) + "\n")
                res["errors"].append(f"{processes} process(es): exit code {rc} (see {log_path.name})")
        one, many = res["runs"].get("1", {}), res["runs"].get(str(a.gpus), {})
        if one.get("images_per_min_generation") and many.get("images_per_min_generation"):
            g = many["images_per_min_generation"] / one["images_per_min_generation"]
            w = many["images_per_min_wall"] / one["images_per_min_wall"]
            res["scaling"] = {
                "generation": round(g, 3),
                "wall": round(w, 3),
                "efficiency_generation": round(g / a.gpus, 3),
                "efficiency_wall": round(w / a.gpus, 3),
            }
        res["identical"] = compare_images(
            folders[1], folders[a.gpus], read_records(folders[1]), read_records(folders[a.gpus])
        )
    results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    results["environment"] = environment()
    path = a.out / "multi_gpu_scaling.json"
    path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    e = results["environment"]
    sys.stdout.write(
        f"\n{e.get('gpu', 'cpu')} x{a.gpus} | torch {e['torch']} | diffusers {e['diffusers']} | {a.model}, "
        f"{a.suite} first {a.prompts} prompt(s) x {a.images_per_prompt}, {a.size}x{a.size} {a.dtype}, {a.steps} steps"
        f" | {results['elapsed_s']} s in all | {path}\n\n{table(results)}\n"
    )
    if any(res["errors"] for res in results["methods"].values()):
        raise SystemExit(1)
    if a.cpu_dry_run:
        for method, res in results["methods"].items():
            c = res["identical"]
            if c["byte_identical"] != c["compared"] or not c["compared"]:
                raise SystemExit(f"{method}: the {a.gpus}-process images differ from the 1-process ones: {c}")
    return results


if __name__ == "__main__":
    main()
