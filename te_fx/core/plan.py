"""The plan: what an attention call must compute, in TransformerEngine's terms.

Every way in produces one: the eager matcher from a mask's values, the FX pass from a mask's subgraph, the HF
attention interface from HF's arguments. The executors run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["AttentionPlan", "NO_MASK", "CAUSAL", "PaddingLayout", "UNKNOWN_LAYOUT", "padding_route"]


PaddingLayout = tuple[bool, bool, bool]
"""(every key kept, padding only before each row's first or after its last kept token, right padding only: every
row keeps its first keys and at least one), as :func:`~te_fx.core.masks.padding_layout` reads it off a keep mask."""

UNKNOWN_LAYOUT: PaddingLayout = (False, False, False)


def padding_route(layout: PaddingLayout, training: bool) -> str:
    """How te_fx's op runs key padding of ``layout`` under a causal pattern (with or without a window); each route is
    exact at every position:

    * "causal": no padding: TE's causal type as for no mask.
    * "rows" (right padding): TE's ``padding_causal`` on the rows as they are.
    * "key_bias" (inference): TE's causal type with a post-scale bias that hides the padded keys, a row at a time,
      wherever the padding sits. Not for training: TE's backward with that bias gives wrong gradients (TE 2.20,
      cuDNN 9.19 on an H200, through TE's own DotProductAttention too).
    * "partition" (training, padding only at a row's ends): ``padding_causal`` on each row partitioned kept-first.
    * "reference" (training, padding inside a row): the reference kernels on the device, in float32; TE has no
      exact kernel for it (the partition keeps ranks where the window and the padded queries need positions).

    In training the op reads the layout off the mask on the device when the caller did not check it, once per mask
    and forward; in inference an unknown layout (``UNKNOWN_LAYOUT``) takes the key bias."""
    all_kept, outer, kept_first = layout
    if all_kept:
        return "causal"
    if kept_first:
        return "rows"
    if not training:
        return "key_bias"
    return "partition" if outer else "reference"


@dataclass(frozen=True)
class AttentionPlan:
    """``mask_type`` ("no_mask", "causal" or "causal_bottom_right") and ``window_size`` (TE's (left, right)) say
    which keys a query sees in a row of tokens; at most one of these refines it:

    * ``key_padding``: a (B, S_kv) keep mask (nonzero = keep) ANDed into a causal pattern (q_len == kv_len), the
      padding anywhere in a row. ``key_layout``: its :data:`PaddingLayout` where a way in checked it (the eager ways
      in, once per mask), else None. :func:`padding_route` says how TE runs it.
    * ``cu_seqlens``: (N + 1,) int32 document boundaries over the B * S flattened tokens (every row boundary is one):
      packed documents, each causal (and windowed) on its own. TE runs it in the ``thd`` format.
    * ``position_ids``: (B, S) positions of packed documents (:func:`~te_fx.core.masks.position_starts` says where
      each starts), for a way in that cannot read the boundaries when it plans (a compiled graph): te_fx's op finds
      them at run time and runs the ``thd`` format.

    In the compile path these fields hold the graph nodes that compute them. ``softmax_scale`` is the call's scale
    where it differs from the attention module's (None: the module's), as for OPT, which scales the query itself.
    """

    mask_type: str
    window_size: tuple[int, int]
    key_padding: Any = None
    cu_seqlens: Any = None
    position_ids: Any = None
    softmax_scale: float | None = None
    key_layout: PaddingLayout | None = None

    @property
    def kind(self) -> str:
        """A short name for reports: the TE mask type, or "padding_causal" / "thd" where the plan refines it."""
        if self.key_padding is not None:
            return "padding_causal"
        if self.cu_seqlens is not None or self.position_ids is not None:
            return "thd"
        return self.mask_type


NO_MASK = AttentionPlan("no_mask", (-1, -1))
CAUSAL = AttentionPlan("causal", (-1, 0))
