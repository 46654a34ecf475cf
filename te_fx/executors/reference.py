"""The reference executor: TE's fused-attention call contract in plain PyTorch.

It computes exactly what TE's ``DotProductAttention`` / ``fused_attn_fwd`` compute for the arguments te_fx uses
(bshd tensors, native GQA, mask types no_mask / causal / causal_bottom_right / padding / padding_causal /
padding_causal_bottom_right, window_size, softmax_scale, dropout), on any device and dtype. It is the CPU kernel of
te_fx's custom ops and the oracle of the tests; users select it with ``executor="reference"``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..masks import te_visible

__all__ = ["reference_attention", "reference_attention_backward", "ReferenceDotProductAttention", "MASK_TYPES"]

MASK_TYPES = (
    "no_mask",
    "causal",
    "causal_bottom_right",
    "padding",
    "padding_causal",
    "padding_causal_bottom_right",
)


def _attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_type: str,
    window_size: tuple[int, int],
    softmax_scale: float | None,
    dropout_p: float,
    seqlens_q: torch.Tensor | None,
    seqlens_kv: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, ...]:
    """(probs, dropout factor or None, q, k, v, scale) in (B, H, S, D) compute precision, K/V expanded to every
    query head. The dropout factor is keep / (1 - p), drawn from ``generator``."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    if mask_type.startswith("padding") and (seqlens_q is None or seqlens_kv is None):
        raise ValueError(f"mask_type={mask_type!r} needs seqlens_q and seqlens_kv")
    q_len, heads, head_dim = q.shape[1], q.shape[2], q.shape[3]
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of KV heads ({kv_heads})")
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    rep = heads // kv_heads
    qc = q.to(compute).transpose(1, 2)
    kc = k.to(compute).transpose(1, 2).repeat_interleave(rep, dim=1)
    vc = v.to(compute).transpose(1, 2).repeat_interleave(rep, dim=1)
    visible = te_visible(mask_type, window_size, q_len, kv_len, seqlens_q, seqlens_kv, device=q.device)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    probs = probs.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
    factor = None
    if dropout_p > 0.0:
        keep = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype) >= dropout_p
        factor = keep / (1.0 - dropout_p)
    return probs, factor, qc, kc, vc, scale


def _bshd(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.transpose(1, 2).contiguous().to(dtype)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask_type: str = "causal",
    window_size: tuple[int, int] = (-1, -1),
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    seqlens_q: torch.Tensor | None = None,
    seqlens_kv: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Attention over bshd tensors: q (B, Sq, H, Dqk), k (B, Skv, Hkv, Dqk), v (B, Skv, Hkv, Dv) -> (B, Sq, H, Dv).

    Query head h reads KV head h // (H // Hkv). Rows with no visible key (padded queries included) are zero, as in
    TE. Accumulates in float32 (float64 for float64 inputs) and returns q's dtype, contiguous. Differentiable.
    """
    probs, factor, _, _, vc, _ = _attention_probs(
        q, k, v, mask_type, window_size, softmax_scale, dropout_p, seqlens_q, seqlens_kv, generator
    )
    return _bshd(torch.matmul(probs if factor is None else probs * factor, vc), q.dtype)


def reference_attention_backward(
    d_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask_type: str = "causal",
    window_size: tuple[int, int] = (-1, -1),
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    seqlens_q: torch.Tensor | None = None,
    seqlens_kv: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`reference_attention` in closed form (it runs inside custom ops, below autograd).
    ``generator`` must replay the forward's dropout draws."""
    probs, factor, qc, kc, vc, scale = _attention_probs(
        q, k, v, mask_type, window_size, softmax_scale, dropout_p, seqlens_q, seqlens_kv, generator
    )
    rep = q.shape[2] // k.shape[2]
    do = d_out.to(qc.dtype).transpose(1, 2)
    dv = torch.matmul((probs if factor is None else probs * factor).transpose(-1, -2), do)
    d_probs = torch.matmul(do, vc.transpose(-1, -2))
    if factor is not None:
        d_probs = d_probs * factor
    d_scores = probs * (d_probs - (d_probs * probs).sum(dim=-1, keepdim=True)) * scale
    dq = torch.matmul(d_scores, kc)
    dk = torch.matmul(d_scores.transpose(-1, -2), qc)

    def per_kv_head(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (k.shape[2], rep)).sum(dim=2)

    return _bshd(dq, q.dtype), _bshd(per_kv_head(dk), k.dtype), _bshd(per_kv_head(dv), v.dtype)


def _window_for(mask_type: str, window: tuple[int, int] | None) -> tuple[int, int]:
    """The window TE's ``check_set_window_size`` makes of ``window`` for ``mask_type``: causal types take (w, 0),
    the others (-1, -1) or a two-sided window, so a module's causal default does not leak into a no_mask call."""
    if "causal" in mask_type:
        return (-1, 0) if window is None or window[0] < 0 else (window[0], 0)
    return (-1, -1) if window is None or window == (-1, 0) else window


class ReferenceDotProductAttention(nn.Module):
    """A stand-in for TE's ``DotProductAttention`` (bshd) built on :func:`reference_attention`.

    Same constructor arguments and forward keywords as the subset of TE's module that te_fx uses, and the same
    output layout: (B, Sq, H * Dv). Dropout applies in training mode only, as in TE.
    """

    def __init__(
        self,
        num_attention_heads: int,
        kv_channels: int | tuple[int, int],
        num_gqa_groups: int | None = None,
        attention_dropout: float = 0.0,
        qkv_format: str = "bshd",
        attn_mask_type: str = "causal",
        window_size: tuple[int, int] | None = None,
        softmax_scale: float | None = None,
    ) -> None:
        super().__init__()
        if qkv_format != "bshd":
            raise ValueError("the reference executor implements qkv_format='bshd' only")
        self.num_attention_heads = num_attention_heads
        self.num_gqa_groups = num_gqa_groups or num_attention_heads
        self.kv_channels = kv_channels
        self.attention_dropout = attention_dropout
        self.qkv_format = qkv_format
        self.attn_mask_type = attn_mask_type
        self.window_size = window_size
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query_layer: torch.Tensor,
        key_layer: torch.Tensor,
        value_layer: torch.Tensor,
        attn_mask_type: str | None = None,
        window_size: tuple[int, int] | None = None,
        cu_seqlens_q: torch.Tensor | None = None,
        cu_seqlens_kv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mask_type = attn_mask_type or self.attn_mask_type
        window = _window_for(mask_type, window_size or self.window_size)
        seqlens_q = None if cu_seqlens_q is None else cu_seqlens_q.diff()
        seqlens_kv = None if cu_seqlens_kv is None else cu_seqlens_kv.diff()
        out = reference_attention(
            query_layer,
            key_layer,
            value_layer,
            mask_type=mask_type,
            window_size=window,
            softmax_scale=self.softmax_scale,
            dropout_p=self.attention_dropout if self.training else 0.0,
            seqlens_q=seqlens_q,
            seqlens_kv=seqlens_kv,
        )
        return out.flatten(2)
