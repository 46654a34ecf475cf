"""The mask function of the "te" attention backend: HF's mask structure, passed on without building the mask.

transformers calls a backend's mask function (``AttentionMaskInterface``) once per forward and mask type with a
description of the mask: a mask function (causal, sliding window, packed documents, or a custom overlay), the 2D
padding mask and where the queries and keys sit. Where TE can run the attention exactly, :func:`te_mask` passes on
what the attention function needs in one small tensor, :func:`read_mask` reads it back, and the mask's pattern
(causal, and its window) wins over the layer's own arguments, as it does in HF's SDPA:

* (B or 1, W, kv_len), W = window_left + 2: the keep mask of each row's keys, repeated (a stride-0 view) W times
  so that its size carries the window; int8 for no padding, and for key padding uint8 when every row keeps its
  first keys and at least one (right padding), int16 for padding before the first or after the last kept token
  (both checked, outside torch.compile), bool for a layout nobody checked (under torch.compile: te_fx's op reads it
  at run time);
* (W, N + 1) int32: the boundaries of packed documents over the B * S tokens (outside torch.compile: HF's packed
  mask function is recognised by its closure, which a compiled graph cannot read).

Anything else gets HF's own SDPA mask (a custom overlay, a chunked or bidirectional pattern, queries that do not
end at the last key as in a static cache, packed documents under torch.compile, and whatever a caller asks to see
materialized). Outside torch.compile the values above cost one host sync per call; under it, none in inference
and, in training with a padding mask, one per mask kind and forward (te_fx's op reading the layout).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import masking_utils

from ..core.masks import document_boundaries, padding_layout
from ..core.plan import PaddingLayout

__all__ = ["MaskInfo", "read_mask", "te_mask"]

_AND = masking_utils.and_masks(masking_utils.causal_mask_function).__code__
_PACKED = masking_utils.packed_sequence_mask_function(None).__code__
# transformers >= 5.2x remaps the base pattern to the packed positions first; older versions AND it as it is
_REMAP = getattr(masking_utils, "remap_positions_for_packed_sequence", None)
_REMAP = _REMAP(masking_utils.causal_mask_function, None).__code__ if _REMAP else None


@dataclass(frozen=True)
class MaskInfo:
    """What :func:`te_mask` passed on: the mask's left window (-1: full causal) and at most one of key padding
    (``keep``, with its ``layout`` where te_mask checked it) and packed documents (``cu_seqlens``)."""

    window_left: int
    keep: torch.Tensor | None = None
    layout: PaddingLayout | None = None
    cu_seqlens: torch.Tensor | None = None


# the key padding layout a descriptor's dtype says te_mask checked (int8: no padding; bool: unchecked)
_LAYOUTS: dict[torch.dtype, PaddingLayout | None] = {
    torch.int8: None,
    torch.uint8: (False, True, True),
    torch.int16: (False, True, False),
    torch.bool: None,
}


def read_mask(mask: Any) -> MaskInfo | None:
    """The :class:`MaskInfo` of a mask :func:`te_mask` passed on, else None (no mask, or HF's own)."""
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 3 and mask.dtype in _LAYOUTS:
        if mask.dtype == torch.int8:
            return MaskInfo(mask.shape[1] - 2)
        return MaskInfo(mask.shape[1] - 2, mask[:, 0], _LAYOUTS[mask.dtype])
    if mask.dim() == 2 and mask.dtype == torch.int32:
        return MaskInfo(mask.shape[0] - 2, cu_seqlens=mask[0])
    return None


def _window(fn: Callable, local_size: Any) -> int | None:
    """TE's left window of HF's causal (-1) or sliding-window causal (``local_size`` - 1) mask function, else None.
    Read by HF's contract, not the closure (which a compiled graph cannot read): its mask creators pass
    ``local_size`` with the sliding one, and put no overlay on either where they allow the causal skip or leave
    ``use_vmap`` off (the caller checks which)."""
    if fn is masking_utils.causal_mask_function:
        return -1
    sliding = getattr(fn, "__code__", None) is _AND and isinstance(local_size, int) and local_size > 0
    return local_size - 1 if sliding else None


def _closure(fn: Callable) -> dict[str, Any]:
    code = getattr(fn, "__code__", None)
    if code is None or fn.__closure__ is None:
        return {}
    return dict(zip(code.co_freevars, (cell.cell_contents for cell in fn.__closure__)))


def _packed(fn: Callable, local_size: Any) -> tuple[int, torch.Tensor] | None:
    """(left window, document ids (B, S)) of HF's packed mask function over its causal or sliding base (eager
    only: reads closures)."""
    parts = _closure(fn).get("mask_functions", ()) if getattr(fn, "__code__", None) is _AND else ()
    if len(parts) != 2 or getattr(parts[1], "__code__", None) is not _PACKED:
        return None
    base = _closure(parts[0]).get("mask_function") if getattr(parts[0], "__code__", None) is _REMAP else parts[0]
    window = None if base is None else _window(base, local_size)
    ids = _closure(parts[1]).get("packed_sequence_mask")
    return None if window is None or not isinstance(ids, torch.Tensor) else (window, ids)


@torch.compiler.assume_constant_result  # a graph takes the answer for its config class, as eager code does
@functools.cache
def _outside_attention_interface(config_class: type) -> str | None:
    """The model class of ``config_class`` when transformers knows it and its attention does not go through
    ``AttentionInterface`` (its own code would take te_mask's values for a mask), else None. A class that does not
    declare it but whose modeling module looks its attention up there counts as inside (Falcon in transformers
    5.25)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    for mapping in (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING):
        try:
            model_class = mapping[config_class]
        except KeyError:
            continue
        looks_up = hasattr(sys.modules.get(model_class.__module__), "ALL_ATTENTION_FUNCTIONS")
        return None if model_class.is_backend_compatible() or looks_up else model_class.__name__
    return None


def _boundaries(ids: torch.Tensor) -> torch.Tensor:
    """Document boundaries over the flattened (B, S) tokens of document ids (one host sync)."""
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return document_boundaries(starts, int(starts.sum()))


def te_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = masking_utils.causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    allow_is_causal_skip: bool = True,
    local_size: int | None = None,
    use_vmap: bool = False,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' mask interface for "te" (see the module docstring for what it returns)."""

    def hf_mask() -> torch.Tensor:
        return masking_utils.sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
            allow_is_causal_skip=False, use_vmap=use_vmap, **kwargs,
        )  # fmt: skip

    config = kwargs.get("config")
    outside = _outside_attention_interface(type(config)) if config is not None else None
    if outside is not None:
        raise ValueError(
            f'attn_implementation="te" needs a model whose attention goes through transformers\' AttentionInterface; '
            f"{outside} runs its own attention code. Load it with the attention transformers gives it by default (no "
            "attn_implementation); te_fx.inject_te_attention takes its SDPA calls where it makes any"
        )
    if read_mask(attention_mask) is not None:  # passed on before, as generate() does for the steps it prepares
        return attention_mask
    tracing = torch.compiler.is_compiling()
    chunked = getattr(config, "attention_chunk_size", None) is not None
    # a static cache's queries sit before its end: its unwritten keys need the mask
    queries_end_at_last_key = isinstance(q_offset, int) and q_offset + q_length == kv_offset + kv_length
    if chunked or use_vmap or not queries_end_at_last_key:
        return hf_mask()
    window = _window(mask_function, local_size) if allow_is_causal_skip else None
    packed = None if window is not None or tracing or attention_mask is not None else _packed(mask_function, local_size)
    if packed is not None:
        return _boundaries(packed[1].expand(batch_size, -1))[None].expand(packed[0] + 2, -1)
    if window is None:
        return hf_mask()
    width = window + 2
    keep = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if keep is None:
        return torch.ones((), dtype=torch.int8, device=kwargs.get("device")).expand(1, width, kv_length)
    keep = keep[:, kv_offset : kv_offset + kv_length]
    if not tracing:
        all_kept, outer, kept_first = padding_layout(keep).tolist()
        if all_kept:
            return torch.ones((), dtype=torch.int8, device=keep.device).expand(1, width, kv_length)
        if not outer:
            return hf_mask()
        keep = keep.to(torch.uint8 if kept_first else torch.int16)
    return keep[:, None, :].expand(-1, width, -1)
