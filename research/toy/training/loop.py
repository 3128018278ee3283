"""The UNet phase's loop: noise, forward (optionally compiled, with a fallback), loss, the gradient step, EMA, logs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from research.toy import model as toy_model
from research.toy.scenes import noise_with_layout_field, render, render_tensors
from research.toy.training.config import TrainConfig
from research.toy.training.data import SceneStream
from research.toy.training.objectives import _lr_at, encode_text, layout_loss
from research.toy.training.parallel import average_gradients


@dataclass
class LoopResult:
    step: int  # the global step reached
    steps_this_run: int
    last_loss: float
    train_seconds: float
    it_per_s: float | None  # after the first 20 steps (compilation and warm-up left out)


def make_forward(cfg: TrainConfig, te1, te2, unet, device, amp: bool):
    """``(forward, render_fn, fallback)``: the text encoders and UNet as one function (compiled with
    ``--compile``, rendering too), and a maker of the fallback that compiles the UNet alone."""

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

    return fwd, render_fn, fallback_forward


def train_unet(cfg: TrainConfig, mcfg, model, vae, sf: float, opt, ema, device, rank: int, world: int, log):
    """Train the UNet and text encoders from ``model.start_step`` until ``--steps``, ``--max-steps`` or
    ``--max-minutes``; appends the logged losses to ``model.history``."""
    te1, te2, unet = model.comps["text_encoder"], model.comps["text_encoder_2"], model.comps["unet"]
    tok, start_step = model.tok, model.start_step
    params = model.parameters()
    amp = device.type == "cuda"
    if amp:
        unet.to(memory_format=torch.channels_last)
    fwd, render_fn, fallback_forward = make_forward(cfg, te1, te2, unet, device, amp)
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
    te1.train(not model.frozen_text)
    te2.train(not model.frozen_text)
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
                    lr = _lr_at(step, cfg, warmup_from=start_step)  # a fresh run starts at 0
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
            ema.step(params)
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
                model.history.append({"step": step, "loss": last_loss})
    finally:
        stream.close()
    if losses:
        last_loss = float(torch.stack(losses).mean())
    if amp:
        torch.cuda.synchronize()
    train_seconds = time.time() - t0
    its = None
    if timing_from and steps_this_run > timing_from[1]:
        its = (steps_this_run - timing_from[1]) / max(time.time() - timing_from[0], 1e-9)
    return LoopResult(step, steps_this_run, last_loss, train_seconds, its)
