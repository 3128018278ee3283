"""Start the browser demo (Gradio): edit the plan, see every branch, each subject's mask and plain SDXL side by side.

The page is served on http://127.0.0.1:7860 by default: only this machine can open it. It runs offline (no share
link, no analytics) and makes one image at a time; requests from other tabs wait in a queue.

Examples:
  detailpp demo
  detailpp demo --model stabilityai/stable-diffusion-xl-base-1.0 --device cuda --dtype float16
  detailpp demo --controlnet diffusers/controlnet-canny-sdxl-1.0   # the page takes a control image
  detailpp demo --host 0.0.0.0 --port 8080     # reachable from the network: anyone who can reach it can use it
  detailpp demo --planner llm --llm-base-url http://127.0.0.1:11434/v1 --llm-model llama3.1   # Ollama parses
"""

from __future__ import annotations

import argparse
import logging
import socket

from detailpp.cli import UserError, add_deprecated_alias
from detailpp.cli.common import (
    BUILTIN_SIZES,
    check_controlnet_source,
    check_device,
    check_dtype,
    check_family_flags,
    check_model,
    check_size,
)
from detailpp.cli.flags import add_device_flags, add_model_flag, add_planner_flags, add_size_flags, planner_from_args
from detailpp.errors import operation

logger = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flag(p, None, "the embedded toy model, else tiny-random")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    add_device_flags(p)
    p.add_argument(
        "--steps", type=int, default=None, help="the page's initial steps (default: 50, 30 on embedded models)"
    )
    add_size_flags(p, "the page's initial value in pixels")
    p.add_argument(
        "--controlnet",
        default=None,
        metavar="ID|PATH",
        help="an SDXL ControlNet (Hub id or folder; tiny-random with --model tiny-random): the page then takes a "
        "control image (default: none)",
    )
    add_planner_flags(p, cache_note="; with llm the page offers both, and a Planner choice")
    add_deprecated_alias(p, "--size", "--width and --height", dest="size", type=int)


def check_port(host: str, port: int) -> None:
    """Fail before the (slow) model load when ``host:port`` cannot be listened on."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise UserError(f"Cannot resolve the host {host!r} ({e}); give an address such as 127.0.0.1.") from e
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.bind(address)
    except OSError as e:
        raise UserError(
            f"Cannot listen on {host}:{port} ({e.strerror or e}); the port may be in use: choose another with --port."
        ) from e


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must lie in [0, 65535], got {args.port}.")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}.")
    size = getattr(args, "size", None)  # the deprecated --size: both
    args.width = args.width if args.width is not None else size
    args.height = args.height if args.height is not None else size
    for name in ("width", "height"):
        check_size(name, getattr(args, name))
    device = check_device(args.device)
    dtype = check_dtype(args.dtype, device)
    if args.controlnet is not None:
        check_controlnet_source(args.controlnet)
    check_port(args.host, args.port)
    planner = planner_from_args(args)
    planner.check()  # the language model server is reachable and takes the key, before the model loads
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        raise UserError(f"The demo needs Gradio ({e}); install it with: pip install 'detailpp[demo]'.") from e

    from detailpp.cli.generate import default_model
    from detailpp.demo import build_demo, launch
    from detailpp.models.loading import load_pipeline

    model = args.model or default_model()
    family = check_model(model, args.config)
    check_family_flags(family, args.height, args.width, controlnet=args.controlnet is not None)
    if model in BUILTIN_SIZES:  # the page opens at a built-in's native size
        args.width, args.height = args.width or BUILTIN_SIZES[model], args.height or BUILTIN_SIZES[model]
    if model.startswith("tiny-random"):
        logger.warning("Model %r has random weights: its images are noise (it checks the set-up only).", model)
    if args.host not in LOCAL_HOSTS:
        logger.warning("Listening on %s: anyone who can reach this address can use the demo and its GPU.", args.host)
    with operation(f"loading the model {model!r}"):
        pipe = load_pipeline(model, device=device, dtype=dtype, config=args.config)
    if args.controlnet is not None:
        from detailpp.pipelines.sdxl_controlnet import with_controlnets

        pipe = with_controlnets(pipe, [args.controlnet])
    pipe.set_progress_bar_config(disable=True)
    demo = build_demo(
        pipe,
        model_name=model,
        default_steps=args.steps,
        default_width=args.width,
        default_height=args.height,
        controlnet=args.controlnet is not None,
        planner=planner,
    )
    logger.info("Starting the demo on http://%s:%d (Ctrl+C stops it)", args.host, args.port)
    launch(demo, host=args.host, port=args.port)
    return 0
