"""Checkpoints (raw fp32 weights, to resume) and saved pipeline folders."""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import torch

from research.toy import model as toy_model

#: The components a checkpoint holds, in its order.
CHECKPOINT_PARTS = ("vae", "text_encoder", "text_encoder_2", "unet")


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


def save_run(out: Path, cfg, mcfg, model, step: int, sf: float, seconds: float, ema):
    """Write the checkpoint (raw fp32 weights, to resume) and the EMA weights as a pipeline folder (fp16);
    returns ``(checkpoint files, pipeline, its folder)``. The trained modules hold the EMA weights afterwards."""
    from dataclasses import asdict

    comps = model.comps
    parts = {
        "model_config": mcfg.to_dict(),
        "train_config": asdict(cfg),
        "step": step,
        "seconds": seconds,
        "scaling_factor": sf,
        "history": model.history,
        **{name: {k: v.cpu() for k, v in comps[name].state_dict().items()} for name in CHECKPOINT_PARTS},
    }
    ckpt_files = _save_checkpoint(out / "checkpoint.pt.gz", parts, cfg.split_mb)
    ema.copy_to(model.parameters())
    pipe = toy_model.build_pipeline(comps)
    pipe_dir = out / "pipeline"
    if pipe_dir.exists():
        shutil.rmtree(pipe_dir)
    pipe.to(torch.float16)
    pipe.save_pretrained(pipe_dir, safe_serialization=True, max_shard_size=f"{int(cfg.max_shard_mb * 1000)}KB")
    pipe.to(torch.float32)
    finalize_pipeline_folder(pipe_dir)
    return ckpt_files, pipe, pipe_dir
