"""The guards of an SDPA call, from metadata only: what any executor needs before te_fx may take the call.

The eager replacement asks them with real tensors, the FX pass with fake ones (``same`` then says whether two
symbolic sizes are provably equal). Each failed guard is a reason key of :mod:`te_fx.core.reasons` and a detail.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch

from .plan import UNKNOWN_LAYOUT, AttentionPlan, padding_route

__all__ = ["Refusal", "sdpa_call_refusal", "is_causal_plan", "padding_refusal", "scales_match"]

Refusal = tuple[str, str]  # (reason key, what exactly)


def sdpa_call_refusal(
    q: Any, k: Any, v: Any, enable_gqa: bool, dropout_p: Any = 0.0, same: Callable[[Any, Any], bool] = operator.eq
) -> Refusal | None:
    """Why te_fx cannot take this SDPA call whatever its mask (layout, dtypes, GQA, dropout), or None.
    ``q`` is (B, H, Sq, D), ``k``/``v`` (B, Hkv, Skv, D / Dv) as SDPA takes them."""
    if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in (q, k, v)):
        return "fallback_layout", "q/k/v are not 4D tensors"
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        return "fallback_dtype", f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype}"
    if not (same(k.shape[0], q.shape[0]) and same(v.shape[0], q.shape[0])):
        return "fallback_layout", "K/V batch differs from the query's (SDPA broadcasts it)"
    if not (same(v.shape[1], k.shape[1]) and same(k.shape[3], q.shape[3])):
        return "fallback_layout", "K and V (or Q and K) disagree in heads or head dim"
    if isinstance(k.shape[2], int) and isinstance(v.shape[2], int) and k.shape[2] != v.shape[2]:
        return "fallback_layout", "K and V differ in length"  # symbolic lengths: SDPA's own check holds at run time
    heads, kv_heads = q.shape[1], k.shape[1]
    if isinstance(heads, int) and isinstance(kv_heads, int):
        if heads % kv_heads:
            return "fallback_layout", "query heads are not a multiple of KV heads"
        if kv_heads != heads and not enable_gqa:
            return "fallback_layout", "fewer KV heads than query heads without enable_gqa (SDPA rejects the call)"
    if any(isinstance(size, int) and size == 0 for t in (q, k) for size in t.shape):
        return "fallback_layout", "empty tensors"
    if isinstance(dropout_p, (int, float)) and not 0 <= dropout_p < 1:
        return "fallback_dropout", f"dropout_p {dropout_p} is outside [0, 1)"
    return None


def is_causal_plan(q_len: Any, kv_len: Any, same: Callable[[Any, Any], bool] = operator.eq) -> AttentionPlan | None:
    """The plan of SDPA's ``is_causal=True`` with no mask, which is aligned top-left: with as many queries as keys
    it is TE's causal; with fewer, query i sees keys 0..i, so the keys past q_len are never seen and causal runs on
    the first q_len keys (the caller slices them); with more queries than keys some rows see nothing: None."""
    if same(q_len, kv_len):
        return AttentionPlan("causal", (-1, 0))
    if isinstance(q_len, int) and isinstance(kv_len, int) and q_len < kv_len:
        return AttentionPlan("causal", (-1, 0))
    return None


def padding_refusal(plan: AttentionPlan, training: bool) -> Refusal | None:
    """Why te_fx's op cannot run ``plan``'s key padding (a KV cache's queries, or all keys visible, in training:
    :func:`~te_fx.core.plan.padding_route` has no route), or None."""
    if plan.key_padding is None or padding_route(UNKNOWN_LAYOUT, training, plan.mask_type) != "none":
        return None
    return "fallback_mask", f"key padding with mask type {plan.mask_type} in training (te_fx runs it in inference)"


def scales_match(call_scale: float | None, head_dim: int, module_scale: float | None) -> bool:
    """Whether SDPA's scale for this call (None: head_dim ** -0.5) is the TE module's (None: the same default)."""
    default = 1.0 / math.sqrt(head_dim)
    sdpa_scale = call_scale if call_scale is not None else default
    te_scale = module_scale if module_scale is not None else default
    return math.isclose(sdpa_scale, te_scale, rel_tol=1e-9)
