"""Where a nursing pass's time goes: the floor, our pass step by step, and the pipeline's own nursing.

Full-size SDXL with random weights (:mod:`detailpp.models.full_size`), fp16, 1024x1024 (latent 128x128), one GPU, the
2-subject plan of ``benchmarks/reference`` (p0, p1, robot, tree). Each variant is one batch-1 pass as nursing runs
it (conditional row of branch 0, weights frozen, the UNet stopped after the last 32x32 block, gradient to the
latent), median of ``--repeats`` CUDA-synchronised calls after warm-up:

- ``floor``: the truncated UNet forward + backward with diffusers' processors, loss = a sum of the output of the
  last mask block (no capture);
- ``floor+sync``: the same with ``float(loss)`` between forward and backward (what testing the threshold costs);
- ``ours``: Detail++'s processors capturing the 60 cross-attention maps with gradients, the nursing loss
  (:func:`detailpp.method.nursing.nursing_loss`), ``autograd.grad``, no host sync before the backward;
- ``ours+sync``: the same with ``float(loss)`` before the backward (the order ``nurse_latent`` uses);
- ``pipeline``: ``nurse_latent`` as the pipeline runs it, timed around each call in a 2-step run, per pass.

Then ``torch.profiler`` on one ``ours+sync`` pass: the top CUDA kernels and the CPU ops, and the kernel count.
Prints a table last; writes ``nursing_profile.json`` and ``nursing_profile.txt`` to ``--out`` (default ``$OUT``).

    python3 benchmarks/nursing_profile.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from detailpp.backbones.unet import find_mask_layers
from detailpp.backbones.unet_attention import detail_processors
from detailpp.config import DetailConfig
from detailpp.method.attention import AttentionState, CaptureSpec
from detailpp.method.nursing import nursing_loss

PLAN = {
    "prompt": "a sketch-style robot is leaning a oil-painting style tree",
    "base": "a robot is leaning a tree",
    "branches": [
        {"prompt": "a sketch-style robot is leaning a tree", "subject": "robot"},
        {"prompt": "a robot is leaning a oil-painting style tree", "subject": "tree"},
    ],
}


class Stop(Exception):
    pass


def median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    from detailpp.method.backbone import frozen_parameters
    from detailpp.models.full_size import build_sdxl_random_pipeline
    from detailpp.pipelines.sdxl import DetailPlusPlusPipeline
    from detailpp.plan import load_plan, validate_plan

    pipe = build_sdxl_random_pipeline(DetailPlusPlusPipeline, device="cuda", dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    plan = validate_plan(load_plan(PLAN), pipe.tokenizer)
    embeds, _, pooled, _ = pipe.encode_prompt(plan.prompt, device="cuda", do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids(
        (1024, 1024), (0, 0), (1024, 1024), dtype=embeds.dtype, text_encoder_projection_dim=1280
    ).to("cuda")
    cond = {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    t = torch.tensor(951.0, device="cuda")
    z = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.float16)
    layers = find_mask_layers(unet)
    state = AttentionState(layers, layers.token_grid(128, 128), layers.expected_tokens(128, 128))
    config = DetailConfig()
    tokens = [list(b.subject_token_indices) for b in plan.branches]
    prompt_length = len(pipe.tokenizer(plan.prompt).input_ids) - 2
    capture = CaptureSpec(rows=[0], tokens=[], full=True)
    block = unet.get_submodule(layers.last_block)
    kept: dict[str, torch.Tensor] = {}

    def keep_output(module, inputs, output):
        kept["out"] = output[0] if isinstance(output, tuple) else output
        raise Stop

    def run_unet(x: torch.Tensor) -> None:
        handle = block.register_forward_hook(keep_output)
        try:
            unet(x, t, return_dict=False, **cond)
        except Stop:
            pass
        finally:
            handle.remove()

    def floor(sync: bool) -> None:
        x = z.detach().requires_grad_(True)
        with torch.enable_grad():
            run_unet(x)
            loss = kept["out"].float().square().mean()
            if sync:
                float(loss)
            torch.autograd.grad(loss, x)

    def ours(sync: bool) -> None:
        x = z.detach().requires_grad_(True)
        with torch.enable_grad():
            state.begin(capture=capture, device="cuda", num_keys=77)
            run_unet(x)
            state.end(expect_self=False)
            loss = nursing_loss(state.mean_full_probs(), tokens, prompt_length, state.grid, config)
            if sync:
                float(loss)
            torch.autograd.grad(loss, x)

    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ms": {}}
    with torch.no_grad(), frozen_parameters(unet):
        results["ms"]["floor"] = median_ms(lambda: floor(False), args.repeats)
        results["ms"]["floor+sync"] = median_ms(lambda: floor(True), args.repeats)
        with detail_processors(unet, state):
            results["ms"]["ours"] = median_ms(lambda: ours(False), args.repeats)
            results["ms"]["ours+sync"] = median_ms(lambda: ours(True), args.repeats)
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                ours(True)
                torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    results["cuda_kernels_per_pass"] = kernels
    table = events.table(sort_by="cuda_time_total", row_limit=25)
    table_cpu = events.table(sort_by="self_cpu_time_total", row_limit=25)

    # The pipeline's own nursing, per pass.
    import detailpp.method.nursing as pipeline_module

    timings: list[tuple[float, int]] = []
    original = pipeline_module.nurse_latent

    def timed(*a, **k):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = original(*a, **k)
        torch.cuda.synchronize()
        timings.append(((time.perf_counter() - t0) * 1000, len(k["record"].losses)))
        return out

    pipeline_module.nurse_latent = timed
    try:
        for _ in range(2):  # the first call warms up
            timings.clear()
            pipe(
                plan=PLAN,
                num_inference_steps=2,
                output_type="latent",
                guidance_scale=7.5,
                generator=torch.Generator("cpu").manual_seed(0),
            )
    finally:
        pipeline_module.nurse_latent = original
    total_ms, passes = sum(ms for ms, _ in timings), sum(n for _, n in timings)
    results["ms"]["pipeline (per pass)"] = total_ms / passes
    results["pipeline_passes"] = passes
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nursing_profile.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "nursing_profile.txt").write_text(table + "\n\n" + table_cpu + "\n")
    print(table)
    print(table_cpu)
    print(f"{results['device']}, torch {results['torch']}; CUDA kernels in one 'ours+sync' pass: {kernels}")
    print("| variant | ms per pass |\n|---|---|")
    for k, v in results["ms"].items():
        print(f"| {k} | {v:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
