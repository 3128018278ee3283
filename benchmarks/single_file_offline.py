"""A full-size SDXL single file in the original Stability layout, loaded offline with no ``--config``: the package's
bundled SDXL base configuration is all it needs.

1. Builds SDXL base 1.0 at full size with *random* weights (:mod:`detailpp.models.sdxl_random`'s configurations, the
   same shapes as the trained model; nothing is downloaded), module by module in ``--dtype`` (float16: 7 GB).
2. Writes it as one ``.safetensors`` in the original layout (``model.diffusion_model.*``, ``first_stage_model.*``,
   ``conditioner.embedders.*``: :mod:`detailpp.models.original_layout`) and records a SHA-256 of every tensor.
3. In a fresh process with ``HF_HUB_OFFLINE=1``: ``load_pipeline(FILE)`` (what ``detailpp generate --model FILE``
   does), the family told from the file's keys; then every weight of the loaded pipeline, written back in the
   original layout, must hash as recorded (bit-for-bit equality, 2,567,463,684 + 83,653,863 + 123,060,480 +
   694,659,840 parameters), and with ``--generate`` one 64x64 step runs and must give finite latents.

Results (timings, peak memory, the check) are printed as JSON and written to ``--out`` (default
``benchmarks/results/single_file_offline.json``). ``--tiny`` runs the same path on the tiny random SDXL, with
``--config`` (the tiny weights do not fit the full-size layout): the test keeps the script from rotting.

    python benchmarks/single_file_offline.py --work /tmp/sf             # about 8 GB of disk, 16 GB of memory
    python benchmarks/single_file_offline.py --tiny --work /tmp/sf-tiny --out /tmp/sf-tiny/result.json
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def peak_rss_gib() -> float:
    """This process's peak resident memory (Linux: ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()


def full_size_components(dtype: torch.dtype) -> dict[str, Any]:
    """SDXL base's four weighted modules, built one at a time in ``dtype`` (the default dtype while each is made, so
    the UNet never exists in float32), with a fixed seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from detailpp.models import sdxl_random as configs

    builders = {
        "unet": lambda: UNet2DConditionModel(**configs.SDXL_UNET_CONFIG),
        "vae": lambda: AutoencoderKL(**configs.SDXL_VAE_CONFIG),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**configs.SDXL_TEXT_ENCODER_CONFIG)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**configs.SDXL_TEXT_ENCODER_2_CONFIG)),
    }
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    modules = {}
    try:
        torch.set_default_dtype(dtype)
        for name, build in builders.items():
            modules[name] = build().to(dtype).eval()
    finally:
        torch.set_default_dtype(previous)
    return modules


class Modules:
    """Just what :func:`detailpp.models.original_layout.original_state_dict` reads of a pipeline."""

    def __init__(self, modules: dict[str, Any]):
        self.__dict__.update(modules)


def write(work: Path, tiny: bool, dtype: torch.dtype) -> dict[str, Any]:
    """Build, write the single file (and, with ``tiny``, its diffusers folder); the digest of every tensor."""
    from detailpp.models.original_layout import original_state_dict, save_original

    t0 = time.perf_counter()
    if tiny:
        from detailpp.models.original_layout import tiny_sdxl_pipeline

        pipe = tiny_sdxl_pipeline().to(dtype=dtype)
        pipe.save_pretrained(work / "config")
        modules = Modules({n: getattr(pipe, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")})
    else:
        modules = Modules(full_size_components(dtype))
    built = time.perf_counter()
    file = save_original(modules, work / "sdxl-random.safetensors")
    written = time.perf_counter()
    digests = {k: tensor_digest(v) for k, v in original_state_dict(modules).items()}
    parameters = sum(p.numel() for m in modules.__dict__.values() for p in m.parameters())
    return {
        "file": str(file),
        "file_gib": round(file.stat().st_size / 2**30, 3),
        "tensors": len(digests),
        "parameters": parameters,
        "build_s": round(built - t0, 1),
        "write_s": round(written - built, 1),
        "writer_peak_rss_gib": peak_rss_gib(),
        "digests": digests,
    }


def load_and_check(file: str, digests_file: str, config: str | None, dtype: str, generate: bool) -> dict[str, Any]:
    """(The offline child process.) Load the file as ``detailpp generate --model FILE`` does; compare every weight."""
    from detailpp.models.loading import load_pipeline
    from detailpp.models.original_layout import original_state_dict
    from detailpp.models.single_file import read_kind

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    t0 = time.perf_counter()
    pipe = load_pipeline(file, device="cpu", dtype=dtype, config=config)
    loaded = time.perf_counter()
    expected = json.loads(Path(digests_file).read_text())
    state = original_state_dict(pipe)
    different = sorted(k for k, v in state.items() if expected.get(k) != tensor_digest(v))
    missing = sorted(set(expected) - set(state))
    out = {
        "kind": read_kind(file).label,
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "load_s": round(loaded - t0, 1),
        "compare_s": round(time.perf_counter() - loaded, 1),
        "tensors_compared": len(state),
        "tensors_different": different[:10],
        "tensors_missing": missing[:10],
        "equal": not different and not missing,
        "loader_peak_rss_gib": peak_rss_gib(),
    }
    if generate:
        t1 = time.perf_counter()
        plan = {"prompt": "a red dog and a blue cat", "base": "a dog and a cat", "branches": []}
        latents = pipe(
            plan=plan, num_inference_steps=1, height=64, width=64, output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip
        out |= {"generate_s": round(time.perf_counter() - t1, 1), "finite": bool(torch.isfinite(latents).all())}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the single file (8 GB at full size)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "single_file_offline.json")
    parser.add_argument("--dtype", choices=DTYPES, default="float16")
    parser.add_argument("--tiny", action="store_true", help="the tiny random SDXL (with --config): seconds")
    parser.add_argument("--generate", action="store_true", help="also one 64x64 denoising step on the loaded model")
    parser.add_argument("--keep", action="store_true", help="keep the single file")
    parser.add_argument("--child", nargs=2, metavar=("FILE", "DIGESTS"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = load_and_check(*args.child, args.config, args.dtype, args.generate)
        print(json.dumps(result))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    written = write(args.work, args.tiny, DTYPES[args.dtype])
    digests = args.work / "digests.json"
    digests.write_text(json.dumps(written.pop("digests")))
    gc.collect()
    child = [sys.executable, __file__, "--work", str(args.work), "--dtype", args.dtype, "--child", written["file"]]
    child += [str(digests)] + (["--config", str(args.work / "config")] if args.tiny else [])
    child += ["--generate"] if args.generate else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(child, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {
        "what": "full-size SDXL base (random weights), original-layout single file, loaded offline without --config"
        if not args.tiny
        else "tiny random SDXL, original-layout single file, loaded offline with --config",
        "dtype": args.dtype,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "versions": versions(),
        **written,
        **loaded,
    }
    if not args.keep:
        Path(written["file"]).unlink()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if result["equal"] and result.get("finite", True) else 1


def versions() -> dict[str, str]:
    import diffusers
    import safetensors
    import transformers

    import detailpp

    return {
        "detailpp": detailpp.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
