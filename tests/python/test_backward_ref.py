"""CPU reference backward passes (bsk::ref::attention_backward, sparsek_attention_backward)
against torch.autograd of float64 torch re-implementations written here from SPARSEK_SPEC.md, and
torch.autograd.gradcheck of the reference forward paired with the reference backward."""

import math
import zlib

import pytest
import torch

from blackwell_sparsek import _C

F64 = torch.float64


def rand(shape, gen, transpose=False):
    """float64 normal; with transpose, a non-contiguous view (dims 1 and 2 swapped in memory)."""
    if transpose and len(shape) == 4:
        s = (shape[0], shape[2], shape[1], shape[3])
        return torch.randn(s, generator=gen, dtype=F64).transpose(1, 2)
    return torch.randn(shape, generator=gen, dtype=F64)


def grads_like(q, k, v):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# ---- torch oracles (float64, autograd) -----------------------------------------------------------


def dense_torch(q, k, v, causal, scale):
    """Dense attention in q's dtype and on q's device (float64 here; test_autograd.py's GPU
    baseline runs it in float16/bfloat16)."""
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    grp = Hq // Hkv
    kr = k.repeat_interleave(grp, dim=2)
    vr = v.repeat_interleave(grp, dim=2)
    s = torch.einsum("bthd,bjhd->bhtj", q, kr) * scale
    i = torch.arange(Sq, device=q.device).unsqueeze(1) + (Skv - Sq)
    j = torch.arange(Skv, device=q.device).unsqueeze(0)
    mask = (j <= i) if causal else torch.ones(Sq, Skv, dtype=torch.bool, device=q.device)
    valid = mask.any(-1, keepdim=True)
    # Rows with no key: softmax over everything, then zeroed, so no NaN enters autograd.
    p = torch.softmax(s.masked_fill(~(mask | ~valid), -math.inf), dim=-1) * valid
    return torch.einsum("bhtj,bjhd->bthd", p, vr)


def spec_rank(u_row, m):
    """Candidates [0, m) in the spec's order: larger u first, ties toward the larger index."""
    return sorted(range(m), key=lambda j: (-u_row[j], -j))


def tau_closed_form(zs, k):
    """(U, W, tau) of the SPARSEK operator on zs sorted descending (k < len(zs)), the largest
    tau; None where the gates are exactly the hard top-k mask (no fractional gate)."""
    m = len(zs)
    best = None
    for U in range(0, k + 1):
        for W in range(U + 1, m + 1):
            tau = (sum(zs[U:W]) + U - k) / (W - U)
            if U > 0 and not zs[U - 1] >= tau + 1:
                continue
            if U < m and not zs[U] < tau + 1:
                continue
            if not zs[W - 1] > tau:
                continue
            if W < m and not zs[W] <= tau:
                continue
            if best is None or tau > best[2]:
                best = (U, W, tau)
    return best


def sparsek_torch(q, k, v, u, kk, w, gate, scale):
    """SparseK forward from the spec, differentiable in q, k, v and u (float64 leaf). U and W of
    tau's closed form are read off the values and held fixed, and gates clipped at 0 or 1 are
    constants, so autograd gives exactly the spec's SPARSEK VJP."""
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    grp = Hq // Hkv
    rows = []
    for b in range(B):
        for h in range(Hq):
            g = h // grp
            ul = u[b, g].tolist()
            hrows = []
            for t in range(Sq):
                i = Skv - Sq + t
                if i < 0:
                    hrows.append(torch.zeros(D, dtype=F64))
                    continue
                m = max(0, i - w + 1)
                rank = spec_rank(ul, m)
                sel = rank[:min(kk, m)]
                gates = {j: torch.ones((), dtype=F64) for j in sel}
                if gate != "none" and m > kk and kk > 0:
                    zs = [ul[j] for j in rank]
                    best = tau_closed_form(zs, kk)
                    if best is not None:
                        U, W, _ = best
                        tau = (u[b, g, rank[U:W]].sum() + U - kk) / (W - U)
                        for j in sel:
                            x = u[b, g, j] - tau
                            if not 0.0 < x.item() < 1.0:  # clipped: no gradient
                                x = torch.tensor(min(max(x.item(), 0.0), 1.0), dtype=F64)
                            gates[j] = x
                keys = sel + list(range(max(0, i - w + 1), i + 1 if w > 0 else 0))
                mv = torch.stack([gates[j] for j in sel] + [torch.ones((), dtype=F64)] *
                                 (len(keys) - len(sel)))
                s = scale * (k[b, keys, g] @ q[b, t, h])
                logit = mv * s if gate == "key_value" else s
                valw = mv if gate != "none" else torch.ones_like(mv)
                p = torch.softmax(logit, dim=0)
                hrows.append((p * valw) @ v[b, keys, g])
            rows.append(torch.stack(hrows))
    return torch.stack(rows).view(B, Hq, Sq, D).transpose(1, 2)


# ---- dense ----------------------------------------------------------------------------------------


DENSE_CASES = [
    # B, Sq, Skv, Hq, Hkv, D, causal, transposed views
    (1, 5, 5, 1, 1, 4, True, False),
    (2, 7, 11, 4, 2, 8, True, True),
    (1, 9, 4, 3, 1, 5, True, False),   # Sq > Skv: the first rows see no key
    (2, 6, 9, 2, 2, 3, False, True),
    (1, 3, 8, 6, 2, 16, False, False),
    (1, 4, 0, 2, 1, 4, False, False),  # no keys at all
]


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_backward_matches_autograd(case):
    B, Sq, Skv, Hq, Hkv, D, causal, tr = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    q = rand((B, Sq, Hq, D), gen, tr)
    k = rand((B, Skv, Hkv, D), gen, tr)
    v = rand((B, Skv, Hkv, D), gen, tr)
    do = rand((B, Sq, Hq, D), gen, tr)
    scale = 0.7 if D == 5 else None
    dq, dk, dv = grads_like(q, k, v)
    if tr:  # gradients into non-contiguous views too
        dq = torch.empty(B, Hq, Sq, D, dtype=F64).transpose(1, 2)
        dk = torch.empty(B, Hkv, Skv, D, dtype=F64).transpose(1, 2)
    _C.attention_backward_ref(q, k, v, do, dq, dk, dv, causal=causal, softmax_scale=scale)

    ql, kl, vl = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = dense_torch(ql, kl, vl, causal, scale if scale else 1.0 / math.sqrt(D))
    if Skv > 0:
        eq, ek, ev = torch.autograd.grad(out, (ql, kl, vl), do)
    else:
        eq, ek, ev = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for got, want in ((dq, eq), (dk, ek), (dv, ev)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_dense_backward_low_precision_dtypes():
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = (rand((1, 6, 2, 8), gen) for _ in range(4))
    ref = grads_like(q, k, v)
    _C.attention_backward_ref(q, k, v, do, *ref, causal=True)
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        args = [x.to(dt) for x in (q, k, v, do)]
        got = grads_like(*args[:3])
        _C.attention_backward_ref(*args, *got, causal=True)
        # Same inputs rounded once: the float64 gradients of the rounded inputs are the oracle.
        want = grads_like(q, k, v)
        _C.attention_backward_ref(*[x.double() for x in args], *want, causal=True)
        for g, wnt in zip(got, want):
            assert g.dtype == dt
            torch.testing.assert_close(g.double(), wnt, rtol=tol, atol=tol)


# ---- SparseK --------------------------------------------------------------------------------------


SPARSEK_CASES = [
    # B, Sq, Skv, Hq, Hkv, D, k, w, scores ("randn", "ties", "separated"), transposed views
    (1, 12, 12, 2, 1, 4, 3, 2, "randn", False),
    (2, 9, 14, 4, 2, 8, 4, 3, "randn", True),
    (1, 10, 10, 2, 2, 4, 2, 0, "ties", False),      # w = 0, ties
    (1, 11, 11, 3, 1, 5, 0, 3, "randn", False),     # k = 0: sliding window
    (1, 8, 8, 2, 1, 4, 20, 1, "randn", False),      # |C_i| <= k everywhere
    (1, 12, 7, 2, 1, 4, 2, 2, "ties", True),        # Sq > Skv
    (2, 16, 16, 4, 1, 4, 5, 1, "randn", False),
    (1, 13, 13, 2, 2, 4, 3, 1, "separated", False),  # hard masks where gaps exceed 1
]


def make_scores(kind, B, Hkv, Skv, gen):
    if kind == "ties":  # few distinct values: ties in the order and within tau's support
        return (torch.randint(0, 4, (B, Hkv, Skv), generator=gen) * 0.5).float()
    if kind == "separated":
        return (torch.randn(B, Hkv, Skv, generator=gen, dtype=F64) * 3.0).float()
    return (torch.randn(B, Hkv, Skv, generator=gen, dtype=F64) * 0.8).float()


@pytest.mark.parametrize("gate", ["key_value", "value", "none"])
@pytest.mark.parametrize("case", SPARSEK_CASES)
def test_sparsek_backward_matches_autograd(case, gate):
    B, Sq, Skv, Hq, Hkv, D, kk, w, kind, tr = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, gate)).encode()))
    q = rand((B, Sq, Hq, D), gen, tr)
    k = rand((B, Skv, Hkv, D), gen, tr)
    v = rand((B, Skv, Hkv, D), gen, tr)
    do = rand((B, Sq, Hq, D), gen, tr)
    u = make_scores(kind, B, Hkv, Skv, gen)
    scale = 1.0 / math.sqrt(D)
    dq, dk, dv = grads_like(q, k, v)
    du = torch.full_like(u, float("nan"))
    _C.sparsek_attention_backward_ref(q, k, v, u, do, dq, dk, dv, du, k_budget=kk, window=w,
                                      gate=gate)

    ql, kl, vl = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ul = u.double().requires_grad_()
    out = sparsek_torch(ql, kl, vl, ul, kk, w, gate, scale)
    # The oracle's forward is the reference forward: checks the oracle itself against the spec.
    fwd = torch.empty_like(q)
    _C.sparsek_attention_forward(q, k, v, u, fwd, None, k_budget=kk, window=w, gate=gate)
    torch.testing.assert_close(out.detach(), fwd, rtol=1e-12, atol=1e-12)
    eq, ek, ev, eu = torch.autograd.grad(out, (ql, kl, vl, ul), do, allow_unused=True)
    eu = torch.zeros_like(ul) if eu is None else eu
    for got, want in ((dq, eq), (dk, ek), (dv, ev)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # du is float32 by contract: compare at float32 rounding.
    torch.testing.assert_close(du.double(), eu, rtol=1e-6, atol=1e-6)
    if gate == "none" or kk == 0:
        assert torch.all(du == 0)


def test_sparsek_du_reaches_unselected_candidates():
    # One row (Sq = 1), k = 1, w = 1: candidates [0, 4); scores 0.9, 0.8, 0.7 and -5 share tau,
    # only u_0 is selected, yet u_1 and u_2 (fractional gates) get gradient through tau.
    gen = torch.Generator().manual_seed(11)
    q, k, v = rand((1, 1, 1, 4), gen), rand((1, 5, 1, 4), gen), rand((1, 5, 1, 4), gen)
    do = rand((1, 1, 1, 4), gen)
    u = torch.tensor([[[0.9, 0.8, 0.7, -5.0, 0.0]]], dtype=torch.float32)
    dq, dk, dv = grads_like(q, k, v)
    du = torch.empty_like(u)
    _C.sparsek_attention_backward_ref(q, k, v, u, do, dq, dk, dv, du, k_budget=1, window=1)
    assert du[0, 0, 1] != 0 and du[0, 0, 2] != 0 and du[0, 0, 3] == 0 and du[0, 0, 4] == 0
    # Gradient w.r.t. tau's support sums to zero (the gates keep summing to k).
    assert abs(du.double().sum().item()) < 1e-6


# ---- gradcheck: the reference forward with the reference backward ---------------------------------


class DenseRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal):
        ctx.save_for_backward(q, k, v)
        ctx.causal = causal
        out = torch.empty_like(q)
        _C.attention_forward(q, k, v, out, None, causal=causal)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = grads_like(q, k, v)
        _C.attention_backward_ref(q, k, v, do.contiguous(), dq, dk, dv, causal=ctx.causal)
        return dq, dk, dv, None


class SparseKRef(torch.autograd.Function):
    """u enters as float64 holding float32 values (gradcheck perturbs float64 inputs)."""

    @staticmethod
    def forward(ctx, q, k, v, u64, kk, w, gate):
        u = u64.float()
        ctx.save_for_backward(q, k, v, u)
        ctx.params = (kk, w, gate)
        out = torch.empty_like(q)
        _C.sparsek_attention_forward(q, k, v, u, out, None, k_budget=kk, window=w, gate=gate)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, u = ctx.saved_tensors
        kk, w, gate = ctx.params
        dq, dk, dv = grads_like(q, k, v)
        du = torch.empty_like(u)
        _C.sparsek_attention_backward_ref(q, k, v, u, do.contiguous(), dq, dk, dv, du,
                                          k_budget=kk, window=w, gate=gate)
        return dq, dk, dv, du.double(), None, None, None


@pytest.mark.parametrize("causal", [False, True])
def test_dense_gradcheck(causal):
    gen = torch.Generator().manual_seed(5)
    q = rand((1, 6, 2, 4), gen).requires_grad_()
    k = rand((1, 6, 1, 4), gen).requires_grad_()
    v = rand((1, 6, 1, 4), gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: DenseRef.apply(a, b, c, causal), (q, k, v))


# Well-separated scores (multiples of 2^-10, so u +- 2^-10 is exact in float32): with k = 2,
# w = 1 every row's gates are fractional or clipped by a margin far above the perturbation.
GC_U = [0.25, 1.5, 0.625, 2.0, -1.0, 1.75, 0.875, 1.25]


def _gate_margin(u, kk, w, S):
    """Smallest distance of any u_j - tau to 0 or 1, and of any selection gap, over the rows."""
    margin = math.inf
    for i in range(S):
        m = max(0, i - w + 1)
        if m <= kk:
            continue
        rank = spec_rank(u, m)
        zs = [u[j] for j in rank]
        margin = min(margin, zs[kk - 1] - zs[kk])
        best = tau_closed_form(zs, kk)
        if best is not None:
            for z in zs:
                margin = min(margin, abs(z - best[2]), abs(z - best[2] - 1))
    return margin


@pytest.mark.parametrize("gate", ["key_value", "value"])
def test_sparsek_gradcheck(gate):
    S, kk, w = len(GC_U), 2, 1
    assert _gate_margin(GC_U, kk, w, S) > 0.05
    gen = torch.Generator().manual_seed(7)
    q = rand((1, S, 2, 4), gen).requires_grad_()
    k = rand((1, S, 1, 4), gen).requires_grad_()
    v = rand((1, S, 1, 4), gen).requires_grad_()
    u = torch.tensor(GC_U, dtype=F64).view(1, 1, S)
    # q, k, v at gradcheck's defaults; u fixed.
    assert torch.autograd.gradcheck(
        lambda a, b, c: SparseKRef.apply(a, b, c, u, kk, w, gate), (q, k, v))
    # u alone, with a perturbation float32 holds exactly; du is float32, hence the tolerances.
    ug = u.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: SparseKRef.apply(q.detach(), k.detach(), v.detach(), x, kk, w, gate), (ug,),
        eps=2.0**-10, atol=1e-5, rtol=1e-3)


def test_sparsek_gradcheck_gqa_none_gate():
    # gate "none": du must be exactly zero, q/k/v gradients as usual (GQA, 2 KV heads).
    gen = torch.Generator().manual_seed(9)
    q = rand((1, 6, 4, 4), gen).requires_grad_()
    k = rand((1, 6, 2, 4), gen).requires_grad_()
    v = rand((1, 6, 2, 4), gen).requires_grad_()
    u = torch.randn(1, 2, 6, generator=gen, dtype=F64).float().double()
    assert torch.autograd.gradcheck(
        lambda a, b, c: SparseKRef.apply(a, b, c, u, 2, 2, "none"), (q, k, v))


def test_backward_bindings_validate():
    q = torch.zeros(1, 4, 2, 4, dtype=F64)
    k = v = torch.zeros(1, 4, 1, 4, dtype=F64)
    dq, dk, dv = grads_like(q, k, v)
    with pytest.raises(ValueError, match="dk"):
        _C.attention_backward_ref(q, k, v, q.clone(), dq, torch.empty(1, 4, 2, 4, dtype=F64), dv)
    u = torch.zeros(1, 1, 4)
    with pytest.raises(ValueError, match="du"):
        _C.sparsek_attention_backward_ref(q, k, v, u, q.clone(), dq, dk, dv, u.double(),
                                          k_budget=1, window=1)
    with pytest.raises(ValueError, match="no key"):
        _C.sparsek_attention_backward_ref(q, k, v, u, q.clone(), dq, dk, dv, u.clone(),
                                          k_budget=0, window=0)
