"""The paper's benchmarks: print a suite, generate its images (sharded over GPUs, resumable), score them, report.

examples:
  detailpp bench prompts --suite scb
  detailpp bench generate --suite t2i-color --method detailpp --output-dir runs/color-detailpp
  detailpp bench plans --suite t2i-color --output color-plans.jsonl   # then: generate ... --plans color-plans.jsonl
  torchrun --nproc_per_node 2 --no-python detailpp bench generate --suite t2i-color --method sdxl \
      --output-dir runs/c-sdxl
  detailpp bench score runs/color-detailpp --metric blip-vqa
  detailpp bench report runs/color-sdxl runs/color-detailpp --output-dir runs/report --paper

See docs/benchmarks.md for the protocols, the default models and every flag.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from detailpp.bench import BenchError
from detailpp.bench import blip_vqa as _blip
from detailpp.bench import image_reward as _ir
from detailpp.bench import scb as _scb
from detailpp.bench.metrics import METRIC_NAMES, make_metric
from detailpp.bench.models import default_device
from detailpp.bench.sharding import resolve_shard
from detailpp.bench.suites import BASE_SEED, DEFAULT_IMAGES_PER_PROMPT, SUITE_NAMES, Suite, load_suite
from detailpp.cli import HelpFormatter, add_deprecated_alias, add_output_flags
from detailpp.cli.flags import (
    add_compile_flag,
    add_device_flags,
    add_model_flag,
    add_planner_flags,
    add_size_flags,
    planner_from_args,
)
from detailpp.errors import operation
from detailpp.plan import GRANULARITIES

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
METHODS = ("sdxl", "detailpp")


def _suite_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--suite", choices=SUITE_NAMES, help="a packaged suite")
    g.add_argument("--prompt-file", type=Path, help="a custom suite: a UTF-8 text file, one prompt a line")


def _shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-index", type=int, help="this process's shard (with --num-shards; not under torchrun)")
    p.add_argument("--num-shards", type=int, help="how many shards the items are split into (item i -> i %% N)")
    add_deprecated_alias(p, "--no-progress", "--quiet", dest="quiet", nargs=0, const=True)


def _output_dir_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--output-dir", type=Path, help=help_text)
    add_deprecated_alias(g, "--out", "--output-dir", dest="output_dir", type=Path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``detailpp bench``'s actions, one sub-parser each."""
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="ACTION")
    _add_prompts_parser(sub)
    _add_generate_parser(sub)
    _add_plans_parser(sub)
    _add_score_parser(sub)
    _add_report_parser(sub)


def _add_prompts_parser(sub: Any) -> None:
    p = sub.add_parser("prompts", help="print a suite's prompts, one a line (or JSON)", formatter_class=HelpFormatter)
    add_output_flags(p)
    _suite_args(p)
    p.add_argument("--json", action="store_true", help="print JSON (SCB: with each prompt's components)")
    p.set_defaults(_bench=_prompts)


def _add_generate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a suite's images (resumable; sharded under torchrun/accelerate)",
        formatter_class=HelpFormatter,
    )
    add_output_flags(p)
    _suite_args(p)
    p.add_argument("--method", choices=METHODS, default="detailpp", help="plain SDXL or Detail++ (default)")
    add_model_flag(p, DEFAULT_MODEL, DEFAULT_MODEL)
    _output_dir_arg(p, "the run's folder (one method and setting per folder)")
    p.add_argument("--images-per-prompt", type=int, default=DEFAULT_IMAGES_PER_PROMPT)
    p.add_argument("--base-seed", type=int, default=BASE_SEED, help="image k of each prompt uses base + k")
    p.add_argument("--max-prompts", type=int, help="only the first N prompts (a run can be extended later)")
    p.add_argument(
        "--steps", type=int, help="denoising steps (default: 50 as in the paper's tables; 20 on the embedded models)"
    )
    p.add_argument(
        "--guidance-scale", type=float, help="classifier-free guidance (default: 7.5 as in the paper; 5.0 on toy)"
    )
    add_size_flags(p)
    add_device_flags(p, "the launcher's, else the best available")
    p.add_argument("--detail-config", help="DetailConfig fields as JSON or a JSON file (method detailpp)")
    p.add_argument(
        "--plans", type=Path, help="precomputed plans (from `bench plans`): no spaCy needed (method detailpp)"
    )
    p.add_argument("--label", help="the method's name in reports (default: --method)")
    add_planner_flags(
        p,
        cache_note="; the model's plans are kept in the run folder's llm-plans.jsonl (a resumed run reads them) and "
        "run.json records the planner and model (method detailpp)",
    )
    add_compile_flag(p, "; a speed setting like --device: not part of the run's identity")
    _shard_args(p)
    p.set_defaults(_bench=_generate)


def _add_plans_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plans",
        help="write the Detail++ plans of a suite's prompts (spaCy, or --planner llm), for `generate --plans`",
        formatter_class=HelpFormatter,
    )
    add_output_flags(p)
    _suite_args(p)
    p.add_argument("--max-prompts", type=int, help="only the first N prompts")
    p.add_argument("--granularity", choices=GRANULARITIES, default="subject", help="as DetailConfig")
    add_planner_flags(p, cache_flag=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--output", type=Path, help="the plans file to write (JSON Lines, one plan a line)")
    add_deprecated_alias(g, "--out", "--output", dest="output", type=Path)
    p.set_defaults(_bench=_plans)


def _add_score_parser(sub: Any) -> None:
    p = sub.add_parser(
        "score",
        help="score a run's images (resumable; sharded like generate)",
        formatter_class=HelpFormatter,
    )
    add_output_flags(p)
    p.add_argument("dir", type=Path, help="a folder made by `detailpp bench generate`")
    p.add_argument("--metric", choices=METRIC_NAMES, help="default: blip-vqa for T2I-CompBench, scb for SCB")
    p.add_argument("--device", help="default: the launcher's, else cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--rescore", action="store_true", help="score again with new settings (old scores ignored)")
    p.add_argument("--blip-model", default=_blip.DEFAULT_MODEL, help=f"BLIP VQA checkpoint ({_blip.DEFAULT_MODEL})")
    p.add_argument("--clip-model", default=_scb.DEFAULT_CLIP_MODEL, help=f"SCB: CLIP ({_scb.DEFAULT_CLIP_MODEL})")
    p.add_argument("--detector", default=_scb.DEFAULT_DETECTOR, help=f"SCB: Grounding DINO ({_scb.DEFAULT_DETECTOR})")
    p.add_argument("--box-threshold", type=float, default=_scb.DEFAULT_BOX_THRESHOLD, help="SCB: detector box (0.35)")
    p.add_argument(
        "--text-threshold", type=float, default=_scb.DEFAULT_TEXT_THRESHOLD, help="SCB: detector text (0.25)"
    )
    p.add_argument(
        "--missing",
        choices=_scb.MISSING_POLICIES,
        default=_scb.DEFAULT_MISSING,
        help="SCB: a component not detected is scored on the whole image (default), as 0, or skipped",
    )
    p.add_argument("--min-box", type=int, default=_scb.DEFAULT_MIN_BOX, help="SCB: smaller boxes = not detected (8)")
    p.add_argument("--image-reward-model", default=_ir.DEFAULT_MODEL, help="ImageReward-v1.0 or a local .pt")
    p.add_argument("--image-reward-root", help="ImageReward's download folder (holds med_config.json)")
    _shard_args(p)
    p.set_defaults(_bench=_score)


def _add_report_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="Table 1 (Markdown + CSV), a bar chart and the worst prompts per method",
        formatter_class=HelpFormatter,
    )
    add_output_flags(p)
    p.add_argument("dirs", type=Path, nargs="+", help="run folders (one per method and suite)")
    _output_dir_arg(p, "where to write the report")
    p.add_argument("--paper", action="store_true", help="add the paper's Table 1 rows for comparison")
    p.add_argument("--worst", type=int, default=8, help="prompts per gallery (8)")
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt in the gallery (4)")
    p.set_defaults(_bench=_report)


def run(args: argparse.Namespace) -> int:
    from detailpp.cli import UserError

    try:
        return int(args._bench(args) or 0)
    except BenchError as e:
        raise UserError(str(e)) from e


# --- prompts ---------------------------------------------------------------------------------------------------------
def _prompts(args: argparse.Namespace) -> int:
    import sys

    suite = load_suite(args.suite, args.prompt_file)
    if args.json:
        if suite.name == "scb":
            from detailpp.bench.suites import load_scb_prompts

            data: Any = [vars(p) for p in load_scb_prompts()]
        else:
            data = list(suite.prompts)
        sys.stdout.write(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("".join(p + "\n" for p in suite.prompts))
    return 0


# --- generate --------------------------------------------------------------------------------------------------------
def parse_detail_config(text: str | None) -> dict:
    """``--detail-config``: a JSON object, or the path of a file holding one."""
    if not text:
        return {}
    source = text
    if not text.lstrip().startswith("{"):
        try:
            source = Path(text).read_text(encoding="utf-8")
        except OSError as e:
            raise BenchError(f"--detail-config: cannot read {text!r} ({e.strerror or e}); give JSON or a file.") from e
    try:
        data = json.loads(source)
    except json.JSONDecodeError as e:
        raise BenchError(f"--detail-config is not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise BenchError("--detail-config must be a JSON object of DetailConfig fields.")
    return data


def detail_config_of(fields: dict, defaults: dict | None = None) -> tuple[Any, dict]:
    """``(config, asdict(config))`` for ``--detail-config``'s ``fields`` over the model's ``defaults``
    (:meth:`DetailConfig.from_fields`, the one way a DetailConfig is built from fields); an unknown field is a
    :class:`BenchError` naming the flag."""
    try:
        from detailpp import DetailConfig
    except ImportError as e:
        raise BenchError(f"The Detail++ pipeline is not available in this installation ({e}).") from e
    try:
        config = DetailConfig.from_fields(fields, defaults=defaults)
    except TypeError as e:
        raise BenchError(f"--detail-config: {e}.") from e
    return config, asdict(config)


class PipelineGenerator:
    """``generator(prompt, seed) -> PIL image`` on the Detail++ pipeline (``sdxl``: plain SDXL, same components).

    The pipeline is loaded by :meth:`load`, or by the first call, so resuming a finished run never loads the weights.
    ``plans`` (prompt -> :class:`~detailpp.DecompositionPlan`) replaces the spaCy parser. ``compile_unet``: call
    the pipeline's ``compile_detail()`` after loading (the compilation itself happens in the first image).
    """

    def __init__(
        self,
        method: str,
        model: str,
        device: str | None,
        dtype: str | None,
        settings: dict,
        detail_config: Any = None,
        plans: dict | None = None,
        compile_unet: bool = False,
        planner: Any = None,
        config: str | None = None,
    ):
        self.method, self.model, self.device, self.dtype = method, model, device, dtype
        self.settings, self.detail_config, self.plans = settings, detail_config, plans
        self.compile_unet, self.planner, self.config = compile_unet, planner, config
        self.pipe: Any = None

    def load(self) -> None:
        if self.pipe is not None:
            return
        try:
            from detailpp.models.loading import load_pipeline
        except ImportError as e:
            raise BenchError(f"The Detail++ pipeline is not available in this installation ({e}).") from e
        with operation(f"loading the model {self.model!r}"):
            pipe = load_pipeline(self.model, device=self.device, dtype=self.dtype, config=self.config)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        self.device = str(getattr(pipe, "device", None) or self.device or "cpu")
        if self.compile_unet:
            pipe.compile_detail()  # plain SDXL (--method sdxl) runs through the same compiled blocks
        self.pipe = pipe

    def __call__(self, prompt: str, seed: int):
        import torch

        self.load()
        s = self.settings
        kwargs = dict(
            prompt=prompt,
            num_inference_steps=s["steps"],
            guidance_scale=s["guidance_scale"],
            height=s["height"],
            width=s["width"],
            generator=torch.Generator(self.device).manual_seed(seed),
            output_type="pil",
        )
        with operation(f"generating {prompt!r} with seed {seed}"):
            if self.method == "sdxl":
                out = self.pipe.plain_pipeline()(**kwargs)  # the plain base pipeline on the same components
            else:
                plan = None if self.plans is None else self.plans[prompt]
                out = self.pipe(**kwargs, detail_config=self.detail_config, plan=plan, planner=self.planner)
        return out.images[0]


def _suite_prompts(args: argparse.Namespace) -> tuple[Suite, list[str]]:
    """The suite of ``--suite``/``--prompt-file`` and its first ``--max-prompts`` prompts."""
    suite = load_suite(args.suite, args.prompt_file)
    if args.max_prompts is not None and args.max_prompts < 1:
        raise BenchError(f"--max-prompts must be at least 1, got {args.max_prompts}.")
    return suite, list(suite.prompts[: args.max_prompts] if args.max_prompts else suite.prompts)


def _generate(args: argparse.Namespace) -> int:
    from detailpp.bench.generation import check_run_identity, run_generation, run_identity
    from detailpp.cli.common import quiet_loading

    suite, prompts = _suite_prompts(args)
    detail_config, detail_dict = _bench_detail_config(args)  # checks the model before reading anything of it
    settings = _generation_settings(args)
    if args.quiet:
        quiet_loading()
    planner = _suite_planner(args)
    plans = _suite_plans(args, prompts)
    identity = run_identity(
        suite,
        args.method,
        args.model,
        settings,
        args.images_per_prompt,
        args.base_seed,
        detail_dict,
        args.label,
        plans=None if plans is None else "file",
        planner=None if planner is None else planner.identity(),
    )
    if args.config is not None:  # a single file's configuration: part of what the images depend on
        identity["model_config"] = args.config
    shard = resolve_shard(args.shard_index, args.num_shards, args.device)
    record_plans = None
    if plans is not None:
        from detailpp.bench.plans import record_run_plans

        check_run_identity(args.output_dir, identity, write=False)  # the folder's settings first, then its plans
        record_run_plans(args.output_dir, plans, write=False)

        def record_plans() -> None:  # with the run's first image, as run.json
            record_run_plans(args.output_dir, plans, write=shard.is_main or shard.launcher == "manual")

    if planner is not None:  # the server is reachable and takes the key, before any model loads
        planner.check(prompts, getattr(detail_config, "granularity", "subject"))
    generate_fn = PipelineGenerator(
        args.method,
        args.model,
        shard.device,
        args.dtype,
        settings,
        detail_config,
        plans,
        args.compile,
        planner,
        args.config,
    )
    args.interrupt_hint = f"the images made so far stay in {args.output_dir}: run the same command to resume"
    summary = run_generation(
        args.output_dir,
        suite,
        identity,
        generate_fn,
        max_prompts=args.max_prompts,
        shard=shard,
        progress=not args.quiet,
        prepare=generate_fn.load,
        on_first_image=record_plans,
    )
    if summary.made:
        logger.info(
            "shard %d: %d image(s) in %.1f s of generation (%.2f images/min), model load %.1f s",
            shard.index,
            summary.made,
            summary.seconds,
            60 * summary.made / max(summary.seconds, 1e-9),
            summary.extra.get("load_s", 0.0),
        )
    return 0


def _generation_settings(args: argparse.Namespace) -> dict:
    """The run's sampling settings: the model's native size, steps and guidance unless given (toy: 128x128, 20
    steps, guidance 5), every value checked, and the device and dtype (``args`` is updated to match)."""
    from detailpp.cli.common import (
        check_device,
        check_dtype,
        default_steps,
        family_guidance,
        native_size,
        side_multiple,
    )
    from detailpp.inputs import check_guidance, check_image_side, check_seed, check_steps

    size = native_size(args.model, args.config)
    args.height = size if args.height is None else args.height
    args.width = size if args.width is None else args.width
    family = getattr(args, "family", None)
    args.steps = default_steps(args.model, family) if args.steps is None else args.steps
    if args.guidance_scale is None:  # T2I-CompBench's 7.5 on the UNets; FLUX.1 3.5 and SD3 7.0, their pipelines'
        args.guidance_scale = 5.0 if args.model == "toy" else family_guidance(family, 7.5)
    check_steps("--steps", args.steps)
    multiple = side_multiple(family)
    check_image_side("--height", args.height, multiple=multiple)
    check_image_side("--width", args.width, multiple=multiple)
    check_guidance("--guidance-scale", args.guidance_scale)
    if args.images_per_prompt < 1:
        raise BenchError(f"--images-per-prompt must be at least 1, got {args.images_per_prompt}.")
    check_seed("--base-seed", args.base_seed)  # and base + k, the seed of every prompt's last image
    check_seed("--base-seed + --images-per-prompt - 1", args.base_seed + args.images_per_prompt - 1)
    if args.device is not None:
        check_device(args.device)
    args.dtype = check_dtype(args.dtype, args.device or check_device(None))
    return {
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
        "dtype": args.dtype,
    }


def _bench_detail_config(args: argparse.Namespace) -> tuple[Any, dict | None]:
    """``(DetailConfig, its dict)`` of ``--detail-config`` over the model's recommended settings (its
    ``detail_config.json``); ``(None, None)`` for ``--method sdxl``. The model is checked (:func:`check_model`)
    before anything of it is read."""
    from detailpp.cli.common import check_model

    fields = parse_detail_config(args.detail_config)
    if args.method == "sdxl" and fields:
        raise BenchError("--detail-config applies to --method detailpp only.")
    args.family = check_model(args.model, args.config)  # a path naming nothing, an unrunnable family, an offline Hub
    if args.method == "sdxl":
        return None, None
    from detailpp.config import ConfigError
    from detailpp.models.loading import model_detail_defaults

    try:
        defaults = model_detail_defaults(args.model)
    except ConfigError as e:
        raise BenchError(str(e)) from e
    return detail_config_of(fields, defaults)


def _suite_plans(args: argparse.Namespace, prompts: list[str]) -> dict | None:
    """``--plans``: prompt -> plan for each of the run's prompts (``None`` without the flag: the spaCy parser)."""
    if args.plans is None:
        return None
    from detailpp.bench.plans import plans_for, read_plans

    if args.method != "detailpp":
        raise BenchError("--plans applies to --method detailpp only.")
    return plans_for(prompts, read_plans(args.plans), str(args.plans))


def _suite_planner(args: argparse.Namespace) -> Any:
    """``--planner llm``: the LLM planner, its plans cached in the run folder (``None`` for spaCy, the default)."""
    from detailpp.parsing.plan_cache import CACHE_FILE

    if args.planner == "spacy":
        planner_from_args(args)  # an --llm-* flag without --planner llm is an error
        return None
    if args.plans is not None:
        raise BenchError("--plans and --planner llm both give the plans: use one of them.")
    if args.method != "detailpp":
        raise BenchError("--planner applies to --method detailpp only.")
    return planner_from_args(args, cache=args.output_dir / CACHE_FILE)


# --- plans -----------------------------------------------------------------------------------------------------------
def _plans(args: argparse.Namespace) -> int:
    from detailpp.bench.plans import write_plans
    from detailpp.parsing.planner import plan_prompts

    _, prompts = _suite_prompts(args)
    plans = plan_prompts(prompts, planner_from_args(args), args.granularity)
    write_plans(args.output, plans)
    logger.info(
        "wrote %d plan(s) (%s granularity, %d with detail branches) to %s",
        len(plans),
        args.granularity,
        sum(1 for p in plans if p.branches),
        args.output,
    )
    return 0


# --- score -----------------------------------------------------------------------------------------------------------
def _score(args: argparse.Namespace) -> int:
    from detailpp.bench.manifest import RUN_FILE, load_json
    from detailpp.bench.scoring import run_scoring

    if not args.dir.is_dir():
        raise BenchError(f"{args.dir} is not a folder; give the --out folder of `detailpp bench generate`.")
    if args.batch_size < 1:
        raise BenchError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.device is not None:
        from detailpp.cli.common import check_device

        check_device(args.device)
    run_info = load_json(args.dir / RUN_FILE, "the run's settings")
    metric_name = args.metric or ("scb" if run_info.get("suite") == "scb" else "blip-vqa")
    shard = resolve_shard(args.shard_index, args.num_shards, args.device)
    device = shard.device or default_device()
    scb_settings = _scb.ScbSettings(
        args.clip_model, args.detector, args.box_threshold, args.text_threshold, args.missing, args.min_box
    )
    metric = make_metric(
        metric_name, device, args.blip_model, scb_settings, args.image_reward_model, args.image_reward_root
    )
    args.interrupt_hint = f"the scores so far stay in {args.dir}: run the same command to resume"
    summary = run_scoring(
        args.dir, metric, shard=shard, batch_size=args.batch_size, rescore=args.rescore, progress=not args.quiet
    )
    logger.info(
        "%s: %d image(s) scored now, %d before, of %d.", metric_name, summary.made, summary.done_before, summary.total
    )
    return 0


# --- report ----------------------------------------------------------------------------------------------------------
def _report(args: argparse.Namespace) -> int:
    from detailpp.bench.report import write_report

    if args.worst < 1 or args.per_prompt < 1:
        raise BenchError("--worst and --per-prompt must be at least 1.")
    paths = write_report(args.dirs, args.output_dir, paper=args.paper, worst=args.worst, per_prompt=args.per_prompt)
    logger.info("report written: %s", ", ".join(str(p) for p in paths.values()))
    return 0
