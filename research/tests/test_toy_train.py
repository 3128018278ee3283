"""Training the toy model: a new UNet on a resumed model's VAE and text encoders, sharded saving, data parallel."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY_ARGS = ["--model", "tiny", "--device", "cpu", "--vae-steps", "2", "--vae-batch", "2", "--batch-size", "2"]
TINY_ARGS += ["--log-every", "1", "--warmup", "1", "--data-workers", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from research.toy.train import main

    out = tmp_path_factory.mktemp("toy") / "run"
    main([*TINY_ARGS, "--output", str(out), "--steps", "3", "--max-steps", "2"])
    return out


def test_reinit_unet_keeps_vae_and_text_encoders_and_shards_the_unet(tiny_run, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from research.toy.train import checkpoint_from_pipeline, main

    out = tmp_path / "new"
    summary = main(
        [
            *TINY_ARGS,
            "--output",
            str(out),
            "--resume",
            str(tiny_run / "pipeline"),
            "--resume-step",
            "2",
            "--reinit-unet",
            "--transformer-layers",
            "1,1,3",
            "--steps",
            "2",
            "--max-shard-mb",
            "0.05",
        ]
    )
    assert summary["step"] == 2  # a new UNet starts at step 0, whatever step the source model was at
    assert list(summary["model_config"]["transformer_layers"]) == [1, 1, 3]
    src, new = checkpoint_from_pipeline(tiny_run / "pipeline"), checkpoint_from_pipeline(out / "pipeline")
    for k, v in src["vae"].items():
        torch.testing.assert_close(new["vae"][k], v)
    assert len(list((out / "pipeline" / "unet").glob("*.safetensors"))) > 1
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out / "pipeline"))
    assert len(pipe.unet.mid_block.attentions[0].transformer_blocks) == 3
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, new["unet"][k])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reinit-unet"], "--reinit-unet keeps"),
        (["--transformer-layers", "1,0,2"], "at least 1 block"),
    ],
)
def test_new_unet_options_are_checked(tmp_path, extra, message):
    from research.toy.train import main

    with pytest.raises(ValueError, match=message):
        main([*TINY_ARGS, "--output", str(tmp_path / "x"), "--steps", "1", *extra])


def test_transformer_layers_refuse_a_resumed_unet(tiny_run, tmp_path):
    from research.toy.train import main

    with pytest.raises(ValueError, match="--grow-transformer-layers"):
        main(
            [*TINY_ARGS, "--output", str(tmp_path / "x"), "--resume", str(tiny_run / "pipeline")]
            + ["--transformer-layers", "1,1,2", "--steps", "1"]
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_processes_train_one_model(tmp_path):
    """Two torchrun processes (gloo, CPU) on different scene streams: averaged gradients keep the copies equal."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmd += ["-m", "research.toy.train", *TINY_ARGS, "--output", str(out), "--steps", "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["step"] == 3
    assert summary["replica_max_diff"] == 0.0
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"phase": "data_parallel", "processes": 2, "global_batch": 4} in logged
    assert sum(r.get("phase") == "unet" for r in logged) == 3  # one log, by rank 0
