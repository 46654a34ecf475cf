"""Parameter inference: head counts, head dims, window, scale and dropout of a HF attention module.

Read at injection time from module attributes first, then projection widths (meta tensors and wrapped linears
included), then the config. Returns None for layouts te_fx does not handle (fused qkv projections).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["proj_out_features", "infer_attn_params", "config_sliding_window", "fused_qkv_name"]

_FUSED_QKV = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack")


def proj_out_features(proj: nn.Module | None) -> int | None:
    """Output width of a projection: ``nn.Linear.out_features``, a 2D weight's rows (meta tensors too), or the
    width of the linear it wraps (``.linear``, PEFT's ``.base_layer``)."""
    if proj is None:
        return None
    out = getattr(proj, "out_features", None)
    if isinstance(out, int):
        return out
    weight = getattr(proj, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    for child in ("linear", "base_layer"):
        inner = getattr(proj, child, None)
        if isinstance(inner, nn.Module):
            return proj_out_features(inner)
    return None


def _first_int(*values: Any) -> int | None:
    return next((int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)


def config_sliding_window(config: Any, layer_idx: int | None) -> int | None:
    """The sliding window HF applies to layer ``layer_idx`` when the module has no ``sliding_window`` attribute
    (Mistral, Mixtral, Starcoder2 pass it as a call argument): ``config.sliding_window``, limited to
    ``sliding_attention`` layers when the config lists ``layer_types``."""
    window = _first_int(getattr(config, "sliding_window", None))
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_idx is not None and layer_idx < len(layer_types):
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


def infer_attn_params(module: nn.Module) -> dict[str, Any] | None:
    """num_heads, num_kv_heads, head_dim, v_head_dim, window_size, softmax_scale and dropout of a HF ``self_attn``
    module, or None when it does not have separate q and k/v projections (or the widths disagree)."""
    q_out = proj_out_features(getattr(module, "q_proj", None)) or proj_out_features(getattr(module, "q_b_proj", None))
    k_out = proj_out_features(getattr(module, "k_proj", None))
    v_out = proj_out_features(getattr(module, "v_proj", None))
    is_mla = hasattr(module, "kv_b_proj")  # DeepSeek-V2/V3: K and V come out of one low-rank projection, per head
    config = getattr(module, "config", None)
    head_dim = _first_int(getattr(module, "qk_head_dim", None), getattr(module, "head_dim", None))
    head_dim = head_dim or _first_int(getattr(config, "head_dim", None))
    num_heads = _first_int(getattr(module, "num_heads", None), getattr(module, "num_attention_heads", None))
    separate = all(isinstance(getattr(module, name, None), nn.Module) for name in ("q_proj", "k_proj", "v_proj"))
    if separate and q_out is None and num_heads and head_dim:  # projections of unknown width (wrappers, Identity)
        q_out = num_heads * head_dim
        k_out = v_out = k_out or v_out
    if q_out is None or (not is_mla and not separate and (k_out is None or v_out is None)):
        return None
    config_heads = _first_int(getattr(config, "num_attention_heads", None))
    if num_heads is None and head_dim:
        num_heads = q_out // head_dim
        if config_heads and num_heads != config_heads:  # q_proj also computes something else (Qwen3-Next's gate)
            return None
    num_heads = num_heads or config_heads
    if not num_heads:
        return None
    head_dim = head_dim or q_out // num_heads
    if num_heads * head_dim != q_out:
        return None
    if is_mla:  # kv_b_proj gives every query head its own K and V, whatever num_key_value_heads says
        num_kv_heads = num_heads
    else:
        groups = _first_int(getattr(module, "num_key_value_groups", None))
        num_kv_heads = _first_int(getattr(module, "num_key_value_heads", None))
        num_kv_heads = num_kv_heads or (k_out // head_dim if k_out and k_out % head_dim == 0 else None)
        if not num_kv_heads and groups:
            num_kv_heads = num_heads // groups
    if not num_kv_heads or num_heads % num_kv_heads:
        return None
    v_head_dim = _first_int(getattr(module, "v_head_dim", None)) or (v_out // num_kv_heads if v_out else head_dim)

    if "sliding_window" in vars(module) or hasattr(type(module), "sliding_window"):
        window = _first_int(module.sliding_window)
    else:
        window = config_sliding_window(config, getattr(module, "layer_idx", None))
    scaling = getattr(module, "scaling", None)
    dropout = getattr(module, "attention_dropout", 0.0)
    return {
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "v_head_dim": v_head_dim,
        "window_size": (window - 1, 0) if window else (-1, 0),
        "softmax_scale": float(scaling) if isinstance(scaling, (int, float)) else None,
        "dropout": float(dropout) if isinstance(dropout, (int, float)) else 0.0,
    }


def fused_qkv_name(module: nn.Module) -> str | None:
    """The fused projection of a fused-q/k/v attention layout (Phi3 ``qkv_proj``, GPT-NeoX and Falcon
    ``query_key_value``, ...), which te_fx's eager path does not handle; None for other modules."""
    if hasattr(module, "q_proj"):
        return None
    return next((name for name in _FUSED_QKV if isinstance(getattr(module, name, None), nn.Module)), None)
