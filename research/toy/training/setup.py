"""Building the model to train: the components, resumed or grown weights, the VAE phase, the optimiser and EMA."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from research.toy import model as toy_model
from research.toy.scenes import CaptionTokenizer, render, sample_scenes
from research.toy.training.checkpoint import _load_pipeline_weights, checkpoint_from_pipeline, load_checkpoint
from research.toy.training.config import TrainConfig
from research.toy.training.data import _vocabulary
from research.toy.training.parallel import _broadcast_module

logger = logging.getLogger(__name__)


def _zero_unused_embeddings(te, used: list[int]) -> None:
    emb = te.get_input_embeddings().weight
    keep = torch.zeros(emb.shape[0], dtype=torch.bool)
    keep[used] = True
    with torch.no_grad():
        emb[~keep] = 0


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


def check_config(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` for settings that do not go together (before anything is loaded)."""
    if not 0.0 <= cfg.min_snr_floor <= cfg.min_snr_gamma:
        raise ValueError(
            f"--min-snr-floor must lie in [0, --min-snr-gamma={cfg.min_snr_gamma}], got {cfg.min_snr_floor}"
        )
    if cfg.layout_loss_weight < 0:
        raise ValueError(f"--layout-loss-weight must be >= 0, got {cfg.layout_loss_weight}")
    if not 0.0 <= cfg.high_noise_fraction <= 1.0 or not 0 <= cfg.high_noise_from < 1000:
        raise ValueError("--high-noise-fraction must lie in [0, 1] and --high-noise-from in [0, 999]")


def starting_checkpoint(cfg: TrainConfig) -> dict | None:
    """What ``--resume`` names: a checkpoint file, or a saved pipeline folder (its EMA weights); ``None``: fresh."""
    if cfg.resume and (Path(cfg.resume) / "model_index.json").is_file():
        if cfg.resume_step == 0:
            logger.warning(
                "resuming from the pipeline %s at step 0: the learning-rate schedule and the data stream start over "
                "(give --resume-step, the step the pipeline was saved at)",
                cfg.resume,
            )
        return checkpoint_from_pipeline(cfg.resume, cfg.resume_step)
    return load_checkpoint(cfg.resume) if cfg.resume else None


def model_config(cfg: TrainConfig, ckpt: dict | None) -> toy_model.ToyModelConfig:
    """The sizes to train: the resumed model's, or ``--model``'s, with ``--transformer-layers`` or
    ``--grow-transformer-layers`` applied (checked against ``--resume`` and ``--reinit-unet``)."""
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
    if cfg.text_encoders:
        mcfg = _with_text_sizes(mcfg, cfg.text_encoders, resumed=ckpt is not None)
    if cfg.grow_transformer_layers is not None:
        if ckpt is None:
            raise ValueError("--grow-transformer-layers deepens a resumed model: give --resume too")
        grown = tuple(int(x) for x in cfg.grow_transformer_layers)
        if len(grown) != 3 or any(g < o for g, o in zip(grown, mcfg.transformer_layers, strict=True)):
            raise ValueError(
                f"--grow-transformer-layers {grown} must keep 3 levels, each at least {mcfg.transformer_layers}"
            )
        mcfg = replace(mcfg, transformer_layers=grown)
    return mcfg


def _with_text_sizes(mcfg, folder: str, resumed: bool):
    """``mcfg`` with the text sizes of the frozen encoders in ``folder`` (a resumed model must have them already)."""
    import json

    te1 = json.loads((Path(folder) / "text_encoder" / "config.json").read_text(encoding="utf-8"))
    te2 = json.loads((Path(folder) / "text_encoder_2" / "config.json").read_text(encoding="utf-8"))
    sizes = dict(
        text_hidden=te1["hidden_size"],
        text_layers=te1["num_hidden_layers"],
        text_heads=te1["num_attention_heads"],
        projection_dim=te2["projection_dim"],
        vocab_size=te1["vocab_size"],
    )
    if te2["hidden_size"] != te1["hidden_size"]:
        raise ValueError(f"--text-encoders {folder}: text_encoder and text_encoder_2 differ in hidden size")
    if resumed and any(getattr(mcfg, k) != v for k, v in sizes.items()):
        raise ValueError(f"--text-encoders {folder} has text sizes {sizes}, the resumed model others")
    return replace(mcfg, **sizes)


def load_frozen_text_encoders(comps: dict, folder: str) -> None:
    """Put the encoders saved in ``folder`` (``text_encoder/``, ``text_encoder_2/``) into ``comps``, frozen."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    te1 = CLIPTextModel.from_pretrained(Path(folder) / "text_encoder", dtype=torch.float32)
    te2 = CLIPTextModelWithProjection.from_pretrained(Path(folder) / "text_encoder_2", dtype=torch.float32)
    for te in (te1, te2):
        te.requires_grad_(False).eval()
    comps["text_encoder"], comps["text_encoder_2"] = te1, te2


@dataclass
class Model:
    """The components being trained and where the run goes on from."""

    comps: dict
    tok: CaptionTokenizer
    start_step: int = 0
    prior_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    frozen_text: bool = False  # the text encoders came from --text-encoders and are not trained

    @property
    def trained(self) -> list[torch.nn.Module]:
        """The modules the optimiser updates, in the order of :func:`trained_parameters`."""
        if self.frozen_text:
            return [self.comps["unet"]]
        return [self.comps["unet"], self.comps["text_encoder"], self.comps["text_encoder_2"]]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.trained for p in m.parameters()]


def build_model(cfg: TrainConfig, mcfg, ckpt: dict | None, log) -> Model:
    """Fresh components, with the resumed weights loaded (a new or grown UNet as asked); a fresh model's text
    encoders get zero embeddings for every token the world never uses. With ``--text-encoders`` the text encoders
    are that folder's, frozen (also on a resume: the checkpoint's copies are not used)."""
    comps = toy_model.build_components(mcfg)
    vae, te1, te2, unet = comps["vae"], comps["text_encoder"], comps["text_encoder_2"], comps["unet"]
    tok = CaptionTokenizer(comps["tokenizer"])
    model = Model(comps, tok, frozen_text=bool(cfg.text_encoders))
    if cfg.text_encoders:
        load_frozen_text_encoders(comps, cfg.text_encoders)
        log({"phase": "text_encoders", "frozen_from": str(cfg.text_encoders)})
    if not ckpt:
        if not cfg.text_encoders:
            used = sorted({tok.bos, tok.eos, 0} | {i for w in _vocabulary() for i in tok._word(w)})
            _zero_unused_embeddings(te1, used)
            _zero_unused_embeddings(te2, used)
        return model
    vae.load_state_dict(ckpt["vae"])
    vae.register_to_config(scaling_factor=ckpt["scaling_factor"])
    if not cfg.text_encoders and (ckpt.get("train_config") or {}).get("text_encoders"):
        logger.warning("the resumed run had frozen --text-encoders; without the option they are trained from here on")
    if not cfg.text_encoders:
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
        model.start_step = ckpt["step"]
        model.prior_seconds = ckpt.get("seconds", 0.0)
        model.history = ckpt.get("history", [])
    log({"phase": "resume", "step": model.start_step, "from": str(cfg.resume)})
    return model


def prepare_vae(vae, cfg: TrainConfig, mcfg, trained: bool, device, world: int, log) -> float:
    """Train the VAE unless it comes ``trained`` (one VAE for every process), freeze it; returns its scaling
    factor."""
    if not trained:
        _train_vae(vae, cfg, mcfg, device, log)
        if world > 1:  # one VAE for every process (GPU kernels need not train identical copies)
            _broadcast_module(vae)
            sf_t = torch.tensor([float(vae.config.scaling_factor)], device=device)
            torch.distributed.broadcast(sf_t, 0)
            vae.register_to_config(scaling_factor=float(sf_t))
    vae.requires_grad_(False).eval()
    return float(vae.config.scaling_factor)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, mcfg, device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and the token embeddings."""
    decay = [p for p in params if p.ndim >= 2 and p.shape[0] != mcfg.vocab_size]
    no_decay = [p for p in params if not (p.ndim >= 2 and p.shape[0] != mcfg.vocab_size)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.99),
        fused=device.type == "cuda",
    )


def make_ema(params: list[torch.nn.Parameter], cfg: TrainConfig, mcfg, start_step: int, device, log):
    """diffusers' :class:`~diffusers.training_utils.EMAModel` of ``params``: decay ``min(ema_decay, (1 + s) /
    (10 + s))`` at global step ``s`` (0 at a fresh run's first step), counted on from ``start_step``; its shadow
    weights are ``--resume-ema``'s pipeline weights when given (unless the UNet is new or grown)."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel(params, decay=cfg.ema_decay, foreach=True)
    ema.optimization_step = start_step
    if cfg.resume_ema and (cfg.grow_transformer_layers is not None or cfg.reinit_unet):
        log({"phase": "resume", "ema": "fresh (the new UNet has no saved EMA)"})
    elif cfg.resume_ema:
        with torch.no_grad():
            saved_params = _load_pipeline_weights(cfg.resume_ema, mcfg)
            if cfg.text_encoders:  # the UNet's come first; the frozen text encoders have no EMA
                saved_params = saved_params[: len(ema.shadow_params)]
            for shadow, saved in zip(ema.shadow_params, saved_params, strict=True):
                shadow.copy_(saved.to(device=device, dtype=torch.float32))
        log({"phase": "resume", "ema_from": cfg.resume_ema})
    return ema
