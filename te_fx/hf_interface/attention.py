"""The attention function of the "te" attention backend: HF's arguments in, a plan, te_fx's op out.

transformers calls it per layer with q (B, H, Sq, D), K/V with their own KV heads (B, Hkv, Skv, D), the layer's
``scaling``, ``dropout`` and ``sliding_window``, and the mask that :func:`te_fx.hf_interface.mask.te_mask`
returned. The layer's pattern comes from its arguments, as in HF's flash-attention backends (``is_causal`` and
``sliding_window``, aligned to the last key with a KV cache); the mask adds key padding or packed documents. What
te_fx cannot run exactly (softcapping, attention sinks, a mask HF built, a call the executor refuses) runs HF's own
SDPA, or the model's eager attention where SDPA cannot express it, on the mask built only then; each call is
counted under ``te_hits`` or its reason in :func:`te_fx.get_te_attention_stats`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .. import ops
from ..core import stats
from ..core.autocast import autocast_dtype, cast_like_sdpa
from ..core.masks import plan_mask
from ..core.plan import AttentionPlan
from ..executors import (
    AttentionCall,
    qkv_mismatch_reason,
    resolve_executor,
    te_limits_reason,
    unsupported_call_reason,
)

__all__ = ["te_attention_forward"]


def _plan(mask: torch.Tensor | None, causal: bool, window_left: int, q_len: int, kv_len: int) -> AttentionPlan | None:
    """The plan of a call from the layer's pattern and what :func:`te_mask` returned, or None (a mask HF built, or
    a pattern te_fx's op does not take)."""
    mask_type = "no_mask" if not causal else "causal" if q_len == kv_len else "causal_bottom_right"
    window = (window_left, 0) if causal else (-1, -1)
    if q_len > kv_len or (not causal and window_left >= 0):
        return None
    if mask is None:
        return AttentionPlan(mask_type, window)
    if q_len != kv_len:
        return None
    if mask.dim() == 2 and mask.dtype == torch.uint8:  # te_mask found every row keeping its first keys
        return AttentionPlan("causal", window, key_padding=mask, kept_first=True) if causal else None
    if mask.dim() == 2 and mask.dtype == torch.bool:  # te_mask checked the padding's place outside torch.compile
        tracing_window = torch.compiler.is_compiling() and window_left >= 0
        return None if not causal or tracing_window else AttentionPlan("causal", window, key_padding=mask)
    if mask.dim() == 1 and mask.dtype == torch.int32:
        return AttentionPlan(mask_type, window, cu_seqlens=mask)
    return None


def _refusal(
    executor: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, dropout: float
) -> str | None:
    """Why ``executor`` cannot run ``plan`` on bshd q, k, v. Under torch.compile only what the executor's limits
    say from dtype, device and head dims: TE's backend query is Python that a graph cannot hold, and reading the
    sequence lengths would specialize the graph to them."""
    reason = qkv_mismatch_reason(q, k, v)
    if reason is not None:
        return reason
    if torch.compiler.is_compiling():
        return te_limits_reason(q.dtype, q.device.type, q.shape[-1], v.shape[-1]) if executor == "te" else None
    training = dropout > 0 or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    return unsupported_call_reason(executor, AttentionCall.of_plan(q, k, v, plan, dropout, training))


def _count(reason: str) -> None:
    """Count the call (eager only: a compiled graph holds no Python side effects; ``te-fx explain`` shows its plan)."""
    if not torch.compiler.is_compiling():
        stats.count(reason)


def _fallback_mask(
    mask: torch.Tensor | None, plan: AttentionPlan | None, causal: bool, window_left: int, q: torch.Tensor, kv_len: int
) -> torch.Tensor | None:
    """The bool SDPA mask of the call, built now that SDPA runs it (None: SDPA's own causal or no mask)."""
    if mask is not None and mask.dim() == 4:
        return mask
    batch, q_len = q.shape[0], q.shape[2]
    if plan is None:  # a pattern te_fx's op does not take (key padding with a KV cache, on a bidirectional layer, ...)
        mask_type = "no_mask" if not causal else "causal" if q_len == kv_len else "causal_bottom_right"
        plan = AttentionPlan(mask_type, (window_left, 0) if causal else (-1, -1))
        if mask is not None:
            plan = dataclasses.replace(plan, **{"key_padding" if mask.dim() == 2 else "cu_seqlens": mask})
    if mask is None and plan.mask_type == "causal" and plan.window_size[0] < 0:
        return None
    return plan_mask(plan, batch, q_len, kv_len, q.device)


def _hf_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    kwargs: dict,
) -> tuple[torch.Tensor, Any]:
    """HF's SDPA attention, or the model's eager attention for softcapping and attention sinks."""
    if kwargs.get("softcap") is None and kwargs.get("s_aux") is None:
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"{type(module).__name__} uses softcapping or sinks without an eager attention")
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min
        )
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


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
    dtype = autocast_dtype(query.device.type)
    if dtype is not None:  # as SDPA under autocast computes
        query, key, value = cast_like_sdpa((query, key, value), dtype)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window_left = sliding_window - 1 if sliding_window else -1
    q_len, kv_len = query.shape[2], key.shape[2]
    plan = _plan(attention_mask, causal, window_left, q_len, kv_len)
    reason = "fallback_mask"
    if plan is not None and (kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None):
        reason = "fallback_softmax"
    elif plan is not None:
        executor = resolve_executor(None)
        q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
        reason = _refusal(executor, q, k, v, plan, dropout)
        if reason is None:
            _count("te_hits")
            out = ops.attention(
                q, k, v, mask_type=plan.mask_type, window_size=plan.window_size,
                softmax_scale=scaling if scaling is not None else query.shape[-1] ** -0.5, dropout_p=dropout,
                key_padding_mask=plan.key_padding, cu_seqlens=plan.cu_seqlens, executor=executor,
                key_padding_kept_first=plan.kept_first,
            )  # fmt: skip
            return out, None
    _count(reason)
    mask = _fallback_mask(attention_mask, plan, causal, window_left, query, kv_len)
    kwargs["is_causal"] = causal
    return _hf_attention(module, query, key, value, mask, dropout, scaling, kwargs)
