"""The attention function of the "te" attention backend: HF's arguments in, a plan, te_fx's op out.

transformers calls it per layer with q (B, H, Sq, D), K/V with their own KV heads (B, Hkv, Skv, D), the layer's
``scaling`` and ``dropout``, and the mask that :func:`te_fx.hf_interface.mask.te_mask` passed on, whose pattern (causal,
its window, key padding or packed documents) decides, as HF's mask does in its SDPA; without a mask the layer's
``is_causal`` and ``sliding_window`` do. Attention sinks (``s_aux``: one logit per head, GPT-OSS's ``sinks``) run on
TE's "learnable" softmax where the executor supports it. What te_fx cannot run exactly (a mask HF built, a call the
executor refuses, an argument such as softcapping, per-token sinks or a position bias) runs HF's SDPA, or the model's
eager attention for such arguments, on the mask built only then; each call is counted under ``te_hits`` or its reason in
:func:`te_fx.get_te_attention_stats`. Other arguments pass by, as they do HF's SDPA (models hand their attention
whatever the caller gave, ``token_type_ids`` included), except top-k ``indices`` meant for a kernel of the model's own,
which are an error.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .. import ops
from ..core import stats
from ..core.autocast import autocast_dtype, cast_like_sdpa
from ..core.guards import padding_refusal
from ..core.masks import plan_mask
from ..core.plan import AttentionPlan
from ..executors import (
    AttentionCall,
    is_training,
    qkv_mismatch_reason,
    resolve_executor,
    te_limits_reason,
    unsupported_call_reason,
)
from .mask import read_mask

__all__ = ["te_attention_forward"]

# what a model's eager attention applies, te_fx's op does not, and neither does SDPA (nor ``s_aux``, which the op
# applies where it is one logit per head)
_EAGER_ONLY = ("softcap", "sinks", "position_bias")
# what only a kernel of its own applies (DeepSeek-V3.2-style top-k indices: HF's eager and SDPA paths never see them)
_REFUSED = ("indices",)


def _plan(mask: Any, causal: bool, sliding_window: int | None, q_len: int, kv_len: int) -> AttentionPlan | None:
    """What the call computes, in TE's terms: from the mask te_mask passed on, else from the layer's arguments;
    None for HF's own mask or a pattern that is not one (more queries than keys, a window on a bidirectional
    layer)."""
    info = read_mask(mask)
    if info is None and mask is not None:
        return None
    if info is not None:
        causal, window_left = True, info.window_left
    else:
        window_left = sliding_window - 1 if sliding_window else -1
    if q_len > kv_len or (not causal and window_left >= 0):
        return None
    if not causal:
        return AttentionPlan("no_mask", (-1, -1))
    mask_type = "causal" if q_len == kv_len else "causal_bottom_right"
    if info is None:
        return AttentionPlan(mask_type, (window_left, 0))
    return AttentionPlan(
        mask_type, (window_left, 0), key_padding=info.keep, cu_seqlens=info.cu_seqlens, key_layout=info.layout
    )


def _collator_plan(
    kwargs: dict, causal: bool, sliding_window: int | None, query: torch.Tensor, kv_len: int
) -> AttentionPlan | None:
    """Under torch.compile, where te_mask cannot read which documents HF's packed mask holds and hands on HF's mask,
    the plan of a packed batch that comes with flash-attention's varlen arguments (``cu_seq_lens_q/k``,
    ``max_length_q/k``, as ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` gives them): its documents
    are ``cu_seq_lens_q``'s, causal with the layer's window, as in ``flash_attention_2`` (the mask goes unused, and
    the compiler drops it). None otherwise."""
    varlen = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    if not torch.compiler.is_compiling() or any(kwargs.get(name) is None for name in varlen):
        return None
    cu_seqlens = kwargs["cu_seq_lens_q"]
    usable = isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 and cu_seqlens.device == query.device
    if not usable or not causal or query.shape[2] != kv_len:
        return None
    window_left = sliding_window - 1 if sliding_window else -1
    return AttentionPlan("causal", (window_left, 0), cu_seqlens=cu_seqlens.to(torch.int32))


def _op_refusal(plan: AttentionPlan, q_len: int, kv_len: int, training: bool) -> bool:
    """Whether te_fx's op cannot take ``plan``: packed documents with a KV cache (the op packs self-attention only),
    or key padding it has no route for (:func:`~te_fx.core.guards.padding_refusal`)."""
    return (plan.cu_seqlens is not None and q_len != kv_len) or padding_refusal(plan, training) is not None


def _executor_refusal(
    executor: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    dropout: float,
    training: bool,
    sinks: torch.Tensor | None,
) -> str | None:
    """Why ``executor`` cannot run ``plan`` (with ``sinks``, ``training`` or not) on bshd q, k, v. Under
    torch.compile only what the executor's limits say from dtype, device and head dims: TE's backend query is Python
    that a graph cannot hold, and reading the sequence lengths would specialize the graph to them; sinks, which TE
    supports on fewer configurations, stay off TE there."""
    reason = qkv_mismatch_reason(q, k, v)
    if reason is not None:
        return reason
    if torch.compiler.is_compiling():
        if executor == "reference":
            return None
        reason = te_limits_reason(q.dtype, q.device.type, q.shape[-1], v.shape[-1])
        return reason if reason is not None or sinks is None else "fallback_argument"
    softmax_type = "vanilla" if sinks is None else "learnable"
    call = AttentionCall.of_plan(q, k, v, plan, dropout, training, softmax_type)
    return unsupported_call_reason(executor, call)


def _head_sinks(kwargs: dict, heads: int) -> torch.Tensor | None:
    """``s_aux`` where it is one sink logit per query head (TE's learnable softmax offset), else None."""
    sinks = kwargs.get("s_aux")
    per_head = isinstance(sinks, torch.Tensor) and sinks.dim() == 1 and sinks.is_floating_point()
    return sinks if per_head and sinks.shape[0] == heads else None


def _count(reason: str) -> None:
    """Count the call (eager only: a compiled graph holds no Python side effects; ``te-fx explain`` shows its plan)."""
    if not torch.compiler.is_compiling():
        stats.count(reason)


def _hf_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: Any,
    plan: AttentionPlan | None,
    eager: bool,
    dropout: float,
    scaling: float | None,
    kwargs: dict,
) -> tuple[torch.Tensor, Any]:
    """HF's SDPA attention, or the model's eager attention (``eager``), on the mask of ``plan`` built now where te_mask
    passed one on or the eager attention needs one (HF's own mask, or none for SDPA, as it came)."""
    if plan is not None and (mask is not None or eager):
        mask = plan_mask(plan, query.shape[0], query.shape[2], key.shape[2], query.device)
    if not eager:
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    attention = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if attention is None:
        raise NotImplementedError(f"te_fx: {type(module).__name__} passes {_EAGER_ONLY} arguments te_fx does not "
                                  "run, and its module has no eager_attention_forward to run them")  # fmt: skip
    if mask is not None and mask.dtype == torch.bool:
        additive = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device)
        mask = additive.masked_fill(~mask, torch.finfo(query.dtype).min)
    return attention(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def te_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface for "te": returns (attn_output (B, Sq, H, Dv), None)."""
    refused = [name for name in _REFUSED if kwargs.get(name) is not None]
    if refused:
        raise NotImplementedError(
            f"{type(module).__name__} passes {refused} to its attention for a kernel of its own, which te_fx does not "
            "run; use attn_implementation='sdpa' (or 'eager') for this model"
        )
    dtype = autocast_dtype(query.device.type)
    if dtype is not None:  # as SDPA under autocast computes
        query, key, value = cast_like_sdpa((query, key, value), dtype)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    plan = _plan(attention_mask, causal, sliding_window, q_len, kv_len)
    if plan is None:
        plan = _collator_plan(kwargs, causal, sliding_window, query, kv_len)
    sinks = _head_sinks(kwargs, query.shape[1])
    unsupported = any(kwargs.get(name) is not None for name in _EAGER_ONLY)
    unsupported = unsupported or (kwargs.get("s_aux") is not None and sinks is None)
    eager = unsupported or sinks is not None  # what SDPA cannot apply either
    training = is_training(dropout, query, key, value, *(() if sinks is None else (sinks,)))
    if plan is None or _op_refusal(plan, q_len, kv_len, training):
        reason = "fallback_mask"
    elif unsupported:
        reason = "fallback_argument"
    else:
        executor = resolve_executor(None)
        q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
        reason = _executor_refusal(executor, q, k, v, plan, dropout, training, sinks)
        if reason is None:
            _count("te_hits")
            out = ops.attention(
                q, k, v, mask_type=plan.mask_type, window_size=plan.window_size,
                softmax_scale=scaling if scaling is not None else query.shape[-1] ** -0.5, dropout_p=dropout,
                key_padding_mask=plan.key_padding, cu_seqlens=plan.cu_seqlens, executor=executor,
                key_padding_layout=plan.key_layout, softmax_offset=sinks,
            )  # fmt: skip
            return out, None
    _count(reason)
    kwargs["is_causal"] = causal
    return _hf_attention(module, query, key, value, attention_mask, plan, eager, dropout, scaling, kwargs)
