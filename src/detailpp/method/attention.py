"""Shared self-attention (paper, section 3.2) and subject cross-attention capture (eq. 3), whatever the denoiser.

Sharing. Branch b's shared self-attention is ``softmax(Q0 K0^T / sqrt(d)) V_b``: branch 0's (the full prompt's) map
applied to the branch's own values. That is exactly ``SDPA(Q0, K0, V_b)``: :func:`share_queries_and_keys` copies
branch 0's queries and keys into the other rows of each shared row range, and the layer then calls
``F.scaled_dot_product_attention`` as usual, so no map is ever materialised and flash/efficient kernels stay on. (The
authors' code materialises every map and copies it; ``DetailConfig.materialised_attention`` does that too, for tests
and as the authors' cost.)

Capture. A mask needs, for each subject, the attention probabilities of the image tokens to the subject's text
tokens, averaged over heads, the subject's tokens and the capture layers. :func:`capture_probabilities` computes them
only for the rows a mask needs (a ``(rows x heads x tokens x keys)`` softmax next to SDPA: few text keys make this
cheap) and :class:`AttentionState` accumulates them over the layers of one denoiser call.

:class:`AttentionState` is what the processors read and write during one denoiser call: which row ranges share, which
capture is armed, the token count each layer must meet, and the captured maps. The processors themselves belong to a
backbone (:mod:`detailpp.backbones`): they know the denoiser's attention modules; this module knows only tensors.
Everything a processor reads from the state is a tensor or a value fixed for the whole call, so that a compiled block
(:mod:`detailpp.method.compile`) needs no per-layer graph and no recompile from one call to the next.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from detailpp.errors import DetailError

logger = logging.getLogger(__name__)


class HookError(DetailError, RuntimeError):
    """A Detail++ attention hook did not fire as expected: results would silently be the plain pipeline's."""


@dataclass(frozen=True)
class MaskLayers:
    """A denoiser's Detail++ attention layers, by module name, and the block after which none of them runs.

    Attributes:
        self_attention: the self-attention layers among the mask layers.
        cross_attention: the layers whose image-to-text attention is captured for the masks.
        level: the processor group of the mask layers (a UNet's resolution level: downsamplings above the latent).
        last_block: the module after which no capture layer runs: a nursing pass can stop there.
        shared_self_attention: the self-attention layers that share branch 0's queries and keys (default:
            ``self_attention``).
        levels: the processor group of each layer (layers of one group share one processor instance and one
            expected token count); a layer not in it is in ``level``.
    """

    self_attention: tuple[str, ...]
    cross_attention: tuple[str, ...]
    level: Hashable
    last_block: str
    shared_self_attention: tuple[str, ...] = ()
    levels: dict[str, Hashable] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.shared_self_attention:
            object.__setattr__(self, "shared_self_attention", self.self_attention)

    def group_of(self, name: str) -> Hashable:
        """The processor group of layer ``name``."""
        return self.levels.get(name, self.level)


def share_queries_and_keys(
    query: torch.Tensor, key: torch.Tensor, ranges: Sequence[tuple[int, int]]
) -> tuple[tuple[int, int], ...]:
    """Section 3.2, in place: within each ``(start, end)`` row range, rows ``start+1 .. end-1`` take row ``start``'s
    (branch 0's) queries and keys, so that SDPA over the batch computes ``softmax(Q0 K0^T / sqrt(d)) V_b`` for every
    branch b of the range. ``query``/``key``: batch first, any layout after it. Returns the ranges."""
    for start, end in ranges:
        query[start + 1 : end] = query[start]
        key[start + 1 : end] = key[start]
    return tuple(ranges)


def capture_probabilities(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Attention probabilities ``softmax(Q K^T / sqrt(d))`` in float32, (rows x heads x queries x keys), from
    queries and keys split into heads (rows x heads x tokens x head_dim)."""
    logits = query.float() @ key.float().transpose(-1, -2) * query.shape[-1] ** -0.5
    return logits.softmax(dim=-1)


@dataclass
class CaptureSpec:
    """Which cross-attention maps to collect in one denoiser call.

    ``rows[s]`` is the batch row whose attention gives subject ``s``'s map, ``tokens[s]`` the subject's token
    positions. ``full=True`` (nursing) also keeps the whole head-averaged distribution over the 77 tokens of the
    first row, with gradients.
    """

    rows: Sequence[int]
    tokens: Sequence[Sequence[int]]
    full: bool = False


class AttentionState:
    """What the Detail++ processors should do in the current denoiser call, and what they captured.

    Everything a processor reads from here is either a tensor or a plain value fixed for the whole denoiser call and
    the same in every layer (the share ranges, which captures are armed, each resolution level's token count), so that
    a compiled transformer block (:func:`detailpp.method.compile.compile_detail`) needs no per-layer graph and no
    recompile from one call to the next. :meth:`begin` prepares the capture's row selection and token weights as
    tensors on the denoiser's device before the call; the processors count their calls in a tensor that :meth:`end`
    reads once.
    """

    def __init__(self, layers: MaskLayers, grid: tuple[int, int], expected_tokens: Mapping[str, int] | None = None):
        self.layers = layers
        self.grid = grid
        self.num_tokens = grid[0] * grid[1]
        #: token count the shared self-attention layers of each resolution level must meet (from ``expected_tokens``,
        #: per layer name; a level not in it: ``num_tokens``)
        self.level_tokens = {layers.group_of(n): t for n, t in (expected_tokens or {}).items()}
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
        """Arm the processors for one denoiser call.

        Args:
            share: ``(start, end)`` row ranges whose first row's Q/K are used by every row of the range.
            capture: the cross-attention maps to collect.
            device: the device the denoiser runs on (default: the CPU). Give it for a denoiser on another device: the
                capture's tensors are then made there once, not moved inside the denoiser call.
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

        Built per layer they cost a host-to-device copy each (row lists, token lists, the weights), and the denoiser
        call that runs them is bound by the CPU launching its kernels (BENCHMARKS.md has the share of a step it took).
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
                "processor or a compiled denoiser bypassed Detail++'s hooks."
            )
        if check_cross and cross_calls != n_cross:
            raise HookError(
                f"Cross-attention capture ran in {cross_calls} of {n_cross} layers in this step; another "
                "processor or a compiled denoiser bypassed Detail++'s hooks."
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
        if query.device != self._device:  # armed without the denoiser's device: move once, in the first layer
            self._device = query.device
            self._rows, self._subject_rows, self._weights = self._prepare(self.capture, query.device, self._num_keys)
            self.maps = None if self.maps is None else self.maps.to(query.device)
            self.full_probs = None if self.full_probs is None else self.full_probs.to(query.device)
        rows = self._rows
        select = slice(*rows) if isinstance(rows, tuple) else rows
        probs = capture_probabilities(query[select], key[select]) if probs is None else probs[select].float()
        probs = probs.mean(dim=1)  # heads -> (unique rows, n, keys)
        if self.full_probs is not None:
            self.full_probs = self.full_probs + probs[0]
        if self.maps is not None:
            subject_rows = self._subject_rows
            per_subject = probs if subject_rows is None else probs[subject_rows]  # (subjects, n, 77)
            maps = torch.einsum("snt,st->sn", per_subject, self._weights)
            self.maps = self.maps + maps
