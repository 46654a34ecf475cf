"""The TE executor: TransformerEngine's fused attention, called with as little host work as possible.

The only module of te_fx that imports ``transformer_engine``. TE's ``DotProductAttention`` re-selects its backend
on every call (0.2-0.5 ms of Python); :class:`TEDotProductAttention` keeps the module (FP8, context parallelism,
everything else still goes through it) but sends plain bshd fp16/bf16 calls straight to
``fused_attn_fwd``/``fused_attn_bwd``, with the backend decision cached per shape.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import transformer_engine.pytorch as te
from transformer_engine.pytorch.attention.dot_product_attention import utils as dpa_utils
from transformer_engine.pytorch.cpp_extensions.fused_attn import FusedAttnBackend, fused_attn_bwd, fused_attn_fwd
from transformer_engine.pytorch.quantization import FP8GlobalStateManager

from . import te_head_dims_supported

__all__ = [
    "TEDotProductAttention",
    "fused_attention",
    "fused_forward",
    "fused_backward",
    "shape_unsupported_reason",
    "unsupported_reason",
]

_F16 = FusedAttnBackend.F16_arbitrary_seqlen
_LAYOUT = dict(qkv_layout="bshd_bshd_bshd", o_format="bshd")


@functools.lru_cache(maxsize=256)
def _cu_seqlens(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


def _fp8_attention_recipe() -> Any:
    """TE's recipe while FP8 autocast runs attention in FP8 (``fp8_dpa``), else None."""
    if not FP8GlobalStateManager.is_fp8_enabled():
        return None
    recipe = FP8GlobalStateManager.get_fp8_recipe()
    return recipe if recipe.fp8_dpa else None


_NONDETERMINISTIC_ALLOWED = bool(int(os.getenv("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "1")))  # read once, as TE does


def _deterministic() -> bool:
    """TE's rule (``DotProductAttention.__init__``): deterministic kernels when torch asks for deterministic
    algorithms or ``NVTE_ALLOW_NONDETERMINISTIC_ALGO=0``."""
    return torch.are_deterministic_algorithms_enabled() or not _NONDETERMINISTIC_ALLOWED


def _recipe_key(recipe: Any) -> tuple | None:
    """What of an FP8 recipe TE's backend selection reads (recipes are unhashable dataclasses)."""
    return None if recipe is None else (type(recipe).__name__, str(recipe.fp8_format), recipe.fp8_dpa, recipe.fp8_mha)


@functools.lru_cache(maxsize=4096)
def _backend_ok(
    dtype: torch.dtype,
    shape: tuple[int, int, int, int, int, int, int, int],
    mask_type: str,
    window_size: tuple[int, int],
    dropout_p: float,
    training: bool,
    fp8_key: tuple | None,
    deterministic: bool,
) -> bool:
    """Whether TE selects its fused attention for this call: the F16 backend, or the FP8 one while FP8 attention
    is on (``fp8_key``, from :func:`_recipe_key` of the current recipe), with deterministic kernels if asked."""
    batch, heads, kv_heads, q_len, kv_len, dqk, dv, device_index = shape
    fp8 = {} if fp8_key is None else dict(fp8=True, fp8_meta={"recipe": FP8GlobalStateManager.get_fp8_recipe()})
    params = dpa_utils.AttentionParams(
        qkv_dtype=dtype,
        qkv_layout="bshd_bshd_bshd",
        batch_size=batch,
        num_heads=heads,
        num_gqa_groups=kv_heads,
        max_seqlen_q=q_len,
        max_seqlen_kv=kv_len,
        head_dim_qk=dqk,
        head_dim_v=dv,
        attn_mask_type=mask_type,
        window_size=window_size,
        bottom_right_diagonal=mask_type.endswith("bottom_right"),
        attention_dropout=dropout_p,
        is_training=training,
        deterministic=deterministic,
        **fp8,
    )
    with torch.cuda.device(device_index):
        selection = dpa_utils.get_attention_backend(params)
    fused_available, fused_backend = selection[5][1], selection[3]
    wanted = _F16 if fp8_key is None else FusedAttnBackend.FP8
    return bool(fused_available) and fused_backend is not None and int(fused_backend) == int(wanted)


def shape_unsupported_reason(
    dtype: torch.dtype,
    shape: tuple[int, int, int, int, int, int, int],
    mask_type: str,
    window_size: tuple[int, int],
    dropout_p: float = 0.0,
    training: bool = False,
    device_index: int = 0,
    fp8_recipe: Any = None,
) -> str | None:
    """Why TE's fused attention cannot run (batch, heads, kv_heads, q_len, kv_len, head_dim_qk, head_dim_v) in
    ``dtype`` (a stats key), or None if it can: the F16 backend, or the FP8 one under an FP8 attention recipe.
    Decided from metadata only, so compile-time guards use it too."""
    if dtype not in (torch.float16, torch.bfloat16):
        return "fallback_dtype"
    if not te_head_dims_supported(shape[5], shape[6]):
        return "fallback_head_dim"
    key = _recipe_key(fp8_recipe)
    config = (mask_type, tuple(window_size), float(dropout_p), bool(training), key, _deterministic())
    if not _backend_ok(dtype, (*shape, device_index), *config):
        return "fallback_shape" if key is None else "fallback_fp8"
    return None


def unsupported_reason(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_type: str,
    window_size: tuple[int, int],
    dropout_p: float = 0.0,
    training: bool = False,
    fp8_recipe: Any = None,
) -> str | None:
    """Why TE's fused attention cannot run these bshd tensors (a stats key), or None if it can."""
    if not (q.is_cuda and k.device == q.device and v.device == q.device):
        return "fallback_device"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "fallback_dtype"
    shape = (q.shape[0], q.shape[2], k.shape[2], q.shape[1], k.shape[1], q.shape[-1], v.shape[-1])
    device_index = q.device.index or 0
    return shape_unsupported_reason(q.dtype, shape, mask_type, window_size, dropout_p, training, device_index, fp8_recipe)


def fused_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_type: str,
    window_size: tuple[int, int],
    softmax_scale: float,
    dropout_p: float,
    training: bool,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_kv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """TE fused attention forward on contiguous bshd tensors; returns (out bshd, aux tensors for the backward).
    ``cu_seqlens_*`` (int32, B + 1, on the device) give per-sequence lengths for the ``padding*`` mask types."""
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    with torch.cuda.device(q.device):  # TE allocates its outputs and launches on the current device
        out, aux = fused_attn_fwd(
            training,
            q_len,
            kv_len,
            _cu_seqlens(batch, q_len, q.device) if cu_seqlens_q is None else cu_seqlens_q,
            _cu_seqlens(batch, kv_len, q.device) if cu_seqlens_kv is None else cu_seqlens_kv,
            q,
            k,
            v,
            q.dtype,
            _F16,
            attn_scale=softmax_scale,
            dropout=dropout_p,
            attn_mask_type=mask_type,
            window_size=window_size,
            **_LAYOUT,
        )
    return out, list(aux) if aux is not None else []


def fused_backward(
    d_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    aux: list[torch.Tensor],
    mask_type: str,
    window_size: tuple[int, int],
    softmax_scale: float,
    dropout_p: float,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_kv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TE fused attention backward; returns (dq, dk, dv) in bshd."""
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    with torch.cuda.device(q.device):
        grads = fused_attn_bwd(
            q_len,
            kv_len,
            _cu_seqlens(batch, q_len, q.device) if cu_seqlens_q is None else cu_seqlens_q,
            _cu_seqlens(batch, kv_len, q.device) if cu_seqlens_kv is None else cu_seqlens_kv,
            q,
            k,
            v,
            out,
            d_out.contiguous(),
            q.dtype,
            aux,
            _F16,
            attn_scale=softmax_scale,
            dropout=dropout_p,
            attn_mask_type=mask_type,
            window_size=window_size,
            do_format="bshd",
            dqkv_layout="bshd_bshd_bshd",
            deterministic=_deterministic(),
            **_LAYOUT,
        )
    return grads[0], grads[1], grads[2]


class _FusedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q, k, v, mask_type, window_size, softmax_scale, dropout_p):  # noqa: ANN001
        out, aux = fused_forward(q, k, v, mask_type, window_size, softmax_scale, dropout_p, True)
        ctx.save_for_backward(q, k, v, out, *aux)
        ctx.config = (mask_type, window_size, softmax_scale, dropout_p)
        return out

    @staticmethod
    def backward(ctx: Any, d_out):  # noqa: ANN001
        q, k, v, out, *aux = ctx.saved_tensors
        dq, dk, dv = fused_backward(d_out, q, k, v, out, aux, *ctx.config)
        return dq, dk, dv, None, None, None, None


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_type: str,
    window_size: tuple[int, int],
    softmax_scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Differentiable TE fused attention on contiguous bshd tensors (native GQA); returns bshd."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FusedAttentionFunction.apply(q, k, v, mask_type, tuple(window_size), softmax_scale, dropout_p)
    return fused_forward(q, k, v, mask_type, window_size, softmax_scale, dropout_p, dropout_p > 0)[0]


class TEDotProductAttention(te.DotProductAttention):
    """TE's ``DotProductAttention`` with a fast path for plain bshd calls.

    Calls with only q/k/v, ``attn_mask_type`` and ``window_size``, outside FP8 attention, on contiguous CUDA
    fp16/bf16 tensors that TE's F16 fused backend supports go straight to the fused kernels; everything else
    (FP8 attention, padding masks, context parallelism, ...) runs TE's own forward unchanged.
    """

    def unsupported_reason(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_type: str, window_size: tuple[int, int]
    ) -> str | None:
        """Why this module cannot run these bshd tensors (a te_fx stats key), or None."""
        dropout_p = self.attention_dropout if self.training else 0.0
        fp8_recipe = _fp8_attention_recipe()
        if fp8_recipe is not None:  # TE's own forward runs FP8 attention, and selects its backend by module mode
            training = self.training
        else:
            training = dropout_p > 0 or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
        return unsupported_reason(q, k, v, mask_type, window_size, dropout_p, training, fp8_recipe)

    def run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_type: str, window_size: tuple[int, int]
    ) -> torch.Tensor:
        """bshd in, bshd (B, Sq, H, Dv) out, for callers that have already asked :meth:`unsupported_reason` (te_fx's
        SDPA replacement, once per call): the fused kernels directly, or TE's own forward for FP8 attention."""
        if _fp8_attention_recipe() is not None:
            with torch.cuda.device(q.device):
                out = super().forward(q, k, v, attn_mask_type=mask_type, window_size=window_size)
            return out.view(*q.shape[:3], -1)
        dropout_p = self.attention_dropout if self.training else 0.0
        return fused_attention(
            q.contiguous(), k.contiguous(), v.contiguous(), mask_type, window_size, self.softmax_scale, dropout_p
        )

    def forward(self, query_layer, key_layer, value_layer, *args, **kwargs):  # noqa: ANN001, ANN201
        mask_type = kwargs.pop("attn_mask_type", None) or self.attn_mask_type
        window_size = dpa_utils.check_set_window_size(mask_type, kwargs.pop("window_size", None) or self.window_size)
        q, k, v = query_layer, key_layer, value_layer
        if (
            args
            or kwargs
            or self.qkv_format != "bshd"
            or self.unsupported_reason(q, k, v, mask_type, window_size) is not None
        ):
            return super().forward(q, k, v, *args, attn_mask_type=mask_type, window_size=window_size, **kwargs)
        return self.run(q, k, v, mask_type, window_size).flatten(2)
