"""torch.compile traces the public functions without graph breaks (fullgraph=True), through the
fake implementations of the blackwell_sparsek ops, and gives the eager result; torch.library's
opcheck validates the op registrations (schema, fake tensors, autograd registration, AOT)."""

import pytest
import torch

import blackwell_sparsek as bsk


def make(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _attention(q, k, v):
    out, lse = bsk.attention(q, k, v, causal=True, return_lse=True)
    return out * 2.0, lse


def _sdpa(q, k, v):
    # BHSD in, BHSD out; Sq != Skv exercises the top-left split.
    return bsk.sdpa(q, k, v, is_causal=True).sum(-1)


def _sparsek(q, k, v, u):
    return bsk.sparsek_attention(q, k, v, u, 2, 3, gate="value", return_lse=True)


def _inputs():
    q = make((1, 5, 2, 16), torch.float32, 1)
    k = make((1, 8, 1, 16), torch.float32, 2)
    v = make((1, 8, 1, 16), torch.float32, 3)
    u = make((1, 1, 8), torch.float32, 4)
    qh = make((1, 2, 6, 16), torch.float32, 5)  # BHSD, Sq=6 > Skv=4
    kh = make((1, 2, 4, 16), torch.float32, 6)
    vh = make((1, 2, 4, 16), torch.float32, 7)
    return q, k, v, u, qh, kh, vh


def _check_compiled(**compile_kwargs):
    q, k, v, u, qh, kh, vh = _inputs()
    cases = [(_attention, (q, k, v)), (_sdpa, (qh, kh, vh)), (_sparsek, (q, k, v, u))]
    for fn, args in cases:
        expect = fn(*args)
        got = torch.compile(fn, fullgraph=True, **compile_kwargs)(*args)
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6, msg=fn.__name__)


def test_compile_aot_eager():
    _check_compiled(backend="aot_eager")


def test_compile_aot_eager_dynamic_shapes():
    fn = torch.compile(_attention, fullgraph=True, backend="aot_eager", dynamic=True)
    for s in (3, 7):
        q = make((2, s, 2, 16), torch.float32, s)
        kv = make((2, s + 1, 1, 16), torch.float32, s + 1)
        torch.testing.assert_close(fn(q, kv, kv), _attention(q, kv, kv), rtol=1e-6, atol=1e-6)


def test_compile_inductor():
    _check_compiled()  # the default backend


def test_compiled_errors_name_the_argument():
    # The fake implementation validates, so the bad shape is refused while tracing (dynamo wraps
    # the op's ValueError in its own error), before any kernel runs.
    q, k, v, *_ = _inputs()
    fn = torch.compile(_attention, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"ValueError.*bsk: argument 'v': must have the shape of k"):
        fn(q, k, v[:, :7])


def test_opcheck_attention_fwd():
    q, k, v, *_ = _inputs()
    torch.library.opcheck(torch.ops.blackwell_sparsek.attention_fwd.default, (q, k, v, True, None))
    torch.library.opcheck(torch.ops.blackwell_sparsek.attention_fwd.default,
                          (q.double(), k.double(), v.double(), False, 0.5))


def test_opcheck_sparsek_fwd():
    q, k, v, u, *_ = _inputs()
    torch.library.opcheck(torch.ops.blackwell_sparsek.sparsek_fwd.default,
                          (q, k, v, u, 2, 3, "key_value", None))
    torch.library.opcheck(torch.ops.blackwell_sparsek.sparsek_fwd.default,
                          (q, k, v, u, 8, 0, "none", 0.25))
