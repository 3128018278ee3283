"""Detail++'s attention processors for MMDiT joint attention: FLUX.1 (``FluxAttention``) and SD3 / SD3.5
(``JointAttnProcessor2_0``'s ``Attention``), with the full processor signature, on SDPA.

In an MMDiT block, text and image tokens attend jointly: one softmax over the ``[text; image]`` keys (SD3 orders
them ``[image; text]``). Detail++ maps onto it as follows (``docs/method.md``, "Detail++ on MMDiT"):

- **sharing** (section 3.2, :func:`~detailpp.method.attention.share_queries_and_keys`): in a sharing block, every
  branch's *image* queries and *image* keys are branch 0's, its text keys and all its values its own:
  ``SDPA(Q_img^0, [K_txt^b; K_img^0], [V_txt^b; V_img^b])``, computed by copying branch 0's image queries and keys
  into the other rows of the range before the one SDPA call (never materialised). A branch's text queries keep their
  own values and see the shared image keys;
- **capture** (eq. 3): the image queries' attention to the subject's text keys. ``"text"`` (the default) renormalises
  over the text keys, ``softmax(Q_img K_txt^T / sqrt(d))``: the analogue of a UNet's cross-attention (whose softmax
  runs over the text keys only), cheap (text keys only); ``"joint"`` is the joint softmax's own probability of each
  text key (its normaliser includes the image keys, computed in chunks: costly at full size);
- every other joint-attention layer keeps its processor; the replaced ones are restored on exit.

A processor computes exactly what the diffusers processor it replaces computes when the state asks nothing of it
(the same projections, norms, rotary embedding and attention call, in the same order), so that with sharing and
capture off a branch equals the plain pipeline on its own prompt.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from detailpp.method.attention import AttentionState, HookError, share_queries_and_keys

#: how a capture normalises the image queries' attention to the text keys
CAPTURE_SOFTMAX = ("text", "joint")


def joint_text_probabilities(
    query: torch.Tensor, text_keys: torch.Tensor, image_keys: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """The joint softmax's probabilities of the text keys, float32 (rows x heads x queries x text keys): the
    normaliser sums over the text and the image keys; the image part is computed ``chunk`` queries at a time."""
    scale = query.shape[-1] ** -0.5
    q = query.float()
    text = q @ text_keys.float().transpose(-1, -2) * scale
    k_img = image_keys.float().transpose(-1, -2)
    image_lse = torch.cat(
        [(q[:, :, i : i + chunk] @ k_img * scale).logsumexp(-1) for i in range(0, q.shape[2], chunk)], 2
    )
    lse = torch.logaddexp(text.logsumexp(-1), image_lse)
    return torch.exp(text - lse.unsqueeze(-1))


class JointDetailProcessor:
    """Sharing and capture inside one joint-attention layer; the family's subclass computes the layer's attention.

    One instance serves every Detail++ layer of the transformer (a transformer has no resolution levels); what a
    layer does comes from :attr:`roles` (its name -> ``{"share", "capture"}``), read for the module being called.

    Args:
        state: the call's :class:`~detailpp.method.attention.AttentionState`.
        roles: each Detail++ layer's roles (attention module -> a set of ``"share"`` and ``"capture"``).
        softmax: ``"text"`` or ``"joint"`` (:data:`CAPTURE_SOFTMAX`).
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: AttentionState, roles: Mapping[torch.nn.Module, frozenset[str]], softmax: str = "text"):
        if softmax not in CAPTURE_SOFTMAX:
            raise ValueError(f"softmax must be one of {CAPTURE_SOFTMAX}, got {softmax!r}.")
        self.state, self.roles, self.softmax = state, roles, softmax

    def detail(
        self, attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, text: slice, image: slice, seq_dim: int
    ) -> None:
        """Share and capture in place, on queries and keys split into heads (``seq_dim``: 1 for (batch, tokens,
        heads, dim), 2 for (batch, heads, tokens, dim)); ``text``/``image``: the two parts of the token axis."""
        state, roles = self.state, self.roles.get(attn, frozenset())
        tokens = query.shape[seq_dim] - (text.stop - text.start)
        if tokens != state.num_tokens:
            raise HookError(
                f"{state.layer_name(attn, 'A Detail++ joint-attention layer')} met {tokens} image tokens, expected "
                f"{state.num_tokens} {state.grid}."
            )
        index = [slice(None)] * query.dim()
        index[seq_dim] = image
        q_img, k_img = query[tuple(index)], key[tuple(index)]
        if "share" in roles and state.share:
            state.count(cross=False)
            share_queries_and_keys(q_img, k_img, state.share)  # views: the copy lands in query and key
        if "capture" in roles and state.capture is not None:
            index[seq_dim] = text
            k_txt = key[tuple(index)]
            if seq_dim == 1:  # (batch, tokens, heads, dim) -> (batch, heads, tokens, dim)
                q_img, k_txt, k_img = (t.transpose(1, 2) for t in (q_img, k_txt, k_img))
            if self.softmax == "text":
                state.record(q_img, k_txt, None)
            else:
                state.record(q_img, k_txt, joint_text_probabilities(q_img, k_txt, k_img))


class FluxDetailProcessor(JointDetailProcessor):
    """Detail++ on FLUX's double-stream ``FluxAttention`` (text tokens first): what ``FluxAttnProcessor`` computes,
    with sharing and capture between the rotary embedding and the attention call."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None or attn.added_kv_proj_dim is None:
            raise HookError("Detail++'s FLUX processor belongs on a double-stream block's attention (text and image).")
        if getattr(attn, "fused_projections", False):
            raise HookError(
                "Detail++ does not support fused QKV projections: call transformer.unfuse_qkv_projections()."
            )
        query, key, value = (
            proj(hidden_states).unflatten(-1, (-1, attn.head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        query, key = attn.norm_q(query), attn.norm_k(key)
        text_q, text_k, text_v = (
            proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
        query, key, value = torch.cat([text_q, query], 1), torch.cat([text_k, key], 1), torch.cat([text_v, value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        n_text = encoder_hidden_states.shape[1]
        self.detail(attn, query, key, slice(0, n_text), slice(n_text, query.shape[1]), seq_dim=1)
        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [n_text, hidden_states.shape[1] - n_text], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


class SD3DetailProcessor(JointDetailProcessor):
    """Detail++ on SD3's joint ``Attention`` (image tokens first): what ``JointAttnProcessor2_0`` computes, with
    sharing and capture before the attention call. On SD3.5-medium's image-only ``attn2`` (no text) it shares."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        batch, n_image = hidden_states.shape[:2]
        query, key, value = (proj(hidden_states) for proj in (attn.to_q, attn.to_k, attn.to_v))
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_q, text_k, text_v = (
                proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query, key = torch.cat([query, text_q], 2), torch.cat([key, text_k], 2)
            value = torch.cat([value, text_v], 2)
        self.detail(attn, query, key, slice(n_image, query.shape[2]), slice(0, n_image), seq_dim=2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](hidden_states))
        hidden_states, encoder_hidden_states = hidden_states[:, :n_image], hidden_states[:, n_image:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


@contextmanager
def joint_processors(
    transformer: torch.nn.Module,
    state: AttentionState,
    processor_class: type[JointDetailProcessor],
    softmax: str = "text",
) -> Iterator[JointDetailProcessor]:
    """Install one ``processor_class`` instance on every Detail++ layer of ``state.layers`` (each layer's roles
    from the layers' share and capture lists) for the block; restore exactly the replaced processors after it."""
    layers = state.layers
    names = dict.fromkeys([*layers.shared_self_attention, *layers.cross_attention])
    modules = {name: transformer.get_submodule(name) for name in names}
    roles = {
        modules[n]: frozenset(
            role
            for role, listed in (("share", layers.shared_self_attention), ("capture", layers.cross_attention))
            if n in listed
        )
        for n in names
    }
    saved = {n: m.processor for n, m in modules.items()}
    processor = processor_class(state, roles, softmax)
    state.layer_names = {m: n for n, m in modules.items()}
    try:
        for m in modules.values():
            m.set_processor(processor)
        yield processor
    finally:
        for n, p in saved.items():
            modules[n].set_processor(p)
        state.layer_names = {}


__all__ = [
    "CAPTURE_SOFTMAX",
    "FluxDetailProcessor",
    "JointDetailProcessor",
    "SD3DetailProcessor",
    "joint_processors",
    "joint_text_probabilities",
]
