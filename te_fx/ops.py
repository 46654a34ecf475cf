"""The custom ops: te_fx's attention as ``torch.library`` ops, so torch.compile graphs can hold it.

``te_fx::attention_fwd`` and ``te_fx::attention_bwd`` are functional ops with fake implementations and autograd
registered, in the style of flash-attn's op wrappers. They dispatch to an :class:`~te_fx.executors.Executor`: "te"
runs TE's fused attention (CUDA, fp16/bf16), "reference" the pure-PyTorch reference on any device. Tensors are bshd:
q (B, Sq, H, Dqk), k (B, Skv, Hkv, Dqk), v (B, Skv, Hkv, Dv) -> out (B, Sq, H, Dv); ``qkv_format`` "thd" has the
executor read the B * S tokens as one packed sequence of documents.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch._library.custom_ops import CustomOpDef
from torch.torch_version import TorchVersion

from .core.masks import document_boundaries, in_window, padding_layout, position_starts
from .core.plan import UNKNOWN_LAYOUT, PaddingLayout, key_bias_terms, padding_route
from .executors import EXECUTORS, get_executor, is_training, thd_mask_type

__all__ = ["attention"]

# the forwards draw dropout randomness from torch's generators: a compiled graph that recomputes them (activation
# checkpointing) must replay the generator state, as it does for aten's random ops
_SEEDED = (torch.Tag.nondeterministic_seeded,)
# ops that read a value on the host (a padding layout, a document count) or choose their kernels from one: a CUDA
# graph would replay what it captured, so Inductor's cudagraphs (mode="reduce-overhead") run them outside its graphs
_HOST_CHOSEN = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()  # torch >= 2.9


_FUNCTIONS: dict[CustomOpDef, Callable] = {}
_PLAIN = (Tensor, torch.nn.Parameter)  # a Parameter dispatches as its tensor


def _op(name: str, tags: tuple = ()) -> Callable[[Callable], CustomOpDef]:
    """``torch.library.custom_op(name)`` of a functional op, keeping its function for eager calls (:func:`_call`)."""

    def register(function: Callable) -> CustomOpDef:
        op = torch.library.custom_op(name, mutates_args=(), tags=tags)(function)
        _FUNCTIONS[op] = function
        return op

    return register


def _runs_direct(args: tuple) -> bool:
    """Whether an eager call may run an op's function itself, without the dispatcher (tens of microseconds of host
    time per call): nothing traces it (torch.compile, export, ``torch.jit.trace``), nothing watches ops (a dispatch
    or function mode, functorch's transforms, the profiler) and its tensors are plain. Anything else sees te_fx's
    ops as the dispatcher runs them (meta tensors its fake kernels)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._are_functorch_transforms_active() or torch._C._autograd._profiler_enabled():
        return False
    return all(type(arg) in _PLAIN and not arg.is_meta for arg in args if isinstance(arg, Tensor))


def _differentiable(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(arg.requires_grad for arg in args if isinstance(arg, Tensor))


def _call(op: CustomOpDef, *args: Any) -> Any:
    """``op(*args)`` for an op without autograd: its function itself where :func:`_runs_direct` and autograd
    would not record it. A backward differentiated again (``create_graph=True``) goes through the op, which says
    it has no derivative: TE's kernels return gradients without a graph, whose second derivatives would be
    silently missing."""
    direct = not _differentiable(args) and _runs_direct(args)
    return _FUNCTIONS[op](*args) if direct else op(*args)


class _AutogradRule(NamedTuple):
    """A forward op's autograd as registered on it, and its schema's defaults, for :class:`_EagerAutograd`."""

    op: CustomOpDef
    function: Callable
    setup_context: Callable
    backward: Callable
    defaults: tuple


_RULES: dict[CustomOpDef, _AutogradRule] = {}


def _register_autograd(op: CustomOpDef, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd``, and the same rule for eager calls (:func:`_forward`)."""
    op.register_autograd(backward, setup_context=setup_context)
    defaults = tuple(argument.default_value for argument in op._opoverload._schema.arguments)
    _RULES[op] = _AutogradRule(op, _FUNCTIONS[op], setup_context, backward, defaults)


class _EagerAutograd(torch.autograd.Function):
    """A forward op's registered autograd for eager calls that :func:`_runs_direct`: the dispatcher's autograd for
    Python custom ops costs more host time per call than te_fx's own work."""

    @staticmethod
    def forward(ctx: Any, rule: _AutogradRule, *args: Any) -> tuple[Tensor, ...]:
        output = rule.function(*args)
        rule.setup_context(ctx, args, output)
        ctx.mark_non_differentiable(*output[1:])
        ctx.rule = rule
        return output

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        return None, *ctx.rule.backward(ctx, *grads)


def _forward(op: CustomOpDef, *args: Any) -> tuple[Tensor, ...]:
    """``op(*args)`` for a forward op with autograd: where :func:`_runs_direct`, its function itself, under
    :class:`_EagerAutograd` when autograd may differentiate it; anything else through the op's registration."""
    rule = _RULES[op]
    args += rule.defaults[len(args) :]
    if not _runs_direct(args):
        return op(*args)
    if _differentiable(args):
        return _EagerAutograd.apply(rule, *args)
    return rule.function(*args)


def _fake_forward(
    q: Tensor, v: Tensor, executor: str, qkv_format: str, dropout_p: float, training: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """What a forward op returns, as fake tensors: out (B, Sq, H, Dv) and the executor's aux tensors."""
    out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    return out, *get_executor(executor).fake_aux(q, qkv_format, dropout_p, training)


def _fake_grads(q: Tensor, k: Tensor, v: Tensor, softmax_offset: Tensor | None) -> tuple[Tensor, ...]:
    """What a backward op returns, as fake tensors: contiguous gradients whatever the strides of q, k, v (the kernels
    write them so), and the offset's (empty without one)."""
    offset = softmax_offset if softmax_offset is not None else q.new_empty(0, dtype=torch.float32)
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v, offset))


@_op("te_fx::attention_fwd", tags=_SEEDED)
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
    qkv_format: str = "bshd",
    softmax_offset: Tensor | None = None,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention forward; returns (out, softmax_stats, rng_state). The last two are what the backward needs: TE's
    softmax statistics and RNG state (empty when not training), or the reference executor's dropout seed.
    ``cu_seqlens_*`` (int32): in "bshd", per-row lengths for the ``padding*`` mask types (None: full rows); in
    "thd", the boundaries of the documents packed over the B * S tokens. ``softmax_offset`` (H,) float32 (float64
    for the reference on float64): a sink logit per head in every softmax's denominator (TE's "learnable" softmax).
    ``key_bias`` (B, 1, 1, Skv) in q's dtype, bshd only: added to every score of a row's keys after scaling (TE's
    post-scale bias); no gradient."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    window = (window_left, window_right)
    return get_executor(executor).forward(
        q, k, v, cu_seqlens_q, cu_seqlens_kv, qkv_format, mask_type, window, softmax_scale, dropout_p, training,
        softmax_offset, key_bias,
    )  # fmt: skip


@attention_fwd.register_fake
def _(
    q, k, v, cu_seqlens_q, cu_seqlens_kv, mask_type, window_left, window_right, softmax_scale, dropout_p, training,
    executor, qkv_format="bshd", softmax_offset=None, key_bias=None,
):  # fmt: skip
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "te_fx attention takes 4D bshd tensors")
    torch._check(q.shape[2] % k.shape[2] == 0, lambda: "query heads must be a multiple of KV heads")
    return _fake_forward(q, v, executor, qkv_format, dropout_p, training)


@_op("te_fx::attention_bwd")
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
    qkv_format: str = "bshd",
    softmax_offset: Tensor | None = None,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Attention backward; returns (dq, dk, dv), contiguous bshd, and the gradient of ``softmax_offset`` (empty
    without one)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    window = (window_left, window_right)
    dq, dk, dv, d_offset = get_executor(executor).backward(
        d_out.contiguous(), q, k, v, out, softmax_stats, rng_state, cu_seqlens_q, cu_seqlens_kv, qkv_format,
        mask_type, window, softmax_scale, dropout_p, softmax_offset, key_bias,
    )  # fmt: skip
    return dq, dk, dv, d_offset if d_offset is not None else q.new_empty(0, dtype=torch.float32)


@attention_bwd.register_fake
def _(
    d_out, q, k, v, out, softmax_stats, rng_state, cu_seqlens_q, cu_seqlens_kv, mask_type, window_left, window_right,
    softmax_scale, dropout_p, executor, qkv_format="bshd", softmax_offset=None, key_bias=None,
):  # fmt: skip
    return _fake_grads(q, k, v, softmax_offset)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, cu_q, cu_kv, *config, offset, key_bias = inputs
    out, stats, rng = output
    ctx.save_for_backward(q, k, v, out, stats, rng, cu_q, cu_kv, offset, key_bias)
    ctx.config = tuple(config[:5]) + tuple(config[6:])  # mask_type ... dropout_p, executor, qkv_format


def _backward(ctx: Any, d_out: Tensor, _d_stats: Tensor, _d_rng: Tensor) -> tuple:
    q, k, v, out, stats, rng, cu_q, cu_kv, offset, key_bias = ctx.saved_tensors
    dq, dk, dv, d_offset = _call(
        attention_bwd, d_out, q, k, v, out, stats, rng, cu_q, cu_kv, *ctx.config, offset, key_bias
    )
    return dq, dk, dv, *([None] * (len(ctx.config) + 3)), d_offset if offset is not None else None, None


_register_autograd(attention_fwd, _backward, _setup_context)


def _compact_valid_first(keep: Tensor, window_left: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(order, inverse order, cu_seqlens_q, cu_seqlens_kv) for a (B, S) bool keep mask under causal attention with
    ``window_left`` (-1: none).

    A partition of each row (cumulative sums, no sort) puts its kept tokens first, in order, then the padding after
    its first kept token, in order, then the padding before it: "query i sees kept keys j <= i (and j >= i - w)"
    becomes TE's ``padding_causal`` with per-row key lengths, padding at the end of each row as TE requires, and a
    padding query after the kept tokens keeps its distance to them (which the window needs)."""
    seq = keep.shape[1]
    positions = torch.arange(seq, device=keep.device)
    kept_before = keep.cumsum(dim=1)  # kept tokens up to and including each position
    lengths = kept_before[:, -1:]
    leading = (kept_before == 0).sum(dim=1, keepdim=True)  # padding before the first kept token
    # each token's row after the partition: kept ones by rank, then trailing padding, then leading padding
    padding_row = torch.where(kept_before > 0, lengths + positions - kept_before - leading, seq - leading + positions)
    restore = torch.where(keep, kept_before - 1, padding_row)
    order = torch.empty_like(restore).scatter_(1, restore, positions.expand_as(restore))
    # a row with no kept token still gets one key (a padding one, at the front), so that no kernel sees an empty
    # sequence and leaves its output or statistics unwritten; those rows are zeroed afterwards
    cu_seqlens_q, cu_seqlens_kv = _padded_seqlens(lengths.clamp(min=1).flatten(), window_left, seq)
    return order, restore, cu_seqlens_q, cu_seqlens_kv


def _sees_a_key(keep: Tensor, mask_type: str, window_left: int, q_len: int) -> Tensor:
    """(B, q_len) bool: whether a query sees a kept key of a (B, S_kv) bool ``keep``: any with "no_mask"; with a
    causal type, query i at key position p = i + S_kv - q_len (bottom-right) sees keys j <= p (and j >= p - w;
    ``window_left`` -1: none)."""
    kept_before = torch.nn.functional.pad(keep.cumsum(dim=1), (1, 0))  # [:, j]: kept keys before position j
    if mask_type == "no_mask":
        return (kept_before[:, -1:] > 0).expand(-1, q_len)
    end = torch.arange(q_len, device=keep.device) + (keep.shape[1] - q_len + 1)
    start = (end - window_left - 1).clamp(min=0) if window_left >= 0 else torch.zeros_like(end)
    return kept_before[:, end] > kept_before[:, start]


def _padded_seqlens(kv_lengths: Tensor, window_left: int, seq: int) -> tuple[Tensor | None, Tensor]:
    """(cu_seqlens_q, cu_seqlens_kv) of TE's ``padding_causal`` for rows whose (B,) ``kv_lengths`` kept keys come
    first: each query sees the kept keys up to itself, so the queries are the whole row (None), except that with a
    window query r sees ranks max(0, r - w)..min(r, L - 1), none once r >= L + w; those rows (zero in SDPA too)
    stay out of the kernel, which would otherwise see a row without a key, and come back zero."""
    cu_seqlens_q = None if window_left < 0 else _cumulative((kv_lengths + window_left).clamp(max=seq))
    return cu_seqlens_q, _cumulative(kv_lengths)


def _cumulative(lengths: Tensor) -> Tensor:
    """(B + 1,) int32 boundaries of (B,) lengths, as TE takes them."""
    return torch.nn.functional.pad(lengths.cumsum(0).to(torch.int32), (1, 0))


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, s]]`` for (B, S, H, D) ``x``: whole tokens by one index_select over the flattened rows, which
    moves H * D contiguous elements per index (``gather`` with an expanded index reads an index per element)."""
    batch, seq = index.shape
    tokens = (index + torch.arange(0, batch * seq, seq, device=index.device)[:, None]).flatten()
    return x.reshape(batch * seq, *x.shape[2:]).index_select(0, tokens).view(x.shape)


def _refuse_capture(x: Tensor, op: str, instead: str) -> None:
    """A clear error for an op that copies to the host inside CUDA graph capture, which cannot hold the copy."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"te_fx::{op} reads a value on the host, which CUDA graph capture cannot hold: pass "
                           f"{instead} to a captured te_fx call (torch.compile's cudagraphs run the op outside "
                           "their graphs)")  # fmt: skip


@_op("te_fx::padding_layout", tags=_HOST_CHOSEN)
def padding_layout_on_host(keep: Tensor) -> Tensor:
    """:func:`~te_fx.core.masks.padding_layout` of a (B, S) keep mask (nonzero = keep), copied to the host: one
    device-to-host copy, which a compiled graph holds once per mask (the ops that read it then never sync)."""
    _refuse_capture(keep, "padding_layout", "key_padding_layout")
    return padding_layout(keep != 0).cpu()


@padding_layout_on_host.register_fake
def _(keep):
    return torch.empty(3, dtype=torch.bool, device="cpu")


@_op("te_fx::padded_attention_fwd", tags=_SEEDED + _HOST_CHOSEN)
def padded_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor,
    layout: Tensor,
    window_left: int,
    softmax_scale: float,
    dropout_p: float,
    executor: str,
    softmax_offset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal self-attention with a (B, S) key padding mask, training: (out, softmax_stats, rng_state) as
    :func:`attention_fwd`. The route (:func:`~te_fx.core.plan.padding_route`) is chosen here, at run time, from the
    host ``layout`` ((3,) bool, :func:`padding_layout_on_host`), so a compiled graph holds one op for every layout
    the mask may take."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    route, run = padding_route(tuple(layout.tolist()), True), get_executor(executor)
    keep = keep != 0
    window = (window_left, 0)
    if route == "reference":
        stats, rng = run.fake_aux(q, "bshd", dropout_p, True)
        out, _, seed = get_executor("reference").forward(
            q, k, v, None, None, "bshd", "causal", window, softmax_scale, dropout_p, True, softmax_offset,
            _key_bias(keep, q.dtype),
        )  # fmt: skip
        return _zero_unseeing(out, keep, "causal", window_left), stats.zero_(), seed if dropout_p > 0 else rng.zero_()
    if route == "partition":
        order, restore, cu_q, cu_kv = _compact_valid_first(keep, window_left)
        q, k, v = (_gather_rows(t, order) for t in (q, k, v))
    else:
        cu_q, cu_kv = _route_seqlens(route, keep, window_left)
    out, stats, rng = run.forward(
        q, k, v, cu_q, cu_kv, "bshd", _ROUTE_MASK_TYPE[route], window, softmax_scale, dropout_p, True, softmax_offset
    )
    if route == "partition":
        out = _zero_unseeing(_gather_rows(out, restore), keep, "causal", window_left)
    return out, stats, rng


@padded_attention_fwd.register_fake
def _(q, k, v, keep, layout, window_left, softmax_scale, dropout_p, executor, softmax_offset=None):
    return _fake_forward(q, v, executor, "bshd", dropout_p, True)


@_op("te_fx::padded_attention_bwd", tags=_HOST_CHOSEN)
def padded_attention_bwd(
    d_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    softmax_stats: Tensor,
    rng_state: Tensor,
    keep: Tensor,
    layout: Tensor,
    window_left: int,
    softmax_scale: float,
    dropout_p: float,
    executor: str,
    softmax_offset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`padded_attention_fwd`, by the route its forward took: (dq, dk, dv, d_offset)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    route, run = padding_route(tuple(layout.tolist()), True), get_executor(executor)
    keep = keep != 0
    window = (window_left, 0)
    d_out = d_out.contiguous()
    if route in ("reference", "partition"):  # rows the forward zeroed after the kernel
        d_out = _zero_unseeing(d_out, keep, "causal", window_left)
    if route == "reference":
        seed = rng_state if dropout_p > 0 else rng_state[:0]
        grads = get_executor("reference").backward(
            d_out, q, k, v, out, softmax_stats, seed, None, None, "bshd", "causal", window, softmax_scale, dropout_p,
            softmax_offset, _key_bias(keep, q.dtype),
        )  # fmt: skip
    elif route == "partition":
        order, restore, cu_q, cu_kv = _compact_valid_first(keep, window_left)
        tensors = (_gather_rows(t, order) for t in (d_out, q, k, v, out))
        grads = run.backward(
            *tensors, softmax_stats, rng_state, cu_q, cu_kv, "bshd", "padding_causal", window, softmax_scale,
            dropout_p, softmax_offset,
        )  # fmt: skip
        grads = (*(_gather_rows(g, restore) for g in grads[:3]), grads[3])
    else:
        cu_q, cu_kv = _route_seqlens(route, keep, window_left)
        grads = run.backward(
            d_out, q, k, v, out, softmax_stats, rng_state, cu_q, cu_kv, "bshd", _ROUTE_MASK_TYPE[route], window,
            softmax_scale, dropout_p, softmax_offset,
        )  # fmt: skip
    dq, dk, dv, d_offset = grads
    return dq, dk, dv, d_offset if d_offset is not None else q.new_empty(0, dtype=torch.float32)


@padded_attention_bwd.register_fake
def _(
    d_out, q, k, v, out, softmax_stats, rng_state, keep, layout, window_left, softmax_scale, dropout_p, executor,
    softmax_offset=None,
):  # fmt: skip
    return _fake_grads(q, k, v, softmax_offset)


def _padded_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, keep, layout, *config, offset = inputs
    out, stats, rng = output
    ctx.save_for_backward(q, k, v, out, stats, rng, keep, layout, offset)
    ctx.config = tuple(config)  # window_left, softmax_scale, dropout_p, executor


def _padded_backward(ctx: Any, d_out: Tensor, _d_stats: Tensor, _d_rng: Tensor) -> tuple:
    q, k, v, out, stats, rng, keep, layout, offset = ctx.saved_tensors
    dq, dk, dv, d_offset = _call(
        padded_attention_bwd, d_out, q, k, v, out, stats, rng, keep, layout, *ctx.config, offset
    )
    return dq, dk, dv, None, None, *([None] * len(ctx.config)), d_offset if offset is not None else None


_register_autograd(padded_attention_fwd, _padded_backward, _padded_setup_context)


@_op("te_fx::packed_documents", tags=_HOST_CHOSEN)
def packed_documents(position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The packed documents of (B, S) ``position_ids`` (:func:`~te_fx.core.masks.position_starts`): (boundaries,
    count). The (B * S + 1,) int32 boundaries over the flattened tokens stay on the device, the first ``count`` + 1
    of them real (the rest B * S); ``count``, an int64 scalar, is copied to the host after the boundaries are
    queued: one device-to-host copy, which a compiled graph holds once per forward."""
    _refuse_capture(position_ids, "packed_documents", "cu_seqlens")
    starts = position_starts(position_ids)
    boundaries = document_boundaries(starts, starts.numel())
    return boundaries, starts.sum().cpu()


@packed_documents.register_fake
def _(position_ids):
    boundaries = position_ids.new_empty(position_ids.numel() + 1, dtype=torch.int32)
    return boundaries, torch.empty((), dtype=torch.int64, device="cpu")


def _documents(boundaries: Tensor, count: Tensor) -> Tensor:
    """The real boundaries of :func:`packed_documents`'s outputs (a view: ``count`` is on the host)."""
    return boundaries[: int(count) + 1]


@_op("te_fx::packed_attention_fwd", tags=_SEEDED + _HOST_CHOSEN)
def packed_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    boundaries: Tensor,
    count: Tensor,
    mask_type: str,
    window_left: int,
    window_right: int,
    softmax_scale: float,
    dropout_p: float,
    training: bool,
    executor: str,
    softmax_offset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Self-attention within the ``count`` packed documents of :func:`packed_documents`, in the thd format; as
    :func:`attention_fwd`."""
    cu_seqlens = _documents(boundaries, count)
    return get_executor(executor).forward(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, cu_seqlens, "thd", thd_mask_type(mask_type),
        (window_left, window_right), softmax_scale, dropout_p, training, softmax_offset,
    )  # fmt: skip


@packed_attention_fwd.register_fake
def _(q, k, v, boundaries, count, mask_type, window_left, window_right, softmax_scale, dropout_p, training,
      executor, softmax_offset=None):  # fmt: skip
    return _fake_forward(q, v, executor, "thd", dropout_p, training)


@_op("te_fx::packed_attention_bwd", tags=_HOST_CHOSEN)
def packed_attention_bwd(
    d_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    softmax_stats: Tensor,
    rng_state: Tensor,
    boundaries: Tensor,
    count: Tensor,
    mask_type: str,
    window_left: int,
    window_right: int,
    softmax_scale: float,
    dropout_p: float,
    executor: str,
    softmax_offset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`packed_attention_fwd`: as :func:`attention_bwd`."""
    cu_seqlens = _documents(boundaries, count)
    dq, dk, dv, d_offset = get_executor(executor).backward(
        d_out.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out, softmax_stats, rng_state, cu_seqlens,
        cu_seqlens, "thd", thd_mask_type(mask_type), (window_left, window_right), softmax_scale, dropout_p,
        softmax_offset,
    )  # fmt: skip
    return dq, dk, dv, d_offset if d_offset is not None else q.new_empty(0, dtype=torch.float32)


@packed_attention_bwd.register_fake
def _(d_out, q, k, v, out, softmax_stats, rng_state, boundaries, count, mask_type, window_left, window_right,
      softmax_scale, dropout_p, executor, softmax_offset=None):  # fmt: skip
    return _fake_grads(q, k, v, softmax_offset)


def _packed_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, boundaries, count, *config, training, executor, offset = inputs
    out, stats, rng = output
    ctx.save_for_backward(q, k, v, out, stats, rng, boundaries, count, offset)
    ctx.config = (*config, executor)  # mask_type ... dropout_p, executor


def _packed_backward(ctx: Any, d_out: Tensor, _d_stats: Tensor, _d_rng: Tensor) -> tuple:
    q, k, v, out, stats, rng, boundaries, count, offset = ctx.saved_tensors
    dq, dk, dv, d_offset = _call(packed_attention_bwd, d_out, q, k, v, out, stats, rng, boundaries, count,
                                 *ctx.config, offset)  # fmt: skip
    return dq, dk, dv, *([None] * (len(ctx.config) + 3)), d_offset if offset is not None else None


_register_autograd(packed_attention_fwd, _packed_backward, _packed_setup_context)

_ROUTE_MASK_TYPE = {"causal": "causal", "rows": "padding_causal", "partition": "padding_causal"}


def _route_seqlens(route: str, keep: Tensor, window_left: int) -> tuple[Tensor | None, Tensor | None]:
    """(cu_seqlens_q, cu_seqlens_kv) of the "causal" (none) and "rows" routes."""
    if route == "causal":
        return None, None
    return _padded_seqlens(keep.sum(dim=1), window_left, keep.shape[1])


def _zero_unseeing(x: Tensor, keep: Tensor, mask_type: str, window_left: int) -> Tensor:
    """``x`` (B, Sq, H, D) with the rows of queries that see no kept key set to zero (SDPA's output there)."""
    return torch.where(_sees_a_key(keep, mask_type, window_left, x.shape[1])[:, :, None, None], x, 0.0)


def _check_arguments(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask_type: str,
    window_size: tuple[int, int],
    dropout_p: float,
    key_padding_mask: Tensor | None,
    cu_seqlens: Tensor | None,
    position_ids: Tensor | None,
    executor: str,
    softmax_offset: Tensor | None,
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
    if sum(refinement is not None for refinement in (key_padding_mask, cu_seqlens, position_ids)) > 1:
        raise ValueError("pass at most one of key_padding_mask, cu_seqlens and position_ids")
    if softmax_offset is not None:
        offset = softmax_offset
        if offset.dim() != 1 or not offset.is_floating_point() or offset.device != q.device:
            raise ValueError("softmax_offset must be a 1D floating-point tensor on the query's device, got "
                             f"{offset.dim()}D {offset.dtype} on {offset.device}")  # fmt: skip
        _check_size(offset.shape[0] == q.shape[2], "softmax_offset must hold one logit per query head")
    if key_padding_mask is not None:
        _check_key_padding(q, k, mask_type, window_size, key_padding_mask)
    if cu_seqlens is not None or position_ids is not None:
        _check_documents(q, k, mask_type, window_size, cu_seqlens, position_ids)


def _check_key_padding(
    q: Tensor, k: Tensor, mask_type: str, window_size: tuple[int, int], key_padding_mask: Tensor
) -> None:
    causal = mask_type in ("causal", "causal_bottom_right") and window_size[1] == 0 and window_size[0] >= -1
    if not (causal or (mask_type == "no_mask" and tuple(window_size) == (-1, -1))):
        raise ValueError("key_padding_mask needs a causal type with window_size (-1, 0) or (w, 0), or 'no_mask' with "
                         f"(-1, -1), got mask_type {mask_type!r} and window_size {tuple(window_size)}")  # fmt: skip
    if mask_type == "causal" and q.shape[1] != k.shape[1]:
        raise ValueError("key_padding_mask with mask_type 'causal' needs self-attention (q_len == kv_len); a KV "
                         "cache's queries take 'causal_bottom_right'")  # fmt: skip
    if mask_type == "causal_bottom_right" and q.shape[1] > k.shape[1]:
        raise ValueError("key_padding_mask with 'causal_bottom_right' needs q_len <= kv_len")
    if key_padding_mask.dim() != 2 or key_padding_mask.is_floating_point():
        raise ValueError("key_padding_mask must be a (B, S) bool or integer tensor (nonzero = keep), "
                         f"got {key_padding_mask.dim()}D {key_padding_mask.dtype}")  # fmt: skip
    wrong_size = "key_padding_mask must be (B, S_kv): its {} differs from the {}"
    _check_size(key_padding_mask.shape[0] == q.shape[0], wrong_size.format("batch", "query's"))
    _check_size(key_padding_mask.shape[1] == k.shape[1], wrong_size.format("length", "keys'"))


def _check_documents(
    q: Tensor,
    k: Tensor,
    mask_type: str,
    window_size: tuple[int, int],
    cu_seqlens: Tensor | None,
    position_ids: Tensor | None,
) -> None:
    name = "cu_seqlens" if cu_seqlens is not None else "position_ids"
    if mask_type not in ("causal", "no_mask") or q.shape[1] != k.shape[1]:
        raise ValueError(f"{name} needs self-attention (q_len == kv_len) with mask_type 'causal' or 'no_mask', "
                         f"got {mask_type!r}")  # fmt: skip
    if mask_type == "causal" and (window_size[1] != 0 or window_size[0] < -1):
        raise ValueError(f"{name} with causal attention takes window_size (w, 0), got {tuple(window_size)}")
    if cu_seqlens is not None and (cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32
                                   or cu_seqlens.device != q.device):  # fmt: skip
        raise ValueError(f"cu_seqlens must be a 1D int32 tensor on the query's device, got {cu_seqlens.dim()}D "
                         f"{cu_seqlens.dtype} on {cu_seqlens.device}")  # fmt: skip
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.is_floating_point() or position_ids.device != q.device:
            raise ValueError("position_ids must be a (B, S) integer tensor on the query's device, got "
                             f"{position_ids.dim()}D {position_ids.dtype} on {position_ids.device}")  # fmt: skip
        _check_size(position_ids.shape[0] == q.shape[0], "position_ids must be (B, S): its batch differs from q's")
        _check_size(position_ids.shape[1] == q.shape[1], "position_ids must be (B, S): its length differs from q's")


_DYNAMO_TRACES_CHECK_MESSAGES = TorchVersion(torch.__version__) >= (2, 13)


def _check_size(cond: bool, message: str) -> None:
    """A size check that torch.compile keeps (as a guard or run-time assert, no graph break). Dynamo before torch
    2.13 cannot trace a message callable: there the compiled check goes without it."""
    if torch.compiler.is_dynamo_compiling() and not _DYNAMO_TRACES_CHECK_MESSAGES:
        torch._check_value(cond)
    else:
        torch._check_value(cond, lambda: message)


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
    cu_seqlens: Tensor | None = None,
    position_ids: Tensor | None = None,
    executor: str = "te",
    key_padding_layout: PaddingLayout | None = None,
    softmax_offset: Tensor | None = None,
) -> Tensor:
    """Differentiable attention over bshd tensors with native GQA (Hkv divides H), TE mask semantics.

    At most one of these refines ``mask_type`` / ``window_size``:

    * ``key_padding_mask`` (B, S_kv), nonzero = keep, with ``mask_type="causal"`` and window (-1, 0) or (w, 0): query
      i attends to kept keys j <= i (and j >= i - w), as SDPA does with HF's ``causal & attention_mask[b, kv]``
      mask, exact at every position wherever the padding sits, run as :func:`~te_fx.core.plan.padding_route` says.
      In inference also with a KV cache's "causal_bottom_right" (q_len <= kv_len) or "no_mask" (all keys). Rows
      with no such key are zero, as in SDPA, with zero gradients. ``key_padding_layout``: the mask's
      :data:`~te_fx.core.plan.PaddingLayout` where the caller checked it (unchecked: in training the op reads it
      off the mask, one device-to-host copy per call, once per mask in a compiled graph; in inference it needs
      none).
    * ``cu_seqlens`` (N + 1,) int32 (self-attention, q_len == kv_len): boundaries of documents packed over the
      B * S flattened tokens, from 0 to B * S, every multiple of S among them (no document crosses a row; not
      checked, for the same reason). Each document is causal (and windowed) on its own with ``mask_type="causal"``,
      or sees all of itself with "no_mask". Runs TE's thd format.
    * ``position_ids`` (B, S): packed documents as their positions give them
      (:func:`~te_fx.core.masks.position_starts`), for a caller that cannot build ``cu_seqlens`` (a compiled graph):
      the op finds the boundaries at run time, one device-to-host copy per call (once per mask in a compiled
      graph), and runs them as ``cu_seqlens``.

    ``softmax_offset`` (H,): attention sinks, one logit per query head added to every softmax's denominator, as
    GPT-OSS's ``sinks`` (TE's "learnable" softmax); differentiable, computed in float32 (float64 for float64 q).

    ``executor`` "te" needs CUDA fp16/bf16 tensors that TE's F16 fused backend supports; "reference" runs anywhere.
    Dropout draws fresh randomness per call; the backward reuses the forward's.
    """
    _check_arguments(q, k, v, mask_type, window_size, dropout_p, key_padding_mask, cu_seqlens, position_ids, executor,
                     softmax_offset)  # fmt: skip
    offset = None if softmax_offset is None else softmax_offset.to(torch.promote_types(q.dtype, torch.float32))
    training = is_training(dropout_p, q, k, v, *(() if offset is None else (offset,)))
    if key_padding_mask is not None:
        if padding_route(UNKNOWN_LAYOUT, training, mask_type) == "none":
            raise ValueError(f"key_padding_mask with mask_type {mask_type!r} runs in inference only (no dropout, "
                             "no gradient): in training te_fx has exact routes for causal self-attention")  # fmt: skip
        return _padded_attention(
            q, k, v, mask_type, window_size, softmax_scale, dropout_p, training, key_padding_mask,
            key_padding_layout, executor, offset,
        )  # fmt: skip
    if position_ids is not None:
        return _forward(
            packed_attention_fwd, q, k, v, *_call(packed_documents, position_ids), mask_type, *window_size,
            softmax_scale, dropout_p, training, executor, offset,
        )[0]  # fmt: skip
    cu_q = cu_kv = None
    qkv_format = "bshd"
    if cu_seqlens is not None:
        cu_q = cu_kv = cu_seqlens
        qkv_format = "thd"
        mask_type = thd_mask_type(mask_type)
    out, _, _ = _forward(
        attention_fwd, q, k, v, cu_q, cu_kv, mask_type, window_size[0], window_size[1], softmax_scale, dropout_p,
        training, executor, qkv_format, offset,
    )  # fmt: skip
    return out


def _padded_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask_type: str,
    window_size: tuple[int, int],
    softmax_scale: float,
    dropout_p: float,
    training: bool,
    key_padding_mask: Tensor,
    layout: PaddingLayout | None,
    executor: str,
    softmax_offset: Tensor | None,
) -> Tensor:
    """:func:`attention` with a key padding mask: in training :func:`padded_attention_fwd`, which routes at run time;
    in inference as :func:`~te_fx.core.plan.padding_route` says at once (an unchecked layout takes the key bias)."""
    if training:
        host_layout = torch.tensor(layout) if layout is not None else _call(padding_layout_on_host, key_padding_mask)
        return _forward(
            padded_attention_fwd, q, k, v, key_padding_mask, host_layout, window_size[0], softmax_scale, dropout_p,
            executor, softmax_offset,
        )[0]  # fmt: skip
    keep = key_padding_mask != 0
    config = (softmax_scale, dropout_p, training, executor, "bshd", softmax_offset)
    route = padding_route(layout or UNKNOWN_LAYOUT, training, mask_type)
    if route == "key_bias":
        run_type, (left, right) = key_bias_terms(mask_type, window_size, q.shape[1])
        if run_type != mask_type:  # one query, at the last key: the keys its window sees join the bias
            kv_len = keep.shape[1]
            keep = keep & in_window(kv_len - 1, torch.arange(kv_len, device=keep.device), mask_type, window_size)
        bias = _key_bias(keep, q.dtype)
        out = _forward(attention_fwd, q, k, v, None, None, run_type, left, right, *config, bias)[0]
        return _zero_unseeing(out, keep, run_type, left)
    cu_q, cu_kv = _route_seqlens(route, keep, window_size[0])
    return _forward(attention_fwd, q, k, v, cu_q, cu_kv, _ROUTE_MASK_TYPE[route], *window_size, *config)[0]


def _key_bias(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, 1, 1, S) post-scale bias of a (B, S) bool keep mask: 0 where kept, else the lowest ``dtype`` value."""
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    return bias[:, None, None, :]
