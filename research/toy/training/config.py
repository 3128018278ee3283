"""The settings of a training run (:class:`TrainConfig`; the command line maps onto its fields)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    text_encoders: str | None = None  # folder of frozen text_encoder/ + text_encoder_2/ (research.toy.clip.pretrain)
    reinit_unet: bool = False  # with --resume: keep its VAE and text encoders, start a new UNet from step 0
    max_shard_mb: float = 15.0  # largest safetensors file of the saved pipeline (bigger weights are sharded)
    compile: str = "none"  # "none", "default", "max-autotune-no-cudagraphs", "reduce-overhead"
    log_every: int = 100
    eval_prompts: int = 0  # held-out and seen prompts to sample and judge at the end (each)
    eval_steps: int = 30
    eval_guidance: float = 5.0
    split_mb: float = 0.0  # cut the checkpoint into parts of this many MB (0: one file)
