"""Training of the toy model: the VAE first, then the UNet and both text encoders, on scenes rendered on the fly.

Run as ``python -m research.toy.train`` from the repository root (``--help``: the options). Each step samples
captions on the CPU (a background thread), renders the scenes on the training device, encodes them with the frozen
VAE and takes one epsilon-prediction step (SDXL's scaled-linear schedule, min-SNR-5 weighting, bf16 autocast on
CUDA, optional ``torch.compile``). 10% of captions are dropped for classifier-free guidance: half replaced by zero
embeddings (what ``StableDiffusionXLPipeline`` uses for an empty negative prompt, ``force_zeros_for_empty_prompt``),
half by the empty caption. An exponential moving average of the weights is what gets saved.

Outputs, in ``--output``: ``pipeline/`` (a diffusers folder: model_index.json, fp16 safetensors, loadable by
``StableDiffusionXLPipeline.from_pretrained``), ``checkpoint.pt.gz`` (fp32 raw weights and the step, to resume;
``--split-mb`` cuts it into parts), ``summary.json``, ``log.jsonl``, and with ``--eval-prompts`` a judged sample
(``samples.png``).

Data parallel: started by ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1), each process trains on its own GPU
and its own scene stream with ``--batch-size`` samples; the gradients are averaged over the processes (one
all-reduce of all of them per step) before every optimiser step, so the N copies stay equal and the run is one
model trained at N times the batch. Only rank 0 logs and saves.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from research.toy import model as toy_model
from research.toy.scenes import LAYOUTS
from research.toy.training.checkpoint import (
    CHECKPOINT_PARTS,
    checkpoint_from_pipeline,
    finalize_pipeline_folder,
    load_checkpoint,
    save_run,
)
from research.toy.training.config import TrainConfig
from research.toy.training.data import SceneStream
from research.toy.training.loop import train_unet
from research.toy.training.objectives import encode_text, layout_loss
from research.toy.training.parallel import _data_parallel, _replica_difference, average_gradients
from research.toy.training.setup import (
    build_model,
    check_config,
    grow_unet,
    make_ema,
    make_optimizer,
    model_config,
    prepare_vae,
    starting_checkpoint,
)

__all__ = [  # what callers import from here (the pieces live in research.toy.training)
    "SceneStream",
    "TrainConfig",
    "average_gradients",
    "checkpoint_from_pipeline",
    "encode_text",
    "finalize_pipeline_folder",
    "grow_unet",
    "layout_loss",
    "load_checkpoint",
    "main",
    "parse_args",
    "train",
]

logger = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) the toy model; returns the run's summary (also written to ``summary.json``)."""
    rank, world, device = _data_parallel(cfg.device)
    main_process = rank == 0
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    amp = device.type == "cuda"
    if amp:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log_f = open(out / "log.jsonl", "a", encoding="utf-8") if main_process else None  # noqa: SIM115 - closed below

    def log(rec: dict) -> None:
        if log_f is None:
            return
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()
        logger.info("%s", " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))

    check_config(cfg)
    ckpt = starting_checkpoint(cfg)
    mcfg = model_config(cfg, ckpt)
    model = build_model(cfg, mcfg, ckpt, log)
    vae = model.comps["vae"]
    for m in (vae, model.comps["text_encoder"], model.comps["text_encoder_2"], model.comps["unet"]):
        m.to(device)
    run_t0 = time.time()
    sf = prepare_vae(vae, cfg, mcfg, trained=bool(ckpt), device=device, world=world, log=log)
    params = model.parameters()
    opt = make_optimizer(params, cfg, mcfg, device)
    ema = make_ema(params, cfg, mcfg, model.start_step, device, log)
    res = train_unet(cfg, mcfg, model, vae, sf, opt, ema, device, rank, world, log)
    replica_diff = _replica_difference(params) if world > 1 else None
    if not main_process:
        return {"rank": rank, "step": res.step, "final_loss": res.last_loss, "replica_max_diff": replica_diff}
    seconds = model.prior_seconds + (time.time() - run_t0)
    ckpt_files, pipe, pipe_dir = save_run(out, cfg, mcfg, model, res.step, sf, seconds, ema)
    summary = {
        "device": torch.cuda.get_device_name(device) if amp else "cpu",
        "model_config": mcfg.to_dict(),
        "parameters": {k: toy_model.count_parameters(model.comps[k]) for k in CHECKPOINT_PARTS},
        "step": res.step,
        "steps_this_run": res.steps_this_run,
        "train_seconds_this_run": res.train_seconds,
        "run_seconds_total": seconds,
        "it_per_s": res.it_per_s,
        "batch_size": cfg.batch_size,
        "processes": world,
        "replica_max_diff": replica_diff,
        "final_loss": res.last_loss,
        "scaling_factor": sf,
        "checkpoint": [p.name for p in ckpt_files],
        "pipeline_mb": sum(f.stat().st_size for f in pipe_dir.rglob("*") if f.is_file()) / 2**20,
    }
    if cfg.eval_prompts:
        from research.toy.evaluate import evaluate_pipeline

        pipe.to(device)
        summary["eval"] = evaluate_pipeline(
            pipe,
            cfg.eval_prompts,
            steps=cfg.eval_steps,
            guidance_scale=cfg.eval_guidance,
            grid_path=out / "samples.png",
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    log({"phase": "done", "step": res.step, "final_loss": res.last_loss})
    log_f.close()
    return summary


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description="Train the toy SDXL-architecture model on synthetic scenes.")
    d = TrainConfig()
    for f, v in asdict(d).items():
        flag = "--" + f.replace("_", "-")
        if isinstance(v, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=v)
            continue
        if f in ("grow_transformer_layers", "transformer_layers"):
            p.add_argument(flag, type=lambda t: tuple(int(x) for x in t.split(",")), default=v, help="e.g. 1,1,4")
            continue
        typ = type(v) if v is not None else (float if f == "max_minutes" else int if f == "max_steps" else str)
        p.add_argument(flag, type=typ, default=v, **({"choices": LAYOUTS} if f == "layout" else {}))
    a = p.parse_args(argv)
    return TrainConfig(**vars(a))


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return train(parse_args(argv))


if __name__ == "__main__":
    summary = main(sys.argv[1:])
    print(json.dumps({k: v for k, v in summary.items() if k != "model_config"}, indent=1))
