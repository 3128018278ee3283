"""Generate images with Detail++ and write them with their parameters.

Every image gets A1111's running number, its seed and the prompt's first words: NNNNN-SEED-PROMPT.png (an
A1111 parameters chunk and the full Detail++ settings as JSON in a detailpp chunk) and NNNNN-SEED-PROMPT.json
(the same settings, the plan and timings); with --save-branches NNNNN-SEED-PROMPT-branches.png (every branch
captioned with its sub-prompt) and with --save-masks NNNNN-SEED-PROMPT-mask-I-SUBJECT.png (each subject's mask
outlined over the image). No file is ever overwritten: the next image takes the next number.

Examples:
  detailpp generate "a red circle next to a striped blue square" --steps 12 --save-branches --save-masks
  detailpp generate "a red dog with sunglasses and a blue cat with a necklace" \\
      --model stabilityai/stable-diffusion-xl-base-1.0 --device cuda --dtype float16 --seed 0 1 -1
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from detailpp.atomic import atomic_write_text
from detailpp.cli import UserError
from detailpp.cli.common import (
    BUILTIN_SIZES,
    SCHEDULERS,
    a1111_sampler,
    check_controlnet_args,
    check_device,
    check_dtype,
    check_family_flags,
    check_model,
    check_output_dir,
    check_size,
    default_steps,
    numbered_stem,
    quiet_loading,
    resolve_seeds,
    scheduler_name,
    set_scheduler,
    slug,
)
from detailpp.cli.flags import (
    add_compile_flag,
    add_device_flags,
    add_model_flag,
    add_planner_flags,
    add_size_flags,
    planner_from_args,
)
from detailpp.config import PRESETS, DetailConfig
from detailpp.errors import operation
from detailpp.images import a1111_parameters, captioned_grid, dumps, mask_overlay, save_png
from detailpp.inputs import check_guidance, check_prompt_window, check_scheduler_steps, check_steps
from detailpp.models.lora import LoraError, apply_loras, check_peft, parse_lora
from detailpp.parsing.plan_cache import CACHE_FILE
from detailpp.plan import GRANULARITIES, DecompositionPlan, PlanError, check_prompt_text, load_plan, retokenized

logger = logging.getLogger(__name__)


def default_model() -> str:
    from detailpp.models.loading import toy_model_available

    return "toy" if toy_model_available() else "tiny-random"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (may be omitted with --plan)")
    add_model_flag(p, None, "the embedded toy model, else tiny-random")
    p.add_argument(
        "--seed", type=int, nargs="+", default=[0], help="one image per seed; -1: a random seed, recorded (default: 0)"
    )
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50; 20 on the embedded models)")
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance (default: the pipeline's, SDXL 5.0, SD 7.5)",
    )
    add_size_flags(p)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument(
        "--scheduler",
        type=scheduler_name,
        choices=tuple(SCHEDULERS),
        default=None,
        help="the sampler (default: the model's own, Euler on the embedded models)",
    )
    # Detail++ settings: left out, the model's recommendation (its detail_config.json) or the preset's default
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default="detailpp",
        help="detailpp: our defaults; authors: reproduce the authors' code (clf28/Detail-plus-plus at e73155b), "
        "every deviation of ours undone, see docs/method.md (default: detailpp)",
    )
    p.add_argument("--tau", type=float, default=None, help="mask threshold tau of eq. 3, in (0, 1) (default: 0.5)")
    p.add_argument(
        "--share-steps", type=float, default=None, help="fraction of steps sharing attention, with ALM (default: 0.8)"
    )
    p.add_argument(
        "--nursing", action=argparse.BooleanOptionalAction, default=None, help="attention nursing (default: on)"
    )
    p.add_argument("--centroid-alignment", action=argparse.BooleanOptionalAction, default=None, help="(default: on)")
    p.add_argument("--granularity", choices=GRANULARITIES, default=None, help="(default: subject)")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA .safetensors file (or a folder holding one) and its scale; repeatable; needs peft "
        "(default: none)",
    )
    add_controlnet_arguments(p)
    p.add_argument("--plan", type=Path, default=None, help="a plan JSON file (as 'detailpp decompose --json')")
    add_planner_flags(p, cache_note=f"; the model's plans are kept in OUTPUT_DIR/{CACHE_FILE}")
    p.add_argument("--save-branches", action="store_true", help="also write a grid of every branch")
    p.add_argument("--save-masks", action="store_true", help="also write each subject's mask over the image")
    p.add_argument("--output-dir", type=Path, default=Path("outputs"), help="(default: outputs)")
    add_device_flags(p)
    add_compile_flag(p)
    p.add_argument(
        "--eager-nursing",
        action="store_true",
        help="run the nursing passes eagerly, not replayed as CUDA graphs (the default on a GPU, about 4x faster a "
        "pass; both compute the same kernels)",
    )


def add_controlnet_arguments(p: argparse.ArgumentParser) -> None:
    """SDXL ControlNet's flags (one image, and optionally one scale, per --controlnet)."""
    p.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="ID|PATH",
        help="an SDXL ControlNet (Hub id or folder; tiny-random: a tiny random one for --model tiny-random); "
        "repeatable for several ControlNets, each with its --control-image (default: none)",
    )
    p.add_argument(
        "--control-image",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="the control image of each --controlnet, in the same order; its size is the image's",
    )
    p.add_argument(
        "--controlnet-scale",
        action="append",
        type=float,
        default=[],
        metavar="FLOAT",
        help="controlnet_conditioning_scale: one for all ControlNets or one per ControlNet (default: 1.0)",
    )
    p.add_argument("--control-start", type=float, default=None, help="control_guidance_start (default: 0.0)")
    p.add_argument("--control-end", type=float, default=None, help="control_guidance_end (default: 1.0)")


def flag_fields(args: argparse.Namespace) -> dict:
    """The DetailConfig fields given on the command line (the model's recommended settings fill in the rest)."""
    given = {
        "mask_threshold": args.tau,
        "share_steps": args.share_steps,
        "nursing": args.nursing,
        "centroid_alignment": args.centroid_alignment,
        "granularity": args.granularity,
        "nursing_graphs": False if args.eager_nursing else None,
    }
    return {k: v for k, v in given.items() if v is not None}


def check_token_window(text: str, what: str) -> None:
    """The window rule (:func:`detailpp.inputs.check_prompt_window`) with SDXL's packaged CLIP tokenizer, before the
    model loads."""
    from detailpp.resources import load_clip_tokenizer

    check_prompt_window(text, what, load_clip_tokenizer())


def check_args(args: argparse.Namespace) -> DetailConfig:
    """Every argument checked before the model is loaded."""
    if args.prompt is None and args.plan is None:
        raise UserError("Give a prompt, or a plan with --plan PLAN.json.")
    if args.prompt is not None:
        try:
            check_prompt_text(args.prompt)
        except PlanError as e:
            raise UserError(str(e)) from None
    for name in ("height", "width"):
        check_size(name, getattr(args, name))
    if args.steps is not None:
        check_steps("--steps", args.steps)
    if args.guidance_scale is not None:
        check_guidance("--guidance-scale", args.guidance_scale)
    args.seed = resolve_seeds(args.seed)
    check_controlnet_args(args)
    try:
        args.lora_specs = [parse_lora(text) for text in args.lora]
        if args.lora_specs:
            check_peft()
    except LoraError as e:
        raise UserError(str(e)) from e
    config = make_config(args)
    check_output_dir(args.output_dir)
    return config


def make_config(args: argparse.Namespace, model_fields: dict | None = None) -> DetailConfig:
    """The call's DetailConfig: the flags over the model's recommendation over the preset; errors in flag names."""
    try:
        return DetailConfig.from_fields(flag_fields(args), defaults=model_fields, preset=args.preset)
    except ValueError as e:
        raise UserError(str(e).replace("mask_threshold (tau)", "--tau").replace("share_steps", "--share-steps")) from e


def early_plan(
    args: argparse.Namespace, config: DetailConfig, planner: Any = None, family: Any = None
) -> DecompositionPlan:
    """The plan (given, or parsed by ``planner``), validated with SDXL's packaged CLIP tokenizer before the model is
    loaded (the LLM planner asks its server here: a server that cannot be used fails before the load).

    FLUX.1 counts its subjects in T5 tokens and reads 512 of them: its window and a given plan's token indices are
    checked once the model (and its T5 tokenizer) is loaded; here the plan's structure is.
    """
    from dataclasses import replace

    from detailpp.plan import validate_plan
    from detailpp.resources import load_clip_tokenizer

    tokenizer = load_clip_tokenizer()
    clip_window = family is None or family.name != "flux"
    if args.plan is not None:
        plan = load_plan(args.plan)
    else:
        from detailpp.parsing.planner import plan_prompt

        if clip_window:
            check_token_window(args.prompt, "prompt")
        plan = plan_prompt(args.prompt, planner, config.granularity, tokenizer)
    if not clip_window:  # the structure only: the indices are T5's (checked after loading)
        stripped = replace(plan, branches=tuple(replace(b, subject_token_indices=()) for b in plan.branches))
        validate_plan(stripped, tokenizer, args.prompt)
        return plan
    plan = validate_plan(plan, tokenizer, args.prompt)
    for text, what in plan.texts_to_encode(args.negative_prompt):
        check_prompt_window(text, what, tokenizer)
    return plan


def run(args: argparse.Namespace) -> int:
    existed = args.output_dir.exists()
    try:
        return _run(args)
    except BaseException:
        if not existed:  # a failure before the first file (a full disk...) leaves no empty folder
            with contextlib.suppress(OSError):
                args.output_dir.rmdir()
        raise


def _run(args: argparse.Namespace) -> int:
    config = check_args(args)
    model = args.model or default_model()
    family = check_model(model, args.config)
    check_family_flags(family, args.height, args.width, args.scheduler, bool(args.controlnet))
    if model in BUILTIN_SIZES and not args.controlnet:  # a built-in's native size (else: the control image's)
        args.height, args.width = args.height or BUILTIN_SIZES[model], args.width or BUILTIN_SIZES[model]
    device = check_device(args.device)
    dtype = check_dtype(args.dtype, device)
    if model in ("toy",) or Path(model).is_dir():  # the model's recommended settings, readable before loading
        from detailpp.models.loading import model_detail_defaults

        config = make_config(args, model_detail_defaults(model))
    if args.plan is not None and args.planner != "spacy":
        raise UserError("--plan gives the plan itself; --planner parses a prompt: give one of them.")
    planner = planner_from_args(args, cache=args.output_dir / CACHE_FILE if args.planner == "llm" else None)
    with operation("parsing the prompt"):
        plan = early_plan(args, config, planner, family)
    if args.plan is not None and args.granularity not in (None, plan.granularity):
        logger.warning(
            "--granularity %s is ignored with --plan: the plan's own granularity (%s) is used.",
            args.granularity,
            plan.granularity,
        )
    with operation(f"loading the model {model!r}"):
        pipe, load_seconds = load(args, model, device, dtype)
    config = make_config(args, dict(pipe.detail_defaults))
    if args.compile:
        pipe.compile_detail()
        logger.info(
            "The first image compiles the denoiser's blocks (BENCHMARKS.md has the time); the later ones reuse them."
        )
    prompt = plan.prompt
    if args.plan is None and plan.granularity != config.granularity:  # the Hub model recommends another granularity
        plan = None
    elif args.plan is None:  # parsed with the packaged CLIP tokenizer: the model's own counts the subjects' tokens
        from detailpp.resources import load_clip_tokenizer

        plan = retokenized(plan, load_clip_tokenizer(), pipe.plan_tokenizer)
    # Validate the plan against the model's own tokenizer, once for every seed.
    plan = pipe.prepare_plan(prompt, plan, config, planner)
    if args.plan is not None:  # a given plan was split its own way: the settings record what ran
        config = config.replace(granularity=plan.granularity)
    if not plan.branches:
        logger.info(
            "No detail branch for %r: the image is plain %s sampling.", prompt, pipe.base_pipeline_class.__name__
        )
    args.steps = args.steps or default_steps(model, family, pipe)
    check_scheduler_steps(pipe.scheduler, args.steps, "--steps")  # before the first image
    call = call_arguments(args, model, config, plan, default_guidance(pipe))
    call["planner"] = planner  # recorded with each image; the plan is given, so the call parses nothing
    for k, seed in enumerate(args.seed):
        args.interrupt_hint = interrupt_hint(args.seed, k, args.output_dir)
        with operation(f"generating the image of seed {seed}"):
            generate_one(args, pipe, call, seed, load_seconds)
    args.interrupt_hint = None
    return 0


def interrupt_hint(seeds: list[int], k: int, folder: Path) -> str:
    """What an interrupt during seed ``seeds[k]`` leaves: the seeds done, those missing, how to make them."""
    done, missing = seeds[:k], seeds[k:]
    made = f"the images of seed(s) {', '.join(map(str, done))} are in {folder}; " if done else ""
    return (
        f"{made}seed(s) {', '.join(map(str, missing))} made no image: run the same command with --seed "
        f"{' '.join(map(str, missing))} to make them"
    )


def load(args: argparse.Namespace, model: str, device: str, dtype: str | None):
    """The pipeline, its scheduler, LoRAs and ControlNets set; and the seconds loading took."""
    from detailpp.models.loading import load_pipeline

    if model.startswith("tiny-random"):
        logger.warning("Model %r has random weights: its images are noise (it checks the set-up only).", model)
    if args.quiet:
        quiet_loading()
    started = time.perf_counter()
    pipe = load_pipeline(model, device=device, dtype=dtype, config=args.config)
    if args.controlnet:
        from detailpp.pipelines.sdxl_controlnet import with_controlnets

        pipe = with_controlnets(pipe, args.controlnet)
    load_seconds = time.perf_counter() - started
    pipe.set_progress_bar_config(disable=args.quiet)
    if args.scheduler is not None:
        set_scheduler(pipe, args.scheduler)
    try:
        apply_loras(pipe, args.lora_specs)
    except LoraError as e:
        raise UserError(str(e)) from e
    return pipe, load_seconds


def control_arguments(args: argparse.Namespace) -> dict:
    """The ControlNet pipeline's call arguments from the flags (empty without --controlnet)."""
    if not args.controlnet:
        return {}
    import PIL.Image

    images = [PIL.Image.open(path).convert("RGB") for path in args.control_image]
    scales = args.controlnet_scales
    return {
        "image": images if len(images) > 1 else images[0],
        "controlnet_conditioning_scale": scales if len(scales) > 1 else scales[0],
        "control_guidance_start": 0.0 if args.control_start is None else args.control_start,
        "control_guidance_end": 1.0 if args.control_end is None else args.control_end,
    }


def pipeline_family(pipe) -> str:
    """The family a pipeline runs (``"sdxl"``, ``"sd"``, ``"flux"``, ``"sd3"``), recorded with every image."""
    from detailpp.models.families import family_of_class

    return family_of_class(type(pipe).__name__).name


def default_guidance(pipe) -> float:
    """The default guidance scale of the pipeline's diffusers base (SDXL 5.0, SD 1.x/2.x 7.5, FLUX.1 3.5, SD3 7.0)."""
    from detailpp.pipelines.base import call_default

    guidance = getattr(pipe, "default_guidance_scale", None)
    return guidance if guidance is not None else float(call_default(type(pipe), "guidance_scale"))


def call_arguments(
    args: argparse.Namespace, model: str, config: DetailConfig, plan: DecompositionPlan, guidance: float = 5.0
) -> dict:
    """The pipeline's arguments shared by every seed (``guidance``: the scale when ``--guidance-scale`` is absent)."""
    return {
        "prompt": plan.prompt,
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.steps or default_steps(model),
        "guidance_scale": args.guidance_scale if args.guidance_scale is not None else guidance,
        "height": args.height,
        "width": args.width,
        "detail_config": config,
        "plan": plan,
        "return_branch_images": args.save_branches,
        "return_masks": args.save_masks,
        **control_arguments(args),
    }


def generate_one(args: argparse.Namespace, pipe, call: dict, seed: int, load_seconds: float) -> None:
    """One image for ``seed``, written with its parameters (and its branches and masks when asked for)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    t0 = time.perf_counter()
    out = pipe(generator=generator, **call)
    seconds = time.perf_counter() - t0
    image, plan, config = out.images[0], call["plan"], call["detail_config"]
    stem = numbered_stem(args.output_dir, seed, plan.prompt)
    settings = image_settings(args, pipe, call, seed, image)
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
    files["sidecar"] = f"{stem}.json"
    settings["timings"] = {"load_seconds": round(load_seconds, 3), "generate_seconds": round(seconds, 3)}
    settings["nursing"] = [
        {"step": r.step, "updates": r.updates, "losses": [round(x, 4) for x in r.losses]} for r in out.nursing or []
    ]
    settings["files"] = files
    params = a1111_params(args, pipe, call, seed, image)
    save_png(image, files["image"], {"parameters": params, "detailpp": dumps(settings)})
    atomic_write_text(files["sidecar"], dumps(settings) + "\n")
    logger.info("seed %d: %d file(s) in %s (%.1f s)", seed, len(files), args.output_dir, seconds)
    extra = [v for k, v in files.items() if k not in ("image", "sidecar")]
    for path in [files["image"], *extra, files["sidecar"]]:
        print(path)


def controlnet_settings(args: argparse.Namespace) -> list[dict]:
    """Each ControlNet's source, control image, scale and guidance window (recorded with the image)."""
    start = 0.0 if args.control_start is None else args.control_start
    end = 1.0 if args.control_end is None else args.control_end
    return [
        {"controlnet": net, "image": str(image), "scale": scale, "start": start, "end": end}
        for net, image, scale in zip(args.controlnet, args.control_image, args.controlnet_scales, strict=True)
    ]


def image_settings(args: argparse.Namespace, pipe, call: dict, seed: int, image) -> dict:
    """The settings recorded in the detailpp chunk and the sidecar JSON."""
    config, plan = call["detail_config"], call["plan"]
    settings = {
        "prompt": plan.prompt,
        "negative_prompt": args.negative_prompt,
        "model": args.model or default_model(),
        "seed": seed,
        "steps": call["num_inference_steps"],
        "guidance_scale": call["guidance_scale"],
        "width": image.width,
        "height": image.height,
        "scheduler": type(pipe.scheduler).__name__,
        "sampler": a1111_sampler(pipe.scheduler),
        "family": pipeline_family(pipe),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "compiled": args.compile,
        "eager_nursing": args.eager_nursing,
        "detail_config": config.to_dict(),
        "loras": [{"path": str(s.path), "scale": s.scale} for s in args.lora_specs],
        "plan": plan.to_dict(),
    }
    planner = call.get("planner")
    if planner is not None and planner.name != "spacy":
        settings["planner"] = planner.identity()
    if args.controlnet:
        settings["controlnets"] = controlnet_settings(args)
    return settings


def a1111_params(args: argparse.Namespace, pipe, call: dict, seed: int, image) -> str:
    """A1111's parameters text, with the Detail++ (and ControlNet) settings as extra fields."""
    config, plan = call["detail_config"], call["plan"]
    extra = {
        "Detail++ tau": config.mask_threshold,
        "Detail++ share steps": config.share_steps,
        "Detail++ nursing": config.nursing,
        "Detail++ preset": config.preset_name,
        "Detail++ branches": len(plan.branches),
        "Detail++ family": pipeline_family(pipe),
    }
    for i, net in enumerate(controlnet_settings(args) if args.controlnet else []):
        extra[f"ControlNet {i}"] = (
            f'"Model: {net["controlnet"]}, Image: {Path(net["image"]).name}, Weight: {net["scale"]}, '
            f'Guidance Start: {net["start"]}, Guidance End: {net["end"]}"'
        )
    return a1111_parameters(
        plan.prompt,
        args.negative_prompt,
        call["num_inference_steps"],
        a1111_sampler(pipe.scheduler),
        call["guidance_scale"],
        seed,
        image.width,
        image.height,
        args.model or default_model(),
        extra,
    )
