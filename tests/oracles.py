"""Brute-force oracles shared by the tests: which keys a query sees under TE's mask semantics, written as plain
loops, independently of te_fx.core.masks."""

import torch


def visible_keys(
    mask_type: str,
    window: tuple[int, int],
    i: int,
    q_len: int,
    kv_len: int,
    sq: int | None = None,
    skv: int | None = None,
) -> list[int]:
    """Keys query ``i`` sees under TE's semantics (sq/skv: the row's actual lengths, for the padding types)."""
    if not mask_type.startswith("padding") or sq is None or skv is None:
        sq, skv = q_len, kv_len
    if i >= sq:  # a padded query sees nothing
        return []
    left, right = window
    if "causal" in mask_type:
        right = 0
    diagonal = i + (skv - sq) if mask_type.endswith("bottom_right") else i
    first = 0 if left < 0 else max(0, diagonal - left)
    last = skv - 1 if right < 0 else min(skv - 1, diagonal + right)
    return list(range(first, last + 1))


def te_pattern(mask_type: str, window: tuple[int, int], q_len: int, kv_len: int) -> torch.Tensor:
    """Bool (q_len, kv_len) of a non-padding mask type."""
    out = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for i in range(q_len):
        out[i, visible_keys(mask_type, window, i, q_len, kv_len)] = True
    return out


def hf_causal(q_len: int, kv_len: int, window_left: int = -1) -> torch.Tensor:
    """What HF builds: query i sits at key position kv_len - q_len + i and sees window_left keys before it."""
    return te_pattern("causal_bottom_right", (window_left, 0), q_len, kv_len)


# ------------------------------------------------------------------------------------------------------------------
# Per-row plans (key padding, packed documents): brute force, independently of te_fx.core.masks
# ------------------------------------------------------------------------------------------------------------------


def attend_of(mask: torch.Tensor) -> torch.Tensor:
    """Bool attend pattern of an SDPA mask: bool True = attend; float: 0 attends, anything else does not."""
    return mask if mask.dtype == torch.bool else mask == 0


def plan_pattern(plan, batch: int, q_len: int, kv_len: int) -> torch.Tensor:
    """Bool (batch, q_len, kv_len): the keys each query sees under an AttentionPlan, by explicit loops.

    No refinement: TE's pattern of the mask type and window (the same for every row). ``key_padding`` (B, S):
    that pattern with the keys ``keep[b, j] == False`` hidden. ``cu_seqlens``: the B * S flattened tokens cut into
    documents at the boundaries; query t of a document sees the keys of its document at in-document positions
    p - left .. p (p its own position), every earlier one for a full window.
    """
    out = torch.zeros(batch, q_len, kv_len, dtype=torch.bool)
    left = plan.window_size[0]
    if plan.cu_seqlens is not None:
        bounds = [int(x) for x in plan.cu_seqlens]
        assert q_len == kv_len, "documents need q_len == kv_len"
        for start, end in zip(bounds[:-1], bounds[1:]):
            for t in range(start, end):
                b, i = divmod(t, q_len)
                for s in range(start, t + 1):
                    if left < 0 or t - s <= left:
                        b2, j = divmod(s, kv_len)
                        assert b2 == b, f"document {start}..{end} crosses a row"
                        out[b, i, j] = True
        return out
    for b in range(batch):
        for i in range(q_len):
            for j in visible_keys(plan.mask_type, plan.window_size, i, q_len, kv_len):
                if plan.key_padding is None or bool(plan.key_padding[b, j]):
                    out[b, i, j] = True
    return out


def outer_keep_vectors(seq: int) -> list[torch.Tensor]:
    """Every keep vector with padding only outside one run of kept tokens (incl. none kept)."""
    vectors = [torch.zeros(seq, dtype=torch.bool)]
    for first in range(seq):
        for last in range(first, seq):
            keep = torch.zeros(seq, dtype=torch.bool)
            keep[first : last + 1] = True
            vectors.append(keep)
    return vectors


def document_ids(seq: int) -> list[torch.Tensor]:
    """Document index of each token for every way of cutting a row of ``seq`` tokens into documents."""
    out = []
    for cuts in range(2 ** (seq - 1)):
        doc = torch.zeros(seq, dtype=torch.long)
        for position in range(1, seq):
            if cuts >> (position - 1) & 1:
                doc[position:] += 1
        out.append(doc)
    return out


def uniform_patterns(q_len: int, kv_len: int) -> list[torch.Tensor]:
    """Every pattern one TE mask type reproduces for HF's bottom-right alignment: all keys visible, and (q_len <=
    kv_len) causal with every left window, full included."""
    patterns = [torch.ones(q_len, kv_len, dtype=torch.bool)]
    if q_len <= kv_len:
        patterns += [hf_causal(q_len, kv_len, w) for w in range(-1, kv_len)]
    return patterns


def representable(attend: torch.Tensor) -> set[str]:
    """What can reproduce a square (B, S, S) bool pattern exactly, by enumeration (tiny S only): "uniform" (one
    pattern for every row: all-visible, or causal with any window), "padding" (causal with one window for the whole
    batch, ANDed with a keep vector per row that pads only outside one run of kept tokens) and "documents" (causal
    with one window within documents cut per row; a window of 0 shows no document boundary, so it does not count).
    The window is whatever the mask shows, not a layer's."""
    batch, seq, _ = attend.shape
    assert attend.shape[2] == seq
    found = set()
    if any(bool((attend == u).all()) for u in uniform_patterns(seq, seq)):
        found.add("uniform")
    if seq == 1:  # a single token: per-row plans are for q_len == kv_len > 1
        return found
    keeps, docs = outer_keep_vectors(seq), document_ids(seq)
    same_doc = [doc[:, None] == doc[None, :] for doc in docs]
    for window in range(-1, seq - 1):
        causal = hf_causal(seq, seq, window)
        if "padding" not in found and all(
            any(bool((attend[b] == causal & keep[None, :]).all()) for keep in keeps) for b in range(batch)
        ):
            found.add("padding")
        if (
            "documents" not in found
            and window != 0
            and all(any(bool((attend[b] == causal & same).all()) for same in same_doc) for b in range(batch))
        ):
            found.add("documents")
    return found


def cache_padding_representable(attend: torch.Tensor) -> bool:
    """Whether a (B, q_len, kv_len) bool pattern, q_len < kv_len (a KV cache's queries), is HF's bottom-right causal
    with one window for the whole batch ANDed with a keep vector per row, padding anywhere. The keep vector tried is
    the keys some query sees: any other that works hides the same keys from every query."""
    batch, q_len, kv_len = attend.shape
    assert q_len < kv_len
    for window in range(-1, kv_len):
        causal = hf_causal(q_len, kv_len, window)
        if all(bool((attend[b] == causal & attend[b].any(0)[None, :]).all()) for b in range(batch)):
            return True
    return False
