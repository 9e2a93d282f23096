"""The torch-side SparseK pieces (blackwell_sparsek.modules): the differentiable SPARSEK operator
against the float64 reference and its VJP, and SparseKAttention against the reference scorer."""
import pytest
import torch

import blackwell_sparsek as bsk


def _scores(kind, shape, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    if kind == "ties":
        z = torch.floor(2 * z)
    elif kind == "flat":
        z = torch.full(shape, 0.75)
    elif kind == "large":
        z = 1e6 + torch.floor(3 * z)
    return z


@pytest.mark.parametrize("kind", ["normal", "ties", "flat", "large"])
@pytest.mark.parametrize("k", [0, 1, 7, 40, 64])
def test_gates_match_reference(kind, k):
    z = _scores(kind, (3, 50), k + 11)
    ref, _ = bsk.reference.sparsek_gates(z, k)
    got = bsk.sparsek_gates(z, k)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert torch.allclose(got.double().sum(-1), torch.full((3,), float(min(k, 50)), dtype=torch.float64),
                          atol=1e-4)


def test_gates_backward_is_the_spec_vjp():
    z = _scores("normal", (4, 30), 3).requires_grad_()
    g = torch.randn(4, 30, generator=torch.Generator().manual_seed(4))
    gates = bsk.sparsek_gates(z, 6)
    gates.backward(g)
    expect = bsk.reference.sparsek_gates_vjp(gates.detach(), g)
    torch.testing.assert_close(z.grad, expect, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_gates_reject_non_finite(bad):
    z = torch.zeros(5)
    z[2] = bad
    with pytest.raises(ValueError, match="finite"):
        bsk.sparsek_gates(z, 2)


def test_module_matches_reference_scorer():
    torch.manual_seed(0)
    B, S, Dm, Hq, Hkv, D = 1, 40, 16, 4, 2, 8
    mod = bsk.SparseKAttention(Dm, Hkv, k_budget=6, window=4, slope_init=0.01)
    x = torch.randn(B, S, Dm)
    q, k, v = torch.randn(B, S, Hq, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    with torch.no_grad():
        got = mod(q, k, v, x)
        u = bsk.reference.sparsek_scores(x, mod.w_score, mod.slope)
    torch.testing.assert_close(mod.scores(x).detach(), u, rtol=1e-5, atol=1e-5)
    expect = bsk.sparsek_attention(q, k, v, u, 6, 4)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
