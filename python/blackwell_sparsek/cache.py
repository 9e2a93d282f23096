"""SparseK generation: a decoding cache whose memory does not grow with the context.

Per (sequence, KV head) the cache holds the last ``window`` K/V pairs, the ``k_budget`` selected
ones and the candidate scores the soft gates still need (docs/SPARSEK_SPEC.md, "Generation").
Decoding one token from it gives the prefill definition's output at that position
(:func:`blackwell_sparsek.sparsek_attention` with the query at the last position).

    cache = SparseKCache.from_prefill(k, v, u, k_budget=2048, window=1024)  # after the prompt
    for step in range(n):
        out = cache.step(q, k_new, v_new, u_new)   # append the new token, attend with its query

Errors: bad shapes, dtypes or devices raise ``ValueError`` at the call. A non-finite new score or
a score-capacity overflow is found on the GPU without a host synchronization: the cache then
refuses further appends (unchanged) and :meth:`attend` writes NaN, and :meth:`check` (which
synchronizes) raises ``ValueError`` saying what happened. :meth:`prefill` synchronizes and
raises at once.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.dlpack import to_dlpack as _dl

from . import _C
from . import _validate
from . import ops

__all__ = ["SparseKCache"]


def _cap(t, name: str):
    # Refuses inputs that need a gradient: the cache is not differentiable (torch's __dlpack__,
    # which nanobind used to call, refused them too; to_dlpack does not).
    _validate.detached((name, t), what="SparseKCache")
    return _dl(t)


def _opt_cap(t, name: str):
    return None if t is None else _cap(t, name)


def _outputs(q, return_lse: bool):
    """out (q's shape, contiguous) and, if asked, lse float32 [B, Hq, 1]."""
    _validate.tensor(q, "q")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = None
    if return_lse:
        lse = (q.new_empty((q.shape[0], q.shape[2], 1), dtype=torch.float32) if q.dim() == 4
               else q.new_empty((0, 0, 0), dtype=torch.float32))  # libbsk names q's rank first
    return out, lse

_STATUS = {1: "a new score u_new was not finite (NaN or inf)",
           2: "more candidate scores above tau than the score capacity"}


class SparseKCache:
    """Constant-memory SparseK decoding cache for ``batch`` sequences.

    Args:
        batch, heads_kv, head_dim: sizes (head dim 64 or 128 on CUDA).
        k_budget, window: SparseK's k and w (as in :func:`sparsek_attention`).
        gate: "key_value", "value" or "none".
        dtype, device: of the cached K/V (float16/bfloat16 on CUDA).
        score_capacity: how many candidate scores (4 + 8 bytes each, no K/V) the soft gates may
            need at once: those above tau, usually a few times ``k_budget`` but up to the whole
            context for flat scores. Default ``max(8 * k_budget, 1024)`` (``k_budget`` for gate "none",
            which needs no more).
    """

    def __init__(self, batch: int, heads_kv: int, head_dim: int, *, k_budget: int, window: int,
                 gate: str = "key_value", dtype: torch.dtype = torch.bfloat16,
                 device="cuda", score_capacity: Optional[int] = None):
        _validate.sparsek_params(k_budget, window, gate)
        if score_capacity is None:
            score_capacity = k_budget if gate == "none" else max(8 * k_budget, 1024)
        self.k_budget, self.window, self.gate = int(k_budget), int(window), gate
        rows = self.window + self.k_budget
        dev = torch.device(device)
        self.k_cache = torch.zeros(batch, heads_kv, rows, head_dim, dtype=dtype, device=dev)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.slot_u = torch.zeros(batch, heads_kv, rows, dtype=torch.float32, device=dev)
        self.cand_u = torch.zeros(batch, heads_kv, score_capacity, dtype=torch.float32, device=dev)
        self.cand_pos = torch.zeros(batch, heads_kv, score_capacity, dtype=torch.int32, device=dev)
        self.cand_row = torch.full_like(self.cand_pos, -1)
        self.tau = torch.full((batch, heads_kv), float("-inf"), dtype=torch.float64, device=dev)
        self.counts = torch.zeros(batch, heads_kv, 3, dtype=torch.int32, device=dev)
        self.status = torch.zeros(2, dtype=torch.int32, device=dev)
        self._h = _C.SparseKCacheHandle(
            self.k_cache, self.v_cache, self.slot_u, self.cand_u, self.cand_pos, self.cand_row,
            self.tau, self.counts, self.status, self.k_budget, self.window, gate)

    @classmethod
    def from_prefill(cls, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor, *, k_budget: int,
                     window: int, gate: str = "key_value", lengths: Optional[torch.Tensor] = None,
                     score_capacity: Optional[int] = None) -> "SparseKCache":
        """The cache a prefill leaves: k, v [B, L, Hkv, D], u float32 [B, Hkv, L]; ``lengths``
        (int32 [B], optional) gives each sequence's own length (later positions are ignored)."""
        _validate.detached(("k", k), ("v", v), ("u", u), what="SparseKCache.from_prefill")
        if k.dim() != 4:
            raise ValueError(f"k: must be a 4-D tensor [B, L, Hkv, D], got shape {tuple(k.shape)}")
        c = cls(k.shape[0], k.shape[2], k.shape[3], k_budget=k_budget, window=window, gate=gate,
                dtype=k.dtype, device=k.device, score_capacity=score_capacity)
        c.prefill(k, v, u, lengths)
        return c

    def _stream(self) -> int:
        return ops.stream_of(self.k_cache)

    # The handle's methods take DLPack capsules: handed a tensor, nanobind calls its __dlpack__
    # (~4.5 us each on a desktop CPU, 10x torch.utils.dlpack.to_dlpack), six of them per step.

    def prefill(self, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
                lengths: Optional[torch.Tensor] = None) -> None:
        """Replaces the state with the one a prefill of k/v/u leaves (synchronizes once)."""
        self._h.prefill(_cap(k, "k"), _cap(v, "v"), _cap(u, "u"), _opt_cap(lengths, "lengths"),
                        self._stream())

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, u_new: torch.Tensor) -> None:
        """One new token per sequence: k_new, v_new [B, 1, Hkv, D]; u_new float32 [B, Hkv, 1]."""
        self._h.append(_cap(k_new, "k_new"), _cap(v_new, "v_new"), _cap(u_new, "u_new"),
                       self._stream())

    def attend(self, q: torch.Tensor, softmax_scale: Optional[float] = None,
               return_lse: bool = False):
        """Attention of q [B, 1, Hq, D] at the last appended position; ``out`` [B, 1, Hq, D] (and
        ``lse`` float32 [B, Hq, 1])."""
        return self._attend(q, softmax_scale, return_lse, self._stream())

    def _attend(self, q, softmax_scale, return_lse, stream):
        out, lse = _outputs(q, return_lse)
        self._h.attend(_cap(q, "q"), _dl(out), _opt_cap(lse, "lse"), softmax_scale, stream)
        return (out, lse) if return_lse else out

    def step(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
             u_new: torch.Tensor, softmax_scale: Optional[float] = None, return_lse: bool = False):
        """append() then attend(): one decode step, in one call (every argument is checked
        before the cache changes; on sm_90 GPUs the attention overlaps the append)."""
        out, lse = _outputs(q, return_lse)
        self._h.step(_cap(q, "q"), _cap(k_new, "k_new"), _cap(v_new, "v_new"),
                     _cap(u_new, "u_new"), _dl(out), _opt_cap(lse, "lse"), softmax_scale,
                     self._stream())
        return (out, lse) if return_lse else out

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens seen per sequence (int32 [B])."""
        return self.counts[:, 0, 0]

    def check(self) -> None:
        """Synchronizes and raises ValueError if the cache is broken (see the module doc)."""
        code, detail = (int(x) for x in self.status.cpu())
        if code != 0:
            H = self.k_cache.shape[1]
            what = _STATUS.get(code, f"status {code}")
            raise ValueError(f"SparseKCache: {what} (sequence {detail // H}, KV head {detail % H}); "
                             "the cache was left as it was before that append: rebuild it "
                             "(prefill) or reset() it")

    def reset(self) -> None:
        """Empties every sequence (and clears an error)."""
        self.counts.zero_()
        self.tau.fill_(float("-inf"))
        self.status.zero_()
        self.cand_row.fill_(-1)

    @property
    def nbytes(self) -> int:
        """Bytes of device memory the cache holds (all sequences); independent of the context."""
        return sum(t.numel() * t.element_size() for t in (
            self.k_cache, self.v_cache, self.slot_u, self.cand_u, self.cand_pos, self.cand_row,
            self.tau, self.counts, self.status))
