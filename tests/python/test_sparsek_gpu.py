"""SparseK attention on CUDA through the Python package, against the float64 reference.

Accuracy: ||out - ref|| / ||ref|| within twice what rounding the reference to the dtype costs,
plus a floor (the bound of the C++ tests, tests/cpp/gpu_test_util.h). Every test needs a CUDA GPU.
"""
import pytest
import torch

import blackwell_sparsek as bsk

# Every test here runs once per kernel family (conftest.kernel_path).
pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("kernel_path")]

FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def randn(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)


def scores(kind, B, Hkv, S, seed):
    u = randn((B, Hkv, S), torch.float32, seed)
    if kind == "ties":
        return torch.floor(2 * u)
    if kind == "flat":
        return torch.full_like(u, 0.5)
    if kind == "ramp":
        return u + 0.01 * torch.arange(S, device="cuda")
    return u


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def check(q, k, v, u, kb, w, gate):
    out, lse = bsk.sparsek_attention(q, k, v, u, kb, w, gate, return_lse=True)
    ref, ref_lse = bsk.reference.sparsek_attention(q, k, v, u, kb, w, gate, return_lse=True)
    assert out.dtype == q.dtype and out.is_cuda and out.shape == q.shape
    o = out.cpu().double()
    assert not torch.isnan(o).any()
    bound = 2 * rel(ref.to(q.dtype).double(), ref) + FLOOR[q.dtype]
    assert rel(o, ref) <= bound
    torch.testing.assert_close(lse.cpu(), ref_lse, rtol=0, atol=1e-3)
    return out, lse


# Shapes where, on Hopper, the window band's first block selects the lists' newer candidates per
# element (SparseKCta::fold); test_without_fold runs them with that off as well.
FOLD_CASES = {  # B, Sq, Skv, Hq, Hkv, D, k, w, gate, scores
    # w a multiple of 128 with 32-position tiles: window bands that start on a block boundary
    # (where the lists' newer candidates begin), first blocks with and without a threshold,
    # Sq < Skv included.
    "kv": (1, 700, 700, 8, 2, 128, 60, 128, "key_value", "ramp"),
    "none": (1, 640, 640, 8, 2, 64, 100, 128, "none", "ties"),
    "value": (1, 520, 900, 4, 1, 64, 40, 256, "value", "flat"),
    # One query head per KV head (128-position tiles) with Sq < Skv and w = Skv - Sq: the band's
    # first block holds the tile's newer candidates and the causal diagonal.
    "heads1": (1, 600, 640, 2, 2, 64, 50, 40, "key_value", "normal"),
    "heads1_value": (1, 600, 640, 2, 2, 128, 50, 40, "value", "ties"),
}

CASES = [  # B, Sq, Skv, Hq, Hkv, D, k, w, gate, scores
    (1, 256, 256, 4, 2, 64, 24, 16, "key_value", "normal"),
    (1, 256, 256, 4, 2, 128, 24, 16, "value", "ties"),
    (1, 256, 256, 4, 2, 64, 24, 16, "none", "flat"),
    (2, 900, 900, 2, 1, 128, 70, 40, "key_value", "ramp"),
    (1, 77, 300, 8, 2, 64, 20, 9, "key_value", "normal"),
    (1, 300, 300, 2, 2, 128, 0, 33, "key_value", "normal"),
    (1, 190, 190, 2, 2, 64, 30, 0, "value", "ties"),
    (1, 17, 17, 2, 1, 128, 5, 3, "key_value", "normal"),
    # More than one 4096-position tile of the selection's scans of the sorted order: the
    # threshold and the band's upper edge past the first tile (a large k), and a band of more
    # active keys than select_init keeps in shared memory (flat scores: every key within 1).
    (1, 64, 12000, 2, 1, 128, 9000, 64, "key_value", "normal"),
    (1, 64, 12000, 2, 1, 64, 6000, 64, "value", "flat"),
    *FOLD_CASES.values(),
    # More tiles (188) than an H100 or H200 has SMs: persistent Hopper CTAs take two (the K/V
    # rings and the double-buffered Q and rows' state cross tiles).
    (1, 3000, 3000, 8, 2, 64, 200, 128, "key_value", "ramp"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_Sq{}_Skv{}_H{}x{}_D{}_k{}_w{}_{}_{}".format(*c))
def test_matches_reference(case, dtype):
    B, Sq, Skv, Hq, Hkv, D, kb, w, gate, kind = case
    q = randn((B, Sq, Hq, D), dtype, 1)
    k = randn((B, Skv, Hkv, D), dtype, 2)
    v = randn((B, Skv, Hkv, D), dtype, 3)
    check(q, k, v, scores(kind, B, Hkv, Skv, 4), kb, w, gate)


@pytest.mark.parametrize("group", ["2", "3", "4"])
def test_lists_per_block(monkeypatch, group):
    """The list kernel builds several lists per block where there are many (131072 keys); forced
    at a small shape (24 lists, so 3 per block leaves a partial block): the reference's result,
    and bitwise the one-list-per-block result."""
    q = randn((1, 1500, 8, 64), torch.bfloat16, 30)
    k = randn((1, 1500, 2, 64), torch.bfloat16, 31)
    v = randn((1, 1500, 2, 64), torch.bfloat16, 32)
    u = scores("ramp", 1, 2, 1500, 33)
    monkeypatch.setenv("BSK_SPARSEK_LISTS_PER_BLOCK", "1")
    one = bsk.sparsek_attention(q, k, v, u, 100, 64, "key_value")
    monkeypatch.setenv("BSK_SPARSEK_LISTS_PER_BLOCK", group)
    out, _ = check(q, k, v, u, 100, 64, "key_value")
    assert torch.equal(out, one)


@pytest.mark.parametrize("name", ["kv", "value", "heads1_value"])
def test_without_fold(monkeypatch, name):
    """BSK_SPARSEK_FOLD=0: on Hopper the lists keep their newer candidates instead of the window
    band's first block selecting them (the A/B switch); exact as well."""
    monkeypatch.setenv("BSK_SPARSEK_FOLD", "0")
    test_matches_reference(FOLD_CASES[name], torch.bfloat16)


def test_non_contiguous_inputs():
    qb = randn((1, 4, 200, 64), torch.bfloat16, 5)  # BHSD storage viewed as BSHD
    kb_ = randn((1, 2, 200, 64), torch.bfloat16, 6)
    vb = randn((1, 2, 200, 64), torch.bfloat16, 7)
    u = randn((1, 200, 2), torch.float32, 8).transpose(1, 2)  # strided scores
    check(qb.transpose(1, 2), kb_.transpose(1, 2), vb.transpose(1, 2), u, 20, 10, "key_value")


def test_hard_topk_over_everything_is_causal_attention():
    q = randn((1, 300, 4, 128), torch.float16, 9)
    k = randn((1, 300, 2, 128), torch.float16, 10)
    v = randn((1, 300, 2, 128), torch.float16, 11)
    u = randn((1, 2, 300), torch.float32, 12)
    out = bsk.sparsek_attention(q, k, v, u, 300, 0, "none")
    dense = bsk.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, dense, rtol=2e-3, atol=2e-3)


def test_bitwise_reproducible():
    q = randn((1, 700, 4, 64), torch.bfloat16, 13)
    k = randn((1, 700, 1, 64), torch.bfloat16, 14)
    v = randn((1, 700, 1, 64), torch.bfloat16, 15)
    u = scores("ties", 1, 1, 700, 16)
    a = bsk.sparsek_attention(q, k, v, u, 50, 20, return_lse=True)
    b = bsk.sparsek_attention(q, k, v, u, 50, 20, return_lse=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_raise(bad):
    q = randn((1, 64, 2, 64), torch.float16, 17)
    k = randn((1, 64, 2, 64), torch.float16, 18)
    u = randn((1, 2, 64), torch.float32, 19)
    u[0, 1, 5] = bad
    with pytest.raises(ValueError, match="finite"):
        bsk.sparsek_attention(q, k, k, u, 8, 4)


def test_opcheck():
    q = randn((1, 40, 4, 64), torch.float16, 20)
    k = randn((1, 40, 2, 64), torch.float16, 21)
    u = randn((1, 2, 40), torch.float32, 22)
    torch.library.opcheck(torch.ops.blackwell_sparsek.sparsek_fwd.default,
                          (q, k, k, u, 6, 4, "key_value", None))


def test_no_keys_gives_zero_rows():
    """Skv = 0 (found by the fuzz suite: the score check launched an empty grid)."""
    q = randn((1, 3, 2, 64), torch.float16, 23)
    k = torch.empty((1, 0, 1, 64), device="cuda", dtype=torch.float16)
    u = torch.empty((1, 1, 0), device="cuda")
    out, lse = bsk.sparsek_attention(q, k, k, u, 4, 2, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, float("-inf")))


@pytest.mark.parametrize("gate", ["key_value", "value"])
def test_scores_spanning_more_than_2_pow_20_raise(gate):
    """Found by the GPU fuzz: six tied scores at 1e17 among zeros with k = 5 gave all-zero rows
    (tau lost in the selection's float64 arithmetic). The CUDA path now refuses such spans."""
    q = randn((1, 1, 1, 64), torch.float16, 1)
    k = randn((1, 9, 1, 64), torch.float16, 2)
    v = randn((1, 9, 1, 64), torch.float16, 3)
    u = torch.tensor([[[1e17, 0, 1e17, 1e17, 1e17, 0, 1e17, 0, 1e17]]], device="cuda")
    with pytest.raises(ValueError, match="span"):
        bsk.sparsek_attention(q, k, v, u, 5, 0, gate=gate)
    # Hard top-k needs no tau and takes any finite span; 1e6 spans are fine with every gate.
    for uu, g in ((u, "none"), (u * 1e-11, gate)):
        out = bsk.sparsek_attention(q, k, v, uu, 5, 0, gate=g)
        ref = bsk.sparsek_attention(q.cpu(), k.cpu(), v.cpu(), uu.cpu(), 5, 0, gate=g)
        torch.testing.assert_close(out.cpu(), ref, atol=2e-3, rtol=2e-3)
