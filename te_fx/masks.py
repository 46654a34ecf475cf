"""Mask classification: which SDPA masks are exactly a TE mask type.

TE takes a mask *type* (``causal``, ``causal_bottom_right``, ``no_mask``) and a window, not a tensor. A 4D SDPA mask
may be handed to TE only if it equals the pattern of that type at every batch item, head, query and key, so the
check here is exact: no sampling, no heuristics. HF passes the same mask object to every layer, so the decision is
cached per mask object (one host sync per mask, not per layer), for one forward of an injected model at most.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import torch

__all__ = [
    "MaskDecision",
    "causal_pattern",
    "te_visible",
    "classify_mask",
    "attend_pattern",
    "cached_decisions",
    "enter_forward",
    "leave_forward",
]


class MaskDecision(NamedTuple):
    """A TE mask type and window that reproduce an SDPA mask exactly."""

    mask_type: str
    window_size: tuple[int, int]


NO_MASK = MaskDecision("no_mask", (-1, -1))


def causal_pattern(q_len: int, kv_len: int, window_left: int = -1, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool (q_len, kv_len), True = attend: causal aligned to the bottom-right corner (query i sits at key position
    kv_len - q_len + i), optionally limited to ``window_left`` keys before the diagonal. This is HF's causal and
    sliding-window mask (sliding window w is window_left = w - 1) and TE's ``causal_bottom_right``."""
    rows = torch.arange(q_len, device=device).unsqueeze(1)
    return _causal_at(rows, torch.arange(kv_len, device=device).unsqueeze(0), q_len, kv_len, window_left)


def _causal_at(
    rows: torch.Tensor | int, cols: torch.Tensor | int, q_len: int, kv_len: int, window_left: int
) -> torch.Tensor:
    """:func:`causal_pattern` at the (broadcast) query indices ``rows`` and key indices ``cols``."""
    diagonal = rows + (kv_len - q_len)
    visible = cols <= diagonal
    if window_left >= 0:
        visible &= cols >= diagonal - window_left
    return visible


def _causal_edges(q_len: int, kv_len: int, window_left: int, device: torch.device) -> torch.Tensor:
    """The first row of :func:`causal_pattern` followed by the rest of its first column."""
    first_row = _causal_at(0, torch.arange(kv_len, device=device), q_len, kv_len, window_left)
    first_column = _causal_at(torch.arange(1, q_len, device=device), 0, q_len, kv_len, window_left)
    return torch.cat([first_row, first_column])


def te_visible(
    mask_type: str,
    window_size: tuple[int, int],
    q_len: int,
    kv_len: int,
    seqlens_q: torch.Tensor | None = None,
    seqlens_kv: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool (B or 1, 1, q_len, kv_len), True = attend: what TE's fused attention computes for a mask type and window
    (bshd format; ``padding*`` types use per-sequence lengths, padding at the end of each row)."""
    padded = mask_type.startswith("padding")
    if padded:
        sq = seqlens_q.to(device=device, dtype=torch.long).view(-1, 1, 1, 1)
        skv = seqlens_kv.to(device=device, dtype=torch.long).view(-1, 1, 1, 1)
    else:
        sq = torch.tensor(q_len, device=device).view(1, 1, 1, 1)
        skv = torch.tensor(kv_len, device=device).view(1, 1, 1, 1)
    rows = torch.arange(q_len, device=device).view(1, 1, -1, 1)
    cols = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    bottom_right = mask_type.endswith("bottom_right")
    diag = rows + (skv - sq) if bottom_right else rows
    left, right = window_size
    visible = torch.ones_like(rows + cols, dtype=torch.bool)
    if "causal" in mask_type:
        right = 0
    if right >= 0:
        visible = visible & (cols <= diag + right)
    if left >= 0:
        visible = visible & (cols >= diag - left)
    if padded:
        visible = visible & (rows < sq) & (cols < skv)
    return visible


def attend_pattern(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(attend, well_formed) for an SDPA mask: bool masks are True = attend; float masks are additive, and an entry
    counts as masked only if it is -inf or at most half the dtype's lowest value (what HF writes: ``finfo.min``),
    since any finite penalty leaves the key a nonzero weight. ``well_formed`` is False if any entry is neither 0 nor
    such a penalty; such a mask is never converted."""
    if mask.dtype == torch.bool:
        return mask, torch.ones((), dtype=torch.bool, device=mask.device)
    attend = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    return attend, (attend | blocked).all()


def _dedupe_broadcast(mask: torch.Tensor) -> torch.Tensor:
    """Index 0 of every expanded (stride 0) dim: HF's masks are often ``expand``-ed over the batch."""
    index = tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None) for size, stride in zip(mask.shape, mask.stride()))
    return mask[index]


def _classify(mask: torch.Tensor, q_len: int, kv_len: int, window_left: int) -> MaskDecision | None:
    attend, well_formed = attend_pattern(_dedupe_broadcast(mask))
    candidates = [NO_MASK]
    if 0 < q_len <= kv_len:  # with more queries than keys some rows see nothing: SDPA and TE disagree there
        causal_type = "causal" if q_len == kv_len else "causal_bottom_right"
        candidates.append(MaskDecision(causal_type, (-1, 0)))
        if 0 <= window_left < kv_len - 1:
            candidates.append(MaskDecision(causal_type, (window_left, 0)))
    if len(candidates) == 1:
        checks = [well_formed, attend.all()]
    else:
        # every candidate depends on key - query only (it is constant along diagonals), so the mask equals one
        # exactly when it is constant along diagonals too and agrees with it on the first row and column: one
        # pass over the mask for all candidates
        attend = attend.expand(*attend.shape[:-2], q_len, kv_len)
        edges = torch.cat([attend[..., 0, :], attend[..., 1:, 0]], dim=-1)
        checks = [well_formed & (attend[..., 1:, 1:] == attend[..., :-1, :-1]).all(), edges.all()]
        for candidate in candidates[1:]:
            checks.append((edges == _causal_edges(q_len, kv_len, candidate.window_size[0], mask.device)).all())
    results = torch.stack(checks).tolist()  # the one host sync for this mask
    if not results[0]:
        return None
    return next((c for c, matched in zip(candidates, results[1:]) if matched), None)


class _MaskCache:
    """Decisions per live mask object, invalidated by in-place writes (``_version``) and freed with the mask."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple, tuple[weakref.ref, int, MaskDecision | None]] = {}

    def lookup(self, mask: torch.Tensor, key: tuple) -> tuple[bool, MaskDecision | None]:
        with self._lock:
            entry = self._entries.get((id(mask),) + key)
        if entry is not None and entry[0]() is mask and entry[1] == mask._version:
            return True, entry[2]
        return False, None

    def store(self, mask: torch.Tensor, key: tuple, decision: MaskDecision | None) -> None:
        full_key = (id(mask),) + key

        def _drop(_ref: weakref.ref, entries: dict = self._entries, lock: threading.Lock = self._lock) -> None:
            with lock:
                entries.pop(full_key, None)

        with self._lock:
            self._entries[full_key] = (weakref.ref(mask, _drop), mask._version, decision)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_CACHE = _MaskCache()


_SCOPE = threading.local()  # this thread's stack of running forwards that cache decisions (weak references)


def _scope_stack() -> list[weakref.ref]:
    if not hasattr(_SCOPE, "stack"):
        _SCOPE.stack = []
    return _SCOPE.stack


def enter_forward(owner: object, parent: object | None = None) -> None:
    """``owner``'s forward starts; ``parent`` is the scoped module that calls it (None: none does). Decisions are
    cached until the outermost forward ends, and each outermost forward starts afresh: writes through ``.data``
    or numpy bypass the version counter, so a decision lasts one forward (all its layers) at most. A forward not
    called from ``parent`` (the stack top) is outermost too, which also drops a stack that an interrupted forward
    (KeyboardInterrupt skips PyTorch's forward hooks) left behind. Outside such forwards nothing is cached."""
    stack = _scope_stack()
    if parent is None or not stack or stack[-1]() is not parent:
        stack.clear()
        _CACHE.clear()
    stack.append(weakref.ref(owner))


def leave_forward(owner: object) -> None:
    """``owner``'s forward has ended (normally or by an exception). When it was the outermost one, the decisions
    go, and with them the weak references that would keep ``torch.utils.swap_tensors`` off the masks."""
    stack = _scope_stack()
    for depth in range(len(stack) - 1, -1, -1):
        if stack[depth]() is owner:
            del stack[depth:]
            if not stack:
                _CACHE.clear()
            return


@contextlib.contextmanager
def cached_decisions() -> Iterator[None]:
    """Decisions are cached inside this block, as inside an injected model's forward."""
    owner = _ScopeOwner()
    enter_forward(owner)
    try:
        yield
    finally:
        leave_forward(owner)


class _ScopeOwner:
    """A weak-referenceable owner for :func:`cached_decisions`."""


def classify_mask(
    mask: torch.Tensor, batch: int, num_heads: int, q_len: int, kv_len: int, window_left: int = -1
) -> MaskDecision | None:
    """The TE mask type and window that reproduce ``mask`` exactly for queries (batch, num_heads, q_len) against
    kv_len keys, or None when there is none (padding, packed documents, arbitrary patterns, malformed values).

    Candidates are: all keys visible (``no_mask``), causal, and causal with the layer's window ``window_left``
    (TE's left window, sliding_window - 1). Causal is aligned bottom-right, as HF builds it for KV caches.
    """
    if mask.dim() > 4 or mask.dtype not in (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return None
    try:
        if torch.broadcast_shapes(mask.shape, (batch, num_heads, q_len, kv_len)) != (batch, num_heads, q_len, kv_len):
            return None
    except RuntimeError:
        return None
    if mask.is_inference() or not _scope_stack():  # inference tensors have no version counter
        return _classify(mask, q_len, kv_len, window_left)
    key = (tuple(mask.shape), mask.data_ptr(), q_len, kv_len, window_left)
    hit, decision = _CACHE.lookup(mask, key)
    if not hit:
        decision = _classify(mask, q_len, kv_len, window_left)
        _CACHE.store(mask, key, decision)
    return decision
