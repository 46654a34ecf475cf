"""Tiny, randomly initialised HF causal LMs, one per model family te_fx is checked against.

The tests, the demo and the CLI need small models that exercise each attention variant te_fx must reproduce
(MHA, GQA, sliding windows, mixed layer types, non-default softmax scales, MLA with a V head dim unlike the QK one)
and the layouts it must leave alone (fused q/k/v projections). Every config here is built locally with
``AutoModelForCausalLM.from_config`` (nothing is downloaded): vocab 128, hidden 64, 4 heads, 2-4 layers. Only config
fields that exist in transformers 5.17 through 5.24 are set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig

__all__ = ["Family", "FAMILIES", "supported_families", "unsupported_families", "tiny_config", "tiny_model"]

VOCAB_SIZE = 128
HIDDEN_SIZE = 64
NUM_HEADS = 4
SLIDING_WINDOW = 8
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2

# Larger than HF's 0.02 so that attention weights are far from uniform and a wrong mask, window or scale changes the
# outputs by much more than the tests' tolerances.
_INIT_RANGE = 0.2

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": NUM_HEADS,
    "max_position_embeddings": 256,
    "initializer_range": _INIT_RANGE,
    "pad_token_id": PAD_TOKEN_ID,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
}


@dataclass(frozen=True)
class Family:
    """A model family: ``make_config`` builds its tiny config from keyword overrides; ``supported`` says whether te_fx
    injects into it, and ``skip_reason`` why not."""

    name: str
    make_config: Callable[..., PretrainedConfig]
    supported: bool = True
    skip_reason: str | None = None


def _mixed_layer_types(num_layers: int) -> list[str]:
    """Alternating sliding / full attention layers, starting with a sliding one (both appear from 2 layers up)."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]


def _build(
    config_class: type[PretrainedConfig], defaults: dict[str, Any], overrides: dict[str, Any]
) -> PretrainedConfig:
    kwargs = {**_COMMON, **defaults, **overrides}
    if "layer_types" in defaults and "layer_types" not in overrides:
        kwargs["layer_types"] = _mixed_layer_types(kwargs["num_hidden_layers"])
    return config_class(**kwargs)


def _llama(**overrides: Any) -> PretrainedConfig:
    return _build(transformers.LlamaConfig, {"num_key_value_heads": 4}, overrides)


def _llama_gqa(**overrides: Any) -> PretrainedConfig:
    return _build(transformers.LlamaConfig, {"num_key_value_heads": 2}, overrides)


def _mistral(**overrides: Any) -> PretrainedConfig:
    return _build(transformers.MistralConfig, {"num_key_value_heads": 2, "sliding_window": SLIDING_WINDOW}, overrides)


def _qwen2(**overrides: Any) -> PretrainedConfig:
    defaults = {
        "num_hidden_layers": 4,
        "num_key_value_heads": 2,
        "use_sliding_window": True,
        "sliding_window": SLIDING_WINDOW,
        "max_window_layers": 0,
        "layer_types": None,  # filled in by _build: sliding / full alternating
    }
    return _build(transformers.Qwen2Config, defaults, overrides)


def _qwen3(**overrides: Any) -> PretrainedConfig:
    return _build(transformers.Qwen3Config, {"num_key_value_heads": 2, "head_dim": 16}, overrides)


def _gemma(**overrides: Any) -> PretrainedConfig:
    return _build(transformers.GemmaConfig, {"num_key_value_heads": 1, "head_dim": 16}, overrides)  # MQA


def _gemma3(**overrides: Any) -> PretrainedConfig:
    defaults = {
        "num_hidden_layers": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 32,  # scaling 32**-0.5, not head_dim**-0.5
        "sliding_window": SLIDING_WINDOW,
        "layer_types": None,  # filled in by _build: sliding / full alternating
    }
    return _build(transformers.Gemma3TextConfig, defaults, overrides)


def _granite(**overrides: Any) -> PretrainedConfig:
    defaults = {
        "num_key_value_heads": 2,
        "attention_multiplier": 0.5,  # head_dim 16 would give 0.25
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "logits_scaling": 2.0,
    }
    return _build(transformers.GraniteConfig, defaults, overrides)


def _deepseek_v3(**overrides: Any) -> PretrainedConfig:
    defaults = {
        "num_key_value_heads": NUM_HEADS,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,  # QK head dim 24
        "v_head_dim": 16,
        "moe_intermediate_size": 32,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
    }
    num_layers = overrides.get("num_hidden_layers", _COMMON["num_hidden_layers"])
    defaults["first_k_dense_replace"] = num_layers  # every layer dense: no MoE routing in the tiny model
    return _build(transformers.DeepseekV3Config, defaults, overrides)


def _phi3(**overrides: Any) -> PretrainedConfig:
    return _build(transformers.Phi3Config, {"num_key_value_heads": 2}, overrides)


def _gpt_neox(**overrides: Any) -> PretrainedConfig:
    return _build(transformers.GPTNeoXConfig, {}, overrides)


def _falcon(**overrides: Any) -> PretrainedConfig:
    defaults = {"new_decoder_architecture": True, "num_kv_heads": 2, "ffn_hidden_size": 128}
    # Falcon has no intermediate_size field (ffn_hidden_size instead)
    kwargs = {k: v for k, v in {**_COMMON, **defaults, **overrides}.items() if k != "intermediate_size"}
    return transformers.FalconConfig(**kwargs)


_FUSED = "fused q/k/v projection ({}): te_fx needs separate q_proj / k_proj / v_proj modules"

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("llama", _llama),
        Family("llama_gqa", _llama_gqa),
        Family("mistral", _mistral),
        Family("qwen2", _qwen2),
        Family("qwen3", _qwen3),
        Family("gemma", _gemma),
        Family("gemma3", _gemma3),
        Family("granite", _granite),
        Family("deepseek_v3", _deepseek_v3),
        Family("phi3", _phi3, supported=False, skip_reason=_FUSED.format("Phi3 qkv_proj")),
        Family("gpt_neox", _gpt_neox, supported=False, skip_reason=_FUSED.format("GPT-NeoX query_key_value")),
        Family("falcon", _falcon, supported=False, skip_reason=_FUSED.format("Falcon query_key_value")),
    )
}


def supported_families() -> list[str]:
    """Names of the families te_fx injects into."""
    return [name for name, family in FAMILIES.items() if family.supported]


def unsupported_families() -> list[str]:
    """Names of the families te_fx leaves alone (see each ``skip_reason``)."""
    return [name for name, family in FAMILIES.items() if not family.supported]


def _family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown tiny model family {name!r}; choose one of {sorted(FAMILIES)}") from None


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """The tiny config of ``family``, with config fields replaced by ``overrides`` (mixed ``layer_types`` follow
    an overridden ``num_hidden_layers``)."""
    return _family(family).make_config(**overrides)


def tiny_model(family: str, dtype: torch.dtype = torch.float32, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised tiny causal LM of ``family`` (SDPA attention, eval mode, on CPU); seed torch's RNG
    first for reproducible weights."""
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(dtype).eval()
