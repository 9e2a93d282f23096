"""blackwell_sparsek.hf, the Transformers attention backend, on a small random-weight Llama (GQA
8/2, head dim 64) against transformers' own sdpa backend.

Accuracy criterion, as in test_gpu.py: measured against the same model run in float64 with eager
attention, the max abs error of our logits must be at most twice that of the sdpa backend in the
same dtype, plus one ulp of the logits' magnitude (for cases where both are near exact). On CPU
float32 both are ~1e-6, dominated by the float32 layers around attention; greedy decoding must
then give the same tokens. Fallbacks (padding masks and the like) must give sdpa's result exactly,
with one FallbackWarning per reason.
"""

import copy
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import blackwell_sparsek as bsk  # noqa: E402
import blackwell_sparsek.hf as hf  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM, DynamicCache, LlamaConfig, MistralConfig)
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

LAYERS = 4
NEW_TOKENS = 32


def config(head_dim=64):
    return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim,
                       vocab_size=512, max_position_embeddings=256)


def build(device="cpu", dtype=torch.float32, head_dim=64, with_ref=True):
    """The model in dtype, and its float64 eager twin (the oracle) on the same device."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(head_dim), attn_implementation="sdpa")
    model.eval()
    ref = None
    if with_ref:
        ref = copy.deepcopy(model).to(device, torch.float64)
        ref.set_attn_implementation("eager")
    return model.to(device, dtype), ref


@pytest.fixture(scope="module")
def cpu_models():
    return build()


def tokens(batch, length, device="cpu", seed=1):
    # From 1: token 0 is the pad token, which generate() would read as padding.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 512, (batch, length), generator=g).to(device)


def run(model, impl, *args, **kwargs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(*args, **kwargs).logits


def generate(model, impl, ids, **kwargs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, 1)  # logits [B, NEW_TOKENS, vocab]


def error(logits, ref_logits):
    return (logits.double() - ref_logits).abs().max().item()


def assert_within_2x(ours, theirs, ref_logits, dtype):
    err_ours, err_sdpa = error(ours, ref_logits), error(theirs, ref_logits)
    floor = torch.finfo(dtype).eps * ref_logits.abs().max().item()
    assert err_ours <= 2 * err_sdpa + floor, \
        f"max abs error {err_ours:.3e} > 2 x sdpa's ({err_sdpa:.3e}) + {floor:.1e}"


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach blackwell_sparsek.attention and turns any fallback into an
    error: the tests using it must run the kernel in every layer."""
    calls = []
    real = bsk.attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(bsk, "attention", counting)
    hf._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf.FallbackWarning)
        yield calls


@pytest.fixture
def fresh_warnings():
    hf._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield lambda: [w for w in caught if issubclass(w.category, hf.FallbackWarning)]


# ---- registration --------------------------------------------------------------------------------


def test_registered_and_idempotent(tmp_path):
    assert ALL_ATTENTION_FUNCTIONS["blackwell_sparsek"] is hf.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["blackwell_sparsek"] is hf.mask_interface
    hf.register()
    hf.register()
    assert ALL_ATTENTION_FUNCTIONS["blackwell_sparsek"] is hf.attention_forward
    model = AutoModelForCausalLM.from_config(config(), attn_implementation="blackwell_sparsek")
    assert model.config._attn_implementation == "blackwell_sparsek"
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="blackwell_sparsek")
    assert loaded.config._attn_implementation == "blackwell_sparsek"
    loaded.set_attn_implementation("sdpa")
    assert loaded.config._attn_implementation == "sdpa"


def test_import_without_transformers():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"  # makes `import transformers` fail
        "import blackwell_sparsek as bsk\n"
        "import torch\n"
        "q = torch.randn(1, 3, 2, 16)\n"
        "bsk.attention(q, q, q, causal=True)\n"
        "try:\n"
        "    import blackwell_sparsek.hf\n"
        "except ImportError as e:\n"
        "    assert 'pip install transformers' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('blackwell_sparsek.hf imported without transformers')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the kernel path, CPU float32 ----------------------------------------------------------------


@pytest.mark.parametrize("length", [37, 64])
def test_prefill_logits(cpu_models, kernel_calls, length):
    model, ref = cpu_models
    ids = tokens(2, length)
    ours = run(model, "blackwell_sparsek", ids)
    assert len(kernel_calls) == LAYERS
    theirs = run(model, "sdpa", ids)
    assert_within_2x(ours, theirs, run(ref, "eager", ids), torch.float32)


def test_greedy_generate_with_cache(cpu_models, kernel_calls):
    model, ref = cpu_models
    ids = tokens(2, 37, seed=2)
    seq, ours = generate(model, "blackwell_sparsek", ids)
    # One prefill, then one query row over the cache per new token, in every layer.
    assert len(kernel_calls) == LAYERS * NEW_TOKENS
    assert all(shape[1] == 1 for shape in kernel_calls[LAYERS:])
    seq_sdpa, theirs = generate(model, "sdpa", ids)
    assert torch.equal(seq, seq_sdpa)
    # The float64 model fed the same tokens at once gives every step's exact logits.
    ref_steps = run(ref, "eager", seq[:, :-1])[:, ids.shape[1] - 1:]
    assert_within_2x(ours, theirs, ref_steps, torch.float32)


def test_chunked_prefill_over_cache(cpu_models, kernel_calls):
    # Sq > 1 queries over a longer cache: the bottom-right causal mask, no mask tensor.
    model, _ = cpu_models
    ids = tokens(2, 37, seed=3)
    full = run(model, "blackwell_sparsek", ids)
    cache = DynamicCache(config=model.config)
    first = run(model, "blackwell_sparsek", ids[:, :20], past_key_values=cache, use_cache=True)
    second = run(model, "blackwell_sparsek", ids[:, 20:], past_key_values=cache, use_cache=True)
    assert kernel_calls[-1][1] == 17
    torch.testing.assert_close(torch.cat([first, second], 1), full)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_4d_causal_mask_runs_kernel_checked_once(cpu_models, kernel_calls, monkeypatch, kind):
    model, _ = cpu_models
    ids = tokens(2, 37, seed=4)
    plain = run(model, "blackwell_sparsek", ids)
    mask = torch.ones(37, 37, dtype=torch.bool).tril()[None, None].expand(2, 1, 37, 37)
    if kind == "additive":
        mask = torch.zeros(2, 1, 37, 37).masked_fill(~mask, torch.finfo(torch.float32).min)
    checks = []
    classify = hf._classify
    monkeypatch.setattr(hf, "_classify", lambda *a: checks.append(1) or classify(*a))
    torch.testing.assert_close(run(model, "blackwell_sparsek", ids, attention_mask=mask), plain)
    assert len(kernel_calls) == 2 * LAYERS
    assert len(checks) == 1  # one look at the mask per forward, not one per layer


def test_mask_interface_returns_none_only_for_the_kernels_mask():
    ones = torch.ones(2, 10, dtype=torch.bool)
    common = dict(batch_size=2, dtype=torch.float32, device="cpu")
    # Decode over a dynamic cache and full prefill: the kernel's own causal mask.
    assert hf.mask_interface(q_length=1, kv_length=10, q_offset=9, attention_mask=ones,
                             **common) is None
    assert hf.mask_interface(q_length=10, kv_length=10, attention_mask=None, **common) is None
    # Padding, a static cache's unwritten slots (tensor offset, kv_length past the queries), or a
    # skip the caller forbids: sdpa's boolean mask.
    padded = ones.clone()
    padded[0, :3] = False
    cases = [dict(q_length=1, kv_length=10, q_offset=9, attention_mask=padded),
             dict(q_length=4, kv_length=10, q_offset=torch.tensor(0), attention_mask=ones),
             dict(q_length=4, kv_length=10, q_offset=0, attention_mask=None),
             dict(q_length=10, kv_length=10, attention_mask=None, allow_is_causal_skip=False)]
    for case in cases:
        mask = hf.mask_interface(**case, **common)
        args = {**case, "allow_is_causal_skip": False}
        assert torch.equal(mask, sdpa_mask(**args, **common)), case


# ---- fallbacks -----------------------------------------------------------------------------------


def test_padded_batch_falls_back_with_one_warning(cpu_models, fresh_warnings):
    model, _ = cpu_models
    ids = tokens(2, 37, seed=5)
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[0, :6] = 0  # left padding
    theirs = run(model, "sdpa", ids, attention_mask=mask)
    ours = run(model, "blackwell_sparsek", ids, attention_mask=mask)
    warned = fresh_warnings()
    assert len(warned) == 1 and "attention_mask" in str(warned[0].message)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # Decoding keeps the padding in the mask: still sdpa, and no second warning.
    seq, _ = generate(model, "blackwell_sparsek", ids, attention_mask=mask)
    seq_sdpa, _ = generate(model, "sdpa", ids, attention_mask=mask)
    assert torch.equal(seq, seq_sdpa)
    assert len(fresh_warnings()) == 1


def test_static_cache_falls_back(cpu_models, fresh_warnings):
    # A static cache's mask hides the slots not written yet, which the kernel cannot.
    model, _ = cpu_models
    ids = tokens(1, 12, seed=6)
    seq, _ = generate(model, "blackwell_sparsek", ids, cache_implementation="static")
    seq_sdpa, _ = generate(model, "sdpa", ids, cache_implementation="static")
    assert torch.equal(seq, seq_sdpa)
    assert len(fresh_warnings()) == 1


@pytest.mark.parametrize("window", [16, 40])
def test_sliding_window(fresh_warnings, monkeypatch, window):
    # A window that covers every key changes nothing, so the kernel runs: for a 37-token prompt
    # with window 40, and for every decode step (the sliding cache keeps window - 1 keys). A
    # prompt longer than the window falls back.
    cfg = MistralConfig(**{k: v for k, v in config().to_dict().items() if k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")},
        sliding_window=window)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    ids = tokens(2, 37, seed=8)
    calls = []
    real = bsk.attention
    monkeypatch.setattr(bsk, "attention",
                        lambda *a, **k: calls.append(a[1].shape[1]) or real(*a, **k))
    seq, ours = generate(model, "blackwell_sparsek", ids)
    seq_sdpa, theirs = generate(model, "sdpa", ids)
    assert torch.equal(seq, seq_sdpa)
    torch.testing.assert_close(ours, theirs)
    warned = [str(w.message) for w in fresh_warnings()]
    decode_calls = LAYERS * (NEW_TOKENS - 1)
    if window >= 37:
        assert not warned and len(calls) == LAYERS * NEW_TOKENS and max(calls) == window
    else:
        assert len(warned) == 1 and "sliding" in warned[0]
        assert len(calls) == decode_calls and set(calls) == {window}


class _Attn(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 4


def _bhsd(b, h, s, d, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, s, d, generator=g).requires_grad_(requires_grad)


@pytest.mark.parametrize("kwargs,reason", [
    (dict(softcap=30.0), "softcap"),
    (dict(s_aux=torch.zeros(8)), "s_aux"),
    (dict(sliding_window=4), "sliding"),
    (dict(position_bias=torch.zeros(1, 8, 9, 9)), "position_bias"),
])
def test_unsupported_arguments_fall_back(fresh_warnings, kwargs, reason):
    q, k, v = _bhsd(2, 8, 9, 64, 1), _bhsd(2, 2, 9, 64, 2), _bhsd(2, 2, 9, 64, 3)
    out, weights = hf.attention_forward(_Attn(), q, k, v, None, scaling=0.125, **kwargs)
    ref, _ = sdpa_attention_forward(_Attn(), q, k, v, None, scaling=0.125, **kwargs)
    assert weights is None and torch.equal(out, ref)
    warned = fresh_warnings()
    assert len(warned) == 1 and reason in str(warned[0].message)


def test_fallback_keeps_bottom_right_causal_mask(fresh_warnings):
    # Sq > 1 over a longer cache, falling back (here: softcap): sdpa's own is_causal would be
    # top-left, so the fallback must pass the bottom-right mask the kernel would have applied.
    q, k, v = _bhsd(1, 8, 5, 64, 4), _bhsd(1, 2, 12, 64, 5), _bhsd(1, 2, 12, 64, 6)
    out, _ = hf.attention_forward(_Attn(), q, k, v, None, softcap=30.0)
    kernel, _ = hf.attention_forward(_Attn(), q, k, v, None)
    torch.testing.assert_close(out, kernel)
    assert len(fresh_warnings()) == 1


def test_grad_runs_the_kernel_and_dropout_falls_back(fresh_warnings):
    q, k, v = _bhsd(1, 8, 9, 64, 7, True), _bhsd(1, 2, 9, 64, 8), _bhsd(1, 2, 9, 64, 9)
    out, _ = hf.attention_forward(_Attn(), q, k, v, None)
    assert not fresh_warnings()  # inputs that need grad no longer fall back: the kernel trains
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(10))
    (dq,) = torch.autograd.grad(out, q, g)
    expect, _ = sdpa_attention_forward(_Attn(), q, k, v, None, is_causal=True)
    (eq,) = torch.autograd.grad(expect, q, g)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq, eq, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        hf.attention_forward(_Attn(), q, k, v, None, dropout=0.1)
    warned = [str(w.message) for w in fresh_warnings()]
    assert len(warned) == 1 and "dropout" in warned[0]


# ---- CUDA, bfloat16 ------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_bf16_prefill_and_decode(kernel_calls, head_dim):
    model, ref = build("cuda", torch.bfloat16, head_dim)
    ids = tokens(2, 64, "cuda", seed=7)
    ours = run(model, "blackwell_sparsek", ids)
    assert len(kernel_calls) == LAYERS
    theirs = run(model, "sdpa", ids)
    assert_within_2x(ours, theirs, run(ref, "eager", ids), torch.bfloat16)
    # bfloat16 can break a near tie differently, so each run's step logits are measured against
    # the float64 model fed that run's own tokens.
    seq, ours = generate(model, "blackwell_sparsek", ids)
    seq_sdpa, theirs = generate(model, "sdpa", ids)
    p = ids.shape[1] - 1
    err_ours = error(ours, run(ref, "eager", seq[:, :-1])[:, p:])
    err_sdpa = error(theirs, run(ref, "eager", seq_sdpa[:, :-1])[:, p:])
    floor = torch.finfo(torch.bfloat16).eps * ours.abs().max().item()
    assert err_ours <= 2 * err_sdpa + floor, f"{err_ours:.3e} vs sdpa {err_sdpa:.3e}"


def _host_syncs(fn):
    """How many device-to-host synchronizations fn makes (torch's sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Not "synchroniz" alone: turning the mode on warns that it is a prototype.
    return sum("called a synchronizing" in str(w.message) for w in caught)


@pytest.mark.cuda
def test_cuda_mask_handling_costs_no_host_sync(kernel_calls):
    model, _ = build("cuda", torch.bfloat16, with_ref=False)
    ids = tokens(2, 64, "cuda", seed=9)

    def forwards(impl, mask=None):
        model.set_attn_implementation(impl)
        cache = DynamicCache(config=model.config)
        prefill = _host_syncs(lambda: model(ids, past_key_values=cache, use_cache=True))
        decode = _host_syncs(lambda: model(ids[:, -1:], past_key_values=cache, use_cache=True))
        masked = _host_syncs(lambda: model(ids, attention_mask=mask)) if mask is not None else 0
        return prefill, decode, masked

    causal = torch.ones(64, 64, dtype=torch.bool, device="cuda").tril()[None, None]
    ours = forwards("blackwell_sparsek", causal.expand(2, 1, 64, 64))
    theirs = forwards("sdpa")
    assert len(kernel_calls) == 3 * LAYERS
    # Without a mask tensor, none beyond what the model does with sdpa; a 4-D causal mask
    # tensor is looked at once per forward, not once per layer.
    assert ours[0] <= theirs[0] and ours[1] <= theirs[1], (ours, theirs)
    assert ours[2] == 1, ours
