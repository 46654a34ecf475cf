"""The third way in: te_fx as a transformers attention backend, ``attn_implementation="te"``.

``import te_fx`` registers :func:`~te_fx.hf_interface.attention.te_attention_forward` with transformers'
``AttentionInterface`` and :func:`~te_fx.hf_interface.mask.te_mask` with its ``AttentionMaskInterface``, so
``from_pretrained(..., attn_implementation="te")``, ``from_config`` and ``model.set_attn_implementation("te")`` run
every layer through te_fx's op with the structure HF knows (the layer's pattern, key padding, packed documents)
instead of a 4D mask. ``TE_FX_EXECUTOR=reference`` runs the reference executor instead of TE.
"""

from __future__ import annotations

from transformers import AttentionInterface, AttentionMaskInterface

from .attention import te_attention_forward
from .mask import te_mask

__all__ = ["NAME", "register", "te_attention_forward", "te_mask"]

NAME = "te"


def register() -> None:
    """Register "te" with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(NAME, te_attention_forward)
    AttentionMaskInterface.register(NAME, te_mask)
