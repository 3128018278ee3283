"""The binding benchmark on the toy model: plain sampling, Detail++ and its ablation, judged by the toy judge.

Run from the repository root (the lab is no part of the installed package)::

  python -m research.toy.bench --prompts 200 --seeds 4 --workers 8 --device cuda --grid docs/img/toy-binding.png

See docs/toy-binding.md for the protocol and :mod:`research.toy.binding` for the code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from detailpp.bench import BenchError
from detailpp.cli import HelpFormatter, UserError, add_deprecated_alias, add_output_flags, describe_os_error
from detailpp.cli.bench import parse_detail_config
from detailpp.plan import PlanError

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m research.toy.bench", description=(__doc__ or "").strip(), formatter_class=HelpFormatter
    )
    add_output_flags(p, top=True)
    p.add_argument("--prompts", type=int, default=200, help="held-out 2-/3-object prompts (200)")
    p.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="test (default): the prompts results report; validation: disjoint prompts to choose hyperparameters on",
    )
    p.add_argument("--seeds", type=int, default=4, help="images per prompt and method (4)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (20, the authors' code)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (7.5)")
    p.add_argument(
        "--model", default="toy", help="toy (default), a local diffusers folder, or tiny-random (plumbing only)"
    )
    p.add_argument("--height", type=int, help="default: the model's size (128 for toy)")
    p.add_argument("--width", type=int, help="default: the model's size (128 for toy)")
    p.add_argument("--device", help="cuda, cpu, ... (default: the best available)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float32", help="float32")
    p.add_argument("--methods", default=",".join(_toy_methods()), help="comma-separated subset of the methods")
    p.add_argument(
        "--detail-config",
        help="DetailConfig fields as JSON or a JSON file, under every Detail++ method and diagnostic setting "
        "(each method's own fields win: pdi keeps nursing off)",
    )
    p.add_argument(
        "--diagnostic-prompts", type=int, default=0, help="seed 0 of the first N prompts also runs the diagnostics"
    )
    p.add_argument("--no-diagnostic-settings", action="store_true", help="diagnostic items keep branch images only")
    p.add_argument(
        "--diagnostic-settings",
        help="comma-separated subset of the diagnostic settings (default: all; see docs/toy-binding.md)",
    )
    p.add_argument(
        "--force-layout-steps",
        type=int,
        nargs="+",
        default=[],
        metavar="K",
        help="also run Detail++ with every branch forced onto branch 0's latent for the first K steps, and its "
        "control with ALM off, on the diagnostic items (a diagnostic, not the paper's method)",
    )
    p.add_argument("--plans", default="parser", help="parser (spaCy), scene (read off the scene) or a plans JSON")
    p.add_argument(
        "--write-plans", type=Path, help="only write the plans of the --prompts of the --split to this JSON file"
    )
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: this process; 8 on one GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker (1)")
    p.add_argument("--judge-scenes", type=int, default=400, help="perturbed renders to measure the judge on (400)")
    p.add_argument("--max-minutes", type=float, help="start no item after this long; report the finished ones")
    p.add_argument(
        "--output-dir", dest="work_dir", type=Path, default=Path("outputs/toy-binding"), help="records and grid images"
    )
    add_deprecated_alias(p, "--work-dir", "--output-dir", dest="work_dir", type=Path)
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/toy_binding.json"), help="results file")
    p.add_argument("--markdown", type=Path, help="also write the tables as Markdown here")
    p.add_argument("--grid", type=Path, help="write the picture grid (prompt, plain, Detail++, masks, p1) here")
    p.add_argument("--grid-prompts", type=int, default=8, help="prompts in the grid (8; seed 0)")
    return p


def _toy_methods() -> tuple[str, ...]:
    from research.toy.binding import METHODS

    return tuple(METHODS)


def run(args: argparse.Namespace) -> int:
    from research.toy import binding

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    known = {**binding.METHODS, **binding.DIAGNOSTICS}
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise BenchError(f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(known)}.")
    for name in ("prompts", "seeds", "steps"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.device is not None:
        from detailpp.cli.common import check_device

        check_device(args.device)
    diagnostics: tuple[str, ...] = tuple(binding.DIAGNOSTICS)
    if args.no_diagnostic_settings:
        diagnostics = ()
    elif args.diagnostic_settings is not None:
        diagnostics = tuple(d.strip() for d in args.diagnostic_settings.split(",") if d.strip())
        wrong = [d for d in diagnostics if d not in binding.DIAGNOSTICS]
        if wrong:
            raise BenchError(
                f"--diagnostic-settings: unknown {wrong}; choose from {', '.join(binding.DIAGNOSTICS)} "
                "(or --no-diagnostic-settings for none)."
            )
    bad_k = [k for k in args.force_layout_steps if not 1 <= k <= args.steps]
    if bad_k:
        raise BenchError(f"--force-layout-steps: K must lie in 1..--steps ({args.steps}), got {bad_k}.")
    diagnostics += binding.forced_settings(args.force_layout_steps)
    overlay = parse_detail_config(args.detail_config)
    if args.write_plans is not None:
        specs = binding.split_prompts(args.prompts, args.split)
        plans = binding.make_plans(specs, args.plans, binding._tokenizer(args.model), args.split)
        args.write_plans.parent.mkdir(parents=True, exist_ok=True)
        args.write_plans.write_text(json.dumps(plans, indent=1) + "\n", encoding="utf-8")
        logger.info("wrote %d plans (%s split) to %s", len(plans), args.split, args.write_plans)
        return 0
    grid_prompts = args.grid_prompts if args.grid else 0
    settings = binding.BindingSettings(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        methods=methods,
        diagnostics=diagnostics,
        diagnostic_prompts=max(args.diagnostic_prompts, grid_prompts),
        grid_prompts=grid_prompts,
        threads=args.threads,
        detail_config=overlay,
    )
    res = binding.run_benchmark(
        args.prompts,
        args.seeds,
        settings,
        args.work_dir,
        args.results,
        plans_source=args.plans,
        workers=args.workers,
        judge_scenes=args.judge_scenes,
        max_minutes=args.max_minutes,
        grid_path=args.grid,
        markdown_path=args.markdown,
        split=args.split,
    )
    sys.stdout.write(binding.markdown_table(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command: one clear line and exit code 2 for bad input, as ``detailpp`` does."""
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for notice in getattr(args, "_deprecated", None) or []:
        logger.warning(notice)
    try:
        return int(run(args) or 0)
    except (BenchError, UserError, PlanError, ValueError, OSError) as e:
        if args.verbose:
            logger.exception("failed")
        message = describe_os_error(e) if isinstance(e, OSError) else str(e)
        print(f"research.toy.bench: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
