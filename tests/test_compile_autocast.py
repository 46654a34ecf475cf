"""te_attn under torch.autocast (HF Trainer's ``bf16=True``: fp32 weights, bf16 autocast): RoPE hands SDPA fp32 q/k
and a bf16 v, which SDPA's autocast casts to bf16; the pass casts the same way and rewrites every node."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import te_fx
from te_fx.tools.tiny_models import tiny_config


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def _autocast_step(model, ids, mask, weight, compiled: bool):
    """Logits and parameter gradients of one bf16-autocast step of a copy of ``model``, and the compile report."""
    torch._dynamo.reset()
    te_fx.reset_compile_report()
    model = copy.deepcopy(model)
    options = {"executor": "reference", "inner": "aot_eager"}
    run = torch.compile(model, backend="te_attn", options=options) if compiled else model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = run(ids, attention_mask=mask).logits
    (logits.float() * weight).sum().backward()
    return logits, [p.grad for p in model.parameters()], te_fx.compile_report()


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3"])
def test_te_attn_under_bf16_autocast_rewrites_every_node_as_accurately_as_sdpa(family):
    """Every node te_fx takes in fp32 runs te_fx's op in bf16 under autocast, and logits and gradients are as close
    to the float64 model as the uncompiled model's under the same autocast."""
    torch.manual_seed(0)
    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    ids = torch.randint(3, config.vocab_size, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    weight = torch.randn(2, 16, config.vocab_size)
    exact = copy.deepcopy(model).double()
    (exact(ids, attention_mask=mask).logits * weight.double()).sum().backward()
    exact_grads = [p.grad for p in exact.parameters()]
    logits, grads, report = _autocast_step(model, ids, mask, weight, compiled=True)
    sdpa_logits, sdpa_grads, _ = _autocast_step(model, ids, mask, weight, compiled=False)
    assert [entry["decision"] for entry in report] == ["te"] * config.num_hidden_layers, report
    assert all(entry["reason"] != "fallback_dtype" for entry in report)
    assert logits.dtype == sdpa_logits.dtype == torch.bfloat16
    exact_logits = exact(ids, attention_mask=mask).logits.detach()
    assert _rel(logits, exact_logits) < 1.5 * _rel(sdpa_logits, exact_logits)
    for grad, sdpa_grad, exact_grad in zip(grads, sdpa_grads, exact_grads):
        assert _rel(grad, exact_grad) < 1.5 * _rel(sdpa_grad, exact_grad) + 1e-3


def test_an_autocast_region_inside_the_graph_casts_too():
    """A ``torch.autocast`` block inside the compiled function (Dynamo's enter/exit nodes) casts like SDPA's; one
    that disables autocast leaves the fp32 call in fp32."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16)
    v = torch.randn(2, 2, 8, 16)

    def f(q, k, v, enabled):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v.to(torch.bfloat16) if enabled else v,
                                                                    is_causal=True, enable_gqa=True)  # fmt: skip

    for enabled in (True, False):
        torch._dynamo.reset()
        te_fx.reset_compile_report()
        out = torch.compile(f, backend="te_attn", options={"executor": "reference", "inner": "aot_eager"})(
            q, k, v, enabled
        )
        expected = f(q, k, v, enabled)
        assert [entry["decision"] for entry in te_fx.compile_report()] == ["te"]
        assert out.dtype == expected.dtype == (torch.bfloat16 if enabled else torch.float32)
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2 if enabled else 1e-5, rtol=2e-2)


def test_an_autocast_region_inside_a_checkpointed_body_is_followed():
    """Gradient checkpointing's body is walked like the graph: a region there that turns autocast off keeps the
    call in fp32 under an outer bf16 autocast, as SDPA does."""
    from torch.utils.checkpoint import checkpoint

    def body(q, k, v):
        with torch.autocast("cpu", enabled=False):
            return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)

    def f(q, k, v):
        return checkpoint(body, q, k, v, use_reentrant=False)

    torch.manual_seed(0)
    torch._dynamo.reset()
    te_fx.reset_compile_report()
    q, k, v = (torch.randn(2, 2, 8, 16, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.compile(f, backend="te_attn", options={"executor": "reference", "inner": "aot_eager"})(q, k, v)
        expected = f(q, k, v)
    assert [entry["decision"] for entry in te_fx.compile_report()] == ["te"]
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected)
