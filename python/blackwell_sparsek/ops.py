"""torch.library custom ops ``blackwell_sparsek::attention_fwd`` and ``blackwell_sparsek::sparsek_fwd``
(differentiable), their backward ops ``attention_bwd`` / ``sparsek_bwd``, and autograd-free twins.

Why custom ops: the dispatcher picks the CPU or CUDA implementation from the inputs, and the fake
(meta) implementations let ``torch.compile(fullgraph=True)`` trace through the kernels without
graph breaks. The ops are defined with the low-level ``torch.library.Library`` API (not
``torch.library.custom_op``) because it adds no Python wrapper layers to every call.

Contract (both ops): inputs are BSHD, ``q`` [B, Sq, Hq, D], ``k``/``v`` [B, Skv, Hkv, D],
``Hq % Hkv == 0``; causal masking is bottom-right aligned. The ops allocate ``out`` (q's shape and
dtype, contiguous) and ``lse`` (float32 [B, Hq, Sq], natural log) and hand every tensor to
``blackwell_sparsek._C`` as a DLPack capsule (zero copy). Every rule is checked by the C++
library, whose ``ValueError`` names the offending argument. ``softmax_scale=None`` means
``1/sqrt(D)``. On CUDA the work is queued on the current torch stream of q's device.

The one input the ops change: a CUDA q/k/v that breaks the kernels' 16-byte rule (data pointer not
16-byte aligned, or a stride of dims 0-2 not a multiple of 8 elements) but is otherwise well
formed is copied to a fresh contiguous tensor first, so any view torch can produce works. The
copy costs one read and one write of that tensor.

Training: ``attention_fwd`` and ``sparsek_fwd`` are differentiable in q, k, v (and u): their
backward (``torch.library.register_autograd``) calls the ops ``attention_bwd`` / ``sparsek_bwd``,
which run ``_C.attention_backward`` / ``_C.sparsek_attention_backward`` (GPU kernels on CUDA, the
float64 reference on CPU) and have fake implementations, so ``torch.compile(fullgraph=True)``
traces forward and backward. A gradient reaching ``lse`` is exact too (it enters through
delta = dO . O - dlse). ``dq``/``dk``/``dv`` have q/k/v's dtype, ``du`` is float32.

A registered autograd kernel is Python and costs every call about 12 µs, grad mode or not. So each
forward op has a twin without one, ``attention_fwd_nograd`` / ``sparsek_fwd_nograd`` (same
kernels, same fake implementations), which the front doors in ``blackwell_sparsek`` call when no
input needs a gradient. Called with inputs that need one, the twins give torch's "no autograd
kernel" warning and a result without a gradient.

Eager calls without the dispatcher: for plain CUDA tensors that need no gradient, with nothing
that watches or transforms calls active (``direct_call_ok``), the front doors (``attention``,
``sdpa``, the Hugging Face backend) call the CUDA implementation themselves (``attention_cuda``,
``attention_cuda_bhsd``): the dispatcher would only route the call there, and it cost as much as
the rest of a small call. Everything else (torch.compile, modes, autograd, functorch, the
profiler) goes through the ops.

The fake implementations check every shape, dtype and device rule (blackwell_sparsek._validate),
so torch.compile rejects what eager would, and they refuse plain meta tensors: an op run on meta
tensors outside tracing would hand back memory nobody computed.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils.dlpack import to_dlpack as _dl

from . import _C
from . import _validate

__all__ = ["attention_fwd", "sparsek_fwd", "attention_fwd_nograd", "sparsek_fwd_nograd",
           "attention_bwd", "sparsek_bwd", "direct_call_ok", "attention_cuda",
           "attention_cuda_bhsd", "stream_of"]

_lib = torch.library.Library("blackwell_sparsek", "DEF")
_ATTENTION_ARGS = "(Tensor q, Tensor k, Tensor v, bool causal, float? softmax_scale)"
_SPARSEK_ARGS = ("(Tensor q, Tensor k, Tensor v, Tensor u, int k_budget, int window, str gate,"
                 " float? softmax_scale)")
for _name in ("attention_fwd", "attention_fwd_nograd"):
    _lib.define(_name + _ATTENTION_ARGS + " -> (Tensor out, Tensor lse)")
for _name in ("sparsek_fwd", "sparsek_fwd_nograd"):
    _lib.define(_name + _SPARSEK_ARGS + " -> (Tensor out, Tensor lse)")
_lib.define(
    "attention_bwd(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor dout,"
    " Tensor? dlse, bool causal, float? softmax_scale) -> (Tensor dq, Tensor dk, Tensor dv)"
)
_lib.define(
    "sparsek_bwd(Tensor q, Tensor k, Tensor v, Tensor u, Tensor out, Tensor lse, Tensor dout,"
    " Tensor? dlse, int k_budget, int window, str gate, float? softmax_scale)"
    " -> (Tensor dq, Tensor dk, Tensor dv, Tensor du)"
)

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, with_lse: bool = True
             ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if q.dim() == 4 and q.shape[1] > _validate.MAX_LEN:
        # libbsk would refuse the length, but only after out is allocated (or fails to be).
        _validate.attention(q, k, v)
    # empty_like / new_empty: the cheapest allocations from Python (torch.empty(shape, dtype=...,
    # device=...) costs several microseconds more per call).
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if not with_lse:
        lse = None
    elif q.dim() == 4:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    else:  # the C++ validation rejects q's rank before it looks at lse
        lse = q.new_empty((0, 0, 0), dtype=torch.float32)
    return out, lse


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a CUDA 4-D tensor (BSHD, or BHSD for sdpa) that only breaks the
    16-byte alignment rule; otherwise t itself. Few torch calls: this runs on every call."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        # A contiguous tensor's strides are multiples of its head dim, which libbsk requires to
        # be 64 or 128 on CUDA (and rejects otherwise).
        return t
    if t.dim() != 4 or t.dtype not in _KERNEL_DTYPES:
        return t  # libbsk names the rule
    sz, st = t.shape, t.stride()
    if (st[3] != 1 and sz[3] > 1) or 0 in sz:
        return t
    if (t.data_ptr() % 16 != 0 or (sz[0] > 1 and st[0] % 8 != 0)
            or (sz[1] > 1 and st[1] % 8 != 0) or (sz[2] > 1 and st[2] % 8 != 0)):
        return t.clone(memory_format=torch.contiguous_format)
    return t


def stream_of(t: torch.Tensor) -> int:
    """The current torch stream of t's CUDA device as an int cudaStream_t (0 for CPU tensors).
    torch._C._cuda_getCurrentRawStream is what torch.compile's generated code calls; the public
    torch.cuda.current_stream(dev).cuda_stream builds a Stream object and cost ~6 us per call
    on the lent H100's host (latency suite)."""
    return _raw_stream(t.get_device()) if t.is_cuda else 0


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def direct_call_ok(q, k, v) -> bool:
    """Whether an eager front-door call on q, k, v may run the ops' CUDA implementation itself
    instead of going through the torch dispatcher, which would only route it there: plain CUDA
    tensors that need no gradient, with nothing that watches or transforms calls active
    (torch.compile tracing, jit tracing, torch-function or dispatch modes, functorch transforms,
    the autograd profiler). The dispatcher cost 7-14 us per small call on the lent H100's host,
    these checks 3-6 us there (latency suite, bench/results); anything unusual keeps the op.
    torch.compiler.is_compiling() comes first: dynamo folds it to True, so a traced front door
    never looks further."""
    if (torch.compiler.is_compiling() or _jit_tracing() or _dispatch_modes()
            or _function_modes() or _functorch_level() is not None or _profiling()):
        return False
    if not (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
            and q.is_cuda):
        return False  # (a CPU k or v beside a CUDA q gets libbsk's error, as through the op)
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


# The C functions behind torch.jit.is_tracing() etc., without their Python wrappers.
_jit_tracing = torch._C._is_tracing
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_functorch_level = torch._C._functorch.maybe_current_level
_profiling = torch._C._autograd._profiler_enabled


# ---- attention_fwd ------------------------------------------------------------------------------


def _attention_cpu(q, k, v, causal, softmax_scale):
    out, lse = _outputs(q, k, v)
    _C.attention_forward(_dl(q), _dl(k), _dl(v), _dl(out), _dl(lse), causal, softmax_scale, 0)
    return out, lse


def attention_cuda(q, k, v, causal, softmax_scale, with_lse=True):
    """The ops' CUDA implementation, also called directly by the front doors (direct_call_ok),
    which pass with_lse=False when the caller does not want lse (then None: one allocation
    less)."""
    if not q.is_cuda:  # mixed devices: let the C++ validation name the culprit
        return _attention_cpu(q, k, v, causal, softmax_scale)
    q, k, v = _kernel_ready(q), _kernel_ready(k), _kernel_ready(v)
    out, lse = _outputs(q, k, v, with_lse)
    # No torch.cuda.device context: libbsk makes q's device current itself (and restores it).
    _C.attention_forward(_dl(q), _dl(k), _dl(v), _dl(out), None if lse is None else _dl(lse),
                         causal, softmax_scale, stream_of(q))
    return out, lse


def _attention_fake(q, k, v, causal, softmax_scale):
    _validate.attention(q, k, v)
    _validate.scale(softmax_scale, "softmax_scale")
    return _outputs(q, k, v)


def attention_cuda_bhsd(q, k, v, causal, softmax_scale):
    """``sdpa``'s direct call (direct_call_ok) on BHSD q, k, v: returns what the op route gives
    (a BHSD view of a contiguous BSHD out) without the four transposes around it."""
    if q.dim() != 4 or q.shape[2] > _validate.MAX_LEN:
        _validate.attention(q, k, v, names=_validate.SDPA)
    q, k, v = _kernel_ready(q), _kernel_ready(k), _kernel_ready(v)
    B, H, S, D = q.shape
    out = q.new_empty_strided((B, H, S, D), (S * H * D, D, H * D, 1))
    _C.attention_forward(_dl(q), _dl(k), _dl(v), _dl(out), None, causal, softmax_scale,
                         stream_of(q), True)
    return out

for _name in ("attention_fwd", "attention_fwd_nograd"):
    _lib.impl(_name, _attention_cpu, "CPU")
    _lib.impl(_name, attention_cuda, "CUDA")
    torch.library.register_fake("blackwell_sparsek::" + _name, _attention_fake, lib=_lib)


# ---- sparsek_fwd --------------------------------------------------------------------------------


def _sparsek_cpu(q, k, v, u, k_budget, window, gate, softmax_scale):
    # Here, not in libbsk, so that the message says k_budget / window, the names of this API
    # (libbsk's are k / w, and k is the key tensor here).
    _validate.sparsek_params(k_budget, window, gate)
    out, lse = _outputs(q, k, v)
    _C.sparsek_attention_forward(
        _dl(q), _dl(k), _dl(v), _dl(u), _dl(out), _dl(lse),
        k_budget, window, gate, softmax_scale, 0,
    )
    return out, lse


def _sparsek_cuda(q, k, v, u, k_budget, window, gate, softmax_scale):
    if not q.is_cuda:
        return _sparsek_cpu(q, k, v, u, k_budget, window, gate, softmax_scale)
    _validate.sparsek_params(k_budget, window, gate)
    q, k, v = _kernel_ready(q), _kernel_ready(k), _kernel_ready(v)
    out, lse = _outputs(q, k, v)
    _C.sparsek_attention_forward(
        _dl(q), _dl(k), _dl(v), _dl(u), _dl(out), _dl(lse),
        k_budget, window, gate, softmax_scale, stream_of(q),
    )
    return out, lse


def _sparsek_fake(q, k, v, u, k_budget, window, gate, softmax_scale):
    _validate.sparsek_params(k_budget, window, gate)
    _validate.attention(q, k, v, u=u)
    _validate.scale(softmax_scale, "softmax_scale")
    return _outputs(q, k, v)


for _name in ("sparsek_fwd", "sparsek_fwd_nograd"):
    _lib.impl(_name, _sparsek_cpu, "CPU")
    _lib.impl(_name, _sparsek_cuda, "CUDA")
    torch.library.register_fake("blackwell_sparsek::" + _name, _sparsek_fake, lib=_lib)


# ---- backward -----------------------------------------------------------------------------------


def _lse_grad(dlse: Optional[torch.Tensor]):
    # The kernels take dlse as a float32 [B, Hq, Sq] view; None when no gradient reached lse.
    return None if dlse is None else _dl(dlse.to(torch.float32))


def _bwd_inputs(q, k, v, dout):
    if q.is_cuda:
        return _kernel_ready(q), _kernel_ready(k), _kernel_ready(v), _kernel_ready(dout)
    return q, k, v, dout


def _grads(q, k, v):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _attention_bwd_impl(q, k, v, out, lse, dout, dlse, causal, softmax_scale):
    stream = stream_of(q)
    q, k, v, dout = _bwd_inputs(q, k, v, dout.contiguous())
    dq, dk, dv = _grads(q, k, v)
    _C.attention_backward(_dl(q), _dl(k), _dl(v), _dl(out), _dl(lse), _dl(dout),
                          _dl(dq), _dl(dk), _dl(dv), causal, softmax_scale, stream,
                          _lse_grad(dlse))
    return dq, dk, dv


def _attention_bwd_fake(q, k, v, out, lse, dout, dlse, causal, softmax_scale):
    _validate.attention(q, k, v)
    return _grads(q, k, v)


def _sparsek_bwd_impl(q, k, v, u, out, lse, dout, dlse, k_budget, window, gate, softmax_scale):
    _validate.sparsek_params(k_budget, window, gate)
    stream = stream_of(q)
    q, k, v, dout = _bwd_inputs(q, k, v, dout.contiguous())
    dq, dk, dv = _grads(q, k, v)
    du = torch.empty_like(u, memory_format=torch.contiguous_format)
    _C.sparsek_attention_backward(
        _dl(q), _dl(k), _dl(v), _dl(u), _dl(out), _dl(lse), _dl(dout),
        _dl(dq), _dl(dk), _dl(dv), _dl(du), k_budget, window, gate, softmax_scale, stream,
        _lse_grad(dlse),
    )
    return dq, dk, dv, du


def _sparsek_bwd_fake(q, k, v, u, out, lse, dout, dlse, k_budget, window, gate, softmax_scale):
    _validate.sparsek_params(k_budget, window, gate)
    _validate.attention(q, k, v, u=u)
    return (*_grads(q, k, v), torch.empty_like(u, memory_format=torch.contiguous_format))


for _name, _impl, _fake in (("attention_bwd", _attention_bwd_impl, _attention_bwd_fake),
                            ("sparsek_bwd", _sparsek_bwd_impl, _sparsek_bwd_fake)):
    _lib.impl(_name, _impl, "CPU")
    _lib.impl(_name, _impl, "CUDA")
    torch.library.register_fake("blackwell_sparsek::" + _name, _fake, lib=_lib)


#: The op overloads, resolved once (calling an OpOverload skips the packet's overload lookup).
attention_fwd = torch.ops.blackwell_sparsek.attention_fwd.default
sparsek_fwd = torch.ops.blackwell_sparsek.sparsek_fwd.default
attention_fwd_nograd = torch.ops.blackwell_sparsek.attention_fwd_nograd.default
sparsek_fwd_nograd = torch.ops.blackwell_sparsek.sparsek_fwd_nograd.default
attention_bwd = torch.ops.blackwell_sparsek.attention_bwd.default
sparsek_bwd = torch.ops.blackwell_sparsek.sparsek_bwd.default


# ---- autograd -----------------------------------------------------------------------------------


def _setup_attention(ctx, inputs, output):
    q, k, v, causal, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (causal, softmax_scale)
    ctx.set_materialize_grads(False)  # an unused lse (or out) comes back as None


def _backward_attention(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_bwd(q, k, v, out, lse, dout, dlse, *ctx.args)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            None, None)


def _setup_sparsek(ctx, inputs, output):
    q, k, v, u, k_budget, window, gate, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, u, out, lse)
    ctx.args = (k_budget, window, gate, softmax_scale)
    ctx.set_materialize_grads(False)


def _backward_sparsek(ctx, dout, dlse):
    q, k, v, u, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    grads = sparsek_bwd(q, k, v, u, out, lse, dout, dlse, *ctx.args)
    need = ctx.needs_input_grad
    return (*(g if n else None for g, n in zip(grads, need)), None, None, None, None)


torch.library.register_autograd("blackwell_sparsek::attention_fwd", _backward_attention,
                                setup_context=_setup_attention, lib=_lib)
torch.library.register_autograd("blackwell_sparsek::sparsek_fwd", _backward_sparsek,
                                setup_context=_setup_sparsek, lib=_lib)
