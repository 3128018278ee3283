"""The flags several sub-commands share, each defined once: ``--model``, ``--device`` and ``--dtype``, the image size,
``--compile``, the planner's (``--planner``, ``--llm-*``). A sub-command says only what differs for it (the default
model, what the size's default is)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from detailpp.cli.common import DTYPE_NAMES, dtype_name
from detailpp.models.families import builtin_models_help


def add_model_flag(p: argparse.ArgumentParser, default: str | None, default_text: str) -> None:
    """``--model``: a Hub id, a local folder or single file, or a built-in model (every one of them listed); and
    ``--config``, a single file's configuration."""
    p.add_argument(
        "--model",
        default=default,
        metavar="ID|PATH|NAME",
        help="a Hub id or local diffusers folder (SDXL or SD 1.x/2.x, told apart by its model_index.json), a "
        ".safetensors single file in the original layout (SDXL, SD 1.x or 2.x, told apart by its keys; loaded "
        f"offline), or a built-in model: {builtin_models_help()} (default: {default_text})",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="DIR|ID",
        help="with a .safetensors --model: the diffusers folder or Hub id whose configuration it is loaded with "
        "(default: the package's SDXL base, SD 1.5 or SD 2.1 configuration, by the file's family)",
    )


def add_device_flags(p: argparse.ArgumentParser, device_default: str = "the best available") -> None:
    """``--device`` and ``--dtype`` (with the aliases fp16, half, bf16, fp32)."""
    p.add_argument("--device", default=None, help=f"cpu, cuda, cuda:1, mps (default: {device_default})")
    p.add_argument(
        "--dtype",
        type=dtype_name,
        choices=DTYPE_NAMES,
        default=None,
        help="float16 (fp16, half), bfloat16 (bf16) or float32 (fp32) (default: float16 on CUDA, float32 elsewhere; "
        "float16 on the CPU falls back to float32)",
    )


def add_size_flags(p: argparse.ArgumentParser, what: str = "pixels, a multiple of 8") -> None:
    """``--height`` and ``--width`` (default: the model's native size)."""
    p.add_argument("--height", type=int, default=None, help=f"{what} (default: the model's size)")
    p.add_argument("--width", type=int, default=None, help=f"{what} (default: the model's size)")


def add_compile_flag(p: argparse.ArgumentParser, note: str = "") -> None:
    """``--compile``: regional ``torch.compile`` of the denoiser's repeated blocks."""
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the denoiser's repeated blocks (pipe.compile_detail()): the first image compiles, the "
        f"later ones run faster on a GPU (BENCHMARKS.md has the measured figures); not useful on the CPU{note}",
    )


def add_planner_flags(p: argparse.ArgumentParser, cache_flag: bool = False, cache_note: str = "") -> None:
    """``--planner spacy|llm`` and the LLM planner's server: ``--llm-base-url``, ``--llm-model``, ``--llm-timeout``
    (and ``--llm-cache`` where the command has no folder of its own for the plan cache)."""
    from detailpp.parsing.planner import PLANNERS

    g = p.add_argument_group("planner (prompt decomposition; docs/decomposition.md)")
    g.add_argument(
        "--planner",
        choices=PLANNERS,
        default="spacy",
        help="who splits the prompt into sub-prompts: the spaCy grammar (default) or a language model behind an "
        "OpenAI-compatible server (ChatGPT, Ollama, vLLM, llama.cpp, LM Studio; needs pip install 'detailpp[llm]'), "
        "whose plan is checked by the same rules and falls back to spaCy's with a notice" + cache_note,
    )
    g.add_argument(
        "--llm-base-url",
        metavar="URL",
        default=None,
        help="the server's API root, e.g. http://127.0.0.1:11434/v1 for Ollama (default: OPENAI_BASE_URL, else "
        "OpenAI's); the key is read from OPENAI_API_KEY (a local server needs none)",
    )
    g.add_argument("--llm-model", metavar="NAME", default=None, help="the server's model, e.g. gpt-4o-mini, llama3.1")
    g.add_argument(
        "--llm-timeout", type=float, default=60.0, metavar="SECONDS", help="seconds one request may take (default 60)"
    )
    if cache_flag:
        g.add_argument(
            "--llm-cache",
            type=Path,
            default=None,
            metavar="FILE.jsonl",
            help="keep the model's plans in this file and read them back on the next run (default: no file)",
        )


def planner_from_args(args: argparse.Namespace, cache: Path | None = None) -> Any:
    """The planner the flags ask for: a :class:`~detailpp.parsing.planner.SpacyPlanner`, or an
    :class:`~detailpp.parsing.llm.LLMPlanner` keeping its plans in ``cache`` (else ``--llm-cache``, where given).

    Raises:
        UserError: an LLM flag without ``--planner llm``; LLMError: a setting the LLM planner cannot use.
    """
    from detailpp.cli import UserError
    from detailpp.parsing.planner import SpacyPlanner

    if args.planner != "llm":
        given = [f for f, v in (("--llm-model", args.llm_model), ("--llm-base-url", args.llm_base_url)) if v]
        if given:
            raise UserError(f"{' and '.join(given)} choose the language model of --planner llm; add --planner llm.")
        return SpacyPlanner()
    from detailpp.parsing.llm import LLMPlanner

    if not getattr(args, "verbose", False):  # the HTTP client logs every request at INFO level
        for name in ("httpx", "httpx2", "openai"):
            logging.getLogger(name).setLevel(logging.WARNING)
    cache = cache if cache is not None else getattr(args, "llm_cache", None)
    return LLMPlanner(args.llm_model or "", args.llm_base_url, timeout=args.llm_timeout, cache=cache)
