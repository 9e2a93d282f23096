"""The C++ CPU reference of every op, accumulating in float64: the oracle the tests trust.

Why a separate module: the reference is slow but simple, and never touches a GPU,
so it can judge the CUDA kernels. Inputs on any device are copied to the CPU; the attention
functions also convert q/k/v to float64 and return float64 results (lse stays float32 by
contract). The SPARSEK helpers work on float32 score vectors, as the kernels do.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch.utils.dlpack import to_dlpack as _dl

from . import _C
from . import _validate
from . import ops as _ops

__all__ = [
    "attention",
    "sparsek_attention",
    "sparsek_gates",
    "sparsek_gates_vjp",
    "sparsek_scores",
    "topk_select",
]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu").contiguous()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Dense attention in float64 on the CPU; same contract as :func:`blackwell_sparsek.attention`."""
    # The reference detaches its inputs: a gradient asked of it would silently be missing.
    _validate.detached(("q", q), ("k", k), ("v", v), what="bsk.reference.attention")
    out, lse = _ops.attention_fwd_nograd(_f64(q), _f64(k), _f64(v), causal, softmax_scale)
    return (out, lse) if return_lse else out


def sparsek_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    k_budget: int,
    window: int,
    gate: str = "key_value",
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
):
    """SparseK attention in float64 on the CPU; same contract as
    :func:`blackwell_sparsek.sparsek_attention` (u stays float32)."""
    _validate.detached(("q", q), ("k", k), ("v", v), ("u", u),
                       what="bsk.reference.sparsek_attention")
    out, lse = _ops.sparsek_fwd_nograd(
        _f64(q), _f64(k), _f64(v), u.detach().to(device="cpu"), k_budget, window, gate,
        softmax_scale,
    )
    return (out, lse) if return_lse else out


def _rows(z: torch.Tensor, name: str) -> Tuple[torch.Tensor, Tuple[int, ...], int]:
    _validate.tensor(z, name)
    if z.dim() == 0:
        raise ValueError(f"bsk: argument '{name}': must have at least 1 dimension [..., m]")
    z = _cpu(z)
    lead = tuple(z.shape[:-1])
    m = z.shape[-1]
    return z.reshape(math.prod(lead), m), lead, m


def sparsek_gates(z: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The SPARSEK operator over the last dim of float32 ``z`` [..., m].

    Returns ``(gates, tau)``: gates float32 [..., m] in [0, 1] summing to ``min(k, m)``, and the
    threshold tau float64 [...] (-inf when m <= k; the largest valid tau where it is not unique).
    """
    rows, lead, m = _rows(z, "z")
    k = _validate.integer(k, "k")
    gates = torch.empty_like(rows)
    tau = [_C.sparsek_gates(_dl(rows[r]), k, _dl(gates[r])) for r in range(rows.shape[0])]
    return gates.reshape(*lead, m), torch.tensor(tau, dtype=torch.float64).reshape(lead)


def sparsek_gates_vjp(gates: torch.Tensor, grad_gates: torch.Tensor) -> torch.Tensor:
    """Gradient of a loss w.r.t. z given ``gates = sparsek_gates(z, k)[0]`` and dL/dgates
    (float32 [..., m] each): ``s * (g - (s.g)/|s|_1)`` with ``s = 1[0 < gates < 1]``."""
    g_rows, lead, m = _rows(gates, "gates")
    _validate.tensor(grad_gates, "grad_gates")
    gg = _cpu(grad_gates)
    if tuple(gg.shape) != tuple(gates.shape):
        raise ValueError(
            f"bsk: argument 'grad_gates': must have the shape of gates {tuple(gates.shape)}, "
            f"got {tuple(gg.shape)}"
        )
    gg_rows = gg.reshape(g_rows.shape)
    grad_z = torch.empty_like(g_rows)
    for r in range(g_rows.shape[0]):
        _C.sparsek_gates_vjp(_dl(g_rows[r]), _dl(gg_rows[r]), _dl(grad_z[r]))
    return grad_z.reshape(*lead, m)


def topk_select(z: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., min(k, m)] (int64) of the winners of float32 ``z`` [..., m] under the spec's
    order: larger value first, ties toward the larger index; listed in that order."""
    rows, lead, m = _rows(z, "z")
    k = _validate.integer(k, "k")
    n = max(min(k, m), 0)  # k < 0 is left for the C++ validation to reject
    idx = torch.empty((rows.shape[0], n), dtype=torch.int64)
    for r in range(rows.shape[0]):
        count = _C.topk_select(_dl(rows[r]), k, _dl(idx[r]))
        if count != n:
            raise RuntimeError(f"bsk: topk_select returned {count} indices, expected {n}")
    return idx.reshape(*lead, n)


def sparsek_scores(
    x: torch.Tensor, w_score: torch.Tensor, slope: Union[float, torch.Tensor]
) -> torch.Tensor:
    """The paper's scorer ``u[b, h, j] = x[b, j, :] . w_score[:, h] + slope[h] * j``.

    x: float32 [B, S, Dmodel]; w_score: float32 [Dmodel, Hkv]; slope: a scalar or float32 [Hkv].
    Returns u, float32 [B, Hkv, S], ready for :func:`blackwell_sparsek.sparsek_attention`.
    """
    _validate.tensor(x, "x")
    _validate.tensor(w_score, "w_score")
    if not isinstance(slope, torch.Tensor):
        if isinstance(slope, bool) or not isinstance(slope, (int, float)):
            _validate.fail("slope", f"must be a float or a tensor, got {type(slope).__name__}",
                           TypeError)
    x = x.detach().cpu()
    w_score = w_score.detach().cpu()
    heads = w_score.shape[1] if w_score.dim() == 2 else 1
    if not isinstance(slope, torch.Tensor):
        slope = torch.tensor(float(slope), dtype=torch.float32)
    slope = slope.detach().cpu()
    if slope.dim() == 0:
        slope = slope.expand(heads)
    if x.dim() == 3 and w_score.dim() == 2:
        u = torch.empty((x.shape[0], heads, x.shape[1]), dtype=torch.float32)
    else:  # the C++ validation names the bad argument
        u = torch.empty((0, 0, 0), dtype=torch.float32)
    _C.sparsek_scores(_dl(x), _dl(w_score), _dl(slope), _dl(u))
    return u
