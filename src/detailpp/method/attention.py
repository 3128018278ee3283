"""Attention processors: shared self-attention (paper, section 3.2) and subject cross-attention capture (eq. 3).

Only the lowest-resolution attention layers get a Detail++ processor: the lowest resolution level at which both the
down and the up path have attention (:func:`find_mask_layers`; SDXL: ``down_blocks.2``, ``mid_block``, ``up_blocks.0``,
32x32 tokens at 1024x1024; SD 1.x/2.x: ``down_blocks.2``, ``up_blocks.1``, 16x16 at 512x512); they are found from the
UNet's structure and the latent size of the call, and every processor checks at run time that it meets the token count
it was chosen for. Every other layer keeps the processor it had (LoRA, IP-Adapter, ...), and :func:`detail_processors`
restores the replaced ones on exit, also after an exception. The layers of a resolution level share one processor
instance, which keeps no per-layer state and reads only tensors and per-call values from :class:`AttentionState`:
compiled transformer blocks (:mod:`detailpp.method.compile`) then need no per-layer graph, no recompile between calls
and no graph break.

Sharing. Branch b's shared self-attention is ``softmax(Q0 K0^T / sqrt(d)) V_b`` (branch 0's map, its own values).
That is exactly ``SDPA(Q0, K0, V_b)``: we copy branch 0's queries and keys into the other rows of the shared CFG
half and call ``F.scaled_dot_product_attention``, so no map is ever materialised and flash/efficient kernels stay on.
:class:`DetailAttnProcessor` with ``materialise=True`` materialises ``softmax(QK^T/sqrt(d))`` and multiplies by V
instead (what the authors' code does in every layer); tests use it as the formula's reference value, benchmarks as the
authors' cost.

Capture. Cross-attention probabilities are computed only for the rows and subject tokens that a mask needs: a
``(rows x heads x tokens x 77)`` softmax next to SDPA (77 keys make this cheap), averaged over heads and the
subject's tokens, summed over layers in :class:`AttentionState`.

IP-Adapter. A mask layer (or, with materialised attention, any layer) whose processor is diffusers' IP-Adapter
processor gets an :class:`IPAdapterDetailProcessor`: the level's shared :class:`DetailAttnProcessor` computes the text
attention (and captures from its 77 keys only), then adds ``scale * attention(Q, K_ip, V_ip)`` per adapter with the
replaced processor's own modules, which it holds (so they stay in the UNet's parameters) and which are restored on
exit. These wrappers are per layer (compiling a UNet with an IP-Adapter is not measured).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import (
    Attention,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)

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
    compiled transformer block (:func:`detailpp.method.compile.compile_detail`) needs no per-layer graph and no
    recompile from one call to the next. :meth:`begin` prepares the capture's row selection and token weights as
    tensors on the UNet's device before the call; the processors count their calls in a tensor that :meth:`end` reads
    once.
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
        that runs them is bound by the CPU launching its kernels (BENCHMARKS.md has the share of a step it took).
        Contiguous rows (every capture the pipeline arms) are a slice: a view, no gather.
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


@dataclass
class _Projected:
    """One attention call's inputs after the projections: what the processor's stages pass on."""

    query: torch.Tensor  # batch x tokens x inner (heads not split yet)
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    residual: torch.Tensor
    shape: tuple[int, ...] | None  # (batch, channels, height, width) of a 4-D input, else None
    batch_size: int
    is_cross: bool


class DetailAttnProcessor:
    """Attention processor of Detail++'s layers (``state`` given) or a plain materialising layer (``state=None``).

    One instance serves every Detail++ layer of a resolution level (``level``; default the mask layers'): it shares
    self-attention as the state says in self-attention layers and captures in cross-attention layers (the role comes
    from the call: ``encoder_hidden_states`` or not). It keeps no per-layer state and reads only tensors and values
    fixed for the call, so regional compilation traces it once for all its layers (``name`` labels errors only).
    ``materialise=True`` computes attention through the materialised map instead of
    ``F.scaled_dot_product_attention``, in the arithmetic of diffusers' ``AttnProcessor`` (and of the authors'
    processor), and shares self-attention by copying branch 0's map. A layer with an IP-Adapter gets an
    :class:`IPAdapterDetailProcessor` around this instance, which adds the image prompt's attention.
    """

    def __init__(
        self,
        name: str = "Detail++ attention layer",
        state: AttentionState | None = None,
        materialise: bool = False,
        level: int | None = None,
    ):
        self.name = name
        self.state = state
        self.materialise = materialise
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
        if isinstance(encoder_hidden_states, tuple):
            name = self.state.layer_name(attn, self.name) if self.state is not None else self.name
            raise HookError(
                f"{name} received IP-Adapter image tokens but replaced no IP-Adapter processor; load the adapter "
                "with pipe.load_ip_adapter(...) before the call, and let Detail++ install its processors after."
            )
        return self.attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def attend(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        image_prompt: tuple[torch.nn.Module, Sequence[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The layer's output; ``image_prompt`` = (an IP-Adapter processor, its image tokens per adapter) adds
        ``scale * attention(Q, K_ip, V_ip)`` per adapter to the text attention, as diffusers' IP-Adapter processors
        do. Maps are captured from the text attention only."""
        p = self._project(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        share = self._share(attn, p)
        head_dim = p.key.shape[-1] // attn.heads
        query, key, value = (self._split_heads(attn, t, p.batch_size, head_dim) for t in (p.query, p.key, p.value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states, probs = self._attention(attn, query, key, value, p.attention_mask, share)
        if self.state is not None and p.is_cross:
            self.state.record(query, key, probs)
        hidden_states = hidden_states.transpose(1, 2).reshape(p.batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if image_prompt is not None:
            hidden_states = self._add_image_prompt(attn, hidden_states, query, *image_prompt)
        return self._output(attn, hidden_states, p)

    def _project(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
    ) -> _Projected:
        """Norms, the attention mask in the shape the kernel wants, and the query, key and value projections."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape = None
        if hidden_states.ndim == 4:
            shape = tuple(hidden_states.shape)
            batch_size, channel, height, width = shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = encoder_hidden_states.shape if is_cross else hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            if not self.materialise:
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
        return _Projected(query, key, value, attention_mask, residual, shape, batch_size, is_cross)

    def _share(self, attn: Attention, p: _Projected) -> tuple[tuple[int, int], ...]:
        """Check the layer's token count; in a sharing self-attention layer copy branch 0's queries and keys into
        the other rows of each share range (SDPA) and return the ranges (a materialising processor copies the map
        instead)."""
        state = self.state
        if state is None:
            return ()
        tokens = p.query.shape[1]
        if p.is_cross:
            if state.capture is not None and tokens != state.num_tokens:
                name = state.layer_name(attn, self.name)
                raise HookError(f"{name} met {tokens} tokens, expected {state.num_tokens} ({state.grid}).")
            return ()
        level = state.layers.level if self.level is None else self.level
        expected = state.level_tokens.get(level, state.num_tokens)
        if tokens != expected:
            raise HookError(f"{state.layer_name(attn, self.name)} met {tokens} tokens, expected {expected}.")
        if not state.share:
            return ()
        state.count(cross=False)
        if not self.materialise:
            for start, end in state.share:
                # Rows start+1..end-1 take row `start`'s (branch 0's) queries and keys: SDPA(Q0, K0, V_b).
                p.query[start + 1 : end] = p.query[start]
                p.key[start + 1 : end] = p.key[start]
        return state.share

    @staticmethod
    def _split_heads(attn: Attention, t: torch.Tensor, batch_size: int, head_dim: int) -> torch.Tensor:
        return t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

    def _attention(
        self,
        attn: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        share: tuple[tuple[int, int], ...] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention (batch x heads x tokens x head_dim), and the map itself when it was materialised."""
        if not self.materialise:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
            return out, None
        # As diffusers' AttnProcessor and the authors' processor compute it: heads folded into the batch,
        # baddbmm-scaled scores, softmax, bmm; a shared row takes row `start`'s map itself.
        batch_size, heads, _, head_dim = query.shape
        flat = [t.reshape(batch_size * heads, -1, head_dim) for t in (query, key, value)]
        probs = attn.get_attention_scores(flat[0], flat[1], attention_mask)
        per_row = probs.view(batch_size, heads, *probs.shape[1:])
        for start, end in share:
            per_row[start + 1 : end] = per_row[start]
        return torch.bmm(probs, flat[2]).view(batch_size, heads, -1, head_dim), per_row

    def _add_image_prompt(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        ip_adapter: torch.nn.Module,
        image_tokens: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """``hidden + scale_i * attention(Q, to_k_ip_i(c_i), to_v_ip_i(c_i))`` for each adapter i, in the order and
        arithmetic of diffusers' IP-Adapter processors (an adapter at scale 0 is skipped, as there)."""
        batch_size, heads, _, head_dim = query.shape
        for tokens, scale, to_k_ip, to_v_ip in zip(
            image_tokens, ip_adapter.scale, ip_adapter.to_k_ip, ip_adapter.to_v_ip, strict=True
        ):
            if isinstance(scale, list):
                if all(s == 0 for s in scale):
                    continue
                raise HookError(
                    "Per-image IP-Adapter scales need `ip_adapter_masks`, which Detail++ does not support."
                )
            if scale == 0:
                continue
            ip_key = self._split_heads(attn, to_k_ip(tokens), batch_size, head_dim)
            ip_value = self._split_heads(attn, to_v_ip(tokens), batch_size, head_dim)
            image, _ = self._attention(attn, query, ip_key, ip_value, None)
            image = image.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)
            hidden_states = hidden_states + scale * image
        return hidden_states

    @staticmethod
    def _output(attn: Attention, hidden_states: torch.Tensor, p: _Projected) -> torch.Tensor:
        """The output projection, back to the input's layout, the residual and the output rescaling."""
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if p.shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(*p.shape)
        if attn.residual_connection:
            hidden_states = hidden_states + p.residual
        return hidden_states / attn.rescale_output_factor


#: diffusers' IP-Adapter processors: their ``to_k_ip``/``to_v_ip``/``scale``/``num_tokens`` hold the image prompt.
IP_ADAPTER_PROCESSORS = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor)


def is_ip_adapter_processor(processor: object) -> bool:
    """Whether ``processor`` is one of diffusers' IP-Adapter attention processors."""
    return isinstance(processor, IP_ADAPTER_PROCESSORS)


class IPAdapterDetailProcessor(torch.nn.Module):
    """Detail++'s processor on a cross-attention layer that had an IP-Adapter processor: text attention as
    :class:`DetailAttnProcessor` computes it (its maps captured from the 77 text keys only) plus the image prompt's
    attention, with the IP-Adapter processor's own modules (it is held as a submodule, so its weights stay where
    diffusers put them, move with the UNet and are frozen with it).

    ``ip_adapter_masks`` (diffusers' regional image prompts) are not supported and raise :class:`HookError`.
    """

    def __init__(self, detail: DetailAttnProcessor, ip_adapter: torch.nn.Module):
        super().__init__()
        self.detail = detail
        self.ip_adapter = ip_adapter

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        ip_adapter_masks: torch.Tensor | list | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if ip_adapter_masks is not None:
            raise HookError("Detail++ does not support `ip_adapter_masks`; give the image prompt without masks.")
        if encoder_hidden_states is None:  # (a self-attention layer: no image prompt)
            return self.detail.attend(attn, hidden_states, None, attention_mask, temb)
        if isinstance(encoder_hidden_states, tuple):
            text, image_tokens = encoder_hidden_states
        else:  # diffusers' deprecated form: the image tokens appended to the text tokens
            end = encoder_hidden_states.shape[1] - self.ip_adapter.num_tokens[0]
            text, image_tokens = encoder_hidden_states[:, :end], [encoder_hidden_states[:, end:]]
        return self.detail.attend(attn, hidden_states, text, attention_mask, temb, (self.ip_adapter, image_tokens))


@contextmanager
def detail_processors(
    unet: torch.nn.Module, state: AttentionState, materialise: bool = False
) -> Iterator[dict[str, DetailAttnProcessor | IPAdapterDetailProcessor]]:
    """Install Detail++ processors on the mask layers (and, with ``materialise``, plain materialising processors on
    every other attention layer) for the duration of the block; restore exactly the replaced ones afterwards.

    The layers of one resolution level share one processor instance (one instance for all mask layers at
    ``share="lowest"``), and the other layers one materialising instance: a compiled transformer block then finds the
    same processor state in every layer and in every call. A layer whose processor is an IP-Adapter's gets its own
    :class:`IPAdapterDetailProcessor` around that instance, reading the image prompt's weights from the IP-Adapter
    processor it replaces (restored, the same object, on exit).
    """
    layers = state.layers
    mask_names = set(layers.shared_self_attention) | set(layers.cross_attention)
    modules = {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}
    targets = [n for n in modules if n in mask_names or materialise]
    saved = {n: modules[n].processor for n in targets}
    per_level: dict[int, DetailAttnProcessor] = {}
    plain = DetailAttnProcessor("materialised attention layer", None, materialise=True) if materialise else None
    installed: dict[str, DetailAttnProcessor | IPAdapterDetailProcessor] = {}
    for n in targets:
        if n in mask_names:
            level = layers.levels.get(n, layers.level)
            if level not in per_level:
                per_level[level] = DetailAttnProcessor(
                    f"a level-{level} Detail++ layer", state, materialise=materialise, level=level
                )
            proc = per_level[level]
        else:
            proc = plain
        installed[n] = IPAdapterDetailProcessor(proc, saved[n]) if is_ip_adapter_processor(saved[n]) else proc
    state.layer_names = {modules[n]: n for n in targets if n in mask_names}
    try:
        for n, proc in installed.items():
            modules[n].set_processor(proc)
        yield installed
    finally:
        for n, proc in saved.items():
            modules[n].set_processor(proc)
        state.layer_names = {}
