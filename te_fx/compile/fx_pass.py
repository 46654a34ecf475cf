"""The FX pass: rewrite Dynamo's ``scaled_dot_product_attention`` nodes into te_fx's attention op.

For each SDPA node the pass elides ``repeat_kv`` producers (and ``enable_gqa``) so TE gets the KV heads natively,
reads q/k/v from the (B, S, H, D) tensors that HF's ``transpose(1, 2)`` came from, classifies the mask from the
subgraph that built it (:mod:`te_fx.compile.mask_subgraph`), and checks guards on fake metadata only. Inside a
``torch.autocast`` region the operands are cast to the region's dtype, as SDPA's autocast does; inside a checkpointed
region (gradient checkpointing's ``tag_activation_checkpoint`` body) the mask is classified from the operand the
body's placeholder stands for. A node that fails any check is left untouched; every node gets a report entry saying
what was decided and why.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._prims_common import make_contiguous_strides_for
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .. import ops
from ..core.autocast import autocast_dtype, cast_like_sdpa
from ..core.guards import Refusal, is_causal_plan, padding_refusal, sdpa_call_refusal
from ..core.plan import AttentionPlan
from ..executors import AttentionCall, te_terms, unsupported_call_reason
from .fx_aliasing import written_in_place
from .mask_subgraph import classify_mask_node, node_value, same_size

__all__ = ["AttentionRewrite", "rewrite_attention"]

_SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_ENTER_AUTOCAST = torch.amp.autocast_mode._enter_autocast  # Dynamo's nodes for a torch.autocast region
_EXIT_AUTOCAST = torch.amp.autocast_mode._exit_autocast
_CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint


@dataclass
class _Scope:
    """The graph an SDPA node sits in (``written``: its values that in-place ops write): the Dynamo graph, or the body
    of a checkpointed region, whose placeholders stand for the region call's operands in the outer graph (``outer``,
    whose writes are ``outer_written``); ``bring_in`` makes an outer value a body value (one more operand)."""

    graph: fx.Graph
    written: set[fx.Node]
    outer: dict[fx.Node, fx.Node] = field(default_factory=dict)
    outer_written: set[fx.Node] = field(default_factory=set)
    bring_in: Callable[[fx.Node], fx.Node] | None = None

    def mask_source(self, mask: fx.Node) -> tuple[fx.Node, set[fx.Node]]:
        """The node that builds ``mask`` and the writes of its graph."""
        return (self.outer[mask], self.outer_written) if mask in self.outer else (mask, self.written)


@dataclass
class AttentionRewrite:
    """One SDPA node's report entry: ``decision`` "te" (``reason`` "rewritten") or "sdpa", whose ``reason`` is a key
    of :data:`te_fx.core.reasons.REASONS` and ``detail`` says what exactly."""

    node: str
    decision: str = "sdpa"
    reason: str = ""
    detail: str = ""
    mask_kind: str | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    window_size: tuple[int, int] | None = None
    executor: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _is_method(node: Any, *names: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def _is_function(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _hint(value: Any) -> Any:
    """The traced value of a possibly symbolic int or float."""
    return value.node.hint if isinstance(value, (torch.SymInt, torch.SymFloat)) else value


def _int(size: Any) -> int | None:
    """A size as a Python int if it is static."""
    return int(size) if is_concrete_int(size) else None


def _sdpa_arguments(node: fx.Node) -> dict[str, Any]:
    arguments = dict(_SDPA_DEFAULTS)
    arguments.update(zip(_SDPA_PARAMS, node.args))
    arguments.update(node.kwargs)
    return arguments


def _transpose_dims(node: fx.Node) -> tuple[int, int] | None:
    if _is_method(node, "transpose") or _is_function(node, torch.transpose):
        dims = tuple(node.args[1:3]) or (node.kwargs.get("dim0"), node.kwargs.get("dim1"))
        return dims if all(isinstance(d, int) for d in dims) else None
    return None


def _bshd_source(node: fx.Node) -> fx.Node | None:
    """The (B, S, H, D) tensor a (B, H, S, D) operand is ``transpose(1, 2)`` of, if it is one."""
    dims = _transpose_dims(node)
    if dims is not None and sorted(d % 4 for d in dims) == [1, 2]:
        return node.args[0]
    return None


def _unrepeat_kv(node: fx.Node) -> fx.Node | None:
    """The (B, KV, S, D) input of HF's ``repeat_kv`` (or ``repeat_interleave(n, dim=1)``) that produced ``node``.

    repeat_kv: ``x[:, :, None, :, :].expand(B, KV, n, S, D).reshape(B, KV * n, S, D)`` (head h reads KV head h // n),
    optionally followed by ``.contiguous()``; ``unsqueeze(2)`` in place of the indexing is accepted too.
    """
    if _is_method(node, "contiguous"):
        node = node.args[0]
    if _is_method(node, "repeat_interleave") or _is_function(node, torch.repeat_interleave):
        repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        source = node.args[0]
        uniform = isinstance(repeats, int)  # a tensor of repeats need not be uniform
        return source if uniform and dim in (1, -3) and node_value(source).dim() == 4 else None
    if not (_is_method(node, "reshape", "view") or _is_function(node, torch.reshape)):
        return None
    expanded = node.args[0]
    if not _is_method(expanded, "expand"):
        return None
    inserted = expanded.args[0]
    if _is_function(inserted, operator.getitem):
        index = inserted.args[1]
        full = slice(None, None, None)
        if not (isinstance(index, tuple) and len(index) >= 3 and index[:3] == (full, full, None)
                and all(i == full or i is Ellipsis for i in index[3:])):  # fmt: skip
            return None
    elif not ((_is_method(inserted, "unsqueeze") or _is_function(inserted, torch.unsqueeze))
              and (inserted.args[1] if len(inserted.args) > 1 else inserted.kwargs.get("dim")) in (2, -3)):  # fmt: skip
        return None
    source = inserted.args[0]
    source_shape, expanded_shape = node_value(source).shape, node_value(expanded).shape
    if len(source_shape) != 4 or len(expanded_shape) != 5:
        return None
    kept_dims = zip(source_shape, (*expanded_shape[:2], *expanded_shape[3:]))
    kv_heads, n_rep, heads = _int(expanded_shape[1]), _int(expanded_shape[2]), _int(node_value(node).shape[1])
    merged = kv_heads is not None and n_rep is not None and heads == kv_heads * n_rep  # (B, KV * n, S, D)
    return source if merged and all(same_size(a, b) for a, b in kept_dims) else None


def _guard(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: dict[str, Any]) -> Refusal | None:
    """Why this SDPA call cannot be rewritten whatever the executor, judged from metadata alone; None when it can."""
    if not isinstance(args["is_causal"], bool):
        return "fallback_dynamic", "is_causal is not a compile-time constant"
    if not isinstance(args["enable_gqa"], bool):
        return "fallback_dynamic", "enable_gqa is not a compile-time constant"
    # floats may be SymFloat graph inputs (torch 2.11 lifts some float attributes); the op takes them as they are
    if not all(isinstance(node_value(args[name]), (int, float, torch.SymFloat)) for name in ("dropout_p", "scale")
               if args[name] is not None):  # fmt: skip
        return "fallback_dynamic", "dropout_p or scale is not a float"
    refusal = sdpa_call_refusal(q, k, v, args["enable_gqa"], args["dropout_p"], same_size)
    if refusal is not None:
        return refusal
    if any(_int(size) is None for size in (q.shape[1], k.shape[1], q.shape[3], v.shape[3])):
        return "fallback_dynamic", "symbolic head count or head dim"
    return None


def _may_train(dropout_p: Any) -> bool:
    """Whether the call may run as training (te_fx's op keeps what a backward needs, and routes key padding so): the
    graph was built with autograd on (Dynamo guards grad mode), or the call has dropout (a SymFloat may)."""
    return torch.is_grad_enabled() or not (isinstance(dropout_p, (int, float)) and dropout_p == 0)


def _executor_refusal(
    executor: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    dropout_p: Any,
    training: bool,
) -> Refusal | None:
    """Why ``executor`` cannot run ``plan`` on these (B, H, S, D) fake tensors, asked at the traced sizes (TE's
    fused backend has no sequence-length limits that matter for dynamic shapes, so the traced hint stands for all)
    and as training wherever the graph may train."""
    shape = tuple(int(_hint(size)) for size in (q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2],
                                                 q.shape[3], v.shape[3]))  # fmt: skip
    mask_type, window, qkv_format, key_bias = te_terms(plan, training, shape[3])
    call = AttentionCall(q.dtype, q.device, shape, mask_type, window, qkv_format,
                         dropout_p=float(_hint(dropout_p)), training=training, key_bias=key_bias)  # fmt: skip
    reason = unsupported_call_reason(executor, call)
    if reason is None:
        return None
    dtype = str(q.dtype).removeprefix("torch.")
    return reason, (f"the {executor} executor refuses {dtype} on {q.device.type}, (batch, heads, kv_heads, q_len, "
                    f"kv_len, head_dim_qk, head_dim_v) {shape} at the traced sizes, {plan.kind} window "
                    f"{tuple(plan.window_size)}")  # fmt: skip


@dataclass(frozen=True)
class _MaskRow:
    """The key padding of a one-query call: the only row of its mask (a graph value), read off when the rewrite is
    made (:func:`_key_padding_node`)."""

    mask: fx.Node


def _one_query_plan(mask: fx.Node, q_len: Any) -> AttentionPlan | None:
    """One query (decode) sees the keys its bool mask's row shows, whatever subgraph built the mask (a sliding
    layer's rolling cache indexes it by a position counter): all keys with that row as key padding, unless the mask
    differs between heads."""
    value = node_value(mask)
    if _int(q_len) != 1 or not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.dim() > 4:
        return None
    if value.dim() >= 3 and _int(value.shape[-3]) != 1:
        return None
    return AttentionPlan("no_mask", (-1, -1), key_padding=_MaskRow(mask))


def _key_padding_node(graph: fx.Graph, key_padding: Any, query: fx.Node, key: fx.Node) -> Any:
    """The (B, S_kv) key padding the op takes: a :class:`_MaskRow`'s row broadcast to the call's batch and keys, or
    the plan's key padding as it is."""
    if not isinstance(key_padding, _MaskRow):
        return key_padding
    batch, keys = graph.call_method("size", (query, 0)), graph.call_method("size", (key, 2))
    row = graph.call_method("expand", (key_padding.mask, batch, 1, 1, keys))
    return graph.call_function(operator.getitem, (row, (slice(None), 0, 0)))


def _classify(args: dict[str, Any], q: torch.Tensor, k: torch.Tensor, scope: _Scope) -> AttentionPlan | Refusal:
    """The plan of the call's mask, or why it has none (every such reason is "fallback_mask"); its key padding a
    value of the call's graph."""
    batch, q_len, kv_len = q.shape[0], q.shape[2], k.shape[2]
    mask = args["attn_mask"]
    if mask is None:
        if not args["is_causal"]:
            return AttentionPlan("no_mask", (-1, -1))
        plan = is_causal_plan(q_len, kv_len, same_size)
        if plan is None:
            return "fallback_mask", "is_causal with more queries than keys, or lengths not known to compare"
        return plan
    if args["is_causal"]:
        return "fallback_mask", "attn_mask together with is_causal"
    if not isinstance(mask, fx.Node):
        return "fallback_mask", "attn_mask is not a graph value"
    source, written = scope.mask_source(mask)
    try:
        classified = classify_mask_node(source, batch, q_len, kv_len, written)
    except Exception as error:  # noqa: BLE001 - a mask the classifier cannot handle stays on SDPA
        return "fallback_mask", f"mask classification failed ({type(error).__name__})"
    if isinstance(classified, str):
        return _one_query_plan(mask, q_len) or ("fallback_mask", classified)
    if mask in scope.outer:  # the row input of a mask classified in the outer graph, as the region's operand
        rows = {name: scope.bring_in(getattr(classified, name)) for name in ("key_padding", "position_ids")
                if getattr(classified, name) is not None}  # fmt: skip
        classified = dataclasses.replace(classified, **rows)
    if classified.mask_type != "causal" or same_size(q_len, kv_len):
        return classified
    # HF's causal masks sit at the bottom right when there are fewer queries than keys (a KV cache)
    if classified.position_ids is not None:
        return "fallback_mask", "packed-documents mask with q_len != kv_len"
    return dataclasses.replace(classified, mask_type="causal_bottom_right")


def _autocast_dtype(regions: list[fx.Node], device_type: str) -> torch.dtype | None:
    """The dtype autocast gives SDPA on ``device_type`` at a node: the innermost of the graph's open autocast
    ``regions`` (their enter nodes: device type, dtype, enabled, ...) for that device, else the autocast the graph
    was traced in (Dynamo guards on it, so the graph runs under it), or None where autocast is off."""
    for enter in reversed(regions):
        device, dtype, enabled = (list(enter.args) + [None, None, True])[:3]
        if device == device_type:
            return (dtype or torch.get_autocast_dtype(device_type)) if enabled else None
    return autocast_dtype(device_type)


def _rewrite_one(scope: _Scope, node: fx.Node, executor: str, regions: list[fx.Node]) -> AttentionRewrite:
    graph, written = scope.graph, scope.written
    entry = AttentionRewrite(node=node.name, executor=executor)
    args = _sdpa_arguments(node)
    query, key, value = args["query"], args["key"], args["value"]
    q, k, v = node_value(query), node_value(key), node_value(value)
    if isinstance(q, torch.Tensor) and q.dim() == 4:
        entry.num_heads, entry.head_dim = _int(q.shape[1]), _int(q.shape[3])
    # K/V repeated by repeat_kv are replaced by their source (TE runs GQA natively), unless an in-place write could
    # make the source differ from the copy SDPA reads
    kv_source = [_unrepeat_kv(t) if isinstance(t, fx.Node) else None for t in (key, value)]
    if (all(s is not None and s not in written for s in kv_source)
            and same_size(node_value(kv_source[0]).shape[1], node_value(kv_source[1]).shape[1])):  # fmt: skip
        key, value = kv_source
        k, v = node_value(key), node_value(value)
        args = {**args, "enable_gqa": True}
    if isinstance(k, torch.Tensor) and k.dim() == 4:
        entry.num_kv_heads = _int(k.shape[1])
    autocast = _autocast_dtype(regions, q.device.type) if isinstance(q, torch.Tensor) else None
    if autocast is not None:
        q, k, v = cast_like_sdpa((q, k, v), autocast)
    refusal = _guard(q, k, v, args)
    if refusal is None:
        dropout_p = node_value(args["dropout_p"])
        training = _may_train(dropout_p)
        classified = _classify(args, q, k, scope)
        if isinstance(classified, AttentionPlan):
            refusal = padding_refusal(classified, training)
            refusal = refusal or _executor_refusal(executor, q, k, v, classified, dropout_p, training)
        else:
            refusal = classified
    layout = _output_layout(node_value(node)) if refusal is None else None
    if refusal is None and layout is None:
        refusal = "fallback_layout", "SDPA's output has a memory layout the op does not give"
    if refusal is not None:
        entry.reason, entry.detail = refusal
        return entry
    entry.mask_kind = classified.kind
    entry.window_size = classified.window_size

    scale = args["scale"] if args["scale"] is not None else 1.0 / math.sqrt(_int(q.shape[3]))
    if not isinstance(scale, fx.Node):  # a SymFloat graph input (torch 2.11 lifts some float attributes) stays one
        scale = float(scale)
    with graph.inserting_before(node):
        operands = []
        for operand, cast in zip((query, key, value), (q, k, v)):
            source = _bshd_source(operand)
            bshd = source if source is not None else graph.call_method("transpose", (operand, 1, 2))
            same_dtype = node_value(operand).dtype == cast.dtype  # else autocast's cast
            operands.append(bshd if same_dtype else graph.call_method("to", (bshd, cast.dtype)))
        if args["attn_mask"] is None and args["is_causal"] and not same_size(q.shape[2], k.shape[2]):
            # SDPA's top-left causal never shows a query the keys past q_len: causal runs on the first q_len keys
            operands[1:] = [graph.call_method("narrow", (t, 1, 0, _int(q.shape[2]))) for t in operands[1:]]
        kwargs = dict(
            mask_type=classified.mask_type,
            window_size=classified.window_size,
            softmax_scale=scale,
            dropout_p=args["dropout_p"],
            key_padding_mask=_key_padding_node(graph, classified.key_padding, query, key),
            position_ids=classified.position_ids,
            executor=executor,
        )
        out = graph.call_function(ops.attention, tuple(operands), kwargs)
        out.meta["example_value"] = node_value(node).transpose(1, 2)
        replacement = graph.call_method("transpose", (out, 1, 2))
        if layout == "contiguous":  # users may rely on SDPA's memory layout (a .view, as_strided)
            replacement = graph.call_method("contiguous", (replacement,))
        replacement.meta["example_value"] = node_value(node)
    producers = node.all_input_nodes
    node.replace_all_uses_with(replacement)
    graph.erase_node(node)
    _erase_dead_producers(producers)
    entry.decision, entry.reason = "te", "rewritten"
    return entry


def _output_layout(out: torch.Tensor) -> str | None:
    """How SDPA lays out its (B, H, S, D) output, from its traced strides: "bshd" (the op's layout, transposed, as
    SDPA's CUDA kernels give it for HF's inputs), "contiguous", or None (another layout)."""
    batch, heads, seq, dim = out.shape
    bshd = make_contiguous_strides_for((batch, seq, heads, dim))
    layouts = {"bshd": (bshd[0], bshd[2], bshd[1], bshd[3]), "contiguous": make_contiguous_strides_for(out.shape)}
    for name, strides in layouts.items():
        if all(same_size(a, b) for a, b in zip(out.stride(), strides)):
            return name
    return None


def _erase_dead_producers(nodes: list[fx.Node]) -> None:
    """Erase the rewrite's now unused producers (repeat_kv, mask construction), walking upwards. Only pure nodes
    go: FX's own dead-code elimination would also drop in-place writes whose results are unused (DeepSeek-V3
    fills its key tensor with ``key[..., :n] = ...``)."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node._erased:
            continue
        in_place = node.op == "call_method" and str(node.target).endswith("_")
        if node.users or node.op not in ("call_function", "call_method") or in_place or node.is_impure():
            continue
        inputs = node.all_input_nodes
        node.graph.erase_node(node)
        stack.extend(n for n in inputs if not n._erased)


def _rewrite_checkpointed(
    call: fx.Node, body: fx.GraphModule, outer: _Scope, executor: str, regions: list[fx.Node]
) -> list[AttentionRewrite]:
    """Rewrite the SDPA nodes of a checkpointed region's ``body`` (``call`` runs it on its operands); a key padding
    input the outer graph holds becomes one more operand of ``call``."""
    placeholders = [node for node in body.graph.nodes if node.op == "placeholder"]
    operands = dict(zip(placeholders, call.args[1:]))

    def bring_in(value: fx.Node) -> fx.Node:
        for placeholder, operand in operands.items():
            if operand is value:
                return placeholder
        with body.graph.inserting_after(placeholders[-1]):
            placeholder = body.graph.placeholder(f"te_fx_{value.name}")
        placeholder.meta.update(value.meta)
        placeholders.append(placeholder)
        operands[placeholder] = value
        call.args = (*call.args, value)
        return placeholder

    scope = _Scope(body.graph, written_in_place(body.graph), operands, outer.written, bring_in)
    return _rewrite_graph(body, scope, executor, regions)


def rewrite_attention(gm: fx.GraphModule, executor: str = "te") -> list[dict[str, Any]]:
    """Rewrite every safe SDPA node of a Dynamo graph into :func:`te_fx.ops.attention`; returns one report entry
    per SDPA node. The graph is recompiled and the rewrite's dead producers (repeat_kv, mask construction) removed."""
    entries = _rewrite_graph(gm, _Scope(gm.graph, written_in_place(gm.graph)), executor, [])
    return [entry.as_dict() for entry in entries]


def _rewrite_graph(
    gm: fx.GraphModule, scope: _Scope, executor: str, outer_regions: list[fx.Node]
) -> list[AttentionRewrite]:
    """Rewrite the SDPA nodes of ``gm`` (the Dynamo graph or a checkpointed body) in order, inside the autocast
    regions open around it (``outer_regions``) and its own; recompiles ``gm`` if anything changed."""
    regions = list(outer_regions)  # the autocast regions open at the walk's node, innermost last
    entries = []
    for node in list(gm.graph.nodes):
        if _is_function(node, _ENTER_AUTOCAST):
            regions.append(node)
        elif _is_function(node, _EXIT_AUTOCAST) and node.args and node.args[0] in regions:
            regions.remove(node.args[0])
        elif node.op == "call_function" and node.target in _SDPA_TARGETS:
            entries.append(_rewrite_one(scope, node, executor, regions))
        elif _is_function(node, _CHECKPOINT) and node.args and getattr(node.args[0], "op", None) == "get_attr":
            entries += _rewrite_checkpointed(node, getattr(gm, node.args[0].target), scope, executor, regions)
    if any(entry.decision == "te" for entry in entries):
        gm.recompile()
    return entries
