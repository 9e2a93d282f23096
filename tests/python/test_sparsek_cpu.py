"""SparseK on the CPU: blackwell_sparsek.reference helpers and sparsek_attention against
docs/SPARSEK_SPEC.md, re-implemented in plain torch float64 (slow loops, tiny shapes; the oracles
live in conftest.py, shared with the fuzz suite)."""

import pytest
import torch

import blackwell_sparsek as bsk
from blackwell_sparsek import reference as ref
from conftest import INF, gates_bisect, ref_attention, sparsek_oracle, spec_order


def make(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def window_mask(sq, skv, w):
    t = torch.arange(sq).unsqueeze(1)
    j = torch.arange(skv).unsqueeze(0)
    i = t + (skv - sq)
    return (j <= i) & (j >= i - w + 1)


# ---- SPARSEK operator ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 5, 19, 20, 30])
def test_gates_sum_to_k_and_match_bisection(k):
    z = make((3, 4, 20), torch.float32, 1) * 2.0
    gates, tau = ref.sparsek_gates(z, k)
    assert gates.shape == z.shape and gates.dtype == torch.float32
    assert tau.shape == (3, 4) and tau.dtype == torch.float64
    assert torch.all((gates >= 0) & (gates <= 1))
    torch.testing.assert_close(gates.double().sum(-1), torch.full((3, 4), float(min(k, 20)),
                                                                  dtype=torch.float64),
                               rtol=0, atol=1e-5)
    for r in range(3):
        for c in range(4):
            torch.testing.assert_close(gates[r, c].double(), gates_bisect(z[r, c], k),
                                       rtol=0, atol=1e-6)
    if k >= 20:
        assert torch.all(gates == 1) and torch.all(tau == -INF)
    elif k == 0:
        assert torch.all(gates == 0) and torch.all(tau == INF)
    else:  # gates == clip(z - tau, 0, 1)
        torch.testing.assert_close(gates.double(), (z.double() - tau.unsqueeze(-1)).clamp(0, 1),
                                   rtol=0, atol=1e-6)


def test_gates_non_unique_tau_reports_the_largest():
    gates, tau = ref.sparsek_gates(torch.tensor([3.0, 1.0, 3.0, 1.0]), 2)
    assert gates.tolist() == [1.0, 0.0, 1.0, 0.0]  # exactly the hard top-k mask
    assert tau.item() == 2.0  # any tau in [1, 2] works; the largest is reported
    gates, tau = ref.sparsek_gates(torch.tensor([0.5, 0.5, 0.5]), 1)
    torch.testing.assert_close(gates, torch.full((3,), 1.0 / 3.0), rtol=0, atol=1e-7)
    assert abs(tau.item() - (0.5 - 1.0 / 3.0)) < 1e-7


def test_gates_vjp_matches_finite_differences():
    # Distinct, well separated values: the gates are piecewise linear in z, so central
    # differences with a step below the distance to the next breakpoint are exact up to rounding.
    z = torch.tensor([[0.05, 0.31, 0.62, 0.9, 1.17, 1.5, 2.2, -0.4, 0.77],
                      [1.0, -1.3, 0.2, 0.45, 0.1, 2.0, 0.6, 0.35, -0.2]], dtype=torch.float32)
    k, h = 3, 1e-3
    c = make(z.shape, torch.float32, 2)
    gates, _ = ref.sparsek_gates(z, k)
    support = (gates > 0) & (gates < 1)
    assert torch.all(support.sum(-1) >= 2)  # the test must exercise the tau coupling
    grad = ref.sparsek_gates_vjp(gates, c)
    assert grad.shape == z.shape and grad.dtype == torch.float32
    fd = torch.zeros_like(z, dtype=torch.float64)
    for i in range(z.shape[1]):
        e = torch.zeros_like(z)
        e[:, i] = h
        gp, _ = ref.sparsek_gates(z + e, k)
        gm, _ = ref.sparsek_gates(z - e, k)
        assert torch.equal((gp > 0) & (gp < 1), support)  # no breakpoint crossed
        assert torch.equal((gm > 0) & (gm < 1), support)
        fd[:, i] = ((gp.double() - gm.double()) * c.double()).sum(-1) / (2 * h)
    torch.testing.assert_close(grad.double(), fd, rtol=0, atol=2e-3)
    assert torch.all(grad[~support] == 0)
    torch.testing.assert_close(grad.double().sum(-1), torch.zeros(2, dtype=torch.float64),
                               rtol=0, atol=1e-6)


def test_gates_vjp_without_fractional_support_is_zero():
    gates, _ = ref.sparsek_gates(torch.tensor([3.0, 1.0, 3.0, 1.0]), 2)
    grad = ref.sparsek_gates_vjp(gates, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.all(grad == 0)


def test_topk_tie_rule():
    z = torch.tensor([1.0, 5.0, 5.0, 2.0, 5.0])
    assert ref.topk_select(z, 2).tolist() == [4, 2]  # equal values: the larger index wins
    assert ref.topk_select(z, 4).tolist() == [4, 2, 1, 3]
    assert ref.topk_select(z, 10).tolist() == [4, 2, 1, 3, 0]
    assert ref.topk_select(z, 0).shape == (0,)
    # Batched, with many ties, against Python's sort on (-value, -index).
    zb = (make((4, 16), torch.float32, 3) * 2).round() / 2
    idx = ref.topk_select(zb, 6)
    assert idx.shape == (4, 6) and idx.dtype == torch.int64
    for r in range(4):
        assert idx[r].tolist() == spec_order(zb[r], range(16))[:6]


def test_scores_match_torch():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 7, generator=g).transpose(1, 2)  # [2, 7, 5], non-contiguous
    w_score = torch.randn(5, 3, generator=g)
    slope = torch.tensor([0.5, -0.25, 0.0])
    j = torch.arange(7, dtype=torch.float64)
    expect = torch.einsum("bjc,ch->bhj", x.double(), w_score.double()) + \
        slope.double()[None, :, None] * j
    u = ref.sparsek_scores(x, w_score, slope)
    assert u.shape == (2, 3, 7) and u.dtype == torch.float32
    torch.testing.assert_close(u.double(), expect, rtol=1e-5, atol=1e-5)
    u2 = ref.sparsek_scores(x, w_score, 0.125)  # scalar slope, shared by every head
    torch.testing.assert_close(u2.double(), expect - slope.double()[None, :, None] * j + 0.125 * j,
                               rtol=1e-5, atol=1e-5)


# ---- SparseK attention --------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["key_value", "value", "none"])
@pytest.mark.parametrize("sq,skv,kb,w", [(12, 12, 3, 2), (5, 12, 2, 3), (14, 9, 2, 2),
                                          (12, 12, 20, 1), (12, 12, 4, 0)])
def test_sparsek_matches_spec_oracle(gate, sq, skv, kb, w):
    q = make((1, sq, 4, 8), torch.float64, 5)
    k = make((1, skv, 2, 8), torch.float64, 6)
    v = make((1, skv, 2, 8), torch.float64, 7)
    u = (make((1, 2, skv), torch.float32, 8) * 2).round() / 2  # ties exercise the order rule
    out, lse = bsk.sparsek_attention(q, k, v, u, kb, w, gate=gate, return_lse=True)
    eo, el = sparsek_oracle(q, k, v, u, kb, w, gate)
    assert out.shape == q.shape and lse.shape == (1, 4, sq) and lse.dtype == torch.float32
    torch.testing.assert_close(out, eo, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse.double(), el, rtol=2.0**-22, atol=1e-6)


def test_sparsek_dtypes_and_scale():
    q = make((1, 10, 2, 16), torch.float64, 9)
    k = make((1, 10, 2, 16), torch.float64, 10)
    v = make((1, 10, 2, 16), torch.float64, 11)
    u = make((1, 2, 10), torch.float32, 12)
    for dtype, rtol in ((torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7),
                        (torch.float32, 2.0**-23)):
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
        eo, _ = sparsek_oracle(qd, kd, vd, u, 3, 2, "key_value", scale=0.4)
        out = bsk.sparsek_attention(qd, kd, vd, u, 3, 2, softmax_scale=0.4)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), eo, rtol=rtol, atol=2.0**-24)


@pytest.mark.parametrize("sq,skv,w", [(13, 13, 4), (6, 13, 3), (13, 7, 1)])
def test_k0_is_sliding_window(sq, skv, w):
    q = make((2, sq, 4, 16), torch.float64, 13)
    k = make((2, skv, 2, 16), torch.float64, 14)
    v = make((2, skv, 2, 16), torch.float64, 15)
    u = make((2, 2, skv), torch.float32, 16)
    out, lse = bsk.sparsek_attention(q, k, v, u, 0, w, return_lse=True)
    eo, el = ref_attention(q, k, v, scale=0.25, mask=window_mask(sq, skv, w))
    torch.testing.assert_close(out, eo, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse.double(), el, rtol=2.0**-22, atol=1e-6)


@pytest.mark.parametrize("sq,skv", [(11, 11), (4, 11), (11, 6)])
def test_w0_full_budget_hard_gate_is_causal(sq, skv):
    q = make((1, sq, 4, 16), torch.float64, 17)
    k = make((1, skv, 4, 16), torch.float64, 18)
    v = make((1, skv, 4, 16), torch.float64, 19)
    u = make((1, 4, skv), torch.float32, 20)
    out, lse = bsk.sparsek_attention(q, k, v, u, skv, 0, gate="none", return_lse=True)
    eo, el = ref_attention(q, k, v, causal=True, scale=0.25)
    torch.testing.assert_close(out, eo, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse.double(), el, rtol=2.0**-22, atol=1e-6)
    dense, dlse = bsk.attention(q, k, v, causal=True, return_lse=True)
    torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, dlse, rtol=0, atol=1e-6)


def test_reference_module_float64():
    q = make((1, 6, 2, 16), torch.float16, 21)
    u = make((1, 2, 6), torch.float32, 22)
    out = ref.sparsek_attention(q, q, q, u, 2, 2)
    assert out.dtype == torch.float64
    eo, _ = sparsek_oracle(q, q, q, u, 2, 2, "key_value")
    torch.testing.assert_close(out, eo, rtol=1e-9, atol=1e-9)
    out, lse = ref.attention(q, q, q, causal=True, return_lse=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float32
    eo, el = ref_attention(q, q, q, causal=True, scale=0.25)
    torch.testing.assert_close(out, eo, rtol=1e-9, atol=1e-9)


# ---- errors -------------------------------------------------------------------------------------


def test_sparsek_errors():
    q = make((1, 6, 2, 16), torch.float32, 23)
    u = torch.zeros(1, 2, 6)
    # The budget and window are named as this API names them (k is the key tensor here).
    with pytest.raises(ValueError, match=r"argument 'k_budget'.*budget must be >= 0"):
        bsk.sparsek_attention(q, q, q, u, -1, 2)
    with pytest.raises(ValueError, match=r"argument 'window'.*>= 0"):
        bsk.sparsek_attention(q, q, q, u, 2, -1)
    with pytest.raises(ValueError, match=r"argument 'k_budget'.*window == 0"):
        bsk.sparsek_attention(q, q, q, u, 0, 0)
    with pytest.raises(ValueError, match=r"argument 'gate'.*'topk'"):
        bsk.sparsek_attention(q, q, q, u, 2, 2, gate="topk")
    with pytest.raises(ValueError, match=r"argument 'u'.*float32"):
        bsk.sparsek_attention(q, q, q, u.double(), 2, 2)
    with pytest.raises(ValueError, match=r"argument 'u'.*shape"):
        bsk.sparsek_attention(q, q, q, u[:, :, :5], 2, 2)
    with pytest.raises(ValueError, match=r"argument 'u'.*3-D"):
        bsk.sparsek_attention(q, q, q, u[0], 2, 2)
    bad = u.clone()
    bad[0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"argument 'u'.*finite"):
        bsk.sparsek_attention(q, q, q, bad, 2, 2)
    with pytest.raises(ValueError, match=r"argument 'v'.*shape of k"):
        bsk.sparsek_attention(q, q, q[:, :5], u, 2, 2)


def test_reference_helper_errors():
    with pytest.raises(ValueError, match=r"argument 'z'.*float32"):
        ref.sparsek_gates(torch.zeros(4, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match=r"argument 'k'"):
        ref.sparsek_gates(torch.zeros(4), -1)
    with pytest.raises(ValueError, match=r"argument 'z'"):
        ref.topk_select(torch.tensor(1.0), 1)
    with pytest.raises(ValueError, match=r"argument 'k'"):
        ref.topk_select(torch.zeros(4), -2)
    with pytest.raises(ValueError, match=r"argument 'grad_gates'"):
        ref.sparsek_gates_vjp(torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match=r"argument 'w_score'"):
        ref.sparsek_scores(torch.zeros(1, 3, 5), torch.zeros(4, 2), 0.0)
    with pytest.raises(ValueError, match=r"argument 'slope'"):
        ref.sparsek_scores(torch.zeros(1, 3, 5), torch.zeros(5, 2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"argument 'x'.*3-D"):
        ref.sparsek_scores(torch.zeros(3, 5), torch.zeros(5, 2), 0.0)
