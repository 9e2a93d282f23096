"""The CPU path of blackwell_sparsek.attention / sdpa (the C++ float64 reference behind the torch
op) against an attention written in plain torch float64 in conftest.ref_attention, plus the error
contract: every bad argument is a ValueError naming the argument."""

import ctypes
import math

import pytest
import torch
import torch.nn.functional as F

import blackwell_sparsek as bsk
from blackwell_sparsek import _C
from conftest import causal_mask, ref_attention

# The library stores its result in the input dtype; that rounding (half an ulp, relative
# 2^-11 / 2^-8 / 2^-24 / 2^-53) is the only error the float64-accumulating reference may add.
# rtol is twice the half-ulp bound.
RTOL = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23,
        torch.float64: 1e-12}
# Absolute floor: float16's subnormal spacing is 2^-24 (below 2^-14 rounding is absolute).
ATOL = {torch.float16: 2.0**-24, torch.bfloat16: 1e-12, torch.float32: 1e-12, torch.float64: 1e-12}
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def default_scale(d):
    return 1.0 / math.sqrt(d)


def make(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def check(out, lse, q, k, v, causal=False, scale=None, mask=None):
    d = q.shape[-1]
    ref_out, ref_lse = ref_attention(q, k, v, causal=causal,
                                     scale=default_scale(d) if scale is None else scale,
                                     mask=mask)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    torch.testing.assert_close(out.double(), ref_out, rtol=RTOL[q.dtype], atol=ATOL[q.dtype])
    # lse is float32: relative 2^-24 rounding of a value of size ~ log(Skv) + max logit.
    torch.testing.assert_close(lse.double(), ref_lse, rtol=2.0**-22, atol=1e-6)


# (B, Sq, Skv, Hq, Hkv, D, causal)
SHAPES = [
    (1, 1, 1, 1, 1, 64, False),
    (1, 1, 1, 1, 1, 64, True),
    (2, 17, 17, 4, 4, 64, True),
    (2, 17, 17, 3, 3, 32, False),
    (1, 5, 17, 4, 2, 64, True),     # Sq < Skv, causal bottom-right
    (1, 17, 5, 2, 2, 16, True),     # Sq > Skv: the first rows see no key
    (2, 33, 40, 8, 2, 128, False),  # GQA 8/2
    (1, 9, 9, 4, 1, 64, True),      # MQA
    (1, 1, 23, 2, 1, 8, True),      # decode-like: one query, all keys visible
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Sq{}_Skv{}_H{}x{}_D{}_{}".format(
    *s[:6], "causal" if s[6] else "full"))
def test_attention_matches_float64(shape, dtype):
    B, Sq, Skv, Hq, Hkv, D, causal = shape
    q = make((B, Sq, Hq, D), dtype, 1)
    k = make((B, Skv, Hkv, D), dtype, 2)
    v = make((B, Skv, Hkv, D), dtype, 3)
    out, lse = bsk.attention(q, k, v, causal=causal, return_lse=True)
    check(out, lse, q, k, v, causal=causal)
    # return_lse=False returns the same output alone.
    assert torch.equal(bsk.attention(q, k, v, causal=causal), out)


def test_causal_is_bottom_right_and_empty_rows():
    # Sq > Skv: rows t < Sq - Skv see no key -> out 0, lse -inf (FlashAttention convention).
    q, k, v = make((1, 6, 2, 16), torch.float32, 4), make((1, 3, 2, 16), torch.float32, 5), \
        make((1, 3, 2, 16), torch.float32, 6)
    out, lse = bsk.attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert torch.all(lse[:, :, :3] == float("-inf"))
    assert torch.all(torch.isfinite(lse[:, :, 3:]))
    # The last query row always sees every key.
    full = bsk.attention(q[:, -1:], k, v, causal=False)
    torch.testing.assert_close(out[:, -1:], full, rtol=RTOL[torch.float32], atol=1e-9)


def test_softmax_scale():
    q, k, v = (make((2, 7, 2, 32), torch.float64, s) for s in (7, 8, 9))
    out, lse = bsk.attention(q, k, v, causal=True, softmax_scale=0.3, return_lse=True)
    check(out, lse, q, k, v, causal=True, scale=0.3)
    # The default is None, spelled out: 0 is not a way to ask for it (it is refused).
    with pytest.raises(ValueError, match=r"argument 'softmax_scale'.*finite and > 0"):
        bsk.attention(q, k, v, softmax_scale=0.0)


def test_non_contiguous_inputs():
    B, S, H, D = 2, 19, 4, 32
    # q: a BHSD tensor seen as BSHD; k: every other head of a wider tensor plus a sliced head
    # dim; v: a slice of a packed qkv tensor [B, S, 3, H, D].
    q = make((B, H, S, D), torch.float32, 10).transpose(1, 2)
    k = make((B, S, 2 * H, D + 8), torch.float32, 11)[:, :, ::2, 3:3 + D]
    v = make((B, S, 3, H, D), torch.float32, 12)[:, :, 2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out, lse = bsk.attention(q, k, v, causal=True, return_lse=True)
    check(out, lse, q, k, v, causal=True)
    torch.testing.assert_close(
        out, bsk.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True),
        rtol=RTOL[torch.float32], atol=1e-9)


def test_expanded_kv_zero_stride():
    # Broadcast (stride 0) inputs are fine: only outputs must not alias.
    q = make((2, 5, 2, 16), torch.float64, 13)
    k = make((1, 5, 1, 16), torch.float64, 14).expand(2, 5, 2, 16)
    v = make((1, 5, 1, 16), torch.float64, 15).expand(2, 5, 2, 16)
    out, lse = bsk.attention(q, k, v, return_lse=True)
    check(out, lse, q, k, v)


def test_empty_batch():
    q = torch.zeros(0, 4, 2, 16)
    out, lse = bsk.attention(q, q, q, return_lse=True)
    assert out.shape == (0, 4, 2, 16) and lse.shape == (0, 2, 4)


def test_requires_grad_inputs_run_forward_without_grad_mode():
    q = make((1, 4, 2, 16), torch.float32, 16).requires_grad_()
    with torch.no_grad():
        out = bsk.attention(q, q.detach(), q.detach())
    ref, _ = ref_attention(q, q, q, scale=default_scale(16))
    torch.testing.assert_close(out.double(), ref, rtol=RTOL[torch.float32], atol=1e-9)


# ---- sdpa: BHSD, torch semantics ------------------------------------------------------------------


@pytest.mark.parametrize("sq,skv", [(1, 1), (17, 17), (5, 17), (17, 5)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_matches_torch(sq, skv, is_causal):
    q = make((2, 4, sq, 32), torch.float64, 20)
    k = make((2, 4, skv, 32), torch.float64, 21)
    v = make((2, 4, skv, 32), torch.float64, 22)
    out = bsk.sdpa(q, k, v, is_causal=is_causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                         scale=default_scale(32))  # top-left, as torch defines
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_sdpa_gqa_scale_and_layout():
    q = make((1, 8, 9, 16), torch.float32, 23)
    k = make((1, 2, 9, 16), torch.float32, 24)
    v = make((1, 2, 9, 16), torch.float32, 25)
    out = bsk.sdpa(q, k, v, is_causal=True, scale=0.5, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True,
                                         scale=0.5, enable_gqa=True)
    torch.testing.assert_close(out.double(), ref, rtol=RTOL[torch.float32], atol=1e-9)
    # Returned as a BHSD view of a contiguous BSHD buffer (no copy back).
    assert out.transpose(1, 2).is_contiguous()


def test_sdpa_rejects_unsupported():
    q = make((1, 2, 4, 16), torch.float32, 26)
    with pytest.raises(ValueError, match="attn_mask"):
        bsk.sdpa(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p"):
        bsk.sdpa(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="enable_gqa"):
        bsk.sdpa(q, q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match="argument 'query'"):
        bsk.sdpa(q[0], q, q)
    for bad in (0.0, -0.5):  # torch reads 0 as uniform weights; we refuse rather than differ
        with pytest.raises(ValueError, match="argument 'scale'"):
            bsk.sdpa(q, q, q, scale=bad)


# ---- errors: ValueError naming the argument ----------------------------------------------------


def _qkv(dtype=torch.float32, B=1, S=4, H=2, D=16):
    return (make((B, S, H, D), dtype, 30), make((B, S, H, D), dtype, 31),
            make((B, S, H, D), dtype, 32))


def test_error_bad_dtype():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"argument 'q'.*int32"):
        bsk.attention(q.to(torch.int32), k, v)
    with pytest.raises(ValueError, match=r"argument 'q'.*int64"):
        bsk.attention(q.to(torch.int64), k.to(torch.int64), v.to(torch.int64))
    with pytest.raises(ValueError, match=r"argument 'k'.*dtype of q"):
        bsk.attention(q, k.double(), v)
    with pytest.raises(ValueError, match=r"argument 'v'.*dtype of q"):
        bsk.attention(q, k, v.half())


def test_error_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"argument 'q'.*4-D"):
        bsk.attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"argument 'k'.*4-D"):
        bsk.attention(q, k[0], v)
    with pytest.raises(ValueError, match=r"argument 'q'.*at most 4"):
        bsk.attention(q.unsqueeze(0), k, v)
    with pytest.raises(ValueError, match=r"argument 'v'.*shape of k"):
        bsk.attention(q, k, v[:, :3])
    with pytest.raises(ValueError, match=r"argument 'k'.*batch"):
        bsk.attention(q, torch.cat([k, k]), torch.cat([v, v]))
    with pytest.raises(ValueError, match=r"argument 'k'.*head dim"):
        bsk.attention(q, k[..., :8], v[..., :8])
    q3 = make((1, 4, 3, 16), torch.float32, 33)
    with pytest.raises(ValueError, match=r"argument 'k'.*multiple of Hkv"):
        bsk.attention(q3, k, v)
    with pytest.raises(ValueError, match=r"argument 'q'.*head dim must be <= 1024"):
        big = torch.zeros(1, 1, 1, 1032)
        bsk.attention(big, big, big)


def test_error_layout_and_scale():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"argument 'q'.*contiguous"):
        bsk.attention(make((1, 4, 2, 32), torch.float32, 34)[..., ::2], k, v)
    with pytest.raises(ValueError, match=r"argument 'softmax_scale'"):
        bsk.attention(q, k, v, softmax_scale=float("inf"))
    with pytest.raises(ValueError, match=r"argument 'softmax_scale'"):
        bsk.attention(q, k, v, softmax_scale=float("nan"))


def test_error_direct_binding():
    """_C validates the buffers it is handed (the ops allocate them correctly)."""
    from torch.utils.dlpack import to_dlpack as dl
    q, k, v = _qkv()
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match=r"argument 'out'.*shape of q"):
        _C.attention_forward(dl(q), dl(k), dl(v), dl(out[:, :2]), None, False, None, 0)
    with pytest.raises(ValueError, match=r"argument 'out'.*zero stride"):
        _C.attention_forward(dl(q), dl(k), dl(v), dl(torch.empty(16).expand(1, 4, 2, 16)),
                             None, False, None, 0)
    with pytest.raises(ValueError, match=r"argument 'lse'.*float32"):
        _C.attention_forward(dl(q), dl(k), dl(v), dl(out), dl(torch.empty(1, 2, 4).double()),
                             False, None, 0)
    with pytest.raises(ValueError, match=r"argument 'lse'.*shape"):
        _C.attention_forward(dl(q), dl(k), dl(v), dl(out), dl(torch.empty(1, 4, 2)), False, None, 0)
    # lse=None is allowed; tensors with __dlpack__ are accepted as well as capsules.
    _C.attention_forward(q, k, v, out, None, False, None, 0)
    ref, _ = ref_attention(q, k, v, scale=default_scale(16))
    torch.testing.assert_close(out.double(), ref, rtol=RTOL[torch.float32], atol=1e-9)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


def _foreign_capsule(t, device_type, device_id, keep):
    """A DLPack capsule describing CPU tensor t's memory as living on another device."""
    shape = (ctypes.c_int64 * t.dim())(*t.shape)
    strides = (ctypes.c_int64 * t.dim())(*t.stride())
    mt = _DLManagedTensor()
    mt.dl_tensor = _DLTensor(t.data_ptr(), _DLDevice(device_type, device_id), t.dim(),
                             _DLDataType(2, 16, 1), shape, strides, 0)
    keep.extend([shape, strides, mt])
    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(ctypes.addressof(mt), b"dltensor", None)


def test_error_device_translation():
    """DLPack device types reach libbsk: CUDA-marked host memory is rejected by its CUDA checks
    (as a bad argument on a GPU machine, as unsupported where CUDA has no device or driver),
    other device types by the binding, and mixed devices by the front door."""
    from torch.utils.dlpack import to_dlpack as dl
    keep = []
    q = torch.zeros(1, 4, 2, 64, dtype=torch.float16)
    qc = _foreign_capsule(q, 2, 0, keep)  # kDLCUDA
    kc = _foreign_capsule(q, 2, 0, keep)
    vc = _foreign_capsule(q, 2, 0, keep)
    oc = _foreign_capsule(torch.empty_like(q), 2, 0, keep)
    err = NotImplementedError if not torch.cuda.is_available() else ValueError
    with pytest.raises(err, match=r"\bq\b.*(CUDA|host memory)"):
        _C.attention_forward(qc, kc, vc, oc, None, False, None, 0)
    with pytest.raises(ValueError, match=r"argument 'k'.*same device as q \(cuda:0\), got cpu"):
        _C.attention_forward(_foreign_capsule(q, 2, 0, keep), dl(q), dl(q), dl(q.clone()),
                             None, False, None, 0)
    with pytest.raises(ValueError, match=r"argument 'q'.*DLPack device type 3"):
        _C.attention_forward(_foreign_capsule(q, 3, 0, keep), dl(q), dl(q), dl(q.clone()),
                             None, False, None, 0)


def test_error_mapping_keeps_message():
    q, k, v = _qkv()
    with pytest.raises(ValueError) as info:
        bsk.attention(q, k, v[:, :3])
    assert str(info.value).startswith("bsk: argument 'v': ")


def test_cpu_calls_go_through_the_op():
    from blackwell_sparsek import ops

    t = torch.zeros(1, 2, 1, 8)
    assert not ops.direct_call_ok(t, t, t)


def test_c_attention_forward_takes_bhsd_views():
    """_C.attention_forward(..., bhsd=True) reads q/k/v/out as [B, H, S, D] (sdpa's direct call):
    the same numbers as the BSHD call on the transposed views."""
    from torch.utils.dlpack import to_dlpack as dl

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, n, 16, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    k, v = k[:, :2], v[:, :2]  # GQA 4/2
    out = torch.full((2, 4, 5, 16), float("nan"), dtype=torch.float64)
    _C.attention_forward(dl(q), dl(k), dl(v), dl(out), None, True, None, 0, True)
    ref = torch.empty(2, 5, 4, 16, dtype=torch.float64)
    _C.attention_forward(dl(q.transpose(1, 2)), dl(k.transpose(1, 2)), dl(v.transpose(1, 2)),
                         dl(ref), None, True, None, 0)
    assert torch.equal(out, ref.transpose(1, 2))
