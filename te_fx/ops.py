"""The custom ops: te_fx's attention as ``torch.library`` ops, so torch.compile graphs can hold it.

``te_fx::attention_fwd`` and ``te_fx::attention_bwd`` are functional ops with fake implementations and autograd
registered, in the style of flash-attn's op wrappers. The "te" executor runs TE's fused attention (CUDA, fp16/bf16);
"reference" runs :func:`te_fx.executors.reference.reference_attention` on any device. Tensors are bshd:
q (B, Sq, H, Dqk), k (B, Skv, Hkv, Dqk), v (B, Skv, Hkv, Dv) -> out (B, Sq, H, Dv).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

from .executors import EXECUTORS, load_te_executor
from .executors.reference import reference_attention, reference_attention_backward

__all__ = ["attention"]


def _generator(seed: Tensor, device: torch.device) -> torch.Generator | None:
    """The dropout generator of a reference call, replayed by its backward (``seed`` is empty without dropout)."""
    if not seed.numel():
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed[0]))
    return generator


def _reference_config(
    cu_seqlens_q: Tensor | None,
    cu_seqlens_kv: Tensor | None,
    mask_type: str,
    window_left: int,
    window_right: int,
    softmax_scale: float,
    dropout_p: float,
) -> dict:
    return dict(
        mask_type=mask_type,
        window_size=(window_left, window_right),
        softmax_scale=softmax_scale,
        dropout_p=dropout_p,
        seqlens_q=None if cu_seqlens_q is None else cu_seqlens_q.diff(),
        seqlens_kv=None if cu_seqlens_kv is None else cu_seqlens_kv.diff(),
    )


@torch.library.custom_op("te_fx::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_kv: Tensor | None,
    mask_type: str,
    window_left: int,
    window_right: int,
    softmax_scale: float,
    dropout_p: float,
    training: bool,
    executor: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention forward; returns (out, softmax_stats, rng_state). The last two are what the backward needs
    (empty when not training): TE's softmax statistics and RNG state, or the reference executor's dropout seed.
    ``cu_seqlens_*`` (int32, B + 1) give per-sequence lengths for the ``padding*`` mask types."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if executor == "te":
        window = (window_left, window_right)
        te = load_te_executor()
        out, aux = te.fused_forward(
            q, k, v, mask_type, window, softmax_scale, dropout_p, training, cu_seqlens_q, cu_seqlens_kv
        )
        if not training:
            return out, q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.int64)
        return out, aux[0], aux[1]
    seed = torch.randint(0, 2**62, (2 if dropout_p > 0 else 0,), dtype=torch.int64)
    config = _reference_config(cu_seqlens_q, cu_seqlens_kv, mask_type, window_left, window_right, softmax_scale, dropout_p)
    out = reference_attention(q, k, v, generator=_generator(seed, q.device), **config)
    return out, q.new_empty(0, dtype=torch.float32), seed.to(q.device)


@attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_kv, mask_type, window_left, window_right, softmax_scale, dropout_p, training, executor):  # noqa: ANN001, E501
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "te_fx attention takes 4D bshd tensors")
    torch._check(q.shape[2] % k.shape[2] == 0, lambda: "query heads must be a multiple of KV heads")
    batch, q_len, heads = q.shape[0], q.shape[1], q.shape[2]
    out = q.new_empty(batch, q_len, heads, v.shape[-1])
    if executor == "te" and training:
        return out, q.new_empty(batch, heads, q_len, 1, dtype=torch.float32), q.new_empty(2, dtype=torch.int64)
    rng_len = 2 if executor != "te" and dropout_p > 0 else 0
    return out, q.new_empty(0, dtype=torch.float32), q.new_empty(rng_len, dtype=torch.int64)


@torch.library.custom_op("te_fx::attention_bwd", mutates_args=())
def attention_bwd(
    d_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    softmax_stats: Tensor,
    rng_state: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_kv: Tensor | None,
    mask_type: str,
    window_left: int,
    window_right: int,
    softmax_scale: float,
    dropout_p: float,
    executor: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention backward; returns (dq, dk, dv)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if executor == "te":
        te = load_te_executor()
        aux = [softmax_stats, rng_state]
        window = (window_left, window_right)
        return te.fused_backward(
            d_out, q, k, v, out, aux, mask_type, window, softmax_scale, dropout_p, cu_seqlens_q, cu_seqlens_kv
        )
    config = _reference_config(cu_seqlens_q, cu_seqlens_kv, mask_type, window_left, window_right, softmax_scale, dropout_p)
    return reference_attention_backward(d_out, q, k, v, generator=_generator(rng_state, q.device), **config)


@attention_bwd.register_fake
def _(d_out, q, k, v, out, softmax_stats, rng_state, *config):  # noqa: ANN001, ANN002
    # the kernels write contiguous bshd gradients whatever the strides of q, k, v
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, cu_q, cu_kv, mask_type, window_left, window_right, softmax_scale, dropout_p, _training, executor = inputs
    out, stats, rng = output
    ctx.save_for_backward(q, k, v, out, stats, rng, cu_q, cu_kv)
    ctx.config = (mask_type, window_left, window_right, softmax_scale, dropout_p, executor)


def _backward(ctx: Any, d_out: Tensor, _d_stats: Tensor, _d_rng: Tensor) -> tuple:
    q, k, v, out, stats, rng, cu_q, cu_kv = ctx.saved_tensors
    dq, dk, dv = attention_bwd(d_out, q, k, v, out, stats, rng, cu_q, cu_kv, *ctx.config)
    return dq, dk, dv, *([None] * 9)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _compact_valid_first(key_padding_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(order, inverse order, cu_seqlens_kv, rows that see a key) for a (B, S) key padding mask (nonzero = keep).

    A stable partition (two cumulative sums, no sort) puts each row's kept tokens first, in order: then "query i sees
    kept keys j <= i" becomes TE's ``padding_causal`` with per-row key lengths, and padding sits at the end of each
    row as TE requires."""
    keep = key_padding_mask != 0
    kept_before = keep.cumsum(dim=1)  # kept tokens up to and including each position
    lengths = kept_before[:, -1:]
    # each token's place after the stable partition: kept ones by rank, padding after them in order
    restore = torch.where(keep, kept_before - 1, lengths + torch.arange(keep.shape[1], device=keep.device) - kept_before)
    order = torch.empty_like(restore).scatter_(1, restore, torch.arange(keep.shape[1], device=keep.device).expand_as(restore))
    # a row with no kept token still gets one key (a padding one, at the front), so that no kernel sees an empty
    # sequence and leaves its output or statistics unwritten; those rows are zeroed afterwards
    cu_seqlens = torch.nn.functional.pad(lengths.clamp(min=1).flatten().cumsum(0).to(torch.int32), (1, 0))
    return order, restore, cu_seqlens, kept_before > 0


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(1, index[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3]))


class _PermuteRows(torch.autograd.Function):
    """``x[b, order[b, s]]`` for a permutation ``order``: its gradient is the gather by the inverse permutation,
    which avoids the zero-fill and scatter-add of ``gather``'s generic backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, order: Tensor, restore: Tensor) -> Tensor:
        ctx.save_for_backward(restore)
        return _gather_rows(x, order)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        (restore,) = ctx.saved_tensors
        return _gather_rows(grad, restore), None, None


def _check_arguments(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask_type: str,
    window_size: tuple[int, int],
    dropout_p: float,
    key_padding_mask: Tensor | None,
    executor: str,
) -> None:
    """Clear errors for arguments no executor can run, from metadata only (no tensor values are read)."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown te_fx executor {executor!r}; choose one of {EXECUTORS}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"te_fx attention takes 4D (B, S, H, D) tensors, got {q.dim()}D/{k.dim()}D/{v.dim()}D")
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one floating-point dtype, got {q.dtype}/{k.dtype}/{v.dtype}")
    if isinstance(dropout_p, (int, float)) and not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    # TE aligns the window of a non-causal type top-left in its fused functions, bottom-right in DotProductAttention:
    # the two agree only for q_len == kv_len
    if not mask_type.startswith("causal") and tuple(window_size) != (-1, -1) and q.shape[1] != k.shape[1]:
        raise ValueError(f"window_size {tuple(window_size)} with mask_type {mask_type!r} needs q_len == kv_len")
    if key_padding_mask is not None:
        if key_padding_mask.dim() != 2 or key_padding_mask.is_floating_point():
            raise ValueError("key_padding_mask must be a (B, S) bool or integer tensor (nonzero = keep), "
                             f"got {key_padding_mask.dim()}D {key_padding_mask.dtype}")  # fmt: skip
        _check_size(key_padding_mask.shape[0] == q.shape[0], "its batch differs from the query's")
        _check_size(key_padding_mask.shape[1] == k.shape[1], "its length differs from the keys'")


_DYNAMO_TRACES_CHECK_MESSAGES = TorchVersion(torch.__version__) >= (2, 13)


def _check_size(cond: bool, problem: str) -> None:
    """A key_padding_mask size check that torch.compile keeps (as a guard or run-time assert, no graph break).
    Dynamo before torch 2.13 cannot trace a message callable: there the compiled check goes without it."""
    if torch.compiler.is_dynamo_compiling() and not _DYNAMO_TRACES_CHECK_MESSAGES:
        torch._check_value(cond)
    else:
        torch._check_value(cond, lambda: f"key_padding_mask must be (B, S_kv): {problem}")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask_type: str,
    window_size: tuple[int, int],
    softmax_scale: float,
    dropout_p: float = 0.0,
    key_padding_mask: Tensor | None = None,
    executor: str = "te",
) -> Tensor:
    """Differentiable attention over bshd tensors with native GQA (Hkv divides H), TE mask semantics.

    ``key_padding_mask`` (B, S), nonzero = keep, with ``mask_type="causal"``: query i attends to kept keys j <= i,
    as SDPA does with HF's ``causal & attention_mask[b, kv]`` mask. Rows with no such key are zero, as in SDPA.
    ``executor`` "te" needs CUDA fp16/bf16 tensors that TE's F16 fused backend supports; "reference" runs anywhere.
    Dropout draws fresh randomness per call; the backward reuses the forward's.
    """
    _check_arguments(q, k, v, mask_type, window_size, dropout_p, key_padding_mask, executor)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    training = needs_grad or dropout_p > 0
    cu_seqlens_q = cu_seqlens_kv = None
    if key_padding_mask is not None:
        if mask_type != "causal" or window_size != (-1, 0) or q.shape[1] != k.shape[1]:
            raise ValueError("key_padding_mask needs full causal self-attention (q_len == kv_len)")
        order, restore, cu_seqlens_kv, sees_a_key = _compact_valid_first(key_padding_mask)
        q, k, v = (_PermuteRows.apply(t, order, restore) for t in (q, k, v))
        batch, seq = q.shape[0], q.shape[1]
        cu_seqlens_q = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=q.device)
        mask_type = "padding_causal"
    out, _, _ = torch.ops.te_fx.attention_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_kv, mask_type, window_size[0], window_size[1], softmax_scale, dropout_p,
        training, executor,
    )  # fmt: skip
    if key_padding_mask is not None:
        out = torch.where(sees_a_key[:, :, None, None], _PermuteRows.apply(out, restore, order), 0.0)
    return out
