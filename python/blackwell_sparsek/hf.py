"""Hugging Face Transformers attention backend "blackwell_sparsek" (dense attention).

Usage::

    import blackwell_sparsek.hf   # registers the backend (register() is idempotent)
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="blackwell_sparsek")
    model.set_attn_implementation("blackwell_sparsek")    # or switch a loaded model

Tested with transformers 5.17.0. Two entries are registered under the same name:

- :func:`attention_forward` in ``transformers.AttentionInterface``: runs
  :func:`blackwell_sparsek.attention` on BSHD views of the model's BHSD q/k/v (no copy, GQA
  without repeat_kv) and returns ``(out [B, S, Hq, D], None)`` like transformers' sdpa backend.
- :func:`mask_interface` in ``transformers.AttentionMaskInterface``: transformers builds each
  mask through it once per forward. Where the mask would be exactly what the kernel does by
  itself (plain causal, bottom-right aligned, or full attention, without padding; a sliding
  window that covers every key counts as plain causal) it returns None, so no mask tensor is
  built and the layers never inspect one; otherwise it returns the boolean mask that
  transformers' sdpa backend would get.

Whatever the kernel cannot do exactly (a padding, packed-sequence, static-cache or custom mask,
dropout > 0, a sliding window shorter than the keys, softcapping, attention sinks, position bias,
training with gradients, inputs the kernel refuses such as float32 or head dim 96 on CUDA) runs
transformers' sdpa attention instead, with one :class:`FallbackWarning` per distinct reason.
A 4-D mask tensor that is exactly the causal (or full) mask still runs the kernel; it is checked
once per tensor, so once per forward rather than once per layer.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch

try:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import (
        bidirectional_mask_function,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
        sliding_window_causal_mask_function,
    )
    from transformers.utils.import_utils import is_tracing
except ImportError as _e:
    raise ImportError(
        "blackwell_sparsek.hf needs Hugging Face Transformers with AttentionInterface and "
        "AttentionMaskInterface (tested with transformers==5.17.0): pip install "
        f"transformers==5.17.0 ({_e})"
    ) from _e

import blackwell_sparsek as _bsk

__all__ = ["NAME", "FallbackWarning", "attention_forward", "mask_interface", "register"]

#: The attn_implementation name.
NAME = "blackwell_sparsek"


class FallbackWarning(UserWarning):
    """A call ran transformers' sdpa attention instead of the kernel; the message says why."""


_warned: set = set()


def _warn_once(reason: str) -> None:
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(f"blackwell_sparsek: {reason}; running transformers' sdpa attention instead",
                  FallbackWarning, stacklevel=3)


# ---- masks ---------------------------------------------------------------------------------------

# Set on masks that mask_interface itself built because the kernel cannot apply them, so that the
# layers skip inspecting their contents (which would cost a device-to-host sync).
_NOT_KERNEL = "_bsk_not_kernel_mask"


def _code_of_sliding_mask():
    try:
        ref = sliding_window_causal_mask_function(1)
        return ref.__code__, ref.__closure__[0].cell_contents[0].__code__
    except (AttributeError, IndexError, TypeError):
        return None, None


_AND_CODE, _OVERLAY_CODE = _code_of_sliding_mask()


def _sliding_window_of(mask_fn) -> Optional[int]:
    """w when mask_fn is transformers' sliding_window_causal_mask_function(w), else None.

    Recognized by its exact structure (and_masks of the window overlay and the causal mask), so
    that any other combination, whatever it is named, keeps its mask."""
    try:
        if _AND_CODE is None or mask_fn.__code__ is not _AND_CODE:
            return None
        (parts,) = (cell.cell_contents for cell in mask_fn.__closure__)
        overlay, causal = parts
        if causal is not causal_mask_function or overlay.__code__ is not _OVERLAY_CODE:
            return None
        (window,) = (cell.cell_contents for cell in overlay.__closure__)
    except (AttributeError, TypeError, ValueError):
        return None
    return window if isinstance(window, int) else None


def _plain_pattern(mask_fn, q_length, kv_length, q_offset, kv_offset, local_size):
    """'causal' or 'full' when mask_fn, before padding, is exactly what the kernel applies with
    causal=True / False; None otherwise."""
    window = _sliding_window_of(mask_fn)
    if window is not None:
        # Bottom-right, the farthest visible key is kv_length - 1 positions back: when all keys
        # lie inside the window, it changes nothing.
        if kv_length > window:
            return None
        mask_fn = causal_mask_function
    elif local_size is not None and kv_length >= local_size:
        return None  # some models state the window in local_size alone (sdpa's rule)
    if mask_fn is bidirectional_mask_function:
        return "full"
    if mask_fn is not causal_mask_function:
        return None
    # Static caches hand tensor offsets (and a kv_length of the whole cache): their masks hide
    # the unwritten slots, which the kernel cannot.
    if not all(isinstance(x, (int, torch.SymInt)) for x in (q_offset, kv_offset)):
        return None
    # The kernel's causal mask is bottom-right aligned: query row t sits at key position
    # Skv - Sq + t, i.e. the last query is the last key.
    if q_length <= kv_length and q_offset + q_length == kv_offset + kv_length:
        return "causal"
    return None


def mask_interface(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: Optional[torch.Tensor] = None,
    local_size: Optional[int] = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    **kwargs,
):
    """The AttentionMaskInterface entry: None where the kernel needs no mask, else sdpa's mask.

    Takes what transformers passes to ``sdpa_mask``. Checking the 2D padding mask for zeros costs
    one device-to-host sync per mask and forward (as for sdpa and flash_attention_2), and none
    when the model is called without an attention_mask.
    """
    pattern = _plain_pattern(mask_function, q_length, kv_length, q_offset, kv_offset, local_size)
    skip = (pattern == "causal" and allow_is_causal_skip) or (
        pattern == "full" and allow_is_bidirectional_skip)
    padded = False
    if pattern is not None and attention_mask is not None:
        if is_tracing(attention_mask):
            skip = False  # a data-dependent decision would be baked into the graph
        else:
            window = prepare_padding_mask(attention_mask, kv_length, kv_offset)
            padded = not bool(window[:, kv_offset:kv_offset + kv_length].all())
    if skip and not padded:
        return None
    # Never let sdpa_mask skip: its None means torch's top-left is_causal, not our bottom-right.
    mask = sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
        local_size=local_size, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
        **kwargs,
    )
    if (pattern is None or padded) and mask is not None and not is_tracing(mask):
        setattr(mask, _NOT_KERNEL, True)
    return mask


# A 4-D mask handed to the layers (by the model, or built above with a skip disallowed) is
# classified once per tensor object, not once per layer: all layers of a forward share it.
_MEMO_SIZE = 8
_memo: dict = {}


def _classify(mask: torch.Tensor, sq: int, skv: int) -> Optional[str]:
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (sq, skv) or sq > skv:
        return None  # sq > skv: rows without keys, which sdpa and the kernel treat differently
    dev = mask.device
    causal = (torch.arange(skv, device=dev)[None, :]
              <= torch.arange(sq, device=dev)[:, None] + (skv - sq))
    if mask.dtype == torch.bool:
        visible, valid = mask, torch.ones((), dtype=torch.bool, device=dev)
    elif mask.is_floating_point():
        # Additive masks: 0 is visible, finfo.min or -inf is hidden; any other value is a bias.
        visible = mask == 0
        valid = (visible | (mask <= torch.finfo(mask.dtype).min)).all()
    else:
        return None
    flags = torch.stack([valid, visible.all(), (visible == causal).all()]).tolist()
    if not flags[0]:
        return None
    if flags[1]:
        return "full"
    return "causal" if flags[2] else None


def _mask_kind(mask, sq: int, skv: int) -> Optional[str]:
    """'causal' or 'full' when a 4-D mask is exactly the kernel's causal=True / False mask."""
    if not isinstance(mask, torch.Tensor) or getattr(mask, _NOT_KERNEL, False):
        return None
    try:
        version = mask._version
    except RuntimeError:  # inference tensors have no version counter: check every call
        return _classify(mask, sq, skv)
    hit = _memo.get(id(mask))
    if hit is not None and hit[0]() is mask and hit[1:4] == (version, sq, skv):
        return hit[4]
    kind = _classify(mask, sq, skv)
    if len(_memo) >= _MEMO_SIZE:
        _memo.pop(next(iter(_memo)))
    _memo[id(mask)] = (weakref.ref(mask), version, sq, skv, kind)
    return kind


# ---- attention -----------------------------------------------------------------------------------

# Keyword arguments some models pass that change the result; sdpa ignores most of them and relies
# on the mask, so the fallback gives exactly what attn_implementation="sdpa" would.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "alibi", "window_size",
                       "cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens", "indices",
                       "block_indices")


def _unsupported(query, key, value, dropout, kwargs) -> Optional[str]:
    if dropout:
        return f"dropout > 0 (got {dropout})"
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return f"the model passes '{name}', which the kernel does not support"
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        return "sliding-window attention (sliding_window shorter than the keys)"
    if value.shape[-1] != query.shape[-1]:
        return "value head dim differs from the query head dim"
    return None


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
):
    """The AttentionInterface entry. query [B, Hq, Sq, D], key/value [B, Hkv, Skv, D] (BHSD);
    returns ``(attn_output [B, Sq, Hq, D], None)``."""
    sq, skv = query.shape[2], key.shape[2]
    # As transformers' sdpa backend decides, except that the kernel's causal mask is
    # bottom-right aligned (what a cache needs) where torch's is top-left.
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal and sq > 1)
    reason = _unsupported(query, key, value, dropout, kwargs)
    if reason is None and attention_mask is not None:
        kind = None if is_tracing(query) else _mask_kind(attention_mask, sq, skv)
        if kind is None:
            reason = ("attention_mask is not a plain causal mask (padding, packing, static cache "
                      "or custom)")
        else:
            causal = bool(kind == "causal" and sq > 1)
    if reason is None:
        try:
            out = _bsk.attention(query.transpose(1, 2), key.transpose(1, 2),
                                 value.transpose(1, 2), causal=causal, softmax_scale=scaling)
            return out, None
        except (ValueError, NotImplementedError) as e:
            reason = f"the kernel refused the inputs ({e})"
    _warn_once(reason)
    if attention_mask is None and causal and sq != skv:
        # torch's is_causal is top-left aligned (sdpa would even drop the keys past Sq); state
        # the bottom-right mask the kernel would have applied.
        attention_mask = (torch.arange(skv, device=query.device)[None, :]
                          <= torch.arange(sq, device=query.device)[:, None] + (skv - sq))
        attention_mask = attention_mask[None, None]
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


def register() -> None:
    """Registers ``attn_implementation="blackwell_sparsek"`` with transformers (idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_interface)


register()
