"""The TE executor: TransformerEngine's fused attention, called with as little host work as possible.

The only module of te_fx that imports ``transformer_engine``. TE's ``DotProductAttention`` re-selects its backend
on every call (0.2-0.5 ms of Python); :class:`TEDotProductAttention` keeps the module (FP8, context parallelism,
everything else still goes through it) but sends plain bshd fp16/bf16 calls straight to
``fused_attn_fwd``/``fused_attn_bwd``, with the backend decision cached per shape. :class:`TEExecutor` is the
kernels behind te_fx's custom ops, in TE's bshd and thd formats.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import transformer_engine.pytorch as te
from transformer_engine.pytorch.attention.dot_product_attention import (
    utils as dpa_utils,
)
from transformer_engine.pytorch.cpp_extensions.fused_attn import (
    FusedAttnBackend,
    fused_attn_bwd,
    fused_attn_fwd,
)
from transformer_engine.pytorch.quantization import FP8GlobalStateManager
from transformer_engine.pytorch.utils import get_cudnn_version

from ..core.plan import AttentionPlan
from . import (
    AttentionCall,
    Executor,
    ExecutorModule,
    is_training,
    qkv_mismatch_reason,
    te_limits_reason,
)

__all__ = [
    "TEDotProductAttention",
    "TEExecutor",
    "call_unsupported_reason",
    "fused_attention",
    "fused_backward",
    "fused_forward",
    "selected_backend",
    "shape_unsupported_reason",
]

_F16 = FusedAttnBackend.F16_arbitrary_seqlen
_QKV_LAYOUT = {"bshd": "bshd_bshd_bshd", "thd": "thd_thd_thd"}


_FULL_ROWS: dict[tuple[int, int, torch.device], torch.Tensor] = {}  # the oldest of more than 256 dropped


def _full_rows(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


def _cu_seqlens(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """(B + 1,) int32 boundaries of full rows, which TE takes with every bshd call, kept for later calls. Not under
    CUDA graph capture, whose graph keeps a tensor of its own pool that no later call drops; nor kept when made on
    another stream than the default, as a graph pool's warm-up (Inductor's cudagraph trees) is: the pool hands its
    memory to later graphs."""
    if torch.cuda.is_current_stream_capturing():
        return _full_rows(batch, seqlen, device)
    key = (batch, seqlen, device)
    full = _FULL_ROWS.get(key)
    if full is None:
        full = _full_rows(batch, seqlen, device)
        if torch.cuda.current_stream(device) == torch.cuda.default_stream(device):
            _FULL_ROWS[key] = full
            if len(_FULL_ROWS) > 256:
                _FULL_ROWS.pop(next(iter(_FULL_ROWS)), None)
    return full


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


def _select_backend(
    dtype: torch.dtype,
    shape: tuple[int, int, int, int, int, int, int, int, int],
    mask_type: str,
    window_size: tuple[int, int],
    dropout_p: float,
    training: bool,
    fp8_recipe: Any,
    deterministic: bool,
    qkv_format: str = "bshd",
    softmax_type: str = "vanilla",
    key_bias: bool = False,
) -> tuple:
    """TE's own backend selection (``get_attention_backend``) for this call, as TE's ``DotProductAttention`` asks
    it. ``shape`` ends with the device and the token count of a thd call (TE's ``num_tokens_q/kv``; 0 in bshd).
    ``key_bias``: one row's post-scale key bias, (1, 1, 1, kv_len) without a gradient (TE's "111s" shape)."""
    batch, heads, kv_heads, q_len, kv_len, dqk, dv, device_index, tokens = shape
    fp8 = {} if fp8_recipe is None else {"fp8": True, "fp8_meta": {"recipe": fp8_recipe}}
    if key_bias:  # run a row at a time
        batch = 1
        fp8["core_attention_bias_type"] = "post_scale_bias"
        fp8["core_attention_bias_shape"] = (1, 1, 1, kv_len)
        fp8["core_attention_bias_requires_grad"] = False
    params = dpa_utils.AttentionParams(
        qkv_dtype=dtype,
        qkv_layout=_QKV_LAYOUT[qkv_format],
        batch_size=batch,
        num_heads=heads,
        num_gqa_groups=kv_heads,
        max_seqlen_q=q_len,
        max_seqlen_kv=kv_len,
        num_tokens_q=tokens,
        num_tokens_kv=tokens,
        head_dim_qk=dqk,
        head_dim_v=dv,
        attn_mask_type=mask_type,
        window_size=window_size,
        bottom_right_diagonal=mask_type.endswith("bottom_right"),
        attention_dropout=dropout_p,
        is_training=training,
        deterministic=deterministic,
        softmax_type=softmax_type,
        **fp8,
    )
    with torch.cuda.device(device_index):
        return dpa_utils.get_attention_backend(params)


@functools.lru_cache(maxsize=4096)
def _backend_ok(
    dtype: torch.dtype,
    shape: tuple[int, int, int, int, int, int, int, int, int],
    mask_type: str,
    window_size: tuple[int, int],
    dropout_p: float,
    training: bool,
    fp8_key: tuple | None,
    deterministic: bool,
    qkv_format: str = "bshd",
    softmax_type: str = "vanilla",
    key_bias: bool = False,
) -> bool:
    """Whether TE selects its fused attention for this call: the F16 backend, or the FP8 one while FP8 attention
    is on (``fp8_key``, from :func:`_recipe_key` of the current recipe), with deterministic kernels if asked."""
    recipe = None if fp8_key is None else FP8GlobalStateManager.get_fp8_recipe()
    selection = _select_backend(
        dtype, shape, mask_type, window_size, dropout_p, training, recipe, deterministic, qkv_format, softmax_type,
        key_bias,
    )  # fmt: skip
    fused_available, fused_backend = selection[5][1], selection[3]
    wanted = _F16 if fp8_key is None else FusedAttnBackend.FP8
    return bool(fused_available) and fused_backend is not None and int(fused_backend) == int(wanted)


def selected_backend(
    dtype: torch.dtype,
    shape: tuple[int, int, int, int, int, int, int],
    mask_type: str,
    window_size: tuple[int, int],
    dropout_p: float = 0.0,
    training: bool = False,
    device_index: int = 0,
) -> str:
    """The backend TE's own ``DotProductAttention`` selects for (batch, heads, kv_heads, q_len, kv_len, head_dim_qk,
    head_dim_v) in bshd: "FlashAttention (...)", "FusedAttention (<FusedAttnBackend name>)",
    "UnfusedDotProductAttention (no fused kernel for this shape)" or "no backend" (what ``te-fx check`` reports)."""
    selection = _select_backend(
        dtype, (*shape, device_index, 0), mask_type, tuple(window_size), dropout_p, training, None, _deterministic()
    )
    use_flash, flash_backend, use_fused, fused_backend, use_unfused = selection[:5]
    if use_flash:
        return f"FlashAttention{f' ({flash_backend})' if flash_backend is not None else ''}"
    if use_fused:
        try:  # TE returns an int or a FusedAttnBackend member, depending on its version
            cast = getattr(FusedAttnBackend, "cast", None)
            name = str((cast(fused_backend) if cast else FusedAttnBackend(int(fused_backend))).name)
        except Exception:  # noqa: BLE001
            name = str(getattr(fused_backend, "name", fused_backend))
        return f"FusedAttention ({name})"
    if use_unfused:
        return "UnfusedDotProductAttention (no fused kernel for this shape)"
    return "no backend"


@functools.lru_cache(maxsize=64)
def _packed_softmax_stats(device_index: int) -> bool:
    """Whether TE keeps thd softmax statistics per token, (T, H, 1), as te_fx's fake implementation declares: cuDNN
    >= 9.6 on sm90 or later but not sm120 (TE 2.20's ``uses_ragged_stats``; otherwise they are (B, H, S, 1))."""
    major, minor = torch.cuda.get_device_capability(device_index)
    sm = 10 * major + minor
    return tuple(int(part) for part in get_cudnn_version()) >= (9, 6, 0) and sm >= 90 and sm != 120


def shape_unsupported_reason(
    dtype: torch.dtype,
    shape: tuple[int, int, int, int, int, int, int],
    mask_type: str,
    window_size: tuple[int, int],
    dropout_p: float = 0.0,
    training: bool = False,
    device_index: int = 0,
    fp8_recipe: Any = None,
    qkv_format: str = "bshd",
    num_tokens: int | None = None,
    softmax_type: str = "vanilla",
    key_bias: bool = False,
) -> str | None:
    """Why TE's fused attention cannot run (batch, heads, kv_heads, q_len, kv_len, head_dim_qk, head_dim_v) in
    ``dtype`` (a stats key), or None if it can: the F16 backend, or the FP8 one under an FP8 attention recipe.
    In the thd format batch is the number of documents, q_len / kv_len bound their lengths and ``num_tokens``
    (default: batch * q_len, a bound) counts the packed tokens; te_fx runs thd in F16 only. Decided from metadata
    only, so compile-time guards use it too. ``softmax_type`` "learnable" asks for attention sinks, ``key_bias`` for
    a post-scale key bias (run a row at a time), which te_fx runs in F16 only."""
    reason = te_limits_reason(dtype, "cuda", shape[5], shape[6])  # the call runs on CUDA device ``device_index``
    if reason is not None:
        return reason
    if fp8_recipe is not None and (qkv_format == "thd" or key_bias):
        return "fallback_fp8"
    if key_bias and mask_type.endswith("bottom_right"):
        return "fallback_mask"  # TE's output is wrong there (:func:`~te_fx.core.plan.key_bias_terms`)
    if qkv_format == "thd":
        if not _packed_softmax_stats(device_index):
            return "fallback_shape"
        tokens = shape[0] * shape[3] if num_tokens is None else num_tokens
    else:
        tokens = 0
    key = _recipe_key(fp8_recipe)
    config = (
        mask_type, tuple(window_size), float(dropout_p), bool(training), key, _deterministic(), qkv_format,
        softmax_type, key_bias,
    )  # fmt: skip
    if not _backend_ok(dtype, (*shape, device_index, tokens), *config):
        return "fallback_shape" if key is None else "fallback_fp8"
    return None


def call_unsupported_reason(call: AttentionCall, fp8_recipe: Any = None) -> str | None:
    """Why TE's fused attention cannot run ``call`` (a stats key), or None if it can: :func:`te_limits_reason`, then
    :func:`shape_unsupported_reason` on the call's CUDA device."""
    reason = te_limits_reason(call.dtype, call.device.type, call.shape[5], call.shape[6])
    if reason is not None:
        return reason
    return shape_unsupported_reason(
        call.dtype, call.shape, call.mask_type, call.window_size, call.dropout_p, call.training,
        call.device.index or 0, fp8_recipe, call.qkv_format, call.num_tokens, call.softmax_type, call.key_bias,
    )  # fmt: skip


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """Contiguous bshd (B, S, H, D) as thd (B * S, H, D)."""
    return x.view(-1, *x.shape[2:])


def _zero_rows_beyond(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """bshd ``x`` with each row's tokens past its length zero: what TE's bshd kernels leave unspecified there."""
    positions = torch.arange(x.shape[1], device=x.device)
    inside = positions[None, :] < cu_seqlens.diff()[:, None]
    return torch.where(inside[:, :, None, None], x, 0.0)


def _packed_stats(stats: torch.Tensor, tokens: int) -> torch.Tensor:
    """TE's thd softmax statistics as the (T, H, 1) te_fx's fake declares. TE 2.20 documents [tq, h, 1]; a buffer
    with more rows (a bucketed token count) holds token t in row t, so its first T rows are the statistics."""
    if stats.dim() != 3 or stats.shape[0] < tokens:
        raise RuntimeError(f"TE returned thd softmax statistics of shape {tuple(stats.shape)}, not ({tokens}, H, 1): "
                           "te_fx's thd path needs cuDNN >= 9.6 on sm90+ (not sm120)")  # fmt: skip
    return stats[:tokens]


def _softmax_args(softmax_offset: torch.Tensor | None) -> dict[str, Any]:
    """TE's softmax keywords: its "learnable" softmax with the (1, H, 1, 1) offset, or none (vanilla)."""
    if softmax_offset is None:
        return {}
    return {"softmax_type": "learnable", "softmax_offset": softmax_offset.view(1, -1, 1, 1)}


_NO_KEY_BIAS_BACKWARD = (
    "te_fx's TE executor runs a key bias in inference only: TE's fused backward with a post-scale bias gave wrong "
    "gradients (TE 2.20, cuDNN 9.19, H200); te_fx.ops.attention routes padded rows otherwise in training"
)
_NO_KEY_BIAS_BOTTOM_RIGHT = (
    "te_fx's TE executor does not run a key bias with a bottom-right causal mask type: TE's output with a post-scale "
    "bias there was wrong (TE 2.20, cuDNN 9.19, H200); several queries of a KV cache with key padding run on SDPA"
)


def _keys_aligned_for_one_query(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one query (decode), K, V and the key bias padded to a multiple of 64 keys, the added ones hidden by the
    bias: TE 2.20 / cuDNN 9.19 on an H200 failed for one query with a bias over an odd number of keys (an error, or
    a misaligned access), and ran 20, 24, 64, 100 and 384 keys right."""
    extra = -k.shape[1] % 64
    if q.shape[1] != 1 or extra == 0:
        return k, v, key_bias
    k, v = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, extra)) for t in (k, v))
    return k, v, torch.nn.functional.pad(key_bias, (0, extra), value=torch.finfo(key_bias.dtype).min)


def _rows(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Each batch row of ``tensors`` as (1, ...) views: TE takes a key bias for one row at a time (its (B, 1, 1, S)
    form made cuDNN's backward access illegal memory)."""
    return [tuple(t[row : row + 1] for t in tensors) for row in range(tensors[0].shape[0])]


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
    qkv_format: str = "bshd",
    softmax_offset: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """TE fused attention forward on contiguous bshd tensors; returns (out bshd, aux tensors for the backward).
    In "bshd", ``cu_seqlens_*`` (int32, B + 1, on the device) give per-row lengths for the ``padding*`` mask types
    (None: full rows; query rows past a length come back zero); in "thd", the documents packed over the B * S
    tokens, each at most S long. ``softmax_offset`` (H,) float32 runs TE's "learnable" softmax (sinks);
    ``key_bias`` (1, 1, 1, S), for a single row, TE's post-scale bias."""
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    if qkv_format == "thd":
        layout = {"cu_seqlens_q_padded": cu_seqlens_q, "cu_seqlens_kv_padded": cu_seqlens_kv}  # no gaps between docs
        q_in, k_in, v_in = _tokens(q), _tokens(k), _tokens(v)
    else:
        layout = {}
        q_in, k_in, v_in = q, k, v
    layout.update(_softmax_args(softmax_offset))
    if key_bias is not None:
        layout.update(attn_bias_type="post_scale_bias", attn_bias=key_bias)
    with torch.cuda.device(q.device):  # TE allocates its outputs and launches on the current device
        out, aux = fused_attn_fwd(
            training,
            q_len,
            kv_len,
            _cu_seqlens(batch, q_len, q.device) if cu_seqlens_q is None else cu_seqlens_q,
            _cu_seqlens(batch, kv_len, q.device) if cu_seqlens_kv is None else cu_seqlens_kv,
            q_in,
            k_in,
            v_in,
            q.dtype,
            _F16,
            attn_scale=softmax_scale,
            dropout=dropout_p,
            attn_mask_type=mask_type,
            window_size=window_size,
            qkv_layout=_QKV_LAYOUT[qkv_format],
            o_format=qkv_format,
            cuda_graph=torch.cuda.is_current_stream_capturing(),
            **layout,
        )
    aux = list(aux) if aux is not None else []
    if qkv_format == "thd":
        out = out.view(*q.shape[:3], -1)
        if aux:
            aux[0] = _packed_stats(aux[0], q_in.shape[0])
    elif cu_seqlens_q is not None and mask_type.startswith("padding"):
        out = _zero_rows_beyond(out, cu_seqlens_q)
    return out, aux


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
    qkv_format: str = "bshd",
    softmax_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """TE fused attention backward of :func:`fused_forward`; returns (dq, dk, dv) in bshd and the (H,) gradient of
    ``softmax_offset`` (None without one)."""
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    tensors = (q, k, v, out, d_out.contiguous())
    layout = _softmax_args(softmax_offset)
    if softmax_offset is not None:  # TE's aux pack ends with the offset it ran the forward with
        aux = [*aux, layout.pop("softmax_offset")]
    if qkv_format == "thd":
        layout.update(cu_seqlens_q_padded=cu_seqlens_q, cu_seqlens_kv_padded=cu_seqlens_kv)
        tensors = tuple(_tokens(t) for t in tensors)
    with torch.cuda.device(q.device):
        grads = fused_attn_bwd(
            q_len,
            kv_len,
            _cu_seqlens(batch, q_len, q.device) if cu_seqlens_q is None else cu_seqlens_q,
            _cu_seqlens(batch, kv_len, q.device) if cu_seqlens_kv is None else cu_seqlens_kv,
            *tensors,
            q.dtype,
            aux,
            _F16,
            attn_scale=softmax_scale,
            dropout=dropout_p,
            attn_mask_type=mask_type,
            window_size=window_size,
            qkv_layout=_QKV_LAYOUT[qkv_format],
            o_format=qkv_format,
            do_format=qkv_format,
            dqkv_layout=_QKV_LAYOUT[qkv_format],
            deterministic=_deterministic(),
            cuda_graph=torch.cuda.is_current_stream_capturing(),
            **layout,
        )
    dq, dk, dv = (grad.view(t.shape) for grad, t in zip(grads[:3], (q, k, v)))
    if qkv_format == "bshd" and cu_seqlens_q is not None and mask_type.startswith("padding"):
        dq = _zero_rows_beyond(dq, cu_seqlens_q)
    return dq, dk, dv, None if softmax_offset is None else grads[4].view(-1)


class TEExecutor(Executor):
    """TE's fused kernels behind te_fx's custom ops. Training, its aux tensors are TE's: the softmax statistics,
    (B, H, Sq, 1) float32 in bshd and (B * S, H, 1) in thd, and the RNG state, (2,) int64; empty otherwise."""

    name = "te"

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
        config = (mask_type, window_size, softmax_scale, dropout_p, training, cu_seqlens_q, cu_seqlens_kv, qkv_format,
                  softmax_offset)  # fmt: skip
        if key_bias is not None:
            if training:
                raise NotImplementedError(_NO_KEY_BIAS_BACKWARD)
            if mask_type.endswith("bottom_right"):
                raise NotImplementedError(_NO_KEY_BIAS_BOTTOM_RIGHT)
            k, v, key_bias = _keys_aligned_for_one_query(q, k, v, key_bias)
            out = torch.cat([fused_forward(*row, *config, key_bias=bias)[0] for *row, bias in _rows(q, k, v, key_bias)])
            return out, q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.int64)
        out, aux = fused_forward(q, k, v, *config)
        if not training:
            return out, q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.int64)
        return out, aux[0], aux[1]

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
        if key_bias is not None:
            raise NotImplementedError(_NO_KEY_BIAS_BACKWARD)
        return fused_backward(
            d_out, q, k, v, out, [softmax_stats, rng_state], mask_type, window_size, softmax_scale, dropout_p,
            cu_seqlens_q, cu_seqlens_kv, qkv_format, softmax_offset,
        )  # fmt: skip

    def fake_aux(
        self, q: torch.Tensor, qkv_format: str, dropout_p: float, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not training:
            return q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.int64)
        batch, q_len, heads = q.shape[0], q.shape[1], q.shape[2]
        if qkv_format == "thd":
            stats = q.new_empty(batch * q_len, heads, 1, dtype=torch.float32)
        else:
            stats = q.new_empty(batch, heads, q_len, 1, dtype=torch.float32)
        return stats, q.new_empty(2, dtype=torch.int64)

    def call_unsupported_reason(self, call: AttentionCall) -> str | None:
        return call_unsupported_reason(call)


class _FusedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q, k, v, mask_type, window_size, softmax_scale, dropout_p):
        out, aux = fused_forward(q, k, v, mask_type, window_size, softmax_scale, dropout_p, True)
        ctx.save_for_backward(q, k, v, out, *aux)
        ctx.config = (mask_type, window_size, softmax_scale, dropout_p)
        return out

    @staticmethod
    def backward(ctx: Any, d_out):
        q, k, v, out, *aux = ctx.saved_tensors
        dq, dk, dv, _ = fused_backward(d_out, q, k, v, out, aux, *ctx.config)
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


class TEDotProductAttention(ExecutorModule, te.DotProductAttention):
    """TE's ``DotProductAttention`` with a fast path for plain bshd calls, and te_fx's plans.

    Calls with only q/k/v, ``attn_mask_type`` and ``window_size``, outside FP8 attention, on contiguous CUDA
    fp16/bf16 tensors that TE's F16 fused backend supports go straight to the fused kernels; everything else
    (FP8 attention, padding masks, context parallelism, ...) runs TE's own forward unchanged. :meth:`run` takes
    key-padding and packed-document plans too, through te_fx's op.
    """

    def unsupported_reason(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> str | None:
        """Why this module cannot run ``plan`` on these bshd tensors (a te_fx stats key), or None; with the mask
        type and format TE will run (padding_causal for key padding, thd for packed documents)."""
        dropout_p = self._dropout_p()
        fp8_recipe = _fp8_attention_recipe()
        if fp8_recipe is not None:  # TE's own forward runs FP8 attention, and selects its backend by module mode
            if plan.key_padding is not None or plan.cu_seqlens is not None:
                return "fallback_fp8"
            if plan.softmax_scale is not None and plan.softmax_scale != self.softmax_scale:
                return "fallback_scale_mismatch"
            training = self.training
        else:
            training = is_training(dropout_p, q, k, v)
        reason = qkv_mismatch_reason(q, k, v)
        if reason is not None:
            return reason
        return call_unsupported_reason(AttentionCall.of_plan(q, k, v, plan, dropout_p, training), fp8_recipe)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """bshd in, bshd (B, Sq, H, Dv) out, for callers that have already asked :meth:`unsupported_reason` (te_fx's
        SDPA replacement, once per call): the fused kernels directly, TE's own forward for FP8 attention, te_fx's
        op for key-padding and packed-document plans."""
        if plan.key_padding is not None or plan.cu_seqlens is not None:
            return self._run_op(q, k, v, plan, "te")
        if _fp8_attention_recipe() is not None:
            with torch.cuda.device(q.device):
                out = super().forward(q, k, v, attn_mask_type=plan.mask_type, window_size=plan.window_size)
            return out.view(*q.shape[:3], -1)
        return fused_attention(
            q.contiguous(), k.contiguous(), v.contiguous(), plan.mask_type, plan.window_size,
            self._softmax_scale(plan, q.shape[-1]), self._dropout_p(),
        )  # fmt: skip

    def forward(self, query_layer, key_layer, value_layer, *args, **kwargs):
        mask_type = kwargs.pop("attn_mask_type", None) or self.attn_mask_type
        window_size = dpa_utils.check_set_window_size(mask_type, kwargs.pop("window_size", None) or self.window_size)
        q, k, v = query_layer, key_layer, value_layer
        plan = AttentionPlan(mask_type, tuple(window_size))
        if args or kwargs or self.qkv_format != "bshd" or self.unsupported_reason(q, k, v, plan) is not None:
            return super().forward(q, k, v, *args, attn_mask_type=mask_type, window_size=window_size, **kwargs)
        return self.run(q, k, v, plan).flatten(2)
