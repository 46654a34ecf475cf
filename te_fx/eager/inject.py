"""Injection: each HF ``self_attn`` module gets an attention module (``attn_module``) and a forward that routes its
SDPA calls to a :class:`~te_fx.eager.replacement.TESdpa` while it runs; :func:`remove` undoes it all.

Mask decisions are cached while a forward of the model, its decoder or one decoder layer runs (hooks on those
modules), so HF's one mask is classified once per forward, not once per layer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._guards import detect_fake_mode

from ..core import masks
from . import params
from .intercept import SDPA, sdpa_routed_to
from .replacement import TESdpa

__all__ = ["TE_MODULE_ATTR", "TEForward", "not_injected_reason", "inject_module", "scope_mask_decisions", "remove"]

logger = logging.getLogger("te_fx")

TE_MODULE_ATTR = "attn_module"
_SCOPE_PARENT = "_te_fx_mask_scope_parent"  # the scoped module whose forward calls this one, in the module's __dict__


_COMPILE_WARNING = (
    "te_fx: torch.compile / torch.export traces injected attention modules as plain SDPA (the injection steps aside "
    'while Dynamo traces or torch.export runs); compile with backend="te_attn" to have te_fx rewrite those calls '
    "to TE attention: with any other backend they run torch's SDPA"
)
_compile_warned = False


def _stepping_aside() -> bool:
    """Whether injected modules leave their forward as it is: while Dynamo traces this thread's code
    (torch.compile, strict torch.export) or non-strict torch.export traces it with fake tensors. Not
    ``torch.compiler.is_compiling()`` nor ``is_exporting()`` alone, which hold in every thread while any thread
    compiles or exports."""
    if torch.compiler.is_dynamo_compiling():
        return True
    return torch.compiler.is_exporting() and detect_fake_mode() is not None


@torch.compiler.assume_constant_result
def _warn_compiled_once() -> bool:
    """Log once per process that traced graphs get plain SDPA. Under Dynamo this runs at trace time (its result is
    a constant), so the graph has no break for it."""
    global _compile_warned
    if not _compile_warned:
        _compile_warned = True
        logger.warning(_COMPILE_WARNING)
    return True


class TEForward:
    """``module.forward`` after injection: the module's own forward with this thread's SDPA calls routed to
    ``te_sdpa``. Under torch.compile or torch.export it steps aside (:func:`_stepping_aside`; the graph gets plain
    SDPA, which ``backend="te_attn"`` rewrites) and says so once. Holds the module rather than a bound method, so
    deep copies and pickles of the model stay consistent."""

    def __init__(self, module: nn.Module, te_sdpa: Callable) -> None:
        self.module = module
        self.te_sdpa = te_sdpa
        self.inner = vars(module).get("forward")  # a forward someone installed before us, else the class's

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _stepping_aside():
            _warn_compiled_once()
            return self._forward(*args, **kwargs)
        with sdpa_routed_to(self.te_sdpa):
            return self._forward(*args, **kwargs)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)  # not __get__: Dynamo < 2.13 cannot trace it


def _refuse_replication() -> nn.Module:
    raise RuntimeError(
        "te_fx: nn.DataParallel cannot replicate a module with te_fx attention (each replica would run the original "
        "module's forward); use DistributedDataParallel (torchrun), or te_fx.remove_te_attention(model) first"
    )


def patch_forward(module: nn.Module, te_sdpa: Callable) -> None:
    """Shadow ``module.forward`` with a :class:`TEForward`. nn.DataParallel's replicas would share that forward,
    bound to this module: replicating it raises instead."""
    module.forward = TEForward(module, te_sdpa)
    module._replicate_for_data_parallel = _refuse_replication


def _drop_te_module_keys(_module: nn.Module, state_dict: dict, prefix: str, _metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(f"{prefix}{TE_MODULE_ATTR}.")]:
        del state_dict[key]


def _forgive_missing_te_module_keys(_module: nn.Module, incompatible: Any) -> None:
    marker = f".{TE_MODULE_ATTR}."
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if marker not in f".{k}"]


def _hide_from_state_dict(module: nn.Module) -> None:
    """Keep ``attn_module`` (a child, so it follows .train()/.eval()/.to()) out of checkpoints."""
    module.register_state_dict_post_hook(_drop_te_module_keys)
    module.register_load_state_dict_post_hook(_forgive_missing_te_module_keys)


def not_injected_reason(path: str, module: nn.Module) -> str | None:
    """Why the model walk leaves this module alone (None: it is an attention module to inject)."""
    fused = params.fused_qkv_name(module)
    if fused is not None:  # GPT-NeoX `.attention`, Falcon `.self_attention`, Phi3 `.self_attn`
        return f"fused q/k/v projection {fused!r}: te_fx needs separate q_proj / k_proj / v_proj"
    if path.rsplit(".", 1)[-1] != "self_attn":
        return f"te_fx injects into modules named 'self_attn' only (this one is {path.rsplit('.', 1)[-1]!r})"
    return module_reason(module)


def module_reason(module: nn.Module) -> str | None:
    """Why this attention module cannot be injected (None: it can)."""
    if hasattr(module, TE_MODULE_ATTR):
        return f"it already has an {TE_MODULE_ATTR!r}"
    if params.infer_attn_params(module) is None:
        return "head counts and projection widths do not give a separate q/k/v layout te_fx understands"
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if isinstance(implementation, str) and implementation != "sdpa":
        return f"attn_implementation={implementation!r} does not call SDPA"
    return None


def inject_module(module: nn.Module, make_attn_module: Callable[[dict], Any]) -> str | None:
    """Inject into one attention module; returns None, or why it was not injected (also logged). The attention
    module comes from ``make_attn_module(params)`` (see :func:`te_fx.eager.params.infer_attn_params`)."""
    reason = module_reason(module)
    if reason is not None:
        return reason
    attn = params.infer_attn_params(module)
    te_module = make_attn_module(attn)
    if isinstance(te_module, nn.Module):
        te_module.train(module.training)
    setattr(module, TE_MODULE_ATTR, te_module)
    _hide_from_state_dict(module)
    te_sdpa = TESdpa(te_module, attn["num_heads"], attn["num_kv_heads"], SDPA, attn["softmax_scale"])
    patch_forward(module, te_sdpa)
    return None


def _enter_mask_scope(module: nn.Module, _args: tuple) -> None:
    if _stepping_aside():  # no decisions to cache, and Dynamo would break the graph on the cache's lock
        return
    masks.enter_forward(module, vars(module).get(_SCOPE_PARENT))


def _leave_mask_scope(module: nn.Module, _args: tuple, _output: Any) -> None:
    if _stepping_aside():
        return
    masks.leave_forward(module)


def _prefixes(name: str) -> list[str]:
    """The module paths above ``name``, nearest first ("" is the root)."""
    parts = name.split(".") if name else []
    return [".".join(parts[:depth]) for depth in range(len(parts) - 1, -1, -1)]


def scope_mask_decisions(root: nn.Module, paths: list[str]) -> None:
    """Cache mask decisions while a forward runs in ``root``, in the modules above all the attention modules at
    ``paths`` (the decoder) and in the modules holding one (the decoder layers, which may be called on their own);
    see :func:`te_fx.core.masks.enter_forward`. Containers without a forward (ModuleList) are skipped."""
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


def remove(model: nn.Module) -> None:
    """Restore each injected module's own forward (or the one installed before injection), drop ``attn_module``
    and the mask-scope hooks."""
    for module in model.modules():
        forward = vars(module).get("forward")
        if hasattr(module, TE_MODULE_ATTR) and isinstance(forward, TEForward):
            del module.forward, module._replicate_for_data_parallel
            if forward.inner is not None:  # a forward installed before injection (accelerate hooks, wrappers)
                module.forward = forward.inner
            delattr(module, TE_MODULE_ATTR)
        for hooks, hook in ((module._forward_pre_hooks, _enter_mask_scope), (module._forward_hooks, _leave_mask_scope)):
            for key in [key for key, value in hooks.items() if value is hook]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
        vars(module).pop(_SCOPE_PARENT, None)
