"""benchmarks/single_file_offline.py stays runnable: its ``--tiny`` mode writes the tiny random SDXL as an
original-layout single file and loads it back in an offline child process (with --config), bit for bit."""

from __future__ import annotations

import json

from tests.paths import BENCHMARKS, load_script


def test_tiny_run_loads_the_single_file_back_offline_bit_for_bit(tmp_path):
    script = load_script(BENCHMARKS / "single_file_offline.py")
    out = tmp_path / "result.json"
    assert script.main(["--tiny", "--work", str(tmp_path), "--out", str(out), "--generate"]) == 0
    result = json.loads(out.read_text())
    assert result["equal"] and result["finite"] and result["tensors_compared"] == result["tensors"] == 649
    assert (result["kind"], result["pipeline"]) == ("Stable Diffusion XL", "DetailPlusPlusPipeline")
    assert not (tmp_path / "sdxl-random.safetensors").exists()  # removed unless --keep
