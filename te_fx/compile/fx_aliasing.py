"""Which values of an FX graph an in-place op may write: the rewrite must not rely on any of them.

The FX pass re-evaluates a mask's subgraph without its in-place writes, and hands te_fx's op the inputs of
``repeat_kv`` or of the mask at the SDPA call rather than the copies SDPA received; both are exact only if nothing
writes those values (or a view of them) in place. The analysis is conservative: an op counts as a view of its tensor
arguments unless it is known to return a new tensor (an operator's arithmetic, or an ATen op none of whose overloads
returns an alias); ``reshape``, ``contiguous``, ``to`` and casts are views, and so is any op the analysis cannot name.
"""

from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx

__all__ = ["written_in_place"]

_VIEW_OPS = frozenset(
    {
        "getitem", "view", "view_as", "reshape", "reshape_as", "transpose", "swapaxes", "swapdims", "permute",
        "movedim", "moveaxis", "t", "T", "mT", "unsqueeze", "squeeze", "expand", "expand_as", "flatten", "unflatten",
        "narrow", "select", "diagonal", "as_strided", "unfold", "split", "split_with_sizes", "tensor_split", "chunk",
        "unsafe_split", "unsafe_split_with_sizes", "unsafe_chunk", "unbind", "contiguous", "detach", "alias", "to",
        "type", "type_as", "bool", "byte", "char", "short", "int", "long", "half", "bfloat16", "float", "double",
        "real", "imag", "view_as_real", "view_as_complex",
    }
)  # fmt: skip
_IN_PLACE_OPERATORS = frozenset(
    {
        operator.setitem, operator.iadd, operator.isub, operator.imul, operator.imatmul, operator.itruediv,
        operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
        operator.ilshift, operator.irshift,
    }
)  # fmt: skip


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


@functools.cache
def _aten_returns_new(name: str) -> bool:
    """Whether ATen's op ``name`` exists and none of its overloads returns an alias of an argument."""
    packet = getattr(torch.ops.aten, name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return False
    schemas = [getattr(packet, overload)._schema for overload in packet.overloads()]
    return all(ret.alias_info is None for schema in schemas for ret in schema.returns)


def _storages(value: object) -> set[int] | None:
    """The storages of a traced example value (a tensor or a sequence of them), None where there is none."""
    if isinstance(value, torch.Tensor):
        return {value.untyped_storage()._cdata}
    if isinstance(value, (list, tuple)) and value:
        parts = [_storages(item) for item in value]
        return None if None in parts else set().union(*parts)
    return None


def _is_view(node: fx.Node) -> bool:
    """Whether ``node`` may return a view of one of its tensor arguments: by name; else, where every argument has a
    traced example value, by whether the output shares a storage with one (Dynamo's fake tensors share storages as the
    real ones would); else unless ATen's schema says it returns a new tensor."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = _name(node)
    if name in _VIEW_OPS:
        return True
    out = _storages(node.meta.get("example_value"))
    traced = [arg.meta["example_value"] for arg in node.all_input_nodes if "example_value" in arg.meta]
    if out is not None and len(traced) == len(node.all_input_nodes):
        inputs = [_storages(value) for value in traced]  # sizes and other non-tensors have none
        return bool(out & set().union(*(storages for storages in inputs if storages)))
    return not _aten_returns_new(name)


def _written_targets(node: fx.Node) -> list[fx.Node]:
    """The graph values ``node`` writes in place (its first argument, ``out=``, or what an ATen schema marks)."""
    if node.op not in ("call_function", "call_method"):
        return []
    schema = getattr(node.target, "_schema", None)  # an ATen overload called directly
    if schema is not None:
        specs = {spec.name: spec for spec in schema.arguments}
        named = [*zip(schema.arguments, node.args), *((specs.get(k), v) for k, v in node.kwargs.items())]
        return [arg for spec, arg in named
                if spec is not None and spec.alias_info is not None and spec.alias_info.is_write
                and isinstance(arg, fx.Node)]  # fmt: skip
    targets = []
    name = _name(node)
    in_place = node.target in _IN_PLACE_OPERATORS or node.kwargs.get("inplace") is True or (
        getattr(node.target, "__module__", None) != "_operator" and name.endswith("_") and not name.startswith("__")
    )  # fmt: skip
    if in_place and node.args:  # one tensor, or a list of them (``torch._foreach_add_``)
        first = node.args[0]
        targets += [t for t in (first if isinstance(first, (list, tuple)) else [first]) if isinstance(t, fx.Node)]
    out = node.kwargs.get("out")
    targets += [t for t in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(t, fx.Node)]
    return targets


def written_in_place(graph: fx.Graph) -> set[fx.Node]:
    """Every node whose value some in-place op of ``graph`` may write: each written value, the values it is a view
    of, and every view of those."""
    bases: list[fx.Node] = []
    for node in graph.nodes:
        bases += _written_targets(node)
    written: set[fx.Node] = set()
    while bases:
        node = bases.pop()
        if node not in written:
            written.add(node)
            bases.extend(user for user in node.users if _is_view(user))
            if _is_view(node):
                bases.extend(node.all_input_nodes)
    return written
