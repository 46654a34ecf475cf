"""Which values of an FX graph an in-place op may write: the rewrite must not rely on any of them.

The FX pass re-evaluates a mask's subgraph without its in-place writes, and hands te_fx's op the inputs of
``repeat_kv`` or of the mask at the SDPA call rather than the copies SDPA received; both are exact only if nothing
writes those values (or a view of them) in place. The analysis is conservative: an op counts as a view of its first
argument if it can return one (``reshape``, ``contiguous``, ``to`` and casts included).
"""

from __future__ import annotations

import operator

import torch.fx as fx

__all__ = ["written_in_place"]

_VIEW_OPS = frozenset(
    {
        "getitem", "view", "view_as", "reshape", "reshape_as", "transpose", "swapaxes", "swapdims", "permute",
        "movedim", "moveaxis", "t", "T", "mT", "unsqueeze", "squeeze", "expand", "expand_as", "flatten", "unflatten",
        "narrow", "select", "diagonal", "as_strided", "unfold", "split", "split_with_sizes", "tensor_split", "chunk",
        "unbind", "contiguous", "detach", "alias", "to", "type", "type_as", "bool", "byte", "char", "short", "int",
        "long", "half", "bfloat16", "float", "double", "real", "imag", "view_as_real", "view_as_complex",
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


def _is_view(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and _name(node) in _VIEW_OPS


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
        for target in _written_targets(node):
            while _is_view(target) and isinstance(target.args[0], fx.Node):
                bases.append(target)
                target = target.args[0]
            bases.append(target)
    written: set[fx.Node] = set()
    while bases:
        node = bases.pop()
        if node not in written:
            written.add(node)
            bases.extend(user for user in node.users if _is_view(user))
    return written
