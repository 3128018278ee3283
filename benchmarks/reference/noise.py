"""How much the golden scenarios' results move from one platform to another, emulated on this machine.

The same code rounds differently on another CPU: ATen's vectorised kernels, MKL's GEMMs and oneDNN's convolutions
each pick code by instruction set (and blocking by thread count). One machine can run as others would by capping
what each of them uses, read once at import, so each emulated platform is a fresh process of this script
(``--child``) with its environment (:data:`PLATFORMS`). Each runs our authors' preset on a scenario and its results
are compared with the same run on this machine as it is, on the pinned thread count (:data:`scenarios.THREADS`).

    python benchmarks/reference/noise.py                  # every scenario of the fixture, every platform
    python benchmarks/reference/noise.py --effects        # also: each switch flipped alone, against the noise

``record.py`` calls :func:`measure_noise` when it records and stores the worst difference as each scenario's
cross-platform bound; :func:`measure_effects` gives each switch's effect on the golden comparison, which must stay
ten times above that bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from scenarios import SCENARIOS, THREADS, Scenario, initial_latent, run_ours, tiny  # noqa: E402

from detailpp.config import AuthorsBehaviour  # noqa: E402

logger = logging.getLogger("noise")

#: Other platforms, emulated: (threads, environment). ATen reads ``ATEN_CPU_CAPABILITY``, MKL
#: ``MKL_ENABLE_INSTRUCTIONS``, oneDNN ``ONEDNN_MAX_CPU_ISA``; each caps the instruction set, never raises it.
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
PLATFORMS: dict[str, tuple[int, dict[str, str]]] = {
    "2 threads": (2, {}),
    "ATen avx2": (THREADS, {"ATEN_CPU_CAPABILITY": "avx2"}),
    "ATen default": (THREADS, {"ATEN_CPU_CAPABILITY": "default"}),
    "AVX2 CPU": (THREADS, AVX2),
    "AVX2 CPU, 2 threads": (2, AVX2),
    "SSE4.2 CPU": (
        THREADS,
        {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    ),
}
CAPS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def flipped(scenario: Scenario, switch: str | None) -> Any:
    """The scenario's preset, with one :class:`AuthorsBehaviour` switch off (``None``: the preset itself)."""
    config = scenario.detail_config()
    if switch is None:
        return config
    return config.replace(authors=AuthorsBehaviour(**{**config.authors.__dict__, switch: False}))


def run(scenario: Scenario, switch: str | None = None, threads: int = THREADS) -> dict[str, Any]:
    """Our preset (or one switch flipped) on the scenario, on ``threads`` threads, in this process."""
    return run_ours(tiny(scenario), scenario, flipped(scenario, switch), initial_latent(scenario), threads=threads)


def difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """What the golden test compares: max abs of the final latents, masks equal, max abs of the nursing losses."""
    losses = None
    if a["losses"] or b["losses"]:
        if len(a["losses"]) == len(b["losses"]):
            losses = max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True))
        else:
            losses = float("inf")
    same_masks = len(a["masks"]) == len(b["masks"]) and all(
        torch.equal(x.bool(), y.bool()) for x, y in zip(a["masks"], b["masks"], strict=True)
    )
    return {"latents": float((a["latents"] - b["latents"]).abs().max()), "masks_equal": same_masks, "losses": losses}


def save(result: dict[str, Any], path: Path) -> None:
    torch.save({k: result[k] for k in ("latents", "masks", "losses", "margin", "gap")}, path)


def child(scenario: Scenario, threads: int, out: Path) -> None:
    save(run(scenario, threads=threads), out)


def run_elsewhere(scenario: Scenario, platform: str | None, out: Path) -> dict[str, Any]:
    """The preset on the scenario in a fresh process as ``platform`` (:data:`PLATFORMS`; ``None``: this machine)."""
    threads, caps = PLATFORMS[platform] if platform else (THREADS, {})
    env = {k: v for k, v in os.environ.items() if k not in CAPS}
    env.update(caps)
    spec = json.dumps(scenario.to_metadata())
    command = [sys.executable, str(Path(__file__)), "--child", spec, "--threads", str(threads), "--out", str(out)]
    subprocess.run(command, env=env, check=True)
    return torch.load(out)


def measure_noise(scenario: Scenario, platforms: list[str] | None = None, jobs: int = 1) -> dict[str, dict]:
    """Each emulated platform's difference from this machine (pinned threads) on the scenario's preset run."""
    platforms = list(PLATFORMS) if platforms is None else platforms
    with tempfile.TemporaryDirectory() as tmp:
        names = [None, *platforms]
        outs = [Path(tmp) / f"{i}.pt" for i in range(len(names))]
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            results = list(pool.map(lambda a: run_elsewhere(scenario, *a), zip(names, outs, strict=True)))
    here = results[0]
    return {name: difference(r, here) for name, r in zip(platforms, results[1:], strict=True)}


def worst(noise: dict[str, dict]) -> dict[str, float]:
    """The largest latent and loss differences over the platforms (raises if any mask differs)."""
    moved = [name for name, d in noise.items() if not d["masks_equal"]]
    if moved:
        raise SystemExit(f"masks differ on {', '.join(moved)}: a mask pixel lies within the platforms' noise")
    return {
        "latents": max(d["latents"] for d in noise.values()),
        "losses": max((d["losses"] or 0.0) for d in noise.values()),
    }


def measure_effects(scenario: Scenario, switches: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Each switch flipped alone, against the preset on this machine: what the golden comparison would see."""
    switches = scenario.switches if switches is None else switches
    here = run(scenario)
    logger.info("%s: mask margin %s, argmax gap %s", scenario.name, here["margin"], here["gap"])
    return {switch: difference(run(scenario, switch), here) for switch in switches}


def parse_changes(changes: list[str]) -> dict[str, Any]:
    """``key=json`` pairs (``config.KEY=json`` for a DetailConfig field)."""
    out: dict[str, Any] = {}
    for change in changes:
        key, _, value = change.partition("=")
        out[key] = json.loads(value)
    return out


def changed(scenario: Scenario, changes: dict[str, Any]) -> Scenario:
    config = dict(scenario.config)
    fields = {}
    for key, value in changes.items():
        if key.startswith("config."):
            config[key.removeprefix("config.")] = value
        else:
            fields[key] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(scenario, config=config, **fields)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", help="only these scenarios (default: every one)")
    parser.add_argument("--set", action="append", default=[], help="KEY=JSON: change the scenarios (config.FIELD=...)")
    parser.add_argument("--platform", action="append", help="only these platforms (default: every one)")
    parser.add_argument("--effects", action="store_true", help="also measure each switch flipped alone")
    parser.add_argument("--switch", action="append", help="--effects: only these switches")
    parser.add_argument("--jobs", type=int, default=1, help="platforms run at once (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=THREADS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.child:
        spec = json.loads(args.child)
        spec["sub_prompts"], spec["subjects"] = tuple(spec["sub_prompts"]), tuple(spec["subjects"])
        spec["switches"] = tuple(spec["switches"])
        child(Scenario(**spec), args.threads, args.out)
        return 0
    results: dict[str, Any] = {}
    for scenario in SCENARIOS:
        if args.scenario and scenario.name not in args.scenario:
            continue
        scenario = changed(scenario, parse_changes(args.set))
        noise = measure_noise(scenario, args.platform, args.jobs)
        bound = worst(noise)
        results[scenario.name] = {"scenario": scenario.to_metadata(), "noise": noise, "worst": bound}
        for name, d in noise.items():
            print(f"{scenario.name} {name}: latents {d['latents']:.3g}, losses {d['losses']}, {d['masks_equal']=}")
        print(f"{scenario.name} worst: {bound}")
        if args.effects:
            effects = measure_effects(scenario, tuple(args.switch) if args.switch else None)
            results[scenario.name]["effects"] = effects
            for switch, d in effects.items():
                ratio = d["latents"] / bound["latents"] if bound["latents"] else float("inf")
                print(f"{scenario.name} {switch}: {d} ({ratio:.3g}x the worst noise)")
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
