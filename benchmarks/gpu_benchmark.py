"""Speed and memory of Detail++ on one GPU: plain SDXL, our pipeline, the materialised-map mode, and the floor.

Builds SDXL at full size with *random* weights from its public configs (:mod:`detailpp.models.full_size`; nothing is
downloaded): same shapes, FLOPs and memory as the trained model, so every timing and memory figure holds for it. What
does not hold is what depends on the weights' values: with random weights the nursing loss never falls under its
early-stop thresholds, so nursing runs every capped iteration (6 + 6 + 6 + 6 + 6 + 3 at 50 steps): a worst case.

Measured on one card in one run, CUDA-event timing after warm-up (medians):

- the floor: the plain UNet forward at every batch size a run uses, one batch-1 forward + backward to the latent
  (full UNet, weights frozen and not; and truncated after the last mask block, as nursing runs it), the fp32 VAE
  decode of one 128x128 latent;
- plain ``StableDiffusionXLPipeline``, one image, 50 steps, 1024x1024, fp16 (VAE upcast as SDXL does);
- ``DetailPlusPlusPipeline`` for plans of 1, 2, 3 subjects (p0 + p1 + one branch per subject = 3, 4, 5 branches;
  CFG doubles the batch), nursing off/on, pruning on/off; the materialised-map reference mode on the same plans;
- per run: total seconds, ms per denoising step (in the sharing window and after it) against the floor at the same
  batch, nursing iterations and ms per iteration, VAE decode ms, peak memory (``torch.cuda.max_memory_allocated``,
  reset before each run);
- ``enable_model_cpu_offload()`` peak; a ``torch.profiler`` breakdown; ``torch.compile`` trials (regional
  compilation of the repeated transformer blocks as ``pipe.compile_detail()`` does it, Detail++'s processors inside
  them, and a processor-safe variant that compiles only resnets and feed-forwards), with dynamo's graph counts.

``--tiny`` runs every code path on the tiny random SDXL on the CPU (2 steps) in seconds: the test keeps this script
from rotting. Results go to ``--out`` (default ``$OUT`` or ``benchmarks/results/``) as JSON; a short table is
printed last. ``--report FILE.json`` prints the markdown table of an earlier run.

    python benchmarks/gpu_benchmark.py                  # on a GPU machine, about 6-9 minutes
    python benchmarks/gpu_benchmark.py --tiny --out /tmp/bench
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from detailpp.models.full_size import sdxl_components

# --------------------------------------------------------------------------- plans (hand-written: no spaCy needed)


def benchmark_plans() -> dict[int, Any]:
    """Plans of 1, 2 and 3 subjects: p0 + p1 + one branch per subject = 3, 4 and 5 branches."""
    from detailpp.plan import Branch, DecompositionPlan

    return {
        1: DecompositionPlan(
            prompt="a red teddy bear sitting on a table",
            base="a teddy bear sitting on a table",
            branches=(Branch("a red teddy bear sitting on a table", "teddy bear", ("red",)),),
        ),
        2: DecompositionPlan(
            prompt="a red teddy bear wearing a green tracksuit",
            base="a teddy bear wearing a tracksuit",
            branches=(
                Branch("a red teddy bear wearing a tracksuit", "teddy bear", ("red",)),
                Branch("a teddy bear wearing a green tracksuit", "tracksuit", ("green",)),
            ),
        ),
        3: DecompositionPlan(
            prompt="a red dog, a blue cat and a green bird",
            base="a dog, a cat and a bird",
            branches=(
                Branch("a red dog, a cat and a bird", "dog", ("red",)),
                Branch("a dog, a blue cat and a bird", "cat", ("blue",)),
                Branch("a dog, a cat and a green bird", "bird", ("green",)),
            ),
        ),
    }


# --------------------------------------------------------------------------- clocks


class Clock:
    """CUDA events on a GPU (asynchronous, no sync per mark), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30


def timed(clock: Clock, fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[list[float], float | None]:
    """Times (ms) of ``repeats`` calls after ``warmup`` calls, and the peak memory (GiB) over the timed calls."""
    for _ in range(warmup):
        fn()
    clock.reset_peak()
    marks = [clock.mark()]
    for _ in range(repeats):
        fn()
        marks.append(clock.mark())
    clock.sync()
    return [clock.ms(a, b) for a, b in zip(marks, marks[1:], strict=False)], clock.peak_gib()


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# --------------------------------------------------------------------------- the floor: bare UNet and VAE calls


class _Stop(Exception):
    pass


def unet_inputs(unet, batch: int, latent_hw: tuple[int, int], device, dtype, seed: int = 0) -> dict[str, Any]:
    c = unet.config
    g = torch.Generator(device).manual_seed(seed)
    text_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    h, w = latent_hw
    size = [h * 8, w * 8]
    return {
        "sample": torch.randn(batch, c.in_channels, h, w, generator=g, device=device, dtype=dtype),
        "timestep": torch.tensor(999.0, device=device),
        "encoder_hidden_states": torch.randn(
            batch, 77, c.cross_attention_dim, generator=g, device=device, dtype=dtype
        ),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, text_dim, generator=g, device=device, dtype=dtype),
            "time_ids": torch.tensor([size + [0, 0] + size], device=device, dtype=dtype).repeat(batch, 1),
        },
    }


def frozen(module: torch.nn.Module, freeze: bool = True):
    """The pipeline's own weight freezing (what nursing uses), or nothing."""
    from detailpp.method.backbone import frozen_parameters

    return frozen_parameters(module) if freeze else contextlib.nullcontext()


def forward_backward(unet, inputs: dict[str, Any], stop_after: str | None = None) -> torch.Tensor:
    """Gradient of a scalar of the UNet's output (or of ``stop_after``'s output) with respect to the latent."""
    x = inputs["sample"].detach().requires_grad_(True)
    captured: list[torch.Tensor] = []
    handle = None
    if stop_after is not None:

        def hook(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        handle = unet.get_submodule(stop_after).register_forward_hook(hook)
    try:
        with torch.enable_grad():
            try:
                out = unet(**{**inputs, "sample": x}, return_dict=False)[0]
            except _Stop:
                out = captured[0]
            loss = out.float().square().mean()
            (grad,) = torch.autograd.grad(loss, x)
    finally:
        if handle is not None:
            handle.remove()
    return grad


def measure_floor(pipe, clock: Clock, args, batches: list[int], log: Callable[[str], None]) -> dict[str, Any]:
    from detailpp.backbones.unet import find_mask_layers

    unet, device, dtype = pipe.unet, pipe.unet.device, pipe.unet.dtype
    hw = (args.size // 8, args.size // 8)
    out: dict[str, Any] = {"unet_forward": {}, "unet_forward_peak_gib": {}}
    n = args.floor_repeats
    for b in batches:
        inputs = unet_inputs(unet, b, hw, device, dtype)
        with torch.no_grad():
            ms, peak = timed(clock, lambda inputs=inputs: unet(**inputs, return_dict=False), n, warmup=2)
        out["unet_forward"][b] = median(ms)
        out["unet_forward_peak_gib"][b] = peak
        log(f"floor: UNet forward batch {b}: {median(ms):.1f} ms (peak {fmt_gib(peak)})")
    last_block = find_mask_layers(unet).last_block
    inputs = unet_inputs(unet, 1, hw, device, dtype)
    for name, stop, freeze in [
        ("fwd_bwd_b1_full_frozen", None, True),
        ("fwd_bwd_b1_full_grad_weights", None, False),
        ("fwd_bwd_b1_truncated_frozen", last_block, True),
        ("fwd_bwd_b1_truncated_grad_weights", last_block, False),
    ]:
        with frozen(unet, freeze):
            ms, peak = timed(clock, lambda stop=stop: forward_backward(unet, inputs, stop), n, warmup=2)
        out[name] = median(ms)
        out[name + "_peak_gib"] = peak
        log(f"floor: {name}: {median(ms):.1f} ms (peak {fmt_gib(peak)})")
    out["truncated_after"] = last_block

    vae = pipe.vae
    latent = torch.randn(
        1, 4, *hw, device=device, dtype=torch.float32, generator=torch.Generator(device).manual_seed(0)
    )
    vae_dtype = vae.dtype
    vae.to(torch.float32)
    with torch.no_grad():
        ms, peak = timed(clock, lambda: vae.decode(latent, return_dict=False), max(3, n // 2), warmup=1)
    vae.to(vae_dtype)
    out["vae_decode_fp32"] = median(ms)
    out["vae_decode_fp32_peak_gib"] = peak
    log(f"floor: VAE decode fp32: {median(ms):.1f} ms (peak {fmt_gib(peak)})")
    return out


# --------------------------------------------------------------------------- pipeline runs with per-step events


@dataclass
class RunTrace:
    """Events recorded during one pipeline call: UNet call starts (with batch), step ends, VAE decodes."""

    clock: Clock
    events: list[tuple[str, int, Any]] = field(default_factory=list)

    def unet_pre_hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.events.append(("unet", int(sample.shape[0]), self.clock.mark()))

    def step_end(self, pipe, i, t, tensors):
        self.events.append(("step", int(i), self.clock.mark()))
        return {}

    def analyse(self, start: Any, end: Any) -> dict[str, Any]:
        """Per step: denoising ms (first batch>1 UNet call to step end), its batches, nursing ms and passes."""
        ms = self.clock.ms
        steps: list[dict[str, Any]] = []
        seg: list[tuple[str, int, Any]] = []
        vae_ms = 0.0
        vae_start = None
        for kind, value, ev in self.events:
            if kind == "vae_start":
                vae_start = ev
            elif kind == "vae_end":
                vae_ms += ms(vae_start, ev)
            elif kind == "unet":
                seg.append((kind, value, ev))
            elif kind == "step":
                nurse = [e for k, b, e in seg if b == 1]
                denoise = [(b, e) for k, b, e in seg if b > 1]
                step: dict[str, Any] = {"step": value, "batches": [b for b, _ in denoise]}
                if denoise:
                    step["denoise_ms"] = ms(denoise[0][1], ev)
                if nurse:
                    step["nursing_passes"] = len(nurse)
                    step["nursing_ms"] = ms(nurse[0], denoise[0][1] if denoise else ev)
                steps.append(step)
                seg = []
        first_unet = next((e for k, _, e in self.events if k == "unet"), None)
        return {
            "total_ms": ms(start, end),
            "before_loop_ms": ms(start, first_unet) if first_unet is not None else None,
            "vae_decode_ms": vae_ms,
            "steps": steps,
        }


@contextlib.contextmanager
def traced(pipe, clock: Clock) -> Iterator[RunTrace]:
    trace = RunTrace(clock)
    handle = pipe.unet.register_forward_pre_hook(trace.unet_pre_hook, with_kwargs=True)
    vae = pipe.vae
    original = vae.decode

    def decode(*a, **k):
        trace.events.append(("vae_start", 0, clock.mark()))
        result = original(*a, **k)
        trace.events.append(("vae_end", 0, clock.mark()))
        return result

    vae.decode = decode
    try:
        yield trace
    finally:
        handle.remove()
        del vae.decode


def run_once(pipe, clock: Clock, call: Callable[[Callable], Any]) -> tuple[dict[str, Any], Any]:
    """One timed pipeline call; ``call(callback)`` runs it with ``callback_on_step_end=callback``."""
    with traced(pipe, clock) as trace:
        start = clock.mark()
        output = call(trace.step_end)
        end = clock.mark()
        clock.sync()
    return trace.analyse(start, end), output


def summarise(runs: list[dict[str, Any]], floor: dict[str, Any], share_steps: int | None) -> dict[str, Any]:
    """Medians over repeats; per-step medians pooled over repeats; ratios to the floor at the same batches."""
    fwd = {int(k): v for k, v in floor["unet_forward"].items()}
    res: dict[str, Any] = {"repeats": len(runs), "total_s": median([r["total_ms"] for r in runs]) / 1e3}
    res["total_s_all"] = [round(r["total_ms"] / 1e3, 4) for r in runs]
    res["vae_decode_ms"] = median([r["vae_decode_ms"] for r in runs])
    res["before_loop_ms"] = median([r["before_loop_ms"] for r in runs if r["before_loop_ms"] is not None])
    in_win, post, loop, floor_ms = [], [], [], []
    batches_in, batches_post = set(), set()
    for r in runs:
        lp, fl = 0.0, 0.0
        for s in r["steps"]:
            if "denoise_ms" not in s:
                continue
            lp += s["denoise_ms"]
            fl += sum(fwd.get(b, math.nan) for b in s["batches"])
            window = share_steps is not None and s["step"] < share_steps
            (in_win if window else post).append(s["denoise_ms"])
            (batches_in if window else batches_post).add(tuple(s["batches"]))
        loop.append(lp)
        floor_ms.append(fl)
    res["loop_s"] = median(loop) / 1e3
    res["loop_floor_s"] = median(floor_ms) / 1e3
    res["loop_vs_floor"] = median(loop) / median(floor_ms)
    for name, xs, bs in (("in_window", in_win, batches_in), ("post_window", post, batches_post)):
        if not xs:
            continue
        res[f"{name}_step_ms"] = median(xs)
        res[f"{name}_batches"] = sorted(bs)
        floor_step = [sum(fwd.get(b, math.nan) for b in batch) for batch in bs]
        if len(floor_step) == 1:
            res[f"{name}_floor_ms"] = floor_step[0]
            res[f"{name}_step_vs_floor"] = median(xs) / floor_step[0]
    passes = [sum(s.get("nursing_passes", 0) for s in r["steps"]) for r in runs]
    if any(passes):
        nursing_ms = [sum(s.get("nursing_ms", 0.0) for s in r["steps"]) for r in runs]
        res["nursing_passes"] = median(passes)
        res["nursing_passes_per_step"] = [
            s.get("nursing_passes", 0) for s in runs[0]["steps"] if "nursing_passes" in s
        ]
        res["nursing_s"] = median(nursing_ms) / 1e3
        res["nursing_iteration_ms"] = median([m / p for m, p in zip(nursing_ms, passes, strict=True)])
        for key in ("fwd_bwd_b1_full_frozen", "fwd_bwd_b1_full_grad_weights", "fwd_bwd_b1_truncated_frozen"):
            if floor.get(key):
                res[f"nursing_iteration_vs_{key}"] = res["nursing_iteration_ms"] / floor[key]
    return res


# --------------------------------------------------------------------------- the benchmark


def fmt_gib(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} GiB"


class Benchmark:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.device = torch.device(args.device)
        self.dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
        self.clock = Clock(self.device)
        self.out_dir = Path(args.out)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out_dir / "gpu_benchmark.json"
        self.results: dict[str, Any] = {"meta": {}, "floor": {}, "runs": {}, "sections": {}, "errors": {}}
        self.log_lines: list[str] = []

    # ---- bookkeeping

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        self.log_lines.append(line)

    def save(self) -> None:
        self.results["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        self.json_path.write_text(json.dumps(self.results, indent=1, default=str))
        (self.out_dir / "gpu_benchmark.log").write_text("\n".join(self.log_lines) + "\n")

    def time_left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def section(self, name: str, needs_s: float, fn: Callable[[], Any]) -> Any:
        if self.time_left() < needs_s:
            self.log(f"SKIP {name}: {self.time_left():.0f} s left of the budget, it needs about {needs_s:.0f} s")
            self.results["sections"][name] = "skipped (time budget)"
            self.save()
            return None
        started = self.elapsed()
        try:
            value = fn()
            self.results["sections"][name] = f"done in {self.elapsed() - started:.1f} s"
            return value
        except Exception as e:  # keep going: one broken section must not lose the others' numbers
            self.log(f"ERROR in {name}: {type(e).__name__}: {e}")
            self.results["errors"][name] = traceback.format_exc()
            self.results["sections"][name] = f"error: {type(e).__name__}: {e}"
            return None
        finally:
            self.save()

    # ---- set-up

    def build(self) -> None:
        from diffusers import StableDiffusionXLPipeline

        from detailpp.pipelines.sdxl import DetailPlusPlusPipeline

        a = self.args
        if a.tiny:
            from detailpp.models.tiny import tiny_components

            components = tiny_components(seed=0)
            for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
                components[name].to(device=self.device, dtype=self.dtype)
        else:
            components = sdxl_components(self.device, self.dtype)
        self.clock.sync()
        kw = {"force_zeros_for_empty_prompt": True, "add_watermarker": False}
        self.sdxl = StableDiffusionXLPipeline(**components, **kw)
        self.detail = DetailPlusPlusPipeline(**components, **kw)
        for p in (self.sdxl, self.detail):
            p.set_progress_bar_config(disable=True)
        self.plans = benchmark_plans()
        counts = {k: sum(p.numel() for p in components[k].parameters()) for k in ("unet", "vae", "text_encoder")}
        counts["text_encoder_2"] = sum(p.numel() for p in components["text_encoder_2"].parameters())
        import diffusers
        import transformers

        meta = self.results["meta"]
        meta.update(
            {
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "mode": "tiny" if a.tiny else "sdxl-full-size-random-weights",
                "device": torch.cuda.get_device_name()
                if self.device.type == "cuda"
                else platform.processor() or "cpu",
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
                "dtype": a.dtype,
                "size": a.size,
                "steps": a.steps,
                "guidance_scale": 5.0,
                "parameters": counts,
                "sdpa_backends": sdpa_backends(),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "note": "random weights: nursing never meets its early-stop thresholds, so it runs every capped "
                "iteration (a worst case); timings and memory do not depend on the weights' values",
            }
        )
        weights = torch.cuda.memory_allocated() / 2**30 if self.clock.cuda else None
        self.log(f"built on {meta['device']}: {counts}; weights {fmt_gib(weights)}")

    def check_finite(self) -> None:
        """Random weights must keep fp16 activations finite, else timings would be of NaN paths."""
        hw = (self.args.size // 8,) * 2
        u = self.detail.unet
        with torch.no_grad():
            eps = u(**unet_inputs(u, 2, hw, self.device, self.dtype), return_dict=False)[0]
        grad = forward_backward(u, unet_inputs(u, 1, hw, self.device, self.dtype))
        stats = {"eps_abs_max": float(eps.abs().max()), "grad_abs_max": float(grad.abs().max())}
        self.results["meta"]["finite_check"] = stats
        self.log(f"finite check: {stats}")
        if not all(math.isfinite(v) for v in stats.values()):
            raise FloatingPointError(f"random-weight UNet produced non-finite values in {self.args.dtype}: {stats}")

    # ---- runs

    def _caller(self, pipe, steps: int | None, **inputs: Any) -> Callable[[Callable], Any]:
        """A call of ``pipe`` with the run's size, steps, output type and a fresh seed-0 generator per call."""
        a = self.args

        def call(callback):
            return pipe(
                **inputs,
                num_inference_steps=steps or a.steps,
                height=a.size,
                width=a.size,
                generator=torch.Generator(self.device).manual_seed(0),
                output_type=a.output_type,
                callback_on_step_end=callback,
            )

        return call

    def call_sdxl(self, steps: int | None = None) -> Callable[[Callable], Any]:
        return self._caller(self.sdxl, steps, prompt=self.plans[2].prompt)

    def call_detail(self, subjects: int, config, steps: int | None = None) -> Callable[[Callable], Any]:
        return self._caller(self.detail, steps, plan=self.plans[subjects], detail_config=config)

    def measure(self, name: str, pipe, call, repeats: int, config=None, extra: dict | None = None) -> dict[str, Any]:
        from detailpp.config import DetailConfig

        runs, peaks, nursing = [], [], None
        for _ in range(repeats):
            self.clock.reset_peak()
            try:
                trace, output = run_once(pipe, self.clock, call)
            except FloatingPointError as e:
                if config is None or not config.nursing:
                    raise
                # Random weights can make a nursing update overflow fp16; the cost does not depend on alpha.
                self.log(f"{name}: {e}; retrying with nursing_step_size=1.0")
                config = config.replace(nursing_step_size=1.0)
                extra = {**(extra or {}), "nursing_step_size": 1.0}
                call = self.call_detail(extra["subjects"], config)
                trace, output = run_once(pipe, self.clock, call)
            peaks.append(self.clock.peak_gib())
            runs.append(trace)
            nursing = getattr(output, "nursing", None)
        cfg = config if isinstance(config, DetailConfig) else None
        share = cfg.num_share_steps(self.args.steps) if cfg is not None else None
        res = summarise(runs, self.results["floor"], share)
        res["peak_gib"] = max(peaks) if peaks[0] is not None else None
        if nursing:
            res["nursing_records"] = [
                {
                    "step": r.step,
                    "passes": len(r.losses),
                    "updates": r.updates,
                    "threshold": round(r.threshold, 3),
                    "first_loss": round(r.losses[0], 3),
                    "last_loss": round(r.losses[-1], 3),
                }
                for r in nursing
            ]
        res.update(extra or {})
        res["per_step_first_run"] = runs[0]["steps"]
        self.results["runs"][name] = res
        self.log(
            f"{name}: {res['total_s']:.3f} s (runs {res['total_s_all']}), loop/floor {res['loop_vs_floor']:.3f}, "
            f"in-window {res.get('in_window_step_ms', float('nan')):.1f} ms, "
            f"post {res.get('post_window_step_ms', float('nan')):.1f} ms, "
            f"nursing {res.get('nursing_passes', 0)} passes x {res.get('nursing_iteration_ms', float('nan')):.1f} ms, "
            f"VAE {res['vae_decode_ms']:.1f} ms, peak {fmt_gib(res['peak_gib'])}"
        )
        self.save()
        return res

    def grid(self) -> list[tuple[str, int, Any, int]]:
        """(name, subjects, config, repeats): the headline runs get ``--repeats``, the rest ``--grid-repeats``."""
        from detailpp.config import DetailConfig

        a = self.args
        on = DetailConfig()
        off = DetailConfig(nursing=False)
        rows = []
        for k in (1, 2, 3):
            head = a.repeats if k == 2 else a.grid_repeats
            rows.append((f"detail_{k}subj_nursing_off_pruned", k, off, head))
            rows.append((f"detail_{k}subj_nursing_off_unpruned", k, off.replace(prune_branches=False), a.grid_repeats))
            rows.append((f"detail_{k}subj_nursing_on_pruned", k, on, head))
        rows.append(("detail_2subj_nursing_on_unpruned", 2, on.replace(prune_branches=False), a.grid_repeats))
        for k in (1, 2, 3):
            rows.append(
                (
                    f"materialised_{k}subj_nursing_off_pruned",
                    k,
                    off.replace(materialised_attention=True),
                    a.repeats if k == 2 else a.grid_repeats,
                )
            )
        materialised = on.replace(materialised_attention=True)
        rows.append(("materialised_2subj_nursing_on_pruned", 2, materialised, a.grid_repeats))
        if a.quick:
            keep = (
                "detail_2subj_nursing_off_unpruned",
                "detail_2subj_nursing_on_pruned",
                "materialised_2subj_nursing_on_pruned",
            )
            rows = [r for r in rows if r[0] in keep]
        return rows

    def warm_up(self) -> None:
        """One short call of every pipeline shape (first cuBLAS/cuDNN/flash calls, allocator growth)."""
        from detailpp.config import DetailConfig

        if self.args.quick:
            return
        short = max(2, min(self.args.steps, 4))
        run_once(self.sdxl, self.clock, self.call_sdxl(short))
        for k in (1, 2, 3):
            for ref in (False, True):
                cfg = DetailConfig(
                    materialised_attention=ref,
                    nursing_steps=1,
                    nursing_max_iterations_early=1,
                    nursing_max_iterations_late=1,
                    share_steps=0.5,
                )
                run_once(self.detail, self.clock, self.call_detail(k, cfg, short))
        self.log("warm-up done")

    def offload(self) -> None:
        from detailpp.config import DetailConfig

        pipe = self.detail
        pipe.enable_model_cpu_offload(device=self.device)
        try:
            self.measure(
                "detail_2subj_nursing_on_pruned_cpu_offload",
                pipe,
                self.call_detail(2, DetailConfig()),
                1,
                DetailConfig(),
                {"subjects": 2, "branches": 4},
            )
        finally:
            pipe.remove_all_hooks()
            pipe.to(self.device)
            for p in (self.sdxl, self.detail):  # enable_model_cpu_offload changed the shared modules' placement
                p.to(self.device)

    # ---- profile

    def profile(self) -> None:
        """Where the time goes: bare UNet forward vs a Detail++-armed forward (batch 2B, sharing + capture), and one
        nursing pass vs the truncated batch-1 forward+backward floor; top kernels go to profile_*.txt."""
        from torch.profiler import ProfilerActivity, profile

        from detailpp.backbones.unet import find_mask_layers
        from detailpp.backbones.unet_attention import detail_processors
        from detailpp.config import DetailConfig
        from detailpp.method.attention import AttentionState, CaptureSpec
        from detailpp.method.backbone import StopForward, stop_after
        from detailpp.method.nursing import nursing_loss

        unet, hw = self.detail.unet, (self.args.size // 8,) * 2
        layers = find_mask_layers(unet)
        state = AttentionState(layers, layers.token_grid(*hw))
        plan = self.detail.prepare_plan(None, self.plans[2], DetailConfig())
        n = len(plan.prompts)
        b2 = unet_inputs(unet, 2 * n, hw, self.device, self.dtype)
        b1 = unet_inputs(unet, 1, hw, self.device, self.dtype)
        tokens = [list(b.subject_token_indices) for b in plan.branches]
        plen = len(self.detail.tokenizer(plan.prompt).input_ids) - 2
        cfg = DetailConfig()

        def plain():
            with torch.no_grad():
                unet(**b2, return_dict=False)

        capture = CaptureSpec(rows=[n + 1, n + 2], tokens=tokens)  # made once, as the pipeline does per image
        nursing_capture = CaptureSpec(rows=[0], tokens=[], full=True)

        def armed():
            state.begin(share=[(n, 2 * n)], capture=capture, device=self.device)
            with torch.no_grad():
                unet(**b2, return_dict=False)
            state.end()

        def nursing_pass():
            z = b1["sample"].detach().requires_grad_(True)
            state.begin(capture=nursing_capture, device=self.device)
            with torch.enable_grad(), stop_after(unet, layers.last_block):
                try:
                    unet(**{**b1, "sample": z}, return_dict=False)
                except StopForward:
                    pass
                state.end(expect_self=False)
                loss = nursing_loss(state.mean_full_probs(), tokens, plen, state.grid, cfg)
                float(loss.detach())
                torch.autograd.grad(loss, z)

        def truncated():
            forward_backward(unet, b1, layers.last_block)

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.clock.cuda else [])
        summary: dict[str, Any] = {}
        calls = 1 if self.args.quick else 2
        (self.out_dir / "gpu_benchmark_profiles.txt").write_text("")
        cases = [
            (f"unet_forward_b{2 * n}", plain, False, False),
            (f"detail_armed_forward_b{2 * n}", armed, False, True),
            ("nursing_pass_grad_weights", nursing_pass, False, True),
            ("nursing_pass_frozen", nursing_pass, True, True),
            ("truncated_fwd_bwd_frozen", truncated, True, False),
        ]
        for name, fn, freeze, with_processors in cases:
            ctx = detail_processors(unet, state) if with_processors else contextlib.nullcontext()
            with ctx, frozen(unet, freeze):
                ms, _ = timed(self.clock, fn, self.args.floor_repeats, warmup=0 if self.args.quick else 2)
                with profile(activities=activities) as prof:
                    for _ in range(calls):
                        fn()
                    self.clock.sync()
            events = prof.key_averages()
            if self.clock.cuda:
                kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
                busy_us = sum(e.self_device_time_total for e in kernels)
                count = sum(e.count for e in kernels)
                sort = "self_device_time_total"
            else:
                busy_us = sum(e.self_cpu_time_total for e in events)
                count = None
                sort = "self_cpu_time_total"
            with open(self.out_dir / "gpu_benchmark_profiles.txt", "a") as fh:
                fh.write(f"==== {name}: wall {median(ms):.2f} ms per call ({calls} calls profiled)\n")
                fh.write(events.table(sort_by=sort, row_limit=25) + "\n\n")
            summary[name] = {
                "wall_ms": median(ms),
                "device_busy_ms": busy_us / calls / 1e3,
                "kernels_per_call": count / calls if count else None,
            }
            self.log(
                f"profile {name}: wall {median(ms):.1f} ms, busy {busy_us / calls / 1e3:.1f} ms, "
                f"kernels/call {summary[name]['kernels_per_call']}"
            )
        self.results["profile"] = summary

    # ---- torch.compile

    def compile_trial(self) -> None:
        from detailpp.config import DetailConfig
        from detailpp.method.compile import recompile_limit_key, uncompile

        a = self.args
        unet = self.detail.unet
        import torch._dynamo

        limit_key = recompile_limit_key()
        recompile_limit = getattr(torch._dynamo.config, limit_key)
        trials = {}
        eager = {
            k: self.results["runs"].get(k, {}).get("total_s")
            for k in ("plain_sdxl", "detail_2subj_nursing_off_pruned")
        }
        off = DetailConfig(nursing=False)
        variants = [("regional", compile_regional), ("processor_safe", compile_processor_safe)]
        if a.tiny:  # the smoke test: the variant the pipeline offers
            variants = variants[:1]
        c = torch._dynamo.utils.counters
        for variant, compile_fn in variants:
            if self.time_left() < a.compile_min_s:
                trials[variant] = "skipped (time budget)"
                continue
            torch._dynamo.reset()
            c.clear()
            compiled = compile_fn(unet, backend=a.compile_backend)
            res: dict[str, Any] = {"compiled_modules": len(compiled)}
            try:
                for label, pipe, make, cfg, eager_key in [
                    ("plain_sdxl", self.sdxl, lambda s=None: self.call_sdxl(s), None, "plain_sdxl"),
                    (
                        "detail_2subj_nursing_off_pruned",
                        self.detail,
                        lambda s=None: self.call_detail(2, off, s),
                        off,
                        "detail_2subj_nursing_off_pruned",
                    ),
                ]:
                    if self.time_left() < a.compile_min_s / 2:
                        res[label] = "skipped (time budget)"
                        continue
                    graphs_before = c["stats"]["unique_graphs"]
                    t = time.perf_counter()
                    first, _ = run_once(pipe, self.clock, make())
                    first_s = time.perf_counter() - t
                    graphs_first = c["stats"]["unique_graphs"]
                    runs = [run_once(pipe, self.clock, make())[0] for _ in range(a.compile_repeats)]
                    steady = median([r["total_ms"] for r in runs]) / 1e3
                    r = {
                        "first_call_s": first_s,
                        "compile_s_estimate": first_s - steady,
                        "steady_total_s": steady,
                        "eager_total_s": eager[eager_key],
                        "speedup": eager[eager_key] / steady if eager[eager_key] else None,
                        "steady_in_window_step_ms": summarise(
                            runs, self.results["floor"], cfg.num_share_steps(a.steps) if cfg else None
                        ).get("in_window_step_ms"),
                        # graphs made by the first call, and by the later calls (0: no recompile)
                        "graphs_first_call": graphs_first - graphs_before,
                        "graphs_later_calls": c["stats"]["unique_graphs"] - graphs_first,
                    }
                    res[label] = r
                    self.log(
                        f"compile {variant} {label}: first call {first_s:.1f} s, steady {steady:.3f} s "
                        f"(eager {eager[eager_key]}), speed-up {r['speedup']}"
                    )
                    self.save()
                res["dynamo"] = {
                    "unique_graphs": c["stats"].get("unique_graphs"),
                    "graph_breaks": sum(c["graph_break"].values()),
                    "graph_break_reasons": dict(list(c["graph_break"].items())[:8]),
                    "recompile_limit_hits": sum(v for k, v in c["frames"].items() if "limit" in str(k)) or None,
                }
            except Exception as e:
                res["error"] = f"{type(e).__name__}: {e}"
                self.results["errors"][f"compile_{variant}"] = traceback.format_exc()
                self.log(f"compile {variant}: ERROR {res['error']}")
            finally:
                uncompile(unet)
                torch._dynamo.reset()
                setattr(torch._dynamo.config, limit_key, recompile_limit)
            trials[variant] = res
            self.results["compile"] = trials
            self.save()
        self.results["compile"] = trials

    # ---- main

    def run(self) -> dict[str, Any]:
        a = self.args
        self.build()
        self.section("finite_check", 0, self.check_finite)
        batches = sorted({2} | {2 * (k + 2) for k in self.plans} | {2 * (k + 1) for k in self.plans})
        if a.quick:
            batches = [2, 8]
        floor = self.section("floor", 0, lambda: measure_floor(self.detail, self.clock, a, batches, self.log))
        self.results["floor"] = floor or {"unet_forward": {}}
        self.section("warm_up", 0, self.warm_up)
        self.section(
            "plain_sdxl",
            0,
            lambda: self.measure(
                "plain_sdxl", self.sdxl, self.call_sdxl(), a.repeats, extra={"subjects": 0, "branches": 1}
            ),
        )
        for name, k, cfg, repeats in self.grid():
            self.section(
                name,
                20 if not a.tiny else 0,
                lambda name=name, k=k, cfg=cfg, repeats=repeats: self.measure(
                    name, self.detail, self.call_detail(k, cfg), repeats, cfg, {"subjects": k, "branches": k + 2}
                ),
            )
        if self.clock.cuda:
            self.section("cpu_offload", 40, self.offload)
        self.section("profile", 20 if not a.tiny else 0, self.profile)
        if not a.no_compile:
            self.section("compile", a.compile_min_s, self.compile_trial)
        self.results["targets"] = targets(self.results)
        self.save()
        return self.results


def sdpa_backends() -> dict[str, bool] | None:
    try:
        b = torch.backends.cuda
        return {
            "flash": b.flash_sdp_enabled(),
            "mem_efficient": b.mem_efficient_sdp_enabled(),
            "math": b.math_sdp_enabled(),
        }
    except Exception:
        return None


# --------------------------------------------------------------------------- compile variants


def compile_regional(unet, **compile_kwargs) -> list[torch.nn.Module]:
    """Regional compilation as ``DetailPlusPlusPipeline.compile_detail()`` does it: every ``BasicTransformerBlock``
    (the attention processors inside it too), as diffusers' ``unet.compile_repeated_blocks()``, with dynamo's
    recompile limit raised so that plain SDXL's and each Detail++ configuration's graphs all stay compiled."""
    from detailpp.method.compile import compile_detail

    return [unet.get_submodule(name) for name in compile_detail(unet, **compile_kwargs)]


def compile_processor_safe(unet, **compile_kwargs) -> list[torch.nn.Module]:
    """Compile only the modules that hold no attention processor (resnets, feed-forwards): Detail++'s processors
    (Python state, per-call objects) stay eager, so nothing recompiles when they change."""
    names = ("ResnetBlock2D", "FeedForward")
    mods = [m for m in unet.modules() if m.__class__.__name__ in names]
    for m in mods:
        m.compile(**compile_kwargs)
    return mods


# --------------------------------------------------------------------------- targets and the table


def targets(r: dict[str, Any]) -> dict[str, Any]:
    runs, floor = r["runs"], r.get("floor") or {}
    out: dict[str, Any] = {}

    def get(name, key):
        return (runs.get(name) or {}).get(key)

    steps = [
        (name, v["in_window_step_vs_floor"])
        for name, v in runs.items()
        if name.startswith("detail_") and "in_window_step_vs_floor" in v and "offload" not in name
    ]
    if steps:
        worst = max(steps, key=lambda x: x[1])
        out["step_vs_floor<=1.08"] = {
            "worst": worst[0],
            "value": round(worst[1], 4),
            "met": worst[1] <= 1.08,
            "all": {n: round(v, 4) for n, v in steps},
        }
    plain = get("plain_sdxl", "total_s")
    d2 = get("detail_2subj_nursing_off_pruned", "total_s")
    if plain and d2:
        out["2subj_nursing_off_vs_plain<=2.2"] = {
            "value": round(d2 / plain, 3),
            "met": d2 / plain <= 2.2,
            "floor_ratio": None,
        }
        f = floor.get("unet_forward") or {}
        fw = {int(k): v for k, v in f.items()}
        steps_n = r["meta"].get("steps", 50)
        s = int(round(0.8 * steps_n))
        if 8 in fw and 2 in fw:
            ours = s * fw[8] + (steps_n - s) * fw[2]
            theirs = steps_n * fw[2]
            vae = floor.get("vae_decode_fp32") or 0.0
            out["2subj_nursing_off_vs_plain<=2.2"]["floor_ratio"] = round((ours + vae) / (theirs + vae), 3)
    it = get("detail_2subj_nursing_on_pruned", "nursing_iteration_ms")
    ref = floor.get("fwd_bwd_b1_full_frozen")
    if it and ref:
        out["nursing_iteration_vs_fwd_bwd_b1<=1.1"] = {
            "value": round(it / ref, 3),
            "met": it / ref <= 1.1,
            "iteration_ms": round(it, 1),
            "passes": get("detail_2subj_nursing_on_pruned", "nursing_passes"),
            "passes_per_step": get("detail_2subj_nursing_on_pruned", "nursing_passes_per_step"),
            "nursing_s": get("detail_2subj_nursing_on_pruned", "nursing_s"),
        }
    peak = get("detail_2subj_nursing_on_pruned", "peak_gib")
    if peak is not None:
        out["peak_2subj_nursing_on<=12GiB"] = {
            "value": round(peak, 2),
            "met": peak <= 12.0,
            "cpu_offload_peak_gib": get("detail_2subj_nursing_on_pruned_cpu_offload", "peak_gib"),
            "plain_sdxl_peak_gib": get("plain_sdxl", "peak_gib"),
        }
    for mode in ("off", "on"):
        ours = get(f"detail_2subj_nursing_{mode}_pruned", "total_s")
        mat = get(f"materialised_2subj_nursing_{mode}_pruned", "total_s")
        if ours and mat:
            out[f"vs_materialised_2subj_nursing_{mode}>=1.5"] = {
                "value": round(mat / ours, 3),
                "met": mat / ours >= 1.5,
            }
    return out


ROWS = [
    ("plain_sdxl", "plain SDXL"),
    *[
        (f"detail_{k}subj_nursing_{n}_{p}", f"Detail++ {k} subj, nursing {n}, {p}")
        for k in (1, 2, 3)
        for n, p in (("off", "pruned"), ("off", "unpruned"), ("on", "pruned"), ("on", "unpruned"))
    ],
    *[
        (f"materialised_{k}subj_nursing_{n}_pruned", f"materialised maps {k} subj, nursing {n}")
        for k in (1, 2, 3)
        for n in ("off", "on")
    ],
    ("detail_2subj_nursing_on_pruned_cpu_offload", "Detail++ 2 subj, nursing on, cpu offload"),
]


def table(results: dict[str, Any], markdown: bool = False) -> str:
    runs = results["runs"]
    plain = (runs.get("plain_sdxl") or {}).get("total_s")
    head = [
        "run",
        "branches",
        "total s",
        "x plain",
        "step ms in/post",
        "step x floor in/post",
        "loop x floor",
        "nursing passes x ms",
        "VAE ms",
        "peak GiB",
    ]
    lines = []
    for key, label in ROWS:
        v = runs.get(key)
        if not v:
            continue

        def f(x, spec=".1f"):
            return "-" if x is None else format(x, spec)

        nursing = "-"
        if v.get("nursing_passes"):
            nursing = f"{v['nursing_passes']:.0f} x {v['nursing_iteration_ms']:.1f}"
        lines.append(
            [
                label,
                str(v.get("branches", "-")),
                f(v["total_s"], ".2f"),
                f(v["total_s"] / plain if plain else None, ".2f"),
                f"{f(v.get('in_window_step_ms'))}/{f(v.get('post_window_step_ms'))}",
                f"{f(v.get('in_window_step_vs_floor'), '.3f')}/{f(v.get('post_window_step_vs_floor'), '.3f')}",
                f(v.get("loop_vs_floor"), ".3f"),
                nursing,
                f(v.get("vae_decode_ms")),
                f(v.get("peak_gib"), ".2f"),
            ]
        )
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(row) + " |" for row in lines]
        return "\n".join(out)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*row) for row in lines])


def summary_text(results: dict[str, Any], markdown: bool = False) -> str:
    m = results["meta"]
    floor = results.get("floor") or {}
    parts = [
        f"{m.get('device')} | torch {m.get('torch')} (CUDA {m.get('cuda')}) | diffusers {m.get('diffusers')} | "
        f"transformers {m.get('transformers')} | {m.get('size')}x{m.get('size')} {m.get('dtype')}, "
        f"{m.get('steps')} steps | {m.get('date')}",
        "floor (ms): UNet forward by batch "
        + ", ".join(f"{k}: {v:.1f}" for k, v in (floor.get("unet_forward") or {}).items())
        + (
            f"; batch-1 fwd+bwd full {floor['fwd_bwd_b1_full_frozen']:.1f} (weights frozen) / "
            f"{floor['fwd_bwd_b1_full_grad_weights']:.1f} (weights requiring grad), truncated "
            f"{floor['fwd_bwd_b1_truncated_frozen']:.1f}; VAE decode fp32 {floor['vae_decode_fp32']:.1f}"
            if "fwd_bwd_b1_full_frozen" in floor
            else ""
        ),
        "",
        table(results, markdown),
        "",
        "targets:",
    ]
    for k, v in (results.get("targets") or {}).items():
        parts.append(f"  {'MET ' if v.get('met') else 'MISS'} {k}: {v.get('value')}")
    comp = results.get("compile") or {}
    for variant, res in comp.items():
        if not isinstance(res, dict):
            parts.append(f"compile {variant}: {res}")
            continue
        for label in ("plain_sdxl", "detail_2subj_nursing_off_pruned"):
            r = res.get(label)
            if isinstance(r, dict):
                parts.append(
                    f"compile {variant} {label}: compile ~{r['compile_s_estimate']:.0f} s, "
                    f"{r['steady_total_s']:.2f} s vs eager {r['eager_total_s']}, speed-up {r['speedup']}, "
                    f"graphs {r.get('graphs_first_call')} (+{r.get('graphs_later_calls')} after the first call)"
                )
        dyn = res.get("dynamo") or {}
        if dyn:
            parts.append(f"compile {variant}: {dyn.get('unique_graphs')} graphs, {dyn.get('graph_breaks')} breaks")
        if res.get("error"):
            parts.append(f"compile {variant}: {res['error']}")
    if results.get("errors"):
        parts.append("errors in: " + ", ".join(results["errors"]))
    return "\n".join(parts)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_out = os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random SDXL on the CPU, 2 steps (a smoke test)")
    p.add_argument("--out", default=default_out, help="folder for gpu_benchmark.json (default $OUT or %(default)s)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024; 128 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; 2 with --tiny)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs of the headline configs (default 3)")
    p.add_argument("--grid-repeats", type=int, default=None, help="timed runs of the other configs (default 1)")
    p.add_argument("--floor-repeats", type=int, default=None, help="timed calls per floor figure (default 8)")
    p.add_argument("--compile-repeats", type=int, default=2)
    p.add_argument("--compile-min-s", type=float, default=None, help="skip a compile variant with less time left")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-backend", default=None, help="default inductor (eager with --tiny)")
    p.add_argument("--quick", action="store_true", help="three Detail++ configurations, no warm-up (the CPU test)")
    p.add_argument("--budget-s", type=float, default=None, help="skip optional sections past this (default 540)")
    p.add_argument("--output-type", default="pil", choices=["pil", "np", "pt", "latent"])
    p.add_argument("--report", metavar="JSON", help="print the table (markdown) of an earlier run and exit")
    a = p.parse_args(argv)
    tiny = a.tiny
    a.device = a.device or ("cpu" if tiny else "cuda")
    a.dtype = a.dtype or ("float32" if tiny else "float16")
    a.size = a.size or (128 if tiny else 1024)
    a.steps = a.steps or (2 if tiny else 50)
    a.repeats = a.repeats or (1 if tiny else 3)
    a.grid_repeats = a.grid_repeats or 1
    a.floor_repeats = a.floor_repeats or (2 if tiny else 8)
    a.compile_min_s = a.compile_min_s if a.compile_min_s is not None else 90.0
    a.compile_backend = a.compile_backend or ("eager" if tiny else "inductor")
    a.budget_s = a.budget_s or (1e9 if tiny else 540.0)
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.report:
        results = json.loads(Path(a.report).read_text())
        results["targets"] = targets(results)
        print(summary_text(results, markdown=True))
        return results
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --tiny for the CPU smoke test.")
    threads = torch.get_num_threads()
    if a.device == "cpu":
        torch.set_num_threads(1)  # the tiny model's ops are too small to share; threads only contend
    try:
        bench = Benchmark(a)
        results = bench.run()
    finally:
        torch.set_num_threads(threads)
    print("\n" + summary_text(results), flush=True)
    print(f"\nresults: {bench.json_path}", flush=True)
    return results


if __name__ == "__main__":
    main()
