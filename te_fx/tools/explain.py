"""``te-fx explain MODEL``: per attention layer, what te_fx's attention backend (``attn_implementation="te"``), its
eager path and its compile path do with a model, and why.

MODEL is a family of :mod:`te_fx.tools.tiny_models` (its tiny config), a local ``config.json`` or a local checkpoint
folder holding one. Nothing is downloaded and no weights are read. The analysis runs te_fx's own code, never a copy of
its rules:

* the model's real geometry (head counts, head dims, windows, scales, which modules get injected and why the others
  do not) comes from building the model on the meta device (no memory) and running
  :func:`te_fx.inject_te_attention` on it; a model transformers builds without SDPA (Gemma2, GPT-OSS) is built with
  its eager attention, which no SDPA-based way in reaches;
* mask decisions depend on the masks HF builds, not on the model's widths, so they come from a *shrunk copy* of the
  config (same layer count, heads, KV heads, layer types and MLA head-dim ratios; head dim 8 and tiny MLP, vocabulary
  and expert counts; attention spans such as sliding windows longer than 8 shrunk to 4, so that they cut keys off at
  the traced length of 16): the attention backend and the eager path run it (``attn_implementation="te"``, and
  injected) with the reference executor on a batch without padding, a right-padded one and a decode step; the
  compile path runs te_attn's FX pass
  on it (executor "reference", inner "eager") without an attention_mask and with one of ones, as a tokenizer passes
  it. Windows are reported at their real size;
* TransformerEngine's own limits (head dims, dtype, and where CUDA and TE are there, its backend check at a typical
  shape) are judged from the real geometry.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.reasons import describe, reason_text
from ..executors import te_head_dims_supported
from .model_config import (
    TRACE_BATCH,
    TRACE_SEQ,
    ModelConfigError,
    causal_lm_config,
    config_dtype,
    config_head_dims,
    config_kv_heads,
    first_line,
    load_config,
    offline,
    shrink_config,
)

__all__ = ["ModelConfigError", "AnalysisError", "Explanation", "LayerExplanation", "explain", "format_explanation"]

TYPICAL_SEQ = 4096  # sequence length of TE's backend check, capped by max_position_embeddings
PAD_TAIL = 4  # right padding of the padded batch's second row

EAGER_SCENARIOS = {
    "no_attention_mask": "no attention_mask",
    "no_padding": "unpadded attention_mask",
    "padding": "padded batch",
    "decode": "decode step (KV cache)",
}
COMPILE_SCENARIOS = {"no_attention_mask": "no attention_mask", "attention_mask": "attention_mask (any values)"}


class AnalysisError(RuntimeError):
    """The model could be read but not analysed (the CLI's exit code 1)."""


@dataclass
class Decision:
    """What one attention call does: ``runs`` "te" (with ``mask_type``/``window_size``), "sdpa" or "eager" (the
    model's eager attention), with ``reason``."""

    runs: str
    mask_type: str | None = None
    window_size: tuple[int, int] | None = None
    reason: str | None = None

    def text(self) -> str:
        if self.runs == "te":
            window = f" window {tuple(self.window_size)}" if self.window_size and self.window_size[0] >= 0 else ""
            return f"TE {self.mask_type}{window}" if self.mask_type else "TE"
        name = "HF eager attention" if self.runs == "eager" else "SDPA"
        return f"{name} ({self.reason})" if self.reason else name


@dataclass
class LayerExplanation:
    """One attention layer: its real geometry, whether the eager path injects it, and the decisions per scenario."""

    index: int
    module: str
    layer_type: str | None
    sliding_window: int | None
    injected: bool
    not_injected_reason: str | None
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    v_head_dim: int | None
    softmax_scale: float | None
    te_limit: str | None  # why TE cannot run this layer's geometry at all (head dims), else None
    backend: dict[str, Decision] = field(default_factory=dict)
    eager: dict[str, Decision] = field(default_factory=dict)
    compile: dict[str, Decision] = field(default_factory=dict)


@dataclass
class Explanation:
    """The whole report; :func:`format_explanation` prints it, ``asdict`` gives the ``--json`` form."""

    model: str
    source: str
    model_type: str
    architecture: str
    num_layers: int
    dtype: str | None
    dtype_note: str | None
    te_backend_check: str
    layers: list[LayerExplanation]
    notes: list[str]
    errors: list[str]
    backend_refused: str | None = None  # why attn_implementation="te" cannot build this model at all

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' and te_fx's warnings (te_fx's skips are in the report) and Python warnings; one
    intra-op thread."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    te_logger = logging.getLogger("te_fx")
    te_level = te_logger.level
    threads = torch.get_num_threads()
    hf_logging.set_verbosity_error()
    if te_logger.getEffectiveLevel() > logging.INFO:  # `te-fx -v explain` keeps te_fx's own log
        te_logger.setLevel(logging.ERROR)
    torch.set_num_threads(1)  # tiny tensors: intra-op threads cost far more than they save, worse on a busy machine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        te_logger.setLevel(te_level)
        torch.set_num_threads(threads)


def _layer_index(path: str, position: int) -> int:
    match = re.search(r"\.(\d+)(?:\.|$)", path)
    return int(match.group(1)) if match else position


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules of a HF causal LM, in forward order: ``self_attn`` modules (where te_fx injects), fused
    q/k/v attention modules, and modules with separate q/k/v projections under another name."""
    from ..eager import params

    found = []
    for path, module in model.named_modules():
        separate = all(isinstance(getattr(module, p, None), nn.Module) for p in ("q_proj", "k_proj", "v_proj"))
        if path.rsplit(".", 1)[-1] == "self_attn" or params.fused_qkv_name(module) is not None or separate:
            if not any(path.startswith(f"{other}.") for other, _ in found):
                found.append((path, module))
    return found


def _window_left(module: nn.Module, config: Any, index: int) -> int:
    """TE's left window of a layer (-1 for none): the injected module's, else HF's sliding window - 1."""
    from ..eager import params

    te_module = getattr(module, "attn_module", None)
    if te_module is not None:
        return int(te_module.window_size[0])
    window = getattr(module, "sliding_window", None)
    if not isinstance(window, int):
        window = params.config_sliding_window(config, index)
    return window - 1 if isinstance(window, int) and window > 0 else -1


def _not_injected_reason(path: str, module: nn.Module) -> str:
    """Why :func:`te_fx.inject_te_attention` left this module alone."""
    from ..eager.inject import not_injected_reason

    return not_injected_reason(path, module) or "not injected"


_NO_SDPA = "the model's eager attention runs: transformers builds this model without SDPA, so no SDPA call to take"
_OWN_CODE = "refused: the model runs its own attention code, not through transformers' AttentionInterface"


def _without_sdpa(config: Any) -> tuple[str, bool] | None:
    """(model class name, whether its attention goes through transformers' AttentionInterface) when transformers
    builds the model of ``config`` with its eager attention only (no SDPA support: Gemma2's softcapping, GPT-OSS's
    sinks, Bloom's ALiBi), else None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None
    if getattr(model_class, "_supports_sdpa", True):
        return None
    return model_class.__name__, model_class.is_backend_compatible()


def _without_sdpa_note(name: str, interface: bool) -> str:
    """What te_fx's ways in do with a model that transformers builds without SDPA (see :func:`_without_sdpa`)."""
    backend = (
        'attn_implementation="te" runs it: calls with softcapping, per-token sinks or a position bias on the model\'s '
        "eager attention (counted fallback_argument), the others on TE"
        if interface
        else 'its attention does not go through transformers\' AttentionInterface either, so attn_implementation="te" '
        "refuses it: te_fx cannot run this model's attention"
    )
    return (
        f"transformers builds {name} with its eager attention only (no SDPA support), so inject_te_attention and "
        f'torch.compile(backend="te_attn") have no SDPA call to take; {backend}'
    )


def _head_dim_limit(head_dim: int | None, v_head_dim: int | None) -> str | None:
    dims = [d for d in (head_dim, v_head_dim) if d is not None]
    bad = [d for d in dict.fromkeys(dims) if not te_head_dims_supported(d, d)]
    if not bad:
        return None
    dims_text = ", ".join(map(str, bad))
    return f"fallback_head_dim: TE needs head dims that are multiples of 8 and <= 256, this layer has {dims_text}"


# --------------------------------------------------------------------------------------------- the eager path


@contextlib.contextmanager
def _record_eager(model: nn.Module, paths: list[str]) -> Iterator[dict[str, dict[str, Any]]]:
    """Per attention module: the te_fx counters its forward added and the (mask_type, window_size) its TE module was
    called with, for the calls made inside the block."""
    from .. import te_attention

    modules = dict(model.named_modules())
    record: dict[str, dict[str, Any]] = {}
    handles, restores = [], []
    for path in paths:
        module = modules[path]

        def before(_module: nn.Module, _args: tuple, path: str = path) -> None:
            record[path] = {"start": te_attention.get_te_attention_stats(), "calls": [], "counts": {}}

        def after(_module: nn.Module, _args: tuple, _out: object, path: str = path) -> None:
            now, start = te_attention.get_te_attention_stats(), record[path].pop("start")
            record[path]["counts"] = {k: now[k] - start[k] for k in now if now[k] != start[k]}

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        te_module = getattr(module, "attn_module", None)
        if te_module is not None:
            te_module.run = _recording(te_module.run, record, path)
            restores.append(te_module)
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
        for te_module in restores:
            del te_module.run


def _recording(run: Any, record: dict[str, dict[str, Any]], path: str) -> Any:
    """``run`` of an attention module, recording the plan kind and window of each call under ``path``."""

    def recorded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Any) -> torch.Tensor:
        record[path]["calls"].append((plan.kind, tuple(plan.window_size)))
        return run(q, k, v, plan)

    return recorded


def _eager_decision(entry: dict[str, Any] | None, map_window: Any) -> Decision:
    if entry is None or not entry["counts"]:
        return Decision("sdpa", reason="no SDPA call reached te_fx")
    counts = entry["counts"]
    fallbacks = sorted(key for key in counts if key != "te_hits")
    if fallbacks:
        reasons = "; ".join(describe(key) for key in fallbacks)
        mixed = " (some calls ran TE)" if "te_hits" in counts else ""
        runs = "eager" if fallbacks == ["fallback_argument"] else "sdpa"  # the backend runs the model's eager attention
        return Decision(runs, reason=reasons + mixed)
    kinds = sorted(set(entry["calls"]))
    if not kinds:  # the attention backend: its plans are not recorded
        return Decision("te")
    if len(kinds) != 1:
        return Decision("te", mask_type=" / ".join(k[0] for k in kinds), window_size=None)
    mask_type, window = kinds[0]
    return Decision("te", mask_type=mask_type, window_size=map_window(window))


def _run_eager(
    small: nn.Module, paths: list[str], windows: dict[str, tuple[int, int]], backend: bool = False
) -> dict[str, dict[str, Decision]]:
    """Per module path: the decision of each scenario, from running the shrunk copy injected (or, with ``backend``,
    with ``attn_implementation="te"``) on the reference executor."""
    from .. import te_attention
    from ..executors import executor_env
    from ..hf_interface import NAME

    model = copy.deepcopy(small)
    if backend:
        model.set_attn_implementation(NAME)
    else:
        te_attention.inject_te_attention(model, executor="reference")
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (TRACE_BATCH, TRACE_SEQ), generator=generator)
    ones = torch.ones_like(ids)
    padded = ones.clone()
    padded[1, TRACE_SEQ - PAD_TAIL :] = 0
    results: dict[str, dict[str, Decision]] = {path: {} for path in paths}

    def map_for(path: str):
        small_left, real_left = windows[path]
        return lambda w: (real_left, w[1]) if len(w) == 2 and w[0] >= 0 and w[0] == small_left else w

    def collect(scenario: str, record: dict[str, dict[str, Any]]) -> None:
        for path in paths:
            results[path][scenario] = _eager_decision(record.get(path), map_for(path))

    with torch.no_grad(), executor_env("reference"):
        for scenario, mask in (("no_attention_mask", None), ("no_padding", ones), ("padding", padded)):
            with _record_eager(model, paths) as record:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            collect(scenario, record)
        out = model(input_ids=ids, attention_mask=ones, use_cache=True)
        next_ids = torch.randint(3, vocab, (TRACE_BATCH, 1), generator=generator)
        with _record_eager(model, paths) as record:
            model(
                input_ids=next_ids, attention_mask=torch.ones(TRACE_BATCH, TRACE_SEQ + 1, dtype=ids.dtype),
                past_key_values=out.past_key_values, use_cache=True,
            )  # fmt: skip
        collect("decode", record)
    return results


# --------------------------------------------------------------------------------------------- the compile path


def _run_compile(
    small: nn.Module, windows: list[tuple[int, int]], window_map: dict[int, int]
) -> tuple[list[dict[str, Decision]] | None, str | None]:
    """Per attention layer (in forward order): the compile decision of each scenario, from te_attn's FX pass on the
    shrunk copy; or (None, why the entries could not be mapped to layers). ``windows``: per layer, (TE's left
    window in the shrunk copy, the real one); ``window_map`` the same for the config's sliding window."""
    from ..compile import backend

    vocab = small.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (TRACE_BATCH, TRACE_SEQ), generator=torch.Generator().manual_seed(0))
    num_layers = len(windows)
    per_layer: list[dict[str, Decision]] = [{} for _ in range(num_layers)]
    for scenario, mask in (("no_attention_mask", None), ("attention_mask", torch.ones_like(ids))):
        torch._dynamo.reset()
        backend.reset_compile_report()
        compiled = torch.compile(small, backend="te_attn", options={"executor": "reference", "inner": "eager"})
        try:  # with autograd on, as a training step compiles it
            compiled(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            torch._dynamo.reset()
        entries = backend.compile_report()
        backend.reset_compile_report()
        if len(entries) != num_layers:
            return None, (
                f"the compiled graph(s) held {len(entries)} SDPA calls for {num_layers} attention layers "
                f"({COMPILE_SCENARIOS[scenario]}), so they cannot be matched to layers"
            )
        for layer, entry, (small_left, real_left) in zip(per_layer, entries, windows):
            if entry["decision"] == "te":
                window = tuple(entry["window_size"])
                if window[0] >= 0 and window[0] == small_left:
                    window = (real_left, window[1])
                elif window[0] in window_map:
                    window = (window_map[window[0]], window[1])
                layer[scenario] = Decision("te", mask_type=entry["mask_kind"], window_size=window)
            else:
                layer[scenario] = Decision("sdpa", reason=reason_text(entry["reason"], entry["detail"]))
    return per_layer, None


# --------------------------------------------------------------------------------------------- TE's backend check


def _te_checker() -> tuple[Any, str]:
    """(a function (layer, dtype, mask_type, window, q_len, kv_len, training) -> reason or None, or None; what was
    checked). The compile path checks with training=True, as te_attn's pass does."""
    from ..executors import load_te_executor

    if not torch.cuda.is_available():
        return None, "not run (no CUDA GPU; the head-dim limits above are TE's, judged from the config)"
    try:
        te_executor = load_te_executor()
    except Exception as error:  # noqa: BLE001 - TE missing or broken: say so, decide nothing
        cause = error.__cause__ or error
        return None, f"not run (TransformerEngine unavailable: {first_line(cause)}; see `te-fx check`)"

    def check(
        layer: LayerExplanation,
        dtype: torch.dtype,
        mask_type: str,
        window: tuple[int, int],
        q_len: int,
        kv_len: int,
        training: bool,
    ) -> str | None:
        shape = (TRACE_BATCH, layer.num_heads, layer.num_kv_heads, q_len, kv_len, layer.head_dim, layer.v_head_dim)
        try:
            return te_executor.shape_unsupported_reason(dtype, shape, mask_type, window, 0.0, training, 0)
        except Exception as error:  # noqa: BLE001
            return f"TE's backend check failed ({first_line(error)})"

    return check, f"run on {torch.cuda.get_device_name(0)} at batch {TRACE_BATCH}, length {{seq}}"


def _apply_te_limits(layers: list[LayerExplanation], dtype: torch.dtype | None, max_positions: int | None) -> str:
    """Turn TE decisions into the fallbacks TE's limits force with the default executor; returns what was checked."""
    check, checked = _te_checker()
    seq = min(TYPICAL_SEQ, max_positions) if isinstance(max_positions, int) and max_positions > 0 else TYPICAL_SEQ
    checked = checked.replace("{seq}", str(seq))
    te_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    for layer in layers:
        for path, decisions in (("eager", layer.eager), ("compile", layer.compile)):
            for scenario, decision in decisions.items():
                if decision.runs != "te":
                    continue
                if layer.te_limit is not None:
                    decisions[scenario] = Decision("sdpa", reason=layer.te_limit)
                    continue
                if check is None or None in (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.v_head_dim):
                    continue
                q_len = 1 if scenario == "decode" else seq
                mask_type = decision.mask_type or "causal"
                window = tuple(decision.window_size or (-1, 0))
                reason = check(layer, te_dtype, mask_type, window, q_len, seq, path == "compile")
                if reason is not None:
                    decisions[scenario] = Decision("sdpa", reason=f"{reason}: TE's backend check at length {seq}")
    return checked


# --------------------------------------------------------------------------------------------- explain


def explain(model: str, compile_path: bool = True) -> Explanation:
    """Explain what te_fx does with MODEL (see the module docstring). Raises :class:`ModelConfigError` for bad input and
    :class:`AnalysisError` when the model cannot be built. Side effects: te_fx's eager counters grow by the calls
    of the shrunk copy; torch._dynamo and te_fx's compile report are reset."""
    from transformers import AutoModelForCausalLM

    from .. import te_attention

    with _quiet():
        config, source = load_config(model)
    notes: list[str] = []
    errors: list[str] = []
    config, composite_note = causal_lm_config(config)
    if composite_note:
        notes.append(composite_note)
    config = copy.deepcopy(config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
        notes.append("quantization_config ignored: attention decisions do not depend on weight quantization")
    num_layers = getattr(config, "num_hidden_layers", None)

    with _quiet(), offline():
        without_sdpa = _without_sdpa(config)
        implementation = "eager" if without_sdpa else "sdpa"
        try:
            with torch.device("meta"):
                real = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
        except Exception as error:  # noqa: BLE001
            raise AnalysisError(
                f"cannot build {config.model_type} with attn_implementation={implementation!r} ({first_line(error)})"
            ) from None
        architecture = type(real).__name__
        if without_sdpa:
            notes.append(_without_sdpa_note(*without_sdpa))
        te_attention.inject_te_attention(real, executor="reference")
        attention = _attention_modules(real)
        layer_types = getattr(config, "layer_types", None) or []
        layers: list[LayerExplanation] = []
        for position, (path, module) in enumerate(attention):
            index = _layer_index(path, position)
            te_module = getattr(module, "attn_module", None)
            left = _window_left(module, config, index)
            if te_module is not None:
                dims = te_module.kv_channels
                head_dim, v_head_dim = dims if isinstance(dims, tuple) else (dims, dims)
                heads, kv_heads = te_module.num_attention_heads, te_module.num_gqa_groups
                scale = te_module.softmax_scale if te_module.softmax_scale is not None else head_dim**-0.5
            else:
                head_dim, v_head_dim = config_head_dims(config)
                heads = getattr(config, "num_attention_heads", None)
                kv_heads = config_kv_heads(config, heads)
                scaling = getattr(module, "scaling", None)
                scale = float(scaling) if isinstance(scaling, (int, float)) else (head_dim**-0.5 if head_dim else None)
            layers.append(LayerExplanation(
                index=index, module=path,
                layer_type=layer_types[index] if index < len(layer_types) else None,
                sliding_window=left + 1 if left >= 0 else None,
                injected=te_module is not None,
                not_injected_reason=None if te_module is not None else (
                    _NO_SDPA if without_sdpa else _not_injected_reason(path, module)
                ),
                num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, v_head_dim=v_head_dim,
                softmax_scale=scale, te_limit=_head_dim_limit(head_dim, v_head_dim),
            ))  # fmt: skip
        del real
        if not layers:
            raise AnalysisError(f"{architecture} has no attention module te_fx recognises")

        try:
            small_config, changed, head_dims = shrink_config(config)
            torch.manual_seed(0)
            small = AutoModelForCausalLM.from_config(small_config, attn_implementation=implementation).float().eval()
        except Exception as error:  # noqa: BLE001
            raise AnalysisError(f"cannot build the shrunk copy of {config.model_type} ({first_line(error)})") from None
        small_attention = _attention_modules(small)
        if [path for path, _ in small_attention] != [layer.module for layer in layers]:
            raise AnalysisError("the shrunk copy's attention modules differ from the model's")
        small_lefts = {
            path: _window_left(module, small_config, layer.index)
            for (path, module), layer in zip(small_attention, layers)
        }
        windows = {
            layer.module: (small_lefts[layer.module], layer.sliding_window - 1 if layer.sliding_window else -1)
            for layer in layers
        }
        if compile_path and without_sdpa:  # nothing for te_attn to rewrite: the graph holds the eager attention
            for layer in layers:
                layer.compile = {scenario: Decision("eager", reason=_NO_SDPA) for scenario in COMPILE_SCENARIOS}
        elif compile_path:
            window_map = {}
            if "sliding_window" in changed:
                window_map[changed["sliding_window"][1] - 1] = changed["sliding_window"][0] - 1
            try:
                per_layer, problem = _run_compile(small, [windows[layer.module] for layer in layers], window_map)
            except Exception as error:  # noqa: BLE001
                per_layer, problem = None, f"torch.compile failed ({first_line(error)})"
            if per_layer is None:
                errors.append(f"compile path not analysed: {problem}")
            else:
                for layer, decisions in zip(layers, per_layer):
                    layer.compile = decisions
        backend_refused = _OWN_CODE if without_sdpa and not without_sdpa[1] else None
        if backend_refused is None:
            try:
                backend = _run_eager(small, [layer.module for layer in layers], windows, backend=True)
            except Exception as error:  # noqa: BLE001
                problem = first_line(error)
                errors.append(f'attn_implementation="te" not analysed: running the shrunk copy failed ({problem})')
            else:
                for layer in layers:
                    layer.backend = backend[layer.module]
        if without_sdpa:
            for layer in layers:
                layer.eager = {scenario: Decision("eager", reason=_NO_SDPA) for scenario in EAGER_SCENARIOS}
        else:
            try:
                eager = _run_eager(small, [layer.module for layer in layers], windows)
            except Exception as error:  # noqa: BLE001
                errors.append(f"eager path not analysed: running the injected shrunk copy failed ({first_line(error)})")
            else:
                for layer in layers:
                    layer.eager = eager[layer.module]
                    if not layer.injected:
                        for decision in layer.eager.values():
                            if decision.runs == "sdpa":
                                decision.reason = f"not injected: {layer.not_injected_reason}"

    dtype = config_dtype(config)
    dtype_note = None
    if dtype not in (torch.float16, torch.bfloat16):
        name = "float32 (not set in the config)" if dtype is None else str(dtype).removeprefix("torch.")
        dtype_note = (
            f"{name}: cast the model to bf16/fp16 for TE (model.to(torch.bfloat16)), else every call stays on SDPA "
            "(fallback_dtype); executor='reference' runs any dtype"
        )
    te_backend_check = _apply_te_limits(layers, dtype, getattr(config, "max_position_embeddings", None))
    notes.append(
        f"mask decisions come from a shrunk copy of the config ({head_dims}; the same layers, heads, KV heads and "
        f"layer types) run at batch {TRACE_BATCH}, length {TRACE_SEQ}: widths change no decision te_fx makes"
    )
    if changed:
        spans = ", ".join(f"{name} {real_span} -> {small_span}" for name, (real_span, small_span) in changed.items())
        notes.append(
            f"attention spans shrunk to fit that length ({spans}); windows are reported at their real size, and the "
            "decisions are those of sequences longer than the span: shorter ones get a plain causal mask from "
            "transformers, which te_fx treats as on a full-attention layer"
        )
    notes.append(
        "eager: masks are classified at run time, once per mask object and forward (one host sync); padding at "
        "the ends of rows and packed documents run on TE, padding inside a row on SDPA; tensors "
        "must be on CUDA (else fallback_device)"
    )
    if compile_path:
        notes.append(
            "compile: decided once per compiled graph from the subgraph that builds the mask, whatever its values; "
            "with a padding mask te_fx's op picks its kernel at run time: in training TE for padding at the ends of "
            "rows and its reference kernels for padding inside a row, in inference TE with a key bias"
        )
        from ..compile.mask_subgraph import _MAX_SAMPLE

        if any(layer.sliding_window for layer in layers):
            notes.append(
                "compile: the sliding window is read from the mask subgraph, evaluated at the traced length and "
                "beyond every constant in it, so a dynamic graph traced inside the window keeps it for longer "
                "sequences (where transformers leaves the window out, its guard recompiles them); a subgraph with a "
                f"constant above {(_MAX_SAMPLE - 3) // 2} stays on SDPA"
            )
    return Explanation(
        model=model, source=source, model_type=config.model_type, architecture=architecture,
        num_layers=num_layers if isinstance(num_layers, int) else len(layers),
        dtype=None if dtype is None else str(dtype).removeprefix("torch."), dtype_note=dtype_note,
        te_backend_check=te_backend_check, layers=layers, notes=notes, errors=errors, backend_refused=backend_refused,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- formatting


def _scale_text(scale: float | None, head_dim: int | None) -> str:
    if scale is None:
        return "?"
    if head_dim and math.isclose(scale, head_dim**-0.5, rel_tol=1e-6):
        return f"{scale:.6g} (head_dim**-0.5)"
    return f"{scale:.6g}"


def _distinct(values: list[Any]) -> str:
    unique = list(dict.fromkeys(v for v in values if v is not None))
    return " / ".join(map(str, unique)) if unique else "?"


def _scenario_lines(title: str, decisions: dict[str, Decision], labels: dict[str, str]) -> list[str]:
    """One line per distinct decision, with the scenarios that lead to it."""
    groups: dict[str, list[str]] = {}
    for scenario, label in labels.items():
        if scenario in decisions:
            groups.setdefault(decisions[scenario].text(), []).append(label)
    if len(groups) == 1:
        groups = {text: ["every call"] for text in groups}
    lines = []
    for text, names in groups.items():
        if names[:2] == [EAGER_SCENARIOS["no_attention_mask"], EAGER_SCENARIOS["no_padding"]]:
            names = ["no padding", *names[2:]]
        lines.append(f"  {title:<8} {', '.join(names) + ':':<30} {text}")
        title = ""
    return lines


def _layer_header(layer: LayerExplanation) -> str:
    details = [layer.layer_type] if layer.layer_type else []
    if layer.sliding_window:
        details.append(f"window {layer.sliding_window}")
    return f" ({', '.join(details)})" if details else ""


def format_explanation(result: Explanation) -> str:
    """The report as text; consecutive layers with the same decisions are printed once."""
    layers = result.layers
    injected = [layer for layer in layers if layer.injected]
    lines = [f"te-fx explain {result.model}: {result.source}"]
    lines.append(f"model: {result.model_type} ({result.architecture}), {result.num_layers} layers, "
                 f"dtype {result.dtype or 'not set (float32)'}")  # fmt: skip
    heads = _distinct([layer.num_heads for layer in layers])
    kv_heads = _distinct([layer.num_kv_heads for layer in layers])
    dims = _distinct(
        [
            layer.head_dim if layer.head_dim == layer.v_head_dim else f"{layer.head_dim} (QK) / {layer.v_head_dim} (V)"
            for layer in layers
        ]
    )
    scales = _distinct([_scale_text(layer.softmax_scale, layer.head_dim) for layer in layers])
    lines.append(f"attention: {heads} heads, {kv_heads} KV heads, head dim {dims}, softmax scale {scales}")
    windows = sorted({layer.sliding_window for layer in layers if layer.sliding_window})
    if windows:
        count = sum(1 for layer in layers if layer.sliding_window)
        lines.append(f"sliding window: {_distinct(windows)} on {count} of {len(layers)} layers")
    backend = result.backend_refused or "every attention layer goes through te_fx"
    lines.append(f'backend (attn_implementation="te"): {backend}')
    lines.append(f"eager path (inject_te_attention): injects {len(injected)} of {len(layers)} attention layers")
    over = [str(layer.index) for layer in layers if layer.te_limit]
    limits = "ok (multiples of 8, <= 256)" if not over else f"over TE's limits on layers {', '.join(over)}"
    lines.append(f"TE head dims: {limits}")
    lines.append(f"TE dtype: {'ok' if result.dtype_note is None else result.dtype_note}")
    lines.append(f"TE backend check: {result.te_backend_check}")
    lines.append("")
    groups: list[tuple[list[int], LayerExplanation, str]] = []
    for layer in layers:
        key = json.dumps([_layer_header(layer), layer.injected, layer.not_injected_reason, layer.te_limit,
                          {k: v.text() for k, v in layer.backend.items()},
                          {k: v.text() for k, v in layer.eager.items()},
                          {k: v.text() for k, v in layer.compile.items()}])  # fmt: skip
        if groups and groups[-1][2] == key and groups[-1][0][-1] == layer.index - 1:
            groups[-1][0].append(layer.index)
        else:
            groups.append(([layer.index], layer, key))
    for indices, layer, _key in groups:
        label = f"layer {indices[0]}" if len(indices) == 1 else f"layers {indices[0]}-{indices[-1]}"
        lines.append(f"{label}{_layer_header(layer)}:")
        if layer.backend:
            lines += _scenario_lines("backend", layer.backend, EAGER_SCENARIOS)
        if layer.eager:
            lines += _scenario_lines("eager", layer.eager, EAGER_SCENARIOS)
        elif not layer.injected:
            lines.append(f"  {'eager':<8} {'every call:':<30} SDPA (not injected: {layer.not_injected_reason})")
        if layer.compile:
            lines += _scenario_lines("compile", layer.compile, COMPILE_SCENARIOS)
    if result.notes:
        lines.append("")
        lines += [f"note: {note}" for note in result.notes]
    lines += [f"error: {error}" for error in result.errors]
    return "\n".join(lines)
