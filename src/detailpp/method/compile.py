"""Regional ``torch.compile`` of the denoiser for Detail++: its repeated blocks, Detail++'s attention processors
included.

:func:`compile_detail` is diffusers' ``compile_repeated_blocks()`` (every block of the classes the model names in
``_repeated_blocks`` is compiled: a UNet's ``BasicTransformerBlock``; as they share one ``forward``, they share
dynamo's graphs) plus what Detail++ needs on top: dynamo's recompile limit raised so that every variant stays
compiled, and the compiled modules' names returned. Detail++'s processors (:mod:`detailpp.backbones`) are traced into
those graphs; they are written so that one graph serves every layer and every call:

- the mask layers of a processor group (a UNet's resolution level) share one processor instance, which keeps no
  per-layer state (no layer name or token lookup that dynamo would guard on);
- the processors read only tensors and values fixed for the whole denoiser call (share ranges, which capture is
  armed, the token count of each group); they count their calls in a tensor, not in Python ints;
- the capture's row selection and token weights are made once per call, before the denoiser runs (no ``.item()`` or
  ``.tolist()``, hence no graph break, inside a block).

A Detail++ call therefore compiles a handful of graphs in its first steps (the window's sharing and capture, the
steps after it, a nursing pass with gradients, and the plain layers at the other resolutions); a second call with the
same plan shape (number of branches) and configuration compiles nothing. Another plan shape or configuration adds a
graph or two. ``tests/pipelines/test_compile.py`` checks equality with eager, zero recompiles and zero graph breaks.

Nursing passes also replay as CUDA graphs (``DetailConfig.nursing_graphs``, :class:`detailpp.method.nursing.
GraphedGradient`), compiled or not: that switch is independent of compilation.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: classes compiled when the model names none (a UNet's in diffusers < 0.35; SD3's transformer names none)
DEFAULT_REPEATED_BLOCKS = ("BasicTransformerBlock", "JointTransformerBlock")


def recompile_limit_key() -> str:
    """The name of dynamo's per-function graph limit: ``recompile_limit`` (recent torch), else ``cache_size_limit``."""
    import torch._dynamo

    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def compile_detail(unet: torch.nn.Module, recompile_limit: int | None = 32, **compile_kwargs: Any) -> list[str]:
    """Compile the denoiser's repeated blocks in place: ``compile_repeated_blocks(**compile_kwargs)`` where the model
    names them (``_repeated_blocks``: a UNet's, FLUX's), else each block of :data:`DEFAULT_REPEATED_BLOCKS` with
    ``module.compile(**compile_kwargs)`` (SD3's joint blocks).

    Args:
        unet: the pipeline's denoiser (a UNet or a transformer).
        recompile_limit: raise dynamo's per-function cache (``torch._dynamo.config.recompile_limit``, 8 by default)
            to at least this many graphs, process-wide. All blocks share one function, so the graphs of every
            configuration used (plain SDXL, each Detail++ plan shape with and without nursing) count against one
            limit; past it, new variants silently run eager. ``None`` leaves the setting alone.
        compile_kwargs: passed to ``torch.compile`` (``mode``, ``backend``, ``fullgraph``, ``dynamic``...).

    Returns:
        The names of the compiled modules. :func:`uncompile` undoes it.
    """
    import torch._dynamo

    classes = tuple(getattr(unet, "_repeated_blocks", None) or DEFAULT_REPEATED_BLOCKS)
    names = [name for name, m in unet.named_modules() if m.__class__.__name__ in classes]
    if not names:
        raise ValueError(f"{type(unet).__name__} has no {' or '.join(classes)} module to compile.")
    if recompile_limit is not None:
        key = recompile_limit_key()
        if getattr(torch._dynamo.config, key) < recompile_limit:
            logger.info("torch._dynamo.config.%s raised to %d for Detail++'s block variants.", key, recompile_limit)
            setattr(torch._dynamo.config, key, recompile_limit)
    if getattr(unet, "_repeated_blocks", None) and hasattr(unet, "compile_repeated_blocks"):
        unet.compile_repeated_blocks(**compile_kwargs)
    else:
        for name in names:
            unet.get_submodule(name).compile(**compile_kwargs)
    logger.info("Compiled %d %s modules.", len(names), "/".join(classes))
    return names


def uncompile(unet: torch.nn.Module) -> None:
    """Undo :func:`compile_detail`: every module of ``unet`` runs eager again (dynamo's caches stay)."""
    for m in unet.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
