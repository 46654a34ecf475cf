"""The reference executor: TE's fused-attention call contract in plain PyTorch.

It computes exactly what TE's ``DotProductAttention`` / ``fused_attn_fwd`` compute for the arguments te_fx uses
(bshd tensors, native GQA, mask types no_mask / causal / causal_bottom_right / padding / padding_causal /
padding_causal_bottom_right, window_size, softmax_scale, dropout, and the thd format's packed documents), on any
device and dtype. It is the CPU kernel of te_fx's custom ops and the oracle of the tests; users select it with
``executor="reference"``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..core.masks import documents, in_window, te_visible
from . import AttentionCall, Executor, ExecutorModule, thd_mask_type

if TYPE_CHECKING:
    from ..core.plan import AttentionPlan

__all__ = [
    "MASK_TYPES",
    "ReferenceDotProductAttention",
    "ReferenceExecutor",
    "reference_attention",
    "reference_attention_backward",
    "thd_visible",
]

MASK_TYPES = (
    "no_mask",
    "causal",
    "causal_bottom_right",
    "padding",
    "padding_causal",
    "padding_causal_bottom_right",
)


def _check_packed(cu_seqlens: torch.Tensor, batch: int, seq_len: int, name: str) -> None:
    """The thd contract the bshd rows rely on: boundaries from 0 to B * S, in order, every row boundary one of them
    (so no document crosses a row). Reads the values: the reference executor may synchronize."""
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be a 1D int32/int64 tensor of document boundaries, "
                         f"got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")  # fmt: skip
    bounds = cu_seqlens.long()
    rows = torch.arange(0, (batch + 1) * seq_len, seq_len, device=bounds.device)
    if (
        bounds[0] != 0
        or bounds[-1] != batch * seq_len
        or (bounds.diff() < 0).any()
        or not torch.isin(rows, bounds).all()
    ):
        raise ValueError(f"{name} must rise from 0 to B * S = {batch * seq_len} with every multiple of S = {seq_len} "
                         f"among its boundaries (no document may cross a row), got {cu_seqlens.tolist()}")  # fmt: skip


def thd_visible(
    mask_type: str,
    window_size: tuple[int, int],
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_kv: torch.Tensor,
    batch: int,
    q_len: int,
    kv_len: int,
) -> torch.Tensor:
    """Bool (B, 1, q_len, kv_len), True = attend: what TE computes in the thd format for documents packed over the
    flattened bshd tokens (document n: queries cu_seqlens_q[n]..cu_seqlens_q[n+1], keys likewise from
    cu_seqlens_kv). A ``padding*`` mask type and ``window_size`` apply within each document, the diagonal at its
    top-left corner (bottom-right for ``*_bottom_right``), as in :func:`te_fx.core.masks.te_visible`."""
    if not mask_type.startswith("padding"):
        raise ValueError(f"the thd format needs a padding mask type, got {mask_type!r}")
    if cu_seqlens_q.numel() != cu_seqlens_kv.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_kv must count the same documents")
    _check_packed(cu_seqlens_q, batch, q_len, "cu_seqlens_q")
    _check_packed(cu_seqlens_kv, batch, kv_len, "cu_seqlens_kv")
    doc_q, pos_q = documents(cu_seqlens_q, batch, q_len)
    doc_kv, pos_kv = documents(cu_seqlens_kv, batch, kv_len)
    diag = pos_q
    if mask_type.endswith("bottom_right"):
        diag = pos_q + (cu_seqlens_kv.long().diff() - cu_seqlens_q.long().diff())[doc_q]
    visible = doc_q[:, :, None] == doc_kv[:, None, :]
    visible = visible & in_window(diag[:, :, None], pos_kv[:, None, :], mask_type, window_size)
    return visible[:, None]


def _visible(
    mask_type: str,
    window_size: tuple[int, int],
    q: torch.Tensor,
    k: torch.Tensor,
    seqlens_q: torch.Tensor | None,
    seqlens_kv: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_kv: torch.Tensor | None,
) -> torch.Tensor:
    """The visibility of a call: thd documents if ``cu_seqlens_*`` are given, else bshd rows."""
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    if cu_seqlens_q is not None or cu_seqlens_kv is not None:
        if cu_seqlens_q is None or cu_seqlens_kv is None or seqlens_q is not None or seqlens_kv is not None:
            raise ValueError("the thd format takes cu_seqlens_q and cu_seqlens_kv, and no seqlens_q / seqlens_kv")
        return thd_visible(mask_type, window_size, cu_seqlens_q, cu_seqlens_kv, batch, q_len, kv_len)
    if mask_type.startswith("padding") and (seqlens_q is None or seqlens_kv is None):
        raise ValueError(f"mask_type={mask_type!r} needs seqlens_q and seqlens_kv")
    return te_visible(mask_type, window_size, q_len, kv_len, seqlens_q, seqlens_kv, device=q.device)


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
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_kv: torch.Tensor | None = None,
    softmax_offset: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """(probs, dropout factor or None, q, k, v, scale, sink probs or None) in (B, H, S, D) compute precision, K/V
    expanded to every query head. The dropout factor is keep / (1 - p), drawn from ``generator``; the sink probs
    (B, H, Sq) are what the softmax gives ``softmax_offset``'s extra logit."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    heads, head_dim = q.shape[2], q.shape[3]
    kv_heads = k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of KV heads ({kv_heads})")
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    rep = heads // kv_heads
    qc = q.to(compute).transpose(1, 2)
    kc = k.to(compute).transpose(1, 2).repeat_interleave(rep, dim=1)
    vc = v.to(compute).transpose(1, 2).repeat_interleave(rep, dim=1)
    visible = _visible(mask_type, window_size, q, k, seqlens_q, seqlens_kv, cu_seqlens_q, cu_seqlens_kv)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if key_bias is not None:
        scores = scores + key_bias.to(compute)
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = None
    if softmax_offset is not None:  # one more logit per head, in the denominator only
        offset = softmax_offset.to(compute).view(1, heads, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, offset], dim=-1), dim=-1)
        probs, sink = probs[..., :-1], probs[..., -1]
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
    factor = None
    if dropout_p > 0.0:
        keep = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype) >= dropout_p
        factor = keep / (1.0 - dropout_p)
    return probs, factor, qc, kc, vc, scale, sink


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
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_kv: torch.Tensor | None = None,
    softmax_offset: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over bshd tensors: q (B, Sq, H, Dqk), k (B, Skv, Hkv, Dqk), v (B, Skv, Hkv, Dv) -> (B, Sq, H, Dv).

    Query head h reads KV head h // (H // Hkv). Rows with no visible key (padded queries included) are zero, as in
    TE. ``seqlens_*`` are per-row lengths (bshd, ``padding*`` types); ``cu_seqlens_*`` make it the thd format:
    documents packed over the flattened tokens, none crossing a row (see :func:`thd_visible`). ``softmax_offset``
    (H,): TE's "learnable" softmax, exp(offset[h]) added to the denominator of head h (attention sinks).
    ``key_bias`` (B, 1, 1, Skv): TE's post-scale bias, added to the scaled scores of each row's keys.
    Accumulates in float32 (float64 for float64 inputs) and returns q's dtype, contiguous. Differentiable.
    """
    probs, factor, _, _, vc, _, _ = _attention_probs(
        q, k, v, mask_type, window_size, softmax_scale, dropout_p, seqlens_q, seqlens_kv, generator, cu_seqlens_q,
        cu_seqlens_kv, softmax_offset, key_bias,
    )  # fmt: skip
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
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_kv: torch.Tensor | None = None,
    softmax_offset: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, d_softmax_offset or None) of :func:`reference_attention` in closed form (it runs inside custom
    ops, below autograd). ``generator`` must replay the forward's dropout draws."""
    probs, factor, qc, kc, vc, scale, sink = _attention_probs(
        q, k, v, mask_type, window_size, softmax_scale, dropout_p, seqlens_q, seqlens_kv, generator, cu_seqlens_q,
        cu_seqlens_kv, softmax_offset, key_bias,
    )  # fmt: skip
    rep = q.shape[2] // k.shape[2]
    do = d_out.to(qc.dtype).transpose(1, 2)
    dv = torch.matmul((probs if factor is None else probs * factor).transpose(-1, -2), do)
    d_probs = torch.matmul(do, vc.transpose(-1, -2))
    if factor is not None:
        d_probs = d_probs * factor
    expected = (d_probs * probs).sum(dim=-1, keepdim=True)  # the sink's own d_prob is 0: it has no value
    d_scores = probs * (d_probs - expected) * scale
    dq = torch.matmul(d_scores, kc)
    dk = torch.matmul(d_scores.transpose(-1, -2), qc)
    d_offset = None
    if sink is not None:
        d_offset = (-sink * expected.squeeze(-1)).sum(dim=(0, 2)).to(softmax_offset.dtype)

    def per_kv_head(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (k.shape[2], rep)).sum(dim=2)

    return _bshd(dq, q.dtype), _bshd(per_kv_head(dk), k.dtype), _bshd(per_kv_head(dv), v.dtype), d_offset


class ReferenceExecutor(Executor):
    """The reference kernels behind te_fx's custom ops. Its rng_state is the dropout seed of the forward (empty
    without dropout), from which the backward replays the draws; it keeps no softmax statistics."""

    name = "reference"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor | None,
        cu_seqlens_kv: torch.Tensor | None,
        qkv_format: str,
        mask_type: str,
        window_size: tuple[int, int],
        softmax_scale: float,
        dropout_p: float,
        training: bool,
        softmax_offset: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seed = torch.randint(0, 2**62, (2 if dropout_p > 0 else 0,), dtype=torch.int64)
        config = _config(
            q, k, cu_seqlens_q, cu_seqlens_kv, qkv_format, mask_type, window_size, softmax_scale, dropout_p
        )
        generator = _generator(seed, q.device)
        out = reference_attention(
            q, k, v, generator=generator, softmax_offset=softmax_offset, key_bias=key_bias, **config
        )
        return out, q.new_empty(0, dtype=torch.float32), seed.to(q.device)

    def backward(
        self,
        d_out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        softmax_stats: torch.Tensor,
        rng_state: torch.Tensor,
        cu_seqlens_q: torch.Tensor | None,
        cu_seqlens_kv: torch.Tensor | None,
        qkv_format: str,
        mask_type: str,
        window_size: tuple[int, int],
        softmax_scale: float,
        dropout_p: float,
        softmax_offset: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        config = _config(
            q, k, cu_seqlens_q, cu_seqlens_kv, qkv_format, mask_type, window_size, softmax_scale, dropout_p
        )
        generator = _generator(rng_state, q.device)
        return reference_attention_backward(
            d_out, q, k, v, generator=generator, softmax_offset=softmax_offset, key_bias=key_bias, **config
        )

    def fake_aux(
        self, q: torch.Tensor, qkv_format: str, dropout_p: float, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return q.new_empty(0, dtype=torch.float32), q.new_empty(2 if dropout_p > 0 else 0, dtype=torch.int64)

    def call_unsupported_reason(self, call: AttentionCall) -> str | None:
        """None: the reference runs every call, on any device and dtype."""
        return None


def _generator(seed: torch.Tensor, device: torch.device) -> torch.Generator | None:
    """The dropout generator of a reference call, replayed by its backward (``seed`` is empty without dropout)."""
    if not seed.numel():
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed[0]))
    return generator


def _config(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_kv: torch.Tensor | None,
    qkv_format: str,
    mask_type: str,
    window_size: tuple[int, int],
    softmax_scale: float,
    dropout_p: float,
) -> dict:
    """:func:`reference_attention`'s keywords for a custom-op call: in bshd, per-row lengths (full rows where a
    ``padding*`` type has no ``cu_seqlens_*``); in thd, the documents' boundaries."""
    config = {"mask_type": mask_type, "window_size": tuple(window_size), "softmax_scale": softmax_scale,
              "dropout_p": dropout_p}  # fmt: skip
    if qkv_format == "thd":
        return {**config, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_kv": cu_seqlens_kv}
    if qkv_format != "bshd":
        raise ValueError(f"qkv_format must be 'bshd' or 'thd', got {qkv_format!r}")
    if mask_type.startswith("padding"):
        config["seqlens_q"] = _row_lengths(cu_seqlens_q, q.shape[0], q.shape[1], q.device)
        config["seqlens_kv"] = _row_lengths(cu_seqlens_kv, k.shape[0], k.shape[1], k.device)
    return config


def _row_lengths(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    if cu_seqlens is None:
        return torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    return cu_seqlens.diff()


def _window_for(mask_type: str, window: tuple[int, int] | None) -> tuple[int, int]:
    """The window TE's ``check_set_window_size`` makes of ``window`` for ``mask_type``: causal types take (w, 0),
    the others (-1, -1) or a two-sided window, so a module's causal default does not leak into a no_mask call."""
    if "causal" in mask_type:
        return (-1, 0) if window is None or window[0] < 0 else (window[0], 0)
    return (-1, -1) if window is None or window == (-1, 0) else window


class ReferenceDotProductAttention(ExecutorModule):
    """A stand-in for TE's ``DotProductAttention`` built on :func:`reference_attention`.

    Same constructor arguments and forward keywords as the subset of TE's module that te_fx uses, and the same
    output layout: (B, Sq, H * Dv) in bshd, (T, H * Dv) in thd (where, as in TE, a mask type without "padding"
    gets it). Dropout applies in training mode only, as in TE.
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
        if qkv_format not in ("bshd", "thd"):
            raise ValueError(f"the reference executor implements qkv_format 'bshd' and 'thd', got {qkv_format!r}")
        self.num_attention_heads = num_attention_heads
        self.num_gqa_groups = num_gqa_groups or num_attention_heads
        self.kv_channels = kv_channels
        self.attention_dropout = attention_dropout
        self.qkv_format = qkv_format
        self.attn_mask_type = attn_mask_type
        self.window_size = window_size
        self.softmax_scale = softmax_scale

    def unsupported_reason(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> str | None:
        """None: the reference runs every valid plan, on any device and dtype."""
        return None

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """``plan`` through te_fx's op on the reference executor: bshd in, bshd (B, Sq, H, Dv) out."""
        return self._run_op(q, k, v, plan, "reference")

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
        kwargs = {"mask_type": mask_type, "window_size": window, "softmax_scale": self.softmax_scale,
                  "dropout_p": self._dropout_p()}  # fmt: skip
        if self.qkv_format == "thd":
            if cu_seqlens_q is None or cu_seqlens_kv is None:
                raise ValueError("qkv_format='thd' needs cu_seqlens_q and cu_seqlens_kv")
            kwargs["mask_type"] = thd_mask_type(mask_type)  # as TE's module does for thd
            layers = (t.unsqueeze(0) for t in (query_layer, key_layer, value_layer))
            out = reference_attention(*layers, cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv, **kwargs)
            return out.squeeze(0).flatten(1)
        seqlens_q = None if cu_seqlens_q is None else cu_seqlens_q.diff()
        seqlens_kv = None if cu_seqlens_kv is None else cu_seqlens_kv.diff()
        out = reference_attention(
            query_layer, key_layer, value_layer, seqlens_q=seqlens_q, seqlens_kv=seqlens_kv, **kwargs
        )
        return out.flatten(2)
