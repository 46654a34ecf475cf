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
    rows = torch.arange(q_len, device=device).unsqueeze(1)
    return _causal_at(rows, torch.arange(kv_len, device=device).unsqueeze(0), q_len, kv_len, window_left)


def _causal_at(
    rows: torch.Tensor | int, cols: torch.Tensor | int, q_len: int, kv_len: int, window_left: int | torch.Tensor
) -> torch.Tensor:
    """:func:`causal_pattern` at the (broadcast) query indices ``rows`` and key indices ``cols`` (one of them a
    tensor; a Python int stays one, since a tensor made from it on a GPU costs a host sync)."""
    return in_window(rows + (kv_len - q_len), cols, "causal", (window_left, 0))


def _reach(attend: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """The mask's window, read off its values (0-dim): how far back of its diagonal (bottom-right aligned) any query
    sees a key; -1 when some query sees back to the first key (full causal, or a window that covers every key).
    Where no query reaches its window's edge, the window and full causal give the same pattern."""
    cols = torch.arange(kv_len, device=attend.device)
    first = torch.where(attend, cols, kv_len).amin(-1)
    diagonal = torch.arange(q_len, device=attend.device) + (kv_len - q_len)
    reach = torch.where(first < kv_len, diagonal - first, -1).amax()
    return torch.where(reach >= kv_len - 1, -1, reach)


def _causal_edges(q_len: int, kv_len: int, window_left: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The first row of :func:`causal_pattern` followed by the rest of its first column."""
    first_row = _causal_at(0, torch.arange(kv_len, device=device), q_len, kv_len, window_left)
    first_column = _causal_at(torch.arange(1, q_len, device=device), 0, q_len, kv_len, window_left)
    return torch.cat([first_row, first_column])


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
    if mask.dtype == torch.bool:
        return mask, torch.ones((), dtype=torch.bool, device=mask.device)
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


def _uniform_checks(attend: torch.Tensor, well_formed: torch.Tensor, windows: list) -> list[torch.Tensor]:
    """Checks that ``attend`` is all visible, then causal with each of ``windows``, one pass for all. Every causal
    pattern depends on key - query only (it is constant along diagonals), so the mask equals one exactly when it is
    constant along diagonals too and agrees with it on its first row and column."""
    q_len, kv_len = attend.shape[-2:]
    edges = torch.cat([attend[..., 0, :], attend[..., 1:, 0]], dim=-1)
    diagonal = well_formed & (attend[..., 1:, 1:] == attend[..., :-1, :-1]).all()
    checks = [diagonal & edges.all()]
    for window in windows:
        checks.append(diagonal & (edges == _causal_edges(q_len, kv_len, window, attend.device)).all())
    return checks


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


def _row_checks(
    attend: torch.Tensor, well_formed: torch.Tensor, windows: list
) -> tuple[list, list, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks for the per-row plans of a square mask (B, H, S, S), per left window in ``windows``: key padding
    (``causal & keep[b, kv]``, padding only before the first or after the last kept token of a row) and packed
    documents (causal within runs of tokens that a query does not see across). Returns (padding checks, document
    checks, keep (B, S), whether every row keeps its first keys (:func:`padding_layout`), document starts (B, S)):
    the patterns are read off the diagonal (a kept key is visible to its own query) and the sub-diagonal (query i
    sees key i - 1 unless a document starts at i)."""
    seq = attend.shape[-1]
    heads_agree = (attend == attend[:, :1]).all()
    rows = attend[:, 0]
    keep = rows.diagonal(dim1=-2, dim2=-1)
    starts = torch.ones_like(keep)
    starts[:, 1:] = ~rows.diagonal(offset=-1, dim1=-2, dim2=-1)
    _, outer, kept_first = padding_layout(keep)
    document = starts.cumsum(-1)
    same_document = document[:, :, None] == document[:, None, :]
    base = well_formed & heads_agree
    padding, documents = [], []
    for window in windows:
        pattern = causal_pattern(seq, seq, window, attend.device)
        padding.append(base & outer & (rows == (pattern & keep[:, None, :])).all())
        # a window of 0 hides the sub-diagonal everywhere: no document boundary can be read off it
        documents.append(base & (window != 0) & (rows == (pattern & same_document)).all())
    return padding, documents, keep, kept_first, starts


def _cache_padding_checks(
    attend: torch.Tensor, well_formed: torch.Tensor, windows: list
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Checks for key padding under a KV cache's queries (bottom-right causal, q_len < kv_len), per left window in
    ``windows``: ``causal & keep[b, kv]`` with the padding anywhere (inference runs it with a key bias). Returns (the
    checks, keep (B, S_kv)), keep read as the keys that some query sees."""
    q_len, kv_len = attend.shape[-2:]
    rows = attend[:, 0]
    keep = rows.any(dim=-2)
    base = well_formed & (attend == attend[:, :1]).all()
    patterns = (causal_pattern(q_len, kv_len, window, attend.device) for window in windows)
    return [base & (rows == (pattern & keep[:, None, :])).all() for pattern in patterns], keep


def position_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) bool: where a document starts in rows of packed documents given by their (B, S) position ids, as
    HF reads them (``find_packed_sequence_indices``): at a row's first token and wherever a position is not the one
    before it plus 1."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def document_boundaries(starts: torch.Tensor, count: int) -> torch.Tensor:
    """(count + 1,) int32 document boundaries over the flattened (B, S) tokens, from the start flags (``count`` of
    them are set: the caller's one host sync)."""
    flat = starts.flatten()
    indices = torch.nonzero_static(flat, size=count).flatten()
    end = torch.full((1,), flat.numel(), device=flat.device)  # torch.tensor would copy from the host: a sync
    return torch.cat([indices, end]).to(torch.int32)


def _classify(mask: torch.Tensor, batch: int, q_len: int, kv_len: int) -> AttentionPlan | None:
    attend, well_formed = attend_pattern(_dedupe_broadcast(mask))
    attend = attend.reshape((1,) * (4 - attend.dim()) + tuple(attend.shape)).expand(-1, -1, q_len, kv_len)
    # with more queries than keys some rows see nothing: SDPA and TE disagree there
    causal = 0 < q_len <= kv_len
    reach = _reach(attend, q_len, kv_len) if causal else torch.full((), -1, device=attend.device)
    windows = [-1, reach] if causal else []
    checks = [*_uniform_checks(attend, well_formed, windows), reach]
    square = q_len == kv_len > 1
    if square:
        padding, documents, keep, kept_first, starts = _row_checks(attend, well_formed, windows)
        checks += [*padding, *documents, kept_first, starts.sum()]
    elif causal and q_len < kv_len:
        padding, keep = _cache_padding_checks(attend, well_formed, windows)
        checks += padding
    results = torch.stack([torch.as_tensor(c, device=mask.device).long() for c in checks]).tolist()  # the one sync
    found_window = results[len(windows) + 1]
    lefts = [-1, found_window]
    causal_type = "causal" if q_len == kv_len else "causal_bottom_right"
    if results[0]:
        return NO_MASK
    for left, matched in zip(lefts, results[1 : len(windows) + 1]):
        if matched:
            return AttentionPlan(causal_type, (left, 0))
    if not square:
        for left, matched in zip(lefts, results[len(windows) + 2 :]):
            if matched:
                return AttentionPlan("causal_bottom_right", (left, 0), key_padding=keep.expand(batch, -1))
        return None
    row_results = results[len(windows) + 2 : -2]
    padding_results, document_results = row_results[:2], row_results[2:]
    for left, matched in zip(lefts, padding_results):
        if matched:
            layout = (False, True, bool(results[-2]))
            return AttentionPlan("causal", (left, 0), key_padding=keep.expand(batch, -1), key_layout=layout)
    for left, matched in zip(lefts, document_results):
        if matched:
            count = results[-1] * (batch if starts.shape[0] == 1 else 1)  # a mask broadcast over the batch
            boundaries = document_boundaries(starts.expand(batch, -1), count)
            return AttentionPlan("causal", (left, 0), cu_seqlens=boundaries)
    return None


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
