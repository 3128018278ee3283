"""Precomputed decomposition plans: made once where spaCy is installed, used by ``bench generate --plans``.

A plans file is JSON Lines, one :class:`~detailpp.DecompositionPlan` a line, as ``detailpp bench plans`` and
``detailpp decompose --file`` write it; a JSON array of plans or a JSON object mapping each prompt to its plan is read
too. With ``--plans`` the generation machine needs no spaCy; the plans a run used are kept in its folder
(``plans.jsonl``), and a resumed run must use the same plan for every prompt it shares with them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from detailpp.atomic import atomic_write_text
from detailpp.bench import BenchError
from detailpp.plan import DecompositionPlan, PlanError

logger = logging.getLogger(__name__)

#: the plans a run used, in its folder.
RUN_PLANS_FILE = "plans.jsonl"


def _parse(text: str, where: str) -> list[dict]:
    """The plan objects of a plans file's text (JSON Lines, a JSON array, or a JSON object prompt -> plan)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        records = []
        for n, line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BenchError(f"{where}, line {n}: not JSON ({e.msg}); a plans file holds one plan a line.") from e
        return records
    if isinstance(data, list):
        return data
    if isinstance(data, Mapping):
        if "prompt" in data and "base" in data:
            return [data]  # a single plan
        records = []
        for prompt, plan in data.items():
            if not isinstance(plan, Mapping) or plan.get("prompt", prompt) != prompt:
                raise BenchError(f"{where}: the entry {prompt!r} is not the plan of that prompt.")
            records.append({"prompt": prompt, **plan})
        return records
    raise BenchError(f"{where}: expected plans (JSON Lines, a JSON array or an object), got {type(data).__name__}.")


def read_plans(path: str | Path) -> dict[str, DecompositionPlan]:
    """The plans of a file by prompt; a prompt given two different plans is an error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise BenchError(f"Cannot read the plans file {str(path)!r}: {e.strerror or e}.") from e
    plans: dict[str, DecompositionPlan] = {}
    for n, record in enumerate(_parse(text, str(path)), start=1):
        try:
            plan = DecompositionPlan.from_dict(record)
        except (PlanError, TypeError) as e:
            raise BenchError(f"{path}: plan {n}: {e}") from e
        if plan.prompt in plans and plans[plan.prompt] != plan:
            raise BenchError(f"{path}: two different plans for the prompt {plan.prompt!r}.")
        plans[plan.prompt] = plan
    return plans


def plans_for(prompts: Sequence[str], plans: Mapping[str, DecompositionPlan], source: str) -> dict:
    """The plans of ``prompts`` (in their order); every prompt must have one."""
    missing = [p for p in prompts if p not in plans]
    if missing:
        raise BenchError(
            f"{source} has no plan for {len(missing)} of the {len(prompts)} prompt(s) (first: {missing[0]!r}). "
            "Write them where spaCy is installed: detailpp bench plans --suite ... --out PLANS.jsonl "
            "(with the same --suite/--prompt-file and --max-prompts)."
        )
    return {p: plans[p] for p in prompts}


def write_plans(path: str | Path, plans: Iterable[DecompositionPlan]) -> None:
    """Write ``plans`` as JSON Lines, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(plan.to_json(ensure_ascii=False) + "\n" for plan in plans))


def record_run_plans(out: Path, plans: Mapping[str, DecompositionPlan], write: bool = True) -> None:
    """Check ``plans`` against the ones the run folder ``out`` already used, then (``write``) add the new ones."""
    path = out / RUN_PLANS_FILE
    before = read_plans(path) if path.exists() else {}
    changed = [p for p, plan in plans.items() if p in before and before[p] != plan]
    if changed:
        raise BenchError(
            f"{out} was generated with other plans for {len(changed)} prompt(s) (first: {changed[0]!r}; see {path}). "
            "Use another --output-dir folder, or the plans recorded there."
        )
    new = {p: plan for p, plan in plans.items() if p not in before}
    if write and new:
        write_plans(path, [*before.values(), *new.values()])
