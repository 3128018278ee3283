"""Contrastive pretraining of the tiny CLIP pair on rendered toy scenes (InfoNCE over in-batch negatives only).

Run as ``python -m research.toy.clip.pretrain --output DIR`` (``--help``: the options). Each step draws a batch of
training-split scenes (:func:`~research.toy.clip.data.scene_batch`; no hard negatives: a batch holds a caption's
attribute-swapped twin only by chance), embeds images and captions, and takes one AdamW step on the symmetric
cross-entropy of CLIP's scaled cosine similarities. Deterministic for a seed; ``--resume DIR/checkpoint.pt`` goes on
bit for bit on the CPU where the checkpoint stopped (weights, AdamW moments, step; the data depend on the step only).
``--max-minutes`` / ``--max-steps`` end a run early; ``--steps`` is the planned length (the cosine schedule's).

Outputs, in ``--output``: ``checkpoint.pt`` (to resume), ``clip/``, ``text_encoder/``, ``text_encoder_2/``
(``save_pretrained`` folders, safetensors; :func:`~research.toy.clip.models.save_encoders`), ``log.jsonl``,
``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from research.toy.clip.data import scene_batch, used_token_ids
from research.toy.clip.models import DEFAULT_SIZES, TINY_SIZES, ClipSizes, build_clip, save_encoders
from research.toy.scenes import CaptionTokenizer

logger = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Settings of a pretraining run (the command line maps onto these fields)."""

    output: str = "outputs/toy-clip"
    resume: str | None = None  # a checkpoint.pt written by this module
    model: str = "default"  # "default" or "tiny" (tests)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    seed: int = 0
    steps: int = 3000  # planned steps: the learning-rate schedule's length
    max_steps: int | None = None  # stop after this many steps in this run
    max_minutes: float | None = None  # stop after this many minutes in this run
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    attribute_drop: float = 0.15  # drop an object's colour / texture word, as the diffusion training does
    shuffle_words: int = 0  # 1: train on captions with their words shuffled (a bag of words by construction)
    save_every: int = 250  # checkpoint every this many steps (and at the end)
    log_every: int = 25


#: Settings that decide the data stream: a resumed run must keep them.
DATA_SETTINGS = ("seed", "batch_size", "attribute_drop", "shuffle_words")


def lr_at(cfg: PretrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``--lr`` at ``--steps``."""
    w = min(1.0, (step + 1) / max(cfg.warmup, 1))
    progress = min(1.0, step / max(cfg.steps, 1))
    return cfg.lr * w * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def contrastive_loss(clip, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(loss, in-batch accuracy)``: InfoNCE in both directions over the batch's image-caption similarities."""
    out = clip(input_ids=input_ids, pixel_values=pixel_values)
    logits = out.logits_per_image
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    acc = float((logits.argmax(1) == target).float().mean())
    return loss, acc


def make_optimizer(clip, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in clip.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def _zero_unused_embeddings(clip, used: list[int]) -> None:
    emb = clip.text_model.embeddings.token_embedding.weight
    keep = torch.zeros(emb.shape[0], dtype=torch.bool)
    keep[used] = True
    with torch.no_grad():
        emb[~keep] = 0


def _save_checkpoint(path: Path, clip, opt, step: int, seconds: float, cfg: PretrainConfig, sizes: ClipSizes):
    state = {
        "clip": clip.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "seconds": seconds,
        "sizes": sizes.to_dict(),
        "config": asdict(cfg),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def setup(cfg: PretrainConfig, tok: CaptionTokenizer):
    """``(clip, optimizer, start step, prior seconds, sizes)``: fresh (unused token embeddings zero) or resumed."""
    ckpt = torch.load(cfg.resume, map_location="cpu", weights_only=False) if cfg.resume else None
    if ckpt:  # the data stream must go on as it was
        saved = ckpt["config"]
        differ = [k for k in DATA_SETTINGS if saved.get(k, getattr(PretrainConfig, k)) != getattr(cfg, k)]
        if differ:
            raise ValueError(f"--resume: the checkpoint was trained with other {', '.join(differ)}: {saved}")
    sizes = ClipSizes(**ckpt["sizes"]) if ckpt else (TINY_SIZES if cfg.model == "tiny" else DEFAULT_SIZES)
    torch.manual_seed(cfg.seed)
    clip = build_clip(sizes)
    if ckpt:
        clip.load_state_dict(ckpt["clip"])
    else:
        _zero_unused_embeddings(clip, used_token_ids(tok))
    clip.to(cfg.device).train()
    opt = make_optimizer(clip, cfg)
    if ckpt:
        opt.load_state_dict(ckpt["optimizer"])
    return clip, opt, (ckpt["step"] if ckpt else 0), (ckpt["seconds"] if ckpt else 0.0), sizes


def pretrain(cfg: PretrainConfig) -> dict:
    """Train (or resume) the pair; returns the run's summary (also written to ``summary.json``)."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    tok = CaptionTokenizer()
    clip, opt, step, prior, sizes = setup(cfg, tok)
    device = torch.device(cfg.device)
    t0, start, last = time.time(), step, {}
    with open(out / "log.jsonl", "a", encoding="utf-8") as log_f:
        while step < cfg.steps:
            if cfg.max_steps is not None and step - start >= cfg.max_steps:
                break
            if cfg.max_minutes is not None and time.time() - t0 >= 60 * cfg.max_minutes:
                break
            px, ids = scene_batch(
                tok,
                cfg.seed,
                step,
                cfg.batch_size,
                sizes.image_size,
                cfg.attribute_drop,
                device,
                cfg.shuffle_words > 0,
            )
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            loss, acc = contrastive_loss(clip, px, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, math.log(100))
            step += 1
            last = {"step": step, "loss": float(loss.detach()), "batch_acc": acc, "elapsed": time.time() - t0}
            if step % cfg.log_every == 0 or step == start + 1:
                log_f.write(json.dumps(last) + "\n")
                log_f.flush()
                logger.info("step=%d loss=%.4f batch_acc=%.3f elapsed=%.0fs", *last.values())
            if cfg.save_every and step % cfg.save_every == 0:
                _save_checkpoint(out / "checkpoint.pt", clip, opt, step, prior + time.time() - t0, cfg, sizes)
    seconds = prior + time.time() - t0
    _save_checkpoint(out / "checkpoint.pt", clip, opt, step, seconds, cfg, sizes)
    save_encoders(clip.eval(), out)
    summary = {
        "step": step,
        "steps_this_run": step - start,
        "samples_seen": step * cfg.batch_size,
        "seconds_total": seconds,
        "seconds_this_run": time.time() - t0,
        "last": last,
        "sizes": sizes.to_dict(),
        "config": asdict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    p = argparse.ArgumentParser(description="Pretrain a tiny CLIP pair on toy scenes (in-batch negatives only).")
    for f, v in asdict(PretrainConfig()).items():
        typ = type(v) if v is not None else (float if f == "max_minutes" else int if f == "max_steps" else str)
        p.add_argument(
            "--" + f.replace("_", "-"),
            type=typ,
            default=v,
            **({"choices": ("default", "tiny")} if f == "model" else {}),
        )
    return PretrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return pretrain(parse_args(argv))


if __name__ == "__main__":
    main()
