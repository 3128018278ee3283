"""Record what the authors' Detail++ computes, measure each of our deviations, and time both pipelines.

Give it a checkout of the authors' repository (``clf28/Detail-plus-plus`` at e73155b; never committed here)::

    git clone https://github.com/clf28/Detail-plus-plus /tmp/authors && git -C /tmp/authors checkout e73155b
    pip install opencv-python-headless einops        # what their code imports

    python benchmarks/reference/record.py --authors /tmp/authors                 # rewrite the golden fixture
    python benchmarks/reference/record.py --authors /tmp/authors --deviations    # the deviation table
    python benchmarks/reference/record.py --authors /tmp/authors --gpu           # full size, fp16, timings

Recording runs their ``ProT2IPipeline`` (:mod:`authors`) on detailpp's tiny random SDXL components
(:func:`detailpp.models.tiny.tiny_components`, CPU, fp32) for each scenario of :data:`SCENARIOS` and writes, into
``tests/fixtures/authors_reference.safetensors``: every branch's final latent, the per-step binary subject masks and
the nursing losses, with the commit and every setting in the file's metadata. ``tests/method/test_reference_parity.py``
rebuilds the same inputs from that metadata and checks that ``DetailConfig.authors_preset()`` reproduces them; it
never reads the authors' code. Each recording is also checked against the preset here before it is written.

Float results of the same code differ between CPUs, so the metadata also holds the recording machine's platform
fingerprint (:mod:`fingerprint`; the golden test asks bit-for-bit equality only where it is reproduced) and each
scenario's mask margin (:func:`mask_margins`): a scenario whose masks have a pixel within :data:`MIN_MASK_MARGIN` of
the threshold is refused (``--find-seed NAME`` finds a seed that clears it), so that no mask pixel flips between
machines.

``--deviations`` starts from the preset and switches each of detailpp's deviations back to our default alone,
printing the max abs difference of the final latent from the authors' (the table in ``docs/method.md``).

``--gpu`` builds full-size SDXL with random weights (:mod:`detailpp.models.full_size`) on the GPU, fp16, 1024x1024,
and in one process on one card: compares the preset's final latent with the authors', and times plain SDXL, our
default, our preset and the authors' pipeline at 20 and 50 steps, nursing off and on, with peak memory
(``--rows`` picks rows; the table in BENCHMARKS.md). The authors' pipeline leaves its processors on every layer, so
each row starts from the UNet's original processors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from authors import COMMIT, CheckoutError, check_checkout, import_authors, run_authors  # noqa: E402
from fingerprint import platform_fingerprint  # noqa: E402

from detailpp.config import AUTHORS_SETTINGS, AuthorsBehaviour, DetailConfig  # noqa: E402

logger = logging.getLogger("record")

FIXTURE = HERE.parents[1] / "tests" / "fixtures" / "authors_reference.safetensors"

#: The sub-prompts of the authors' style example, each ending in "." (their code strips it; we keep it by default).
SUB_PROMPTS = (
    "A sketch-style robot is leaning a oil-painting style tree.",
    "A robot is leaning a tree.",
    "A sketch-style robot is leaning a tree.",
    "A robot is leaning a oil-painting style tree.",
)
SUBJECTS = ("robot", "tree")


@dataclass(frozen=True)
class Scenario:
    """One recorded run: the call's settings and the DetailConfig fields on top of the reference preset."""

    name: str
    config: dict[str, Any]
    steps: int = 16
    height: int = 256
    width: int = 256
    guidance_scale: float = 7.5
    seed: int = 0
    component_seed: int = 0
    sub_prompts: tuple[str, ...] = SUB_PROMPTS
    subjects: tuple[str, ...] = SUBJECTS
    #: the golden test's bound on the max abs difference of any branch's final latent, on a machine whose
    #: :func:`~fingerprint.platform_fingerprint` is the recording machine's (0: bit for bit) ...
    atol: float = 0.0
    #: ... and on a machine that rounds otherwise (another CPU, instruction set or thread count)
    cross_platform_atol: float = 2e-4
    extra: dict[str, Any] = field(default_factory=dict)

    def detail_config(self) -> DetailConfig:
        return DetailConfig.authors_preset(**self.config)

    def plan(self) -> dict[str, Any]:
        p = self.sub_prompts
        branches = [{"prompt": q, "subject": s} for q, s in zip(p[2:], self.subjects, strict=True)]
        return {"prompt": p[0], "base": p[1], "branches": branches}

    def to_metadata(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: 256x256 (masks on 32x32 latents, nursing on an 8x8 grid: enough pixels near tau, and blurred maps whose argmax the
#: kernel can move, for every switch to show), 16 steps (int(0.8 T) = 12 != round(0.8 T) = 13).
SCENARIOS = (
    Scenario("nursing_off", {"nursing": False}, seed=74),
    Scenario(
        "nursing_on",
        {"nursing": True, "centroid_alignment": True, "nursing_step_size": 17.5},
        seed=30,
        atol=1e-4,
        cross_platform_atol=1e-3,
    ),
)


def initial_latent(scenario: Scenario, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """The one initial latent every branch starts from (the UNet's 4 channels at the latent size)."""
    generator = torch.Generator("cpu").manual_seed(scenario.seed)
    shape = (1, 4, scenario.height // 8, scenario.width // 8)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


#: The smallest mask margin a recorded scenario may have (in units of the normalised map, whose range is [0, 1]):
#: far above the CPU-to-CPU float noise of the maps (see :func:`mask_margins`), so that no mask pixel flips on
#: another machine and the golden test can require identical masks everywhere.
MIN_MASK_MARGIN = 2e-5


#: The smallest relative gap a recorded nursing scenario may have between the two largest values of a blurred
#: nursing map (whose argmax is L_align's target): the seed first chosen for nursing on had one of 1.0e-4, and its
#: argmax moved under ``ATEN_CPU_CAPABILITY=avx2`` (a nursing loss by 0.1, the latents by 1.7e-3).
MIN_ARGMAX_GAP = 1e-3


@contextlib.contextmanager
def argmax_gaps() -> Iterator[list[float]]:
    """Record, for each blurred nursing map, ``(top1 - top2) / top1``: its argmax is a near tie below float noise.

    Wraps :func:`detailpp.method.nursing.gaussian_blur` (called only for
    :func:`~detailpp.method.nursing.centroid_alignment_loss`'s target) for the duration of the block.
    """
    from detailpp.method import nursing

    gaps: list[float] = []
    original = nursing.gaussian_blur

    def measured(maps: torch.Tensor, kernel_size: int, sigma: float, opencv: bool = False) -> torch.Tensor:
        blurred = original(maps, kernel_size, sigma, opencv=opencv)
        top = blurred.flatten(1).topk(2, dim=1).values
        gaps.append(float(((top[:, 0] - top[:, 1]) / top[:, 0].abs()).min()))
        return blurred

    nursing.gaussian_blur = measured
    try:
        yield gaps
    finally:
        nursing.gaussian_blur = original


class MarginTooSmall(Exception):
    """A step's mask margin fell below the bound :func:`mask_margins` was given (the run is abandoned)."""


@contextlib.contextmanager
def mask_margins(stop_below: float | None = None) -> Iterator[list[float]]:
    """Record, for each step's masks of our pipeline, the smallest distance of any pixel from the threshold's cut.

    The cut is eq. 3's ``tau``, or with ``relative_mask_threshold`` (the authors' rule, the preset's)
    ``min + (max - min) * tau`` of each normalised map. A pixel whose distance is below the float noise of the maps
    may land on either side on another CPU; the scenario's margin is the minimum over every step and pixel. Wraps
    :func:`detailpp.method.masks.binary_masks` where the engine calls it, for the duration of the block; with
    ``stop_below``, raises :class:`MarginTooSmall` at the first step whose margin is below it.

    CPU-to-CPU noise of the normalised maps, measured on the recording machine (AMD EPYC, AVX-512, MKL; torch 2.13,
    both scenarios, every step): 1 thread against 2, and ``ATEN_CPU_CAPABILITY=avx2`` or ``default`` against the
    AVX-512 default, move the maps by at most 6.2e-6 (the final latents by up to 6e-5 nursing off, 3.8e-4 nursing
    on, with every mask equal). :data:`MIN_MASK_MARGIN` is about three times that.
    """
    from detailpp.method import engine

    margins: list[float] = []
    original = engine.binary_masks

    def measured(normalized: torch.Tensor, tau: float, relative: bool = False) -> torch.Tensor:
        cut = torch.full_like(normalized[..., :1, :1], tau)
        if relative:
            lo = normalized.amin(dim=(-2, -1), keepdim=True)
            hi = normalized.amax(dim=(-2, -1), keepdim=True)
            cut = lo + (hi - lo) * tau
        margins.append(float((normalized - cut).abs().min()))
        if stop_below is not None and margins[-1] < stop_below:
            raise MarginTooSmall(margins[-1])
        return original(normalized, tau, relative=relative)

    engine.binary_masks = measured
    try:
        yield margins
    finally:
        engine.binary_masks = original


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


def run_ours(
    pipe: Any, scenario: Scenario, config: DetailConfig, latents: torch.Tensor, stop_below: float | None = None
) -> dict[str, Any]:
    """Our pipeline on the scenario: every branch's final latent, the per-step masks, the nursing losses, and the
    masks' margin (:func:`mask_margins`; ``None`` without masks)."""
    masks: list[torch.Tensor] = []

    def keep_masks(pipeline, step, timestep, tensors):
        if tensors.get("masks") is not None:
            masks.append(tensors["masks"].detach().cpu())
        return {}

    with mask_margins(stop_below) as margins, argmax_gaps() as gaps:
        out = pipe(
            plan=scenario.plan(),
            height=scenario.height,
            width=scenario.width,
            num_inference_steps=scenario.steps,
            guidance_scale=scenario.guidance_scale,
            latents=latents,
            detail_config=config,
            output_type="latent",
            return_branch_images=True,
            callback_on_step_end=keep_masks,
            callback_on_step_end_tensor_inputs=["masks"],
        )
    if len(margins) != len(masks):
        raise RuntimeError(f"measured the margin of {len(margins)} steps' masks, the pipeline made {len(masks)}")
    losses = [x for record in out.nursing for x in record.losses]
    margin = min(margins) if margins else None
    gap = min(gaps) if gaps else None
    return {"latents": out.branch_images.float().cpu(), "masks": masks, "losses": losses, "margin": margin, "gap": gap}


def authors_kwargs(scenario: Scenario) -> dict[str, Any]:
    """Their pipeline's settings for the scenario, read off the preset's config."""
    c = scenario.detail_config()
    return {
        "steps": scenario.steps,
        "height": scenario.height,
        "width": scenario.width,
        "guidance_scale": scenario.guidance_scale,
        "share_steps": c.share_steps,
        "mask_threshold": c.mask_threshold,
        "nursing": c.nursing,
        "centroid_alignment": c.centroid_alignment,
        "step_size": c.nursing_step_size,
        "thresholds": c.nursing_thresholds[: c.nursing_steps],
        "max_iterations": (c.nursing_max_iterations_early, c.nursing_max_iterations_late),
    }


def tiny(scenario: Scenario, pipeline_class: Any = None) -> Any:
    from detailpp.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(scenario.component_seed, pipeline_class=pipeline_class)


def authors_run(modules: Any, scenario: Scenario, latents: torch.Tensor) -> Any:
    """Their pipeline on the scenario, on fresh tiny components (so their processors never reach ours)."""
    components = tiny(scenario).components
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


def record(authors_path: Path, out: Path) -> None:
    """Run both pipelines on every scenario, check the preset against theirs, write the fixture."""
    from safetensors.torch import save

    from detailpp.atomic import atomic_write_bytes

    modules = import_authors(authors_path)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {"repository": "clf28/Detail-plus-plus", "commit": COMMIT}
    fingerprints = {platform_fingerprint(tiny(scenario)) for scenario in SCENARIOS}
    if len(fingerprints) != 1:
        raise SystemExit("the scenarios' tiny components differ (component_seed): one platform fingerprint each")
    meta["fingerprint"] = fingerprints.pop()
    meta["threads"] = str(torch.get_num_threads())
    scenarios = []
    for scenario in SCENARIOS:
        latents = initial_latent(scenario)
        theirs = authors_run(modules, scenario, latents)
        ours = run_ours(tiny(scenario), scenario, scenario.detail_config(), latents)
        result = compare(ours, theirs)
        logger.info("%s: %s, mask margin %s", scenario.name, result, ours["margin"])
        if result["max_abs"] > scenario.atol or not result["masks_equal"]:
            raise SystemExit(f"{scenario.name}: the reference preset does not reproduce the authors' run: {result}")
        check_margin(scenario, ours["margin"], ours["gap"])
        tensors[f"{scenario.name}.initial_latent"] = latents.contiguous()
        tensors[f"{scenario.name}.latents"] = theirs.latents.contiguous()
        if theirs.masks:
            tensors[f"{scenario.name}.masks"] = torch.stack(theirs.masks).to(torch.uint8).contiguous()
        if theirs.losses:
            tensors[f"{scenario.name}.losses"] = torch.tensor(theirs.losses, dtype=torch.float64)
        scenarios.append(
            {
                **scenario.to_metadata(),
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


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


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


def deviation_table(authors_path: Path, steps: int, size: int) -> list[dict[str, Any]]:
    """Each deviation of our default switched on alone: its effect on the final latent, per scenario."""
    modules = import_authors(authors_path)
    table: list[dict[str, Any]] = []
    results: dict[str, dict[str, float]] = {}
    for scenario in SCENARIOS:
        scenario = dataclasses.replace(scenario, steps=steps, height=size, width=size)
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
    parser.add_argument("--steps", type=int, default=16, help="--deviations: denoising steps (default: %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="--deviations: image size (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the deviation table or GPU results as JSON here")
    parser.add_argument("--update-doc", type=Path, help="--deviations: write the table into this file's markers")
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
    torch.set_num_threads(max(1, torch.get_num_threads()))
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
        record(args.authors, args.out)
    logger.info("done in %.1f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
