"""SparseK building blocks for models: the SPARSEK operator as a differentiable torch function,
and :class:`SparseKAttention`, the paper's scorer in front of :func:`sparsek_attention`.

The operator here is plain torch (any device, autograd through the spec's VJP) so that users who
train scorers can put gates into their own losses; the attention kernels compute the same gates
internally (docs/SPARSEK_SPEC.md) and need none of this.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["sparsek_gates", "SparseKAttention"]

_BISECT_STEPS = 64


def _tau(z: torch.Tensor, k: int) -> torch.Tensor:
    """tau of the SPARSEK operator over the last dim of z (float64, k < m), relative to the k-th
    largest value z_k so that large scores keep their differences: tau in [z_k - 1, z_k)."""
    zk = z.topk(k, dim=-1).values[..., -1:]
    d = z - zk                                   # float64: exact for float32 inputs
    lo = torch.full_like(zk, -1.0)               # f(lo) >= k
    hi = torch.zeros_like(zk)                    # f(hi) <  k
    for _ in range(_BISECT_STEPS):               # brackets the linear piece holding tau
        mid = 0.5 * (lo + hi)
        f = (d - mid).clamp(0, 1).sum(-1, keepdim=True)
        ge = f >= k
        lo = torch.where(ge, mid, lo)
        hi = torch.where(ge, hi, mid)
    # The spec's closed form on that piece: U = #{z >= tau + 1}, W = #{z > tau}.
    sat = d - 1 >= hi
    band = (d > lo) & ~sat
    U = sat.sum(-1, keepdim=True).to(d.dtype)
    W = U + band.sum(-1, keepdim=True).to(d.dtype)
    s = torch.where(band, d, torch.zeros_like(d)).sum(-1, keepdim=True)
    tau = torch.where(W > U, (s + U - k) / (W - U).clamp_min(1), lo)
    return tau.clamp(lo, hi), zk


class _SparseKGates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, k):
        m = z.shape[-1]
        if m <= k:
            gates = torch.ones_like(z)
        elif k == 0:
            gates = torch.zeros_like(z)
        else:
            tau, zk = _tau(z.double(), k)
            gates = ((z.double() - zk) - tau).clamp(0, 1).to(z.dtype)
        ctx.save_for_backward(gates)
        return gates

    @staticmethod
    def backward(ctx, g):
        (gates,) = ctx.saved_tensors
        s = ((gates > 0) & (gates < 1)).to(g.dtype)
        n = s.sum(-1, keepdim=True)
        mean = (s * g).sum(-1, keepdim=True) / n.clamp_min(1)
        return s * (g - mean), None


def sparsek_gates(z: torch.Tensor, k: int) -> torch.Tensor:
    """The SPARSEK operator over the last dim of ``z``: gates ``clip(z - tau, 0, 1)`` summing to
    ``k`` (all ones when there are at most ``k`` entries). Differentiable: the backward is the
    spec's VJP ``s * (g - (s . g) / |s|_1)`` with ``s`` the fractional gates."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"sparsek_gates: argument 'k': must be an int >= 0, got {k!r}")
    if not torch.is_floating_point(z) or z.dim() < 1:
        raise ValueError("sparsek_gates: argument 'z': must be a floating tensor with >= 1 dim")
    if not torch.isfinite(z).all():
        raise ValueError("sparsek_gates: argument 'z': scores must be finite")
    return _SparseKGates.apply(z, k)


def paper_scores(x: torch.Tensor, w_score: torch.Tensor, slope: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """The paper's scorer ``u = x @ w_score + slope * position`` in float32: x [B, S, Dmodel],
    w_score [Dmodel, Hkv], slope [Hkv], positions [B or 1, S] -> u [B, Hkv, S] (a view; callers
    that hand it to the kernels make it contiguous)."""
    u = (x.float() @ w_score.float()).transpose(1, 2)        # [B, Hkv, S]
    return u + slope.float()[None, :, None] * positions.float()[:, None, :]


class SparseKAttention(nn.Module):
    """SparseK attention with the paper's scorer ``u = x @ w_score + slope * position``.

    ``forward(q, k, v, x)``: q [B, S, Hq, D], k/v [B, S, Hkv, D] (BSHD, as
    :func:`blackwell_sparsek.sparsek_attention`), x [B, S, d_model] the layer input the scores
    are read from. The scorer keeps fp32 parameters ``w_score`` [d_model, Hkv] and ``slope``
    [Hkv] (a learned recency bias). Differentiable: q, k, v get their gradients from the
    attention backward, ``w_score`` and ``slope`` theirs through ``du`` (the SPARSEK operator's
    VJP, docs/SPARSEK_SPEC.md); with gate "none" the selection is hard and ``du`` is zero.
    """

    def __init__(self, d_model: int, heads_kv: int, k_budget: int, window: int,
                 gate: str = "key_value", slope_init: float = 0.0,
                 softmax_scale: Optional[float] = None):
        super().__init__()
        self.k_budget, self.window, self.gate, self.softmax_scale = (k_budget, window, gate,
                                                                     softmax_scale)
        self.w_score = nn.Parameter(torch.randn(d_model, heads_kv) / math.sqrt(d_model))
        self.slope = nn.Parameter(torch.full((heads_kv,), float(slope_init)))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """u: float32 [B, Hkv, S], positions 0 .. S-1."""
        pos = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)[None]
        return paper_scores(x, self.w_score, self.slope, pos)

    def forward(self, q, k, v, x, return_lse: bool = False):
        from . import sparsek_attention
        return sparsek_attention(q, k, v, self.scores(x).contiguous(), self.k_budget,
                                 self.window, self.gate, self.softmax_scale, return_lse)

    def extra_repr(self) -> str:
        return (f"d_model={self.w_score.shape[0]}, heads_kv={self.w_score.shape[1]}, "
                f"k_budget={self.k_budget}, window={self.window}, gate={self.gate!r}")
