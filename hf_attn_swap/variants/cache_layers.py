"""Cache layers of the sliding-window, sparse and linear variants (transformers ``CacheLayerMixin`` subclasses).

They are installed per layer by the pre-hook of :mod:`._common`, and each also registers a ``_layer_type`` so that a
``config.layer_types`` naming it builds it too. All of them size the model-level mask like a full layer
(``get_mask_sizes`` = every position so far): the mask is shared by every layer of a per-layer plan, and each variant
applies its own window or pattern from the positions it keeps here.

The recurrent ``(S, z)`` of the linear and hybrid layers is kept in transformers' own linear-attention layer state
(``LinearAttentionCacheLayerMixin``: recurrent states 0 and 1), so ``Cache.get_recurrent_state`` /
``has_previous_state`` and transformers' beam and offload code see it. The layers stay ``CacheLayerMixin`` too (as
transformers' own hybrid layers do): the mask builders size every layer from its token count, and transformers' pure
linear layers have none. The mixin's conv-state half (Mamba-style convolutions) has no counterpart here.
"""

from __future__ import annotations

from typing import Any

import torch

from ..hf_compat import cache_layer_mixin, linear_attention_cache_mixin

CacheLayerMixin = cache_layer_mixin()
LinearAttentionCacheLayerMixin = linear_attention_cache_mixin()


#: queries up to which an update appends into a preallocated buffer (decode) instead of concatenating (prefill).
APPEND_MAX_QUERY = 16


class SwapCacheLayer(CacheLayerMixin):
    """Common part: a token counter and the padding validity of every kept key."""

    is_sliding = False  # sized like a full layer for transformers' mask builders (see module docstring)
    is_compileable = False
    is_croppable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.cumulative_length = 0
        self.valid: torch.Tensor | None = None  # (b, kept) bool

    # -- what transformers asks of a cache layer --------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def signature(self) -> tuple:
        return ()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError(
                f"{type(self).__name__} cannot be cropped (its state has forgotten evicted tokens); assisted/speculative "
                "decoding is not supported with this attention"
            )

    def _tensor_names(self) -> list[str]:
        return ["keys", "values", "valid"]

    def _map_batch(self, fn) -> None:
        for name in self._tensor_names():
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def reset(self) -> None:
        self.__init__(**self._init_kwargs())

    def _init_kwargs(self) -> dict:
        return {}

    def nbytes(self) -> int:
        """Bytes held by this layer's tensors (what grows, or does not, with the context)."""
        total = 0
        for name in dict.fromkeys(self._tensor_names() + ["positions", "state_s", "state_z"]):
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        return total


class KVWindowLayer(SwapCacheLayer):
    """Keys/values with their positions: all of them (``window=None``), or the sinks plus the last ``window - 1``.

    ``update`` returns the kept keys followed by the new ones, laid out as ``[sinks][contiguous tail up to now]``:
    positions ``0..s-1`` then ``t0..total-1``. After the attention function has read the new tokens' validity it calls
    :meth:`commit_validity`, which trims the validity the same way the keys were trimmed.
    """

    _layer_type = "hf_attn_swap_kv"

    def __init__(self, window: int | None = None, sinks: int = 0, **kwargs: Any) -> None:
        super().__init__()
        self.window = window
        self.sinks = sinks
        self.positions: torch.Tensor | None = None
        self.last_positions: torch.Tensor | None = None
        self._keep: tuple[int, int] | None = None
        self._drop_buffers()

    def _drop_buffers(self) -> None:
        # Decode appends into preallocated buffers (see _append); keys/values are then views [start:end] of them.
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._start = self._end = 0

    def _map_batch(self, fn) -> None:
        super()._map_batch(fn)
        self._drop_buffers()  # keys/values are new tensors now: the next append starts a new buffer

    def _init_kwargs(self) -> dict:
        return {"window": self.window, "sinks": self.sinks}

    def signature(self) -> tuple:
        return (self.window, self.sinks)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self.valid = torch.zeros(key_states.shape[0], 0, dtype=torch.bool, device=self.device)
        self.is_initialized = True
        self._drop_buffers()

    def _trim(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        n_sink, n_tail = self._keep
        n = t.shape[dim]
        if n_sink + n_tail >= n:
            return t
        head = t.narrow(dim, 0, n_sink)
        tail = t.narrow(dim, n - n_tail, n_tail)
        return torch.cat([head, tail], dim=dim)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self.sinks == 0 and q <= APPEND_MAX_QUERY:
            return self._append(key_states, value_states)
        self._drop_buffers()
        full_k = torch.cat([self.keys, key_states], dim=-2)
        full_v = torch.cat([self.values, value_states], dim=-2)
        new_pos = torch.arange(self.cumulative_length, self.cumulative_length + q, device=self.device)
        full_pos = torch.cat([self.positions, new_pos])
        self.cumulative_length += q
        if self.window is None:
            self._keep = (0, full_pos.numel())
        else:
            n_sink = int((full_pos < self.sinks).sum())
            self._keep = (n_sink, self.window - 1)
        self.last_positions = full_pos
        self.keys = self._trim(full_k, -2)
        self.values = self._trim(full_v, -2)
        self.positions = self._trim(full_pos, 0)
        return full_k, full_v

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode without copying the window every step: the new keys/values are written after the kept ones in a
        buffer with room to spare, and the kept ones are a view of its tail. Only when the buffer is full are the
        kept tokens copied to a new one (every ``window`` steps, or on doubling without a window): ``O(1)`` copied
        tokens per step on average instead of two copies of the whole window. Same returns and state as the
        concatenating path (kept keys then new ones, positions alike)."""
        q, n = key_states.shape[-2], self.keys.shape[-2]
        if self._kbuf is None or self._end + q > self._kbuf.shape[-2]:
            room = n + q + max(q, self.window or n, 64)
            shape = (*self.keys.shape[:-2], room, self.keys.shape[-1])
            kbuf = torch.empty(shape, dtype=self.keys.dtype, device=self.keys.device)
            vbuf = torch.empty((*shape[:-1], self.values.shape[-1]), dtype=self.values.dtype, device=self.keys.device)
            kbuf[..., :n, :].copy_(self.keys)
            vbuf[..., :n, :].copy_(self.values)
            self._kbuf, self._vbuf, self._start, self._end = kbuf, vbuf, 0, n
        end = self._end + q
        self._kbuf[..., self._end : end, :].copy_(key_states)
        self._vbuf[..., self._end : end, :].copy_(value_states)
        full_k, full_v = self._kbuf[..., self._start : end, :], self._vbuf[..., self._start : end, :]
        new_pos = torch.arange(self.cumulative_length, self.cumulative_length + q, device=self.device)
        full_pos = torch.cat([self.positions, new_pos])
        self.cumulative_length += q
        kept = full_pos.numel() if self.window is None else min(full_pos.numel(), self.window - 1)
        self._keep = (0, kept)
        self.last_positions = full_pos
        self._start, self._end = end - kept, end
        self.keys, self.values = self._kbuf[..., self._start : end, :], self._vbuf[..., self._start : end, :]
        self.positions = full_pos[full_pos.numel() - kept :]
        return full_k, full_v

    def commit_validity(self, new_valid: torch.Tensor) -> torch.Tensor:
        """Record the new tokens' padding validity ``(b, q)``; returns the validity of every key ``update`` returned."""
        full = torch.cat([self.valid, new_valid.to(self.valid.device)], dim=1)
        self.valid = self._trim(full, 1)
        return full


class RecurrentState(LinearAttentionCacheLayerMixin):
    """``state_s`` / ``state_z`` as transformers' linear-attention recurrent states 0 and 1 (None until written).

    Mixed in after a :class:`SwapCacheLayer`, whose token count, mask sizes, crop and reset take precedence."""

    def _init_recurrent_state(self) -> None:
        LinearAttentionCacheLayerMixin.__init__(self, number_of_states=2)

    def _get_state(self, idx: int) -> torch.Tensor | None:
        return self.recurrent_states[idx]

    def _set_state(self, idx: int, value: torch.Tensor | None) -> None:
        # Assigned, not copied in place: the attention function returns fresh fp32 tensors (shapes grow with batch).
        self.recurrent_states[idx] = value
        self.is_recurrent_states_initialized[idx] = value is not None
        self.has_previous_state[idx] = value is not None

    state_s = property(lambda self: self._get_state(0), lambda self, v: self._set_state(0, v))
    state_z = property(lambda self: self._get_state(1), lambda self, v: self._set_state(1, v))

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} keeps no convolution state (linear attention has none)")

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
        self._set_state(state_idx, recurrent_states)
        return recurrent_states


class LinearStateLayer(SwapCacheLayer, RecurrentState):
    """Recurrent state of causal linear attention: ``S = sum phi(k) v^T`` ``(b, H_kv, m, d)`` and ``z = sum phi(k)``
    ``(b, H_kv, m)``, in fp32. Constant memory in the context length: no key or value is kept."""

    _layer_type = "hf_attn_swap_linear"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._init_recurrent_state()

    def _tensor_names(self) -> list[str]:
        return ["keys", "values", "valid", "state_s", "state_z"]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        return key_states, value_states


class HybridStateLayer(KVWindowLayer, RecurrentState):
    """Linear attention with an exact softmax window (``linear`` with ``window``): the last ``window - 1`` keys/values
    (as :class:`KVWindowLayer`, no sinks) plus the recurrent state of every older key, ``S = sum phi(k) v^T`` and
    ``z = sum phi(k)`` over positions ``< state_upto``. The attention function folds the keys that leave the window
    into the state (it owns the feature map); memory stays ``window - 1`` tokens plus the state."""

    _layer_type = "hf_attn_swap_hybrid"

    def __init__(self, window: int | None = None, **kwargs: Any) -> None:
        super().__init__(window=window, sinks=0)
        self._init_recurrent_state()
        self.state_upto = 0

    def _init_kwargs(self) -> dict:
        return {"window": self.window}

    def _tensor_names(self) -> list[str]:  # per-batch tensors (positions are shared by the batch: not here)
        return ["keys", "values", "valid", "state_s", "state_z"]
