"""The plan: what an attention call must compute, in TransformerEngine's terms.

Every way in produces one: the eager matcher from a mask's values, the FX pass from a mask's subgraph, the HF
attention interface from HF's arguments. The executors run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "AttentionPlan",
    "NO_MASK",
    "CAUSAL",
    "PaddingLayout",
    "UNKNOWN_LAYOUT",
    "key_bias_terms",
    "padding_route",
    "thd_mask_type",
]


PaddingLayout = tuple[bool, bool, bool]
"""(every key kept, padding only before each row's first or after its last kept token, right padding only: every
row keeps its first keys and at least one), as :func:`~te_fx.core.masks.padding_layout` reads it off a keep mask."""

UNKNOWN_LAYOUT: PaddingLayout = (False, False, False)


def thd_mask_type(mask_type: str) -> str:
    """The ``padding*`` mask type of ``mask_type`` (TE's thd format needs one): causal -> padding_causal, ..."""
    if mask_type.startswith("padding"):
        return mask_type
    return "padding" if mask_type == "no_mask" else f"padding_{mask_type}"


def padding_route(layout: PaddingLayout, training: bool, mask_type: str = "causal") -> str:
    """How te_fx's op runs key padding of ``layout`` under the pattern of ``mask_type`` (with or without a window);
    each route is exact at every position. Causal self-attention ("causal") takes one of:

    * "causal": no padding: TE's causal type as for no mask.
    * "rows" (right padding): TE's ``padding_causal`` on the rows as they are.
    * "key_bias" (inference): TE's causal type with a post-scale bias that hides the padded keys, a row at a time,
      wherever the padding sits. Not for training: TE's backward with that bias gives wrong gradients (TE 2.20,
      cuDNN 9.19 on an H200, through TE's own DotProductAttention too).
    * "partition" (training, padding only at a row's ends): ``padding_causal`` on each row partitioned kept-first.
    * "reference" (training, padding inside a row): the reference kernels on the device, in float32; TE has no
      exact kernel for it (the partition keeps ranks where the window and the padded queries need positions).

    In training the op reads the layout off the mask on the device when the caller did not check it, once per mask
    and forward; in inference an unknown layout (``UNKNOWN_LAYOUT``) takes the key bias. The queries of a KV cache
    ("causal_bottom_right") and all-visible keys ("no_mask") take the key bias, in inference only: "none" in
    training, where te_fx has no route for them."""
    if mask_type != "causal":
        return "none" if training else "key_bias"
    all_kept, outer, kept_first = layout
    if all_kept:
        return "causal"
    if kept_first:
        return "rows"
    if not training:
        return "key_bias"
    return "partition" if outer else "reference"


def key_bias_terms(mask_type: str, window_size: tuple[int, int], q_len: int) -> tuple[str, tuple[int, int]]:
    """The mask type and window te_fx's op runs a key bias with: a single query of a KV cache (decode) sees a range
    of keys that the bias hides the rest of, so it runs "no_mask" (the op folds the window into the bias). TE's
    post-scale bias with bottom-right causal gave wrong outputs (TE 2.20, cuDNN 9.19, H200): the TE executor
    refuses that pair, which several queries of a KV cache (chunked prefill) with key padding would need."""
    if q_len == 1 and mask_type.startswith("causal"):
        return "no_mask", (-1, -1)
    return mask_type, window_size


@dataclass(frozen=True)
class AttentionPlan:
    """``mask_type`` ("no_mask", "causal" or "causal_bottom_right") and ``window_size`` (TE's (left, right)) say
    which keys a query sees in a row of tokens; at most one of these refines it:

    * ``key_padding``: a (B, S_kv) keep mask (nonzero = keep) ANDed into the pattern, the padding anywhere in a
      row: causal self-attention (q_len == kv_len), or in inference a KV cache's queries or all keys visible.
      ``key_layout``: its :data:`PaddingLayout` where a way in checked it (the eager ways in, once per mask), else
      None. :func:`padding_route` says how TE runs it.
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
        """A short name for reports: the TE mask type, its ``padding*`` type with key padding, or "thd"."""
        if self.key_padding is not None:
            return thd_mask_type(self.mask_type)
        if self.cu_seqlens is not None or self.position_ids is not None:
            return "thd"
        return self.mask_type


NO_MASK = AttentionPlan("no_mask", (-1, -1))
CAUSAL = AttentionPlan("causal", (-1, 0))
