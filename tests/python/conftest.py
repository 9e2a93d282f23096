"""Shared pytest setup: the `cuda` marker and fixture, and float64 attention oracles in torch.

GPU tests are marked ``@pytest.mark.cuda`` (or take the ``cuda`` fixture); on a machine without a
usable GPU they are skipped with an explicit reason instead of failing.
"""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

NO_CUDA_REASON = "no CUDA GPU: torch.cuda.is_available() is False"

# Hypothesis profiles of the fuzz suite (tests/python/test_fuzz.py). "ci" is the default: the
# examples are derived from each test's name (derandomize), so every CI run checks the same ones,
# and no example database is written; the counts keep the file near a minute on 2 CPU cores.
# "gpu" (scripts/gpu_check.sh) runs 30x more against the CUDA paths (about 2,000 cases, under a
# minute on an H100); "sanitizer" the "ci" counts (about 70 CUDA cases), since compute-sanitizer
# slows every kernel a hundredfold. Select with BSK_HYPOTHESIS_PROFILE.
# FUZZ_SCALE multiplies the per-test example counts that test_fuzz.py states for "ci".
_FUZZ_COMMON = dict(derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_SCALE = {"ci": 1.0, "gpu": 30.0, "sanitizer": 1.0}
for _name, _scale in FUZZ_SCALE.items():
    settings.register_profile(_name, max_examples=max(2, int(50 * _scale)), **_FUZZ_COMMON)
HYPOTHESIS_PROFILE = os.environ.get("BSK_HYPOTHESIS_PROFILE", "ci")
if HYPOTHESIS_PROFILE not in FUZZ_SCALE:
    raise ValueError(f"BSK_HYPOTHESIS_PROFILE must be one of {sorted(FUZZ_SCALE)}, "
                     f"got {HYPOTHESIS_PROFILE!r}")
settings.load_profile(HYPOTHESIS_PROFILE)


def fuzz_examples(ci_count):
    """The example count of a fuzz test whose "ci" count is ci_count, in the active profile."""
    return max(2, int(ci_count * FUZZ_SCALE[HYPOTHESIS_PROFILE]))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped when there is none)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cuda():
    """The CUDA device to test on; skips the test when there is none."""
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA_REASON)
    return torch.device("cuda", torch.cuda.current_device())


def causal_mask(sq, skv, device=None):
    """Bottom-right aligned causal mask [Sq, Skv] (True = visible): row t sees j <= t + Skv - Sq.

    torch's ``is_causal`` is top-left aligned, so tests build this one explicitly.
    """
    t = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(skv, device=device).unsqueeze(0)
    return j <= t + (skv - sq)


def ref_attention(q, k, v, causal=False, scale=None, mask=None):
    """Plain-torch float64 attention on BSHD tensors, written independently of the library.

    Returns (out [B, Sq, Hq, D] float64, lse [B, Hq, Sq] float64). Rows with no visible key give
    out 0 and lse -inf (the FlashAttention convention the library follows). ``mask`` (bool
    [Sq, Skv] or broadcastable to [B, Hq, Sq, Skv], True = visible) overrides ``causal``.
    """
    q = q.detach().to("cpu", torch.float64)
    k = k.detach().to("cpu", torch.float64)
    v = v.detach().to("cpu", torch.float64)
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    rep = Hq // Hkv
    kk = k.repeat_interleave(rep, dim=2).permute(0, 2, 3, 1)  # [B, Hq, D, Skv]
    vv = v.repeat_interleave(rep, dim=2).permute(0, 2, 1, 3)  # [B, Hq, Skv, D]
    s = torch.matmul(q.permute(0, 2, 1, 3), kk) * scale  # [B, Hq, Sq, Skv]
    if mask is None and causal:
        mask = causal_mask(Sq, Skv)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf on empty rows
    # softmax normalizes by the sum, not by exp(lse): at huge logits (scale 1e39) lse = max +
    # log(n) rounds back to max and exp(s - lse) would give every tied maximum a weight of 1.
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # empty rows: softmax over nothing but -inf
    out = torch.matmul(p, vv).permute(0, 2, 1, 3)
    return out.contiguous(), lse


INF = float("inf")


# ---- independent SparseK oracles ----------------------------------------------------------------


def gates_bisect(z, k):
    """SPARSEK gates of 1-D z by bisection on tau in float64 (independent of the closed form).

    The bisection runs on z - z_(k) (z_(k): the k-th largest), where tau lies in [-1, 0): on z
    itself, once |z| >= 2^53, z - 1 == z and the interval to bisect vanishes. The shift is exact
    where the gates are fractional and rounds only values that clip anyway."""
    z = z.double()
    m = z.numel()
    if m <= k:
        return torch.ones_like(z)
    if k == 0:
        return torch.zeros_like(z)
    y = z - torch.sort(z, descending=True).values[k - 1]
    lo, hi = -1.0, 0.0  # f(lo) >= k (the top k are >= 0), f(hi) < k
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if (y - mid).clamp(0, 1).sum().item() > k:
            lo = mid
        else:
            hi = mid
    return (y - hi).clamp(0, 1)


def spec_order(u, idx):
    """idx sorted by the spec's order: larger u first, ties toward the larger index."""
    return sorted(idx, key=lambda j: (-float(u[j]), -j))


def sparsek_oracle(q, k, v, u, kb, w, gate, scale=None):
    """SparseK attention straight from the spec, one query row at a time. float64 [B,Sq,Hq,D]."""
    q, k, v = (t.double() for t in (q, k, v))
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Sq, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, Sq), -INF, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            ub = u[b, g]
            for t in range(Sq):
                i = Skv - Sq + t
                if i < 0:
                    continue
                window = list(range(max(0, i - w + 1), i + 1))
                cands = list(range(0, i - w + 1))
                sel = spec_order(ub, cands)[:min(kb, len(cands))]
                m = gates_bisect(ub[cands], kb) if cands else torch.zeros(0, dtype=torch.float64)
                gate_of = {j: m[n].item() for n, j in enumerate(cands)}
                logits, weights, rows = [], [], []
                for j in window + sel:
                    s = scale * torch.dot(q[b, t, h], k[b, j, g]).item()
                    if j in window or gate == "none":
                        lj, gj = s, 1.0
                    elif gate == "value":
                        lj, gj = s, gate_of[j]
                    else:  # key_value
                        lj, gj = gate_of[j] * s, gate_of[j]
                    logits.append(lj)
                    weights.append(gj)
                    rows.append(v[b, j, g])
                lt = torch.tensor(logits, dtype=torch.float64)
                p = torch.softmax(lt, 0) * torch.tensor(weights, dtype=torch.float64)
                out[b, t, h] = (p.unsqueeze(1) * torch.stack(rows)).sum(0)
                lse[b, h, t] = torch.logsumexp(lt, 0)
    return out, lse


@pytest.fixture(params=["sm80", "sm90"])
def kernel_path(request):
    """Parametrizes a test over the CUDA kernel families, forced through the dispatcher's hook:
    sm80 (mma.sync, any GPU) and sm90 (Hopper only, skipped elsewhere). Dense and SparseK follow it."""
    from blackwell_sparsek import _C
    if request.param == "sm90" and not (
        torch.cuda.is_available() and _C._dense_sm90_available(torch.cuda.current_device())
    ):
        pytest.skip("the sm90 dense kernel needs a compute-capability-9.0 GPU and sm_90a code")
    _C._set_dense_path(request.param)
    yield request.param
    _C._set_dense_path("auto")
