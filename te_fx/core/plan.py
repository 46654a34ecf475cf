"""The plan: what an attention call must compute, in TransformerEngine's terms.

Every way in produces one: the eager matcher from a mask's values, the FX pass from a mask's subgraph, the HF
attention interface from HF's arguments. The executors run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["AttentionPlan", "NO_MASK", "CAUSAL", "padding_route", "padding_unchecked_refused"]


def padding_route(kept_first: bool, training: bool) -> str:
    """How te_fx's op runs key padding under a causal pattern (with or without a window):

    * "rows" (``kept_first``: right padding): TE's ``padding_causal`` on the rows as they are; exact everywhere.
    * "key_bias" (not ``training``): TE's causal type with a post-scale bias that hides the padded keys, a row at a
      time; exact everywhere, wherever the padding sits. Not for training: TE's backward with that bias returns
      zero gradients (TE 2.20, cuDNN 9.19 on an H200).
    * "partition" (training): ``padding_causal`` on each row partitioned kept-first. Exact everywhere when a row's
      padding lies before its first or after its last kept token; with padding inside a row, exact at the kept
      positions without a window and wrong with one (the partition keeps ranks, the window counts positions): the
      ways in send such a mask only where they know its layout (:func:`padding_unchecked_refused`).
    """
    if kept_first:
        return "rows"
    return "partition" if training else "key_bias"


def padding_unchecked_refused(window_left: int, training: bool) -> bool:
    """Whether key padding whose layout nobody checked (a compiled graph cannot read it) must stay off te_fx: with a
    window in training, where :func:`padding_route` partitions and padding inside a row would be wrong."""
    return window_left >= 0 and training


@dataclass(frozen=True)
class AttentionPlan:
    """``mask_type`` ("no_mask", "causal" or "causal_bottom_right") and ``window_size`` (TE's (left, right)) say
    which keys a query sees in a row of tokens; at most one of these refines it:

    * ``key_padding``: a (B, S_kv) keep mask (nonzero = keep) ANDed into a causal pattern (q_len == kv_len), the
      padding anywhere in a row for full causal attention; with a window in training only before each row's first
      or after its last kept token. ``kept_first``: every row keeps its first keys and at least one (right
      padding, which the eager ways in check once per mask). :func:`padding_route` says how TE runs it.
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
