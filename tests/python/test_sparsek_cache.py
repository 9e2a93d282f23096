"""The SparseK decoding cache against the prefill definition.

Decoding token by token from the cache must give what SparseK attention over the whole history
gives at that position (docs/SPARSEK_SPEC.md, "Generation"): one call of the float64 reference
with the decoded positions as query rows is the oracle of every step. CPU caches (the C++ CPU
implementation, float64) must match it to rounding; CUDA caches within the GPU tests' bound.
"""
import pytest
import torch

import blackwell_sparsek as bsk
from blackwell_sparsek import SparseKCache

FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make_scores(kind, B, Hkv, S, g):
    u = torch.randn(B, Hkv, S, generator=g)
    if kind == "ties":
        return torch.floor(2 * u)
    if kind == "flat":
        return torch.full_like(u, 0.5)
    if kind == "ramp":  # the paper's recency slope: new keys keep entering the selection
        return u + 0.05 * torch.arange(S)
    if kind == "wide":
        return 30 * u
    return u


def stream(B, T, Hq, Hkv, D, kind, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64)
    return q, k, v, make_scores(kind, B, Hkv, T, g).float()


def decode_run(q, k, v, u, kb, w, gate, lengths, steps, device, dtype, cap=None):
    """Prefill sequence b with its first lengths[b] tokens, then decode `steps` tokens each.
    Returns the decoded outputs [B, steps, Hq, D] and lse [B, Hq, steps], and the cache."""
    B = q.shape[0]
    L0 = max(lengths)
    to = lambda t: t.to(device=device, dtype=dtype)
    cache = SparseKCache.from_prefill(
        to(k[:, :L0]), to(v[:, :L0]), u[:, :, :L0].to(device), k_budget=kb, window=w, gate=gate,
        lengths=torch.tensor(lengths, dtype=torch.int32, device=device), score_capacity=cap)
    idx = torch.tensor(lengths)
    outs, lses = [], []
    for s in range(steps):
        pos = idx + s  # each sequence's new position
        ar = torch.arange(B)
        out, lse = cache.step(to(q[ar, pos][:, None]), to(k[ar, pos][:, None]),
                              to(v[ar, pos][:, None]), u[ar, :, pos][:, :, None].to(device),
                              return_lse=True)
        outs.append(out.cpu().double())
        lses.append(lse.cpu())
    return torch.cat(outs, 1), torch.cat(lses, 2), cache


def reference(q, k, v, u, kb, w, gate, lengths, steps, dtype):
    """The prefill definition at every decoded position, per sequence."""
    outs, lses = [], []
    for b, L in enumerate(lengths):
        r = lambda t: t[b:b + 1, :L + steps].to(dtype)
        o, l = bsk.reference.sparsek_attention(
            q[b:b + 1, L:L + steps].to(dtype), r(k), r(v), u[b:b + 1, :, :L + steps], kb, w, gate,
            return_lse=True)
        outs.append(o.double())
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def case_id(c):
    return "B{}_H{}x{}_D{}_k{}_w{}_{}_{}_L{}_T{}".format(*c[:8], "-".join(map(str, c[8])), c[9])


def run_case(case, device, dtype):
    """Decodes a case's stream on `device` and evaluates the prefill definition beside it."""
    B, Hq, Hkv, D, kb, w, gate, kind, lengths, steps = case
    q, k, v, u = stream(B, max(lengths) + steps, Hq, Hkv, D, kind, seed=sum(lengths) + steps)
    cap = 1024 if kind == "flat" else None
    out, lse, cache = decode_run(q, k, v, u, kb, w, gate, lengths, steps, device, dtype, cap)
    ref, ref_lse = reference(q, k, v, u, kb, w, gate, lengths, steps, dtype)
    return out, lse, cache, ref, ref_lse, (q, k, v, u, cap)


CPU_CASES = [  # B, Hq, Hkv, D, k, w, gate, kind, lengths, steps
    (2, 4, 2, 16, 6, 4, "key_value", "normal", [10, 10], 300),
    (2, 4, 2, 16, 6, 4, "value", "ties", [7, 12], 300),
    (2, 4, 2, 16, 6, 4, "none", "ties", [12, 3], 300),
    (1, 2, 1, 16, 5, 3, "key_value", "flat", [9], 200),
    (1, 2, 1, 16, 8, 5, "key_value", "ramp", [20], 300),
    (2, 2, 2, 8, 4, 2, "value", "wide", [5, 0], 200),
    (1, 4, 1, 16, 0, 7, "key_value", "normal", [3], 60),     # k = 0: sliding window
    (1, 4, 1, 16, 6, 0, "key_value", "normal", [4], 120),    # w = 0: selection only
    (1, 4, 1, 16, 6, 0, "none", "ties", [0], 120),
    (1, 2, 2, 16, 500, 3, "key_value", "normal", [30], 60),  # |C_i| <= k throughout
    (3, 8, 2, 16, 10, 6, "key_value", "normal", [0, 1, 40], 150),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_cpu_cache_matches_prefill_definition(case, dtype):
    lengths, steps = case[8], case[9]
    out, lse, cache, ref, ref_lse, _ = run_case(case, "cpu", dtype)
    tol = 1e-10 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    cache.check()
    assert cache.lengths.tolist() == [L + steps for L in lengths]


def test_cpu_thousands_of_steps_with_evictions():
    q, k, v, u = stream(1, 2400, 2, 1, 8, "normal", seed=3)
    u += 0.002 * torch.arange(2400)  # a slow drift: the selection keeps changing
    for gate in ("key_value", "none"):
        out, lse, cache = decode_run(q, k, v, u, 16, 8, gate, [400], 2000, "cpu", torch.float64)
        ref, ref_lse = reference(q, k, v, u, 16, 8, gate, [400], 2000, torch.float64)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        # Memory is constant: 16 + 8 K/V rows whatever the context.
        assert cache.k_cache.shape[2] == 24


def live_state(cache, b, h):
    """Selected positions and the live candidate scores (u > tau) of one group, as sets."""
    n, nsel = cache.counts[b, h, 1].item(), cache.counts[b, h, 2].item()
    tau = cache.tau[b, h].item()
    pos = cache.cand_pos[b, h, :n].tolist()
    zu = cache.cand_u[b, h, :n].tolist()
    rows = cache.cand_row[b, h, :n].tolist()
    sel = {p for p, r in zip(pos, rows) if r >= 0}
    live = {p for p, z, r in zip(pos, zu, rows) if r >= 0 or z > tau}
    return sel, live, tau, nsel


@pytest.mark.parametrize("gate", ["key_value", "none"])
def test_prefill_state_equals_appended_state(gate):
    q, k, v, u = stream(1, 300, 2, 2, 16, "ties", seed=11)
    built = SparseKCache.from_prefill(k, v, u, k_budget=12, window=5, gate=gate)
    _, _, grown = decode_run(q, k, v, u, 12, 5, gate, [40], 260, "cpu", torch.float64)
    for h in range(2):
        a, b_ = live_state(built, 0, h), live_state(grown, 0, h)
        assert a[0] == b_[0] and a[3] == b_[3]
        if gate != "none":
            assert a[1] == b_[1]
            assert a[2] == pytest.approx(b_[2], abs=1e-12)


def small_cache(device="cpu", **kw):
    q, k, v, u = stream(2, 40, 4, 2, 64, "normal", seed=5)
    args = dict(k_budget=6, window=4, gate="key_value")
    args.update(kw)
    dt = torch.float64 if device == "cpu" else torch.bfloat16
    c = SparseKCache.from_prefill(k[:, :30].to(device, dt), v[:, :30].to(device, dt),
                                  u[:, :, :30].to(device), **args)
    return c, (q.to(device, dt), k.to(device, dt), v.to(device, dt), u.to(device))


def state(c):
    return [t.clone() for t in (c.k_cache, c.v_cache, c.slot_u, c.cand_u, c.cand_pos,
                                c.cand_row, c.tau, c.counts)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_nonfinite_new_score_leaves_cache_unchanged(device):
    c, (q, k, v, u) = small_cache(device)
    before = state(c)
    bad = u[:, :, 30:31].clone()
    bad[1, 0, 0] = float("nan")
    c.append(k[:, 30:31], v[:, 30:31], bad)
    for a, b in zip(before, state(c)):
        assert torch.equal(a, b)
    assert torch.isnan(c.attend(q[:, 30:31]).float()).all()  # never a plausible answer
    with pytest.raises(ValueError, match="u_new was not finite.*sequence 1, KV head 0"):
        c.check()
    c.append(k[:, 30:31], v[:, 30:31], u[:, :, 30:31])  # refused while broken
    for a, b in zip(before, state(c)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_score_capacity_overflow_is_reported(device):
    dt = torch.float64 if device == "cpu" else torch.bfloat16
    k = torch.randn(1, 40, 1, 64, dtype=torch.float64).to(device, dt)
    flat = torch.full((1, 1, 40), 0.5, device=device)
    with pytest.raises(ValueError, match="cand_u.*capacity 8"):
        SparseKCache.from_prefill(k, k, flat, k_budget=4, window=2, score_capacity=8)
    c = SparseKCache.from_prefill(k[:, :11], k[:, :11], flat[:, :, :11], k_budget=4, window=2,
                                  score_capacity=10)
    c.check()
    for t in range(11, 20):
        c.append(k[:, t:t + 1], k[:, t:t + 1], flat[:, :, t:t + 1])
    with pytest.raises(ValueError, match="capacity"):
        c.check()


def test_bad_arguments_name_the_argument():
    c, (q, k, v, u) = small_cache()
    with pytest.raises(ValueError, match="k_new.*shape"):
        c.append(k[:, 30:32], v[:, 30:31], u[:, :, 30:31])
    with pytest.raises(ValueError, match="v_new.*dtype"):
        c.append(k[:, 30:31], v[:, 30:31].float(), u[:, :, 30:31])
    with pytest.raises(ValueError, match="u_new.*float32"):
        c.append(k[:, 30:31], v[:, 30:31], u[:, :, 30:31].double())
    with pytest.raises(ValueError, match="u_new.*shape"):
        c.append(k[:, 30:31], v[:, 30:31], u[:, :, 30:32])
    with pytest.raises(ValueError, match="q.*one position"):
        c.attend(q[:, 30:32])
    with pytest.raises(ValueError, match="q"):
        c.attend(q[:, 30:31, :3])  # 3 query heads over 2 KV heads
    with pytest.raises(ValueError, match="u.*finite"):
        u2 = u[:, :, :30].clone()
        u2[0, 1, 3] = float("inf")
        c.prefill(k[:, :30], v[:, :30], u2)
    with pytest.raises(ValueError, match="lengths.*outside"):
        c.prefill(k[:, :30], v[:, :30], u[:, :, :30], torch.tensor([31, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="k_budget"):
        SparseKCache(1, 1, 16, k_budget=-1, window=2, device="cpu")


@pytest.mark.cuda
def test_cuda_head_dim_rule():
    with pytest.raises(ValueError, match="k_cache.*head dim"):
        SparseKCache(1, 1, 96, k_budget=4, window=2, device="cuda")


def test_memory_does_not_grow_with_context():
    c, (q, k, v, u) = small_cache()
    n0 = c.nbytes
    for t in range(30, 40):
        c.step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], u[:, :, t:t + 1])
    assert c.nbytes == n0


# ---- CUDA ------------------------------------------------------------------------------------

GPU_CASES = [  # B, Hq, Hkv, D, k, w, gate, kind, lengths, steps
    (2, 8, 2, 64, 24, 16, "key_value", "normal", [100, 61], 200),
    (2, 4, 1, 128, 24, 16, "value", "ties", [50, 90], 200),
    (1, 4, 4, 128, 16, 8, "none", "ties", [64], 200),
    (1, 2, 1, 64, 20, 10, "key_value", "flat", [40], 150),
    (1, 32, 8, 128, 40, 30, "key_value", "ramp", [300], 100),
    (2, 4, 2, 64, 0, 33, "key_value", "normal", [50, 10], 80),
    (1, 4, 2, 128, 30, 0, "value", "normal", [70], 100),
    (3, 16, 1, 64, 300, 20, "key_value", "normal", [0, 17, 200], 60),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_cuda_cache_matches_prefill_definition(case, dtype):
    B, Hq, Hkv, D, kb, w, gate, kind, lengths, steps = case
    out, lse, cache, ref, ref_lse, (q, k, v, u, cap) = run_case(case, "cuda", dtype)
    cache.check()
    assert not torch.isnan(out).any()
    bound = 2 * rel(ref.to(dtype).double(), ref) + FLOOR[dtype]
    assert rel(out, ref) <= bound
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-3)
    # The same state as the CPU implementation (selection and live scores; tau to rounding).
    _, _, cpu = decode_run(q, k, v, u, kb, w, gate, lengths, steps, "cpu", dtype, cap)
    for b in range(B):
        for h in range(Hkv):
            g, c = live_state(cache, b, h), live_state(cpu, b, h)
            assert g[0] == c[0] and g[1] == c[1] and g[3] == c[3]
            assert g[2] == pytest.approx(c[2], abs=1e-9) or g[2] == c[2]


@pytest.mark.cuda
def test_cuda_thousands_of_steps_with_evictions():
    q, k, v, u = stream(1, 2400, 4, 1, 64, "normal", seed=13)
    u += 0.002 * torch.arange(2400)  # a slow drift: the selection keeps changing
    for gate in ("key_value", "none"):
        out, lse, cache = decode_run(q, k, v, u, 16, 8, gate, [400], 2000, "cuda", torch.bfloat16)
        cache.check()
        ref, ref_lse = reference(q, k, v, u, 16, 8, gate, [400], 2000, torch.bfloat16)
        assert rel(out, ref) <= 2 * rel(ref.bfloat16().double(), ref) + FLOOR[torch.bfloat16]
        torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-3)


@pytest.mark.cuda
def test_cuda_decode_is_bitwise_reproducible():
    q, k, v, u = stream(2, 400, 8, 2, 128, "normal", seed=7)
    a = decode_run(q, k, v, u, 64, 32, "key_value", [200, 300], 100, "cuda", torch.bfloat16)
    b = decode_run(q, k, v, u, 64, 32, "key_value", [200, 300], 100, "cuda", torch.bfloat16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.cuda
def test_cuda_prefill_state_equals_cpu():
    q, k, v, u = stream(2, 3000, 4, 2, 64, "normal", seed=8)
    for gate in ("key_value", "none"):
        g = SparseKCache.from_prefill(k.cuda().half(), v.cuda().half(), u.cuda(), k_budget=100,
                                      window=50, gate=gate)
        c = SparseKCache.from_prefill(k.half(), v.half(), u, k_budget=100, window=50, gate=gate)
        for b in range(2):
            for h in range(2):
                x, y = live_state(g, b, h), live_state(c, b, h)
                assert x[0] == y[0] and x[1] == y[1] and x[3] == y[3]
                assert x[2] == pytest.approx(y[2], abs=1e-9)
        torch.testing.assert_close(g.k_cache.cpu(), c.k_cache)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["ramp", "ties", "flat"])
def test_cuda_fused_step_equals_append_then_attend(kind):
    """step() runs the attention as a dependent of the append that starts before the append ends
    (rows it loads early and the append rewrites are reloaded); append() + attend() run one after
    the other. Both must agree bitwise, in the steady state (window full, k selected, where the
    early loads are kept) and before it."""
    q, k, v, u = stream(2, 900, 8, 2, 128, kind, seed=21)
    lengths, steps, kb, w = [20, 600], 300, 48, 32
    cap = 1024 if kind == "flat" else None
    to = lambda t: t.to(device="cuda", dtype=torch.bfloat16)
    caches = [SparseKCache.from_prefill(
        to(k[:, :600]), to(v[:, :600]), u[:, :, :600].cuda(), k_budget=kb, window=w,
        lengths=torch.tensor(lengths, dtype=torch.int32, device="cuda"), score_capacity=cap)
        for _ in range(2)]
    ar = torch.arange(2)
    for s in range(steps):
        pos = torch.tensor(lengths) + s
        x = (to(q[ar, pos][:, None]), to(k[ar, pos][:, None]), to(v[ar, pos][:, None]),
             u[ar, :, pos][:, :, None].cuda())
        a, la = caches[0].step(*x, return_lse=True)
        caches[1].append(*x[1:])
        b, lb = caches[1].attend(x[0], return_lse=True)
        assert torch.equal(a, b) and torch.equal(la, lb), f"step {s}"
    for name in ("k_cache", "v_cache", "slot_u", "cand_u", "cand_pos", "cand_row", "tau", "counts"):
        assert torch.equal(getattr(caches[0], name), getattr(caches[1], name)), name
    caches[0].check()


def test_inputs_that_need_grad_are_refused_outside_no_grad():
    c = bsk.SparseKCache(1, 1, 64, k_budget=4, window=4, dtype=torch.float32, device="cpu")
    k = torch.randn(1, 1, 1, 64, requires_grad=True)
    v, u = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1)
    with pytest.raises(NotImplementedError, match="k_new.*not differentiable"):
        c.append(k, v, u)
    with torch.no_grad():
        c.append(k, v, u)
        out = c.step(torch.randn(1, 1, 2, 64), k, v, u)
    assert torch.isfinite(out).all() and not out.requires_grad
