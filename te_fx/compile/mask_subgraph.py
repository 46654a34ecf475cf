"""Mask classification from the FX subgraph that built an SDPA mask, never from the mask's runtime values.

HF builds its causal / sliding-window masks from index comparisons (``kv_idx <= q_idx``, ``kv_idx > q_idx - w``)
and, when the user passes an attention_mask, ANDs in ``attention_mask[batch_idx, kv_idx]``. Rather than match HF's
ops (which change between versions), the subgraph is evaluated at compile time, at the traced shapes and, for
symbolic sizes, at several sample sizes:

* with the 2D input mask all ones, the result must be exactly a canonical pattern (causal with some window, or all
  visible) at every sample size;
* with random 2D input masks, the result must be exactly that pattern AND ``input_mask[b, kv] != 0``;
* or, the 2D input read as position ids (HF's packed rows, built from ``position_ids`` where no attention_mask is
  given): with positions counting up in each row, exactly a causal pattern; with random packed rows, that pattern
  within each document (:func:`~te_fx.core.masks.position_starts`).

Anything else (other inputs, float masks, half-precision arithmetic, in-place writes, dynamic integers other than the
batch and sequence sizes, a mismatch anywhere) leaves the SDPA node untouched.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..core.masks import causal_pattern, classify_mask, position_starts
from ..core.plan import AttentionPlan

__all__ = ["classify_mask_node", "node_value", "same_size"]

_SAMPLE_SIZES = (1, 2, 3, 7, 16, 33)  # substituted for symbolic sizes, besides the traced ones
_MAX_SAMPLE = 1 << 14  # a window constant larger than this cannot be checked at compile time
_MAX_SAMPLE_ELEMENTS = 1 << 30  # batch * q_len * kv_len of one evaluation (compile-time memory)
_LONG_SAMPLE = 1031  # a length past periods no constant shows (position dtypes, spans computed at run time)
# nondeterministic ops: a mask drawn from them is a different mask at every call
_RANDOM_OPS = ("rand", "bernoulli", "normal", "dropout", "multinomial", "uniform", "poisson", "exponential", "random")
_RANDOM_TRIALS = 4


def _ancestors(node: fx.Node) -> list[fx.Node]:
    """The nodes ``node`` depends on, itself included, in graph order."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def node_value(node: object) -> object:
    """The traced (fake) value of an FX node; anything else (a constant argument) as it is."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else node


def _extract(mask: fx.Node, nodes: list[fx.Node]) -> tuple[fx.GraphModule, list[fx.Node]] | None:
    """A standalone GraphModule computing ``mask`` from the placeholders it depends on (returned in order);
    ``nodes`` are its :func:`_ancestors`."""
    if any(any(word in str(getattr(n.target, "__name__", n.target)) for word in _RANDOM_OPS) for n in nodes):
        return None
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    leaves = []
    for node in nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
            leaves.append(node)
        elif node.op in ("call_function", "call_method"):
            env[node] = graph.node_copy(node, lambda n: env[n])
        else:  # get_attr, call_module: parameters or submodules feeding the mask are not index arithmetic
            return None
    graph.output(env[mask])
    return fx.GraphModule(torch.nn.Module(), graph), leaves


def _symbols(values: list[object]) -> dict:
    """sympy symbol -> traced value (hint) of every symbolic size among ``values`` (SymInts or tensors)."""
    symbols = {}
    for value in values:
        sizes = [value] if isinstance(value, torch.SymInt) else list(getattr(value, "shape", ()))
        for size in sizes:
            if isinstance(size, torch.SymInt) and not is_concrete_int(size):
                shape_env = size.node.shape_env
                traced = getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val  # renamed in torch 2.12
                for symbol in size.node.expr.free_symbols:
                    symbols[symbol] = traced.get(symbol, size.node.hint)
    return symbols


def _free_symbols(size: object) -> set:
    return set(size.node.expr.free_symbols) if isinstance(size, torch.SymInt) else set()


def _numbers(*values: object) -> list[int | float]:
    """The finite Python numbers among (nested) node arguments."""
    found = []
    for value in values:
        if isinstance(value, (list, tuple)):
            found += _numbers(*value)
        elif isinstance(value, dict):
            found += _numbers(*value.values())
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found.append(value)
    return found


_SCALING = ("div", "shift", "mul", "mod", "remainder")  # ops whose constants multiply an input's period


def _own_span(node: fx.Node) -> int:
    """The longest length a node's own constants can stand for, rounded up: the constant itself, ``1 / c`` for a
    fraction (``idx * (1 / 64)``) and ``2 ** c`` for a shift (``idx >> 6``)."""
    shift = "shift" in str(node.target)
    spans = [0]
    for number in _numbers(node.args, node.kwargs):
        spans.append(math.ceil(abs(number)))
        if 0 < abs(number) < 1:
            spans.append(math.ceil(1 / abs(number)))
        if shift and isinstance(number, int) and 0 <= number < 63:
            spans.append(2**number)
    return max(spans)


def _largest_span(nodes: list[fx.Node]) -> int:
    """The longest period or window the subgraph ``nodes`` (in graph order) can hold: a node's own span, times its
    inputs' where it divides, shifts, scales or wraps them (``idx // 40 // 40`` has chunks of 1600)."""
    spans: dict[fx.Node, int] = {}
    for node in nodes:
        own = _own_span(node)
        inherited = max([0, *(spans.get(n, 0) for n in node.all_input_nodes)])
        scales = any(name in str(node.target) for name in _SCALING)
        spans[node] = max(own, inherited, own * inherited if scales else 0)
    return max([0, *spans.values()])


def _lone_symbol(size: object, other: object) -> object | None:
    """The sympy symbol that ``size`` is, where it is a lone symbol that the size ``other`` does not involve."""
    if not isinstance(size, torch.SymInt) or is_concrete_int(size):
        return None
    expr = size.node.expr
    return expr if expr.is_Symbol and expr not in _free_symbols(other) else None


def _concrete(size: object, assignment: dict) -> int:
    if isinstance(size, torch.SymInt) and not is_concrete_int(size):
        return int(size.node.expr.xreplace(assignment))
    return int(size)


def _classify_evaluated(mask: torch.Tensor) -> tuple[str, int] | None:
    """("no_mask" | "causal", window_left) if a bool (B, H, q_len, kv_len) mask is the same canonical pattern for
    every leading index: the eager matcher's answer, when it is one for the whole batch (no per-row plan)."""
    if mask.dtype != torch.bool or mask.dim() != 4:
        return None
    plan = classify_mask(mask, *mask.shape)
    if plan is None or plan.key_padding is not None or plan.cu_seqlens is not None:
        return None
    return ("no_mask", -1) if plan.mask_type == "no_mask" else ("causal", plan.window_size[0])


def _run(module: fx.GraphModule, args: list) -> object:
    """Evaluate the extracted subgraph (through the interpreter: a failure is ours to handle, not to print)."""
    return fx.Interpreter(module).run(*args)


def _leaf_args(leaves: list[fx.Node], assignment: dict) -> list:
    """Concrete inputs for the extracted subgraph: sizes from ``assignment``, tensors all ones."""
    args = []
    for leaf in leaves:
        value = node_value(leaf)
        if isinstance(value, torch.SymInt):
            args.append(_concrete(value, assignment))
        elif isinstance(value, torch.Tensor):
            size = [_concrete(s, assignment) for s in value.shape]
            args.append(torch.ones(size, dtype=value.dtype, device=value.device))
        else:
            args.append(value)
    return args


def same_size(a: object, b: object) -> bool:
    """Whether two (possibly symbolic) sizes are provably equal."""
    if is_concrete_int(a) and is_concrete_int(b):
        return int(a) == int(b)
    return isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and a.node.expr == b.node.expr


def classify_mask_node(
    mask: fx.Node, batch: object, q_len: object, kv_len: object, written: set[fx.Node]
) -> AttentionPlan | str:
    """Classify the SDPA mask produced by ``mask`` for queries (batch, *, q_len) and kv_len keys (ints or SymInts of
    the graph); ``written`` holds the graph's values that in-place ops write (:mod:`te_fx.compile.fx_aliasing`).
    Returns a :class:`~te_fx.core.plan.AttentionPlan` (its ``key_padding`` the graph input holding a 2D key padding
    mask ANDed into the pattern, if any), or the reason the mask is left to SDPA."""
    ancestors = _ancestors(mask)
    extracted = _extract(mask, ancestors)
    if extracted is None:
        return "mask built from parameters, submodules or random ops"
    module, leaves = extracted
    if any(node in written for node in ancestors):
        return "the mask, or a value it is built from, is written in place"
    # float32 holds every integer position up to 2**24; fp16 / bf16 positions round beyond 2048 / 256 tokens
    computed = [node_value(n) for n in ancestors[:-1] if n.op != "placeholder"]
    if any(isinstance(value, torch.Tensor) and value.is_floating_point() and torch.finfo(value.dtype).bits < 32
           for value in computed):  # fmt: skip
        return "mask computed with half-precision floating-point values"
    # int8 / int16 positions wrap at a length the samples may not reach
    if any(isinstance(value, torch.Tensor) and value.dtype not in (torch.bool, torch.int32, torch.int64)
           and not value.is_floating_point() for value in computed):  # fmt: skip
        return "mask computed with integers narrower than 32 bits"
    tensors = [leaf for leaf in leaves if isinstance(node_value(leaf), torch.Tensor)]
    if len(tensors) > 1:
        return "mask built from more than one input tensor"
    padding = tensors[0] if tensors else None
    # a padding input whose batch is a symbol of its own (Dynamo gives input_ids and attention_mask one each once the
    # batch size changes) is sampled with the query's batch; te_fx's op checks at run time that they agree
    padding_batch: set = set()
    if padding is not None:
        value = node_value(padding)
        if value.dim() != 2 or value.is_floating_point():
            return "mask input is not a 2D integer or bool attention mask"
        padding_batch = _free_symbols(value.shape[0]) if len(_free_symbols(batch)) == 1 else set()
        if not same_size(value.shape[0], batch) and not (
            len(padding_batch) == 1 and value.shape[0].node.expr == next(iter(padding_batch))
        ):
            return "mask input does not have the query's batch size"
    if any(isinstance(node_value(leaf), (float, torch.SymFloat)) for leaf in leaves):
        return "mask depends on a float graph input"
    # sizes are sampled together (all sequence lengths equal), which says nothing of an integer input's relation to
    # them: a mask may depend on a dynamic integer only through the sizes
    sizes = {*_free_symbols(batch), *_free_symbols(q_len), *_free_symbols(kv_len), *_symbols([node_value(padding)])}
    if any(set(_symbols([value])) - sizes for value in map(node_value, leaves) if isinstance(value, torch.SymInt)):
        return "mask depends on a dynamic integer other than the batch and sequence sizes"
    symbols = _symbols([*map(node_value, leaves), batch, q_len, kv_len])
    assignments = [dict(symbols)]
    if symbols:
        # sequence lengths must also be sampled beyond every constant of the subgraph (a sliding window of 4096
        # looks like full causal attention at the traced 2048); other sizes stay small to bound the cost
        largest = _largest_span(ancestors)
        batch_symbols = _free_symbols(batch) - _free_symbols(q_len) - _free_symbols(kv_len)
        independent_batch = batch_symbols == _free_symbols(batch)
        if independent_batch:
            batch_symbols |= padding_batch - _free_symbols(q_len) - _free_symbols(kv_len)
        if 2 * largest + 3 > (_MAX_SAMPLE if independent_batch else 64):
            return "mask subgraph has constants too large to check at every sequence length"

        def sizes_at(n: int, batch_size: int | None = None) -> dict:
            return {s: (batch_size or min(n, 3)) if s in batch_symbols else n for s in symbols}

        long_sample = [_LONG_SAMPLE] if independent_batch and largest < _LONG_SAMPLE else []
        assignments += [sizes_at(n) for n in (*_SAMPLE_SIZES, largest + 1, 2 * largest + 3, *long_sample)]
        if batch_symbols:  # batch rows beyond every constant, at a short length
            assignments.append(sizes_at(7, batch_size=max(4, largest + 1)))
        # sizes of their own symbols may differ at run time: top-left and bottom-right causal agree only where
        # q_len == kv_len
        q_only = _free_symbols(q_len) - _free_symbols(kv_len)
        kv_only = _free_symbols(kv_len) - _free_symbols(q_len)
        for n in (7, largest + 1) if q_only and kv_only else ():
            for q_size, kv_size in ((n, n + 3), (n + 3, n)):
                assignments.append({**sizes_at(n), **dict.fromkeys(q_only, q_size), **dict.fromkeys(kv_only, kv_size)})
    # the padding input is read as input[b, kv]; Dynamo may give its length a symbol of its own (a KV cache's
    # growing attention_mask): sampled as the keys' length, which te_fx's op checks at run time
    length = _lone_symbol(node_value(padding).shape[1], kv_len) if padding is not None else None
    if length is not None:
        assignments = [{**assignment, length: _concrete(kv_len, assignment)} for assignment in assignments]
    samples = []
    # the traced size costs what the model's own mask costs; samples beyond it (a large static batch times a long
    # sampled length) are bounded
    limit = max(_MAX_SAMPLE_ELEMENTS, math.prod(_concrete(size, assignments[0]) for size in (batch, q_len, kv_len)))
    for assignment in assignments:
        shape = tuple(_concrete(size, assignment) for size in (batch, q_len, kv_len))
        if math.prod(shape) > limit:
            return "mask too large to evaluate at the lengths it must be checked at"
        args = _leaf_args(leaves, assignment)
        try:
            with torch.no_grad():
                ones, again = _run(module, args), _run(module, args)
        except Exception as error:  # noqa: BLE001 - a subgraph that cannot run here is left alone
            return f"mask subgraph could not be evaluated ({type(error).__name__})"
        if isinstance(ones, torch.Tensor) and not torch.equal(ones, again):
            return "mask subgraph is not deterministic"
        if not isinstance(ones, torch.Tensor) or ones.dim() != 4 or tuple(ones.shape[-2:]) != shape[1:]:
            return "mask does not have the query/key shape"
        samples.append((args, ones))
    # the largest sample decides the window; smaller ones (possibly inside the window) must agree with it
    kind = _classify_evaluated(max(samples, key=lambda sample: sample[1].shape[-2] * sample[1].shape[-1])[1])
    if kind is None:
        return "mask is not a causal, sliding-window causal or all-visible pattern"
    mask_type, window = kind
    for _args, ones in samples:
        q, kv = ones.shape[-2:]
        expected = torch.ones(q, kv, dtype=torch.bool) if mask_type == "no_mask" else causal_pattern(q, kv, window)
        if not (ones == expected.to(ones.device)).all():
            return "mask is not the same pattern at every sequence length"
    if padding is not None:
        generator = torch.Generator().manual_seed(0)
        index = leaves.index(padding)
        numbers = [number for node in ancestors for number in _numbers(node.args, node.kwargs)]
        values = _padding_trial_values(node_value(padding).dtype, numbers, generator)
        if not all(_padding_consistent(module, args, index, ones, values, generator) for args, ones in samples):
            window = _documents_window(module, index, [args for args, _ in samples], generator)
            if window is None:
                return "mask combines its input with the pattern in a way other than key padding or packed documents"
            return AttentionPlan("causal", (window, 0), position_ids=padding)
    window_size = (-1, -1) if mask_type == "no_mask" else (window, 0)
    return AttentionPlan(mask_type, window_size, key_padding=padding)


def _padding_trial_values(dtype: torch.dtype, numbers: list[int | float], generator: torch.Generator) -> torch.Tensor:
    """Values for the padding input's trials: 0, 1, 2, -1, the dtype's extremes, the subgraph's integer constants
    and their neighbours (a mask that also drops a separator id compares the input with it), and random values."""
    if dtype == torch.bool:
        return torch.tensor([False, True])
    info = torch.iinfo(dtype)
    wanted = {0, 1, 2, -1, info.max, info.min}
    wanted |= {int(n) + d for n in numbers if float(n).is_integer() for d in (-1, 0, 1)}
    wanted |= set(torch.randint(info.min, info.max, (8,), generator=generator).tolist())
    return torch.tensor(sorted(v for v in wanted if info.min <= v <= info.max), dtype=dtype)


def _padding_consistent(
    module: fx.GraphModule,
    args: list,
    index: int,
    pattern: torch.Tensor,
    values: torch.Tensor,
    generator: torch.Generator,
) -> bool:
    """Whether the subgraph computes ``pattern & (input[b, kv] != 0)`` for inputs holding every one of ``values``
    and random draws of them; one random trial has an all-zero row."""
    template = args[index]
    batch, kv_len = template.shape
    if pattern.shape[0] not in (1, batch) or pattern.shape[-1] != kv_len:
        return False
    cells = batch * kv_len
    deterministic = [values[(torch.arange(cells) + start) % len(values)] for start in range(0, len(values), cells)]
    for trial in range(len(deterministic) + _RANDOM_TRIALS):
        if trial < len(deterministic):  # every value at least once
            data = deterministic[trial].view(batch, kv_len).clone()
        else:
            data = values[torch.randint(len(values), (batch, kv_len), generator=generator)]
        if trial == len(deterministic):
            data[0] = 0
        data = data.to(device=template.device, dtype=template.dtype)
        trial_args = list(args)
        trial_args[index] = data
        with torch.no_grad():
            result = _run(module, trial_args)
        expected = pattern & (data != 0)[:, None, None, :]
        if result.shape != expected.shape or not torch.equal(result, expected):
            return False
    return True


def _documents_window(
    module: fx.GraphModule, index: int, samples: list[list], generator: torch.Generator
) -> int | None:
    """The left window w where the subgraph computes causal attention (window w) within the documents of its input
    ``index`` read as (B, S) position ids, at every sample's sizes (``samples``: its argument lists), else None:
    positions counting up from 0 give one document per row, random packed rows (and random positions) several."""
    results = []
    for args in samples:
        template = args[index]
        batch, seq = template.shape
        if template.dtype == torch.bool:
            return None
        trial = list(args)
        trial[index] = torch.arange(seq, dtype=template.dtype, device=template.device).expand(batch, seq)
        with torch.no_grad():
            results.append(_run(module, trial))
    kind = _classify_evaluated(max(results, key=lambda result: result.shape[-1]))
    if kind is None or kind[0] != "causal":
        return None
    window = kind[1]
    for args, result in zip(samples, results):
        template = args[index]
        batch, seq = template.shape
        pattern = causal_pattern(seq, seq, window, template.device)
        if result.shape[-2:] != (seq, seq) or not torch.equal(result, pattern.expand_as(result)):
            return None
        for trial in range(_RANDOM_TRIALS):
            starts = torch.rand(batch, seq, generator=generator) < 0.3
            positions = torch.arange(seq).expand(batch, seq) - torch.cummax(starts * torch.arange(seq), 1).values
            if trial == _RANDOM_TRIALS - 1:  # positions that jump anywhere, as a model may be given
                positions = torch.randint(-2, 4, (batch, seq), generator=generator).cumsum(1)
            data = positions.to(device=template.device, dtype=template.dtype)
            trial_args = list(args)
            trial_args[index] = data
            with torch.no_grad():
                result = _run(module, trial_args)
            document = position_starts(data).cumsum(1)
            expected = pattern & (document[:, :, None] == document[:, None, :])
            if result.shape != (batch, 1, seq, seq) or not torch.equal(result, expected[:, None]):
                return None
    return window
