"""CUDA-graphed nursing as the default on CUDA: checked with LoRA, an IP-Adapter and offload; the floor; the memory.

Full-size SDXL with random weights (:mod:`detailpp.models.full_size`), one process on one GPU, fp16, 1024x1024,
Euler, guidance 7.5, the 4-branch plan of ``breadth_gpu.py`` (p0, p1, two subjects), nursing on with centroid alignment
(step size 1750; random weights never meet the early-stop thresholds, so every capped pass runs). Sections, each
written to the results file as it ends (a run cut short keeps what it measured); they run in the order 1 (the pipeline
as it comes), 2, 3, 4, 1 (the other variants):

1. **variants** -- the pipeline as it comes, with a random LoRA (peft, on every attention projection), with a random
   IP-Adapter (``load_ip_adapter``, image embeddings passed in), with ``enable_model_cpu_offload()``: at nursing's
   first step one pass run eagerly twice and through :meth:`DetailEngine.nursing_gradient` three times (warm-up and
   capture, two replays), compared bit for bit with the first eager pass; then a whole 20-step call timed with
   nursing's graphs switched off (eager passes) and at the default, the graph captures and replays counted. The
   pipeline as it comes also at 50 steps, beside plain SDXL and nursing off. Last, ``enable_sequential_cpu_offload()``:
   the default must fall back to eager passes (no capture, no replay).
2. **floor** -- what nursing-off Detail++ cannot go below eagerly: the plain UNet forward at batch 8 (the sharing
   window: 4 branches x CFG) and batch 2 (the steps after it), the text encoders on the plan's 4 prompts, the VAE
   decode as SDXL runs it; floor = window x batch-8 + rest x batch-2 + encoders + decode.
3. **tail graphs** -- the batch-2 and batch-8 UNet forward eager and replayed as one CUDA graph.
4. **memory** -- the 50-step nursing-on call's peak without the decode (``output_type="latent"``), the decode's
   peak in fp32 (SDXL's upcast), bf16, fp16 and tiled, and the 50-step call under ``enable_model_cpu_offload()``.

    python3 benchmarks/nursing_graph_default.py            # GPU, ~5 min; writes $OUT/nursing_graph_default.json
    python3 benchmarks/nursing_graph_default.py --report benchmarks/results/nursing_graph_default_h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
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
NURSING = {"nursing": True, "centroid_alignment": True, "nursing_step_size": 1750.0}
IMAGE_EMBED_DIM = 1280  # IP-Adapter SDXL's image-embedding width (CLIP ViT-bigG projection)
DEADLINE_S = 540.0  # sections that would start later are skipped (the device allows 600 s a call)

COUNTS = {"captures": 0, "replays": 0}


def peak_reset() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def seconds_of(call: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    call()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def gpu_ms(call: Callable[[], Any], repeats: int = 10, warmup: int = 3) -> float:
    """Mean wall milliseconds of ``call`` (CUDA-synchronised), after ``warmup`` calls."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / repeats


def count_graph_calls() -> None:
    """Count :class:`GraphedGradient` captures and replays in :data:`COUNTS`."""
    from detailpp.method.nursing import GraphedGradient

    call = GraphedGradient.__call__

    def counting(self, x, *args):
        COUNTS["captures" if self.graph is None else "replays"] += 1
        return call(self, x, *args)

    GraphedGradient.__call__ = counting


def one_pass_check(pipe, call: Callable[[int], Any]) -> dict[str, Any]:
    """At the first nursing step: the eager pass twice, then ``nursing_gradient`` three times, against eager 1."""
    from nursing_graph_check import eager_and_graphed_passes  # (benchmarks/, the script's folder)

    from detailpp.method.engine import DetailEngine

    seen: dict[str, Any] = {}
    nurse = DetailEngine.nurse

    def check(engine, i, t, latents):
        if i == 0 and not seen:
            seen["graphs_in_use"] = bool(engine.nursing.graphs)
            results = eager_and_graphed_passes(engine, t, latents[0:1])
            for name, (loss, grad) in zip(("eager2", "warmup", "replay1", "replay2"), results[1:], strict=True):
                seen[name] = {
                    "loss_equal": loss == results[0][0],
                    "grad_equal": bool(torch.equal(grad, results[0][1])),
                    "grad_max_abs_diff": float((grad.float() - results[0][1].float()).abs().max()),
                }
            seen["replays_equal_warmup"] = all(torch.equal(g, results[2][1]) for _, g in results[3:])
            seen["grad_abs_max"] = float(results[0][1].float().abs().max())
            engine.nursing.release()
        return nurse(engine, i, t, latents)

    DetailEngine.nurse = check
    try:
        call(2)
    finally:
        DetailEngine.nurse = nurse
    return seen


def timed_call(call: Callable[[], Any]) -> dict[str, Any]:
    """One call: seconds, peak GiB, graph captures/replays and nursing passes."""
    COUNTS.update(captures=0, replays=0)
    peak_reset()
    box: dict[str, Any] = {}
    s = seconds_of(lambda: box.setdefault("out", call()))
    out = box["out"]
    return {
        "s": s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "captures": COUNTS["captures"],
        "replays": COUNTS["replays"],
        "passes": sum(len(r.losses) for r in (getattr(out, "nursing", None) or [])),
    }


def variant(pipe, name: str, steps: tuple[int, ...], **extra: Any) -> dict[str, Any]:
    """One-pass check, then eager and default nursing at each of ``steps``."""
    switch: dict[str, bool | None] = {"nursing_graphs": None}

    def call(n: int, output_type: str = "pil"):
        return pipe(
            plan=PLAN,
            num_inference_steps=n,
            guidance_scale=7.5,
            height=1024,
            width=1024,
            generator=torch.Generator("cuda").manual_seed(0),
            detail_config=DetailConfig(**NURSING, **switch),
            output_type=output_type,
            **extra,
        )

    row: dict[str, Any] = {"variant": name}
    row["one_pass"] = one_pass_check(pipe, call)
    for label, graphs in (("eager", False), ("default", None)):
        switch["nursing_graphs"] = graphs
        call(3)  # warm-up
        for n in steps:
            row[f"{label}_{n}"] = r = timed_call(lambda n=n: call(n))
            print(f"{name} {label} {n} steps: {r}", flush=True)
    return row


def ip_adapter_folder(unet: torch.nn.Module) -> Path:
    """A random IP-Adapter for ``unet`` (:func:`detailpp.models.full_size.random_ip_adapter_state`, 4 image tokens),
    saved in fp16 to a folder."""
    from safetensors.torch import save_file

    from detailpp.models.full_size import random_ip_adapter_state

    state = random_ip_adapter_state(unet, IMAGE_EMBED_DIM, scale=0.02)
    folder = Path(tempfile.mkdtemp(prefix="ip_adapter_"))
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(folder / "ip_adapter.safetensors"))
    return folder


def unet_inputs(unet, batch: int) -> dict[str, Any]:
    g = torch.Generator("cuda").manual_seed(batch)
    kw = {"device": "cuda", "dtype": torch.float16, "generator": g}
    return {
        "sample": torch.randn(batch, 4, 128, 128, **kw),
        "timestep": torch.tensor(500.0, device="cuda"),
        "encoder_hidden_states": torch.randn(batch, 77, 2048, **kw),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 1280, **kw),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]], device="cuda")
            .half()
            .repeat(batch, 1),
        },
    }


def graph_ms(unet, inputs: dict[str, Any]) -> float:
    """The UNet forward on ``inputs`` captured as one CUDA graph; mean milliseconds a replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            unet(**inputs, return_dict=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        unet(**inputs, return_dict=False)
    ms = gpu_ms(graph.replay)
    del graph
    return ms


def decoder(vae, latents: torch.Tensor, mode: str) -> Callable[[], None]:
    """One 1024x1024 decode of ``latents`` in ``mode``: SDXL's fp32 upcast (and back), bf16, fp16, or tiled fp32."""
    scale = vae.config.scaling_factor
    dtype = {"fp32 (SDXL's upcast)": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        mode, torch.float32
    )

    def decode() -> None:
        with torch.no_grad():
            if mode == "tiled fp32":
                vae.enable_tiling()
            vae.to(dtype)
            vae.decode(latents.to(dtype) / scale, return_dict=False)
            vae.to(torch.float16)
            vae.disable_tiling()

    return decode


def decode_peak(vae, latents: torch.Tensor, mode: str) -> dict[str, Any]:
    """Seconds and peak GiB (above the weights already resident) of one decode."""
    peak_reset()
    base = torch.cuda.memory_allocated()
    s = seconds_of(decoder(vae, latents, mode))
    return {"mode": mode, "s": s, "peak_above_resident_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}


def measure(out_path: Path) -> dict[str, Any]:
    import diffusers
    import transformers
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig

    from detailpp.method.engine import DetailEngine
    from detailpp.method.nursing import moves_weights_in_forward
    from detailpp.models.full_size import build_sdxl_random_pipeline
    from detailpp.models.loading import dtype_kwarg
    from detailpp.pipelines.sdxl import DetailPlusPlusPipeline

    started = time.perf_counter()
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "variants": [],
        "skipped": [],
    }

    def save() -> None:
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        tmp.replace(out_path)

    def time_left(section: str) -> bool:
        if time.perf_counter() - started < DEADLINE_S:
            return True
        results["skipped"].append(section)
        save()
        return False

    count_graph_calls()
    pipe = build_sdxl_random_pipeline(DetailPlusPlusPipeline, device="cuda", dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    plain = StableDiffusionXLPipeline.from_pipe(pipe, **dtype_kwarg(torch.float16))
    plain.set_progress_bar_config(disable=True)
    results["build_s"] = time.perf_counter() - started
    gen = lambda: torch.Generator("cuda").manual_seed(0)  # noqa: E731
    common = {"height": 1024, "width": 1024, "guidance_scale": 7.5}

    # 1. the pipeline as it comes (the other variants come after the floor: peft's layers stay after a LoRA is
    # deleted and slow every later forward on the host, so the LoRA goes last)
    plain(PLAN["prompt"], num_inference_steps=3, generator=gen(), **common)
    results["plain"] = {
        n: timed_call(lambda n=n: plain(PLAN["prompt"], num_inference_steps=n, generator=gen(), **common))
        for n in (20, 50)
    }
    off = lambda n: pipe(  # noqa: E731
        plan=PLAN, num_inference_steps=n, generator=gen(), detail_config=DetailConfig(nursing=False), **common
    )
    off(3)
    results["nursing_off"] = {n: timed_call(lambda n=n: off(n)) for n in (20, 50)}
    results["variants"].append(variant(pipe, "as it comes", (20, 50)))
    save()

    # 2. floor
    if time_left("floor"):
        unet = pipe.unet
        floor: dict[str, Any] = {}
        with torch.no_grad():
            for batch in (8, 2):
                inputs = unet_inputs(unet, batch)
                floor[f"unet_b{batch}_ms"] = gpu_ms(lambda inputs=inputs: unet(**inputs, return_dict=False))
            prompts = [PLAN["prompt"], PLAN["base"], *(b["prompt"] for b in PLAN["branches"])]
            floor["encoders_ms"] = gpu_ms(
                lambda: pipe.encode_prompt(prompts, device="cuda", do_classifier_free_guidance=True), repeats=5
            )
            floor["encoders_plain_ms"] = gpu_ms(
                lambda: pipe.encode_prompt(prompts[0], device="cuda", do_classifier_free_guidance=True), repeats=5
            )
        latents = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.float16)
        floor["decode_ms"] = gpu_ms(decoder(pipe.vae, latents, "fp32 (SDXL's upcast)"), repeats=3)
        for n in (20, 50):
            window = DetailConfig().num_share_steps(n)
            floor[f"floor_{n}_s"] = (
                window * floor["unet_b8_ms"] + (n - window) * floor["unet_b2_ms"] + floor["encoders_ms"]
            ) / 1000 + floor["decode_ms"] / 1000
            floor[f"plain_floor_{n}_s"] = (
                n * floor["unet_b2_ms"] + floor["encoders_plain_ms"] + floor["decode_ms"]
            ) / 1000
            floor[f"window_{n}"] = window
        results["floor"] = floor
        save()

    # 3. tail graphs
    if time_left("tail graphs"):
        tail: dict[str, Any] = {}
        for batch in (2, 8):
            inputs = unet_inputs(pipe.unet, batch)
            with torch.no_grad():
                tail[f"eager_b{batch}_ms"] = gpu_ms(lambda inputs=inputs: pipe.unet(**inputs, return_dict=False))
            try:
                tail[f"graph_b{batch}_ms"] = graph_ms(pipe.unet, inputs)
            except Exception as error:  # a capture failure is a finding, not a crash
                tail[f"graph_b{batch}_error"] = f"{type(error).__name__}: {error}"[:300]
        results["tail_graphs"] = tail
        peak_reset()
        save()

    # 4. memory
    if time_left("memory"):
        memory: dict[str, Any] = {"resident_weights_gib": torch.cuda.memory_allocated() / 2**30}
        latent_call = lambda: pipe(  # noqa: E731
            plan=PLAN,
            num_inference_steps=50,
            generator=gen(),
            detail_config=DetailConfig(**NURSING),
            output_type="latent",
            **common,
        )
        memory["nursing_on_50_latent"] = timed_call(latent_call)
        latents = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.float16)
        memory["decode"] = [
            decode_peak(pipe.vae, latents, mode) for mode in ("fp32 (SDXL's upcast)", "bf16", "fp16", "tiled fp32")
        ]
        results["memory"] = memory
        save()

    # 5. the other variants
    if time_left("IP-Adapter"):
        folder = ip_adapter_folder(pipe.unet)
        pipe.load_ip_adapter(
            str(folder), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None
        )
        g = torch.Generator("cuda").manual_seed(5)
        image = torch.randn(1, 1, IMAGE_EMBED_DIM, device="cuda", dtype=torch.float16, generator=g)
        embeds = [torch.cat([torch.zeros_like(image), image])]
        results["variants"].append(
            variant(pipe, "random IP-Adapter (4 tokens)", (20,), ip_adapter_image_embeds=embeds)
        )
        pipe.unload_ip_adapter()
        save()

    if time_left("model offload"):
        pipe.enable_model_cpu_offload()
        results["model_offload_moves_weights"] = list(moves_weights_in_forward(pipe.unet))
        results["variants"].append(variant(pipe, "enable_model_cpu_offload()", (20, 50)))
        pipe.remove_all_hooks()
        pipe.to("cuda")
        save()

    if time_left("LoRA"):
        pipe.unet.add_adapter(
            LoraConfig(
                r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
            ),
            adapter_name="bench",
        )
        results["variants"].append(variant(pipe, "random LoRA (peft, r=16, attention projections)", (20,)))
        pipe.unet.delete_adapters("bench")
        save()

    if time_left("sequential offload"):
        pipe.enable_sequential_cpu_offload()
        moving = list(moves_weights_in_forward(pipe.unet))
        engines: list[bool] = []
        init = DetailEngine.__init__

        def recording(self, *a, **k):
            init(self, *a, **k)
            engines.append(bool(self.nursing.graphs))

        DetailEngine.__init__ = recording
        try:
            run = timed_call(
                lambda: pipe(
                    plan=PLAN,
                    num_inference_steps=2,
                    generator=gen(),
                    detail_config=DetailConfig(**NURSING),
                    output_type="latent",
                    **common,
                )
            )
        finally:
            DetailEngine.__init__ = init
        results["sequential_offload"] = {"moves_weights": moving, "engine_graphs": engines, **run}
        save()
    results["total_s"] = time.perf_counter() - started
    save()
    return results


def at(d: dict, n: int) -> Any:
    """``d[n]``, also after a JSON round trip (keys as strings)."""
    return d[n] if n in d else d[str(n)]


def plain_step_s(f: dict[str, Any], plain_s: float, n: int) -> float:
    """One batch-2 step inside a pipeline call: the plain SDXL call of the same run less one prompt's encoding and
    the decode, over its ``n`` steps."""
    return (plain_s - (f["encoders_plain_ms"] + f["decode_ms"]) / 1000) / n


def plain_based_floor(f: dict[str, Any], plain_s: float, n: int) -> float:
    """Nursing-off Detail++'s floor built on the plain SDXL call of the same run: the window's steps cost a batch-8
    forward instead of a batch-2 step (:func:`plain_step_s`), and the plan encodes 4 prompts instead of 1."""
    window = f[f"window_{n}"]
    extra_encoding = (f["encoders_ms"] - f["encoders_plain_ms"]) / 1000
    return plain_s + window * (f["unet_b8_ms"] / 1000 - plain_step_s(f, plain_s, n)) + extra_encoding


def markdown(r: dict[str, Any]) -> str:
    v = r["versions"]
    lines = [
        f"{r['device']}, {r['date']}, torch {v['torch']}, diffusers {v['diffusers']}, transformers "
        f"{v['transformers']}; fp16, 1024x1024, Euler, guidance 7.5, random weights, 4 branches, nursing on "
        "(centroid alignment, step size 1750); one timed call per row after a warm-up",
        "",
        "| variant | steps | eager nursing s | default s | speed-up | passes | captures / replays | one pass: "
        "replays == eager | replays == warm-up | peak GiB eager / default |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["variants"]:
        check = row["one_pass"]
        same = all(check[k]["grad_equal"] and check[k]["loss_equal"] for k in ("replay1", "replay2"))
        eager_same = check["eager2"]["grad_equal"]
        warm = {True: "yes", False: "no", None: "not recorded"}[check.get("replays_equal_warmup")]
        for key in sorted(k for k in row if k.startswith("eager_")):
            n = key.split("_")[1]
            e, d = row[key], row[f"default_{n}"]
            lines.append(
                f"| {row['variant']} | {n} | {e['s']:.2f} | {d['s']:.2f} | {e['s'] / d['s']:.2f}x | {d['passes']} | "
                f"{d['captures']} / {d['replays']} | {'yes' if same else 'NO'} (eager twice: "
                f"{'equal' if eager_same else 'differ'}; max abs {check['replay1']['grad_max_abs_diff']:.2g}) | "
                f"{warm} | {e['peak_gib']:.2f} / {d['peak_gib']:.2f} |"
            )
    if "sequential_offload" in r:
        s = r["sequential_offload"]
        lines += [
            "",
            f"enable_sequential_cpu_offload(): moves weights = {', '.join(s['moves_weights']) or 'nothing'}; "
            f"engine graphs {s['engine_graphs']}; 2 steps, {s['passes']} passes, {s['captures']} captures, "
            f"{s['replays']} replays, {s['s']:.1f} s.",
        ]
    if "plain" in r:
        lines += [
            "",
            "Beside them, same run: "
            + "; ".join(
                f"{label} {n} steps {at(r[key], n)['s']:.2f} s, peak {at(r[key], n)['peak_gib']:.2f} GiB"
                for key, label in (("plain", "plain SDXL"), ("nursing_off", "detailpp nursing off"))
                for n in (20, 50)
            ),
        ]
    if "floor" in r:
        f, p, off = r["floor"], r["plain"], r["nursing_off"]
        lines += [
            "",
            f"Floor: UNet forward batch 8 {f['unet_b8_ms']:.1f} ms, batch 2 {f['unet_b2_ms']:.1f} ms; encoders "
            f"{f['encoders_ms']:.1f} ms (4 prompts), decode {f['decode_ms']:.1f} ms.",
            "",
            "| steps | window | floor s | detailpp nursing off s | x floor | plain floor s | plain SDXL s | x floor | "
            "plain SDXL ms a step | floor on plain SDXL s | x it | excess ms a window step |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n in (20, 50):
            o, q, window = at(off, n), at(p, n), f[f"window_{n}"]
            floor = plain_based_floor(f, q["s"], n)
            lines.append(
                f"| {n} | {window} | {f[f'floor_{n}_s']:.2f} | {o['s']:.2f} | "
                f"{o['s'] / f[f'floor_{n}_s']:.3f} | {f[f'plain_floor_{n}_s']:.2f} | {q['s']:.2f} | "
                f"{q['s'] / f[f'plain_floor_{n}_s']:.3f} | {plain_step_s(f, q['s'], n) * 1000:.1f} | {floor:.2f} | "
                f"{o['s'] / floor:.3f} | {(o['s'] - floor) / window * 1000:.1f} |"
            )
        lines += [
            "",
            "Floor on plain SDXL: the plain SDXL call of the same run, its batch-2 steps replaced in the window by "
            "batch-8 forwards and its one prompt by the plan's four (a batch-2 step costs what it costs inside a "
            "pipeline call).",
        ]
    if "tail_graphs" in r:
        t = r["tail_graphs"]
        lines += [
            "",
            "UNet forward, eager in a loop vs replayed as one CUDA graph: "
            + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k}: {v}" for k, v in t.items()),
        ]
    if "memory" in r:
        m = r["memory"]
        lines += [
            "",
            f"Memory: weights resident {m['resident_weights_gib']:.2f} GiB; 50-step nursing-on call without decode "
            f"peaks {m['nursing_on_50_latent']['peak_gib']:.2f} GiB; decode peak above resident: "
            + ", ".join(
                f"{d['mode']} {d['peak_above_resident_gib']:.2f} GiB ({d['s'] * 1000:.0f} ms)" for d in m["decode"]
            ),
        ]
    if r.get("skipped"):
        lines += ["", f"Skipped (out of time): {', '.join(r['skipped'])}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "nursing_graph_default.json")
    parser.add_argument("--report", type=Path, help="print the tables of a results file (no GPU needed)")
    args = parser.parse_args(argv)
    if args.report:
        print(markdown(json.loads(args.report.read_text(encoding="utf-8"))))
        return 0
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    results = measure(args.json)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
