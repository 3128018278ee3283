"""Record what the authors' Detail++ computes, measure each of our deviations, and time both pipelines.

Give it a checkout of the authors' repository (``clf28/Detail-plus-plus`` at e73155b; never committed here: the
git-ignored ``.authors/`` of the repository's root is the place), and what their code imports::

    git clone https://github.com/clf28/Detail-plus-plus .authors && git -C .authors checkout e73155b
    pip install opencv-python-headless einops        # recording only; not a detailpp dependency

    python benchmarks/reference/record.py --authors .authors                 # rewrite the golden fixture (~3 min)
    python benchmarks/reference/record.py --authors .authors --deviations    # the deviation table
    python benchmarks/reference/record.py --authors .authors --gpu           # full size, fp16, timings

Recording runs their ``ProT2IPipeline`` (:mod:`authors`) on detailpp's tiny random SDXL components
(:func:`detailpp.models.tiny.tiny_components`, CPU, fp32) for each scenario of :data:`scenarios.SCENARIOS` and
writes, into ``tests/fixtures/authors_reference.safetensors``: every branch's final latent, the per-step binary
subject masks and the nursing losses, with the commit, every setting and what the recording measured (below) in
the file's metadata.
``tests/method/test_reference_parity.py`` rebuilds the same inputs from that metadata and checks that
``DetailConfig.authors_preset()`` reproduces them; it never reads the authors' code. Each recording is also checked
against the preset here before it is written. Every run, theirs and ours, and the fingerprint run on
:data:`scenarios.THREADS` threads (the test pins the same count). A recording that does not hold (the preset off the
authors' run, a margin, a gap or an effect too small) writes nothing and says which scenario to change.

Float results of the same code differ between CPUs, so the metadata also holds:

- the recording machine's platform fingerprint (:mod:`fingerprint`; the golden test asks bit-for-bit equality only
  where it is reproduced);
- each scenario's mask margin (:func:`scenarios.mask_margins`) and, nursing on, the blurred nursing maps' argmax gap
  (:func:`scenarios.argmax_gaps`): a scenario with a mask pixel within :data:`MIN_MASK_MARGIN` of the threshold's
  cut, or a near tie under :data:`MIN_ARGMAX_GAP`, is refused (``--find-seed NAME`` finds a seed that clears both),
  so that no mask pixel and no L_align target moves between machines;
- each scenario's cross-platform bounds on the final latents and the nursing losses: the worst difference of our
  preset's run on the emulated platforms of :mod:`noise` (other instruction sets and thread counts) from this
  machine's, times :data:`NOISE_MARGIN`, rounded up; and each of the scenario's switches (``Scenario.switches``)
  flipped alone, its effect on the latents and losses: one under :data:`MIN_EFFECT_RATIO` times the bounds is
  refused, so that flipping it fails the golden test on every machine. The switches whose effect is rounding alone
  are tested on their arithmetic instead (``tests/method/test_authors_switches.py``).

``--deviations`` starts from the preset and switches each of detailpp's deviations back to our default alone,
printing the max abs difference of the final latent from the authors' (the table in ``docs/method.md``), on each
scenario's own settings unless ``--steps`` or ``--size`` says otherwise.

``--gpu`` builds full-size SDXL with random weights (:mod:`detailpp.models.full_size`) on the GPU, fp16, 1024x1024,
and in one process on one card: compares the preset's final latent with the authors', and times plain SDXL, our
default, our preset and the authors' pipeline at 20 and 50 steps, nursing off and on, with peak memory
(``--rows`` picks rows; the table in BENCHMARKS.md). The authors' pipeline leaves its processors on every layer, so
each row starts from the UNet's original processors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from authors import COMMIT, CheckoutError, check_checkout, import_authors, run_authors  # noqa: E402
from fingerprint import platform_fingerprint  # noqa: E402
from noise import measure_effects, measure_noise, worst  # noqa: E402
from scenarios import (  # noqa: E402
    SCENARIOS,
    THREADS,
    MarginTooSmall,
    Scenario,
    authors_kwargs,
    initial_latent,
    pinned_threads,
    run_ours,
    tiny,
    versions,
)

from detailpp.config import AUTHORS_SETTINGS, AuthorsBehaviour, DetailConfig  # noqa: E402

logger = logging.getLogger("record")

FIXTURE = HERE.parents[1] / "tests" / "fixtures" / "authors_reference.safetensors"

#: The smallest mask margin a recorded scenario may have (in units of the normalised map, whose range is [0, 1]):
#: far above the CPU-to-CPU float noise of the maps (see :func:`scenarios.mask_margins`), so that no mask pixel flips
#: on another machine and the golden test can require identical masks everywhere.
MIN_MASK_MARGIN = 2e-5


#: The smallest relative gap a recorded nursing scenario may have between the two largest values of a blurred
#: nursing map (whose argmax is L_align's target): the seed first chosen for nursing on had one of 1.0e-4, and its
#: argmax moved under ``ATEN_CPU_CAPABILITY=avx2`` (a nursing loss by 0.1, the latents by 1.7e-3).
MIN_ARGMAX_GAP = 1e-3


def find_seed(scenario: Scenario, start: int, count: int) -> int | None:
    """The first initial-latent seed from ``start`` whose mask margin on our preset is :data:`MIN_MASK_MARGIN` or
    more (our pipeline only: the recording checks the authors' masks against ours), or ``None`` within ``count``."""
    for seed in range(start, start + count):
        candidate = dataclasses.replace(scenario, seed=seed)
        try:
            latents = initial_latent(candidate)
            margin = run_ours(tiny(candidate), candidate, candidate.detail_config(), latents, MIN_MASK_MARGIN)
        except MarginTooSmall as e:
            logger.info("%s seed %d: margin %.2g", scenario.name, seed, e.args[0])
            continue
        if margin["gap"] is not None and margin["gap"] < MIN_ARGMAX_GAP:
            logger.info("%s seed %d: blurred argmax gap %.2g", scenario.name, seed, margin["gap"])
            continue
        print(f"{scenario.name}: seed {seed}, mask margin {margin['margin']:.3g}, argmax gap {margin['gap']}")
        return seed
    return None


def authors_run(modules: Any, scenario: Scenario, latents: torch.Tensor) -> Any:
    """Their pipeline on the scenario, on fresh tiny components (so their processors never reach ours)."""
    components = tiny(scenario).components
    with pinned_threads():
        return run_authors(
            modules, components, scenario.sub_prompts, scenario.subjects, latents=latents, **authors_kwargs(scenario)
        )


def compare(ours: dict[str, Any], theirs: Any) -> dict[str, Any]:
    """Max abs latent difference (every branch, and the final one) and whether every step's masks are equal."""
    diff = (ours["latents"] - theirs.latents).abs()
    same_masks = len(ours["masks"]) == len(theirs.masks) and all(
        torch.equal(a.bool(), b.bool()) for a, b in zip(ours["masks"], theirs.masks, strict=True)
    )
    loss_diff = None
    if ours["losses"] or theirs.losses:
        if len(ours["losses"]) == len(theirs.losses):
            loss_diff = max(abs(a - b) for a, b in zip(ours["losses"], theirs.losses, strict=True))
        else:
            loss_diff = float("inf")
    return {
        "max_abs": float(diff.max()),
        "final_max_abs": float(diff[-1].max()),
        "masks_equal": same_masks,
        "mask_steps": (len(ours["masks"]), len(theirs.masks)),
        "loss_max_abs": loss_diff,
    }


def record(authors_path: Path, out: Path, jobs: int = 1) -> None:
    """Run both pipelines on every scenario, check the preset against theirs, measure the platforms' noise and each
    switch's effect (:mod:`noise`), write the fixture."""
    from safetensors.torch import save

    from detailpp.atomic import atomic_write_bytes

    modules = import_authors(authors_path)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {"repository": "clf28/Detail-plus-plus", "commit": COMMIT}
    with pinned_threads():
        fingerprints = {platform_fingerprint(tiny(scenario)) for scenario in SCENARIOS}
    if len(fingerprints) != 1:
        raise SystemExit("the scenarios' tiny components differ (component_seed): one platform fingerprint each")
    meta["fingerprint"] = fingerprints.pop()
    meta["threads"] = str(THREADS)
    scenarios = []
    for scenario in SCENARIOS:
        latents = initial_latent(scenario)
        theirs = authors_run(modules, scenario, latents)
        ours = run_ours(tiny(scenario), scenario, scenario.detail_config(), latents)
        result = compare(ours, theirs)
        logger.info("%s: %s, mask margin %s", scenario.name, result, ours["margin"])
        if (
            result["max_abs"] > scenario.atol
            or (result["loss_max_abs"] or 0.0) > scenario.atol
            or not result["masks_equal"]
        ):
            raise SystemExit(f"{scenario.name}: the reference preset does not reproduce the authors' run: {result}")
        check_margin(scenario, ours["margin"], ours["gap"])
        bounds = measured_bounds(scenario, jobs)
        tensors[f"{scenario.name}.initial_latent"] = latents.contiguous()
        tensors[f"{scenario.name}.latents"] = theirs.latents.contiguous()
        if theirs.masks:
            tensors[f"{scenario.name}.masks"] = torch.stack(theirs.masks).to(torch.uint8).contiguous()
        if theirs.losses:
            tensors[f"{scenario.name}.losses"] = torch.tensor(theirs.losses, dtype=torch.float64)
        scenarios.append(
            {
                **scenario.to_metadata(),
                **bounds,
                "detail_config": scenario.detail_config().to_dict(),
                "plan": scenario.plan(),
                "measured": result,
                "mask_margin": ours["margin"],
                "argmax_gap": ours["gap"],
            }
        )
    meta["scenarios"] = json.dumps(scenarios)
    meta["versions"] = json.dumps(versions())
    atomic_write_bytes(out, save(tensors, metadata=meta))
    print(f"wrote {out} ({out.stat().st_size} bytes): {', '.join(s['name'] for s in scenarios)}")


#: How far the golden test's cross-platform bounds sit above the noise measured on the emulated platforms
#: (:data:`noise.PLATFORMS`): emulation caps one machine's instruction sets, and another CPU's kernels may differ more.
NOISE_MARGIN = 2.0
#: The least factor by which flipping a scenario's switch must move what the golden test compares (the final
#: latents, or the nursing losses) beyond its cross-platform bound, so that it fails on every machine.
MIN_EFFECT_RATIO = 10.0


def round_up(x: float) -> float:
    """``x`` rounded up to one significant digit (0 stays 0)."""
    if x <= 0:
        return 0.0
    scale = 10.0 ** math.floor(math.log10(x))
    return float(f"{math.ceil(round(x / scale, 6)) * scale:.1g}")


def measured_bounds(scenario: Scenario, jobs: int = 1) -> dict[str, Any]:
    """The scenario's cross-platform bounds (:data:`NOISE_MARGIN` times the worst emulated difference, rounded up),
    each switch's effect against them; refuses a switch under :data:`MIN_EFFECT_RATIO`."""
    platforms = measure_noise(scenario, jobs=jobs)
    noise = worst(platforms)
    latent_bound = max(round_up(NOISE_MARGIN * noise["latents"]), scenario.atol)
    loss_bound = max(round_up(NOISE_MARGIN * noise["losses"]), scenario.atol) if scenario.config["nursing"] else 0.0
    effects = measure_effects(scenario)
    for switch, effect in effects.items():
        ratios = [effect["latents"] / latent_bound]
        if effect["losses"] is not None and loss_bound:
            ratios.append(effect["losses"] / loss_bound)
        effect["ratio"] = max(ratios)
        logger.info("%s: %s flipped: %s", scenario.name, switch, effect)
        if effect["ratio"] < MIN_EFFECT_RATIO:
            raise SystemExit(
                f"{scenario.name}: flipping {switch} moves the latents by {effect['latents']:.2g} and the losses by "
                f"{effect['losses']}, under {MIN_EFFECT_RATIO:g} times the cross-platform bounds ({latent_bound:g}, "
                f"{loss_bound:g}): the golden test could miss it on another machine. Choose the scenario's settings "
                "so that it shows (noise.py --effects measures), or test the switch's arithmetic instead."
            )
    return {
        "cross_platform_atol": latent_bound,
        "cross_platform_loss_atol": loss_bound,
        "noise": platforms,
        "worst_noise": noise,
        "effects": effects,
    }


def check_margin(scenario: Scenario, margin: float | None, gap: float | None = None) -> None:
    """Refuse a scenario whose masks have a pixel within :data:`MIN_MASK_MARGIN` of the threshold's cut, or whose
    nursing has a blurred argmax within :data:`MIN_ARGMAX_GAP` of a tie."""
    if gap is not None and gap < MIN_ARGMAX_GAP:
        raise SystemExit(
            f"{scenario.name}: a blurred nursing map's two largest values differ by {gap:.2g} relative (seed "
            f"{scenario.seed}), under the {MIN_ARGMAX_GAP:g} the golden test needs: on another CPU its argmax, "
            "L_align's target, may move. Choose another seed for this scenario in SCENARIOS."
        )
    if margin is not None and margin < MIN_MASK_MARGIN:
        raise SystemExit(
            f"{scenario.name}: a mask pixel lies {margin:.2g} from the threshold's cut (seed {scenario.seed}), under "
            f"the {MIN_MASK_MARGIN:g} the golden test needs: on another CPU it may land on the other side. "
            "Choose another seed for this scenario in SCENARIOS (record.py --find-seed NAME finds one)."
        )


#: Our deviations from the authors' code, as changes to the authors' preset: the name in the table, the change.
def deviations() -> list[tuple[str, dict[str, Any]]]:
    rows: list[tuple[str, dict[str, Any]]] = []
    for f in fields(AuthorsBehaviour):
        rows.append((f.name, {"authors": {f.name: False}}))
    defaults = DetailConfig()
    for name in AUTHORS_SETTINGS:
        if name != "prune_branches":  # changes no branch's latent (the last branch is computed alike either way)
            rows.append((name, {name: getattr(defaults, name)}))
    return rows


def config_with(scenario: Scenario, change: dict[str, Any]) -> DetailConfig:
    base = scenario.detail_config()
    switches = change.get("authors")
    others = {k: v for k, v in change.items() if k != "authors"}
    if switches is not None:
        others["authors"] = AuthorsBehaviour(**{**{f.name: True for f in fields(AuthorsBehaviour)}, **switches})
    return base.replace(**others)


def deviation_table(authors_path: Path, steps: int | None = None, size: int | None = None) -> list[dict[str, Any]]:
    """Each deviation of our default switched on alone: its effect on the final latent, per scenario (on its own
    steps and size, or ``steps`` and ``size`` where given)."""
    modules = import_authors(authors_path)
    table: list[dict[str, Any]] = []
    results: dict[str, dict[str, float]] = {}
    for scenario in SCENARIOS:
        scenario = dataclasses.replace(
            scenario, steps=steps or scenario.steps, height=size or scenario.height, width=size or scenario.width
        )
        latents = initial_latent(scenario)
        theirs = authors_run(modules, scenario, latents)
        pipe = tiny(scenario)
        final = theirs.latents[-1]

        def effect(config: DetailConfig, pipe=pipe, scenario=scenario, latents=latents, final=final) -> float:
            ours = run_ours(pipe, scenario, config, latents)
            return float((ours["latents"][-1] - final).abs().max())

        row = {"(latent scale: max abs of the authors' final latent)": float(final.abs().max())}
        row["reference preset"] = effect(scenario.detail_config())
        for name, change in deviations():
            row[name] = effect(config_with(scenario, change))
        default = DetailConfig(**{k: v for k, v in scenario.config.items()})
        row["detailpp default (all of them)"] = effect(default)
        results[scenario.name] = row
    for name in results[SCENARIOS[0].name]:
        table.append({"deviation": name, **{s.name: results[s.name][name] for s in SCENARIOS}})
    return table


def table_markdown(table: list[dict[str, Any]]) -> str:
    names = [s.name for s in SCENARIOS]
    lines = ["| deviation of our default, alone | " + " | ".join(n.replace("_", " ") for n in names) + " |"]
    lines.append("|---|" + "---|" * len(names))
    for row in table:
        lines.append(f"| {row['deviation']} | " + " | ".join(f"{row[n]:.3g}" for n in names) + " |")
    return "\n".join(lines)


DOC_START, DOC_END = "<!-- deviation table: record.py --deviations --update-doc -->", "<!-- end of deviation table -->"


def update_doc(path: Path, markdown: str) -> None:
    """Replace the table between the markers in ``path`` (docs/method.md) with ``markdown``."""
    from detailpp.atomic import atomic_write_text

    text = path.read_text(encoding="utf-8")
    if DOC_START not in text or DOC_END not in text:
        raise SystemExit(f"{path} has no deviation-table markers ({DOC_START} ... {DOC_END}).")
    head, rest = text.split(DOC_START, 1)
    _, tail = rest.split(DOC_END, 1)
    atomic_write_text(path, f"{head}{DOC_START}\n{markdown}\n{DOC_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--authors", type=Path, help="a checkout of clf28/Detail-plus-plus at e73155b")
    parser.add_argument("--report", type=Path, help="print the GPU table of a --gpu results file (no checkout needed)")
    parser.add_argument("--out", type=Path, default=FIXTURE, help="where the fixture goes (default: %(default)s)")
    parser.add_argument("--deviations", action="store_true", help="print the deviation table instead of recording")
    parser.add_argument("--steps", type=int, help="--deviations: denoising steps (default: each scenario's)")
    parser.add_argument("--size", type=int, help="--deviations: image size (default: each scenario's)")
    parser.add_argument("--json", type=Path, help="also write the deviation table or GPU results as JSON here")
    parser.add_argument("--update-doc", type=Path, help="--deviations: write the table into this file's markers")
    parser.add_argument("--jobs", type=int, default=1, help="emulated platforms run at once (default: %(default)s)")
    parser.add_argument("--gpu", action="store_true", help="full-size fp16 parity and timing on the GPU")
    parser.add_argument(
        "--find-seed",
        metavar="SCENARIO",
        help="try initial-latent seeds from --seed-start on our preset until one's mask margin clears the bound",
    )
    parser.add_argument("--seed-start", type=int, default=0, help="--find-seed: the first seed (default: 0)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.report:
        from gpu import markdown

        print(markdown(json.loads(args.report.read_text(encoding="utf-8"))))
        return 0
    if args.find_seed:
        scenario = {s.name: s for s in SCENARIOS}[args.find_seed]
        return 0 if find_seed(scenario, args.seed_start, 1000) is not None else 1
    if args.authors is None:
        parser.error("--authors CHECKOUT is needed (a checkout of clf28/Detail-plus-plus at e73155b)")
    try:
        check_checkout(args.authors)
    except CheckoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    if args.gpu:
        from gpu import gpu_main

        return gpu_main(args)
    if args.deviations:
        table = deviation_table(args.authors, args.steps, args.size)
        markdown = table_markdown(table)
        print(markdown)
        if args.update_doc:
            update_doc(args.update_doc, markdown)
        if args.json:
            args.json.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    else:
        record(args.authors, args.out, args.jobs)
    logger.info("done in %.1f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
