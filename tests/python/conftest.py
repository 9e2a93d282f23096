"""Shared pytest setup: the `cuda` marker and fixture, and float64 attention oracles in torch.

GPU tests are marked ``@pytest.mark.cuda`` (or take the ``cuda`` fixture); on a machine without a
usable GPU they are skipped with an explicit reason instead of failing.
"""

import math

import pytest
import torch

NO_CUDA_REASON = "no CUDA GPU: torch.cuda.is_available() is False"


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
    p = torch.exp(s - lse.unsqueeze(-1))
    p = torch.nan_to_num(p, nan=0.0)  # empty rows: exp(-inf - -inf)
    out = torch.matmul(p, vv).permute(0, 2, 1, 3)
    return out.contiguous(), lse
