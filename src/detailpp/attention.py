"""Attention processors: shared self-attention (paper, section 3.2) and subject cross-attention capture (eq. 3).

Only the lowest-resolution attention layers get a Detail++ processor (32x32 tokens at 1024x1024 in SDXL:
``down_blocks.2``, ``mid_block``, ``up_blocks.0``); they are found from the UNet's structure and the latent size of
the call, and every processor checks at run time that it meets the token count it was chosen for. Every other
layer keeps the processor it had (LoRA, IP-Adapter, ...), and :func:`detail_processors` restores the replaced ones
on exit, also after an exception. The layers of a resolution level share one processor instance, which keeps no
per-layer state and reads only tensors and per-call values from :class:`AttentionState`: compiled transformer blocks
(:mod:`detailpp.compile`) then need no per-layer graph, no recompile between calls and no graph break.

Sharing. Branch b's shared self-attention is ``softmax(Q0 K0^T / sqrt(d)) V_b`` (branch 0's map, its own values).
That is exactly ``SDPA(Q0, K0, V_b)``: we copy branch 0's queries and keys into the other rows of the shared CFG
half and call ``F.scaled_dot_product_attention``, so no map is ever materialised and flash/efficient kernels stay on.
:class:`DetailAttnProcessor` with ``reference=True`` materialises ``softmax(QK^T/sqrt(d))`` and multiplies by V
instead (what the authors' code does in every layer); tests use it as the reference, benchmarks as the baseline.

Capture. Cross-attention probabilities are computed only for the rows and subject tokens that a mask needs: a
``(rows x heads x tokens x 77)`` softmax next to SDPA (77 keys make this cheap), averaged over heads and the
subject's tokens, summed over layers in :class:`AttentionState`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from detailpp.errors import DetailError

logger = logging.getLogger(__name__)


class HookError(DetailError, RuntimeError):
    """A Detail++ attention hook did not fire as expected: results would silently be plain SDXL."""


@dataclass(frozen=True)
class MaskLayers:
    """The lowest-resolution attention layers of a UNet, and the block after which none of them runs."""

    self_attention: tuple[str, ...]
    cross_attention: tuple[str, ...]
    level: int  # number of 2x downsamplings above the latent
    last_block: str  # e.g. "up_blocks.0": the nursing pass can stop after it
    #: the self-attention layers that share branch 0's queries and keys (default: ``self_attention``), and the
    #: resolution level of each
    shared_self_attention: tuple[str, ...] = ()
    levels: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.shared_self_attention:
            object.__setattr__(self, "shared_self_attention", self.self_attention)

    def token_grid(self, latent_height: int, latent_width: int, level: int | None = None) -> tuple[int, int]:
        """Token grid of the layers at ``level`` (default: the mask layers') for a latent of this size."""
        h, w = latent_height, latent_width
        for _ in range(self.level if level is None else level):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def expected_tokens(self, latent_height: int, latent_width: int) -> dict[str, int]:
        """Token count every Detail++ self-attention layer must meet in a call with this latent size."""
        out = {}
        for name in self.shared_self_attention:
            h, w = self.token_grid(latent_height, latent_width, self.levels.get(name, self.level))
            out[name] = h * w
        return out


def _block_levels(unet: torch.nn.Module) -> dict[str, int]:
    """Resolution level (downsamplings so far) of every down, mid and up block of a UNet2DConditionModel."""
    levels: dict[str, int] = {}
    level = 0
    for i, block in enumerate(unet.down_blocks):
        levels[f"down_blocks.{i}"] = level
        if getattr(block, "downsamplers", None) is not None:
            level += 1
    levels["mid_block"] = level
    for i, block in enumerate(unet.up_blocks):
        levels[f"up_blocks.{i}"] = level
        if getattr(block, "upsamplers", None) is not None:
            level -= 1
    return levels


def _block_of(module_name: str) -> str:
    return "mid_block" if module_name.startswith("mid_block") else ".".join(module_name.split(".")[:2])


def find_mask_layers(unet: torch.nn.Module, share: str = "lowest") -> MaskLayers:
    """The Detail++ attention layers of a UNet: the lowest resolution level at which both the down path and the up
    path have attention layers, by module name (plus the mid block's layers when the mid block sits at that level).

    SDXL's lowest attention level holds ``down_blocks.2``, ``mid_block`` and ``up_blocks.0`` (32x32 tokens at
    1024x1024). Stable Diffusion 1.x/2.x downsample once more: their mid block alone sits at 8x8 (at 512x512; one
    self- and one cross-attention layer), below the down and up paths' lowest attention level, 16x16
    (``down_blocks.2``, ``up_blocks.1``), which is the one taken (the mid block is not). A UNet whose down or up path
    has no attention layer at all falls back to the layers with the fewest tokens.

    ``share="lowest"`` shares self-attention in those layers only (the paper); ``"all"`` in every self-attention
    layer of the down, mid and up blocks.
    """
    if share not in ("lowest", "all"):
        raise ValueError(f"share must be 'lowest' or 'all', got {share!r}.")
    levels = _block_levels(unet)
    found: list[tuple[int, str, bool]] = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            block = _block_of(name)
            if block in levels:
                found.append((levels[block], name, module.is_cross_attention))
    if not found:
        raise ValueError("The UNet has no attention layers in its down/mid/up blocks; Detail++ needs them.")
    down = {lv for lv, n, _ in found if n.startswith("down_blocks.")}
    up = {lv for lv, n, _ in found if n.startswith("up_blocks.")}
    level = max(down & up) if down & up else max(lv for lv, _, _ in found)
    chosen = [(n, cross) for lv, n, cross in found if lv == level]
    order = list(levels)
    last_block = max({_block_of(n) for n, _ in chosen}, key=order.index)
    self_names = tuple(n for n, cross in chosen if not cross)
    shared = self_names if share == "lowest" else tuple(n for _, n, cross in found if not cross)
    return MaskLayers(
        self_attention=self_names,
        cross_attention=tuple(n for n, cross in chosen if cross),
        level=level,
        last_block=last_block,
        shared_self_attention=shared,
        levels={n: lv for lv, n, _ in found},
    )


@dataclass
class CaptureSpec:
    """Which cross-attention maps to collect in one UNet call.

    ``rows[s]`` is the batch row whose attention gives subject ``s``'s map, ``tokens[s]`` the subject's token
    positions. ``full=True`` (nursing) also keeps the whole head-averaged distribution over the 77 tokens of the
    first row, with gradients.
    """

    rows: Sequence[int]
    tokens: Sequence[Sequence[int]]
    full: bool = False


class AttentionState:
    """What the Detail++ processors should do in the current UNet call, and what they captured.

    Everything a processor reads from here is either a tensor or a plain value fixed for the whole UNet call and the
    same in every layer (the share ranges, which captures are armed, each resolution level's token count), so that a
    compiled transformer block (:func:`detailpp.compile.compile_detail`) needs no per-layer graph and no recompile
    from one call to the next. :meth:`begin` prepares the capture's row selection and token weights as tensors on
    the UNet's device before the call; the processors count their calls in a tensor that :meth:`end` reads once.
    """

    def __init__(self, layers: MaskLayers, grid: tuple[int, int], expected_tokens: dict[str, int] | None = None):
        self.layers = layers
        self.grid = grid
        self.num_tokens = grid[0] * grid[1]
        #: token count the shared self-attention layers of each resolution level must meet (from ``expected_tokens``,
        #: per layer name; a level not in it: ``num_tokens``)
        self.level_tokens = {layers.levels.get(n, layers.level): t for n, t in (expected_tokens or {}).items()}
        #: attention module -> its name, read for error messages only
        self.layer_names: dict[torch.nn.Module, str] = {}
        self.share: tuple[tuple[int, int], ...] = ()
        self.capture: CaptureSpec | None = None
        self._prepared: tuple | None = None  # (spec, device, keys, rows, subject rows, weights), see _prepare
        self._rows: tuple[int, int] | torch.Tensor | None = None  # capture rows: a (start, stop) range or an index
        self._subject_rows: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None
        self._counts = torch.zeros(2, dtype=torch.int64)  # calls of [shared self-attention, capture] layers
        self._read: tuple[int, int] | None = None  # ``_counts`` as :meth:`end` read it (fixed until :meth:`begin`)
        self._device = torch.device("cpu")  # where the capture's tensors are
        self._num_keys = 77
        self.maps: torch.Tensor | None = None  # (subjects, tokens) summed over layers, fp32
        self.full_probs: torch.Tensor | None = None  # (tokens, keys) summed over layers, fp32

    def begin(
        self,
        share: Sequence[tuple[int, int]] = (),
        capture: CaptureSpec | None = None,
        device: torch.device | str | None = None,
        num_keys: int = 77,
    ) -> None:
        """Arm the processors for one UNet call.

        Args:
            share: ``(start, end)`` row ranges whose first row's Q/K are used by every row of the range.
            capture: the cross-attention maps to collect.
            device: the device the UNet runs on (default: the CPU). Give it for a UNet on another device: the
                capture's tensors are then made there once, not moved inside the UNet call.
            num_keys: the text encoder's sequence length (keys of cross-attention).
        """
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type == "cuda" and device.index is None:  # the form tensors report, so that they compare equal
            device = torch.device("cuda", torch.cuda.current_device())
        self.share = tuple((int(start), int(end)) for start, end in share)
        self.capture = capture
        if self._counts.device != device:
            self._counts = torch.zeros(2, dtype=torch.int64, device=device)
        else:
            self._counts.zero_()
        self._read = None
        self.maps = self.full_probs = None
        self._device, self._num_keys = device, num_keys
        if capture is not None:
            if not capture.rows:
                raise ValueError("A capture needs at least one batch row.")
            self._rows, self._subject_rows, self._weights = self._prepare(capture, device, num_keys)
            if capture.tokens:
                self.maps = torch.zeros(len(capture.tokens), self.num_tokens, device=device)
            if capture.full:
                self.full_probs = torch.zeros(self.num_tokens, num_keys, device=device)

    def _prepare(self, spec: CaptureSpec, device: torch.device, keys: int) -> tuple:
        """Row selection, subject-to-row index and token weights of a capture, made once per spec and device.

        Built per layer they cost a host-to-device copy each (row lists, token lists, the weights), and the UNet call
        that runs them is bound by the CPU launching its kernels: 60 layers x 5 copies showed as 17% of a Detail++
        step on an H200. Contiguous rows (every capture the pipeline arms) are a slice: a view, no gather.
        """
        cache = self._prepared
        if cache is not None and cache[0] is spec and cache[1] == device and cache[2] == keys:
            return cache[3:]
        unique = sorted(set(spec.rows))
        rows: tuple[int, int] | torch.Tensor
        if unique == list(range(unique[0], unique[-1] + 1)):
            rows = (unique[0], unique[-1] + 1)
        else:
            rows = torch.tensor(unique, device=device)
        position = [unique.index(r) for r in spec.rows]
        subject_rows = None if position == list(range(len(unique))) else torch.tensor(position, device=device)
        weights = None
        if spec.tokens:
            weights = torch.zeros(len(spec.tokens), keys, dtype=torch.float32)
            for s, toks in enumerate(spec.tokens):
                weights[s, list(toks)] = 1.0 / len(toks)
            weights = weights.to(device)
        self._prepared = (spec, device, keys, rows, subject_rows, weights)
        return rows, subject_rows, weights

    def _calls(self) -> tuple[int, int]:
        """The call counter on the host: as :meth:`end` read it (no layer counts once disarmed), else read now (a
        device sync)."""
        if self._read is not None:
            return self._read
        self_calls, cross_calls = self._counts.tolist()
        return self_calls, cross_calls

    @property
    def self_calls(self) -> int:
        """Shared self-attention layers run since :meth:`begin`."""
        return self._calls()[0]

    @property
    def cross_calls(self) -> int:
        """Capturing cross-attention layers run since :meth:`begin`."""
        return self._calls()[1]

    def end(self, expect_self: bool = True, expect_cross: bool = True) -> None:
        """Disarm; raise :class:`HookError` when a layer that had work to do did not run.

        Reads the call counter once (one small device-to-host copy) when something was armed, and keeps it for
        :attr:`cross_calls` and the ``mean_*`` methods.
        """
        n_self, n_cross = len(self.layers.shared_self_attention), len(self.layers.cross_attention)
        check_self = expect_self and bool(self.share)
        check_cross = expect_cross and self.capture is not None
        self.share = ()
        self.capture = None
        if not (check_self or check_cross):
            return
        self._read = self._calls()
        self_calls, cross_calls = self._read
        if check_self and self_calls != n_self:
            raise HookError(
                f"Shared self-attention ran in {self_calls} of {n_self} layers in this step; another "
                "processor or a compiled UNet bypassed Detail++'s hooks."
            )
        if check_cross and cross_calls != n_cross:
            raise HookError(
                f"Cross-attention capture ran in {cross_calls} of {n_cross} layers in this step; another "
                "processor or a compiled UNet bypassed Detail++'s hooks."
            )

    def mean_maps(self) -> torch.Tensor:
        """Subject maps of this call, averaged over layers: (subjects, tokens), fp32."""
        calls = self.cross_calls if self.maps is not None else 0
        if calls == 0:
            raise HookError("No cross-attention map was captured in this step.")
        return self.maps / calls

    def mean_full_probs(self) -> torch.Tensor:
        calls = self.cross_calls if self.full_probs is not None else 0
        if calls == 0:
            raise HookError("No cross-attention distribution was captured for nursing.")
        return self.full_probs / calls

    def layer_name(self, attn: torch.nn.Module, default: str) -> str:
        return self.layer_names.get(attn, default)

    def count(self, cross: bool) -> None:
        """One more shared self-attention (``cross=False``) or capturing cross-attention layer ran: a tensor
        increment, so that a compiled block neither guards on nor specialises for the count."""
        i = int(cross)
        self._counts[i : i + 1].add_(1)

    def record(self, query: torch.Tensor, key: torch.Tensor, probs: torch.Tensor | None) -> None:
        """Accumulate the subject maps of one cross-attention layer (query/key: batch x heads x n x d).

        Reads only tensors and values fixed for the call: no ``.item()``/``.tolist()``, no per-layer state.
        """
        if self.capture is None:
            return
        self.count(cross=True)
        if query.device != self._device:  # armed without the UNet's device: move once, in the first layer
            self._device = query.device
            self._rows, self._subject_rows, self._weights = self._prepare(self.capture, query.device, self._num_keys)
            self.maps = None if self.maps is None else self.maps.to(query.device)
            self.full_probs = None if self.full_probs is None else self.full_probs.to(query.device)
        rows = self._rows
        select = slice(*rows) if isinstance(rows, tuple) else rows
        if probs is None:
            logits = query[select].float() @ key[select].float().transpose(-1, -2) * query.shape[-1] ** -0.5
            probs = logits.softmax(dim=-1)
        else:
            probs = probs[select].float()
        probs = probs.mean(dim=1)  # heads -> (unique rows, n, keys)
        if self.full_probs is not None:
            self.full_probs = self.full_probs + probs[0]
        if self.maps is not None:
            subject_rows = self._subject_rows
            per_subject = probs if subject_rows is None else probs[subject_rows]  # (subjects, n, 77)
            maps = torch.einsum("snt,st->sn", per_subject, self._weights)
            self.maps = self.maps + maps


class DetailAttnProcessor:
    """Attention processor of Detail++'s layers (``state`` given) or a plain reference layer (``state=None``).

    One instance serves every Detail++ layer of a resolution level (``level``; default the mask layers'): it shares
    self-attention as the state says in self-attention layers and captures in cross-attention layers (the role comes
    from the call: ``encoder_hidden_states`` or not). It keeps no per-layer state and reads only tensors and values
    fixed for the call, so regional compilation traces it once for all its layers (``name`` labels errors only).
    ``reference=True`` computes attention through the materialised map instead of
    ``F.scaled_dot_product_attention``, in the arithmetic of diffusers' ``AttnProcessor`` (and of the authors'
    processor), and shares self-attention by copying branch 0's map.
    """

    def __init__(
        self,
        name: str = "Detail++ attention layer",
        state: AttentionState | None = None,
        reference: bool = False,
        level: int | None = None,
    ):
        self.name = name
        self.state = state
        self.reference = reference
        self.level = level

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = encoder_hidden_states.shape if is_cross else hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            if not self.reference:
                attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        state = self.state
        share: tuple[tuple[int, int], ...] = ()
        if state is not None and not is_cross:
            level = state.layers.level if self.level is None else self.level
            expected = state.level_tokens.get(level, state.num_tokens)
            if query.shape[1] != expected:
                name = state.layer_name(attn, self.name)
                raise HookError(f"{name} met {query.shape[1]} tokens, expected {expected}.")
            if state.share:
                state.count(cross=False)
                share = state.share
            if share and not self.reference:
                for start, end in share:
                    # Rows start+1..end-1 take row `start`'s (branch 0's) queries and keys: SDPA(Q0, K0, V_b).
                    query[start + 1 : end] = query[start]
                    key[start + 1 : end] = key[start]
        if state is not None and is_cross and state.capture is not None and query.shape[1] != state.num_tokens:
            name = state.layer_name(attn, self.name)
            raise HookError(f"{name} met {query.shape[1]} tokens, expected {state.num_tokens} ({state.grid}).")

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        probs = None
        if self.reference:
            # As diffusers' AttnProcessor and the authors' processor compute it: heads folded into the batch,
            # baddbmm-scaled scores, softmax, bmm; a shared row takes row `start`'s map itself.
            flat = [t.reshape(batch_size * attn.heads, -1, head_dim) for t in (query, key, value)]
            probs = attn.get_attention_scores(flat[0], flat[1], attention_mask)
            per_row = probs.view(batch_size, attn.heads, *probs.shape[1:])
            for start, end in share:
                per_row[start + 1 : end] = per_row[start]
            hidden_states = torch.bmm(probs, flat[2]).view(batch_size, attn.heads, -1, head_dim)
            probs = per_row
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        if state is not None and is_cross:
            state.record(query, key, probs)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def detail_processors(
    unet: torch.nn.Module, state: AttentionState, reference: bool = False
) -> Iterator[dict[str, DetailAttnProcessor]]:
    """Install Detail++ processors on the mask layers (and, with ``reference``, plain reference processors on
    every other attention layer) for the duration of the block; restore exactly the replaced ones afterwards.

    The layers of one resolution level share one processor instance (one instance for all mask layers at
    ``share="lowest"``), and the other layers one reference instance: a compiled transformer block then finds the
    same processor state in every layer and in every call.
    """
    layers = state.layers
    mask_names = set(layers.shared_self_attention) | set(layers.cross_attention)
    modules = {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}
    targets = [n for n in modules if n in mask_names or reference]
    saved = {n: modules[n].processor for n in targets}
    per_level: dict[int, DetailAttnProcessor] = {}
    plain = DetailAttnProcessor("reference attention layer", None, reference=True) if reference else None
    installed: dict[str, DetailAttnProcessor] = {}
    for n in targets:
        if n in mask_names:
            level = layers.levels.get(n, layers.level)
            if level not in per_level:
                per_level[level] = DetailAttnProcessor(
                    f"a level-{level} Detail++ layer", state, reference=reference, level=level
                )
            installed[n] = per_level[level]
        else:
            installed[n] = plain
    state.layer_names = {modules[n]: n for n in targets if n in mask_names}
    try:
        for n, proc in installed.items():
            modules[n].set_processor(proc)
        yield installed
    finally:
        for n, proc in saved.items():
            modules[n].set_processor(proc)
        state.layer_names = {}
