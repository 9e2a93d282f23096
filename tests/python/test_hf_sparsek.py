"""blackwell_sparsek.hf_sparsek: SparseK attention in a small random-weight Llama (GQA 8/2) and
generation from SparseKGenerationCache.

The key property: decoding from the cache gives, at every step, the logits that running the
converted model over the whole prefix (no cache) gives, i.e. the prefill definition through the
whole model. On CPU (float32 model, float64 reference kernels) both agree to float32 rounding.
On CUDA (bf16) the cache's decode kernel and the prefill kernel round differently, so both are
measured against the float64 CPU model instead: decoding must be at most twice as far from it as
the bf16 prefill, plus one bf16 ulp of the logits.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import blackwell_sparsek as bsk  # noqa: E402
from blackwell_sparsek import hf_sparsek  # noqa: E402
from blackwell_sparsek.hf_sparsek import SparseKGenerationCache, convert_to_sparsek  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

LAYERS = 3
VOCAB = 512
K_BUDGET, WINDOW = 8, 8
PROMPT, NEW = 40, 30
ATOL = 1e-4  # float32 logits of magnitude ~1; observed differences are ~1e-6


def config(head_dim=64, layers=LAYERS):
    return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim,
                       vocab_size=VOCAB, max_position_embeddings=512,
                       eos_token_id=None)  # generate() always runs max_new_tokens steps


def dense_model(head_dim=64, layers=LAYERS):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config(head_dim, layers),
                                            attn_implementation="sdpa").eval()


def sparsek_model(k_budget=K_BUDGET, window=WINDOW, gate="key_value", slope_init=0.05,
                  head_dim=64, **kwargs):
    # slope 0.05 makes positions matter over these lengths (a decode step scored at the wrong
    # position would select differently), with content scores of std ~1 on top.
    model = dense_model(head_dim)
    return convert_to_sparsek(model, k_budget, window, gate, slope_init=slope_init, **kwargs)


def tokens(batch, length, seed=1, device="cpu"):
    # From 1: token 0 is the pad token, which generate() would read as padding.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g).to(device)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def greedy(model, ids, steps, cache):
    """Manual greedy loop with the cache: (sequence, logits of each step [B, steps, V])."""
    out = []
    with torch.no_grad():
        step = model(ids, past_key_values=cache).logits[:, -1]
        for i in range(steps):
            out.append(step)
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
            if i + 1 < steps:
                step = model(ids[:, -1:], past_key_values=cache).logits[:, -1]
    return ids, torch.stack(out, 1)


def attention_modules(model):
    return [layer.self_attn for layer in model.model.layers]


@pytest.fixture(scope="module")
def kv_model():
    return sparsek_model()


# ---- conversion ----------------------------------------------------------------------------------

def test_convert_attaches_trainable_scorers(kv_model):
    assert kv_model.config._attn_implementation == hf_sparsek.NAME
    assert kv_model.config.sparsek == dict(k_budget=K_BUDGET, window=WINDOW, gate="key_value",
                                           score_capacity=None)
    state = kv_model.state_dict()
    for i, attn in enumerate(attention_modules(kv_model)):
        scorer = attn.sparsek_scorer
        assert scorer.w_score.shape == (256, 2) and scorer.slope.shape == (2,)
        assert scorer.w_score.requires_grad and scorer.slope.requires_grad
        assert torch.equal(state[f"model.layers.{i}.self_attn.sparsek_scorer.w_score"],
                           scorer.w_score)
        assert torch.allclose(scorer.slope, torch.full((2,), 0.05))
    # Scores and cache of a call are dropped with it.
    logits(kv_model, tokens(1, 8))
    for attn in attention_modules(kv_model):
        assert attn._sparsek_u is None and attn._sparsek_pkv is None


def test_scorer_state_round_trips():
    a = sparsek_model()
    b = dense_model()
    torch.manual_seed(123)  # other random scorers, then a's loaded over them
    convert_to_sparsek(b, K_BUDGET, WINDOW)
    assert not torch.equal(a.model.layers[0].self_attn.sparsek_scorer.w_score,
                           b.model.layers[0].self_attn.sparsek_scorer.w_score)
    b.load_state_dict(a.state_dict())
    ids = tokens(1, PROMPT)
    assert torch.equal(logits(a, ids), logits(b, ids))


def test_reconvert_keeps_scorers():
    model = sparsek_model()
    w = model.model.layers[1].self_attn.sparsek_scorer.w_score
    convert_to_sparsek(model, 4, 2, gate="none")
    assert model.model.layers[1].self_attn.sparsek_scorer.w_score is w
    assert model.config.sparsek["gate"] == "none"


def test_name_without_conversion_raises():
    model = dense_model(layers=1)
    model.set_attn_implementation(hf_sparsek.NAME)
    with pytest.raises(RuntimeError, match="convert_to_sparsek"):
        logits(model, tokens(1, 8))


def test_convert_refuses_models_without_attention():
    with pytest.raises(ValueError, match="no attention module"):
        convert_to_sparsek(torch.nn.Linear(4, 4), 4, 4)
    with pytest.raises(ValueError, match="k_budget"):
        convert_to_sparsek(dense_model(layers=1), 0, 0)


# ---- prefill -------------------------------------------------------------------------------------

def test_prefill_matches_manual_sparsek(kv_model):
    """Each attention module's output is o_proj(sparsek_attention(rope(q), rope(k), v, u)) with
    u = x @ w_score + slope * position computed here independently, at absolute positions."""
    seen = []

    def grab(module, args, kwargs, output):
        seen.append((module, kwargs["hidden_states"], kwargs["position_embeddings"],
                     kwargs["position_ids"], output[0]))

    handles = [a.register_forward_hook(grab, with_kwargs=True)
               for a in attention_modules(kv_model)]
    try:
        ids = tokens(2, PROMPT)
        start = 7  # positions need not start at 0
        logits(kv_model, ids, position_ids=torch.arange(start, start + PROMPT)[None])
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == LAYERS
    for attn, x, (cos, sin), pos, out in seen:
        B, S, _ = x.shape
        D = attn.head_dim
        with torch.no_grad():
            q = attn.q_proj(x).view(B, S, -1, D).transpose(1, 2)
            k = attn.k_proj(x).view(B, S, -1, D).transpose(1, 2)
            v = attn.v_proj(x).view(B, S, -1, D)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            w = attn.sparsek_scorer.w_score.double()
            slope = attn.sparsek_scorer.slope.double()
            u = torch.einsum("bsd,dh->bhs", x.double(), w) + slope[None, :, None] * (
                torch.arange(start, start + S, dtype=torch.float64))
            assert torch.equal(pos[0], torch.arange(start, start + S))
            att = bsk.sparsek_attention(q.transpose(1, 2), k.transpose(1, 2), v,
                                        u.float().contiguous(), K_BUDGET, WINDOW, "key_value",
                                        softmax_scale=attn.scaling)
            ref = attn.o_proj(att.reshape(B, S, -1))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k_budget,window,gate", [
    (PROMPT + NEW, 0, "none"),        # w = 0, k >= S, hard top-k: causal attention (spec)
    (4, PROMPT + NEW, "key_value"),   # the window covers every key: causal attention
])
def test_special_cases_equal_causal_attention(k_budget, window, gate):
    dense = dense_model()
    model = convert_to_sparsek(copy.deepcopy(dense), k_budget, window, gate)
    ids = tokens(2, PROMPT)
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), atol=ATOL, rtol=0)
    # ... and so is generation from the cache: the same tokens as sdpa with a DynamicCache.
    with torch.no_grad():
        ours = model.generate(ids, past_key_values=SparseKGenerationCache(model),
                              do_sample=False, max_new_tokens=NEW, pad_token_id=0)
        ref = dense.generate(ids, past_key_values=DynamicCache(config=dense.config),
                             do_sample=False, max_new_tokens=NEW, pad_token_id=0)
    assert torch.equal(ours, ref)


# ---- decoding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("gate", ["key_value", "value", "none"])
def test_decode_equals_prefill_every_step(gate):
    model = kv_model_for(gate)
    ids = tokens(2, PROMPT)
    cache = SparseKGenerationCache(model)
    seq, steps = greedy(model, ids, NEW, cache)
    assert cache.get_seq_length() == PROMPT + NEW - 1
    # Evictions happened: each layer keeps k + w rows of the PROMPT + NEW tokens.
    for layer in cache.layers:
        assert layer.sparsek.k_cache.shape[2] == K_BUDGET + WINDOW < layer.seen
    cache.check()
    # The whole sequence in one pass (causal: position t sees tokens <= t only) ...
    full = logits(model, seq)
    torch.testing.assert_close(steps, full[:, PROMPT - 1:-1], atol=ATOL, rtol=0)
    # ... and, literally, a fresh prefill of the prefix for some steps.
    for i in (1, NEW // 2, NEW - 1):
        prefix = logits(model, seq[:, :PROMPT + i])[:, -1]
        torch.testing.assert_close(steps[:, i], prefix, atol=ATOL, rtol=0)


_models = {}


def kv_model_for(gate):
    if gate not in _models:
        _models[gate] = sparsek_model(gate=gate)
    return _models[gate]


def test_generate_equals_manual_greedy_loop(kv_model):
    ids = tokens(2, PROMPT, seed=3)
    cache = SparseKGenerationCache(kv_model)
    with torch.no_grad():
        out = kv_model.generate(ids, past_key_values=cache, do_sample=False, max_new_tokens=NEW,
                                pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    seq, steps = greedy(kv_model, ids, NEW, SparseKGenerationCache(kv_model))
    assert torch.equal(out.sequences, seq)
    # Not bitwise: generate() projects only the last position to logits (logits_to_keep=1).
    torch.testing.assert_close(torch.stack(out.logits, 1), steps, atol=1e-5, rtol=0)
    assert out.past_key_values is cache and cache.get_seq_length() == PROMPT + NEW - 1


def test_multi_token_continuation_equals_prefill(kv_model):
    """Several new tokens at once on a built cache (a continued prompt, chunked prefill)."""
    ids = tokens(2, PROMPT + 25, seed=4)
    cache = SparseKGenerationCache(kv_model)
    first = logits(kv_model, ids[:, :PROMPT], past_key_values=cache)
    rest = logits(kv_model, ids[:, PROMPT:], past_key_values=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), logits(kv_model, ids),
                               atol=ATOL, rtol=0)
    with torch.no_grad():
        chunked = kv_model.generate(ids[:, :PROMPT], past_key_values=SparseKGenerationCache(
            kv_model), do_sample=False, max_new_tokens=8, pad_token_id=0, prefill_chunk_size=16)
        whole = kv_model.generate(ids[:, :PROMPT], past_key_values=SparseKGenerationCache(
            kv_model), do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(chunked, whole)


def test_reset_cache_is_reused(kv_model):
    cache = SparseKGenerationCache(kv_model)
    a, steps_a = greedy(kv_model, tokens(1, PROMPT, seed=5), 5, cache)
    buffers = [layer.sparsek.k_cache for layer in cache.layers]
    cache.reset()
    assert cache.get_seq_length() == 0
    b, steps_b = greedy(kv_model, tokens(1, PROMPT, seed=6), 5, cache)
    assert all(layer.sparsek.k_cache is t for layer, t in zip(cache.layers, buffers))
    ref_b, ref_steps = greedy(kv_model, tokens(1, PROMPT, seed=6), 5,
                              SparseKGenerationCache(kv_model))
    assert torch.equal(b, ref_b) and torch.equal(steps_b, ref_steps)


def test_cache_memory_does_not_grow(kv_model):
    sizes = []
    for length in (12, 300):
        cache = SparseKGenerationCache(kv_model)
        greedy(kv_model, tokens(1, length), 4, cache)
        sizes.append(cache.nbytes)
        # Nothing but the SparseKCache: no dense keys/values anywhere in the cache.
        for layer in cache.layers:
            assert layer.keys is None and layer.values is None and layer._step is None
    assert sizes[0] == sizes[1] > 0


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_llama_family_models(family):
    configs = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config}
    extra = {"sliding_window": None} if family == "mistral" else {}
    cfg = configs[family](hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          vocab_size=VOCAB, max_position_embeddings=256, eos_token_id=None,
                          **extra)
    torch.manual_seed(0)
    model = convert_to_sparsek(AutoModelForCausalLM.from_config(cfg).eval(), K_BUDGET, WINDOW,
                               slope_init=0.05)
    ids = tokens(2, 30)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=SparseKGenerationCache(model),
                             max_new_tokens=20, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    torch.testing.assert_close(torch.stack(out.logits, 1),
                               logits(model, out.sequences)[:, 29:-1], atol=ATOL, rtol=0)


# ---- what SparseK cannot do ----------------------------------------------------------------------

def test_padding_mask_raises(kv_model):
    ids = tokens(2, 16)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with pytest.raises(NotImplementedError, match="padding"):
        logits(kv_model, ids, attention_mask=mask)
    with pytest.raises(NotImplementedError, match="padding"), torch.no_grad():
        kv_model.generate(ids, attention_mask=mask, past_key_values=SparseKGenerationCache(
            kv_model), max_new_tokens=2, do_sample=False, pad_token_id=0)
    # An all-ones mask is plain causal and runs.
    torch.testing.assert_close(logits(kv_model, ids, attention_mask=torch.ones_like(ids)),
                               logits(kv_model, ids), atol=0, rtol=0)


def test_custom_4d_mask(kv_model):
    ids = tokens(1, 16)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(logits(kv_model, ids, attention_mask=causal),
                               logits(kv_model, ids), atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="attention_mask"):
        logits(kv_model, ids, attention_mask=torch.ones(1, 1, 16, 16, dtype=torch.bool))


def test_sliding_window_model_raises():
    cfg = transformers.MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                     vocab_size=VOCAB, sliding_window=16)
    model = convert_to_sparsek(AutoModelForCausalLM.from_config(cfg).eval(), K_BUDGET, WINDOW)
    with pytest.raises(NotImplementedError, match="sliding window"):
        logits(model, tokens(1, 8))


def test_dense_cache_continuation_raises(kv_model):
    ids = tokens(1, 20)
    with torch.no_grad():
        past = kv_model(ids[:, :-1]).past_key_values  # the model's default DynamicCache
    assert isinstance(past, DynamicCache)
    with pytest.raises(NotImplementedError, match="SparseKGenerationCache"):
        logits(kv_model, ids[:, -1:], past_key_values=past)


def test_beam_search_raises(kv_model):
    with pytest.raises(NotImplementedError, match="beam search"), torch.no_grad():
        kv_model.generate(tokens(1, 12), past_key_values=SparseKGenerationCache(kv_model),
                          num_beams=2, max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_cache_of_another_model_raises(kv_model):
    other = sparsek_model()
    with pytest.raises(RuntimeError, match="another model"):
        logits(kv_model, tokens(1, 8), past_key_values=SparseKGenerationCache(other))


# ---- CUDA (bf16) ---------------------------------------------------------------------------------

def cuda_pair(head_dim, gate="key_value", k_budget=K_BUDGET, window=WINDOW):
    """The converted model in bf16 on CUDA and its float64 twin on CPU (the oracle).

    Scores are dominated by the exact position term (slope 0.5, content std ~0.1): bf16 rounding
    of the hidden states moves a score by ~1e-3, far below the gap between neighbours, so the
    bf16 and float64 models select the same keys and only rounding separates them."""
    model = sparsek_model(k_budget, window, gate, slope_init=0.5, head_dim=head_dim)
    with torch.no_grad():
        for attn in attention_modules(model):
            attn.sparsek_scorer.w_score.mul_(0.1)
    ref = copy.deepcopy(model).to(torch.float64)
    return model.to("cuda", torch.bfloat16), ref


def ulp(x):
    return 2.0 ** -7 * x.abs().max().item()  # bf16 spacing at the largest logit


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("gate", ["key_value", "none"])
def test_cuda_decode_equals_prefill(head_dim, gate):
    model, ref = cuda_pair(head_dim, gate)
    seq = tokens(2, PROMPT + NEW, seed=7)
    want = logits(ref, seq)[:, PROMPT - 1:-1]
    prefill = logits(model, seq.cuda())[:, PROMPT - 1:-1].cpu().double()
    # Teacher-forced decode (the same tokens), so that both runs see the same sequence.
    cache = SparseKGenerationCache(model)
    steps = [logits(model, seq[:, :PROMPT].cuda(), past_key_values=cache)[:, -1]]
    for t in range(PROMPT, PROMPT + NEW - 1):
        steps.append(logits(model, seq[:, t:t + 1].cuda(), past_key_values=cache)[:, -1])
    cache.check()
    decode = torch.stack(steps, 1).cpu().double()
    err_prefill = (prefill - want).abs().max().item()
    err_decode = (decode - want).abs().max().item()
    assert err_decode <= 2 * err_prefill + ulp(want), (err_decode, err_prefill)


@pytest.mark.cuda
def test_cuda_special_case_equals_sdpa():
    dense = dense_model()
    ref = copy.deepcopy(dense).to(torch.float64)
    ref.set_attn_implementation("eager")
    model = convert_to_sparsek(copy.deepcopy(dense), PROMPT, 0, "none").to("cuda", torch.bfloat16)
    dense = dense.to("cuda", torch.bfloat16)
    ids = tokens(2, PROMPT, seed=8)
    want = logits(ref, ids)
    err_ours = (logits(model, ids.cuda()).cpu().double() - want).abs().max().item()
    err_sdpa = (logits(dense, ids.cuda()).cpu().double() - want).abs().max().item()
    assert err_ours <= 2 * err_sdpa + ulp(want), (err_ours, err_sdpa)


@pytest.mark.cuda
def test_cuda_generate_equals_manual_loop():
    model, _ = cuda_pair(128)
    ids = tokens(2, PROMPT, seed=9, device="cuda")
    cache = SparseKGenerationCache(model)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, do_sample=False, max_new_tokens=NEW,
                             pad_token_id=0)
    cache.check()
    seq, _ = greedy(model, ids, NEW, SparseKGenerationCache(model))
    assert torch.equal(out, seq)


@pytest.mark.cuda
def test_cuda_memory_flat():
    model, _ = cuda_pair(128)
    sizes, growth = [], []
    for length in (16, 400):
        cache = SparseKGenerationCache(model)
        ids = tokens(1, length, device="cuda")
        with torch.no_grad():
            step = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
            step = model(step, past_key_values=cache).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            for _ in range(32):
                step = model(step, past_key_values=cache).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            growth.append(torch.cuda.memory_allocated() - before)
        cache.check()
        sizes.append(cache.nbytes)
    assert sizes[0] == sizes[1]
    # Decoding allocates nothing that stays (slack for an allocator block of torch's own).
    assert max(growth) <= 1 << 20, growth
