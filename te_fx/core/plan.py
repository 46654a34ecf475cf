"""The plan: what an attention call must compute, in TransformerEngine's terms.

Every way in produces one: the eager matcher from a mask's values, the FX pass from a mask's subgraph, the HF
attention interface from HF's arguments. The executors run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["AttentionPlan", "NO_MASK", "CAUSAL"]


@dataclass(frozen=True)
class AttentionPlan:
    """``mask_type`` ("no_mask", "causal" or "causal_bottom_right") and ``window_size`` (TE's (left, right)) say
    which keys a query sees in a row of tokens; at most one of these refines it:

    * ``key_padding``: a (B, S_kv) keep mask (nonzero = keep) ANDed into a causal pattern (q_len == kv_len), the
      padding anywhere in a row. TE runs it as ``padding_causal`` with ``kept_first`` (every row keeps its first keys
      and at least one: right padding, which the eager ways in check once per mask), else as the causal type with
      an additive bias that hides the padded keys (exact wherever they sit; TE takes it a row at a time).
    * ``cu_seqlens``: (N + 1,) int32 document boundaries over the B * S flattened tokens (every row boundary is one):
      packed documents, each causal (and windowed) on its own. TE runs it in the ``thd`` format.

    In the compile path these fields hold the graph nodes that compute them. ``softmax_scale`` is the call's scale
    where it differs from the attention module's (None: the module's), as for OPT, which scales the query itself.
    """

    mask_type: str
    window_size: tuple[int, int]
    key_padding: Any = None
    cu_seqlens: Any = None
    softmax_scale: float | None = None
    kept_first: bool = False

    @property
    def kind(self) -> str:
        """A short name for reports: the TE mask type, or "padding_causal" / "thd" where the plan refines it."""
        if self.key_padding is not None:
            return "padding_causal"
        if self.cu_seqlens is not None:
            return "thd"
        return self.mask_type


NO_MASK = AttentionPlan("no_mask", (-1, -1))
CAUSAL = AttentionPlan("causal", (-1, 0))
