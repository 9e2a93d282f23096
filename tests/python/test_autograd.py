"""Autograd of the ops (issue 9): ``attention_fwd`` / ``sparsek_fwd`` and their front doors are
differentiable in q, k, v and u, eagerly and under torch.compile.

CPU: gradcheck in float64; gradients against torch autograd of the spec implementations of
test_backward_ref.py; the module's scorer parameters train; torch.compile(fullgraph=True) of a
forward + backward; a gradient through the returned lse.

CUDA (skipped without a GPU): the GPU gradients against the CPU float64 reference. Criterion, as in
test_gpu.py: the max abs error of each GPU gradient must be at most twice that of torch autograd
through a plain PyTorch implementation run in the same dtype on the GPU (plus a small floor);
the GPU backward must be bitwise reproducible.
"""

import math
import zlib

import pytest
import torch

import blackwell_sparsek as bsk
from blackwell_sparsek import ops
from test_backward_ref import (DENSE_CASES, GC_U, SPARSEK_CASES, _gate_margin, dense_torch,
                               make_scores, rand, sparsek_torch)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def seeded(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


# ---- a whole-matrix torch implementation of SparseK (the GPU baseline) ---------------------------


def sparsek_math(q, k, v, u, kb, w, gate, scale=None, return_lse=False):
    """SparseK attention from docs/SPARSEK_SPEC.md with whole-matrix torch ops, differentiable in
    q, k, v and u: the matmuls and softmax run in q's dtype on q's device, the gates through
    :func:`blackwell_sparsek.sparsek_gates` (the spec's SPARSEK VJP). sparsek_torch (one row at a
    time) is the oracle; this one is fast enough for S = 1000 on a GPU."""
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    grp = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dev = q.device
    i = torch.arange(Sq, device=dev)[:, None] + (Skv - Sq)
    j = torch.arange(Skv, device=dev)[None, :]
    win = (j <= i) & (j > i - w)                                   # [Sq, Skv]
    cand = j <= i - w
    n_cand = cand.sum(-1, keepdim=True)
    uf = u.to(torch.promote_types(u.dtype, torch.float32))  # gates in float32 (or float64)
    uf = uf[:, :, None, :].expand(B, Hkv, Sq, Skv)
    # Non-candidates sit 4 below every score: gate 0, outside tau's support, never selected.
    low = (uf.detach().amin() - 4.0) if u.numel() else torch.zeros((), device=dev)
    z = torch.where(cand, uf, low)
    # Selection: the top min(k, |C_i|), ties toward the larger j (a stable sort of the flipped
    # row keeps the larger j first among equals).
    order = torch.sort(z.detach().flip(-1), dim=-1, descending=True, stable=True).indices
    top = (Skv - 1 - order)[..., :kb]
    sel = torch.zeros(B, Hkv, Sq, Skv, dtype=torch.bool, device=dev).scatter(-1, top, True)
    sel &= cand
    if gate == "none" or kb == 0:
        m = torch.ones_like(z)
    else:
        m = torch.where(n_cand > kb, bsk.sparsek_gates(z, kb), torch.ones_like(z))
    sel_h = sel.repeat_interleave(grp, dim=1)                      # [B, Hq, Sq, Skv]
    m_h = m.repeat_interleave(grp, dim=1).to(q.dtype)
    s = torch.einsum("bthd,bjhd->bhtj", q, k.repeat_interleave(grp, dim=2)) * scale
    logits = torch.where(sel_h, m_h * s, s) if gate == "key_value" else s
    visible = win | sel_h
    valid = visible.any(-1, keepdim=True)
    masked = logits.masked_fill(~(visible | ~valid), -math.inf)
    p = torch.softmax(masked, dim=-1) * valid
    if gate != "none":
        p = torch.where(sel_h, p * m_h, p)
    out = torch.einsum("bhtj,bjhd->bthd", p, v.repeat_interleave(grp, dim=2))
    return (out, torch.logsumexp(masked, dim=-1)) if return_lse else out


def scores_f64(kind, B, Hkv, S, gen):
    return make_scores(kind, B, Hkv, S, gen).double()


@pytest.mark.parametrize("gate", ["key_value", "value", "none"])
@pytest.mark.parametrize("case", SPARSEK_CASES)
def test_sparsek_math_matches_the_oracle(case, gate):
    # The GPU baseline is itself an implementation of the spec: forward and gradients.
    B, Sq, Skv, Hq, Hkv, D, kk, w, kind, tr = case
    gen = seeded(case, gate, "math")
    q, k, v, do = (rand(s, gen, tr) for s in ((B, Sq, Hq, D), (B, Skv, Hkv, D),
                                               (B, Skv, Hkv, D), (B, Sq, Hq, D)))
    u = scores_f64(kind, B, Hkv, Skv, gen)
    a = leaves(q, k, v, u)
    b = leaves(q, k, v, u)
    got = sparsek_math(*a, kk, w, gate)
    want = sparsek_torch(*b, kk, w, gate, 1.0 / math.sqrt(D))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(got, a, do, allow_unused=True)
    gb = torch.autograd.grad(want, b, do, allow_unused=True)
    for x, y, t in zip(ga, gb, a):
        x = torch.zeros_like(t) if x is None else x
        y = torch.zeros_like(t) if y is None else y
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


# ---- gradcheck (float64, CPU) --------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 6, 6, 2, 1, 4), (2, 5, 7, 4, 2, 3), (1, 7, 4, 2, 2, 4)],
                         ids=["MQA", "GQA_Sq<Skv", "Sq>Skv"])
def test_dense_gradcheck(shape, causal):
    B, Sq, Skv, Hq, Hkv, D = shape
    gen = seeded(shape, causal)
    q, k, v = leaves(rand((B, Sq, Hq, D), gen), rand((B, Skv, Hkv, D), gen),
                     rand((B, Skv, Hkv, D), gen))
    assert torch.autograd.gradcheck(lambda a, b, c: bsk.attention(a, b, c, causal=causal),
                                    (q, k, v))


# (k, w): selection with fractional gates, w = 0, k = 0 (sliding window), |C_i| <= k.
GC_PARAMS = [(2, 1), (2, 0), (0, 3), (9, 2)]


@pytest.mark.parametrize("gate", ["key_value", "value", "none"])
@pytest.mark.parametrize("kw", GC_PARAMS, ids=lambda p: f"k{p[0]}_w{p[1]}")
def test_sparsek_gradcheck(kw, gate):
    kk, w = kw
    S = len(GC_U)
    u2 = GC_U[:6] + GC_U[:5:-1]  # a second KV head: the last two scores swapped
    if kk > 0:
        assert min(_gate_margin(GC_U, kk, w, S), _gate_margin(u2, kk, w, S)) > 0.05
    gen = seeded(kw, gate)
    q, k, v = leaves(rand((1, S, 4, 4), gen), rand((1, S, 2, 4), gen), rand((1, S, 2, 4), gen))
    # Well-separated scores (multiples of 2^-10): no gate within 0.05 of a kink.
    u = torch.tensor([GC_U, u2], dtype=F64).view(1, 2, S)

    def f(a, b, c, x):
        return bsk.sparsek_attention(a, b, c, x.float(), kk, w, gate)

    assert torch.autograd.gradcheck(lambda a, b, c: f(a, b, c, u), (q, k, v))
    # u alone, perturbed by what float32 holds exactly; du is float32, hence the tolerances.
    ug = u.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: f(q.detach(), k.detach(), v.detach(), x), (ug,),
                                    eps=2.0**-10, atol=1e-5, rtol=1e-3)
    if 0 < kk < S - w and gate != "none":  # fractional gates: u really gets a gradient
        (du,) = torch.autograd.grad(f(q, k, v, ug).sum(), ug)
        assert du.abs().sum() > 0


# ---- the ops' gradients against torch autograd of the spec implementations ----------------------


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_grads_match_spec(case):
    B, Sq, Skv, Hq, Hkv, D, causal, tr = case
    gen = seeded(case, "spec")
    q, k, v = rand((B, Sq, Hq, D), gen, tr), rand((B, Skv, Hkv, D), gen, tr), \
        rand((B, Skv, Hkv, D), gen, tr)
    # dout non-contiguous: the loss reads out through a transposed weight.
    do = rand((B, Sq, Hq, D), gen, transpose=True)
    scale = 0.7 if D == 5 else None
    a, b = leaves(q, k, v), leaves(q, k, v)
    out = bsk.attention(*a, causal=causal, softmax_scale=scale)
    want = dense_torch(*b, causal, scale or 1.0 / math.sqrt(D))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    (out * do).sum().backward()
    if Skv > 0:
        (want * do).sum().backward()
    for x, y in zip(a, b):
        y = torch.zeros_like(x) if y.grad is None else y.grad
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
        torch.testing.assert_close(x.grad, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gate", ["key_value", "value", "none"])
@pytest.mark.parametrize("case", SPARSEK_CASES)
def test_sparsek_grads_match_spec(case, gate):
    B, Sq, Skv, Hq, Hkv, D, kk, w, kind, tr = case
    gen = seeded(case, gate, "spec")
    q, k, v = rand((B, Sq, Hq, D), gen, tr), rand((B, Skv, Hkv, D), gen, tr), \
        rand((B, Skv, Hkv, D), gen, tr)
    do = rand((B, Sq, Hq, D), gen, transpose=True)
    u = make_scores(kind, B, Hkv, Skv, gen)
    a = leaves(q, k, v, u)
    b = leaves(q, k, v, u.double())
    out = bsk.sparsek_attention(*a, kk, w, gate)
    (out * do).sum().backward()
    want = sparsek_torch(*b, kk, w, gate, 1.0 / math.sqrt(D))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    (want * do).sum().backward()
    for x, y in zip(a[:3], b[:3]):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-9)
    du = a[3].grad
    assert du.dtype == torch.float32 and du.shape == u.shape
    want_du = torch.zeros_like(b[3]) if b[3].grad is None else b[3].grad
    torch.testing.assert_close(du.double(), want_du, rtol=1e-6, atol=1e-6)


def test_float32_and_bfloat16_grads_on_cpu():
    gen = seeded("low precision")
    q, k, v, do = rand((1, 9, 4, 8), gen), rand((1, 9, 2, 8), gen), rand((1, 9, 2, 8), gen), \
        rand((1, 9, 4, 8), gen)
    u = make_scores("randn", 1, 2, 9, gen)
    want = leaves(q, k, v, u)
    (bsk.sparsek_attention(*want, 3, 2) * do).sum().backward()
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        got = leaves(q.to(dt), k.to(dt), v.to(dt), u)
        (bsk.sparsek_attention(*got, 3, 2) * do.to(dt)).sum().backward()
        for g, x in zip(got, want):
            assert g.grad.dtype == g.dtype
            torch.testing.assert_close(g.grad.double(), x.grad.double(), rtol=tol, atol=tol)


def test_only_the_inputs_that_need_grad_get_one():
    gen = seeded("subset")
    q, k, v = rand((1, 6, 2, 4), gen), rand((1, 6, 1, 4), gen), rand((1, 6, 1, 4), gen)
    u = make_scores("randn", 1, 1, 6, gen)
    kl = k.clone().requires_grad_()
    (bsk.sparsek_attention(q, kl, v, u, 2, 1) ** 2).sum().backward()
    assert kl.grad is not None and q.grad is None and u.grad is None
    ul = u.clone().requires_grad_()
    out = bsk.sparsek_attention(q, k, v, ul, 2, 1)
    assert out.requires_grad
    (out ** 2).sum().backward()
    assert ul.grad is not None and ul.grad.abs().sum() > 0


def test_sdpa_grads_match_spec():
    # BHSD, Sq > Skv (the split into a causal head and a full tail): gradients through torch.cat.
    gen = seeded("sdpa")
    qh, kh, vh = rand((1, 2, 6, 4), gen), rand((1, 2, 4, 4), gen), rand((1, 2, 4, 4), gen)
    a, b = leaves(qh, kh, vh), leaves(qh, kh, vh)
    bsk.sdpa(*a, is_causal=True).sum().backward()
    mask = torch.ones(6, 4, dtype=torch.bool).tril()  # torch's top-left alignment
    torch.nn.functional.scaled_dot_product_attention(*b, attn_mask=mask).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-10)


# ---- lse, no-grad path -------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["dense", "dense_causal", "key_value", "value", "none"])
def test_lse_gradient(op):
    # L = <dO, out> + <dlse, lse>: the lse term enters the backward through delta alone.
    gen = seeded("lse", op)
    B, Sq, Skv, Hq, Hkv, D, kk, w = 1, 9, 12, 4, 2, 8, 3, 2
    q, k, v, do = (rand(s, gen) for s in ((B, Sq, Hq, D), (B, Skv, Hkv, D), (B, Skv, Hkv, D),
                                           (B, Sq, Hq, D)))
    dl = torch.randn(B, Hq, Sq, generator=gen, dtype=torch.float64)
    u = scores_f64("normal", B, Hkv, Skv, gen).float()  # the op takes float32 scores
    a, b = leaves(q, k, v, u), leaves(q, k, v, u.double())
    if op.startswith("dense"):
        causal = op == "dense_causal"
        out, lse = bsk.attention(*a[:3], causal=causal, return_lse=True)
        s = torch.einsum("bthd,bjhd->bhtj", b[0], b[1].repeat_interleave(Hq // Hkv, dim=2))
        s = s / math.sqrt(D)
        if causal:
            i = torch.arange(Sq)[:, None] + (Skv - Sq)
            s = s.masked_fill(torch.arange(Skv)[None, :] > i, -math.inf)
        want = torch.einsum("bhtj,bjhd->bthd", torch.softmax(s, -1),
                            b[2].repeat_interleave(Hq // Hkv, dim=2))
        want_lse = torch.logsumexp(s, -1)
    else:
        out, lse = bsk.sparsek_attention(*a, kk, w, gate=op, return_lse=True)
        want, want_lse = sparsek_math(*b, kk, w, op, return_lse=True)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)
    ((out * do).sum() + (lse * dl).sum()).backward()
    ((want * do).sum() + (want_lse * dl).sum()).backward()
    for x, y in zip(a, b):
        gx = torch.zeros_like(x) if x.grad is None else x.grad
        gy = torch.zeros_like(y) if y.grad is None else y.grad
        torch.testing.assert_close(gx.double(), gy.double(), rtol=1e-5, atol=1e-6)


def test_no_grad_calls_skip_autograd():
    q, k, v = leaves(*(rand((1, 4, 1, 4), seeded(i)) for i in range(3)))
    with torch.no_grad():
        assert bsk.attention(q, k, v).grad_fn is None
    out = bsk.attention(q.detach(), k.detach(), v.detach())
    assert out.grad_fn is None and not out.requires_grad


def test_opcheck_backward_ops():
    gen = seeded("opcheck")
    q, k, v = rand((1, 5, 2, 8), gen), rand((1, 7, 1, 8), gen), rand((1, 7, 1, 8), gen)
    u = make_scores("randn", 1, 1, 7, gen)
    with torch.no_grad():
        out, lse = bsk.attention(q, k, v, causal=True, return_lse=True)
        sout, slse = bsk.sparsek_attention(q, k, v, u, 2, 2, return_lse=True)
    do = torch.randn_like(q)
    torch.library.opcheck(ops.attention_bwd, (q, k, v, out, lse, do, None, True, None))
    torch.library.opcheck(ops.sparsek_bwd, (q, k, v, u, sout, slse, do, torch.zeros_like(slse),
                                            2, 2, "value", 0.5))
    # The forward ops: schema, fake tensors and the autograd registration with inputs that need
    # grad (the AOT check would feed lse a random gradient, which the backward refuses).
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    ql = q.clone().requires_grad_()
    torch.library.opcheck(ops.attention_fwd, (ql, k, v, True, None), test_utils=tests)
    torch.library.opcheck(ops.sparsek_fwd, (ql, k, v, u, 2, 2, "key_value", None),
                          test_utils=tests)


# ---- the module trains ---------------------------------------------------------------------------


def test_module_training_step_reaches_the_scorer():
    torch.manual_seed(0)
    B, S, Dm, Hq, Hkv, D = 2, 24, 16, 4, 2, 8
    mod = bsk.SparseKAttention(Dm, Hkv, k_budget=4, window=3, slope_init=0.01)
    proj = torch.nn.Linear(Dm, (Hq + 2 * Hkv) * D)
    x = torch.randn(B, S, Dm)
    target = torch.randn(B, S, Hq, D)
    opt = torch.optim.SGD(list(mod.parameters()) + list(proj.parameters()), lr=0.1)

    def qkv(x):
        q, k, v = proj(x).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        return q.view(B, S, Hq, D), k.view(B, S, Hkv, D), v.view(B, S, Hkv, D)

    loss = (mod(*qkv(x), x) - target).square().mean()
    loss.backward()
    for p in (mod.w_score, mod.slope):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # The same gradients from the whole-matrix spec implementation.
    got = (mod.w_score.grad.clone(), mod.slope.grad.clone(), proj.weight.grad.clone())
    mod.zero_grad()
    proj.zero_grad()
    ref = sparsek_math(*qkv(x), mod.scores(x), 4, 3, "key_value")
    (ref - target).square().mean().backward()
    for g, want in zip(got, (mod.w_score.grad, mod.slope.grad, proj.weight.grad)):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)
    before = mod.w_score.detach().clone()
    opt.step()
    assert not torch.equal(before, mod.w_score)


# ---- torch.compile -------------------------------------------------------------------------------


def _grads_eager_and_compiled(fn, args, **compile_kwargs):
    a, b = leaves(*args), leaves(*args)
    fn(*a).backward()
    torch.compile(fn, fullgraph=True, **compile_kwargs)(*b).backward()
    return a, b


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_forward_backward(backend):
    gen = seeded("compile")
    q, k, v = rand((1, 6, 2, 8), gen).float(), rand((1, 9, 1, 8), gen).float(), \
        rand((1, 9, 1, 8), gen).float()
    u = make_scores("randn", 1, 1, 9, gen)

    def dense(q, k, v):
        out, lse = bsk.attention(q, k, v, causal=True, return_lse=True)
        return (out.square().sum() - lse.detach().sum()) * 0.5

    def sparsek(q, k, v, u):
        return bsk.sparsek_attention(q, k, v, u, 3, 2, gate="value").square().sum()

    for fn, args in ((dense, (q, k, v)), (sparsek, (q, k, v, u))):
        a, b = _grads_eager_and_compiled(fn, args, backend=backend)
        for x, y in zip(a, b):
            torch.testing.assert_close(y.grad, x.grad, rtol=1e-5, atol=1e-6)


def test_compiled_module_training_step():
    torch.manual_seed(1)
    mod = bsk.SparseKAttention(16, 2, k_budget=3, window=2)
    x = torch.randn(1, 12, 16)
    q, k, v = torch.randn(1, 12, 4, 8), torch.randn(1, 12, 2, 8), torch.randn(1, 12, 2, 8)

    def loss(q, k, v, x):
        return mod(q, k, v, x).square().mean()

    loss(q, k, v, x).backward()
    want = (mod.w_score.grad.clone(), mod.slope.grad.clone())
    mod.zero_grad()
    torch.compile(loss, fullgraph=True, backend="aot_eager")(q, k, v, x).backward()
    for g, w in zip((mod.w_score.grad, mod.slope.grad), want):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_compiled_lse_gradient():
    q, k, v = leaves(*(rand((1, 4, 1, 8), seeded("c", i)).float() for i in range(3)))
    qe, ke, ve = leaves(q, k, v)
    fn = torch.compile(lambda a, b, c: bsk.attention(a, b, c, return_lse=True), fullgraph=True,
                       backend="aot_eager")
    out, lse = fn(q, k, v)
    (out.sum() + 2.0 * lse.sum()).backward()
    oute, lsee = bsk.attention(qe, ke, ve, return_lse=True)
    (oute.sum() + 2.0 * lsee.sum()).backward()
    for x, y in zip((q, k, v), (qe, ke, ve)):
        torch.testing.assert_close(x.grad, y.grad)


# ---- CUDA: GPU gradients against the float64 CPU reference ----------------------------------------


HALF = [torch.float16, torch.bfloat16]
FLOOR = 1e-5


def gpu_randn(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)


def _grads(fn, tensors, do):
    ls = leaves(*tensors)
    out = fn(*ls)
    grads = torch.autograd.grad(out, ls, do, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, ls)]


def check_gpu_grads(bsk_fn, torch_fn, tensors, names):
    """bsk_fn on the GPU tensors vs bsk_fn on float64 CPU copies (the reference backward) vs
    torch_fn (plain PyTorch) in the GPU dtype, per gradient: max abs error within 2x torch's."""
    q = tensors[0]
    do = gpu_randn(q.shape, q.dtype, 99)
    got = _grads(bsk_fn, tensors, do)
    again = _grads(bsk_fn, tensors, do)
    for g, h, name in zip(got, again, names):
        assert torch.equal(g, h), f"d{name}: two runs differ (not bitwise reproducible)"
    cpu = [t.detach().cpu().double() if t.dtype != torch.float32 else t.detach().cpu()
           for t in tensors]
    ref = _grads(bsk_fn, cpu, do.cpu().double())
    base = _grads(torch_fn, tensors, do)
    for g, r, b, t, name in zip(got, ref, base, tensors, names):
        assert g.dtype == t.dtype and g.shape == t.shape and g.is_cuda
        r = r.double()
        err = (g.cpu().double() - r).abs().max().item() if r.numel() else 0.0
        err_torch = (b.cpu().double() - r).abs().max().item() if r.numel() else 0.0
        bound = 2 * err_torch + FLOOR * max(1.0, r.abs().max().item() if r.numel() else 0.0)
        assert math.isfinite(err) and err <= bound, \
            f"d{name}: max abs error {err:.3e} > 2 x torch ({err_torch:.3e}) + floor"


# (Sq, Skv) for dense: Sq != Skv both ways.
DENSE_GPU = [(1, 1), (17, 17), (200, 200), (1000, 1000), (1, 1000), (17, 200), (200, 1000),
             (1000, 17)]


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sq,skv", DENSE_GPU, ids=lambda x: str(x))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_gpu_dense_grads(dtype, D, sq, skv, causal):
    B = 2 if sq * skv <= 200 * 200 else 1
    q = gpu_randn((B, sq, 4, D), dtype, 1)
    k = gpu_randn((B, skv, 2, D), dtype, 2)
    v = gpu_randn((B, skv, 2, D), dtype, 3)
    scale = 1.0 / math.sqrt(D)
    check_gpu_grads(lambda a, b, c: bsk.attention(a, b, c, causal=causal),
                    lambda a, b, c: dense_torch(a, b, c, causal, scale), (q, k, v), "qkv")


def _kw(S):
    return {1: (2, 1), 17: (4, 3), 200: (16, 32), 1000: (64, 64)}[S]


SPARSEK_GPU = [(S, *_kw(S)) for S in (1, 17, 200, 1000)] + [(200, 0, 32), (200, 24, 0)]


@pytest.mark.cuda
@pytest.mark.parametrize("gate", ["key_value", "value", "none"])
@pytest.mark.parametrize("S,kb,w", SPARSEK_GPU, ids=lambda x: str(x))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_gpu_sparsek_grads(dtype, D, S, kb, w, gate):
    B = 2 if S <= 200 else 1
    q = gpu_randn((B, S, 4, D), dtype, 4)
    k = gpu_randn((B, S, 2, D), dtype, 5)
    v = gpu_randn((B, S, 2, D), dtype, 6)
    u = gpu_randn((B, 2, S), torch.float32, 7)
    check_gpu_grads(lambda a, b, c, x: bsk.sparsek_attention(a, b, c, x, kb, w, gate),
                    lambda a, b, c, x: sparsek_math(a, b, c, x, kb, w, gate), (q, k, v, u),
                    "qkvu")


@pytest.mark.cuda
def test_gpu_module_trains():
    torch.manual_seed(0)
    mod = bsk.SparseKAttention(64, 2, k_budget=16, window=32).cuda()
    x = torch.randn(2, 300, 64, device="cuda")
    q, k, v = (torch.randn(2, 300, h, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for h in (4, 2, 2))
    mod(q, k, v, x).float().square().mean().backward()
    for p in (mod.w_score, mod.slope, q, k, v):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.cuda
def test_gpu_compiled_forward_backward():
    q = gpu_randn((1, 128, 4, 64), torch.bfloat16, 8).requires_grad_()
    k = gpu_randn((1, 128, 2, 64), torch.bfloat16, 9).requires_grad_()
    v = gpu_randn((1, 128, 2, 64), torch.bfloat16, 10).requires_grad_()
    u = gpu_randn((1, 2, 128), torch.float32, 11).requires_grad_()

    def fn(q, k, v, u):
        return (bsk.sparsek_attention(q, k, v, u, 8, 16).float().square().sum()
                + bsk.attention(q, k, v, causal=True).float().square().sum())

    fn(q, k, v, u).backward()
    want = [t.grad.clone() for t in (q, k, v, u)]
    for t in (q, k, v, u):
        t.grad = None
    torch.compile(fn, fullgraph=True)(q, k, v, u).backward()
    for t, w in zip((q, k, v, u), want):  # inductor may round the loss's own gradient apart
        torch.testing.assert_close(t.grad, w, rtol=2e-2, atol=2e-2)
