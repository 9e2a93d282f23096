"""Regression tests for the silent failures and unhelpful messages of issue 8 (found by fuzzing
the public API on the CPU paths). Each test failed before its fix; the defect number is in the
test's name."""

import math

import numpy as np
import pytest
import torch
from torch.utils.dlpack import to_dlpack as dl

import blackwell_sparsek as bsk
from blackwell_sparsek import _C
from blackwell_sparsek import reference as ref
from conftest import ref_attention


def rand(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def qkv(B=1, S=6, Hq=2, Hkv=2, D=16, dtype=torch.float64, seed=0):
    return (rand((B, S, Hq, D), dtype, seed), rand((B, S, Hkv, D), dtype, seed + 1),
            rand((B, S, Hkv, D), dtype, seed + 2))


# ---- 1: meta tensors ----------------------------------------------------------------------------


@pytest.mark.parametrize("on_meta", ["k", "v"])
def test_1_meta_kv_with_cpu_q_is_rejected(on_meta):
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v}
    args[on_meta] = args[on_meta].to("meta")
    with pytest.raises(ValueError, match=rf"argument '{on_meta}'.*meta"):
        bsk.attention(args["q"], args["k"], args["v"])


def test_1_meta_scores_with_cpu_q_is_rejected():
    q, k, v = qkv()
    u = torch.zeros(1, 2, 6, device="meta")
    with pytest.raises(ValueError, match=r"argument 'u'.*meta"):
        bsk.sparsek_attention(q, k, v, u, 2, 2)


def test_1_all_meta_invalid_shapes_are_rejected():
    m = torch.device("meta")
    with pytest.raises(ValueError, match=r"argument 'k'.*multiple of Hkv"):
        bsk.attention(torch.empty(1, 4, 3, 16, device=m), torch.empty(1, 4, 2, 16, device=m),
                      torch.empty(1, 4, 2, 16, device=m))
    with pytest.raises(ValueError, match=r"argument 'q'.*4-D"):
        bsk.attention(torch.empty(4, 3, 16, device=m), torch.empty(1, 4, 3, 16, device=m),
                      torch.empty(1, 4, 3, 16, device=m))
    with pytest.raises(ValueError, match=r"argument 'u'.*shape"):
        bsk.ops.sparsek_fwd(torch.empty(1, 4, 2, 16, device=m), torch.empty(1, 4, 2, 16, device=m),
                            torch.empty(1, 4, 2, 16, device=m), torch.empty(1, 2, 5, device=m),
                            2, 2, "key_value", None)


def test_1_all_meta_valid_call_outside_tracing_is_rejected():
    m = torch.device("meta")
    with pytest.raises(ValueError, match=r"argument 'q'.*meta tensor"):
        bsk.attention(*(torch.empty(1, 4, 2, 16, device=m) for _ in range(3)))


# ---- 2: inputs that require grad ----------------------------------------------------------------
# Once refused (no backward); since issue 9 they get their gradients, never silently none.


def test_2_inputs_that_need_grad_get_gradients():
    q, k, v = qkv()
    q.requires_grad_()
    bsk.attention(q, k, v).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    v.requires_grad_()
    bsk.sdpa(q.detach().transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    v.grad = None
    u = torch.zeros(1, 2, 6)
    bsk.sparsek_attention(q.detach(), k, v, u, 2, 2).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    # The float64 reference detaches its inputs: it still refuses rather than drop the gradient.
    with pytest.raises(NotImplementedError, match=r"argument 'q'.*requires grad.*not differentiable"):
        ref.attention(q, k, v)


def test_2_compiled_attention_gives_the_eager_gradient():
    q, k, v = qkv()
    q.requires_grad_()
    fn = torch.compile(lambda a, b, c: bsk.attention(a, b, c), backend="aot_eager")
    fn(q, k, v).sum().backward()
    got, q.grad = q.grad, None
    bsk.attention(q, k, v).sum().backward()
    torch.testing.assert_close(got, q.grad, rtol=0, atol=0)


# ---- 3: softmax_scale carried as a double, default explicit -------------------------------------


@pytest.mark.parametrize("scale", [1e-46, 1e-300, 1e39, 0.1])
def test_3_scale_is_used_as_given_in_double(scale):
    q, k, v = qkv(S=9, seed=3)
    out, lse = bsk.attention(q, k, v, causal=True, softmax_scale=scale, return_lse=True)
    eo, el = ref_attention(q, k, v, causal=True, scale=scale)
    torch.testing.assert_close(out, eo, rtol=1e-12, atol=1e-12)
    # lse is float32 by contract: beyond its range (scale 1e39) it is inf, like the oracle's.
    torch.testing.assert_close(lse, el.float(), rtol=2.0**-22, atol=1e-6)


def test_3_tiny_scale_is_not_the_default():
    q, k, v = qkv(S=9, seed=4)
    tiny = bsk.attention(q, k, v, softmax_scale=1e-46)
    default = bsk.attention(q, k, v)
    assert (tiny - default).abs().max() > 1e-3


def test_3_zero_scale_is_an_error_not_the_default():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"argument 'softmax_scale'.*> 0"):
        bsk.attention(q, k, v, softmax_scale=0.0)
    with pytest.raises(ValueError, match=r"argument 'scale'.*> 0"):
        bsk.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.0)
    with pytest.raises(ValueError, match=r"argument 'softmax_scale'.*> 0"):
        _C.attention_forward(dl(q), dl(k), dl(v), dl(torch.empty_like(q)), None, False, 0.0, 0)


def test_3_cuda_refuses_scales_float32_cannot_carry(cuda):
    # The kernels scale in float32: a scale that would turn into 0, a denormal or inf there is an
    # error naming the rule, never a silent change of meaning.
    q = torch.randn(1, 8, 2, 64, device=cuda, dtype=torch.float16)
    for scale in (1e-46, 1e-39, 1e39):
        with pytest.raises(ValueError, match=r"argument 'softmax_scale'.*normal float32 on CUDA"):
            bsk.attention(q, q, q, softmax_scale=scale)


# ---- 4: SPARSEK gates for large tied scores -----------------------------------------------------


def test_4_gates_of_large_ties():
    gates, _ = ref.sparsek_gates(torch.tensor([1e17, 1e17, 0.0]), 1)
    assert gates.tolist() == [0.5, 0.5, 0.0]
    gates, _ = ref.sparsek_gates(torch.full((1000,), 1e12), 1)
    torch.testing.assert_close(gates, torch.full((1000,), 1e-3), rtol=1e-6, atol=0)
    assert abs(gates.double().sum().item() - 1.0) < 1e-5


def test_4_sparsek_attention_with_large_tied_scores():
    # Scores in {0, big}: ties inside each group, groups at least 1 apart, so the gates (hence the
    # output) are those of the same pattern in {0, 5}.
    q, k, v = qkv(S=24, seed=5)
    pattern = (torch.arange(24) % 3 == 0).float().reshape(1, 1, 24).expand(1, 2, 24).contiguous()
    small = bsk.sparsek_attention(q, k, v, pattern * 5.0, 3, 2)
    for big in (1e12, 1e17, 3e38):
        torch.testing.assert_close(bsk.sparsek_attention(q, k, v, pattern * big, 3, 2), small,
                                   rtol=0, atol=0)


# ---- 5: non-finite values at keys a row cannot see ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_5_masked_nonfinite_value_does_not_reach_the_row(dtype, bad):
    S = 13
    q, k, v = qkv(S=S, Hq=2, Hkv=1, D=8, dtype=dtype, seed=6)
    clean = bsk.attention(q, k, v, causal=True)
    for j in range(S):
        kb, vb = k.clone(), v.clone()
        vb[0, j, 0, 3] = bad
        kb[0, j, 0, 5] = bad
        out = bsk.attention(q, kb, vb, causal=True)
        assert torch.equal(out[:, :j], clean[:, :j]), f"key {j} leaked into earlier rows"


def test_5_unattended_nonfinite_value_does_not_reach_sparsek_rows():
    S, j, w = 20, 4, 2
    q, k, v = qkv(S=S, seed=7)
    u = rand((1, 2, S), torch.float32, 8)
    u[:, :, j] = -100.0  # never selected while other candidates compete
    clean = bsk.sparsek_attention(q, k, v, u, 1, w)
    vb = v.clone()
    vb[0, j, :, 0] = math.inf
    out = bsk.sparsek_attention(q, k, vb, u, 1, w)
    seen = list(range(j, j + w))  # j is in these rows' window
    rows = [t for t in range(S) if t not in seen]
    assert torch.equal(out[:, rows], clean[:, rows])


# ---- 6: messages in the caller's words ----------------------------------------------------------


@pytest.mark.parametrize("bad", [None, [1.0, 2.0], 1.5, np.zeros((1, 6, 2, 16))])
@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_6_non_tensor_inputs_are_type_errors(bad, arg):
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v}
    args[arg] = bad
    with pytest.raises(TypeError, match=rf"argument '{arg}': must be a torch.Tensor"):
        bsk.attention(**args)
    sd = {"query": q, "key": k, "value": v}
    name = {"q": "query", "k": "key", "v": "value"}[arg]
    sd[name] = bad
    with pytest.raises(TypeError, match=rf"argument '{name}': must be a torch.Tensor"):
        bsk.sdpa(**sd)
    with pytest.raises(TypeError, match=rf"argument '{arg}': must be a torch.Tensor"):
        bsk.sparsek_attention(**args, u=torch.zeros(1, 2, 6), k_budget=2, window=2)
    with pytest.raises(TypeError, match=rf"argument '{arg}': must be a torch.Tensor"):
        ref.attention(**args)
    with pytest.raises(TypeError, match=r"argument 'u': must be a torch.Tensor"):
        bsk.sparsek_attention(q, k, v, bad, 2, 2)


def test_6_sdpa_speaks_bhsd_and_its_own_names():
    q = rand((1, 4, 6, 16))  # BHSD
    k = rand((2, 2, 6, 16))
    with pytest.raises(ValueError, match=r"argument 'key': batch size must match query \(1\), "
                                         r"got \[2, 2, 6, 16\]"):
        bsk.sdpa(q, k, k, enable_gqa=True)
    k = rand((1, 3, 6, 16))
    with pytest.raises(ValueError, match=r"argument 'key': Hq \(4\) must be a multiple of Hkv "
                                         r"\(3\)"):
        bsk.sdpa(q, k, k, enable_gqa=True)
    with pytest.raises(ValueError, match=r"argument 'value': must have the shape of key "
                                         r"\[1, 4, 6, 16\], got \[1, 4, 5, 16\]"):
        bsk.sdpa(q, q, q[:, :, :5])
    with pytest.raises(ValueError,
                       match=r"argument 'query': must be a 4-D tensor \[B, Hq, Sq, D\]"):
        bsk.sdpa(q[0], q, q)
    with pytest.raises(ValueError, match=r"argument 'scale'.*got nan"):
        bsk.sdpa(q, q, q, scale=float("nan"))
    # A rule only libbsk checks (memory layout) is still reported with sdpa's names.
    strided = rand((1, 4, 6, 32))[..., ::2]
    with pytest.raises(ValueError, match=r"argument 'key': last dimension"):
        bsk.sdpa(q, strided, q)


def test_6_sparsek_budget_and_window_use_the_python_names():
    q, k, v = qkv()
    u = torch.zeros(1, 2, 6)
    with pytest.raises(ValueError, match=r"argument 'k_budget'"):
        bsk.ops.sparsek_fwd(q, k, v, u, -1, 2, "key_value", None)
    with pytest.raises(ValueError, match=r"argument 'window'"):
        bsk.ops.sparsek_fwd(q, k, v, u, 1, -2, "key_value", None)
    with pytest.raises(TypeError, match=r"argument 'k_budget': must be an int"):
        bsk.sparsek_attention(q, k, v, u, 2.5, 2)
    with pytest.raises(TypeError, match=r"argument 'gate': must be a str"):
        bsk.sparsek_attention(q, k, v, u, 2, 2, gate=None)


@pytest.mark.parametrize("k", [1.5, "2", None, torch.tensor(2)])
def test_6_reference_helpers_want_an_int_budget(k):
    with pytest.raises(TypeError, match=r"argument 'k': must be an int"):
        ref.sparsek_gates(torch.zeros(4), k)
    with pytest.raises(TypeError, match=r"argument 'k': must be an int"):
        ref.topk_select(torch.zeros(4), k)
    with pytest.raises(TypeError, match=r"argument 'z': must be a torch.Tensor"):
        ref.sparsek_gates([1.0, 2.0], 1)


def test_6_over_long_length_is_refused_before_allocation():
    # out would be 2^48 bytes: the length rule must be stated before torch tries to allocate it.
    q = torch.zeros(1, 1, 1, 1024).expand(1, 2**30, 64, 1024)
    k = torch.zeros(1, 4, 64, 1024)
    with pytest.raises(ValueError, match=r"argument 'q': sequence length must be below 2\^30"):
        bsk.attention(q, k, k)


def test_6_zero_heads_follow_the_rule_of_zero_batch_and_length():
    for shape_q, shape_kv in [((0, 4, 2, 16), (0, 4, 2, 16)), ((1, 0, 2, 16), (1, 4, 2, 16)),
                              ((1, 4, 0, 16), (1, 4, 2, 16)), ((1, 4, 0, 16), (1, 4, 0, 16))]:
        q, k = torch.zeros(shape_q), torch.zeros(shape_kv)
        out, lse = bsk.attention(q, k, k, return_lse=True)
        assert out.shape == q.shape and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    with pytest.raises(ValueError, match=r"argument 'k'.*Hkv == 0 needs Hq == 0"):
        bsk.attention(torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 0, 16), torch.zeros(1, 4, 0, 16))


# ---- 7: aliasing between outputs and inputs at the _C entry points ------------------------------


def test_7_sparsek_outputs_must_not_alias_scores():
    q, k, v = qkv(S=8, Hq=2, Hkv=2, D=16, dtype=torch.float32)
    buf = torch.zeros(8 * 2 * 16)
    out = buf.view(1, 8, 2, 16)
    u = buf[: 2 * 8].view(1, 2, 8)
    lse = torch.empty(1, 2, 8)
    with pytest.raises(ValueError, match=r"argument 'out': overlaps u's memory"):
        _C.sparsek_attention_forward(dl(q), dl(k), dl(v), dl(u), dl(out), dl(lse), 2, 2,
                                     "key_value", None, 0)
    u2 = lse.view(1, 2, 8)
    with pytest.raises(ValueError, match=r"argument 'lse': overlaps u's memory"):
        _C.sparsek_attention_forward(dl(q), dl(k), dl(v), dl(u2), dl(torch.empty_like(q)),
                                     dl(lse), 2, 2, "key_value", None, 0)


def test_7_scorer_output_must_not_alias_its_inputs():
    x = torch.randn(1, 6, 4)
    slope = torch.zeros(1)
    u = x.view(1, 1, 24)[:, :, :6]
    with pytest.raises(ValueError, match=r"argument 'u': overlaps x's memory"):
        _C.sparsek_scores(dl(x), dl(torch.randn(4, 1)), dl(slope), dl(u))
    buf = torch.randn(16)
    w, u = buf[:4].view(4, 1), buf[:6].view(1, 1, 6)
    with pytest.raises(ValueError, match=r"argument 'u': overlaps w_score's memory"):
        _C.sparsek_scores(dl(x), dl(w), dl(slope), dl(u))
