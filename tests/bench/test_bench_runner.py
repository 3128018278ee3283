"""Sharded, resumable generation and scoring with a fake generator: same images and manifest whatever the split."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from detailpp.bench import BenchError
from detailpp.bench.generation import run_generation
from detailpp.bench.manifest import read_jsonl, strip_volatile
from detailpp.bench.metrics import Metric
from detailpp.bench.runs import plan_items
from detailpp.bench.scoring import run_scoring
from detailpp.bench.sharding import Shard
from tests.bench.fakes import IPP, SUITE, CountingScorer, fake_generate, identity
from tests.paths import REPO, SRC


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "samples").iterdir())}


def merged(folder: Path) -> list[dict]:
    return [strip_volatile(r) for r in read_jsonl(folder / "manifest.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = run_generation(out, SUITE, identity(), fake_generate, progress=False)
    assert summary.made == summary.total == len(SUITE.prompts) * IPP and summary.complete
    return out


def test_seed_schedule_and_items():
    items = plan_items(["p0", "p1"], 10)
    assert [it.seed for it in items[:10]] == list(range(42, 52)) == [it.seed for it in items[10:]]
    assert [it.index for it in items] == list(range(20)) and items[13].prompt_index == 1
    assert items[13].file == "samples/p1_000013.png"  # T2I-CompBench's <prompt>_<count:06d>.png


def test_reference_run(reference):
    records = merged(reference)
    assert [r["item"] for r in records] == list(range(len(SUITE.prompts) * IPP))
    assert len(files(reference)) == len(records)
    r = records[7]
    assert (r["prompt"], r["seed"], r["method"]) == (SUITE.prompts[2], 43, "fake")
    assert r["file"] == "samples/a cat with underscores - slash_000007.png"
    from PIL import Image

    with Image.open(reference / r["file"]) as im:
        assert json.loads(im.info["detailpp"])["seed"] == 43 and "Seed: 43" in im.info["parameters"]


def test_manual_shards_equal_one_process(reference, tmp_path):
    out = tmp_path / "run"
    first = run_generation(out, SUITE, identity(), fake_generate, shard=Shard(1, 2, launcher="manual"), progress=False)
    assert first.made == 6 and not first.complete and not (out / "manifest.jsonl").exists()
    second = run_generation(
        out, SUITE, identity(), fake_generate, shard=Shard(0, 2, launcher="manual"), progress=False
    )
    assert second.made == 6 and second.complete
    assert files(out) == files(reference)
    assert merged(out) == merged(reference)
    parts = {p.name: [r["item"] for r in read_jsonl(p)] for p in out.glob("manifest.part-*.jsonl")}
    assert parts == {
        "manifest.part-000-of-002.jsonl": [0, 2, 4, 6, 8, 10],
        "manifest.part-001-of-002.jsonl": [1, 3, 5, 7, 9, 11],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = """
import sys
from tests.bench.fakes import SUITE, fake_generate, identity
from detailpp.bench.generation import run_generation
from detailpp.bench.sharding import resolve_shard
shard = resolve_shard()
assert shard.launcher == "distributed" and shard.count == 2, shard
summary = run_generation(sys.argv[1], SUITE, identity(), fake_generate, shard=shard, progress=False)
print("rank", shard.index, "made", summary.made, "merged", summary.merged)
"""


def test_torchrun_two_processes_equal_one_process(reference, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(SRC)])}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(script),
        str(tmp_path / "run"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 made 6 merged True" in proc.stdout and "rank 1 made 6 merged False" in proc.stdout
    assert files(tmp_path / "run") == files(reference)
    assert merged(tmp_path / "run") == merged(reference)


def test_killed_run_resumes_without_loss_or_duplicates(reference, tmp_path, caplog):
    out = tmp_path / "run"
    made = []

    def dies_after_five(prompt, seed):
        if len(made) == 5:
            raise KeyboardInterrupt  # a kill between two images
        made.append((prompt, seed))
        return fake_generate(prompt, seed)

    with pytest.raises(KeyboardInterrupt):
        run_generation(out, SUITE, identity(), dies_after_five, progress=False)
    part = out / "manifest.part-000-of-001.jsonl"
    lines = part.read_bytes().splitlines(keepends=True)
    assert len(lines) == 5
    samples = out / "samples"
    ref_files = files(reference)
    names = sorted(ref_files)  # item order: the names end with the item number
    names.sort(key=lambda n: int(n.rsplit("_", 1)[1][:6]))
    # what a kill (and a careless user) can leave: a cut manifest line, a truncated image, a foreign file under an
    # item's name, a temporary file of an interrupted write
    part.write_bytes(b"".join(lines) + lines[0][:40])
    (samples / names[1]).write_bytes(ref_files[names[1]][:50])
    (samples / names[7]).write_bytes(b"not a png")
    (samples / f".{names[8]}.tmp-abc123").write_bytes(b"partial")
    (samples / "notes.txt").write_text("mine")

    caplog.set_level("INFO")
    summary = run_generation(out, SUITE, identity(), fake_generate, progress=False)
    assert summary.complete and summary.made == 12 - 4  # items 0, 2, 3, 4 were intact
    log = caplog.text
    assert "cut before its end" in log and "50 bytes instead of" in log and "notes.txt" in log
    assert not list(samples.glob(".*.tmp-*"))
    assert {k: v for k, v in files(out).items() if k != "notes.txt"} == ref_files
    assert merged(out) == merged(reference)
    assert [json.loads(x) for x in part.read_bytes().splitlines()]  # every line of the part is whole JSON now
    items = [r["item"] for r in read_jsonl(out / "manifest.jsonl")]
    assert items == sorted(set(items)) == list(range(12))
    again = run_generation(out, SUITE, identity(), fake_generate, progress=False)
    assert again.made == 0 and again.complete


def test_other_settings_are_refused(reference):
    with pytest.raises(BenchError, match="other settings.*steps"):
        run_generation(reference, SUITE, identity(steps=3), fake_generate, progress=False)


def test_scoring_is_resumable_and_lands_in_the_manifest(reference, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    dying = CountingScorer(fail_on_call=3)
    metric = Metric("fake-metric", {"version": 1}, lambda: dying)
    with pytest.raises(KeyboardInterrupt):
        run_scoring(out, metric, batch_size=2, progress=False)
    assert len(read_jsonl(out / "scores" / "fake-metric.part-000-of-001.jsonl")) == 4
    fresh = CountingScorer()
    summary = run_scoring(out, Metric("fake-metric", {"version": 1}, lambda: fresh), batch_size=2, progress=False)
    assert summary.done_before == 4 and summary.made == 8 and summary.complete and fresh.calls == 4
    records = read_jsonl(out / "manifest.jsonl")
    assert all(isinstance(r["scores"]["fake-metric"], float) for r in records) and len(records) == 12
    with pytest.raises(BenchError, match="other settings.*--rescore"):
        run_scoring(out, Metric("fake-metric", {"version": 2}, CountingScorer), progress=False)
    again = CountingScorer()
    summary = run_scoring(out, Metric("fake-metric", {"version": 2}, lambda: again), rescore=True, progress=False)
    assert summary.made == 12 and again.calls == 2


def test_scoring_needs_images(tmp_path):
    with pytest.raises(BenchError, match="no run.json"):
        run_scoring(tmp_path, Metric("m", {}, CountingScorer), progress=False)


def test_cut_line_in_the_middle_of_a_foreign_part_is_dropped(tmp_path, caplog):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"item": 1}\n[1, 2]\n{"item": 2}\n{"item": 3, "fi')
    assert read_jsonl(p) == [{"item": 1}, {"item": 2}]
    assert "not a JSON object" in caplog.text and "cut before its end" in caplog.text
    assert p.read_bytes().endswith(b'"fi')  # not ours: left as it is
    read_jsonl(p, repair=True)
    assert p.read_bytes().endswith(b'{"item": 2}\n')


def test_shard_arguments_are_checked():
    from detailpp.bench.sharding import resolve_shard

    with pytest.raises(BenchError, match="both --shard-index and --num-shards"):
        resolve_shard(shard_index=1)
    with pytest.raises(BenchError, match="between 0 and 1"):
        resolve_shard(2, 2)
    assert resolve_shard(1, 3).owns(4) and not resolve_shard(1, 3).owns(3)
