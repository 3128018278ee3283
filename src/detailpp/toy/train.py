"""Training of the toy model: the VAE first, then the UNet and both text encoders, on scenes rendered on the fly.

Run through ``benchmarks/train_toy.py`` (same arguments). Each step samples captions on the CPU (a background
thread), renders the scenes on the training device, encodes them with the frozen VAE and takes one epsilon-prediction
step (SDXL's scaled-linear schedule, min-SNR-5 weighting, bf16 autocast on CUDA, optional ``torch.compile``). 10% of
captions are dropped for classifier-free guidance: half replaced by zero embeddings (what
``StableDiffusionXLPipeline`` uses for an empty negative prompt, ``force_zeros_for_empty_prompt``), half by the
empty caption. An exponential moving average of the weights is what gets saved.

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
import gzip
import io
import json
import logging
import math
import queue
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from detailpp.toy import model as toy_model
from detailpp.toy.scenes import (
    LAYOUT_GRID,
    LAYOUTS,
    CaptionTokenizer,
    noise_with_layout_field,
    render,
    render_tensors,
    sample_scenes,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of a training run (the command line maps onto these fields)."""

    output: str = "outputs/toy-train"  # folder for the pipeline, checkpoint, logs
    resume: str | None = None  # checkpoint to resume from (a checkpoint.pt.gz, or its first part .part0)
    resume_ema: str | None = None  # pipeline folder whose weights are the EMA to resume (default: fresh EMA)
    model: str = "default"  # "default" or "tiny" (tests)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    seed: int = 0
    vae_steps: int = 1500  # VAE training steps (skipped when resuming a checkpoint that has a trained VAE)
    vae_batch: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    steps: int = 20000  # planned UNet steps: the learning-rate schedule's length
    max_steps: int | None = None  # stop after this many steps in this run
    max_minutes: float | None = None  # stop the UNet phase after this many minutes in this run
    batch_size: int = 256
    lr: float = 5e-4
    warmup: int = 300
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # half zero embeddings, half the empty caption
    attribute_drop: float = 0.15  # drop an object's colour / texture word from its caption
    layout: str = "slots"  # "uniform", "field" or "slots": where objects go (scenes.py; not uniform: from the noise)
    data_workers: int = 4  # CPU threads sampling scenes
    min_snr_gamma: float = 5.0
    min_snr_floor: float = 0.0  # weight clamp(SNR, floor, gamma) / SNR: floor 1 = x0-MSE weight 1 at high noise
    high_noise_fraction: float = 0.0  # share of each batch whose timestep is drawn from [high_noise_from, 999]
    high_noise_from: int = 700  # (the layout is read off the noise in the first, noisiest sampling steps)
    layout_loss_weight: float = 0.0  # weight of layout_loss (x0 error on the layout field's grid), added to the loss
    resume_step: int = 0  # step count to go on from when --resume is a pipeline folder (its EMA weights)
    grow_transformer_layers: tuple[int, int, int] | None = None  # resume into deeper attention, new blocks = identity
    transformer_layers: tuple[int, int, int] | None = None  # a new UNet's blocks per attention, per level (e.g. 1,1,5)
    reinit_unet: bool = False  # with --resume: keep its VAE and text encoders, start a new UNet from step 0
    max_shard_mb: float = 15.0  # largest safetensors file of the saved pipeline (bigger weights are sharded)
    compile: str = "none"  # "none", "default", "max-autotune-no-cudagraphs", "reduce-overhead"
    log_every: int = 100
    eval_prompts: int = 0  # held-out and seen prompts to sample and judge at the end (each)
    eval_steps: int = 30
    eval_guidance: float = 5.0
    split_mb: float = 0.0  # cut the checkpoint into parts of this many MB (0: one file)


def layout_loss(
    pred: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor, grid: int = LAYOUT_GRID
) -> torch.Tensor:
    """Per-sample squared error of the predicted clean latent, averaged over the cells of the layout field's grid.

    With ``x0_hat = (z_t - sqrt(1 - abar) * pred) / sqrt(abar)`` the error ``x0_hat - x0`` is
    ``sqrt((1 - abar) / abar) * (noise - pred)``; its mean over each of the ``grid x grid`` cells (where the
    objects are, coarsely) is squared and averaged. At high noise the epsilon loss weighs this coarse x0 error by
    the tiny SNR and drowns it in the unpredictable fine detail, yet it is what decides the layout read off the
    noise; both losses have the same minimiser (the posterior mean), so adding it reweights, it does not bias.
    ``abar_t``: alphas_cumprod at each sample's timestep, shape (B,) or broadcastable to ``pred``.
    """
    if pred.shape != noise.shape or pred.shape[-1] % grid or pred.shape[-2] % grid:
        raise ValueError(f"layout_loss needs equal latent shapes divisible by grid={grid}, got {tuple(pred.shape)}")
    a = abar_t.reshape(-1, *([1] * (pred.ndim - 1))).float()
    err = F.adaptive_avg_pool2d(noise.float() - pred.float(), grid) * ((1 - a) / a).sqrt()
    return err.pow(2).mean(dim=tuple(range(1, pred.ndim)))


def _lr_at(step: int, cfg: TrainConfig, warmup_from: int = 0) -> float:
    w = min(1.0, (step - warmup_from + 1) / max(cfg.warmup, 1))
    progress = min(1.0, step / max(cfg.steps, 1))
    return cfg.lr * w * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class SceneStream:
    """Caption/scene batches sampled on the CPU by background threads (seeded; deterministic order).

    Worker ``k`` of ``workers`` has its own generator and queue; batches are taken round-robin, so the stream is
    the same for a seed whatever the threads' timing.
    """

    def __init__(
        self, batch_size: int, seed: int, attribute_drop: float, layout: str = "uniform", workers: int = 1
    ) -> None:
        self.tok = CaptionTokenizer()
        self.batch_size = batch_size
        self.attribute_drop = attribute_drop
        self.layout = layout
        self.queues: list[queue.Queue] = [queue.Queue(maxsize=4) for _ in range(workers)]
        self.turn = 0
        self.stop = threading.Event()
        rngs = (
            [np.random.default_rng(seed)]
            if workers == 1
            else [np.random.default_rng([seed, k]) for k in range(workers)]
        )
        self.threads = [
            threading.Thread(target=self._work, args=(rng, q), daemon=True)
            for rng, q in zip(rngs, self.queues, strict=True)
        ]
        for t in self.threads:
            t.start()

    def _work(self, rng: np.random.Generator, q: queue.Queue) -> None:
        while not self.stop.is_set():
            batch = sample_scenes(
                self.batch_size, rng, split="train", attribute_drop=self.attribute_drop, layout=self.layout
            )
            ids1 = self.tok(batch.captions)
            ids2 = self.tok(batch.captions, pad_id=0)
            while not self.stop.is_set():
                try:
                    q.put((batch, ids1, ids2), timeout=0.5)
                    break
                except queue.Full:
                    continue

    def next(self):
        q = self.queues[self.turn]
        self.turn = (self.turn + 1) % len(self.queues)
        return q.get()

    def close(self) -> None:
        self.stop.set()


def encode_text(te1, te2, ids1: torch.Tensor, ids2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning: penultimate hidden states of both encoders, concatenated; pooled projection of the 2nd."""
    o1 = te1(ids1, output_hidden_states=True)
    o2 = te2(ids2, output_hidden_states=True)
    return torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1), o2.text_embeds


def _zero_unused_embeddings(te, used: list[int]) -> None:
    emb = te.get_input_embeddings().weight
    keep = torch.zeros(emb.shape[0], dtype=torch.bool)
    keep[used] = True
    with torch.no_grad():
        emb[~keep] = 0


def _save_checkpoint(path: Path, parts: dict, split_mb: float) -> list[Path]:
    buf = io.BytesIO()
    torch.save(parts, buf)
    data = gzip.compress(buf.getvalue(), compresslevel=1)
    for old in path.parent.glob(path.name + "*"):
        old.unlink()
    if split_mb <= 0 or len(data) <= split_mb * 2**20:
        path.write_bytes(data)
        return [path]
    n = int(split_mb * 2**20)
    out = []
    for i in range(0, len(data), n):
        p = path.with_name(f"{path.name}.part{i // n}")
        p.write_bytes(data[i : i + n])
        out.append(p)
    return out


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`train` (whole, or the ``.part0`` of a split one, parts alongside)."""
    path = Path(path)
    if path.name.endswith(".part0"):
        base = path.name[: -len(".part0")]
        parts = sorted(path.parent.glob(base + ".part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
        data = b"".join(p.read_bytes() for p in parts)
    else:
        data = path.read_bytes()
    return torch.load(io.BytesIO(gzip.decompress(data)), map_location="cpu", weights_only=False)


def checkpoint_from_pipeline(folder: str | Path, step: int = 0) -> dict:
    """A checkpoint (as :func:`load_checkpoint` returns) made of a saved toy pipeline's weights, in float32.

    For going on from a pipeline whose raw checkpoint is gone: its (EMA) weights become the starting point; Adam's
    moments start afresh (as on every resume) and ``step`` sets where the learning-rate schedule goes on.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    mcfg = toy_model.ToyModelConfig.from_pipeline(folder)
    out: dict = {"model_config": mcfg.to_dict(), "step": int(step), "seconds": 0.0, "history": []}
    for name in ("vae", "text_encoder", "text_encoder_2", "unet"):
        sd: dict = {}
        for f in sorted((folder / name).glob("*.safetensors")):
            sd.update(load_file(str(f)))
        out[name] = {k: v.float() for k, v in sd.items()}
    out["scaling_factor"] = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))["scaling_factor"]
    return out


def _train_vae(vae, cfg: TrainConfig, mcfg, device, log) -> float:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed + 1)
    amp = device.type == "cuda"
    t0 = time.time()
    for step in range(cfg.vae_steps):
        batch = sample_scenes(cfg.vae_batch, rng, split="any")
        x, _ = render(batch, device, image_size=mcfg.image_size)
        x = x * 2 - 1
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * (1 - step / max(cfg.vae_steps, 1)))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            post = vae.encode(x).latent_dist
            z = post.sample()
            rec = vae.decode(z).sample
        rec = rec.float()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            log({"phase": "vae", "step": step, "loss": float(loss.detach()), "elapsed": time.time() - t0})
    vae.eval()
    # scaling factor: unit variance latents
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        zs = []
        for _ in range(4):
            x, _ = render(sample_scenes(max(cfg.vae_batch, 8), rng, split="any"), device, image_size=mcfg.image_size)
            zs.append(vae.encode(x * 2 - 1).latent_dist.sample().float())
        z = torch.cat(zs)
        x, _ = render(sample_scenes(max(cfg.vae_batch, 8), rng, split="any"), device, image_size=mcfg.image_size)
        rec = vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample.float()
    psnr = float(-10 * torch.log10(F.mse_loss((rec.clamp(-1, 1) + 1) / 2, x)))
    sf = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=sf)
    log({"phase": "vae", "done": True, "scaling_factor": sf, "psnr": psnr, "latent_mean": float(z.mean())})
    return sf


def _data_parallel(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device); joins the ``torchrun`` process group when there is one."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    return rank, world, dev


def average_gradients(params: list[torch.nn.Parameter], stop: bool, world: int) -> bool:
    """Average the gradients over the data-parallel processes in one all-reduce; returns whether any process stops.

    The stop flag rides along with the gradients (as the last element of the flat buffer), so the processes agree
    on when to end a time-limited run without another synchronisation. (Not ``DistributedDataParallel``: what is
    compiled and trained is a function of three modules, text encoders and UNet, and the stop flag has to travel
    with the step; run 8's 6.7-6.9 it/s on 4 H100s include this one all-reduce of ~10 M values a step.)
    """
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([float(stop)], device=grads[0].device)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n
    return bool(flat[-1] > 0)


def _broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's weights (and buffers) into every process's copy of ``module``."""
    for t in module.state_dict().values():
        torch.distributed.broadcast(t, 0)


def _replica_difference(params: list[torch.nn.Parameter]) -> float:
    """Largest difference between any process's weights and rank 0's (0.0 when the copies stayed equal)."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


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

    if not 0.0 <= cfg.min_snr_floor <= cfg.min_snr_gamma:
        raise ValueError(
            f"--min-snr-floor must lie in [0, --min-snr-gamma={cfg.min_snr_gamma}], got {cfg.min_snr_floor}"
        )
    if cfg.layout_loss_weight < 0:
        raise ValueError(f"--layout-loss-weight must be >= 0, got {cfg.layout_loss_weight}")
    if not 0.0 <= cfg.high_noise_fraction <= 1.0 or not 0 <= cfg.high_noise_from < 1000:
        raise ValueError("--high-noise-fraction must lie in [0, 1] and --high-noise-from in [0, 999]")
    if cfg.resume and (Path(cfg.resume) / "model_index.json").is_file():
        if cfg.resume_step == 0:
            logger.warning(
                "resuming from the pipeline %s at step 0: the learning-rate schedule and the data stream start over "
                "(give --resume-step, the step the pipeline was saved at)",
                cfg.resume,
            )
        ckpt = checkpoint_from_pipeline(cfg.resume, cfg.resume_step)
    else:
        ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    mcfg = (
        toy_model.ToyModelConfig.from_dict(ckpt["model_config"])
        if ckpt
        else (toy_model.TINY if cfg.model == "tiny" else toy_model.DEFAULT)
    )
    if cfg.reinit_unet and ckpt is None:
        raise ValueError("--reinit-unet keeps the VAE and text encoders of a resumed model: give --resume too")
    if cfg.reinit_unet and cfg.grow_transformer_layers is not None:
        raise ValueError("--reinit-unet starts a new UNet; --grow-transformer-layers deepens the old one: pick one")
    if cfg.transformer_layers is not None:
        if ckpt is not None and not cfg.reinit_unet:
            raise ValueError(
                "--transformer-layers shapes a new UNet: start without --resume, or add --reinit-unet "
                "(to deepen a resumed UNet keeping its weights, use --grow-transformer-layers)"
            )
        layers = tuple(int(x) for x in cfg.transformer_layers)
        if len(layers) != 3 or min(layers) < 1:
            raise ValueError(f"--transformer-layers needs 3 levels of at least 1 block, got {layers}")
        mcfg = replace(mcfg, transformer_layers=layers)
    if cfg.grow_transformer_layers is not None:
        if ckpt is None:
            raise ValueError("--grow-transformer-layers deepens a resumed model: give --resume too")
        grown = tuple(int(x) for x in cfg.grow_transformer_layers)
        if len(grown) != 3 or any(g < o for g, o in zip(grown, mcfg.transformer_layers, strict=True)):
            raise ValueError(
                f"--grow-transformer-layers {grown} must keep 3 levels, each at least {mcfg.transformer_layers}"
            )
        mcfg = replace(mcfg, transformer_layers=grown)
    comps = toy_model.build_components(mcfg)
    vae, te1, te2, unet = comps["vae"], comps["text_encoder"], comps["text_encoder_2"], comps["unet"]
    tok = CaptionTokenizer(comps["tokenizer"])
    used = sorted({tok.bos, tok.eos, 0} | {i for w in _vocabulary() for i in tok._word(w)})
    start_step = 0
    prior_seconds = 0.0
    history: list[dict] = []
    if ckpt:
        vae.load_state_dict(ckpt["vae"])
        vae.register_to_config(scaling_factor=ckpt["scaling_factor"])
        te1.load_state_dict(ckpt["text_encoder"])
        te2.load_state_dict(ckpt["text_encoder_2"])
        if cfg.reinit_unet:
            log({"phase": "resume", "unet": "new", "transformer_layers": list(mcfg.transformer_layers)})
        elif cfg.grow_transformer_layers is None:
            unet.load_state_dict(ckpt["unet"])
        else:
            grown_keys = grow_unet(unet, ckpt["unet"])
            log({"phase": "resume", "grown_transformer_layers": list(mcfg.transformer_layers), "new": grown_keys})
        if not cfg.reinit_unet:
            start_step = ckpt["step"]
            prior_seconds = ckpt.get("seconds", 0.0)
            history = ckpt.get("history", [])
        log({"phase": "resume", "step": start_step, "from": str(cfg.resume)})
    else:
        _zero_unused_embeddings(te1, used)
        _zero_unused_embeddings(te2, used)
    for m in (vae, te1, te2, unet):
        m.to(device)
    run_t0 = time.time()
    if not ckpt:
        _train_vae(vae, cfg, mcfg, device, log)
        if world > 1:  # one VAE for every process (GPU kernels need not train identical copies)
            _broadcast_module(vae)
            sf_t = torch.tensor([float(vae.config.scaling_factor)], device=device)
            torch.distributed.broadcast(sf_t, 0)
            vae.register_to_config(scaling_factor=float(sf_t))
    vae.requires_grad_(False).eval()
    sf = float(vae.config.scaling_factor)

    params = [p for m in (unet, te1, te2) for p in m.parameters()]
    decay = [p for p in params if p.ndim >= 2 and p.shape[0] != mcfg.vocab_size]
    no_decay = [p for p in params if not (p.ndim >= 2 and p.shape[0] != mcfg.vocab_size)]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.99),
        fused=fused,
    )
    ema = [p.detach().clone() for p in params]
    if cfg.resume_ema and (cfg.grow_transformer_layers is not None or cfg.reinit_unet):
        log({"phase": "resume", "ema": "fresh (the new UNet has no saved EMA)"})
    elif cfg.resume_ema:
        ema_src = _load_pipeline_weights(cfg.resume_ema, mcfg)
        ema = [t.to(device=device, dtype=torch.float32) for t in ema_src]
        log({"phase": "resume", "ema_from": cfg.resume_ema})
    if amp:
        unet.to(memory_format=torch.channels_last)

    def forward(zt, t, ids1, ids2, keep, time_ids, unet_call=unet):
        b = zt.shape[0]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            ehs, pooled = encode_text(te1, te2, ids1, ids2)
            ehs = ehs * keep.view(b, 1, 1)
            pooled = pooled * keep.view(b, 1)
            return unet_call(zt, t, ehs, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    fwd, render_fn = forward, None
    if cfg.compile != "none":
        mode = None if cfg.compile == "default" else cfg.compile
        fwd = torch.compile(forward, mode=mode, dynamic=False)
        render_fn = torch.compile(render_tensors, dynamic=False)

    def fallback_forward():  # the UNet alone compiled: what worked when text encoders or rendering did not
        unet_c = torch.compile(unet, mode=None if cfg.compile == "default" else cfg.compile, dynamic=False)
        return lambda *a: forward(*a, unet_call=unet_c)

    sched = toy_model.build_scheduler()
    abar = sched.alphas_cumprod.to(device=device, dtype=torch.float32)
    snr = abar / (1 - abar)
    weight = torch.clamp(snr, min=cfg.min_snr_floor, max=cfg.min_snr_gamma) / snr
    time_ids = torch.tensor(
        [[mcfg.image_size, mcfg.image_size, 0, 0, mcfg.image_size, mcfg.image_size]],
        device=device,
        dtype=torch.float32,
    )
    empty1 = torch.as_tensor(tok([""]), device=device)
    empty2 = torch.as_tensor(tok([""], pad_id=0), device=device)
    stream = SceneStream(
        cfg.batch_size,
        cfg.seed * 1000 + start_step + 7_777_777 * rank,
        cfg.attribute_drop,
        cfg.layout,
        cfg.data_workers,
    )
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + start_step + 104_729 * rank)
    if world > 1:
        log({"phase": "data_parallel", "processes": world, "global_batch": world * cfg.batch_size})
    unet.train()
    te1.train()
    te2.train()
    step = start_step
    t0 = time.time()
    losses: list[torch.Tensor] = []
    layout_losses: list[torch.Tensor] = []
    last_loss = float("nan")
    steps_this_run = 0
    timing_from = None
    stopping = False
    try:
        while step < cfg.steps and not stopping:
            if cfg.max_steps is not None and steps_this_run >= cfg.max_steps:
                break
            out_of_time = cfg.max_minutes is not None and time.time() - t0 > cfg.max_minutes * 60
            if out_of_time and world == 1:
                break
            batch, ids1, ids2 = stream.next()
            b = len(batch)
            ids1 = torch.as_tensor(ids1).to(device, non_blocking=True)
            ids2 = torch.as_tensor(ids2).to(device, non_blocking=True)
            u = torch.rand(b, device=device, generator=gen)
            drop_empty = (u < cfg.caption_dropout / 2)[:, None]
            keep = (u >= cfg.caption_dropout).float()
            ids1 = torch.where(drop_empty, empty1, ids1)
            ids2 = torch.where(drop_empty, empty2, ids2)
            attempts = 2 if (steps_this_run == 0 and cfg.compile != "none") else 1
            for attempt in range(attempts):
                try:
                    with torch.no_grad():
                        x, _ = render(batch, device, image_size=mcfg.image_size, render_fn=render_fn)
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                            z0 = vae.encode(x * 2 - 1).latent_dist.sample(generator=gen).float() * sf
                    t = torch.randint(0, abar.numel(), (b,), device=device, generator=gen)
                    if cfg.high_noise_fraction > 0:
                        high = torch.randint(cfg.high_noise_from, abar.numel(), (b,), device=device, generator=gen)
                        pick = torch.rand(b, device=device, generator=gen) < cfg.high_noise_fraction
                        t = torch.where(pick, high, t)
                    if batch.layout_field is not None:  # the layout was chosen from this noise's cell means
                        noise = noise_with_layout_field(batch.layout_field, z0.shape, gen, device)
                    else:
                        noise = torch.randn(z0.shape, device=device, generator=gen)
                    a = abar[t].view(b, 1, 1, 1)
                    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
                    if amp:
                        zt = zt.contiguous(memory_format=torch.channels_last)
                    lr = _lr_at(step, cfg, warmup_from=start_step if ckpt else 0)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    pred = fwd(zt, t, ids1, ids2, keep, time_ids.expand(b, -1))
                    per = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
                    loss = (per * weight[t]).mean()
                    if cfg.layout_loss_weight > 0:
                        lay = layout_loss(pred, noise, abar[t]).mean()
                        loss = loss + cfg.layout_loss_weight * lay
                        layout_losses.append(lay.detach())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    break
                except Exception as e:  # a compiler failure on the first step: fall back, do not lose the run
                    if attempt + 1 == attempts:
                        raise
                    log({"phase": "compile", "fallback": "unet only", "error": repr(e)[:400]})
                    opt.zero_grad(set_to_none=True)
                    fwd, render_fn = fallback_forward(), None
            if world > 1:  # the last step of a time-limited run is still taken by every process
                stopping = average_gradients(params, out_of_time, world)
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
            losses.append(per.mean().detach())
            step += 1
            steps_this_run += 1
            if steps_this_run == 20:
                if amp:
                    torch.cuda.synchronize()
                timing_from = (time.time(), steps_this_run)
            if step % cfg.log_every == 0 or step == cfg.steps:
                last_loss = float(torch.stack(losses).mean())
                losses.clear()
                rec = {"phase": "unet", "step": step, "loss": last_loss, "lr": lr, "elapsed": time.time() - t0}
                if layout_losses:
                    rec["layout_loss"] = float(torch.stack(layout_losses).mean())
                    layout_losses.clear()
                if timing_from:
                    rec["it_s"] = (steps_this_run - timing_from[1]) / max(time.time() - timing_from[0], 1e-9)
                log(rec)
                history.append({"step": step, "loss": last_loss})
    finally:
        stream.close()
    if losses:
        last_loss = float(torch.stack(losses).mean())
    if amp:
        torch.cuda.synchronize()
    train_seconds = time.time() - t0
    replica_diff = _replica_difference(params) if world > 1 else None
    if not main_process:
        return {"rank": rank, "step": step, "final_loss": last_loss, "replica_max_diff": replica_diff}
    its = None
    if timing_from and steps_this_run > timing_from[1]:
        its = (steps_this_run - timing_from[1]) / max(time.time() - timing_from[0], 1e-9)
    # checkpoint (raw fp32 weights) and the EMA pipeline (fp16)
    parts = {
        "model_config": mcfg.to_dict(),
        "train_config": asdict(cfg),
        "step": step,
        "seconds": prior_seconds + (time.time() - run_t0),
        "scaling_factor": sf,
        "history": history,
        "vae": {k: v.cpu() for k, v in vae.state_dict().items()},
        "text_encoder": {k: v.cpu() for k, v in te1.state_dict().items()},
        "text_encoder_2": {k: v.cpu() for k, v in te2.state_dict().items()},
        "unet": {k: v.cpu() for k, v in unet.state_dict().items()},
    }
    ckpt_files = _save_checkpoint(out / "checkpoint.pt.gz", parts, cfg.split_mb)
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    pipe = toy_model.build_pipeline({**comps, "vae": vae, "text_encoder": te1, "text_encoder_2": te2, "unet": unet})
    pipe_dir = out / "pipeline"
    if pipe_dir.exists():
        shutil.rmtree(pipe_dir)
    pipe.to(torch.float16)
    pipe.save_pretrained(pipe_dir, safe_serialization=True, max_shard_size=f"{int(cfg.max_shard_mb * 1000)}KB")
    pipe.to(torch.float32)
    finalize_pipeline_folder(pipe_dir)
    summary = {
        "device": torch.cuda.get_device_name(device) if amp else "cpu",
        "model_config": mcfg.to_dict(),
        "parameters": {
            k: toy_model.count_parameters(m)
            for k, m in (("vae", vae), ("text_encoder", te1), ("text_encoder_2", te2), ("unet", unet))
        },
        "step": step,
        "steps_this_run": steps_this_run,
        "train_seconds_this_run": train_seconds,
        "run_seconds_total": parts["seconds"],
        "it_per_s": its,
        "batch_size": cfg.batch_size,
        "processes": world,
        "replica_max_diff": replica_diff,
        "final_loss": last_loss,
        "scaling_factor": sf,
        "checkpoint": [p.name for p in ckpt_files],
        "pipeline_mb": sum(f.stat().st_size for f in pipe_dir.rglob("*") if f.is_file()) / 2**20,
    }
    if cfg.eval_prompts:
        from detailpp.toy.evaluate import evaluate_pipeline

        pipe.to(device)
        summary["eval"] = evaluate_pipeline(
            pipe,
            cfg.eval_prompts,
            steps=cfg.eval_steps,
            guidance_scale=cfg.eval_guidance,
            grid_path=out / "samples.png",
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    log({"phase": "done", "step": step, "final_loss": last_loss})
    log_f.close()
    return summary


def grow_unet(unet, state_dict: dict) -> int:
    """Load a shallower UNet's weights into ``unet``, whose attentions have more transformer blocks.

    Every weight of ``state_dict`` must fit; the blocks it lacks start as identities (their attention output
    projections and feed-forward output layer are zero, so each block adds nothing to its residual stream): the
    grown model computes exactly what the saved one did, and training then uses the new depth. Returns how many
    parameters were new.
    """
    missing, unexpected = unet.load_state_dict(state_dict, strict=False)
    if unexpected:
        raise ValueError(f"the checkpoint has weights the grown UNet lacks: {unexpected[:4]}")
    blocks = {k: re.match(r"(.+\.transformer_blocks\.\d+)\.", k) for k in missing}
    if not all(blocks.values()):
        raise ValueError(f"only transformer blocks can be new, not {[k for k, b in blocks.items() if not b][:4]}")
    new_blocks = {b.group(1) for b in blocks.values()}
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name in new_blocks:
            block = modules[name]
            for out in (block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[-1]):
                out.weight.zero_()
                out.bias.zero_()
    return len(missing)


def finalize_pipeline_folder(folder: str | Path) -> None:
    """Make a saved toy pipeline folder small and CPU-friendly.

    The tokenizers become the packaged vocab.json + merges.txt (1.5 MB instead of a 3.6 MB tokenizer.json each),
    and the text encoders' configs ask for float32 (transformers' default ``dtype="auto"`` would otherwise keep the
    stored fp16 weights, while diffusers loads its models in float32 on its own: a mixed pipeline fails on the CPU).
    ``torch_dtype=torch.float16`` at load time still gives an all-fp16 pipeline.
    """
    from detailpp.resources import CLIP_TOKENIZER_DIR

    folder = Path(folder)
    for name in ("tokenizer", "tokenizer_2"):
        d = folder / name
        for f in ("tokenizer.json", "special_tokens_map.json"):
            (d / f).unlink(missing_ok=True)
        for f in ("vocab.json", "merges.txt"):
            shutil.copyfile(CLIP_TOKENIZER_DIR / f, d / f)
        cfg_path = d / "tokenizer_config.json"
        tc = json.loads(cfg_path.read_text(encoding="utf-8"))
        for k in ("backend", "is_local", "local_files_only"):
            tc.pop(k, None)
        cfg_path.write_text(json.dumps(tc, indent=2) + "\n", encoding="utf-8")
    for name in ("text_encoder", "text_encoder_2"):
        cfg_path = folder / name / "config.json"
        c = json.loads(cfg_path.read_text(encoding="utf-8"))
        c["dtype"] = "float32"
        cfg_path.write_text(json.dumps(c, indent=2) + "\n", encoding="utf-8")


def _vocabulary() -> list[str]:
    from detailpp.toy.scenes import COLOUR_NAMES, SHAPES, TEMPLATES, TEXTURES

    words = {"a", "an", ","} | set(COLOUR_NAMES) | set(SHAPES) | set(TEXTURES)
    for ts in TEMPLATES.values():
        for t in ts:
            for w in t.replace(",", " ").split():
                if not w.startswith("{"):
                    words.add(w)
    return sorted(words)


def _load_pipeline_weights(folder: str, mcfg) -> list[torch.Tensor]:
    """Parameters of a saved pipeline's unet, text_encoder, text_encoder_2, in training order."""
    from safetensors.torch import load_file

    folder = Path(folder)
    comps = toy_model.build_components(mcfg)
    out = []
    for name in ("unet", "text_encoder", "text_encoder_2"):
        files = sorted((folder / name).glob("*.safetensors"))
        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
        mod = comps[name]
        mod.load_state_dict(sd, strict=False)
        out.extend(p.detach().float() for p in mod.parameters())
    return out


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
