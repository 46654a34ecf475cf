"""TransformerEngine attention injection for HuggingFace models: the names of NeMo AutoModel's ``te_attention``.

A drop-in for that module (same names, signatures and return conventions) over te_fx's eager path
(:mod:`te_fx.eager`). Each HF ``self_attn`` module with separate q/k/v projections gets an attention module
(``module.attn_module``, from :func:`_create_te_dot_product_attention`) and a forward that routes its
``scaled_dot_product_attention`` calls to it while the original forward runs. TE is imported only when the real
factory runs: patched with a stand-in, injection and forwards work without TE.

Call :func:`inject_te_attention` after weight loading and before FSDP wrapping. Calls that TE cannot reproduce
exactly run the original SDPA and are counted by reason in :func:`get_te_attention_stats`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .core import masks, stats
from .core.plan import AttentionPlan
from .eager import inject, params
from .eager.replacement import TESdpa
from .executors import load_te_executor, resolve_executor
from .executors.reference import ReferenceDotProductAttention

__all__ = [
    "get_te_attention_stats",
    "reset_te_attention_stats",
    "inject_te_attention_into_module",
    "inject_te_attention",
    "remove_te_attention",
]

logger = logging.getLogger(__name__)

_TE_MODULE_ATTR = inject.TE_MODULE_ATTR
_TE_MODEL_FLAG = "_te_attention_injected"
_TE_STATS: dict[str, int] = stats.STATS
_STATS_LOG_EVERY = stats.LOG_EVERY
_SCALE_MISMATCH_WARNED = False  # kept for the documented name; te_fx warns once per module


def get_te_attention_stats() -> dict[str, int]:
    """A snapshot of the dispatch counters: ``te_hits`` (ran TE) and one ``fallback_*`` key per reason the
    original SDPA ran instead (:data:`te_fx.core.reasons.REASONS`)."""
    return stats.snapshot()


def reset_te_attention_stats() -> None:
    """Zero the dispatch counters (test / benchmarking helper)."""
    stats.reset()


def _maybe_log_stats() -> None:
    """Log the counters when ``TE_FX_STATS_LOG_EVERY`` > 0 (the counters also log themselves every N calls)."""
    if _STATS_LOG_EVERY > 0:
        logger.info("te_fx attention dispatch: %s", get_te_attention_stats())


def _proj_out_features(proj: nn.Module | None) -> int | None:
    """Output feature count of a projection (``nn.Linear``, weight-only or meta, or a wrapped linear)."""
    return params.proj_out_features(proj)


def _infer_attn_params(module: nn.Module) -> dict[str, Any] | None:
    """Attention hyper-parameters of a HF ``self_attn`` module: ``num_heads``, ``num_kv_heads``, ``head_dim``
    (None when neither the module nor its config has one), ``window_size`` and ``softmax_scale`` (the module's
    ``scaling``, else ``head_dim ** -0.5``); None when the layout is not separate q/k/v projections."""
    attn = params.infer_attn_params(module)
    if attn is None:
        return None
    config = getattr(module, "config", None)
    stated = getattr(module, "head_dim", None) or getattr(config, "head_dim", None)
    head_dim = attn["head_dim"] if stated else None
    scale = attn["softmax_scale"] if attn["softmax_scale"] is not None else attn["head_dim"] ** -0.5
    return {
        "num_heads": attn["num_heads"],
        "num_kv_heads": attn["num_kv_heads"],
        "head_dim": head_dim,
        "window_size": attn["window_size"],
        "softmax_scale": scale,
    }


def _create_te_dot_product_attention(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int | tuple[int, int],
    window_size: tuple[int, int] = (-1, 0),
    softmax_scale: float | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A TE ``DotProductAttention`` (bshd, causal) for this attention shape; ``head_dim`` may be (qk, v). Imports
    TE (:class:`te_fx.TEUnavailableError` without it)."""
    te_executor = load_te_executor()
    return te_executor.TEDotProductAttention(
        num_attention_heads=num_heads,
        kv_channels=head_dim,
        num_gqa_groups=num_kv_heads,
        qkv_format="bshd",
        attn_mask_type="causal",
        window_size=window_size,
        softmax_scale=softmax_scale,
        **kwargs,
    )


def _detect_causal_mask(attn_mask: torch.Tensor, window_size: tuple[int, int]) -> tuple[str, tuple[int, int]] | None:
    """Map a 4D SDPA mask (bool True = attend, or float additive) to a TE (attn_mask_type, window_size) pair.

    Returns ("causal", window_size) when the mask equals the causal pattern of that window (full causal for
    ``window_size[0] < 0``) at every batch item and head, and None for anything else. The whole mask is compared;
    the answer is cached per mask object inside an injected model's forward.
    """
    if attn_mask.dim() != 4:
        return None
    batch, heads, q_len, kv_len = attn_mask.shape
    if q_len != kv_len:
        return None
    plan = masks.classify_mask(attn_mask, batch, heads, q_len, kv_len)
    if q_len == 1 and plan is not None and plan.mask_type == "no_mask":
        plan = AttentionPlan("causal", (-1, 0))  # a single visible key is the 1 x 1 causal pattern too
    if plan is None or plan.kind != "causal":
        return None

    def effective(left: int) -> int:  # windows that reach every key are full causal
        return -1 if left < 0 or left >= kv_len - 1 else left

    return ("causal", window_size) if effective(plan.window_size[0]) == effective(window_size[0]) else None


def _make_te_sdpa(
    te_module: nn.Module,
    num_heads: int,
    num_kv_heads: int,
    original_sdpa: Callable,
    window_size: tuple[int, int] = (-1, 0),
    softmax_scale: float | None = None,
) -> Callable:
    """A replacement for ``F.scaled_dot_product_attention`` that runs ``te_module`` where that is exact.

    ``window_size`` is accepted for the documented signature: te_fx reads the window off each mask (a mask that
    differs from the layer's config wins), and a call without a mask is SDPA's plain causal or no-mask attention.
    It follows autocast as SDPA does, reads HF's (B, H, S, D) views as the contiguous (B, S, H, D) tensors TE needs,
    undoes ``repeat_kv`` (TE does GQA natively), turns a mask into a plan only when it reproduces the mask exactly
    (causal, sliding-window causal, all-visible, key padding, packed documents), and otherwise calls
    ``original_sdpa`` and counts why.
    """
    return TESdpa(te_module, num_heads, num_kv_heads, original_sdpa, softmax_scale)


def _patch_module_forward(module: nn.Module, te_sdpa: Callable) -> None:
    """Shadow ``module.forward`` with one that routes this thread's SDPA calls to ``te_sdpa`` while it runs."""
    inject.patch_forward(module, te_sdpa)


def _attn_module_factory(executor: str) -> Callable[[dict], Any]:
    """The attention module for te_fx's inferred parameters: TE's, through :func:`_create_te_dot_product_attention`
    (looked up at call time, so a patched factory is the one called), or the reference executor's."""

    def make(attn: dict) -> Any:
        head_dim = attn["head_dim"]
        if attn["v_head_dim"] != head_dim:
            head_dim = (head_dim, attn["v_head_dim"])
        extra = {"attention_dropout": attn["dropout"]} if attn["dropout"] else {}
        if executor == "reference":
            return ReferenceDotProductAttention(
                attn["num_heads"], head_dim, attn["num_kv_heads"], window_size=attn["window_size"],
                softmax_scale=attn["softmax_scale"], **extra,
            )  # fmt: skip
        return _create_te_dot_product_attention(
            attn["num_heads"], attn["num_kv_heads"], head_dim, attn["window_size"], attn["softmax_scale"], **extra
        )

    return make


def inject_te_attention_into_module(module: nn.Module, *, executor: str | None = None) -> bool:
    """Inject TE attention into one HF ``self_attn`` module.

    Returns True on success, False when the module does not match the expected layout (:func:`te_fx.tools.explain`
    and the log say why). ``executor``: "te" (default, or ``TE_FX_EXECUTOR``) or "reference" (the pure-PyTorch
    executor, any device). Mask decisions last one call of the module.
    """
    if inject.inject_module(module, _attn_module_factory(resolve_executor(executor))) is not None:
        return False
    inject.scope_mask_decisions(module, [""])
    return True


def inject_te_attention(model: nn.Module, *, executor: str | None = None) -> None:
    """Inject TE attention into every compatible ``self_attn`` module of ``model``.

    Skips modules that already carry ``attn_module``; sets ``model._te_attention_injected``. Call after loading
    weights and before FSDP wrapping. Mask decisions are cached per mask object for one forward of ``model``, of
    the decoder or of a decoder layer called on its own. ``executor``: "te" (default, or ``TE_FX_EXECUTOR``) needs
    TransformerEngine; "reference" runs the same call contract in plain PyTorch on any device.
    """
    if getattr(model, _TE_MODEL_FLAG, False):
        return
    name = resolve_executor(executor)
    make = _attn_module_factory(name)
    injected, skipped = [], []
    for path, module in model.named_modules():
        if params.fused_qkv_name(module) is None and path.rsplit(".", 1)[-1] != "self_attn":
            continue
        reason = inject.not_injected_reason(path, module) or inject.inject_module(module, make)
        if reason is None:
            injected.append(path)
        else:
            skipped.append(f"{path} ({reason})")
    if injected:
        setattr(model, _TE_MODEL_FLAG, True)
        inject.scope_mask_decisions(model, injected)
    logger.log(
        logging.INFO if injected else logging.WARNING,
        "te_fx: %s executor injected into %d self_attn modules%s", name, len(injected),
        f"; not injected: {'; '.join(skipped)}" if skipped else "",
    )  # fmt: skip


def remove_te_attention(model: nn.Module) -> None:
    """Undo :func:`inject_te_attention`: restore each module's own forward and drop ``attn_module``."""
    inject.remove(model)
    if hasattr(model, _TE_MODEL_FLAG):
        delattr(model, _TE_MODEL_FLAG)
