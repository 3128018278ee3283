"""``detailpp bench report``: the paper's Table 1 (methods x metrics) as Markdown and CSV, a bar chart, a gallery.

Each benchmark folder contributes the scores of its method (``run.json``'s label) on its suite, for every metric
scored there. Columns follow the paper: BLIP-VQA colour / texture / shape, ImageReward colour / texture / shape, SCB
(other suites and metrics follow). A cell is the mean over the images scored; a ``*`` marks a cell with fewer images
than the suite has (``--images-per-prompt`` x prompts), so a partial run is never mistaken for a full one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from detailpp.atomic import atomic_write_bytes, atomic_write_text
from detailpp.bench import BenchError
from detailpp.bench.manifest import RUN_FILE, load_json
from detailpp.bench.metrics import DECIMALS, LABELS, METRIC_NAMES
from detailpp.bench.runs import current_metric_configs, load_manifest, load_scores
from detailpp.bench.suites import SUITE_NAMES

logger = logging.getLogger(__name__)

SUITE_LABELS = {"t2i-color": "colour", "t2i-texture": "texture", "t2i-shape": "shape", "scb": ""}
#: The paper's Table 1 (SDXL base, 50 steps), shown with ``--paper``.
PAPER_TABLE1: dict[str, dict[tuple[str, str], float]] = {
    "SDXL (paper)": {
        ("blip-vqa", "t2i-color"): 0.6369,
        ("blip-vqa", "t2i-texture"): 0.5637,
        ("blip-vqa", "t2i-shape"): 0.5408,
        ("image-reward", "t2i-color"): 0.733,
        ("image-reward", "t2i-texture"): 0.124,
        ("image-reward", "t2i-shape"): 1.184,
        ("scb", "scb"): 0.2488,
    },
    "ToMe (paper)": {
        ("blip-vqa", "t2i-color"): 0.6583,
        ("blip-vqa", "t2i-texture"): 0.6371,
        ("blip-vqa", "t2i-shape"): 0.5517,
        ("image-reward", "t2i-color"): -0.028,
        ("image-reward", "t2i-texture"): -0.851,
        ("image-reward", "t2i-shape"): 0.454,
        ("scb", "scb"): 0.2554,
    },
    "Detail++ (paper)": {
        ("blip-vqa", "t2i-color"): 0.7389,
        ("blip-vqa", "t2i-texture"): 0.7241,
        ("blip-vqa", "t2i-shape"): 0.5582,
        ("image-reward", "t2i-color"): 1.773,
        ("image-reward", "t2i-texture"): 0.300,
        ("image-reward", "t2i-shape"): 1.424,
        ("scb", "scb"): 0.2687,
    },
}


@dataclass
class Cell:
    mean: float | None
    n: int
    expected: int | None = None

    @property
    def partial(self) -> bool:
        return self.expected is not None and self.n < self.expected


@dataclass
class RunScores:
    """The scores of one benchmark folder."""

    folder: Path
    label: str
    suite: str
    expected: int
    #: metric -> list of (record, score) for the images scored.
    scores: dict[str, list[tuple[dict, float]]] = field(default_factory=dict)
    #: the generation model (run.json's ``model``) and method.
    model: str = "?"
    method: str = "?"
    #: metric -> the scorer that computed it (its models, from ``scores/<metric>.config.json``).
    scorers: dict[str, str] = field(default_factory=dict)


def scorer_name(metric: str, config: dict) -> str:
    """The models a metric's scores were computed with, from its recorded settings."""
    if "model" in config:
        return str(config["model"])
    models = [str(config[k]) for k in ("clip_model", "detector") if k in config]
    return " + ".join(models) or metric


def collect(folders: list[str | Path]) -> list[RunScores]:
    runs = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise BenchError(f"{folder} is not a folder; give the --out folders of `detailpp bench generate`.")
        run = load_json(folder / RUN_FILE, "the run's settings")
        records = {r["item"]: r for r in load_manifest(folder)}
        entry = RunScores(
            folder,
            run.get("label") or run.get("method", folder.name),
            run.get("suite", "?"),
            int(run.get("num_prompts", 0)) * int(run.get("images_per_prompt", 0)),
            model=str(run.get("model", "?")),
            method=str(run.get("method", "?")),
        )
        for metric, config in current_metric_configs(folder).items():
            entry.scorers[metric] = scorer_name(metric, config)
            scored = load_scores(folder, metric)
            pairs = [
                (records[i], s["score"])
                for i, s in sorted(scored.items())
                if i in records and s.get("sha256") == records[i]["sha256"] and s.get("score") is not None
            ]
            if pairs:
                entry.scores[metric] = pairs
        if not entry.scores:
            logger.warning("%s has no scores yet (run `detailpp bench score %s`).", folder, folder)
        runs.append(entry)
    return runs


def _column_key(col: tuple[str, str]) -> tuple:
    metric, suite = col
    m = METRIC_NAMES.index(metric) if metric in METRIC_NAMES else len(METRIC_NAMES)
    s = SUITE_NAMES.index(suite) if suite in SUITE_NAMES else len(SUITE_NAMES)
    return (m, s, metric, suite)


def column_label(col: tuple[str, str]) -> str:
    metric, suite = col
    name = {"image-reward": "IR"}.get(metric, LABELS.get(metric, metric))
    suffix = SUITE_LABELS.get(suite, suite)
    if metric == "scb" and suite == "scb":
        return "SCB"
    return f"{name} {suffix}".strip()


def build_table(runs: list[RunScores], paper: bool = False):
    """``(columns, rows)``: columns are (metric, suite) pairs; rows map a label to its cells."""
    rows: dict[str, dict[tuple[str, str], Cell]] = defaultdict(dict)
    for run in runs:
        for metric, pairs in run.scores.items():
            col = (metric, run.suite)
            if col in rows[run.label]:
                raise BenchError(
                    f"Two folders give {run.label!r} scores for {column_label(col)} ({run.folder} and another); "
                    "give each method's folder once, or generate with distinct --label values."
                )
            values = [s for _, s in pairs]
            rows[run.label][col] = Cell(sum(values) / len(values) if values else None, len(values), run.expected)
    columns = sorted({c for cells in rows.values() for c in cells}, key=_column_key)
    if paper:
        for label, cells in PAPER_TABLE1.items():
            rows[label] = {c: Cell(v, 0) for c, v in cells.items()}
        columns = sorted(set(columns) | {c for cells in PAPER_TABLE1.values() for c in cells}, key=_column_key)
    return columns, dict(rows)


def _fmt(cell: Cell | None, metric: str) -> str:
    if cell is None or cell.mean is None:
        return "—"
    text = f"{cell.mean:.{DECIMALS.get(metric, 4)}f}"
    return text + ("*" if cell.partial else "")


def render_markdown(columns, rows) -> str:
    head = "| method | " + " | ".join(column_label(c) for c in columns) + " |"
    sep = "|---|" + "---:|" * len(columns)
    lines = [head, sep]
    for label, cells in rows.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(cells.get(c), c[0]) for c in columns) + " |")
    notes = []
    for label, cells in rows.items():
        for c, cell in cells.items():
            if cell.partial:
                notes.append(f"{label}, {column_label(c)}: {cell.n} of {cell.expected} images")
    out = "\n".join(lines) + "\n"
    if notes:
        out += "\n\\* partial: " + "; ".join(notes) + ".\n"
    return out


def render_runs(runs: list[RunScores]) -> str:
    """Where each row's numbers come from: every folder's generation model and the scorer of each metric."""
    lines = ["", "Runs (the generation model; the scorer of each metric):", ""]
    for run in runs:
        scorers = ", ".join(f"{LABELS.get(m, m)} by `{name}`" for m, name in sorted(run.scorers.items()))
        lines.append(
            f"- {run.label}, {run.suite} ({run.folder}): {run.method} on `{run.model}`; {scorers or 'no scores yet'}"
        )
    return "\n".join(lines) + "\n"


def render_csv(columns, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", *(column_label(c) for c in columns), *(f"n {column_label(c)}" for c in columns)])
    for label, cells in rows.items():
        means = ["" if cells.get(c) is None or cells[c].mean is None else f"{cells[c].mean:.6f}" for c in columns]
        counts = ["" if cells.get(c) is None else str(cells[c].n) for c in columns]
        w.writerow([label, *means, *counts])
    return buf.getvalue()


def bar_chart(columns, rows, path: Path) -> None:
    """One panel per metric, one group of bars per suite, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({c[0] for c in columns}, key=lambda m: METRIC_NAMES.index(m) if m in METRIC_NAMES else 99)
    labels = list(rows)
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4.5 * max(1, len(metrics)), 3.8), squeeze=False)
    width = 0.8 / max(1, len(labels))
    for ax, metric in zip(axes[0], metrics, strict=False):
        cols = [c for c in columns if c[0] == metric]
        for k, label in enumerate(labels):
            values = [
                rows[label].get(c).mean if rows[label].get(c) and rows[label][c].mean is not None else 0.0
                for c in cols
            ]
            ax.bar([i + k * width for i in range(len(cols))], values, width, label=label)
        ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(cols))])
        ax.set_xticklabels([SUITE_LABELS.get(c[1], c[1]) or c[1] for c in cols])
        ax.set_title(LABELS.get(metric, metric))
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def worst_prompts(pairs: list[tuple[dict, float]], count: int) -> list[tuple[str, float, list[tuple[dict, float]]]]:
    """The ``count`` prompts with the lowest mean score: ``(prompt, mean, [(record, score), ...] lowest first)``."""
    by_prompt: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    for record, score in pairs:
        by_prompt[record["prompt"]].append((record, score))
    ranked = sorted(by_prompt.items(), key=lambda kv: (sum(s for _, s in kv[1]) / len(kv[1]), kv[0]))
    return [(p, sum(s for _, s in v) / len(v), sorted(v, key=lambda rs: rs[1])) for p, v in ranked[:count]]


def gallery(run: RunScores, metric: str, path: Path, count: int = 8, per_prompt: int = 4) -> list[dict]:
    """A PNG sheet of the worst-scored prompts of one run and metric; returns what it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    worst = worst_prompts(run.scores.get(metric, []), count)
    if not worst:
        return []
    cols = min(per_prompt, max(len(v) for _, _, v in worst))
    fig, axes = plt.subplots(len(worst), cols, figsize=(2.2 * cols, 2.5 * len(worst)), squeeze=False)
    shown = []
    dec = DECIMALS.get(metric, 4)
    for row, (prompt, mean, images) in enumerate(worst):
        for col in range(cols):
            ax = axes[row][col]
            ax.axis("off")
            if col >= len(images):
                continue
            record, score = images[col]
            with Image.open(run.folder / record["file"]) as im:
                im.thumbnail((256, 256))
                ax.imshow(im.convert("RGB"))
            # two-line titles: the prompt (first column, running over the empty first lines of the others), the seed
            first = f"{mean:.{dec}f}  {prompt}"[: 36 * cols] if col == 0 else ""
            ax.set_title(f"{first}\nseed {record['seed']}: {score:.{dec}f}", fontsize=7, loc="left")
        shown.append(
            {
                "prompt": prompt,
                "mean": mean,
                "images": [{"file": r["file"], "seed": r["seed"], "score": s} for r, s in images],
            }
        )
    fig.suptitle(f"{run.label} — {column_label((metric, run.suite))}: worst {len(worst)} prompts", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return shown


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in text.replace("+", "p")).strip("-") or "run"


def write_report(
    folders: list[str | Path], out: str | Path, paper: bool = False, worst: int = 8, per_prompt: int = 4
) -> dict[str, Path]:
    """Write ``table1.md``, ``table1.csv``, ``table1.png``, ``gallery/*.png`` and ``report.json`` into ``out``."""
    out = Path(out)
    runs = collect(folders)
    columns, rows = build_table(runs, paper)
    if not columns:
        raise BenchError("None of the folders has scores; run `detailpp bench score DIR` first.")
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / "table1.md",
        "csv": out / "table1.csv",
        "chart": out / "table1.png",
        "json": out / "report.json",
    }
    md = render_markdown(columns, rows) + render_runs(runs)
    atomic_write_text(paths["markdown"], md)
    atomic_write_text(paths["csv"], render_csv(columns, rows))
    bar_chart(columns, rows, paths["chart"])
    galleries = []
    for run in runs:
        for metric in run.scores:
            path = out / "gallery" / f"{_slug(run.label)}_{metric}_{_slug(run.suite)}.png"
            shown = gallery(run, metric, path, worst, per_prompt)
            if shown:
                galleries.append(
                    {
                        "label": run.label,
                        "suite": run.suite,
                        "metric": metric,
                        "png": str(path),
                        "folder": str(run.folder),
                        "worst": shown,
                    }
                )
    gallery_md = ["# Worst-scored prompts", ""]
    for g in galleries:
        gallery_md += [
            f"## {g['label']} — {column_label((g['metric'], g['suite']))}",
            "",
            f"![worst prompts]({Path(g['png']).relative_to(out).as_posix()})",
            "",
        ]
        gallery_md += [f"- {w['mean']:.4f} — {w['prompt']}" for w in g["worst"]] + [""]
    paths["gallery"] = out / "gallery.md"
    atomic_write_text(paths["gallery"], "\n".join(gallery_md))
    report = {
        "columns": [column_label(c) for c in columns],
        "rows": {
            label: {
                column_label(c): {"mean": cell.mean, "n": cell.n, "expected": cell.expected}
                for c, cell in cells.items()
            }
            for label, cells in rows.items()
        },
        "galleries": galleries,
        "runs": [
            {"folder": str(r.folder), "label": r.label, "suite": r.suite, "method": r.method, "model": r.model}
            | {"scorers": r.scorers}
            for r in runs
        ],
    }
    atomic_write_text(paths["json"], json.dumps(report, indent=1) + "\n")
    logger.info("Table 1:\n%s", md)
    return paths
