"""Attention processors: shared self-attention (paper, section 3.2) and subject cross-attention capture (eq. 3).

Only the lowest-resolution attention layers get a Detail++ processor (32x32 tokens at 1024x1024 in SDXL:
``down_blocks.2``, ``mid_block``, ``up_blocks.0``); they are found from the UNet's structure and the latent size of
the call, and every processor checks at run time that it meets the token count it was chosen for. Every other
layer keeps the processor it had (LoRA, IP-Adapter, ...), and :func:`detail_processors` restores the replaced ones
on exit, also after an exception.

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

logger = logging.getLogger(__name__)


class HookError(RuntimeError):
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
    """The attention layers at the UNet's lowest resolution (those with the fewest tokens), by module name.

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
    level = max(lv for lv, _, _ in found)
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
    """What the Detail++ processors should do in the current UNet call, and what they captured."""

    def __init__(self, layers: MaskLayers, grid: tuple[int, int], expected_tokens: dict[str, int] | None = None):
        self.layers = layers
        self.grid = grid
        self.num_tokens = grid[0] * grid[1]
        #: token count each shared self-attention layer must meet (mask-level layers: ``num_tokens``)
        self.expected_tokens = expected_tokens or {}
        self.share: tuple[tuple[int, int], ...] = ()
        self.capture: CaptureSpec | None = None
        self._index_cache: tuple | None = None  # (spec, device, batch, row selector, subject rows, weights)
        self._reset()

    def _reset(self) -> None:
        self.self_calls = 0
        self.cross_calls = 0
        self.maps: torch.Tensor | None = None  # (subjects, tokens) summed over layers
        self.full_probs: torch.Tensor | None = None  # (tokens, 77) summed over layers, fp32

    def begin(self, share: Sequence[tuple[int, int]] = (), capture: CaptureSpec | None = None) -> None:
        """Arm the processors for one UNet call. ``share``: ``(start, end)`` row ranges whose first row's Q/K are
        used by every row of the range."""
        self.share = tuple(share)
        self.capture = capture
        if capture is not None and capture.rows:
            unique = sorted(set(capture.rows))
            self._row_pos = torch.tensor([unique.index(r) for r in capture.rows])
            self._unique_rows = unique
        self._reset()

    def end(self, expect_self: bool = True, expect_cross: bool = True) -> None:
        """Disarm; raise :class:`HookError` when a layer that had work to do did not run."""
        n_self, n_cross = len(self.layers.shared_self_attention), len(self.layers.cross_attention)
        if expect_self and self.share and self.self_calls != n_self:
            raise HookError(
                f"Shared self-attention ran in {self.self_calls} of {n_self} layers in this step; another "
                "processor or a compiled UNet bypassed Detail++'s hooks."
            )
        if expect_cross and self.capture is not None and self.cross_calls != n_cross:
            raise HookError(
                f"Cross-attention capture ran in {self.cross_calls} of {n_cross} layers in this step; another "
                "processor or a compiled UNet bypassed Detail++'s hooks."
            )
        self.share = ()
        self.capture = None

    def mean_maps(self) -> torch.Tensor:
        """Subject maps of this call, averaged over layers: (subjects, tokens), fp32."""
        if self.maps is None or self.cross_calls == 0:
            raise HookError("No cross-attention map was captured in this step.")
        return self.maps / self.cross_calls

    def mean_full_probs(self) -> torch.Tensor:
        if self.full_probs is None or self.cross_calls == 0:
            raise HookError("No cross-attention distribution was captured for nursing.")
        return self.full_probs / self.cross_calls

    def _indices(self, device: torch.device, batch: int, keys: int) -> tuple:
        """Row selector, subject-to-row index and token weights of the armed capture, made once per capture spec.

        Built per layer they cost a host-to-device copy each (row lists, token lists, the weights), and the UNet call
        that runs them is bound by the CPU launching its kernels: 60 layers x 5 copies showed as 17% of a Detail++
        step on an H200. Contiguous rows (every capture the pipeline arms) are a slice: a view, no gather.
        """
        spec = self.capture
        cache = self._index_cache
        if cache is not None and cache[0] is spec and cache[1] == device and cache[2] == (batch, keys):
            return cache[3:]
        rows = self._unique_rows
        if rows == list(range(rows[0], rows[-1] + 1)):
            select: slice | torch.Tensor = slice(rows[0], rows[-1] + 1)
        else:
            select = torch.tensor(rows, device=device)
        subject_rows = None
        weights = None
        if spec.tokens:
            if self._row_pos.tolist() != list(range(len(rows))):
                subject_rows = self._row_pos.to(device)
            weights = torch.zeros(len(spec.tokens), keys, dtype=torch.float32)
            for s, toks in enumerate(spec.tokens):
                weights[s, list(toks)] = 1.0 / len(toks)
            weights = weights.to(device)
        self._index_cache = (spec, device, (batch, keys), select, subject_rows, weights)
        return select, subject_rows, weights

    def record(self, name: str, query: torch.Tensor, key: torch.Tensor, probs: torch.Tensor | None) -> None:
        """Accumulate the subject maps of one cross-attention layer (query/key: batch x heads x n x d)."""
        spec = self.capture
        if spec is None:
            return
        self.cross_calls += 1
        if query.shape[2] != self.num_tokens:
            raise HookError(f"{name} met {query.shape[2]} tokens, expected {self.num_tokens} ({self.grid}).")
        select, subject_rows, weights = self._indices(query.device, query.shape[0], key.shape[2])
        if probs is None:
            logits = query[select].float() @ key[select].float().transpose(-1, -2) * query.shape[-1] ** -0.5
            probs = logits.softmax(dim=-1)
        else:
            probs = probs[select].float()
        probs = probs.mean(dim=1)  # heads -> (unique rows, n, 77)
        if spec.full:
            self.full_probs = probs[0] if self.full_probs is None else self.full_probs + probs[0]
        if spec.tokens:
            per_subject = probs if subject_rows is None else probs[subject_rows]  # (subjects, n, 77)
            maps = torch.einsum("snt,st->sn", per_subject, weights)
            self.maps = maps if self.maps is None else self.maps + maps


def attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The materialised map ``softmax(Q K^T / sqrt(d) + mask)`` (batch x heads x n x m)."""
    scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1)


class DetailAttnProcessor:
    """Attention processor of a Detail++ mask layer (``state`` given) or a plain reference layer (``state=None``).

    Self-attention layers apply the state's sharing, cross-attention layers its capture; ``reference=True`` computes
    attention through the materialised map instead of ``F.scaled_dot_product_attention``.
    """

    def __init__(self, name: str, state: AttentionState | None = None, reference: bool = False):
        self.name = name
        self.state = state
        self.reference = reference

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
        if state is not None and not is_cross:
            expected = state.expected_tokens.get(self.name, state.num_tokens)
            if query.shape[1] != expected:
                raise HookError(f"{self.name} met {query.shape[1]} tokens, expected {expected}.")
            state.self_calls += 1
            for start, end in state.share:
                # Rows start+1..end-1 take row `start`'s (branch 0's) queries and keys: SDPA(Q0, K0, V_b).
                query[start + 1 : end] = query[start]
                key[start + 1 : end] = key[start]

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
            probs = attention_probs(query, key, attention_mask)
            hidden_states = probs @ value
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        if state is not None and is_cross:
            state.record(self.name, query, key, probs)

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
    every other attention layer) for the duration of the block; restore exactly the replaced ones afterwards."""
    mask_names = set(state.layers.shared_self_attention) | set(state.layers.cross_attention)
    modules = {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}
    targets = [n for n in modules if n in mask_names or reference]
    saved = {n: modules[n].processor for n in targets}
    installed = {n: DetailAttnProcessor(n, state if n in mask_names else None, reference=reference) for n in targets}
    try:
        for n, proc in installed.items():
            modules[n].set_processor(proc)
        yield installed
    finally:
        for n, proc in saved.items():
            modules[n].set_processor(proc)
