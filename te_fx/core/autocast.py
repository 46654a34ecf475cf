"""SDPA under autocast: the dtype SDPA would compute in is the dtype TE gets.

``scaled_dot_product_attention`` is on autocast's lower-precision list, so inside ``torch.autocast`` its floating
inputs (float64 excepted) are cast to the autocast dtype. te_fx casts the same way before deciding anything, so AMP
training (fp32 weights, bf16 autocast, as HF Trainer's ``bf16=True`` runs it) reaches TE.
"""

from __future__ import annotations

import torch

__all__ = ["autocast_dtype", "cast_like_sdpa"]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast gives SDPA on ``device_type`` now, or None outside autocast."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_like_sdpa(tensors: tuple, dtype: torch.dtype) -> tuple:
    """Each floating tensor that autocast would cast (not float64), in ``dtype``; anything else as it is."""
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )
