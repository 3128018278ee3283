"""Generate images with Detail++ and write them with their parameters.

For each seed: ``<name>-<seed>.png`` (A1111 ``parameters`` chunk and the full Detail++ settings as JSON in a
``detailpp`` chunk), ``<name>-<seed>.json`` (the same settings, the plan and timings), with ``--save-branches``
``<name>-<seed>-branches.png`` (every branch captioned with its sub-prompt) and with ``--save-masks``
``<name>-<seed>-mask-<i>.png`` (each subject's mask over the image).
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path

from detailpp.atomic import atomic_write_text
from detailpp.cli import UserError
from detailpp.config import DetailConfig
from detailpp.images import a1111_parameters, captioned_grid, dumps, mask_overlay, save_png
from detailpp.plan import GRANULARITIES, DecompositionPlan, load_plan

logger = logging.getLogger(__name__)


def default_model() -> str:
    from detailpp.loading import toy_model_available

    return "toy" if toy_model_available() else "tiny-random"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (may be omitted with --plan)")
    p.add_argument(
        "--model",
        default=None,
        help="Hub id, local folder, .safetensors file, 'toy' or 'tiny-random' "
        "(default: the embedded toy model, else tiny-random)",
    )
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one image per seed (default 0)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; 20 on the embedded models)")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's size)")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 (default: the model's size)")
    p.add_argument("--negative-prompt", default=None)
    # Detail++ settings: left out, the model's recommendation (its detail_config.json) or DetailConfig's default
    p.add_argument("--tau", type=float, default=None, help="mask threshold tau of eq. 3, in (0, 1) (0.5)")
    p.add_argument(
        "--share-steps", type=float, default=None, help="fraction of steps with shared attention and ALM (0.8)"
    )
    p.add_argument("--nursing", action=argparse.BooleanOptionalAction, default=None, help="attention nursing (on)")
    p.add_argument("--centroid-alignment", action=argparse.BooleanOptionalAction, default=None, help="(on)")
    p.add_argument("--granularity", choices=GRANULARITIES, default=None, help="(subject)")
    p.add_argument("--plan", type=Path, default=None, help="a plan JSON file (as `detailpp decompose --json`)")
    p.add_argument("--save-branches", action="store_true", help="also write a grid of every branch")
    p.add_argument("--save-masks", action="store_true", help="also write each subject's mask over the image")
    p.add_argument("--output-dir", type=Path, default=Path("outputs"))
    p.add_argument("--device", default=None, help="cuda, cpu, mps... (default: the best available)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: float16 on CUDA)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet's transformer blocks (pipe.compile_detail()): about 10 s of compilation in the "
        "first image, then about 1.1x faster on a GPU (H200, full-size SDXL); not useful on CPU",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def slug(text: str, limit: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "image"


def flag_fields(args: argparse.Namespace) -> dict:
    """The DetailConfig fields given on the command line (the model's recommended settings fill in the rest)."""
    given = {
        "mask_threshold": args.tau,
        "share_steps": args.share_steps,
        "nursing": args.nursing,
        "centroid_alignment": args.centroid_alignment,
        "granularity": args.granularity,
    }
    return {k: v for k, v in given.items() if v is not None}


def check_args(args: argparse.Namespace) -> DetailConfig:
    """Every argument checked before the model is loaded."""
    if args.prompt is None and args.plan is None:
        raise UserError("Give a prompt, or a plan with --plan PLAN.json.")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("The prompt is empty; write what the image should show.")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"--{name} must be a positive multiple of 8, got {value}.")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}.")
    try:
        config = DetailConfig(**flag_fields(args))
    except ValueError as e:
        raise UserError(str(e).replace("mask_threshold (tau)", "--tau").replace("share_steps", "--share-steps")) from e
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        probe = args.output_dir / ".detailpp-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"Cannot write to the output folder {str(args.output_dir)!r} ({e.strerror}); "
            "choose another with --output-dir."
        ) from e
    return config


def run(args: argparse.Namespace) -> int:
    config = check_args(args)
    plan: DecompositionPlan | None = load_plan(args.plan) if args.plan is not None else None
    prompt = args.prompt if args.prompt is not None else plan.prompt

    import torch

    from detailpp.loading import load_pipeline

    model = args.model or default_model()
    if model == "tiny-random":
        logger.warning("Model 'tiny-random' has random weights: its images are noise (it checks the set-up only).")
    started = time.perf_counter()
    pipe = load_pipeline(model, device=args.device, dtype=args.dtype)
    load_seconds = time.perf_counter() - started
    pipe.set_progress_bar_config(disable=args.quiet)
    config = pipe.make_detail_config(**flag_fields(args))
    if args.compile:
        pipe.compile_detail()
        logger.info("The first image compiles the UNet's blocks (about 10 s on a GPU); the later ones reuse them.")
    steps = args.steps or (20 if model in ("toy", "tiny-random") else 50)
    # Validate the plan (tokenizer, 77-token window) before any denoising, once for every seed.
    plan = pipe.prepare_plan(prompt, plan, config)
    if not plan.branches:
        logger.info("No detail branch for %r: the image is plain SDXL sampling.", prompt)
    for seed in args.seed:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        t0 = time.perf_counter()
        out = pipe(
            prompt=prompt,
            negative_prompt=args.negative_prompt,
            num_inference_steps=steps,
            guidance_scale=args.guidance_scale,
            height=args.height,
            width=args.width,
            generator=generator,
            detail_config=config,
            plan=plan,
            return_branch_images=args.save_branches,
            return_masks=args.save_masks,
        )
        seconds = time.perf_counter() - t0
        image = out.images[0]
        stem = args.output_dir / f"{slug(prompt)}-{seed}"
        settings = {
            "prompt": prompt,
            "negative_prompt": args.negative_prompt,
            "model": model,
            "seed": seed,
            "steps": steps,
            "guidance_scale": args.guidance_scale,
            "width": image.width,
            "height": image.height,
            "scheduler": type(pipe.scheduler).__name__,
            "dtype": str(pipe.unet.dtype).removeprefix("torch."),
            "compiled": args.compile,
            "detail_config": config.to_dict(),
            "plan": plan.to_dict(),
        }
        params = a1111_parameters(
            prompt,
            args.negative_prompt,
            steps,
            settings["scheduler"],
            args.guidance_scale,
            seed,
            image.width,
            image.height,
            model,
            {
                "Detail++ tau": config.mask_threshold,
                "Detail++ share steps": config.share_steps,
                "Detail++ nursing": config.nursing,
                "Detail++ branches": len(plan.branches),
            },
        )
        files = {"image": f"{stem}.png"}
        if args.save_branches:
            captions = [f"p0: {plan.prompt}", f"p1: {plan.base}"]
            captions += [f"p{i + 2}: {b.prompt}" for i, b in enumerate(plan.branches)]
            grid = captioned_grid(out.branch_images, captions)
            files["branches"] = f"{stem}-branches.png"
            save_png(grid, files["branches"], {"detailpp": dumps(settings)})
        if args.save_masks and out.masks is not None:
            for i, (branch, mask) in enumerate(zip(plan.branches, out.masks, strict=True)):
                key = f"mask-{i}"
                files[key] = f"{stem}-mask-{i}-{slug(branch.subject, 24)}.png"
                save_png(
                    mask_overlay(image, mask > config.mask_threshold),
                    files[key],
                    {"subject": branch.subject, "prompt": branch.prompt},
                )
        settings["timings"] = {"load_seconds": round(load_seconds, 3), "generate_seconds": round(seconds, 3)}
        settings["nursing"] = [
            {"step": r.step, "updates": r.updates, "losses": [round(x, 4) for x in r.losses]}
            for r in out.nursing or []
        ]
        settings["files"] = files
        save_png(image, files["image"], {"parameters": params, "detailpp": dumps(settings)})
        atomic_write_text(f"{stem}.json", dumps(settings) + "\n")
        logger.info("wrote %s (%.1f s)", files["image"], seconds)
        print(files["image"])
    return 0
