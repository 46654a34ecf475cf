"""The fallback reasons: why a call ran PyTorch's SDPA instead of TE, one table for every way in.

The eager counters are keyed by these names, the compile report's ``reason`` is one of them (with a ``detail``),
``te-fx explain`` and the README describe them from here.
"""

from __future__ import annotations

__all__ = ["REASONS", "STATS_KEYS", "describe", "reason_text"]

REASONS: dict[str, str] = {
    "fallback_mask": "a mask that is not exactly causal, sliding-window causal, all-visible, causal with key padding, "
    "or packed causal documents; packed documents with a KV cache, or key padding with one in training or, on TE, "
    "for more than one query; a fully masked query row with a finite penalty in it (SDPA averages V there); or a "
    "mask that needs its gradient",
    "fallback_argument": "attention-backend path: an argument the model's eager attention applies and te_fx does "
    "not (softcapping, attention sinks, a position bias)",
    "fallback_scale_mismatch": "the call's softmax scale differs from the attention module's, which cannot take the "
    "call's (a stand-in module, or TE's FP8 attention)",
    "fallback_dropout": "the call's dropout differs from the TE module's",
    "fallback_layout": "a q/k/v layout te_fx does not convert",
    "fallback_device": "tensors not on CUDA",
    "fallback_dtype": "dtype is not fp16/bf16 (outside autocast)",
    "fallback_head_dim": "head dim not a multiple of 8 or above 256",
    "fallback_shape": "TE's fused backend rejects the shape",
    "fallback_fp8": "TE's FP8 attention rejects the call (inside FP8 autocast)",
    "fallback_dynamic": "compile path: an argument the graph does not fix at compile time (is_causal, enable_gqa, "
    "dropout_p or scale as a tensor, symbolic head counts or head dims)",
}
STATS_KEYS: tuple[str, ...] = ("te_hits", *REASONS)


def describe(key: str) -> str:
    """``key: what it means`` for a reason key (the key alone when it is not in the table)."""
    return f"{key}: {REASONS[key]}" if key in REASONS else key


def reason_text(key: str, detail: str = "") -> str:
    """``key: detail`` for a fallback that says what exactly (a compile report entry), else :func:`describe`."""
    return f"{key}: {detail}" if detail else describe(key)
