"""The eager matcher: the plan (:class:`te_fx.core.plan.AttentionPlan`) that reproduces an SDPA mask exactly.

TE takes a mask *type* (``causal``, ``causal_bottom_right``, ``no_mask``), a window and per-row lengths or document
boundaries, not a tensor. A 4D SDPA mask may be handed to TE only if it equals the plan's pattern at every batch
item, head, query and key, so the check here is exact: no sampling, no heuristics. HF passes the same mask object
to every layer, so the decision is cached per mask object (one host sync per mask, not per layer), for one forward
of an injected model at most.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import torch

from .plan import NO_MASK, AttentionPlan

__all__ = [
    "causal_pattern",
    "in_window",
    "te_visible",
    "plan_mask",
    "documents",
    "padding_layout",
    "document_boundaries",
    "classify_mask",
    "attend_pattern",
    "cached_decisions",
    "enter_forward",
    "leave_forward",
]


def causal_pattern(
    q_len: int, kv_len: int, window_left: int | torch.Tensor = -1, device: torch.device | str | None = None
) -> torch.Tensor:
    """Bool (q_len, kv_len), True = attend: causal aligned to the bottom-right corner (query i sits at key position
    kv_len - q_len + i), optionally limited to ``window_left`` keys before the diagonal (negative: no limit; an int
    or a 0-dim tensor). This is HF's causal and sliding-window mask (sliding window w is window_left = w - 1) and
    TE's ``causal_bottom_right``."""
    diagonal = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    return in_window(diagonal, torch.arange(kv_len, device=device).unsqueeze(0), "causal", (window_left, 0))


def in_window(
    diagonal: torch.Tensor | int, cols: torch.Tensor | int, mask_type: str, window_size: tuple[int | torch.Tensor, int]
) -> torch.Tensor:
    """Bool, broadcast over ``diagonal`` and ``cols``: key position ``cols`` lies in TE's window (left, right) around a
    query's ``diagonal`` position (negative: no limit; causal types force right = 0). ``left`` may be a 0-dim tensor
    (a window read off a mask's values): no branch reads it."""
    left, right = window_size
    if "causal" in mask_type:
        right = 0
    return ((cols <= diagonal + right) | (right < 0)) & ((cols >= diagonal - left) | (left < 0))


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
        sq = torch.full((1, 1, 1, 1), q_len, device=device)
        skv = torch.full((1, 1, 1, 1), kv_len, device=device)
    rows = torch.arange(q_len, device=device).view(1, 1, -1, 1)
    cols = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    bottom_right = mask_type.endswith("bottom_right")
    diag = rows + (skv - sq) if bottom_right else rows
    visible = in_window(diag, cols, mask_type, window_size)
    if padded:
        visible = visible & (rows < sq) & (cols < skv)
    return visible


def documents(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(document index, position in the document) of each of the B * S flattened tokens, shaped (B, S), for
    document boundaries ``cu_seqlens`` over them (empty documents are skipped)."""
    bounds = cu_seqlens.long()
    tokens = torch.arange(batch * seq_len, device=bounds.device)
    doc = torch.searchsorted(bounds, tokens, right=True) - 1
    return doc.view(batch, seq_len), (tokens - bounds[doc]).view(batch, seq_len)


def plan_mask(plan: AttentionPlan, batch: int, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Bool (B, 1, q_len, kv_len), True = attend: the SDPA mask of what ``plan`` computes (the inverse of
    :func:`classify_mask`), for a call that a way in decided from a plan and then hands back to SDPA."""
    visible = te_visible(plan.mask_type, plan.window_size, q_len, kv_len, device=device).expand(batch, 1, -1, -1)
    if plan.key_padding is not None:
        return visible & (plan.key_padding != 0)[:, None, None, :]
    if plan.cu_seqlens is not None:
        document = documents(plan.cu_seqlens, batch, q_len)[0]
        return visible & (document[:, :, None] == document[:, None, :])[:, None]
    return visible


def attend_pattern(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(attend, well_formed) for an SDPA mask: bool masks are True = attend; float masks are additive, and an entry
    counts as masked only if it is -inf or at most half the dtype's lowest value (what HF writes: ``finfo.min``),
    since any finite penalty leaves the key a nonzero weight. ``well_formed`` is False if any entry is neither 0 nor
    such a penalty, or if a query row has every key masked and some with a finite penalty; such a mask is never
    converted.

    A query row that sees no key is zero in every plan (and in TE). SDPA agrees for a bool row and an all -inf row
    (zero since PyTorch 2.5 in its math and memory-efficient backends; its cuDNN backend, the CUDA default for
    fp16 / bf16 with a mask in 2.11, gives such bool rows a nonzero output). A row of finite penalties is a softmax
    over them whose result depends on the dtype and backend: the mean of V (float32 finfo.min, math backend), the
    row's unmasked attention (fp16's -65504), or zero (bf16 on the fused backends), so no plan reproduces it."""
    if mask.dtype == torch.bool:  # a bool's byte may be any nonzero value (a numpy or frombuffer view): SDPA attends
        return mask.view(torch.uint8) != 0, torch.ones((), dtype=torch.bool, device=mask.device)
    attend = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    # in a well-formed row the largest entry is 0 (a key seen), -inf (no key, SDPA's zero) or a finite penalty
    row_max = mask.amax(-1)
    penalized_row = (row_max < 0) & (row_max > -float("inf"))
    return attend, (attend | blocked).all() & ~penalized_row.any()


def _dedupe_broadcast(mask: torch.Tensor) -> torch.Tensor:
    """Index 0 of every expanded (stride 0) dim: HF's masks are often ``expand``-ed over the batch."""
    index = tuple(
        slice(0, 1) if stride == 0 and size > 1 else slice(None) for size, stride in zip(mask.shape, mask.stride())
    )
    return mask[index]


def padding_layout(keep: torch.Tensor) -> torch.Tensor:
    """(every key kept, padding only before each row's first or after its last kept token, every row's kept keys
    first and at least one of them) of a (B, S) bool keep mask, as a (3,) bool tensor on its device (no sync)."""
    seq = keep.shape[-1]
    positions = torch.arange(seq, device=keep.device)
    kept = keep.sum(-1)
    first = torch.where(keep, positions, seq).amin(-1)
    last = torch.where(keep, positions, -1).amax(-1)
    outer = ((kept == 0) | (last - first + 1 == kept)).all()
    kept_first = ((first == 0) & (last + 1 == kept)).all()
    return torch.stack([keep.all(), outer, kept_first])


def position_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) bool: where a document starts in rows of packed documents given by their (B, S) position ids, as
    HF reads them (``find_packed_sequence_indices``): at a row's first token and wherever a position is not the one
    before it plus 1."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def document_boundaries(starts: torch.Tensor, count: int) -> torch.Tensor:
    """(count + 1,) int32 document boundaries over the flattened (B, S) tokens, from the start flags (``count`` of
    them are set: the caller's one host sync). A larger ``count`` (at most B * S) pads the boundaries with the
    end, so that the first (number of starts + 1) of them are the boundaries, found with no sync."""
    flat = starts.flatten()
    indices = torch.nonzero_static(flat, size=count, fill_value=flat.numel()).flatten()
    end = torch.full((1,), flat.numel(), device=flat.device)  # torch.tensor would copy from the host: a sync
    return torch.cat([indices, end]).to(torch.int32)


class _PatternStats(NamedTuple):
    """What three passes over a (B, H, Q, K) bool attend pattern say of it; every plan is then checked against these
    in O(B * H * (Q + K)), with no (Q, K) pattern built."""

    count: torch.Tensor  # (B, H, Q): how many keys each query sees
    first: torch.Tensor  # (B, H, Q): the first key each query sees (0 where none)
    seen: torch.Tensor  # (B, H, K): whether any query sees each key
    first_query: torch.Tensor  # (B, H, K): the first query that sees each key (0 where none)

    @staticmethod
    def of(attend: torch.Tensor) -> _PatternStats:
        as_bytes = attend.view(torch.uint8)  # argmax (the first largest entry) takes no bool
        first_query = as_bytes.argmax(-2)
        seen = attend.gather(-2, first_query.unsqueeze(-2)).squeeze(-2)
        return _PatternStats(attend.sum(-1), as_bytes.argmax(-1), seen, first_query)


def _nothing_past_diagonal(stats: _PatternStats, q_len: int, kv_len: int) -> torch.Tensor:
    """No query sees a key past its diagonal (bottom-right aligned): the first query that sees key j, and so every
    later one, sits at key position j or after it."""
    cols = torch.arange(kv_len, device=stats.seen.device)
    return (~stats.seen | (stats.first_query >= cols - (kv_len - q_len))).all()


def _reach(stats: _PatternStats, diagonal: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The mask's window, read off its values (0-dim): how far back of its diagonal any query sees a key; -1 when
    some query sees back to the first key (full causal, or a window that covers every key). Where no query reaches
    its window's edge, the window and full causal give the same pattern."""
    reach = torch.where(stats.count > 0, diagonal - stats.first, -1).amax()
    return torch.where(reach >= kv_len - 1, -1, reach)


def _window_start(diagonal: torch.Tensor, window_left: torch.Tensor) -> torch.Tensor:
    """(1, Q): the first key position of each query's causal window (0-dim ``window_left``, negative: no limit)."""
    return torch.where(window_left < 0, 0, diagonal - window_left).clamp(min=0)[None]


def _sees_exactly(
    stats: _PatternStats, start: torch.Tensor, diagonal: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Whether every query i sees exactly the keys from ``start[:, i]`` ((B or 1, Q)) to its ``diagonal[i]``, only
    the kept ones where ``keep`` ((B or 1, K) bool) is given, provided none sees a key past its diagonal
    (:func:`_nothing_past_diagonal`): it sees no key before the start, no query sees a key not kept, so what it
    sees lies in that set, and it sees as many keys as the set holds."""
    after_start = ((stats.count == 0) | (stats.first >= start[:, None])).all()
    if keep is None:
        return after_start & (stats.count == (diagonal - start + 1)[:, None]).all()
    kept_before = torch.nn.functional.pad(keep.long().cumsum(-1), (1, 0))  # [:, j]: kept keys before position j
    rows = (kept_before.shape[0], diagonal.shape[0])
    expected = kept_before.gather(-1, (diagonal + 1).expand(rows)) - kept_before.gather(-1, start.expand(rows))
    only_kept = ~(stats.seen & ~keep[:, None]).any()
    return after_start & only_kept & (stats.count == expected[:, None]).all()


def _document_begin(starts: torch.Tensor) -> torch.Tensor:
    """(B, S): the position where each token's document begins, for (B, S) bool document starts."""
    positions = torch.arange(starts.shape[-1], device=starts.device)
    return torch.where(starts, positions, 0).cummax(-1).values


def _candidates(
    attend: torch.Tensor,
    stats: _PatternStats,
    causal: torch.Tensor,
    windows: tuple,
    starts_of: list,
    diagonal: torch.Tensor,
) -> tuple[dict, dict]:
    """The checks of the per-row plans, by (kind, window index), and what their plans need: for a square mask, key
    padding (``causal & keep[b, kv]``, keep read off the diagonal, padding only before the first or after the last
    kept token of a row) and packed documents (causal within runs of tokens that a query does not see across: a
    document starts where query i does not see key i - 1); for a KV cache's queries (q_len < kv_len), key padding
    anywhere (inference runs it with a key bias), keep read as the keys that some query sees. ``starts_of``: each
    window's :func:`_window_start`."""
    q_len, kv_len = attend.shape[-2:]
    checks = {}
    if q_len < kv_len:
        keep = stats.seen[:, 0]
        for i, start in enumerate(starts_of):
            checks["cache", i] = causal & _sees_exactly(stats, start, diagonal, keep)
        return checks, {"keep": keep}
    rows = attend[:, 0]
    keep = rows.diagonal(dim1=-2, dim2=-1)
    starts = torch.ones_like(keep)
    starts[:, 1:] = ~rows.diagonal(offset=-1, dim1=-2, dim2=-1)
    _, outer, kept_first = padding_layout(keep)
    begin = _document_begin(starts)
    for i, start in enumerate(starts_of):
        checks["padding", i] = causal & outer & _sees_exactly(stats, start, diagonal, keep)
    for i, (window, start) in enumerate(zip(windows, starts_of)):
        # a window of 0 hides the sub-diagonal everywhere: no document boundary can be read off it
        checks["documents", i] = causal & (window != 0) & _sees_exactly(stats, torch.maximum(start, begin), diagonal)
    return checks, {"keep": keep, "kept_first": kept_first, "starts": starts}


def _classify(mask: torch.Tensor, batch: int, q_len: int, kv_len: int) -> AttentionPlan | None:
    if q_len == 0 or kv_len == 0:
        return None
    attend, well_formed = attend_pattern(_dedupe_broadcast(mask))
    attend = attend.reshape((1,) * (4 - attend.dim()) + tuple(attend.shape)).expand(-1, -1, q_len, kv_len)
    stats = _PatternStats.of(attend)
    every_key = well_formed & (stats.count == kv_len).all()
    if q_len > kv_len:  # with more queries than keys some rows see nothing: SDPA and TE disagree there
        return NO_MASK if every_key.item() else None
    checks = {("no_mask", 0): every_key}
    device = attend.device
    diagonal = torch.arange(q_len, device=device) + (kv_len - q_len)
    reach = _reach(stats, diagonal, kv_len)
    windows = (torch.full((), -1, device=device), reach)
    causal = well_formed & _nothing_past_diagonal(stats, q_len, kv_len)
    starts_of = [_window_start(diagonal, window) for window in windows]
    for i, start in enumerate(starts_of):
        checks["causal", i] = causal & _sees_exactly(stats, start, diagonal)
    found = {}
    if q_len < kv_len or q_len > 1:
        row_checks, found = _candidates(attend, stats, causal, windows, starts_of, diagonal)
        checks.update(row_checks)
    extra = [reach] + ([found["kept_first"], found["starts"].sum()] if "starts" in found else [])
    values = torch.stack([c.long() for c in (*checks.values(), *extra)]).tolist()  # the one sync
    passed = [name for name, value in zip(checks, values) if value]
    if not passed:
        return None
    kind, window = passed[0]
    left = (-1, values[len(checks)])[window]
    if kind == "no_mask":
        return NO_MASK
    if kind == "causal":
        return AttentionPlan("causal" if q_len == kv_len else "causal_bottom_right", (left, 0))
    keep = found["keep"].expand(batch, -1)
    if kind == "cache":
        return AttentionPlan("causal_bottom_right", (left, 0), key_padding=keep)
    if kind == "padding":
        return AttentionPlan("causal", (left, 0), key_padding=keep, key_layout=(False, True, bool(values[-2])))
    count = values[-1] * (batch if found["starts"].shape[0] == 1 else 1)  # a mask broadcast over the batch
    return AttentionPlan("causal", (left, 0), cu_seqlens=document_boundaries(found["starts"].expand(batch, -1), count))


class _MaskCache:
    """Decisions per live mask object, invalidated by in-place writes (``_version``) and freed with the mask."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple, tuple[weakref.ref, int, AttentionPlan | None]] = {}

    def lookup(self, mask: torch.Tensor, key: tuple) -> tuple[bool, AttentionPlan | None]:
        with self._lock:
            entry = self._entries.get((id(mask),) + key)
        if entry is not None and entry[0]() is mask and entry[1] == mask._version:
            return True, entry[2]
        return False, None

    def store(self, mask: torch.Tensor, key: tuple, decision: AttentionPlan | None) -> None:
        full_key = (id(mask),) + key

        def _drop(_ref: weakref.ref, entries: dict = self._entries, lock: threading.Lock = self._lock) -> None:
            with lock:
                entries.pop(full_key, None)

        with self._lock:
            self._entries[full_key] = (weakref.ref(mask, _drop), mask._version, decision)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_SCOPE = threading.local()  # this thread's running forwards that cache decisions (weak references) and its cache


def _scope_stack() -> list[weakref.ref]:
    if not hasattr(_SCOPE, "stack"):
        _SCOPE.stack = []
    return _SCOPE.stack


def _thread_cache() -> _MaskCache:
    """This thread's decisions: a forward in another thread neither sees them nor clears them."""
    if not hasattr(_SCOPE, "cache"):
        _SCOPE.cache = _MaskCache()
    return _SCOPE.cache


def enter_forward(owner: object, parent: object | None = None) -> None:
    """``owner``'s forward starts; ``parent`` is the scoped module that calls it (None: none does). Decisions are
    cached until the outermost forward ends, and each outermost forward starts afresh: writes through ``.data``
    or numpy bypass the version counter, so a decision lasts one forward (all its layers) at most. A forward not
    called from ``parent`` (the stack top) is outermost too, which also drops a stack that an interrupted forward
    (KeyboardInterrupt skips PyTorch's forward hooks) left behind. Outside such forwards nothing is cached."""
    stack = _scope_stack()
    if parent is None or not stack or stack[-1]() is not parent:
        stack.clear()
        _thread_cache().clear()
    stack.append(weakref.ref(owner))


def leave_forward(owner: object) -> None:
    """``owner``'s forward has ended (normally or by an exception). When it was the outermost one, the decisions
    go, and with them the weak references that would keep ``torch.utils.swap_tensors`` off the masks."""
    stack = _scope_stack()
    for depth in range(len(stack) - 1, -1, -1):
        if stack[depth]() is owner:
            del stack[depth:]
            if not stack:
                _thread_cache().clear()
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


def classify_mask(mask: torch.Tensor, batch: int, num_heads: int, q_len: int, kv_len: int) -> AttentionPlan | None:
    """The plan that reproduces ``mask`` exactly for queries (batch, num_heads, q_len) against kv_len keys, or None
    when there is none (padding inside a row, arbitrary patterns, malformed values).

    Candidates are: all keys visible (``no_mask``), causal, and causal with the window the mask shows (the mask wins
    over what a layer's config says), aligned bottom-right as HF builds them for KV caches; for square masks,
    either causal pattern ANDed with key padding at the ends of each row, or per packed document; for a KV cache's
    queries (q_len < kv_len), either causal pattern ANDed with key padding anywhere (run in inference only).
    """
    if mask.dim() > 4 or mask.dtype not in (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return None
    try:
        if torch.broadcast_shapes(mask.shape, (batch, num_heads, q_len, kv_len)) != (batch, num_heads, q_len, kv_len):
            return None
    except RuntimeError:
        return None
    if mask.is_inference() or not _scope_stack():  # inference tensors have no version counter
        return _classify(mask, batch, q_len, kv_len)
    key = (tuple(mask.shape), mask.data_ptr(), batch, q_len, kv_len)
    hit, decision = _thread_cache().lookup(mask, key)
    if not hit:
        decision = _classify(mask, batch, q_len, kv_len)
        _thread_cache().store(mask, key, decision)
    return decision
