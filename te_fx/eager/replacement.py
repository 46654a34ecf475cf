"""The SDPA replacement of an injected module: HF's call in, TE's plan out, or the original SDPA and a reason.

It follows autocast as SDPA does, reads HF's (B, H, S, D) views as the contiguous (B, S, H, D) tensors TE needs,
undoes ``repeat_kv`` (TE does GQA natively), unpacks the packed-GQA decode layout of transformers >= 5.23, turns the
mask into a plan with the exact matcher (:mod:`te_fx.core.masks`), and runs the plan through the attention module's
runner. Anything it is not sure of goes to the original SDPA, counted under its reason.

Undoing ``repeat_kv``: when the routing mode vouches that K or V is a repeat made in the routed block and unchanged
since (:class:`te_fx.eager.intercept.KVRepeats`), TE gets the repeat's source, a view of the un-repeated tensor, so
the repeat is not on the autograd path of TE's output (no strided copy, no zero-filled gradient summed over the
copies); a repeat written to since goes to SDPA (it may no longer hold equal copies); anything else with as many
heads as the query is taken to be a repeat and read every ``n_rep``-th head. Calls that go to the original SDPA get
the repeated tensors, as plain SDPA does.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ..core import masks, stats
from ..core.autocast import autocast_dtype, cast_like_sdpa
from ..core.guards import is_causal_plan, padding_refusal, scales_match, sdpa_call_refusal
from ..core.plan import NO_MASK, AttentionPlan
from ..executors import ExecutorModule, is_training
from .intercept import KVRepeats

__all__ = ["TESdpa", "ModuleRunner", "runner_for"]

logger = logging.getLogger("te_fx")


class ModuleRunner:
    """Runs plans on an attention module te_fx did not build (a stand-in for TE's ``DotProductAttention``, such as a
    test double), through TE's call contract: ``module(q, k, v, attn_mask_type=..., window_size=...)`` on bshd
    tensors, returning (B, Sq, H * Dv). It reads no attribute of the module; per-row plans and a scale of the call's
    own are not part of that contract and stay on SDPA."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def unsupported_reason(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> str | None:
        if plan.softmax_scale is not None:
            return "fallback_scale_mismatch"
        return "fallback_mask" if plan.key_padding is not None or plan.cu_seqlens is not None else None

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        out = self.module(q, k, v, attn_mask_type=plan.mask_type, window_size=plan.window_size)
        return out.view(*q.shape[:3], -1)


def runner_for(module: Any) -> ExecutorModule | ModuleRunner:
    """te_fx's own attention modules run plans themselves; any other module through :class:`ModuleRunner`."""
    return module if isinstance(module, ExecutorModule) else ModuleRunner(module)


def _mask_plan(
    attn_mask: torch.Tensor | None, is_causal: bool, q: torch.Tensor, q_len: int, kv_len: int
) -> AttentionPlan | None:
    if attn_mask is None:
        return is_causal_plan(q_len, kv_len) if is_causal else NO_MASK
    if is_causal or (attn_mask.is_floating_point() and attn_mask.dtype != q.dtype):
        return None  # SDPA rejects these; let it raise its own error
    if attn_mask.requires_grad and torch.is_grad_enabled():
        return None  # a learned bias that is 0 / -inf now still needs its gradient
    return masks.classify_mask(attn_mask, q.shape[0], q.shape[1], q_len, kv_len)


class _KVSources(NamedTuple):
    """What the routing mode says of one call's K and V: the tensor each repeats (None: not a repeat made in the
    routed block, or one written to since, or no mode), and whether either is a repeat written to since."""

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    written: bool = False

    @staticmethod
    def of(kv_repeats: KVRepeats | None, key: Any, value: Any) -> _KVSources:
        if kv_repeats is None:
            return _NO_SOURCES
        written = kv_repeats.written_to(key) or kv_repeats.written_to(value)
        return _KVSources(kv_repeats.source_of(key), kv_repeats.source_of(value), written)


_NO_SOURCES = _KVSources()


class TESdpa:
    """The callable that replaces SDPA for one injected module. An object rather than a closure so that
    ``copy.deepcopy`` of an injected model gives the copy its own attention module (and injected models pickle).
    Called as SDPA; the routing mode adds ``kv_repeats``, the repeats made in the routed block."""

    takes_kv_repeats = True  # te_fx.eager.intercept passes ``kv_repeats=``

    def __init__(
        self,
        te_module: Any,
        num_heads: int,
        num_kv_heads: int,
        original_sdpa: Callable,
        softmax_scale: float | None,
    ) -> None:
        self.te_module = te_module
        self.runner = runner_for(te_module)
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.n_rep = num_heads // num_kv_heads
        self.original_sdpa = original_sdpa
        self.softmax_scale = softmax_scale
        self.scale_mismatch_warned = False

    def _dropout(self) -> float:
        """The dropout the TE module applies now: te_fx's own modules say; a stand-in is taken to apply none."""
        module = self.te_module
        if isinstance(module, ExecutorModule) and module.training:
            return float(module.attention_dropout)
        return 0.0

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        *,
        kv_repeats: KVRepeats | None = None,
    ) -> torch.Tensor:
        sources = _KVSources.of(kv_repeats, key, value)  # by identity: before autocast's copies
        dtype = autocast_dtype(query.device.type) if isinstance(query, torch.Tensor) else None
        if dtype is not None:
            query, key, value, attn_mask = cast_like_sdpa((query, key, value, attn_mask), dtype)
        kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        if enable_gqa:
            kwargs["enable_gqa"] = True
        reason, out = self._attend(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, sources, dtype
        )
        stats.count(reason)
        return out if out is not None else self.original_sdpa(query, key, value, **kwargs)

    def _kv_heads(self, t: torch.Tensor, source: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor:
        """The KV heads of a repeated K or V: the repeat's source where the routing mode vouches for it, else every
        ``n_rep``-th head of ``t``."""
        if source is None or source.shape[1] != self.num_kv_heads:
            return t[:, :: self.n_rep]
        return source if dtype is None else cast_like_sdpa((source,), dtype)[0]

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
        enable_gqa: bool,
        sources: _KVSources = _NO_SOURCES,
        dtype: torch.dtype | None = None,
    ) -> tuple[str, torch.Tensor | None]:
        """("te_hits", the output) or (the reason, None)."""
        q, k, v = query, key, value
        packed = (
            self.n_rep > 1 and q.dim() == k.dim() == 4 and q.shape[1] == self.num_kv_heads == k.shape[1]
            and q.shape[2] == self.n_rep
        )  # fmt: skip
        if packed:  # transformers >= 5.23 decode: (B, Hkv, n_rep, D) holds one query token of every head
            if is_causal or (attn_mask is not None and attn_mask.shape[-2] != 1):
                return "fallback_layout", None
            q = q.reshape(q.shape[0], self.num_heads, 1, q.shape[-1])
        refusal = sdpa_call_refusal(q, k, v, enable_gqa or packed, dropout_p)
        if refusal is not None:
            return refusal[0], None
        batch, heads, q_len, head_dim = q.shape
        if k.shape[1] == heads == self.num_heads and self.n_rep > 1:  # K/V arrive repeat_kv-ed: TE does GQA
            if sources.written:
                return "fallback_layout", None  # a repeat written to since may no longer hold equal copies
            k, v = self._kv_heads(k, sources.key, dtype), self._kv_heads(v, sources.value, dtype)
        if dropout_p != self._dropout():
            return "fallback_dropout", None
        kv_len = k.shape[2]
        plan = _mask_plan(attn_mask, is_causal, q, q_len, kv_len)
        if plan is None:
            return "fallback_mask", None
        if plan.key_padding is not None and padding_refusal(plan, is_training(dropout_p, q, k, v)) is not None:
            return "fallback_mask", None
        if not scales_match(scale, head_dim, self.softmax_scale):  # OPT scales q itself and calls with scale=1
            plan = dataclasses.replace(plan, softmax_scale=scale if scale is not None else head_dim**-0.5)
        if attn_mask is None and is_causal and q_len < kv_len:
            k, v = k[:, :, :q_len], v[:, :, :q_len]
        q_bshd, k_bshd, v_bshd = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        reason = self.runner.unsupported_reason(q_bshd, k_bshd, v_bshd, plan)
        if reason == "fallback_scale_mismatch" and not self.scale_mismatch_warned:
            self.scale_mismatch_warned = True
            logger.warning(
                "te_fx: SDPA was called with scale=%s but the TE module uses softmax_scale=%s and cannot take the "
                "call's; these calls run the original SDPA (counted as fallback_scale_mismatch)", scale,
                self.softmax_scale,
            )  # fmt: skip
        if reason is not None:
            return reason, None
        out = self.runner.run(q_bshd, k_bshd, v_bshd, plan).transpose(1, 2)
        if packed:
            out = out.reshape(query.shape[0], query.shape[1], query.shape[2], -1)
        return "te_hits", out
