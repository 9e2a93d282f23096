"""BlackwellSparseK: dense and SparseK attention forward for PyTorch.

Public API
----------
- :func:`attention` -- dense attention on BSHD tensors, like ``flash_attn_func``.
- :func:`sdpa` -- the same on BHSD tensors with the signature of
  ``torch.nn.functional.scaled_dot_product_attention``.
- :func:`sparsek_attention` -- SparseK attention (docs/SPARSEK_SPEC.md).
- :class:`SparseKCache` -- SparseK generation: a decoding cache of constant memory.
- :mod:`blackwell_sparsek.reference` -- the float64 CPU reference of every op (the test oracle).
- :mod:`blackwell_sparsek.ops` -- the underlying ``torch.ops.blackwell_sparsek`` custom ops.

CUDA tensors run the tensor-core kernels (float16/bfloat16, head dim 64 or 128) on the current
torch stream; CPU tensors run the C++ reference (float16, bfloat16, float32 or float64). All of
them trace under ``torch.compile(fullgraph=True)``. Bad arguments raise ``ValueError`` (a bad
value) or ``TypeError`` (not a tensor, not an int, ...) naming the argument as the caller wrote it;
requests this build cannot serve raise ``NotImplementedError``.

Training: :func:`attention`, :func:`sdpa`, :func:`sparsek_attention` and :class:`SparseKAttention`
are differentiable in q, k, v and the scores u (eagerly and under torch.compile); the backward
runs the GPU kernels on CUDA and the float64 reference on CPU, including a gradient that
reaches the returned ``lse``. Calls where no input
needs a gradient skip autograd entirely (they run the ops' autograd-free twins, see
:mod:`blackwell_sparsek.ops`).

Inputs are used in place (DLPack, zero copy), with one exception: a CUDA q/k/v whose data pointer
is not 16-byte aligned or whose batch/sequence/head stride is not a multiple of 8 elements (the
kernels load 16-byte vectors) is first copied to a contiguous tensor.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

try:
    from . import _C
except ImportError as _e:  # e.g. the source tree (python/) is on sys.path instead of the install
    raise ImportError(
        "blackwell_sparsek._C (the compiled extension) is missing or does not load: install the "
        "package with `pip install --no-build-isolation .` from the repository root and import "
        f"it from there, not from the python/ source folder ({_e})"
    ) from _e
from . import _validate
from . import ops
from . import reference

__version__: str = _C.version()

__all__ = [
    "__version__",
    "attention",
    "cuda_archs",
    "ops",
    "reference",
    "sdpa",
    "sparsek_attention",
    "sparsek_gates",
    "SparseKAttention",
    "SparseKCache",
]

_attention_fwd = ops.attention_fwd
_sparsek_fwd = ops.sparsek_fwd
_attention_fwd_nograd = ops.attention_fwd_nograd
_sparsek_fwd_nograd = ops.sparsek_fwd_nograd
_needs_grad = _validate.needs_grad


def cuda_archs() -> list:
    """The CUDA archs this build carries machine code for (BSK_CUDA_ARCHS at build time)."""
    return _C.cuda_archs()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Dense attention, ``softmax(scale * q k^T) v``, on BSHD tensors (like ``flash_attn_func``).

    q: [B, Sq, Hq, D]; k, v: [B, Skv, Hkv, D] with ``Hq % Hkv == 0`` (GQA/MQA); any strides with
    the last dim contiguous. ``causal`` is bottom-right aligned (query row t sees keys
    ``j <= t + Skv - Sq``, as in FlashAttention); rows that see no key give 0 (lse -inf).
    ``softmax_scale`` None means ``1/sqrt(D)``.

    Returns ``out`` [B, Sq, Hq, D] (q's dtype, contiguous), or ``(out, lse)`` with lse the float32
    natural-log softmax denominator [B, Hq, Sq] when ``return_lse``.
    """
    _validate.inputs(("q", q), ("k", k), ("v", v))
    _validate.boolean(causal, "causal")
    _validate.scale(softmax_scale, "softmax_scale")
    out, lse = _attention_forward(q, k, v, causal, softmax_scale, return_lse)
    return (out, lse) if return_lse else out


def _attention_forward(q, k, v, causal, softmax_scale, with_lse):
    """(out, lse) of a dense forward: the CUDA implementation itself for a plain eager call
    (ops.direct_call_ok; lse None unless with_lse), else the differentiable op or its
    autograd-free twin."""
    if ops.direct_call_ok(q, k, v):
        return ops.attention_cuda(q, k, v, causal, softmax_scale, with_lse)
    fwd = _attention_fwd if _needs_grad(q, k, v) else _attention_fwd_nograd
    return fwd(q, k, v, causal, softmax_scale)


def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on 4-D BHSD tensors.

    query: [B, Hq, Sq, D]; key, value: [B, Hkv, Skv, D]. The inputs are transposed to BSHD views
    (no copy) and the result is returned as a BHSD view of a contiguous BSHD tensor.
    ``is_causal`` follows torch's top-left alignment (row t sees keys ``j <= t``), also when
    ``Sq != Skv``. Unsupported (``ValueError``): ``attn_mask``, ``dropout_p != 0``,
    ``scale <= 0``, and ``Hq != Hkv`` without ``enable_gqa=True`` (as in torch).
    """
    _validate.inputs(("query", query), ("key", key), ("value", value))
    if attn_mask is not None:
        raise ValueError("bsk: argument 'attn_mask': not supported; use is_causal or None")
    if dropout_p != 0.0:
        raise ValueError(f"bsk: argument 'dropout_p': must be 0 (no dropout), got {dropout_p}")
    _validate.boolean(is_causal, "is_causal")
    _validate.boolean(enable_gqa, "enable_gqa")
    # torch reads scale=0 as uniform weights; libbsk has no such mode. Refuse, not guess.
    scale = _validate.scale(scale, "scale")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        _validate.attention(query, key, value, names=_validate.SDPA)
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError(
            f"bsk: argument 'key': has {key.shape[1]} heads but query has {query.shape[1]}; "
            "pass enable_gqa=True for grouped-query attention"
        )
    try:
        if ops.direct_call_ok(query, key, value) and (
                not is_causal or query.shape[2] == key.shape[2]):
            return ops.attention_cuda_bhsd(query, key, value, is_causal, scale)
        return _sdpa_bshd(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                          is_causal, scale).transpose(1, 2)
    except ValueError as e:
        # Checked only on failure, so that valid calls pay nothing for it: the same rule, stated
        # with sdpa's names and BHSD shapes where it is a shape rule ...
        _validate.attention(query, key, value, names=_validate.SDPA)
        # ... and otherwise (strides, memory) libbsk's message with the names translated.
        renamed = _SDPA_NAMES.sub(lambda m: f"argument '{_SDPA_RENAME[m[1]]}'", str(e))
        raise ValueError(renamed) from None


_SDPA_RENAME = {"q": "query", "k": "key", "v": "value", "softmax_scale": "scale"}
_SDPA_NAMES = re.compile(r"argument '(q|k|v|softmax_scale)'")


def _sdpa_bshd(q, k, v, is_causal, scale):
    sq, skv = q.shape[1], k.shape[1]
    if not is_causal or sq == skv:
        out, _ = _attention_forward(q, k, v, is_causal, scale, False)
    elif sq < skv:
        # Top-left: row t sees keys j <= t < Sq, so keys from Sq on are never used, and on the
        # first Sq keys top-left and bottom-right alignment coincide.
        out, _ = _attention_forward(q, k[:, :sq], v[:, :sq], True, scale, False)
    else:
        # Sq > Skv: rows t < Skv are the square causal problem, later rows see every key.
        head, _ = _attention_forward(q[:, :skv], k, v, True, scale, False)
        tail, _ = _attention_forward(q[:, skv:], k, v, False, scale, False)
        out = torch.cat((head, tail), dim=1)
    return out


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
    """SparseK attention (arXiv:2406.16747) exactly as docs/SPARSEK_SPEC.md defines it.

    Each query attends causally (bottom-right aligned) to its last ``window`` keys plus the
    ``k_budget`` earlier keys with the largest score ``u`` (float32 [B, Hkv, Skv], finite),
    soft-gated by the SPARSEK operator. ``gate``: "key_value" (the paper's form), "value" or
    "none" (hard top-k). q/k/v as in :func:`attention`. (The budget is called ``k`` in the paper
    and the C++ API; it is ``k_budget`` here because ``k`` is the key tensor.)

    Returns ``out`` or ``(out, lse)`` as :func:`attention`. CUDA tensors (fp16/bf16, head dim
    64/128) run the GPU selection and fused kernel; CPU tensors the float64 reference. On CUDA,
    gates "key_value" and "value" also need each (batch, KV head)'s scores to span at most 2^20
    (max - min <= 1048576) when a selection runs; wider spans raise ValueError.
    """
    _validate.inputs(("q", q), ("k", k), ("v", v), ("u", u))
    _validate.sparsek_params(k_budget, window, gate)
    _validate.scale(softmax_scale, "softmax_scale")
    fwd = _sparsek_fwd if _needs_grad(q, k, v, u) else _sparsek_fwd_nograd
    out, lse = fwd(q, k, v, u, k_budget, window, gate, softmax_scale)
    return (out, lse) if return_lse else out


from .modules import SparseKAttention, sparsek_gates  # noqa: E402  (needs sparsek_attention)
from .cache import SparseKCache  # noqa: E402
