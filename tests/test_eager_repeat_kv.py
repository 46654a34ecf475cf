"""HF's ``repeat_kv`` made inside an injected forward: TE gets the un-repeated K/V, exactly (CPU, fp32, reference
executor).

With a padding or sliding mask HF repeats K and V to the query heads before SDPA. The eager path's routing mode
recognises that repeat (an ``expand`` of a size-1 dim 2 followed by a ``reshape`` merging dims 1 and 2) and TE runs
on the repeat's source, so the repeat (and its zero-filled, summed gradient) is not on the autograd path of TE's
output. The oracle is plain SDPA on the same model: logits and every parameter gradient; the autograd graph is read
through ``grad_fn.next_functions``. A repeat or source written to in place before SDPA, and every call that falls
back, must give plain SDPA's result, the fallbacks on the repeated tensors themselves.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from transformers.integrations.sdpa_attention import repeat_kv

import te_fx
from te_fx.tools.tiny_models import tiny_model

ATOL = RTOL = 1e-5
GRAD_RTOL = 1e-4  # as tests/test_models_eager.py: TE sums the copies' gradients in another order than repeat_kv
ZERO_STATS = dict.fromkeys(te_fx.get_te_attention_stats(), 0)
REPEAT_BACKWARD = "ExpandBackward0"  # repeat_kv's expand, in the backward graph


@pytest.fixture(autouse=True)
def _no_mode_left_behind():
    yield
    assert not _get_current_function_mode_stack(), "a routing mode outlived its forward"


def _stats(**counts: int) -> dict[str, int]:
    return {**ZERO_STATS, **counts}


def _pair(family: str = "llama_gqa", **overrides) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = tiny_model(family, **overrides)
    injected = copy.deepcopy(plain)
    te_fx.inject_te_attention(injected, executor="reference")
    return plain, injected


def _padded_batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if side == "left":
        mask[1, :4], mask[2, :1] = 0, 0
    else:
        mask[1, -4:], mask[2, -1:] = 0, 0
    return ids, mask


def _backward_node_names(output: torch.Tensor) -> list[str]:
    """The type names of every node of ``output``'s autograd graph."""
    names, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _attention_outputs(model: nn.Module) -> list[torch.Tensor]:
    """Filled with each ``self_attn`` module's output during the next forward."""
    outputs: list[torch.Tensor] = []
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            module.register_forward_hook(lambda _m, _a, out: outputs.append(out[0]))
    return outputs


def _assert_grads_equal(plain: nn.Module, injected: nn.Module) -> None:
    grads = dict(injected.named_parameters())
    for name, param in plain.named_parameters():
        assert param.grad is not None and grads[name].grad is not None, name
        torch.testing.assert_close(
            grads[name].grad, param.grad, atol=ATOL, rtol=GRAD_RTOL, msg=lambda m, n=name: f"{n}: {m}"
        )


# --------------------------------------------------------------------------------------------- HF models


@pytest.mark.parametrize("family", ["llama_gqa", "mistral"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_gqa_model_matches_sdpa_without_the_repeat_on_te_s_path(family, side):
    """Padded batch, training: every call runs TE, logits and all parameter gradients equal plain SDPA's, and no
    attention output's autograd graph holds repeat_kv's expand (the plain model's do: the check can fail)."""
    plain, injected = _pair(family)
    ids, mask = _padded_batch(side)
    outputs = {}
    for tag, model in (("plain", plain), ("injected", injected)):
        model.train()
        attention = _attention_outputs(model)
        te_fx.reset_te_attention_stats()
        out = model(ids, attention_mask=mask, use_cache=False).logits
        out.mul(torch.linspace(-1, 1, out.shape[-1])).mean().backward()
        outputs[tag] = (out, attention, _backward_node_names(out))
    layers = injected.config.num_hidden_layers
    assert te_fx.get_te_attention_stats() == _stats(te_hits=layers)
    torch.testing.assert_close(outputs["injected"][0], outputs["plain"][0], atol=ATOL, rtol=RTOL)
    _assert_grads_equal(plain, injected)
    assert len(outputs["injected"][1]) == layers
    for attn_out in outputs["injected"][1]:
        assert REPEAT_BACKWARD not in _backward_node_names(attn_out)
    assert REPEAT_BACKWARD not in outputs["injected"][2]
    assert outputs["plain"][2].count(REPEAT_BACKWARD) == 2 * layers  # K and V of every layer


def test_te_gets_v_without_a_copy():
    """V is ``v_proj(x).view(B, S, Hkv, D).transpose(1, 2)``: the bshd V the TE module runs on is that projection
    output itself, not a copy of every n_rep-th head of the repeat."""
    _, injected = _pair()
    ids, mask = _padded_batch("left")
    projected, received = [], []
    for name, module in injected.named_modules():
        if name.endswith("self_attn"):
            module.v_proj.register_forward_hook(lambda _m, _a, out: projected.append(out))
            run = module.attn_module.run

            def recorded(q, k, v, plan, run=run):
                received.append(v)
                return run(q, k, v, plan)

            module.attn_module.run = recorded
    with torch.no_grad():
        injected(ids, attention_mask=mask, use_cache=False)
    assert len(received) == len(projected) == injected.config.num_hidden_layers
    for v, proj in zip(received, projected):
        assert v.data_ptr() == proj.data_ptr() and v.shape == (3, 12, 2, 16)


def test_under_bf16_autocast_the_repeat_is_not_on_te_s_path():
    """fp32 weights, bf16 autocast (AMP training): TE casts the source, not the repeat."""
    _, injected = _pair()
    ids, mask = _padded_batch("left")
    injected.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = injected(ids, attention_mask=mask, use_cache=False).logits
    assert te_fx.get_te_attention_stats() == _stats(te_hits=injected.config.num_hidden_layers)
    assert REPEAT_BACKWARD not in _backward_node_names(out)


def test_inference_mode_padded_batch_matches_sdpa():
    """Inference tensors have no version counter: their repeats are read back by slicing, still exactly."""
    plain, injected = _pair()
    ids, mask = _padded_batch("right")
    with torch.inference_mode():
        expected = plain(ids, attention_mask=mask).logits
        out = injected(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    assert te_fx.get_te_attention_stats() == _stats(te_hits=injected.config.num_hidden_layers)


class _SdpaCalls(TorchFunctionMode):
    """A user's torch function mode around an injected forward: te_fx's mode stacks on it, so it sees the SDPA
    calls te_fx falls back with and the tensors every ``reshape`` returned."""

    def __init__(self) -> None:
        super().__init__()
        self.sdpa: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.reshaped: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.reshape:
            self.reshaped.append(out)
        elif func is torch._C._nn.scaled_dot_product_attention:
            self.sdpa.append((args[1], args[2]))
        return out


def test_a_mask_te_fx_does_not_convert_gets_sdpa_on_the_repeated_tensors():
    """A hole inside a row of the padding mask is no plan te_fx has: every call falls back to SDPA, with the
    repeated K and V HF made (the very tensors), and the logits and gradients are plain SDPA's."""
    plain, injected = _pair()
    ids, mask = _padded_batch("left")
    mask[0, 5:7] = 0
    expected = plain(ids, attention_mask=mask, use_cache=False).logits
    expected.sum().backward()
    with _SdpaCalls() as calls:
        out = injected(ids, attention_mask=mask, use_cache=False).logits
    out.sum().backward()
    layers = injected.config.num_hidden_layers
    assert te_fx.get_te_attention_stats() == _stats(fallback_mask=layers)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    _assert_grads_equal(plain, injected)
    assert len(calls.sdpa) == layers
    for key, value in calls.sdpa:
        assert key.shape[1] == value.shape[1] == injected.config.num_attention_heads
        assert any(key is t for t in calls.reshaped) and any(value is t for t in calls.reshaped)


# --------------------------------------------------------------------------------------------- a module's own attention


class RepeatingAttention(nn.Module):
    """GQA attention that repeats K and V itself (HF's ``repeat_kv``) and may write to the repeat or its source
    in place before calling SDPA."""

    def __init__(self, heads: int = 4, kv_heads: int = 2, head_dim: int = 8) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, head_dim
        hidden = heads * head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim)
        self.write = "none"
        self.dropout_p = 0.0

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        n_rep = self.num_heads // self.num_key_value_heads
        key, value = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        noise = torch.linspace(-1, 1, s * self.head_dim).view(s, self.head_dim)
        if self.write == "repeat":  # every copy alike: still a repeat, of other values than the source's
            key.mul_(1.5)
        elif self.write == "one_copy":  # no longer a repeat: every n_rep-th head would miss this
            key[:, 1].add_(noise)
        elif self.write == "value_copy":
            value[:, 1].add_(noise)
        elif self.write == "source":  # the repeat keeps the old values (a copy), unless it is a view of k
            k.mul_(1.5)
        elif self.write == "source_value":
            v.mul_(-1)
        return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=self.dropout_p)


def _padding_causal_mask(batch: int, seq: int) -> torch.Tensor:
    """HF's 4D bool mask of a left-padded batch: causal, key padding of 0, 3, 1 ... tokens."""
    keep = torch.ones(batch, seq, dtype=torch.bool)
    for row, pads in enumerate([0, 3, 1][:batch]):
        keep[row, :pads] = False
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return causal[None, None] & keep[:, None, None, :]


# (write, kv_heads) -> what runs: TE on the sources, TE on every n_rep-th head of the repeat, or SDPA
WRITES = {
    ("none", 2): ("te_hits", False),
    ("repeat", 2): ("fallback_layout", None),
    ("one_copy", 2): ("fallback_layout", None),
    ("value_copy", 2): ("fallback_layout", None),
    ("source", 2): ("te_hits", True),
    ("source_value", 2): ("te_hits", True),
    ("none", 1): ("te_hits", False),
    ("source", 1): ("fallback_layout", None),  # the repeat is a view of k: one version counter for both
}


@pytest.mark.parametrize(("write", "kv_heads"), list(WRITES), ids=[f"{w}-kv{h}" for w, h in WRITES])
def test_a_repeat_or_its_source_written_in_place_is_still_exact(write, kv_heads):
    """Written to in place after the repeat and before SDPA: the output and every gradient equal plain SDPA's.
    A written repeat may no longer hold equal copies and runs SDPA; a written source leaves the repeat (a copy)
    a true repeat, which TE reads every n_rep-th head of (repeat_kv's expand then on the graph); untouched, TE runs
    on the sources."""
    torch.manual_seed(0)
    plain = RepeatingAttention(kv_heads=kv_heads)
    plain.write = write
    injected = copy.deepcopy(plain)
    assert te_fx.inject_te_attention_into_module(injected, executor="reference") is True
    x = torch.randn(3, 7, 32)
    mask = _padding_causal_mask(3, 7)
    expected = plain(x, mask)
    expected.pow(2).sum().backward()
    out = injected(x, mask)
    out.pow(2).sum().backward()
    reason, slicing = WRITES[(write, kv_heads)]
    assert te_fx.get_te_attention_stats() == _stats(**{reason: 1})
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    _assert_grads_equal(plain, injected)
    if reason == "te_hits":
        assert (REPEAT_BACKWARD in _backward_node_names(out)) is slicing


def test_a_dropout_mismatch_gets_sdpa_on_the_repeated_tensors():
    """Dropout the TE module does not apply (an eval-mode module called with dropout_p > 0): SDPA runs on the
    repeated K and V, with the same random numbers as the plain module."""
    torch.manual_seed(0)
    plain = RepeatingAttention().eval()
    plain.dropout_p = 0.3
    injected = copy.deepcopy(plain)
    te_fx.inject_te_attention_into_module(injected, executor="reference")
    x = torch.randn(3, 7, 32)
    mask = _padding_causal_mask(3, 7)
    torch.manual_seed(5)
    expected = plain(x, mask)
    torch.manual_seed(5)
    with _SdpaCalls() as calls:
        out = injected(x, mask)
    assert te_fx.get_te_attention_stats() == _stats(fallback_dropout=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    ((key, value),) = calls.sdpa
    assert key.shape[1] == value.shape[1] == 4
    assert any(key is t for t in calls.reshaped) and any(value is t for t in calls.reshaped)


def test_a_repeat_made_outside_the_forward_is_read_by_slicing():
    """K/V repeated before the injected forward (not seen by its mode) still run TE, exactly, by slicing."""

    class PassedIn(RepeatingAttention):
        def forward(self, x, key, value, mask):
            b, s, _ = x.shape
            q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
            return F.scaled_dot_product_attention(q, key, value, attn_mask=mask)

    torch.manual_seed(0)
    plain = PassedIn()
    injected = copy.deepcopy(plain)
    te_fx.inject_te_attention_into_module(injected, executor="reference")
    k = torch.randn(3, 2, 7, 8, requires_grad=True)
    key, value = repeat_kv(k, 2), repeat_kv(k.flip(2), 2)
    mask = _padding_causal_mask(3, 7)
    x = torch.randn(3, 7, 32)
    expected = plain(x, key, value, mask)
    (expected_grad,) = torch.autograd.grad(expected.pow(2).sum(), k)
    out = injected(x, key, value, mask)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), k)
    assert te_fx.get_te_attention_stats() == _stats(te_hits=1)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(grad, expected_grad, atol=ATOL, rtol=RTOL)
    assert REPEAT_BACKWARD in _backward_node_names(out)
