"""The mask function of the "te" attention backend: HF's mask structure, passed on without building the mask.

transformers calls a backend's mask function (``AttentionMaskInterface``) once per forward and mask type with a
description of the mask: a mask function (causal, sliding window, packed documents, or a custom overlay), the 2D
padding mask and where the queries and keys sit. Where TE can run the attention, :func:`te_mask` returns

* None: no padding (the layer's causal or sliding pattern, as its attention function is told);
* the (B, kv_len) keep mask: key padding. Outside torch.compile only padding before the first or after the last
  kept token of each row (so that sliding windows stay exact), and as uint8 instead of bool when every row keeps
  its first keys and at least one (right padding: TE runs the rows as they are);
* (N + 1,) int32 document boundaries over the B * S tokens: packed documents (outside torch.compile: HF's packed
  mask function is recognised by its closure, which a compiled graph cannot read);

and HF's own SDPA mask for anything else (a custom overlay, a chunked or bidirectional pattern, queries that do not
end at the last key as in a static cache, packed documents under torch.compile), on which the attention function
runs HF's SDPA. Outside torch.compile the values above cost one host sync per call; under it, none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import masking_utils

from ..core.masks import padding_layout

__all__ = ["te_mask"]

_AND = masking_utils.and_masks(masking_utils.causal_mask_function).__code__
_SLIDING = masking_utils.sliding_window_overlay(1).__code__
_PACKED = masking_utils.packed_sequence_mask_function(None).__code__
# transformers >= 5.2x remaps the base pattern to the packed positions first; older versions AND it as it is
_REMAP = getattr(masking_utils, "remap_positions_for_packed_sequence", None)
_REMAP = _REMAP(masking_utils.causal_mask_function, None).__code__ if _REMAP else None


def _closure(fn: Callable) -> dict[str, Any]:
    code = getattr(fn, "__code__", None)
    if code is None or fn.__closure__ is None:
        return {}
    return dict(zip(code.co_freevars, (cell.cell_contents for cell in fn.__closure__)))


def _is(fn: Callable, code: Any) -> bool:
    return code is not None and getattr(fn, "__code__", None) is code


def _is_plain(fn: Callable, allow_is_causal_skip: bool, local_size: Any, config: Any) -> bool:
    """Whether ``fn`` is HF's causal or sliding-window causal mask function, by HF's own contract: its mask
    creators allow the causal skip only for their base function, never with an overlay, packing or blocks on top,
    and pass ``local_size`` with the sliding one (and with the chunked one, which ``attention_chunk_size`` tells
    apart). Reads no closure, so torch.compile traces it."""
    if fn is masking_utils.causal_mask_function:
        return True
    sliding = _is(fn, _AND) and isinstance(local_size, int)
    return sliding and allow_is_causal_skip and getattr(config, "attention_chunk_size", None) is None


def _is_plain_by_closure(fn: Callable) -> bool:
    """Whether ``fn`` is HF's causal or sliding-window causal mask function, read off its closure (eager only)."""
    if fn is masking_utils.causal_mask_function:
        return True
    parts = _closure(fn).get("mask_functions", ()) if _is(fn, _AND) else ()
    return len(parts) == 2 and parts[1] is masking_utils.causal_mask_function and _is(parts[0], _SLIDING)


def _packed_ids(fn: Callable) -> torch.Tensor | None:
    """The document ids of HF's packed mask function over a causal or sliding base (eager only: reads closures)."""
    parts = _closure(fn).get("mask_functions", ()) if _is(fn, _AND) else ()
    if len(parts) != 2 or not _is(parts[1], _PACKED):
        return None
    base = _closure(parts[0]).get("mask_function") if _is(parts[0], _REMAP) else parts[0]
    ids = _closure(parts[1]).get("packed_sequence_mask")
    plain = base is not None and _is_plain_by_closure(base)
    return ids if plain and isinstance(ids, torch.Tensor) else None


def _boundaries(ids: torch.Tensor) -> torch.Tensor:
    """(N + 1,) int32 document boundaries over the flattened (B, S) tokens of document ids; one host sync."""
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    flat = starts.flatten()
    indices = torch.nonzero_static(flat, size=int(flat.sum()))
    end = torch.full((1,), flat.numel(), device=flat.device)
    return torch.cat([indices.flatten(), end]).to(torch.int32)


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
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' mask interface for "te" (see the module docstring for what it returns)."""

    def hf_mask() -> torch.Tensor:
        return masking_utils.sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
            allow_is_causal_skip=False, **kwargs,
        )  # fmt: skip

    tracing = torch.compiler.is_compiling()
    # a static cache's queries sit before its end: its unwritten keys need the mask
    queries_end_at_last_key = isinstance(q_offset, int) and q_offset + q_length == kv_offset + kv_length
    plain = _is_plain(mask_function, allow_is_causal_skip, local_size, kwargs.get("config"))
    ids = None if plain or tracing or attention_mask is not None else _packed_ids(mask_function)
    if not queries_end_at_last_key or not (plain or ids is not None):
        return hf_mask()
    if ids is not None:
        return _boundaries(ids.expand(batch_size, -1))
    keep = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if keep is None:
        return None
    keep = keep[:, kv_offset : kv_offset + kv_length]
    if tracing:
        return keep
    all_kept, outer, kept_first = padding_layout(keep).tolist()
    if all_kept:
        return None
    if kept_first:
        return keep.to(torch.uint8)
    return keep if outer else hf_mask()
