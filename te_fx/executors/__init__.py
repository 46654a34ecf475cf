"""Executors: what runs the attention. "te" is TransformerEngine's fused attention (CUDA, fp16/bf16); "reference"
is the same call contract in plain PyTorch (any device and dtype), used on machines without a GPU and as the oracle.
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["EXECUTORS", "TEUnavailableError", "resolve_executor", "load_te_executor", "te_head_dims_supported"]

EXECUTORS = ("te", "reference")
ENV_EXECUTOR = "TE_FX_EXECUTOR"


def te_head_dims_supported(head_dim_qk: int, head_dim_v: int) -> bool:
    """TE's F16 fused attention on sm90: head dims that are multiples of 8 and at most 256 (known without TE)."""
    return head_dim_qk % 8 == 0 and head_dim_v % 8 == 0 and max(head_dim_qk, head_dim_v) <= 256


class TEUnavailableError(ImportError):
    """TransformerEngine cannot be imported; the message says what to install instead."""


def resolve_executor(executor: str | None) -> str:
    """The executor name: the argument, else ``$TE_FX_EXECUTOR``, else "te"."""
    name = executor or os.environ.get(ENV_EXECUTOR) or "te"
    if name not in EXECUTORS:
        raise ValueError(f"unknown te_fx executor {name!r}; choose one of {EXECUTORS}")
    return name


def load_te_executor() -> ModuleType:
    """The TE executor module, or a :class:`TEUnavailableError` that says how to get TransformerEngine."""
    try:
        from . import te
    except ImportError as error:  # TE missing, or its CUDA extension failed to load
        raise TEUnavailableError(
            f"te_fx's 'te' executor needs TransformerEngine with PyTorch support, which failed to import ({error}). "
            "Install it with `pip install 'te-fx[te]'` (needs CUDA), or pass executor='reference' "
            f"(or set {ENV_EXECUTOR}=reference) to run the pure-PyTorch reference executor."
        ) from error
    return te
