"""TransformerEngine attention injection for HuggingFace models (the eager path).

A drop-in for NeMo AutoModel's ``te_attention`` module: same names, signatures and return conventions. Each HF
``self_attn`` module with separate q/k/v projections gets a TE ``DotProductAttention`` (``module.attn_module``) and
a forward that routes ``torch.nn.functional.scaled_dot_product_attention`` to it while the original forward runs.

Call :func:`inject_te_attention` after weight loading and before FSDP wrapping. Calls that TE cannot reproduce
exactly (padding masks, arbitrary masks, a scale or dropout that differs from the TE module's, unsupported dtype,
device or head dim) run the original SDPA and are counted by reason in :func:`get_te_attention_stats`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import masks, params, sdpa_patch
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

_TE_MODULE_ATTR = "attn_module"
_TE_MODEL_FLAG = "_te_attention_injected"
_STATS_KEYS = (
    "te_hits",
    "fallback_mask",
    "fallback_scale_mismatch",
    "fallback_dropout",
    "fallback_layout",
    "fallback_device",
    "fallback_dtype",
    "fallback_head_dim",
    "fallback_shape",
    "fallback_fp8",
)
_TE_STATS: dict[str, int] = dict.fromkeys(_STATS_KEYS, 0)
_STATS_LOCK = threading.Lock()
_STATS_LOG_EVERY = int(os.environ.get("TE_FX_STATS_LOG_EVERY", "0"))
_SCALE_MISMATCH_WARNED = False


def get_te_attention_stats() -> dict[str, int]:
    """A snapshot of the dispatch counters: ``te_hits`` (ran TE) and one ``fallback_*`` key per reason the
    original SDPA ran instead (``fallback_mask``: a mask that is not exactly causal / sliding-causal / all-visible;
    ``fallback_scale_mismatch``: the call's scale differs from the TE module's; ``fallback_dropout``,
    ``fallback_layout``, ``fallback_device``, ``fallback_dtype``, ``fallback_head_dim``, ``fallback_shape``;
    ``fallback_fp8``: inside TE's FP8 autocast with FP8 attention, a call TE's FP8 attention cannot run)."""
    with _STATS_LOCK:
        return dict(_TE_STATS)


def reset_te_attention_stats() -> None:
    """Zero the dispatch counters (test / benchmarking helper)."""
    with _STATS_LOCK:
        for key in _TE_STATS:
            _TE_STATS[key] = 0


def _count(key: str) -> None:
    with _STATS_LOCK:
        _TE_STATS[key] += 1
    _maybe_log_stats()


def _maybe_log_stats() -> None:
    """Log the counters every ``TE_FX_STATS_LOG_EVERY`` attention calls (0, the default, turns this off)."""
    if _STATS_LOG_EVERY > 0:
        stats = get_te_attention_stats()
        if sum(stats.values()) % _STATS_LOG_EVERY == 0:
            logger.info("te_fx attention dispatch: %s", stats)


def _proj_out_features(proj: nn.Module | None) -> int | None:
    """Output feature count of a projection (``nn.Linear``, weight-only or meta, or a wrapped linear)."""
    return params.proj_out_features(proj)


def _infer_attn_params(module: nn.Module) -> dict[str, Any] | None:
    """Attention hyper-parameters of a HF ``self_attn`` module (num_heads, num_kv_heads, head_dim, window_size,
    softmax_scale, plus v_head_dim and dropout), or None when the layout is not separate q/k/v projections."""
    return params.infer_attn_params(module)


def _create_te_dot_product_attention(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int | tuple[int, int],
    window_size: tuple[int, int] = (-1, 0),
    softmax_scale: float | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A TE ``DotProductAttention`` (bshd, causal) for this attention shape; ``head_dim`` may be (qk, v)."""
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

    Returns ("causal", (-1, 0)) for the full causal pattern, ("causal", window_size) for the sliding-window causal
    pattern of this layer, and None for anything else (padding, packed documents, malformed values). The whole
    mask is compared with the pattern, for every batch item and head; the answer is cached per mask object.
    """
    if attn_mask.dim() != 4:
        return None
    batch, heads, q_len, kv_len = attn_mask.shape
    if q_len != kv_len:
        return None
    decision = masks.classify_mask(attn_mask, batch, heads, q_len, kv_len, window_size[0])
    if decision is not None and decision.mask_type == "no_mask" and q_len == 1:
        return "causal", (-1, 0)  # a single visible key is the 1 x 1 causal pattern too
    if decision is None or decision.mask_type != "causal":
        return None
    return decision.mask_type, decision.window_size


def _scale_matches(call_scale: float | None, head_dim: int, module_scale: float | None) -> bool:
    default = 1.0 / math.sqrt(head_dim)
    sdpa_scale = call_scale if call_scale is not None else default
    te_scale = module_scale if module_scale is not None else default
    return math.isclose(sdpa_scale, te_scale, rel_tol=1e-9)


def _plan_mask(
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    query: torch.Tensor,
    heads: int,
    q_len: int,
    kv_len: int,
    window_left: int,
) -> masks.MaskDecision | None:
    if attn_mask is None:
        if not is_causal:
            return masks.NO_MASK
        # SDPA's is_causal is top-left aligned: with fewer queries than keys the keys past q_len are never seen
        # (the caller slices them off); with more queries than keys SDPA and TE disagree on empty rows.
        return masks.MaskDecision("causal", (-1, 0)) if q_len <= kv_len else None
    if is_causal or (attn_mask.is_floating_point() and attn_mask.dtype != query.dtype):
        return None  # SDPA rejects these; let it raise its own error
    if attn_mask.requires_grad and torch.is_grad_enabled():
        return None  # a learned bias that is 0 / -inf now still needs its gradient
    return masks.classify_mask(attn_mask, query.shape[0], heads, q_len, kv_len, window_left)


class _TESdpa:
    """The callable :func:`_make_te_sdpa` returns. An object rather than a closure so that ``copy.deepcopy`` of an
    injected model gives the copy its own ``attn_module`` (and so that injected models pickle)."""

    def __init__(
        self,
        te_module: nn.Module,
        num_heads: int,
        num_kv_heads: int,
        original_sdpa: Callable,
        window_size: tuple[int, int],
        softmax_scale: float | None,
    ) -> None:
        self.te_module = te_module
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.n_rep = num_heads // num_kv_heads
        self.original_sdpa = original_sdpa
        self.window_size = window_size
        self.softmax_scale = softmax_scale if softmax_scale is not None else getattr(te_module, "softmax_scale", None)

    def _fallback(self, reason: str, args: tuple, kwargs: dict) -> torch.Tensor:
        _count(reason)
        return self.original_sdpa(*args, **kwargs)

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
    ) -> torch.Tensor:
        global _SCALE_MISMATCH_WARNED
        sdpa_args = (query, key, value)
        sdpa_kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        if enable_gqa:
            sdpa_kwargs["enable_gqa"] = True
        te_module, num_heads, num_kv_heads, n_rep = self.te_module, self.num_heads, self.num_kv_heads, self.n_rep
        if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
            return self._fallback("fallback_layout", sdpa_args, sdpa_kwargs)
        q, k, v = query, key, value
        packed = n_rep > 1 and q.shape[1] == num_kv_heads and q.shape[2] == n_rep and k.shape[1] == num_kv_heads
        if packed:  # transformers >= 5.23 decode: (B, Hkv, n_rep, D) holds one query token of every head
            if is_causal or (attn_mask is not None and attn_mask.shape[-2] != 1):
                return self._fallback("fallback_layout", sdpa_args, sdpa_kwargs)
            q = q.reshape(q.shape[0], num_heads, 1, q.shape[-1])
        batch, heads, q_len, head_dim = q.shape
        if k.shape[0] != batch or v.shape[:3] != k.shape[:3] or k.shape[-1] != head_dim or 0 in q.shape or 0 in k.shape:
            return self._fallback("fallback_layout", sdpa_args, sdpa_kwargs)
        if k.dtype != q.dtype or v.dtype != q.dtype:
            return self._fallback("fallback_dtype", sdpa_args, sdpa_kwargs)
        if k.shape[1] != heads and not ((enable_gqa or packed) and heads % k.shape[1] == 0):
            return self._fallback("fallback_layout", sdpa_args, sdpa_kwargs)
        if k.shape[1] == heads == num_heads and n_rep > 1:
            k, v = k[:, ::n_rep], v[:, ::n_rep]  # K/V arrive repeat_kv-ed: pass the KV heads, TE does GQA
        if not _scale_matches(scale, head_dim, self.softmax_scale):
            if not _SCALE_MISMATCH_WARNED:
                _SCALE_MISMATCH_WARNED = True
                logger.warning(
                    "te_fx: SDPA was called with scale=%s but the TE module uses softmax_scale=%s; these calls run "
                    "the original SDPA (counted as fallback_scale_mismatch)", scale, self.softmax_scale,
                )  # fmt: skip
            return self._fallback("fallback_scale_mismatch", sdpa_args, sdpa_kwargs)
        te_dropout = getattr(te_module, "attention_dropout", 0.0) if te_module.training else 0.0
        if dropout_p != te_dropout:
            return self._fallback("fallback_dropout", sdpa_args, sdpa_kwargs)
        kv_len = k.shape[2]
        decision = _plan_mask(attn_mask, is_causal, q, heads, q_len, kv_len, self.window_size[0])
        if decision is None:
            return self._fallback("fallback_mask", sdpa_args, sdpa_kwargs)
        if attn_mask is None and is_causal and q_len < kv_len:
            k, v = k[:, :, :q_len], v[:, :, :q_len]
        q_bshd, k_bshd, v_bshd = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        unsupported = getattr(te_module, "unsupported_reason", None)
        if unsupported is not None:
            reason = unsupported(q_bshd, k_bshd, v_bshd, decision.mask_type, decision.window_size)
            if reason is not None:
                return self._fallback(reason, sdpa_args, sdpa_kwargs)
        run = getattr(te_module, "run", None)  # te_fx's TE module: no nn.Module call overhead, no repeated checks
        if run is not None:
            out = run(q_bshd, k_bshd, v_bshd, decision.mask_type, decision.window_size)
        else:
            out = te_module(q_bshd, k_bshd, v_bshd, attn_mask_type=decision.mask_type, window_size=decision.window_size)
            out = out.view(batch, q_len, heads, -1)
        _count("te_hits")
        out = out.transpose(1, 2)
        return out.reshape(query.shape[0], query.shape[1], query.shape[2], -1) if packed else out


def _make_te_sdpa(
    te_module: nn.Module,
    num_heads: int,
    num_kv_heads: int,
    original_sdpa: Callable,
    window_size: tuple[int, int] = (-1, 0),
    softmax_scale: float | None = None,
) -> Callable:
    """A replacement for ``F.scaled_dot_product_attention`` that runs ``te_module`` where that is exact.

    It reads HF's (B, H, S, D) views as the contiguous (B, S, H, D) tensors TE needs, undoes ``repeat_kv`` (TE does
    GQA natively), unpacks the packed-GQA decode layout of transformers >= 5.23, converts a mask only when it is
    exactly causal / sliding-causal / all-visible, and otherwise calls ``original_sdpa`` and counts why.
    """
    return _TESdpa(te_module, num_heads, num_kv_heads, original_sdpa, window_size, softmax_scale)


class _TEForward:
    """``module.forward`` after injection: the module's own forward with this thread's SDPA routed to ``te_sdpa``.
    Holds the module rather than a bound method, so deep copies and pickles of the model stay consistent."""

    def __init__(self, module: nn.Module, te_sdpa: Callable) -> None:
        self.module = module
        self.te_sdpa = te_sdpa
        self.inner = vars(module).get("forward")  # a forward someone installed before us, else the class's

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with sdpa_patch.sdpa_override(self.te_sdpa):
            if self.inner is not None:
                return self.inner(*args, **kwargs)
            return type(self.module).forward(self.module, *args, **kwargs)


def _refuse_replication() -> nn.Module:
    raise RuntimeError(
        "te_fx: nn.DataParallel cannot replicate a module with te_fx attention (each replica would run the original "
        "module's forward); use DistributedDataParallel (torchrun), or te_fx.remove_te_attention(model) first"
    )


def _patch_module_forward(module: nn.Module, te_sdpa: Callable) -> None:
    """Shadow ``module.forward`` with one that routes this thread's SDPA calls to ``te_sdpa`` while it runs.
    nn.DataParallel's replicas would share that forward, bound to this module: replicating it raises instead."""
    module.forward = _TEForward(module, te_sdpa)
    module._replicate_for_data_parallel = _refuse_replication


def _imports_sdpa_locally(module: nn.Module) -> bool:
    """True when the module's source file binds SDPA to a global name (``from torch.nn.functional import
    scaled_dot_product_attention``): such calls bypass the attribute swap."""
    source = sys.modules.get(type(module).__module__)
    sdpa = sdpa_patch.original_sdpa()
    return source is not None and any(value is sdpa for value in vars(source).values())


def _drop_te_module_keys(_module: nn.Module, state_dict: dict, prefix: str, _metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(f"{prefix}{_TE_MODULE_ATTR}.")]:
        del state_dict[key]


def _forgive_missing_te_module_keys(_module: nn.Module, incompatible: Any) -> None:
    marker = f".{_TE_MODULE_ATTR}."
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if marker not in f".{k}"]


def _hide_from_state_dict(module: nn.Module) -> None:
    """Keep ``attn_module`` (a child, so it follows .train()/.eval()/.to()) out of checkpoints."""
    module.register_state_dict_post_hook(_drop_te_module_keys)
    module.register_load_state_dict_post_hook(_forgive_missing_te_module_keys)


def _skip_reason(module: nn.Module) -> str | None:
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if isinstance(implementation, str) and implementation != "sdpa":
        return f"attn_implementation={implementation!r} does not call SDPA"
    if _imports_sdpa_locally(module):
        return "its module imports scaled_dot_product_attention locally, so the runtime patch cannot reach it"
    return None


_SCOPE_PARENT = "_te_fx_mask_scope_parent"  # the scoped module whose forward calls this one, in the module's __dict__


def _enter_mask_scope(module: nn.Module, _args: tuple) -> None:
    masks.enter_forward(module, vars(module).get(_SCOPE_PARENT))


def _leave_mask_scope(module: nn.Module, _args: tuple, _output: Any) -> None:
    masks.leave_forward(module)


def _scope_mask_decisions(root: nn.Module, paths: list[str]) -> None:
    """Cache mask decisions while a forward runs in ``root``, in the modules above all the attention modules at
    ``paths`` (the decoder) and in the modules holding one (the decoder layers, which may be called on their own);
    see :func:`te_fx.masks.enter_forward`. Containers without a forward (ModuleList) are skipped."""
    common = os.path.commonprefix([path.split(".") for path in paths])
    names = {".".join(common[:depth]) for depth in range(len(common) + 1)}
    names |= {path.rpartition(".")[0] for path in paths}
    scoped = {}
    for name in sorted(names, key=lambda name: name.count(".") + bool(name)):  # parents first
        module = root.get_submodule(name)
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        parent = next((scoped[p] for p in _prefixes(name) if p in scoped), None)
        object.__setattr__(module, _SCOPE_PARENT, parent)  # not a submodule: no state_dict entry, no cycle
        scoped[name] = module
        if _enter_mask_scope not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_enter_mask_scope)
            module.register_forward_hook(_leave_mask_scope, always_call=True)


def _prefixes(name: str) -> list[str]:
    """The module paths above ``name``, nearest first ("" is the root)."""
    parts = name.split(".") if name else []
    return [".".join(parts[:depth]) for depth in range(len(parts) - 1, -1, -1)]


def inject_te_attention_into_module(module: nn.Module, *, executor: str | None = None) -> bool:
    """Inject TE attention into one HF ``self_attn`` module.

    Returns True on success, False when the module does not match the expected layout (or calls SDPA in a way the
    patch cannot intercept; logged as a warning). ``executor``: "te" (default, or ``TE_FX_EXECUTOR``) or
    "reference" (the pure-PyTorch executor, any device). Mask decisions last one call of the module.
    """
    if not _inject(module, executor):
        return False
    _scope_mask_decisions(module, [""])
    return True


def _inject(module: nn.Module, executor: str | None) -> bool:
    if hasattr(module, _TE_MODULE_ATTR):
        return False
    attn = _infer_attn_params(module)
    if attn is None:
        return False
    reason = _skip_reason(module)
    if reason is not None:
        logger.warning("te_fx: skipping %s: %s", type(module).__name__, reason)
        return False
    head_dim = attn["head_dim"] if attn["v_head_dim"] == attn["head_dim"] else (attn["head_dim"], attn["v_head_dim"])
    extra = {"attention_dropout": attn["dropout"]} if attn["dropout"] else {}
    if resolve_executor(executor) == "reference":
        te_module = ReferenceDotProductAttention(
            attn["num_heads"], head_dim, attn["num_kv_heads"], window_size=attn["window_size"],
            softmax_scale=attn["softmax_scale"], **extra,
        )  # fmt: skip
    else:
        te_module = _create_te_dot_product_attention(
            attn["num_heads"], attn["num_kv_heads"], head_dim, attn["window_size"], attn["softmax_scale"], **extra
        )
    te_module.train(module.training)
    setattr(module, _TE_MODULE_ATTR, te_module)
    _hide_from_state_dict(module)
    te_sdpa = _make_te_sdpa(
        te_module, attn["num_heads"], attn["num_kv_heads"], sdpa_patch.original_sdpa(), attn["window_size"],
        attn["softmax_scale"],
    )  # fmt: skip
    _patch_module_forward(module, te_sdpa)
    return True


def inject_te_attention(model: nn.Module, *, executor: str | None = None) -> None:
    """Inject TE attention into every compatible ``self_attn`` module of ``model``.

    Skips modules that already carry ``attn_module``; sets ``model._te_attention_injected``. Call after loading
    weights and before FSDP wrapping. Mask decisions are cached per mask object for one forward of ``model``, of
    the decoder or of a decoder layer called on its own. ``executor``: "te" (default, or ``TE_FX_EXECUTOR``) needs
    TransformerEngine (``pip install 'te-fx[te]'``); "reference" runs the same call contract in plain PyTorch on
    any device.
    """
    if getattr(model, _TE_MODEL_FLAG, False):
        return
    name = resolve_executor(executor)
    if name == "te":
        load_te_executor()
    injected, skipped = [], []
    for path, module in model.named_modules():
        fused = params.fused_qkv_name(module)
        if fused is not None:  # GPT-NeoX `.attention`, Falcon `.self_attention`, Phi3 `.self_attn`
            skipped.append(f"{path} (fused q/k/v projection {fused!r})")
        elif path.rsplit(".", 1)[-1] == "self_attn":
            if _inject(module, name):
                injected.append(path)
            else:
                skipped.append(f"{path} (not a separate q/k/v layout, or SDPA is not reachable)")
    if injected:
        setattr(model, _TE_MODEL_FLAG, True)
        _scope_mask_decisions(model, injected)
    logger.log(
        logging.INFO if injected else logging.WARNING,
        "te_fx: %s executor injected into %d self_attn modules%s", name, len(injected),
        f"; not injected: {'; '.join(skipped)}" if skipped else "",
    )  # fmt: skip


def remove_te_attention(model: nn.Module) -> None:
    """Undo :func:`inject_te_attention`: restore each module's own forward and drop ``attn_module``."""
    for module in model.modules():
        forward = vars(module).get("forward")
        if hasattr(module, _TE_MODULE_ATTR) and isinstance(forward, _TEForward):
            del module.forward, module._replicate_for_data_parallel
            if forward.inner is not None:  # a forward installed before injection (accelerate hooks, wrappers)
                module.forward = forward.inner
            delattr(module, _TE_MODULE_ATTR)
        for hooks, hook in ((module._forward_pre_hooks, _enter_mask_scope), (module._forward_hooks, _leave_mask_scope)):
            for key in [key for key, value in hooks.items() if value is hook]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
        vars(module).pop(_SCOPE_PARENT, None)
    if hasattr(model, _TE_MODEL_FLAG):
        delattr(model, _TE_MODEL_FLAG)
