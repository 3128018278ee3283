"""Diagnostic on the toy model: Detail++ with its layout premise made true by hand.

Detail++ assumes that the branches of one image share one layout. The toy model does not give that on its own
(docs/toy-binding.md), so this script forces it: for the first K denoising steps every branch's latent is replaced by
branch 0's (a ``callback_on_step_end``), after which the branches go their own ways as usual. Not the paper's method:
a way to see what the rest of the pipeline (masks, ALM) does once the layouts agree. Control: the same forcing with
ALM off (``latent_modification=False``; the image is then the last branch alone), which shows how much of the
result is branch 0's own picture carried over by the forcing.

    python -m research.toy.forced_layout --prompts 16 --force-steps 2 5 --out outputs/toy_forced_layout.json

The same settings run inside the binding benchmark, with its workers, failure kinds and paired intervals, as ``python
-m research.toy.bench --diagnostic-prompts N --force-layout-steps K ...`` (``detailpp_forcedK`` / ``no_alm_forcedK``):
use that for many prompts; this script reproduces the first small runs (benchmarks/results/toy_forced_layout*.json).

Validation prompts (``--split validation``), seed 0 (the binding benchmark's image seeds), Euler 20 steps, guidance
7.5, the model's recommended Detail++ settings. BENCHMARKS.md has the measured CPU run time.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from research.toy.binding import force_layout as forcing  # the step-end callback: branch 0's latent everywhere

logger = logging.getLogger("toy_forced_layout")


def main(argv: list[str] | None = None) -> dict:

    from detailpp.atomic import atomic_write_bytes
    from detailpp.models.loading import load_pipeline
    from research.toy.binding import _tokenizer, image_seed, scene_plan, split_prompts
    from research.toy.judge import score_image

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--split", default="validation", choices=("validation", "test"))
    p.add_argument("--force-steps", type=int, nargs="+", default=[2, 5], help="K values (steps forced onto branch 0)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("outputs/toy_forced_layout.json"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    pipe = load_pipeline(a.model, device=a.device, dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    tokenizer = _tokenizer(a.model)
    settings: dict[str, tuple[dict, int] | None] = {"sdxl": None, "detailpp": ({}, 0)}
    for k in a.force_steps:
        settings[f"detailpp_forced{k}"] = ({}, k)
        settings[f"no_alm_forced{k}"] = ({"latent_modification": False}, k)
    correct: dict[str, list[bool]] = {name: [] for name in settings}
    specs = split_prompts(a.prompts, a.split)
    for i, spec in enumerate(specs):
        plan = scene_plan(spec, tokenizer)
        for name, setting in settings.items():
            common = dict(
                num_inference_steps=a.steps,
                guidance_scale=a.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(image_seed(i, 0)),
            )
            if setting is None:
                image = pipe.plain_sdxl()(prompt=spec.prompt, **common).images[0]
            else:
                fields, k = setting
                out = pipe(
                    spec.prompt,
                    plan=plan,
                    detail_config=pipe.make_detail_config(**fields),
                    callback_on_step_end=forcing(k) if k else None,
                    **common,
                )
                image = out.images[0]
            correct[name].append(bool(score_image(image, spec.objects)["image_correct"]))
        logger.info("%d/%d %s", i + 1, len(specs), {n: c[-1] for n, c in correct.items()})
        result = {
            "what": "image-level accuracy (toy judge) with every branch forced onto branch 0's latent for K steps",
            "model": a.model,
            "split": a.split,
            "n_prompts": i + 1,
            "steps": a.steps,
            "guidance_scale": a.guidance_scale,
            "detail_defaults": dict(pipe.detail_defaults),
            "image_accuracy": {n: float(np.mean(c)) for n, c in correct.items()},
            "per_prompt": {n: c for n, c in correct.items()},
        }
        a.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(a.out, (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    logger.info("%s", result["image_accuracy"])
    return result


if __name__ == "__main__":
    main()
