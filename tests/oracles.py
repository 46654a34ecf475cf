"""Brute-force oracles shared by the tests: which keys a query sees under TE's mask semantics, written as plain
loops, independently of te_fx.masks."""

import torch


def visible_keys(
    mask_type: str, window: tuple[int, int], i: int, q_len: int, kv_len: int, sq: int | None = None,
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
