"""SparseK attention in Hugging Face Llama-family models, with a generation cache of constant size.

Usage::

    from blackwell_sparsek.hf_sparsek import convert_to_sparsek, SparseKGenerationCache

    model = convert_to_sparsek(model, k_budget=2048, window=1024)
    out = model.generate(ids, past_key_values=SparseKGenerationCache(model), max_new_tokens=128)

Tested with transformers 5.17.0: Llama, and alike Mistral (without sliding window), Qwen2 and
Qwen3, whose attention modules have ``q_proj``/``k_proj``/``v_proj``, ``layer_idx`` and ``config``
and whose decoder layers pass ``position_ids`` and ``past_key_values`` to them as keywords.

How the pieces meet, per attention module and forward:

1. A forward pre-hook runs the module's :class:`SparseKScorer` on the module input and the
   absolute ``position_ids``, ``u = x @ w_score + slope * position`` (float32 [B, Hkv, S]), and
   leaves ``u`` and the call's ``past_key_values`` on the module; a forward hook removes them.
2. ``LlamaAttention`` calls ``past_key_values.update(k, v, layer_idx)``. A
   :class:`SparseKGenerationCache` looks the module up by ``layer_idx`` (the modules
   :func:`convert_to_sparsek` converted), reads ``u`` and builds the layer's
   :class:`~blackwell_sparsek.SparseKCache` (first call, the prompt) or appends the one new token.
   It keeps no dense K/V: its memory is the SparseKCache's, whatever the context length.
3. The attention function ``"blackwell_sparsek_sparsek"`` runs :func:`sparsek_attention` over the
   call's own K/V on a prefill (and without a cache at all), or ``SparseKCache.attend`` on a
   decode step.

SparseK has no dense fallback: masks it cannot apply (padding, packed sequences, custom 4-D
masks), a continuation from a cache other than SparseKGenerationCache, dropout, and the kwargs of
sliding-window or soft-capped models raise ``NotImplementedError``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

try:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import causal_mask_function, sdpa_mask
except ImportError as _e:
    raise ImportError(
        "blackwell_sparsek.hf_sparsek needs Hugging Face Transformers with AttentionInterface and "
        f"the layered Cache API (tested with transformers==5.17.0) ({_e})"
    ) from _e

import blackwell_sparsek as _bsk
from . import _validate
from .modules import paper_scores

__all__ = ["NAME", "SparseKScorer", "SparseKGenerationCache", "attention_forward",
           "convert_to_sparsek", "mask_interface", "register"]

#: The attn_implementation name.
NAME = "blackwell_sparsek_sparsek"

# Attributes set on converted attention modules (plain attributes: not in the state dict).
_SETTINGS = "_sparsek_settings"
_U = "_sparsek_u"
_PKV = "_sparsek_pkv"


class SparseKScorer(nn.Module):
    """The paper's scorer ``u = x @ w_score + slope * position`` with absolute positions.

    Parameters as :class:`blackwell_sparsek.SparseKAttention` (``w_score`` [hidden, Hkv],
    ``slope`` [Hkv], float32 at creation); the score is computed in float32 whatever their dtype.
    """

    def __init__(self, hidden_size: int, heads_kv: int, slope_init: float = 1e-3,
                 device=None):
        super().__init__()
        # Unit-RMS inputs (the attention module reads RMSNorm output) give scores of std ~1, the
        # width of the SPARSEK ramp: gates are neither all hard nor all fractional.
        self.w_score = nn.Parameter(
            torch.randn(hidden_size, heads_kv, device=device) / math.sqrt(hidden_size))
        self.slope = nn.Parameter(torch.full((heads_kv,), float(slope_init), device=device))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, S, hidden], positions [B or 1, S] -> u float32 [B, Hkv, S] (contiguous)."""
        return paper_scores(x, self.w_score, self.slope, positions).contiguous()

    def extra_repr(self) -> str:
        return f"hidden_size={self.w_score.shape[0]}, heads_kv={self.w_score.shape[1]}"


class _Settings:
    __slots__ = ("k_budget", "window", "gate", "score_capacity")

    def __init__(self, k_budget, window, gate, score_capacity):
        self.k_budget, self.window, self.gate, self.score_capacity = (
            k_budget, window, gate, score_capacity)

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}


# ---- conversion ----------------------------------------------------------------------------------

def _is_attention(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "layer_idx", "config"))


def _converted(model: nn.Module) -> dict:
    """{layer_idx: attention module} of the modules convert_to_sparsek converted."""
    layers = {}
    for module in model.modules():
        if hasattr(module, _SETTINGS):
            if module.layer_idx in layers:
                raise ValueError(f"SparseK: two attention modules share layer_idx "
                                 f"{module.layer_idx}; SparseKGenerationCache needs one per layer")
            layers[module.layer_idx] = module
    return layers


def _pre_hook(module, args, kwargs):
    x = kwargs.get("hidden_states", args[0] if args else None)
    if x is None:
        raise RuntimeError("SparseK: the attention module was called without hidden_states")
    pkv = kwargs.get("past_key_values")
    positions = kwargs.get("position_ids")
    if positions is None:
        # The model did not say where the tokens sit: after what the cache has seen.
        start = pkv.get_seq_length(module.layer_idx) if isinstance(pkv, Cache) else 0
        positions = torch.arange(start, start + x.shape[1], device=x.device)[None]
    elif positions.dim() != 2:
        raise NotImplementedError(f"SparseK: position_ids of shape {tuple(positions.shape)} "
                                  "(multi-axis positions) are not supported; expected [B, S]")
    setattr(module, _U, module.sparsek_scorer(x, positions))
    setattr(module, _PKV, pkv)


def _post_hook(module, args, output):
    # Also after an exception (always_call): a stale u must never meet a later call's keys.
    setattr(module, _U, None)
    setattr(module, _PKV, None)


def convert_to_sparsek(model: nn.Module, k_budget: int, window: int, gate: str = "key_value",
                       score_capacity: Optional[int] = None, slope_init: float = 1e-3):
    """Makes every Llama-style attention module of ``model`` run SparseK attention.

    Attaches a :class:`SparseKScorer` as ``sparsek_scorer`` to each attention module (learnable,
    saved in the state dict; random ``w_score`` with scores of std ~1 on unit-RMS inputs and
    ``slope = slope_init`` so that, score noise aside, later tokens are preferred), the hooks that
    compute its scores, and switches the model to ``attn_implementation="blackwell_sparsek_sparsek"``.
    ``k_budget``, ``window``, ``gate`` as in :func:`blackwell_sparsek.sparsek_attention`;
    ``score_capacity`` as in :class:`blackwell_sparsek.SparseKCache`. Converting again replaces
    the settings and keeps the scorers. The settings are also written to
    ``model.config.sparsek``. Returns ``model``.
    """
    _validate.sparsek_params(k_budget, window, gate)
    if score_capacity is not None:
        score_capacity = _validate.integer(score_capacity, "score_capacity")
        if score_capacity < 1:
            raise ValueError(f"score_capacity: must be >= 1, got {score_capacity}")
    register()
    settings = _Settings(int(k_budget), int(window), gate, score_capacity)
    found = 0
    for module in model.modules():
        if not _is_attention(module):
            continue
        found += 1
        if not hasattr(module, "sparsek_scorer"):
            weight = module.k_proj.weight
            heads_kv = module.k_proj.out_features // module.head_dim
            module.sparsek_scorer = SparseKScorer(module.q_proj.in_features, heads_kv,
                                                  slope_init, device=weight.device)
            module._sparsek_hooks = (
                module.register_forward_pre_hook(_pre_hook, with_kwargs=True),
                module.register_forward_hook(_post_hook, always_call=True))
        setattr(module, _SETTINGS, settings)
        setattr(module, _U, None)
        setattr(module, _PKV, None)
    if not found:
        raise ValueError("convert_to_sparsek: no attention module with q_proj/k_proj/v_proj, "
                         "layer_idx and config found in the model")
    _converted(model)  # refuses duplicate layer indices now rather than at generation
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    for module in model.modules():
        if hasattr(module, _SETTINGS) and module.config._attn_implementation != NAME:
            # A config the model's setter did not reach (e.g. a submodel's own config).
            module.config._attn_implementation = NAME
    if hasattr(model, "config"):
        model.config.sparsek = settings.as_dict()
    return model


# ---- masks ---------------------------------------------------------------------------------------

def mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                   kv_offset: int = 0, mask_function=causal_mask_function,
                   attention_mask: Optional[torch.Tensor] = None, local_size=None,
                   allow_is_causal_skip: bool = True, **kwargs):
    """The AttentionMaskInterface entry: None for a plain causal mask, which the kernel applies
    itself (the SparseK selection is causal by definition); anything else raises
    NotImplementedError. Checking a 2D mask for padding costs one device-to-host sync."""
    if mask_function is not causal_mask_function:
        raise NotImplementedError(
            "SparseK attention applies only its own causal selection; this model asked for another "
            "mask (packed sequences, sliding window, bidirectional or a custom mask function)")
    if local_size is not None and kv_length >= local_size:
        raise NotImplementedError("SparseK attention cannot apply a local (chunked) attention mask")
    if not all(isinstance(x, (int, torch.SymInt)) for x in (q_offset, kv_offset)) or (
            q_offset + q_length != kv_offset + kv_length):
        raise NotImplementedError(
            "SparseK attention needs the queries to be the last keys (a growing cache such as "
            f"SparseKGenerationCache); got q_offset={q_offset}, q_length={q_length}, "
            f"kv_offset={kv_offset}, kv_length={kv_length} (a static cache?)")
    if attention_mask is not None and not bool(attention_mask.all()):
        # Every earlier token stays a candidate in the cache: a padded one would be attended.
        raise NotImplementedError(
            "SparseK attention does not support padding: attention_mask has zeros. Batch only "
            "sequences of equal length (or run them one at a time)")
    if allow_is_causal_skip:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, allow_is_causal_skip=False, **kwargs)


def _plain_causal(mask: torch.Tensor, sq: int, skv: int) -> bool:
    """Whether a 4-D mask is the bottom-right causal mask over (sq, skv) (one sync)."""
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (sq, skv):
        return False
    dev = mask.device
    causal = (torch.arange(skv, device=dev)[None, :]
              <= torch.arange(sq, device=dev)[:, None] + (skv - sq))
    if mask.dtype == torch.bool:
        return bool((mask == causal).all())
    if mask.is_floating_point():
        hidden = mask <= torch.finfo(mask.dtype).min  # finfo.min or -inf
        return bool(((mask == 0) == causal).all() & ((mask == 0) | hidden).all())
    return False


# ---- the attention function ----------------------------------------------------------------------

_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "alibi", "window_size",
                       "sliding_window", "cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens",
                       "indices", "block_indices")


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                      dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs):
    """The AttentionInterface entry. query [B, Hq, Sq, D], key/value [B, Hkv, Skv, D] (BHSD);
    returns ``(attn_output [B, Sq, Hq, D], None)``."""
    settings = getattr(module, _SETTINGS, None)
    u = getattr(module, _U, None)
    if settings is None or u is None:
        raise RuntimeError(
            f"attn_implementation={NAME!r} needs SparseK scores: convert the model with "
            "blackwell_sparsek.hf_sparsek.convert_to_sparsek() instead of selecting it by name")
    if dropout:
        raise NotImplementedError(f"SparseK attention has no dropout (got {dropout}); "
                                  "call model.eval()")
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"SparseK attention does not support '{name}', which "
                                      "this model passes to its attention function")
    if is_causal is False or not getattr(module, "is_causal", True):
        raise NotImplementedError("SparseK attention is causal only")
    pkv = getattr(module, _PKV, None)
    layer = pkv.layers[module.layer_idx] if isinstance(pkv, SparseKGenerationCache) else None
    step = layer.take_step() if layer is not None else None
    sq = query.shape[2]
    skv = layer.seen if step is not None else key.shape[2]
    if attention_mask is not None and not _plain_causal(attention_mask, sq, skv):
        raise NotImplementedError(
            "SparseK attention cannot apply this attention_mask (only the plain causal mask, "
            "which it applies by itself): padding, packing and custom masks are not supported")
    q = query.transpose(1, 2)
    if step is None or step[0] == "prefill":
        if key.shape[2] != sq:
            raise NotImplementedError(
                f"SparseK: the keys include {key.shape[2] - sq} earlier tokens from a "
                f"{type(pkv).__name__}; SparseK needs their scores and evicts most of them: "
                "decode with past_key_values=SparseKGenerationCache(model)")
        out = _bsk.sparsek_attention(q, key.transpose(1, 2), value.transpose(1, 2), u,
                                     settings.k_budget, settings.window, settings.gate,
                                     softmax_scale=scaling)
    elif step[0] == "decode":
        out = layer.sparsek.attend(q, softmax_scale=scaling)
    else:
        # Several new tokens (chunked prefill, a continued prompt): each query must see the
        # cache as it is right after its own token is appended, and appending evicts, so the
        # appends are interleaved with the queries here rather than done in update().
        _, k_new, v_new, u_new = step
        outs = []
        for t in range(sq):
            layer.sparsek.append(k_new[:, t:t + 1], v_new[:, t:t + 1],
                                 u_new[:, :, t:t + 1].contiguous())
            outs.append(layer.sparsek.attend(q[:, t:t + 1], softmax_scale=scaling))
        out = torch.cat(outs, dim=1)
    return out, None


def register() -> None:
    """Registers ``attn_implementation="blackwell_sparsek_sparsek"`` (idempotent). Selecting it
    by name alone is not enough: :func:`convert_to_sparsek` attaches the scorers it needs."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_interface)


# ---- the generation cache ------------------------------------------------------------------------

class SparseKLayer(CacheLayerMixin):
    """One layer of :class:`SparseKGenerationCache`: a :class:`~blackwell_sparsek.SparseKCache`
    and the count of tokens seen (no dense K/V)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, settings: _Settings):
        super().__init__()
        self.settings = settings
        self.sparsek = None  # SparseKCache, built by the first update
        self.seen = 0        # Python int: no device sync to answer get_seq_length
        self._step = None    # what the last update did, for the attention function

    def lazy_initialization(self, key_states, value_states) -> None:
        pass  # the SparseKCache is sized by the first update (batch, heads, dtype, device)

    def _fits(self, k: torch.Tensor) -> bool:
        c = self.sparsek
        return (c is not None and c.k_cache.dtype == k.dtype and c.k_cache.device == k.device
                and tuple(c.k_cache.shape[:2]) == (k.shape[0], k.shape[2])
                and c.k_cache.shape[3] == k.shape[3])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, u: torch.Tensor):
        """key/value [B, Hkv, S, D] (BHSD, as the model has them), u float32 [B, Hkv, S]."""
        n = key_states.shape[2]
        k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)
        if self.seen == 0:
            s = self.settings
            if self._fits(k):
                self.sparsek.prefill(k, v, u)  # reuses the buffers of an earlier generation
            else:
                self.sparsek = None  # frees the old buffers before allocating new ones
                self.sparsek = _bsk.SparseKCache.from_prefill(
                    k, v, u, k_budget=s.k_budget, window=s.window, gate=s.gate,
                    score_capacity=s.score_capacity)
            self.is_initialized = True
            self._step = ("prefill",)
        elif n == 1:
            self.sparsek.append(k, v, u)
            self._step = ("decode",)
        else:
            self._step = ("chunk", k, v, u)
        self.seen += n
        return key_states, value_states

    def take_step(self):
        step, self._step = self._step, None
        if step is None:
            raise RuntimeError("SparseKGenerationCache: the attention ran without the cache's "
                               "update for this layer")
        return step

    def get_mask_sizes(self, query_length: int) -> tuple:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen, self._step = 0, None
        if self.sparsek is not None:
            self.sparsek.reset()

    def offload(self):
        pass  # the state is small and stays on its device

    def prefetch(self):
        pass

    def _unsupported(self, what):
        raise NotImplementedError(f"SparseKGenerationCache does not support {what}: the "
                                  "SparseK state has no per-sequence copy or rollback")

    def reorder_cache(self, beam_idx):
        self._unsupported("beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        self._unsupported("crop (assisted decoding, rollback)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices) -> None:
        self._unsupported("batch_select_indices")

    @property
    def nbytes(self) -> int:
        return 0 if self.sparsek is None else self.sparsek.nbytes


class SparseKGenerationCache(Cache):
    """The ``past_key_values`` of a model converted with :func:`convert_to_sparsek`: one
    :class:`~blackwell_sparsek.SparseKCache` per layer, built from the prompt on the first
    forward, one token appended per decode step. Its memory does not depend on the context
    length. All sequences of a batch must have the same length (no padding).

    Errors found on the device during decoding (a non-finite score, a score-capacity overflow)
    make the affected outputs NaN; :meth:`check` synchronizes and raises them.
    """

    def __init__(self, model: nn.Module):
        modules = _converted(model)
        if not modules:
            raise ValueError("SparseKGenerationCache: the model has no SparseK attention: "
                             "convert it with convert_to_sparsek() first")
        if sorted(modules) != list(range(len(modules))):
            raise ValueError(f"SparseKGenerationCache: layer indices {sorted(modules)} are not "
                             "0..n-1")
        super().__init__(layers=[SparseKLayer(getattr(modules[i], _SETTINGS))
                                 for i in range(len(modules))])
        self._modules = modules

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs):
        module = self._modules.get(layer_idx)
        if module is None:
            raise ValueError(f"SparseKGenerationCache: no SparseK attention module has layer_idx "
                             f"{layer_idx}")
        u = getattr(module, _U, None)
        if u is None:
            raise RuntimeError(f"SparseKGenerationCache: layer {layer_idx} has no scores for "
                               "this call: the cache belongs to another model, or the scorer "
                               "hook did not run")
        if module.config._attn_implementation != NAME:
            raise RuntimeError(
                f"SparseKGenerationCache: the model runs attn_implementation="
                f"{module.config._attn_implementation!r}, not {NAME!r}; the cache would be "
                "read by an attention that does not know it")
        if u.shape[-1] != key_states.shape[2]:
            raise ValueError(f"SparseKGenerationCache: {u.shape[-1]} scores for "
                             f"{key_states.shape[2]} keys at layer {layer_idx}")
        return self.layers[layer_idx].update(key_states, value_states, u)

    @property
    def nbytes(self) -> int:
        """Device bytes of all the layers' SparseKCache tensors."""
        return sum(layer.nbytes for layer in self.layers)

    def check(self) -> None:
        """Synchronizes and raises ValueError if a layer's cache recorded an error."""
        for i, layer in enumerate(self.layers):
            if layer.sparsek is not None:
                try:
                    layer.sparsek.check()
                except ValueError as e:
                    raise ValueError(f"layer {i}: {e}") from None


register()
