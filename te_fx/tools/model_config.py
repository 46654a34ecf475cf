"""Resolving ``te-fx explain``'s MODEL to a transformers config, without downloads or remote code, and the shrunk
copy of a config that explain traces: tiny widths, and everything te_fx's decisions depend on kept (layer count,
heads, KV heads, layer types, MLA head-dim ratios; attention spans shrunk so that they still cut keys off)."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ModelConfigError",
    "TRACE_BATCH",
    "TRACE_SEQ",
    "first_line",
    "load_config",
    "causal_lm_config",
    "shrink_config",
    "config_head_dims",
    "config_kv_heads",
    "config_dtype",
]

TRACE_BATCH, TRACE_SEQ = 2, 16  # the shape explain traces the shrunk copy at
SMALL_HEAD_DIM = 8
SMALL_WINDOW = 4  # sliding windows longer than KEEP_WINDOW are shrunk to this, so that they cut keys off at TRACE_SEQ
KEEP_WINDOW = 8
# config fields holding an attention span in tokens (sliding windows, Llama 4's chunks, GPT-Neo's local window)
_LENGTH_FIELDS = ("sliding_window", "sliding_window_size", "attention_chunk_size", "window_size")


class ModelConfigError(ValueError):
    """MODEL names no family, file or folder, or its config cannot be read (the CLI's exit code 2)."""


@contextlib.contextmanager
def offline() -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def first_line(error: BaseException) -> str:
    """``Type: message`` on one line; a first line that only introduces the reason (ends with ':') gets the next."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    summary = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return f"{type(error).__name__}: {summary}"


def load_config(model: str) -> tuple[Any, str]:
    """(config, where it came from) for MODEL; raises :class:`ModelConfigError` with a one-line message."""
    from transformers import CONFIG_MAPPING, __version__

    from .tiny_models import FAMILIES, tiny_config

    if model in FAMILIES:
        return tiny_config(model), f"tiny config of the {model!r} family"
    path = Path(model)
    if not path.exists():
        if os.sep not in model and "/" not in model and not model.endswith(".json"):
            raise ModelConfigError(
                f"unknown model {model!r}: not a tiny model family ({', '.join(FAMILIES)}), config.json or "
                "checkpoint folder"
            )
        hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~")) and not model.endswith(".json")
        hint = (
            f" (te-fx explain never downloads: for a Hub model, fetch its config first: `hf download {model} "
            "config.json --local-dir DIR`)" if hub_id else ""
        )  # fmt: skip
        raise ModelConfigError(f"{model}: no such file or directory{hint}")
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ModelConfigError(f"{path} has no config.json")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        raise ModelConfigError(f"{file}: malformed JSON ({error.msg} at {where})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelConfigError(f"{file}: cannot be read ({first_line(error)})") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{file}: a config.json holds a JSON object, not {type(data).__name__}")
    model_type = data.get("model_type")
    if not isinstance(model_type, str):
        raise ModelConfigError(f"{file}: no model_type")
    if model_type not in CONFIG_MAPPING:
        raise ModelConfigError(
            f"{file}: unknown model_type {model_type!r} (transformers {__version__} has no such model; "
            "te-fx explain runs no remote code)"
        )
    data.pop("auto_map", None)
    try:
        with offline(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as error:  # noqa: BLE001 - any validation error of the config is bad input
        raise ModelConfigError(f"{file}: not a valid {model_type} config ({first_line(error)})") from None
    return config, str(file)


def causal_lm_config(config: Any) -> tuple[Any, str | None]:
    """The config AutoModelForCausalLM builds the language model from (the text config of a composite model), and
    a note when it is not ``config`` itself."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    text, note = config.get_text_config(decoder=True), None
    if text is not config and type(text) in MODEL_FOR_CAUSAL_LM_MAPPING:
        note = f"{config.model_type} is a composite model: explaining its text decoder ({text.model_type})"
        config = text
    elif type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelConfigError(f"model_type {config.model_type!r} has no causal-LM class in transformers")
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    is_mla = isinstance(getattr(config, "qk_rope_head_dim", None), int)  # K/V heads equal the query heads
    if isinstance(heads, int) and isinstance(kv_heads, int) and not is_mla and (kv_heads < 1 or heads % kv_heads):
        raise ModelConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}: "
                               "no model can be built from this config")  # fmt: skip
    return config, note


def config_head_dims(config: Any) -> tuple[int | None, int | None]:
    head_dim = getattr(config, "head_dim", None)
    if not isinstance(head_dim, int):
        hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
        head_dim = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None
    return head_dim, head_dim


def config_kv_heads(config: Any, heads: int | None) -> int | None:
    """KV heads from the config, for layouts te_fx does not inject (no module to read them from)."""
    kv_heads = getattr(config, "num_key_value_heads", None)
    if isinstance(kv_heads, int):
        return kv_heads
    if getattr(config, "new_decoder_architecture", False):  # Falcon 40B/180B
        return getattr(config, "num_kv_heads", None) or heads
    if getattr(config, "multi_query", False):  # Falcon 7B, GPT-BigCode
        return 1
    return heads


def config_dtype(config: Any) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _set(data: dict[str, Any], config: Any, name: str, value: Any) -> None:
    """Set a config field under its stored name (``attribute_map``: GPT-2's ``n_embd`` for ``hidden_size``)."""
    key = getattr(config, "attribute_map", {}).get(name, name)
    if key in data and data[key] is not None:
        data[key] = value


def _default_rope(rope: Any) -> Any:
    """RoPE parameters with the default type: scaled RoPE variants carry per-dimension tables (Phi-3's longrope) that
    a shrunk head dim breaks, and no attention decision depends on the RoPE type."""
    if not isinstance(rope, dict):
        return rope
    if rope and all(isinstance(value, dict) for value in rope.values()):  # per layer type (Gemma3)
        return {key: _default_rope(value) for key, value in rope.items()}
    small = {"rope_type": "default", "rope_theta": rope.get("rope_theta", 10000.0)}
    if "partial_rotary_factor" in rope:
        small["partial_rotary_factor"] = rope["partial_rotary_factor"]
    return small


def shrink_config(config: Any) -> tuple[Any, dict[str, tuple[int, int]], str]:
    """A copy of ``config`` with tiny widths that keeps what te_fx's decisions depend on (layer count, heads,
    KV heads, layer types, MLA head-dim ratios); the attention spans it shrank (name -> (real, shrunk)); and how
    the head dims were shrunk, for the report."""
    data = config.to_dict()
    data.pop("quantization_config", None)
    heads = config.num_attention_heads
    num_layers = config.num_hidden_layers
    if isinstance(getattr(config, "qk_rope_head_dim", None), int):  # MLA (DeepSeek-V2/V3): keep the dim ratios
        dims = {name: getattr(config, name) for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}
        factor = max(1, min(d for d in dims.values() if d) // SMALL_HEAD_DIM)
        small = {name: max(1, d // factor) if d else d for name, d in dims.items()}
        data.update(small)
        head_dims = "MLA head dims {} -> {}".format(
            "/".join(str(d) for d in dims.values()), "/".join(str(d) for d in small.values())
        )
        if "qk_head_dim" in data:
            data["qk_head_dim"] = small["qk_nope_head_dim"] + small["qk_rope_head_dim"]
        _set(data, config, "head_dim", small["qk_rope_head_dim"])
        for name in ("q_lora_rank", "kv_lora_rank"):
            _set(data, config, name, 16)
    else:
        _set(data, config, "head_dim", SMALL_HEAD_DIM)
        head_dims = f"head dim {SMALL_HEAD_DIM}"
    _set(data, config, "hidden_size", heads * SMALL_HEAD_DIM)
    for name in ("intermediate_size", "ffn_hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size",
                 "n_inner"):  # fmt: skip
        _set(data, config, name, 32)
    _set(data, config, "vocab_size", 128)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = data.get(name)
        if isinstance(value, int) and value >= 128:
            data[name] = 0
        elif isinstance(value, list):
            data[name] = [v if v < 128 else 0 for v in value]
    for name in ("n_routed_experts", "num_experts", "num_local_experts"):
        if isinstance(data.get(name), int):
            data[name] = min(data[name], 4)
    if isinstance(data.get("num_experts_per_tok"), int):
        data["num_experts_per_tok"] = min(data["num_experts_per_tok"], 2)
    for name in ("n_group", "topk_group"):
        _set(data, config, name, 1)
    if isinstance(data.get("first_k_dense_replace"), int):  # DeepSeek: dense MLPs only (the MLP decides nothing)
        data["first_k_dense_replace"] = num_layers
    changed: dict[str, Any] = {}
    for name in _LENGTH_FIELDS:  # attention spans: shrunk so that they cut keys off at TRACE_SEQ
        span = data.get(name)
        if isinstance(span, int) and not isinstance(span, bool) and span > KEEP_WINDOW:
            data[name] = SMALL_WINDOW
            changed[name] = (span, SMALL_WINDOW)
    rotary_dim = data.get("rotary_dim")  # GPT-J, CodeGen: rotary dims out of the head dim, in absolute numbers
    real_head_dim = config_head_dims(config)[0]
    if isinstance(rotary_dim, int) and real_head_dim:
        data["rotary_dim"] = max(2, 2 * round(rotary_dim * SMALL_HEAD_DIM / real_head_dim / 2))
    for name in ("rope_parameters", "rope_scaling"):
        if isinstance(data.get(name), dict):
            data[name] = _default_rope(data[name])
    data["dtype"] = "float32"
    data.pop("torch_dtype", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small_config = type(config).from_dict(data)
    return small_config, changed, head_dims
