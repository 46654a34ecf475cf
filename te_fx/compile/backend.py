"""The ``te_attn`` torch.compile backend: te_fx's FX pass, then an inner compiler (Inductor by default).

    torch.compile(model, backend="te_attn", options={"executor": "te", "inner": "inductor"})

``executor``: "te" (default, or ``$TE_FX_EXECUTOR``) or "reference"; ``inner``: "inductor" (default), "aot_eager" or
"eager". :func:`compile_report` lists what the pass decided for every SDPA node compiled since
:func:`reset_compile_report`; the same goes to the ``te_fx`` logger at INFO.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from ..core.reasons import reason_text
from ..executors import resolve_executor
from .fx_pass import rewrite_attention

__all__ = ["compile_report", "entry_text", "register", "reset_compile_report", "te_attn"]

logger = logging.getLogger(__name__)

BACKEND_NAME = "te_attn"
INNER_COMPILERS = ("inductor", "aot_eager", "eager")
_REPORT: list[dict[str, Any]] = []
_REPORT_LOCK = threading.Lock()


def compile_report() -> list[dict[str, Any]]:
    """One dict per SDPA node compiled by ``te_attn`` since the last reset: ``decision`` ("te" or "sdpa"),
    ``reason`` ("rewritten", or for "sdpa" a key of :data:`te_fx.core.reasons.REASONS`), ``detail`` (what exactly),
    ``mask_kind``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``window_size``, ``executor``."""
    with _REPORT_LOCK:
        return [dict(entry) for entry in _REPORT]


def reset_compile_report() -> None:
    """Forget the entries of earlier compilations."""
    with _REPORT_LOCK:
        _REPORT.clear()


def entry_text(entry: dict[str, Any]) -> str:
    """A report entry's decision in words: ``te (rewritten), causal window (-1, 0)`` or ``sdpa (fallback_mask: what
    exactly)``."""
    if entry["decision"] == "te":
        return f"te ({entry['reason']}), {entry['mask_kind']} window {entry['window_size']}"
    return f"sdpa ({reason_text(entry['reason'], entry['detail'])})"


def te_attn(
    gm: fx.GraphModule, example_inputs: list, options: dict[str, Any] | None = None, mode: str | None = None
) -> Callable:
    """Dynamo backend: rewrite safe SDPA nodes into te_fx's attention op, then hand the graph to the inner
    compiler. Options other than ``executor`` and ``inner``, and ``mode``, go to Inductor as config patches."""
    options = dict(options or {})
    executor = resolve_executor(options.pop("executor", None))
    inner = options.pop("inner", "inductor")
    if inner not in INNER_COMPILERS:
        raise ValueError(f"te_attn option 'inner' must be one of {INNER_COMPILERS}, got {inner!r}")
    if inner != "inductor" and (options or mode):
        raise ValueError(f"te_attn: options {sorted(options)} and mode {mode!r} need inner='inductor' "
                         "(te_attn's own options are 'executor' and 'inner')")  # fmt: skip
    from torch._inductor import config as inductor_config

    unknown = [name for name in options if not hasattr(inductor_config, name)]
    if unknown:
        raise ValueError(f"te_attn: unknown option(s) {unknown}: te_attn takes 'executor' and 'inner', and passes "
                         "the others to Inductor, which has no such config")  # fmt: skip
    entries = rewrite_attention(gm, executor)
    with _REPORT_LOCK:
        _REPORT.extend(entries)
    for entry in entries:
        logger.info("te_attn: %s -> %s", entry["node"], entry_text(entry))
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = {**(list_mode_options(mode) if mode else {}), **options}
    return compile_fx(gm, example_inputs, config_patches=patches or None)


def register() -> None:
    """Make ``backend="te_attn"`` resolve. Installed packages get it through the ``torch_dynamo_backends`` entry
    point, which torch loads on lookup; registering here as well would collide with it, so this only registers
    when the entry point is absent (a source checkout on ``sys.path``)."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    if BACKEND_NAME in registry._COMPILER_FNS or entry_points(group="torch_dynamo_backends", name=BACKEND_NAME):
        return
    registry.register_backend(te_attn, name=BACKEND_NAME)
