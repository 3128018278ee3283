"""Detail++'s attention processors for diffusers' UNet attention (``diffusers.models.attention_processor.Attention``):
shared self-attention (section 3.2) and subject cross-attention capture (eq. 3) as
:mod:`detailpp.method.attention` defines them, with the full processor signature, on SDPA.

Only the mask layers (:func:`detailpp.backbones.unet.find_mask_layers`) get a Detail++ processor, and every processor
checks at run time that it meets the token count it was chosen for. Every other layer keeps the processor it had
(LoRA, IP-Adapter, ...), and :func:`detail_processors` restores the replaced ones on exit, also after an exception.
The layers of a resolution level share one processor instance, which keeps no per-layer state and reads only tensors
and per-call values from :class:`~detailpp.method.attention.AttentionState`: compiled transformer blocks
(:mod:`detailpp.method.compile`) then need no per-layer graph, no recompile between calls and no graph break.

:class:`DetailAttnProcessor` with ``materialise=True`` computes ``softmax(QK^T/sqrt(d))`` and multiplies by V instead
of SDPA (what the authors' code does in every layer); tests use it as the formula's reference value, benchmarks as
the authors' cost.

IP-Adapter. A mask layer (or, with materialised attention, any layer) whose processor is diffusers' IP-Adapter
processor gets an :class:`IPAdapterDetailProcessor`: the level's shared :class:`DetailAttnProcessor` computes the text
attention (and captures from its text keys only), then adds ``scale * attention(Q, K_ip, V_ip)`` per adapter with the
replaced processor's own modules, which it holds (so they stay in the UNet's parameters) and which are restored on
exit. These wrappers are per layer (compiling a UNet with an IP-Adapter is not measured).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import (
    Attention,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)

from detailpp.method.attention import AttentionState, HookError, share_queries_and_keys


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
        if not self.materialise:  # rows start+1..end-1 take row `start`'s (branch 0's) queries and keys
            share_queries_and_keys(p.query, p.key, state.share)
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
            level = layers.group_of(n)
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
