"""te_fx: TransformerEngine fused attention for HuggingFace causal LMs: as a transformers attention backend
(``attn_implementation="te"``), injected into a model (``inject_te_attention``), and under
``torch.compile(model, backend="te_attn")``."""

from __future__ import annotations

import logging

from .compile.backend import compile_report, register, reset_compile_report
from .executors import TEUnavailableError
from .hf_interface import register as register_attention_backend
from .te_attention import (
    get_te_attention_stats,
    inject_te_attention,
    inject_te_attention_into_module,
    remove_te_attention,
    reset_te_attention_stats,
)

__version__ = "0.1.0"
__all__ = [
    "TEUnavailableError",
    "compile_report",
    "reset_compile_report",
    "get_te_attention_stats",
    "inject_te_attention",
    "inject_te_attention_into_module",
    "remove_te_attention",
    "reset_te_attention_stats",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
register()
register_attention_backend()
