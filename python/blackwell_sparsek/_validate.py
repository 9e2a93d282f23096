"""Argument checks done in Python, in the caller's words.

Why they exist next to libbsk's C++ validation (which stays the authority at run time):

- the fake (meta) implementations of the custom ops see no data and never reach C++, so without
  these checks torch.compile, and eager calls on meta tensors, accepted any shape;
- the ops allocate ``out`` from q's shape before C++ sees anything, so the length rule must come
  first;
- ``sdpa`` and ``sparsek_attention`` name their arguments differently from the C++ API (``query``,
  ``scale``, BHSD shapes; ``k_budget``, ``window``), and a message must use the names the caller
  wrote;
- a Python object that is not a tensor (None, a list, a numpy array, a float) must be answered
  with a TypeError naming the argument, not with an error from deep inside torch or nanobind.

Every error has the form ``bsk: argument 'NAME': RULE`` like libbsk's.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple, Optional

import torch

#: Longest sequence the kernels index with 32-bit arithmetic (libbsk: "below 2^30").
MAX_LEN = 2**30 - 1
#: CUDA grid limit on batch size and head count.
MAX_GRID = 65535
GATES = ("key_value", "value", "none")

_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)


class Names(NamedTuple):
    """The caller's names for q, k, v and the scale, and where S and H sit in its layout."""

    q: str = "q"
    k: str = "k"
    v: str = "v"
    scale: str = "softmax_scale"
    seq_dim: int = 1  # BSHD
    head_dim: int = 2
    q_layout: str = "[B, Sq, Hq, D]"
    kv_layout: str = "[B, Skv, Hkv, D]"


BSHD = Names()
SDPA = Names("query", "key", "value", "scale", 2, 1, "[B, Hq, Sq, D]", "[B, Hkv, Skv, D]")


def fail(name: str, rule: str, exc=ValueError):
    raise exc(f"bsk: argument '{name}': {rule}")


def tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        fail(name, f"must be a torch.Tensor, got {type(x).__name__}", TypeError)


def boolean(x, name: str) -> None:
    if x is not True and x is not False:
        fail(name, f"must be a bool, got {type(x).__name__}", TypeError)


def integer(x, name: str) -> int:
    if isinstance(x, bool) or isinstance(x, torch.Tensor):
        fail(name, f"must be an int, got {type(x).__name__}", TypeError)
    try:
        return operator.index(x)
    except TypeError:
        fail(name, f"must be an int, got {type(x).__name__}", TypeError)


def scale(x, name: str) -> Optional[float]:
    """None (the default 1/sqrt(D)) or a finite number > 0, returned as a Python float."""
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        fail(name, f"must be a float or None, got {type(x).__name__}", TypeError)
    try:
        s = float(x)
    except OverflowError:  # an int beyond the float range
        s = math.inf
    if not (math.isfinite(s) and s > 0.0):
        fail(name, f"must be finite and > 0 (None selects 1/sqrt(head_dim)), got {x!r}")
    return s


def inputs(*named) -> None:
    """Each (name, value) is a tensor."""
    for name, t in named:
        tensor(t, name)


def needs_grad(*ts) -> bool:
    """Whether autograd must record a call on these tensors (the front doors then call the
    differentiable op, otherwise its cheaper autograd-free twin)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def detached(*named, what: str) -> None:
    """For functions that are not differentiable (the float64 reference, the decoding cache):
    refuse inputs that need a gradient instead of returning a result that silently carries
    none."""
    inputs(*named)
    if not torch.is_grad_enabled():
        return
    for name, t in named:
        if t.requires_grad:
            fail(name, f"requires grad, but {what} is not differentiable; call it under "
                       "torch.no_grad() or pass a detached tensor",
                 NotImplementedError)


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def _no_meta(t: torch.Tensor, name: str) -> None:
    if t.device.type == "meta" and not _is_fake(t):
        fail(name, "is a meta tensor, which holds no data: pass CPU or CUDA tensors (meta "
                   "tensors are only traced, by torch.compile)")


def _device(t: torch.Tensor, name: str, q: torch.Tensor, qname: str) -> None:
    if t.device.type not in ("cpu", "cuda", "meta"):
        fail(name, f"is on {t.device}; only CPU and CUDA tensors are supported")
    if t.device != q.device:
        # A plain meta tensor among real ones is the culprit, whichever argument it is.
        _no_meta(q, qname)
        _no_meta(t, name)
        fail(name, f"must be on the same device as {qname} ({q.device}), got {t.device}")


def attention(q, k, v, names: Names = BSHD, u=None) -> None:
    """The rules libbsk's check_attention_args states on shapes, dtypes and devices (strides,
    alignment and memory overlap need data and stay with libbsk)."""
    n = names
    for t, name in ((q, n.q), (k, n.k), (v, n.v)):
        tensor(t, name)
    for t, name, layout in ((q, n.q, n.q_layout), (k, n.k, n.kv_layout), (v, n.v, n.kv_layout)):
        if t.dim() != 4:
            fail(name, f"must be a 4-D tensor {layout}, got {t.dim()}-D {_shape(t)}")
    for t, name in ((q, n.q), (k, n.k), (v, n.v)):
        _device(t, name, q, n.q)
    cuda = q.device.type == "cuda"
    allowed = _CUDA_DTYPES if cuda else _CPU_DTYPES
    if q.dtype not in allowed:
        fail(n.q, "dtype must be " + ", ".join(str(d).replace("torch.", "") for d in allowed) +
             f"{' on CUDA' if cuda else ''}, got {str(q.dtype).replace('torch.', '')}")
    for t, name in ((k, n.k), (v, n.v)):
        if t.dtype != q.dtype:
            fail(name, f"must have the dtype of {n.q} ({q.dtype}), got {t.dtype}")
    s, h = n.seq_dim, n.head_dim
    batch, sq, hq, d = q.shape[0], q.shape[s], q.shape[h], q.shape[3]
    skv, hkv = k.shape[s], k.shape[h]
    if k.shape[0] != batch:
        fail(n.k, f"batch size must match {n.q} ({batch}), got {_shape(k)}")
    if k.shape[3] != d:
        fail(n.k, f"head dim must match {n.q} ({d}), got {_shape(k)}")
    if v.shape != k.shape:
        fail(n.v, f"must have the shape of {n.k} {_shape(k)}, got {_shape(v)}")
    if hkv == 0 and hq != 0:
        fail(n.k, f"Hkv is 0 but Hq is {hq}; Hq must be a multiple of Hkv (GQA/MQA), so "
                  "Hkv == 0 needs Hq == 0")
    if hkv != 0 and hq % hkv != 0:
        fail(n.k, f"Hq ({hq}) must be a multiple of Hkv ({hkv}) for GQA/MQA")
    if d < 1:
        fail(n.q, f"head dim must be >= 1, got {d}")
    if cuda and (batch > MAX_GRID or hq > MAX_GRID):
        fail(n.q, f"batch size and head count must each be <= {MAX_GRID} on CUDA")
    if sq > MAX_LEN:
        fail(n.q, "sequence length must be below 2^30")
    if skv > MAX_LEN:
        fail(n.k, "sequence length must be below 2^30")
    if cuda and d not in (64, 128):
        fail(n.q, f"head dim must be 64 or 128 on CUDA, got {d}")
    if not cuda and d > 1024:
        fail(n.q, f"head dim must be <= 1024, got {d}")
    if u is not None:
        tensor(u, "u")
        if u.dim() != 3:
            fail("u", f"must be a 3-D tensor [B, Hkv, Skv], got {u.dim()}-D")
        _device(u, "u", q, n.q)
        if u.dtype != torch.float32:
            fail("u", f"dtype must be float32, got {str(u.dtype).replace('torch.', '')}")
        if tuple(u.shape) != (batch, hkv, skv):
            fail("u", f"must have shape [B, Hkv, Skv] = [{batch}, {hkv}, {skv}], got {_shape(u)}")
    # Last, so that a shape error on meta tensors is reported as what it is.
    for t, name in ((q, n.q), (k, n.k), (v, n.v), (u, "u")):
        if t is not None:
            _no_meta(t, name)


def sparsek_params(k_budget, window, gate) -> None:
    """SparseK's budget, window and gate, named as the Python API names them."""
    k_budget = integer(k_budget, "k_budget")
    window = integer(window, "window")
    if k_budget < 0:
        fail("k_budget", f"selection budget must be >= 0, got {k_budget}")
    if window < 0:
        fail("window", f"window must be >= 0, got {window}")
    if k_budget == 0 and window == 0:
        fail("k_budget", "k_budget == 0 together with window == 0 leaves no key to attend")
    if not isinstance(gate, str):
        fail("gate", f"must be a str, got {type(gate).__name__}", TypeError)
    if gate not in GATES:
        fail("gate", f"must be 'key_value', 'value' or 'none', got {gate!r}")
