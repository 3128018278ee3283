"""The GPU benchmark script stays importable and runnable: its ``--tiny`` mode on the CPU (tiny random SDXL, 2 steps)
walks every code path the GPU run takes, except CPU offload (it needs a GPU); its torch.compile trial runs dynamo with
the "eager" backend."""

from __future__ import annotations

import json

import pytest

from tests.paths import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "gpu_benchmark.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


def test_benchmark_plans_have_one_to_three_subjects(bench):
    # the full-size SDXL the script builds (detailpp.models.full_size) is checked in tests/bench/test_bench_plans.py
    assert [len(p.branches) + 2 for p in bench.benchmark_plans().values()] == [3, 4, 5]


def test_tiny_run_writes_every_figure(bench, tmp_path):
    argv = ["--tiny", "--quick", "--size", "64", "--floor-repeats", "1", "--out", str(tmp_path)]
    bench.main(argv)
    saved = json.loads((tmp_path / "gpu_benchmark.json").read_text())
    assert saved["meta"]["mode"] == "tiny" and not saved["errors"], saved["errors"]
    runs = saved["runs"]
    expected = {name for name, *_ in bench.Benchmark(bench.parse_args(argv)).grid()} | {"plain_sdxl"}
    assert len(expected) == 4 and expected <= set(runs)
    on = runs["detail_2subj_nursing_on_pruned"]
    assert on["branches"] == 4 and on["nursing_passes"] >= 1 and on["nursing_iteration_ms"] > 0
    assert all(len(r["per_step_first_run"]) == 2 for r in runs.values())
    assert runs["detail_2subj_nursing_off_unpruned"]["in_window_batches"] == [[8]]
    assert {"unet_forward", "fwd_bwd_b1_full_frozen", "fwd_bwd_b1_truncated_frozen", "vae_decode_fp32"} <= set(
        saved["floor"]
    )
    assert set(saved["profile"]) >= {"unet_forward_b8", "detail_armed_forward_b8", "nursing_pass_frozen"}
    assert "nursing_iteration_vs_fwd_bwd_b1<=1.1" in saved["targets"]
    regional = saved["compile"]["regional"]
    assert regional["dynamo"]["graph_breaks"] == 0, regional["dynamo"]
    for label in ("plain_sdxl", "detail_2subj_nursing_off_pruned"):
        assert regional[label]["graphs_first_call"] > 0 and regional[label]["graphs_later_calls"] == 0, label
    report = bench.summary_text(saved, markdown=True)
    assert "| Detail++ 2 subj, nursing on, pruned | 4 |" in report
