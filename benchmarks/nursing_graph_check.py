"""Is a CUDA-graphed nursing pass the eager pass? One pass's loss and gradient, eager twice and graphed, on one latent.

Full-size random SDXL, fp16, 1024x1024, the 2-subject plan of ``benchmarks/reference``. At the first nursing step of
a 2-step call, on that step's latent: the eager pass (``Nursing.loss`` + ``autograd.grad``) twice, then
:meth:`Nursing.gradient` with graphs on three times (warm-up and capture, then two replays). With
``CHECK_WHOLE_CALLS=1``, two whole eager 4-step calls too (does the final latent repeat at all?). Prints max abs
differences; writes ``nursing_graph_check.json`` under ``$OUT``.

    python3 benchmarks/nursing_graph_check.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "reference"))


def eager_and_graphed_passes(engine, t: torch.Tensor, z0: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
    """(loss, gradient) of one nursing pass on ``z0``: eagerly twice (``Nursing.loss`` + ``autograd.grad``), then
    through ``Nursing.gradient`` three times (warm-up and capture, two replays on a GPU)."""
    from detailpp.method.backbone import frozen_parameters

    z0 = z0.detach().clone()
    results = []
    model_input = engine.backbone.model_input
    with frozen_parameters(engine.backbone.denoiser):
        for _ in range(2):
            a = z0.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = engine.nursing.loss(model_input(a, t), t, engine)
                (grad,) = torch.autograd.grad(loss, a)
            results.append((float(loss), grad.detach().clone()))
        for _ in range(3):
            b = z0.clone().requires_grad_(True)
            loss, grad = engine.nursing.gradient(b, t, engine, model_input)
            results.append((float(loss), grad.detach().clone()))
    return results


def main() -> int:
    from scenarios import SUB_PROMPTS, SUBJECTS, Scenario, initial_latent  # noqa: F401

    from detailpp import DetailConfig
    from detailpp.method.engine import DetailEngine
    from detailpp.models.full_size import build_sdxl_random_pipeline
    from detailpp.pipelines.sdxl import DetailPlusPlusPipeline

    pipe = build_sdxl_random_pipeline(DetailPlusPlusPipeline, device="cuda", dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    config = {"nursing": True, "centroid_alignment": True, "nursing_step_size": 1750.0}
    s = Scenario("check", config, steps=4, height=1024, width=1024)
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def call(steps: int, graphs: bool = False):
        return pipe(
            plan=s.plan(),
            num_inference_steps=steps,
            guidance_scale=7.5,
            latents=initial_latent(s, torch.float16, "cuda"),
            detail_config=DetailConfig(**config, nursing_graphs=graphs),
            output_type="latent",
        )

    call(2)  # warm-up
    seen: dict = {}
    nurse = DetailEngine.nurse

    def check(engine, i, t, latents):
        if i == 0 and not seen:
            results = eager_and_graphed_passes(engine, t, latents[0:1])
            names = ["eager1", "eager2", "graph_warmup", "replay1", "replay2"]
            for n, (loss, grad) in zip(names, results, strict=True):
                seen[n] = {
                    "loss": loss,
                    "grad_max_abs_diff_vs_eager1": float((grad.float() - results[0][1].float()).abs().max()),
                    "grad_equal_eager1": bool(torch.equal(grad, results[0][1])),
                    "grad_abs_max": float(grad.float().abs().max()),
                }
            engine.nursing.release()
        return nurse(engine, i, t, latents)

    DetailEngine.nurse = check
    call(2, graphs=True)
    DetailEngine.nurse = nurse
    out["one_pass"] = seen
    path = Path(os.environ.get("OUT", ".")) / "nursing_graph_check.json"
    if os.environ.get("CHECK_WHOLE_CALLS", "0") != "1":
        path.write_text(json.dumps(out, indent=1))
        print(json.dumps(out, indent=1))
        return 0
    a, b = call(4), call(4)
    out["eager_twice_4_steps"] = {
        "final_latent_equal": bool(torch.equal(a.images, b.images)),
        "final_max_abs": float((a.images.float() - b.images.float()).abs().max()),
        "losses_equal": [r.losses for r in a.nursing] == [r.losses for r in b.nursing],
        "first_losses": [a.nursing[0].losses[:3], b.nursing[0].losses[:3]],
    }
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
