"""The CUDA kernels through the Python package, against float64 references.

Accuracy criterion (as in FlashAttention's tests): the max abs error of our float16/bfloat16
output vs a float64 reference must be at most twice that of torch's math SDPA run in the same
dtype (plus a tiny floor for cases where both are exact). Every test here needs a CUDA GPU and is
skipped without one.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.dlpack import to_dlpack as dl

import blackwell_sparsek as bsk
from blackwell_sparsek import _C
from conftest import causal_mask

# Every test here runs once per kernel family (conftest.kernel_path).
pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("kernel_path")]

FLOOR = 1e-5


HALF = [torch.float16, torch.bfloat16]


def dname(d):
    return str(d).split(".")[-1]


def randn(shape, dtype, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)


def bhsd(t):
    return t.transpose(1, 2)


def visible(sq, skv, causal, device):
    return causal_mask(sq, skv, device) if causal else torch.ones(sq, skv, dtype=torch.bool,
                                                                    device=device)


def math_sdpa(q, k, v, causal, dtype, scale=None):
    """torch's math SDPA in `dtype` on BSHD inputs (GQA by repeating KV heads), bottom-right
    causal mask. Rows without a visible key are NaN here; callers drop them."""
    rep = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(rep, dim=2)
    vv = v.repeat_interleave(rep, dim=2)
    mask = visible(q.shape[1], k.shape[1], causal, q.device)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(bhsd(q).to(dtype), bhsd(kk).to(dtype),
                                             bhsd(vv).to(dtype), attn_mask=mask, scale=scale)
    return bhsd(out)


def ref64(q, k, v, causal, scale=None):
    """float64 output and lse on the GPU; rows with no key: out 0, lse -inf."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    rep = q.shape[2] // k.shape[2]
    qd = bhsd(q).double()
    kd = bhsd(k.repeat_interleave(rep, dim=2)).double()
    vd = bhsd(v.repeat_interleave(rep, dim=2)).double()
    s = torch.matmul(qd, kd.transpose(-1, -2)) * scale
    s = s.masked_fill(~visible(q.shape[1], k.shape[1], causal, q.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.nan_to_num(torch.exp(s - lse.unsqueeze(-1)), nan=0.0)
    return bhsd(torch.matmul(p, vd)), lse


def check_accuracy(q, k, v, causal, out, lse, scale=None):
    B, Sq, Hq, D = q.shape
    Skv = k.shape[1]
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_cuda
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
    ro, rl = ref64(q, k, v, causal, scale)
    rows = (torch.arange(Sq, device=q.device) + (Skv - Sq) >= 0) if causal else \
        torch.ones(Sq, dtype=torch.bool, device=q.device)
    assert torch.all(out[:, ~rows] == 0), "rows without a key must be 0"
    assert torch.all(lse[:, :, ~rows] == float("-inf")), "rows without a key must have lse -inf"
    if not rows.any():
        return
    mo = math_sdpa(q, k, v, causal, q.dtype, scale)
    err_ours = (out[:, rows].double() - ro[:, rows]).abs().max().item()
    err_torch = (mo[:, rows].double() - ro[:, rows]).abs().max().item()
    assert math.isfinite(err_ours) and err_ours <= 2 * err_torch + FLOOR, \
        f"max abs error {err_ours:.3e} > 2 x torch math ({err_torch:.3e}) + {FLOOR}"
    torch.testing.assert_close(lse[:, :, rows].double(), rl[:, :, rows], rtol=1e-4, atol=1e-3)


# ---- the seed shapes -----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H", [8, 16, 32, 64, 96, 128])
def test_seed_shapes_allclose(H, causal):
    B, S, D = 16, 512, 64
    q, k, v = (randn((B, S, H, D), torch.float16, s) for s in (1, 2, 3))
    out = bsk.attention(q, k, v, causal=causal)
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(bhsd(q).float(), bhsd(k).float(), bhsd(v).float(),
                                             is_causal=causal)  # Sq == Skv: alignment agrees
    ref = bhsd(ref)
    assert torch.allclose(out.float(), ref, rtol=1e-3, atol=2e-3), \
        f"max abs diff {(out.float() - ref).abs().max().item():.3e}"


# ---- accuracy vs float64 on odd shapes ---------------------------------------------------------


# (B, Sq, Skv, Hq, Hkv, D)
SHAPES = [
    (2, 1, 1, 4, 4, 64),
    (2, 17, 17, 4, 4, 64),
    (1, 1000, 1000, 2, 2, 128),
    (1, 1, 1000, 8, 8, 64),       # decode-like (Sq = 1 runs the decode kernel)
    (3, 1, 5000, 32, 8, 128),     # decode, GQA 32/8, many splits
    (2, 1, 77, 12, 1, 64),        # decode, MQA with 12 heads: two CTAs per group, one half empty
    (2, 100, 300, 4, 4, 128),     # Sq < Skv
    (2, 300, 100, 4, 4, 64),      # Sq > Skv: leading rows see no key when causal
    (1, 257, 257, 32, 8, 128),    # GQA 32/8
    (1, 129, 129, 8, 1, 64),      # MQA
]


@pytest.mark.parametrize("dtype", HALF, ids=dname)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Sq{}_Skv{}_H{}x{}_D{}".format(*s))
def test_accuracy_vs_float64(shape, causal, dtype):
    B, Sq, Skv, Hq, Hkv, D = shape
    q = randn((B, Sq, Hq, D), dtype, 4)
    k = randn((B, Skv, Hkv, D), dtype, 5)
    v = randn((B, Skv, Hkv, D), dtype, 6)
    out, lse = bsk.attention(q, k, v, causal=causal, return_lse=True)
    check_accuracy(q, k, v, causal, out, lse)


@pytest.mark.parametrize("dtype", HALF, ids=dname)
def test_softmax_scale(dtype):
    q, k, v = (randn((2, 200, 4, 64), dtype, s) for s in (7, 8, 9))
    out, lse = bsk.attention(q, k, v, causal=True, softmax_scale=0.3, return_lse=True)
    check_accuracy(q, k, v, True, out, lse, scale=float(torch.tensor(0.3)))


@pytest.mark.parametrize("dtype", HALF, ids=dname)
def test_non_contiguous(dtype):
    B, S, H, D = 2, 300, 8, 128
    q = bhsd(randn((B, H, S, D), dtype, 10))  # a BHSD tensor seen as BSHD
    qkv = randn((B, S, 3, H, D), dtype, 11)  # packed: k and v are strided slices
    k, v = qkv[:, :, 1], qkv[:, :, 2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out, lse = bsk.attention(q, k, v, causal=True, return_lse=True)
    check_accuracy(q, k, v, True, out, lse)
    torch.testing.assert_close(out, bsk.attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                                  causal=True), rtol=0, atol=0)


def test_sdpa_bhsd_matches_torch():
    q, k, v = (randn((2, 8, 333, 64), torch.bfloat16, s) for s in (12, 13, 14))
    out = bsk.sdpa(q, k, v, is_causal=True)
    ro, _ = ref64(bhsd(q), bhsd(k), bhsd(v), True)
    with sdpa_kernel(SDPBackend.MATH):
        mo = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    err_ours = (out.double() - bhsd(ro)).abs().max().item()
    err_torch = (mo.double() - bhsd(ro)).abs().max().item()
    assert err_ours <= 2 * err_torch + FLOOR


# ---- buffers, determinism, streams ---------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq_skv", [(77, 50), (1, 50), (1, 3000)], ids=lambda t: "Sq{}_Skv{}".format(*t))
def test_poisoned_outputs_fully_written(causal, sq_skv):
    # Sq > Skv: the empty rows must be written too; Sq = 1: the decode kernel, split or not.
    (Sq, Skv), B, H, D = sq_skv, 2, 4, 64
    q = randn((B, Sq, H, D), torch.float16, 15)
    k = randn((B, Skv, H, D), torch.float16, 16)
    v = randn((B, Skv, H, D), torch.float16, 17)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, Sq), float("nan"), device="cuda")
    _C.attention_forward(dl(q), dl(k), dl(v), dl(out), dl(lse), causal, None,
                         torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    check_accuracy(q, k, v, causal, out, lse)
    # lse=None: out alone is written.
    out2 = torch.full_like(q, float("nan"))
    _C.attention_forward(dl(q), dl(k), dl(v), dl(out2), None, causal, None,
                         torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.equal(out2, out)


@pytest.mark.parametrize("dtype", HALF, ids=dname)
def test_bitwise_deterministic(dtype):
    q, k, v = (randn((4, 1000, 8, 128), dtype, s) for s in (18, 19, 20))
    a, la = bsk.attention(q, k, v, causal=True, return_lse=True)
    b, lb = bsk.attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_runs_on_the_current_stream():
    q, k, v = (randn((4, 512, 8, 64), torch.float16, s) for s in (21, 22, 23))
    expect = bsk.attention(q, k, v, causal=True)
    q2 = randn((4, 512, 8, 64), torch.float16, 24)
    expect2 = bsk.attention(q2, k, v, causal=True)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()  # non-blocking w.r.t. the legacy default stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # delay the side stream: a kernel on another stream races
        q.copy_(q2)
        out = bsk.attention(q, k, v, causal=True)
    side.synchronize()
    assert torch.equal(out, expect2), "the kernel did not run after work queued on the stream"
    assert not torch.equal(expect, expect2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_second_device():
    q, k, v = (randn((1, 64, 2, 64), torch.float16, s, device="cuda:1") for s in (25, 26, 27))
    out, lse = bsk.attention(q, k, v, causal=True, return_lse=True)
    assert out.device == q.device
    check_accuracy(q, k, v, True, out, lse)


# ---- alignment copies and bad inputs -------------------------------------------------------------


def test_misaligned_inputs_are_copied():
    B, S, H, D = 2, 64, 4, 64
    base = randn((B * S * H * D + 1,), torch.float16, 28)
    q_off = base[1:].view(B, S, H, D)  # data pointer 2 bytes past 16-byte alignment
    k_wide = randn((B, S, H, D + 4), torch.float16, 29)
    k_str = k_wide[..., :D]  # head stride 68: not a multiple of 8 elements
    v = randn((B, S, H, D), torch.float16, 30)
    assert q_off.data_ptr() % 16 != 0 and k_str.stride(2) % 8 != 0
    out = bsk.attention(q_off, k_str, v, causal=True)
    torch.testing.assert_close(out, bsk.attention(q_off.clone(), k_str.contiguous(), v,
                                                  causal=True), rtol=0, atol=0)
    # The binding itself keeps the rule: such views reach it only through the ops' copy.
    o = torch.empty_like(v)
    with pytest.raises(ValueError, match=r"argument 'q'.*16-byte"):
        _C.attention_forward(dl(q_off), dl(v), dl(v), dl(o), None, False, None, 0)
    with pytest.raises(ValueError, match=r"argument 'k'.*multiples of 8"):
        _C.attention_forward(dl(v), dl(k_str), dl(v), dl(o), None, False, None, 0)


def test_bad_cuda_inputs_raise_value_error():
    q = randn((1, 16, 2, 64), torch.float16, 31)
    with pytest.raises(ValueError, match=r"argument 'q'.*head dim must be 64 or 128"):
        x = randn((1, 16, 2, 96), torch.float16, 32)
        bsk.attention(x, x, x)
    with pytest.raises(ValueError, match=r"argument 'q'.*float16 or bfloat16"):
        x = q.float()
        bsk.attention(x, x, x)
    with pytest.raises(ValueError, match=r"argument 'k'.*same device"):
        bsk.attention(q, q.cpu(), q)
    with pytest.raises(ValueError, match=r"argument 'v'.*dtype of q"):
        bsk.attention(q, q, q.bfloat16())
    with pytest.raises(ValueError, match=r"argument 'q'.*contiguous"):
        x = randn((1, 16, 2, 128), torch.float16, 33)[..., ::2]
        bsk.attention(x, q, q)
    with pytest.raises(ValueError, match=r"argument 'lse'.*shape"):
        _C.attention_forward(dl(q), dl(q), dl(q), dl(torch.empty_like(q)),
                             dl(torch.empty(1, 16, 2, device="cuda")), False, None, 0)


def test_opcheck_cuda():
    q, k, v = (randn((1, 40, 4, 64), torch.float16, s) for s in (38, 39, 40))
    torch.library.opcheck(torch.ops.blackwell_sparsek.attention_fwd.default,
                          (q, k[:, :, :2], v[:, :, :2], True, None))


def test_no_keys_gives_zero_rows():
    """Skv = 0: every row sees no key (out 0, lse -inf) on both kernel families; the Hopper path
    once crashed the process building a TMA descriptor with a dimension of size 0."""
    for sq in (5, 1):  # Sq = 1 takes the decode kernel (it once divided by zero here)
        q = randn((2, sq, 4, 64), torch.float16, 41)
        k = torch.empty((2, 0, 2, 64), device="cuda", dtype=torch.float16)
        for causal in (False, True):
            out, lse = bsk.attention(q, k, k, causal=causal, return_lse=True)
            torch.cuda.synchronize()
            assert torch.equal(out, torch.zeros_like(out))
            assert torch.equal(lse, torch.full_like(lse, -math.inf))


def test_direct_eager_path_only_when_nothing_watches():
    """Plain eager calls skip the torch dispatcher (ops.direct_call_ok); anything that watches
    or transforms calls still sees the op, and both routes give the same bits."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from blackwell_sparsek import ops

    q, k, v = (randn((2, 33, 4, 64), torch.float16, s) for s in (1, 2, 3))
    assert ops.direct_call_ok(q, k, v)
    direct = bsk.attention(q, k, v, causal=True)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        assert not ops.direct_call_ok(q, k, v)
        via_op = bsk.attention(q, k, v, causal=True)
    assert any("blackwell_sparsek.attention_fwd_nograd" in n for n in seen.names), seen.names
    assert torch.equal(direct, via_op)
    # sdpa's direct call reads the BHSD views as they are; the op route transposes them.
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    for causal in (False, True):
        direct = bsk.sdpa(qh, kh, vh, is_causal=causal)
        with Seen():
            via_op = bsk.sdpa(qh, kh, vh, is_causal=causal)
        assert direct.shape == via_op.shape and direct.stride() == via_op.stride()
        assert torch.equal(direct, via_op)
    qg = q.clone().requires_grad_()
    assert not ops.direct_call_ok(qg, k, v)
    with torch.no_grad():
        assert ops.direct_call_ok(qg, k, v)
    assert not ops.direct_call_ok(q.cpu(), k, v)
    assert not ops.direct_call_ok(torch.nn.Parameter(q), k, v)
