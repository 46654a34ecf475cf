"""te_fx inside CUDA graphs on a real GPU with real TE: its ops captured by hand (``torch.cuda.graph``) and by
Inductor's cudagraphs (``torch.compile(mode="reduce-overhead")``), replayed on new inputs, against the same calls run
eagerly (the op) or SDPA compiled by Inductor (the models)."""

import copy

import pytest
import torch

from te_fx import ops
from te_fx.tools.tiny_models import tiny_model

LOGITS_TOL, GRAD_TOL = 2e-2, 5e-2  # bf16 over a few layers: TE's and SDPA's kernels round differently
KERNEL_TOL = 5e-3  # one op against itself: cuDNN's backward may sum in another order, nothing more
BATCH, SEQ, HEADS, KV_HEADS, DIM = 2, 256, 8, 2, 64


def _leaves() -> list[torch.Tensor]:
    return [
        torch.randn(BATCH, SEQ, heads, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for heads in (HEADS, KV_HEADS, KV_HEADS)
    ]


def _fwd_bwd(q, k, v, d_out, **plan):
    out = ops.attention(q, k, v, softmax_scale=DIM**-0.5, executor="te", **plan)
    return (out, *torch.autograd.grad(out, (q, k, v), d_out))


def _captured(fn, *args):
    """(graph, its static outputs) of ``fn(*args)``, warmed up on a side stream as torch.cuda.graph needs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*args)
    return graph, outputs


def _documents(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)


PLANS = {
    "causal": lambda: {"mask_type": "causal", "window_size": (-1, 0)},
    "window": lambda: {"mask_type": "causal", "window_size": (31, 0)},
    "right padding, layout given": lambda: {
        "mask_type": "causal",
        "window_size": (-1, 0),
        "key_padding_mask": torch.arange(SEQ, device="cuda").expand(BATCH, SEQ) < torch.tensor([[SEQ], [200]]).cuda(),
        "key_padding_layout": (False, True, True),
    },
    "packed documents": lambda: {
        "mask_type": "causal",
        "window_size": (-1, 0),
        "cu_seqlens": _documents([100, 156, 30, 200, 26]),
    },
}


@pytest.mark.parametrize("plan", list(PLANS))
def test_a_captured_call_replays_what_an_eager_call_computes(plan, rel_error):
    """Forward and backward captured once, replayed on new q, k, v (and, packed, new document boundaries of the
    same count): the outputs and gradients of eager calls on the new inputs."""
    torch.manual_seed(0)
    kwargs = PLANS[plan]()
    static = _leaves()
    d_out = torch.randn(BATCH, SEQ, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    graph, outputs = _captured(lambda: _fwd_bwd(*static, d_out, **kwargs))
    for step in range(2):
        fresh = _leaves()
        with torch.no_grad():
            for held, new in zip(static, fresh):
                held.copy_(new)
            if "cu_seqlens" in kwargs:
                kwargs["cu_seqlens"].copy_(_documents([60 + 40 * step, 196 - 40 * step, 128, 100, 28]))
        graph.replay()
        expected = _fwd_bwd(*fresh, d_out, **kwargs)
        assert torch.equal(outputs[0], expected[0]), f"{plan}: output of replay {step}"
        for name, got, want in zip("qkv", outputs[1:], expected[1:]):
            assert rel_error(got, want) < KERNEL_TOL, f"{plan}: d{name} of replay {step}"


@pytest.mark.parametrize(
    "plan, needed",
    [
        ({"key_padding_mask": torch.ones(BATCH, SEQ, dtype=torch.bool)}, "key_padding_layout"),
        ({"position_ids": torch.arange(SEQ).repeat(BATCH, 1)}, "cu_seqlens"),
    ],
)
def test_capturing_a_call_that_reads_the_host_says_what_to_pass(plan, needed):
    """Key padding of an unchecked layout in training, and documents from position_ids, copy a value to the host to
    choose their kernels: under capture, a clear error that names the argument that avoids it."""
    q, k, v = _leaves()
    kwargs = {name: value.cuda() for name, value in plan.items()}

    def call():
        return ops.attention(q, k, v, mask_type="causal", window_size=(-1, 0), softmax_scale=DIM**-0.5, **kwargs)

    call()  # eager: the kernels it launches are loaded before capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=needed), torch.cuda.graph(graph):
        call()


def _count_te_forwards(monkeypatch) -> list[int]:
    """A counter of the Python calls to TE's fused forward (kernels replayed from a CUDA graph make none)."""
    from te_fx.executors import te as te_executor

    calls = [0]
    forward = te_executor.fused_attn_fwd

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(te_executor, "fused_attn_fwd", counted)
    return calls


def _step(model, ids, mask):
    torch.compiler.cudagraph_mark_step_begin()
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask).logits
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    logits[valid].float().square().mean().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().clone(), grads


def _errors(out, ref, grads, ref_grads, mask, rel_error):
    valid = mask.bool() if mask is not None else torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
    grad_error = max(rel_error(grads[n], ref_grads[n]) for n in ref_grads if ref_grads[n].abs().sum() > 0)
    return rel_error(out[valid], ref[valid]), grad_error


def _masks(ids: torch.Tensor) -> list[torch.Tensor | None]:
    """None, ones, right padding, inner padding: one layout per step."""
    ones = torch.ones_like(ids)
    right, inner = ones.clone(), ones.clone()
    right[1, -20:] = 0
    inner[1, 10:30] = 0
    return [None, ones, right, inner]


@pytest.mark.parametrize("way_in", ["te_attn", "attn_implementation"])
def test_reduce_overhead_training_steps_match_sdpa(way_in, monkeypatch, rel_error):
    """``torch.compile(mode="reduce-overhead")`` training steps: with no mask the attention runs inside Inductor's
    CUDA graphs (no Python call to TE's kernels on a replayed step); with masks whose layout changes from step to
    step, te_fx's ops that choose kernels from the layout run outside them; every step matches SDPA compiled by
    Inductor without CUDA graphs."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = tiny_model("llama_gqa", dtype=torch.bfloat16).cuda().train()
    model = copy.deepcopy(plain)
    reference = torch.compile(plain)
    if way_in == "te_attn":
        compiled = torch.compile(model, backend="te_attn", mode="reduce-overhead")
    else:
        model.set_attn_implementation("te")
        compiled = torch.compile(model, mode="reduce-overhead")
    calls = _count_te_forwards(monkeypatch)
    ids = torch.randint(3, 128, (2, 64), device="cuda")
    for step in range(4):  # unmasked: warm-up, recording, replays
        calls[0] = 0
        fresh = torch.randint(3, 128, (2, 64), device="cuda")
        out, grads = _step(compiled, fresh, None)
        ref, ref_grads = _step(reference, fresh, None)
        logits_error, grad_error = _errors(out, ref, grads, ref_grads, None, rel_error)
        assert logits_error < LOGITS_TOL and grad_error < GRAD_TOL, (step, logits_error, grad_error)
    assert calls[0] == 0, "the replayed step called TE's kernels from Python"
    for mask in _masks(ids)[1:] * 2:
        out, grads = _step(compiled, ids, mask)
        ref, ref_grads = _step(reference, ids, mask)
        logits_error, grad_error = _errors(out, ref, grads, ref_grads, mask, rel_error)
        assert logits_error < LOGITS_TOL and grad_error < GRAD_TOL, (mask.sum(1).tolist(), logits_error, grad_error)
