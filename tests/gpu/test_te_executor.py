"""The TE executor and custom ops against a float64 reference and SDPA, on a real GPU with real TE."""

import pytest
import torch
import torch.nn.functional as F

import te_fx
from te_fx.executors.reference import reference_attention
from te_fx.te_attention import (
    _create_te_dot_product_attention,
    _make_te_sdpa,
    get_te_attention_stats,
)

CASES = [
    # batch, q_len, kv_len, heads, kv_heads, head_dim, mask_type, window
    (2, 128, 128, 8, 8, 64, "causal", (-1, 0)),
    (2, 256, 256, 8, 2, 128, "causal", (-1, 0)),
    (2, 256, 256, 8, 2, 128, "causal", (63, 0)),
    (1, 300, 300, 4, 1, 64, "no_mask", (-1, -1)),
    (2, 64, 192, 8, 2, 128, "causal_bottom_right", (-1, 0)),
    (2, 1, 192, 8, 2, 128, "no_mask", (-1, -1)),
    (1, 512, 512, 4, 4, 256, "causal", (-1, 0)),
]


def _inputs(batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, grad=True):
    q = torch.randn(batch, q_len, heads, head_dim, device="cuda", dtype=dtype, requires_grad=grad)
    k = torch.randn(batch, kv_len, kv_heads, head_dim, device="cuda", dtype=dtype, requires_grad=grad)
    v = torch.randn(batch, kv_len, kv_heads, head_dim, device="cuda", dtype=dtype, requires_grad=grad)
    return q, k, v


def _reference(q, k, v, mask_type, window, scale):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference_attention(q64, k64, v64, mask_type=mask_type, window_size=window, softmax_scale=scale)
    return out, (q64, k64, v64)


def _op_matches_float64(q, k, v, mask_type, window, scale, rel_error):
    """te_fx's op on TE against the float64 reference, output and gradients; returns the op's output."""
    from te_fx import ops

    out = ops.attention(q, k, v, mask_type=mask_type, window_size=window, softmax_scale=scale, executor="te")
    ref, leaves = _reference(q, k, v, mask_type, window, scale)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    assert rel_error(out, ref) < 1e-2
    for t, r in zip((q, k, v), leaves):
        assert rel_error(t.grad, r.grad) < 3e-2
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_te_module_fast_path_matches_float64(case, dtype, rel_error):
    from te_fx.executors.te import TEDotProductAttention

    batch, q_len, kv_len, heads, kv_heads, head_dim, mask_type, window = case
    module = TEDotProductAttention(heads, head_dim, num_gqa_groups=kv_heads, qkv_format="bshd", window_size=window)
    q, k, v = _inputs(batch, q_len, kv_len, heads, kv_heads, head_dim, dtype)
    out = module(q, k, v, attn_mask_type=mask_type, window_size=window).view(batch, q_len, heads, head_dim)
    ref, leaves = _reference(q, k, v, mask_type, window, module.softmax_scale)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    errors = [rel_error(out, ref)] + [rel_error(t.grad, r.grad) for t, r in zip((q, k, v), leaves)]
    print(f"{case} {dtype}: rel err out/dq/dk/dv = {[f'{e:.1e}' for e in errors]}")
    assert max(errors) < tol * 3 and errors[0] < tol


@pytest.mark.parametrize("case", CASES[:3])
def test_custom_op_te_executor(case, rel_error):
    batch, q_len, kv_len, heads, kv_heads, head_dim, mask_type, window = case
    q, k, v = _inputs(batch, q_len, kv_len, heads, kv_heads, head_dim, torch.bfloat16)
    scale = head_dim**-0.5
    _op_matches_float64(q, k, v, mask_type, window, scale, rel_error)
    args = (q.detach(), k.detach(), v.detach(), None, None, mask_type, window[0], window[1], scale, 0.0, True, "te")
    torch.library.opcheck(
        torch.ops.te_fx.attention_fwd.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_custom_op_compiles_fullgraph_with_inductor(rel_error):
    from te_fx import ops

    q, k, v = _inputs(2, 256, 256, 8, 2, 128, torch.bfloat16)

    def f(q, k, v):
        return ops.attention(q, k, v, mask_type="causal", window_size=(-1, 0), softmax_scale=0.1, executor="te")

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(q, k, v)
    out.sum().backward()
    ref, leaves = _reference(q, k, v, "causal", (-1, 0), 0.1)
    ref.sum().backward()
    assert rel_error(out, ref) < 1e-2
    assert rel_error(q.grad, leaves[0].grad) < 3e-2


def test_dropout_is_applied_and_backward_replays_it():
    from te_fx.executors.te import TEDotProductAttention

    module = TEDotProductAttention(8, 64, num_gqa_groups=8, qkv_format="bshd", attention_dropout=0.5).train()
    q, k, v = _inputs(2, 128, 128, 8, 8, 64, torch.bfloat16)
    a = module(q, k, v, attn_mask_type="causal")
    b = module(q, k, v, attn_mask_type="causal")
    assert not torch.equal(a, b)  # fresh dropout masks per call
    a.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    module.eval()
    assert torch.equal(module(q, k, v, attn_mask_type="causal"), module(q, k, v, attn_mask_type="causal"))


def _hf_views(batch, seq, heads, kv_heads, head_dim, dtype):
    """q/k/v as HF makes them: (B, S, H*D) projections viewed as (B, S, H, D) and transposed to (B, H, S, D)."""

    def make(h):
        return torch.randn(batch, seq, h * head_dim, device="cuda", dtype=dtype)

    return [t.view(batch, seq, -1, head_dim).transpose(1, 2) for t in (make(heads), make(kv_heads), make(kv_heads))]


def test_te_sdpa_reads_transposed_views_correctly(rel_error):
    """TE silently misreads non-contiguous bshd (relative error 1.4 measured): te_fx must hand it contiguous data."""
    from te_fx.te_attention import _create_te_dot_product_attention

    q, k, v = _hf_views(2, 256, 8, 2, 64, torch.bfloat16)
    module = _create_te_dot_product_attention(8, 2, 64, softmax_scale=0.125)
    te_sdpa = _make_te_sdpa(module, 8, 2, F.scaled_dot_product_attention, softmax_scale=0.125)
    out = te_sdpa(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
    assert get_te_attention_stats()["te_hits"] == 1
    assert rel_error(out, ref) < 1e-2


@pytest.mark.parametrize(
    "dtype,head_dim,device,reason",
    [
        (torch.float32, 64, "cuda", "fallback_dtype"),
        (torch.bfloat16, 12, "cuda", "fallback_head_dim"),
        (torch.bfloat16, 64, "cpu", "fallback_device"),
    ],
)
def test_te_limits_fall_back_with_a_counted_reason(dtype, head_dim, device, reason):
    from te_fx.te_attention import _create_te_dot_product_attention

    module = _create_te_dot_product_attention(4, 4, head_dim)
    te_sdpa = _make_te_sdpa(module, 4, 4, F.scaled_dot_product_attention)
    q, k, v = (torch.randn(1, 4, 32, head_dim, device=device, dtype=dtype) for _ in range(3))
    out = te_sdpa(q, k, v, is_causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert get_te_attention_stats()[reason] == 1 and get_te_attention_stats()["te_hits"] == 0


def test_fp8_attention_runs_the_fp8_backend(rel_error):
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling
    from transformer_engine.pytorch.attention.dot_product_attention import (
        dot_product_attention as dpa,
    )

    from te_fx.executors.te import TEDotProductAttention

    module = TEDotProductAttention(16, 128, num_gqa_groups=16, qkv_format="bshd")
    q, k, v = _inputs(2, 512, 512, 16, 16, 128, torch.bfloat16, grad=False)
    bf16 = module(q, k, v, attn_mask_type="causal")
    with te.autocast(enabled=True, recipe=DelayedScaling(fp8_dpa=True)):
        fp8 = module(q, k, v, attn_mask_type="causal")
    backend = dpa._attention_backends["fused_attention_backend"]
    error = rel_error(fp8, bf16)
    print(f"FP8 attention: fused backend {backend!r}, relative error vs bf16 {error:.3e}")
    assert int(backend) == int(te.cpp_extensions.fused_attn.FusedAttnBackend.FP8)
    assert 0 < error < 0.1


def test_inject_te_attention_uses_te_by_default():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").cuda().to(torch.bfloat16)
    te_fx.inject_te_attention(model)
    assert type(model.model.layers[0].self_attn.attn_module).__name__ == "TEDotProductAttention"
    model(torch.randint(0, 128, (2, 64), device="cuda"))
    assert get_te_attention_stats()["te_hits"] == 2


def test_injected_model_runs_fp8_attention_under_te_autocast(rel_error):
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling
    from transformer_engine.pytorch.attention.dot_product_attention import (
        dot_product_attention as dpa,
    )
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=128, hidden_size=512, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=128,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").cuda().to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 256), device="cuda")
    te_fx.inject_te_attention(model)
    bf16 = model(ids).logits
    dpa._attention_backends["fused_attention_backend"] = None
    with te.autocast(enabled=True, recipe=DelayedScaling(fp8_dpa=True)):
        fp8 = model(ids).logits
    backend = dpa._attention_backends["fused_attention_backend"]
    error = rel_error(fp8, bf16)
    print(f"injected model under FP8 autocast: fused backend {backend!r}, logits rel error vs bf16 {error:.3e}")
    assert backend is not None and int(backend) == int(te.cpp_extensions.fused_attn.FusedAttnBackend.FP8)
    assert 0 < error < 0.1


def test_fp8_autocast_falls_back_where_fp8_attention_cannot_run():
    """Head dim 64 at S 128 has no FP8 attention backend in TE (its own forward raises): SDPA runs, counted."""
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling

    module = _create_te_dot_product_attention(8, 8, 64)
    te_sdpa = _make_te_sdpa(module, 8, 8, F.scaled_dot_product_attention)
    q, k, v = (torch.randn(1, 8, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with te.autocast(enabled=True, recipe=DelayedScaling(fp8_dpa=True)):
        out = te_sdpa(q, k, v, is_causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert get_te_attention_stats()["fallback_fp8"] == 1 and get_te_attention_stats()["te_hits"] == 0
    with te.autocast(enabled=True, recipe=DelayedScaling(fp8_dpa=False)):  # FP8 linears only: bf16 attention
        te_sdpa(q, k, v, is_causal=True)
    assert get_te_attention_stats()["te_hits"] == 1


@pytest.mark.parametrize("pad", ["right", "left", "holes", "empty_row"])
def test_key_padding_mask_on_te_matches_float64(pad, rel_error):
    from te_fx import ops

    q, k, v = _inputs(2, 256, 256, 8, 2, 64, torch.bfloat16)
    keep = torch.ones(2, 256, dtype=torch.long, device="cuda")
    if pad == "right":
        keep[1, 200:] = 0
    elif pad == "left":
        keep[1, :57] = 0
    elif pad == "empty_row":  # no kept token at all: the row comes back zero
        keep[0] = 0
        keep[1, 200:] = 0
    else:
        keep[0, 30:40] = 0
        keep[1, 100:150] = 0
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    config = dict(mask_type="causal", window_size=(-1, 0), softmax_scale=0.125, key_padding_mask=keep)
    out = ops.attention(q, k, v, executor="te", **config)
    ref = ops.attention(*leaves, executor="reference", **config)
    valid = keep.bool()
    grad = torch.randn_like(out) * valid[:, :, None, None]  # a loss over valid positions, as HF's labels give
    out.backward(grad)
    ref.backward(grad.double())
    assert rel_error(out[valid], ref[valid]) < 1e-2
    if pad != "holes":  # left and right padding are exact at padding positions too (zero / all valid keys)
        assert rel_error(out, ref) < 1e-2
    for t, r in zip((q, k, v), leaves):
        assert torch.isfinite(t.grad).all()
        # a window of (0, 0) makes dq and dk exactly zero: measure against the scale of dv there
        assert (t.grad.double() - r.grad).norm() < 3e-2 * max(r.grad.norm(), leaves[2].grad.norm())
    if pad == "empty_row":
        assert torch.equal(out[0], torch.zeros_like(out[0])) and not q.grad[0].any()


@pytest.mark.parametrize("q_len, window", [(1, (63, 0)), (64, (31, 0))])
def test_sliding_window_decode_and_chunked_prefill_on_te(q_len, window, rel_error):
    """Bottom-right causal with a window: a sliding-window model's decode step and a chunked prefill."""
    q, k, v = _inputs(2, q_len, 192, 8, 2, 128, torch.bfloat16)
    _op_matches_float64(q, k, v, "causal_bottom_right", window, 128**-0.5, rel_error)


def test_deterministic_algorithms_give_a_bitwise_repeatable_backward():
    """With torch.use_deterministic_algorithms, te_fx asks TE for its deterministic backward, as TE's module does."""
    from te_fx import ops

    q, k, v = _inputs(2, 512, 512, 8, 2, 128, torch.bfloat16)
    grad = torch.randn(2, 512, 8, 128, device="cuda", dtype=torch.bfloat16)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        grads = []
        for _ in range(3):
            for t in (q, k, v):
                t.grad = None
            out = ops.attention(q, k, v, mask_type="causal", window_size=(-1, 0), softmax_scale=0.1, executor="te")
            out.backward(grad)
            grads.append([t.grad.clone() for t in (q, k, v)])
    finally:
        torch.use_deterministic_algorithms(False)
    for later in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], later))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu_than_the_current_one(rel_error):
    """HF's device_map="auto" puts layers on other GPUs without changing the current device."""
    torch.cuda.set_device(0)
    q, k, v = (t.detach().to("cuda:1").requires_grad_() for t in _inputs(2, 256, 256, 8, 2, 128, torch.bfloat16))
    assert _op_matches_float64(q, k, v, "causal", (-1, 0), 0.1, rel_error).device == q.device


def _te_against_reference(q, k, v, rel_error, weight=None, **config):
    """te_fx's op on TE against the same op on the reference executor in float64 (output and gradients of
    sum(out * weight)); returns (out, ref, the float64 leaves)."""
    from te_fx import ops

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = ops.attention(q, k, v, executor="te", **config)
    ref = ops.attention(*leaves, executor="reference", **config)
    weight = torch.randn_like(out) if weight is None else weight
    out.backward(weight)
    ref.backward(weight.double())
    assert rel_error(out, ref) < 1e-2
    for t, r in zip((q, k, v), leaves):
        assert torch.isfinite(t.grad).all()
        # a window of (0, 0) makes dq and dk exactly zero: measure against the scale of dv there
        assert (t.grad.double() - r.grad).norm() < 3e-2 * max(r.grad.norm(), leaves[2].grad.norm())
    return out, ref, leaves


def _packed(rows):
    """(N + 1,) int32 CUDA boundaries of documents given per row by their lengths."""
    lengths = torch.tensor([length for row in rows for length in row], dtype=torch.int32)
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)).cuda()


PACKED_ROWS = [[100, 56, 100], [17, 239]]  # two rows of 256 tokens, documents of unequal lengths


@pytest.mark.parametrize(
    "mask_type, window", [("causal", (-1, 0)), ("causal", (31, 0)), ("causal", (0, 0)), ("no_mask", (-1, -1))]
)
def test_packed_documents_on_te_match_float64(mask_type, window, rel_error):
    """TE's thd format (padding_causal / padding per document, window per document) against the float64 reference,
    forward and backward; the documents matter (a plain call differs)."""
    from te_fx import ops

    q, k, v = _inputs(2, 256, 256, 8, 2, 64, torch.bfloat16)
    config = dict(mask_type=mask_type, window_size=window, softmax_scale=0.125, cu_seqlens=_packed(PACKED_ROWS))
    out, _, _ = _te_against_reference(q, k, v, rel_error, **config)
    plain = ops.attention(q.detach(), k.detach(), v.detach(), mask_type=mask_type, window_size=window,
                          softmax_scale=0.125, executor="te")  # fmt: skip
    if window != (0, 0):
        assert rel_error(out, plain) > 0.05


def test_packed_documents_on_te_with_a_zero_length_document_and_gqa(rel_error):
    q, k, v = _inputs(2, 128, 128, 16, 4, 128, torch.float16)
    config = dict(mask_type="causal", window_size=(-1, 0), softmax_scale=128**-0.5,
                  cu_seqlens=_packed([[0, 64, 64], [128]]))  # fmt: skip
    _te_against_reference(q, k, v, rel_error, **config)


def test_custom_op_thd_fake_matches_te(rel_error):
    """opcheck's fake-tensor test compares the fake's aux shapes with TE's real ones: the thd softmax statistics
    are (B * S, H, 1), as TE 2.20 documents them ([tq, h, 1])."""
    q, k, v = (t.detach() for t in _inputs(2, 256, 256, 8, 2, 64, torch.bfloat16))
    cu_seqlens = _packed(PACKED_ROWS)
    for training in (True, False):
        args = (q, k, v, cu_seqlens, cu_seqlens, "padding_causal", 31, 0, 0.125, 0.0, training, "te", "thd")
        torch.library.opcheck(
            torch.ops.te_fx.attention_fwd.default, args,
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )  # fmt: skip
    _, stats, rng = torch.ops.te_fx.attention_fwd(*args[:10], True, "te", "thd")
    assert stats.shape == (512, 8, 1) and stats.dtype == torch.float32 and rng.shape == (2,)


def test_packed_documents_compile_fullgraph_on_te(rel_error):
    from te_fx import ops

    q, k, v = _inputs(2, 256, 256, 8, 2, 64, torch.bfloat16)
    cu_seqlens = _packed(PACKED_ROWS)

    def f(q, k, v, cu_seqlens):
        return ops.attention(q, k, v, mask_type="causal", window_size=(31, 0), softmax_scale=0.125,
                             cu_seqlens=cu_seqlens, executor="te")  # fmt: skip

    out = torch.compile(f, fullgraph=True)(q, k, v, cu_seqlens)
    out.sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = ops.attention(*leaves, mask_type="causal", window_size=(31, 0), softmax_scale=0.125,
                        cu_seqlens=cu_seqlens, executor="reference")  # fmt: skip
    ref.sum().backward()
    assert rel_error(out, ref) < 1e-2 and rel_error(q.grad, leaves[0].grad) < 3e-2


@pytest.mark.parametrize("pad", ["right", "left", "both_ends", "empty_row"])
@pytest.mark.parametrize("window_left", [31, 127])
def test_windowed_key_padding_on_te_matches_float64(pad, window_left, rel_error):
    """padding_causal with a window after the partition (training): exact at every position for padding at the ends
    of rows; queries that see no key (right padding past the window) are zero, with zero gradients."""
    q, k, v = _inputs(2, 256, 256, 8, 2, 64, torch.bfloat16)
    keep = torch.ones(2, 256, dtype=torch.long, device="cuda")
    if pad == "right":
        keep[0, 100:] = 0
        keep[1, 250:] = 0
    elif pad == "left":
        keep[1, :57] = 0
    elif pad == "both_ends":
        keep[0, :20] = 0
        keep[0, 150:] = 0
    else:
        keep[0] = 0
        keep[1, 60:] = 0
    config = dict(mask_type="causal", window_size=(window_left, 0), softmax_scale=0.125, key_padding_mask=keep)
    out, ref, _ = _te_against_reference(q, k, v, rel_error, **config)
    no_key = (ref == 0).all(dim=-1).all(dim=-1)  # (B, S): rows the reference gives no key
    assert torch.equal(out[no_key], torch.zeros_like(out[no_key])) and not q.grad[no_key].any()
    if pad == "right":
        assert no_key[0, 100 + window_left :].all()  # guard: such rows exist


def _sdpa_float64(q, k, v, visible, scale):
    """Brute-force oracle: softmax attention in float64 over an explicit (B, Sq, Skv) visibility, rows that see
    nothing zero."""
    rep = q.shape[2] // k.shape[2]
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
    scores = (q64 @ k64.transpose(-1, -2) * scale).masked_fill(~visible[:, None], float("-inf"))
    return (scores.softmax(-1).nan_to_num(0.0) @ v64).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("window_left", [-1, 100])
def test_key_padding_anywhere_in_inference_on_te_matches_a_brute_force_float64_oracle(batch, window_left, dtype):
    """Inference: HF's ``causal (& window) & attention_mask[b, kv]`` with padding at both ends and inside rows, through
    TE's key bias (a row at a time), against explicit float64 attention at every position."""
    from te_fx import ops

    seq = 384
    q, k, v = _inputs(batch, seq, seq, 8, 2, 128, dtype, grad=False)
    positions = torch.arange(seq, device="cuda")
    keep = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    keep[0, :40] = False
    keep[0, 150:190] = False
    keep[-1, 300:] = False
    keep[-1, 60:61] = False
    visible = (positions[None, :] <= positions[:, None]) & keep[:, None, :]
    if window_left >= 0:
        visible &= positions[None, :] >= positions[:, None] - window_left
    out = ops.attention(q, k, v, mask_type="causal", window_size=(window_left, 0), softmax_scale=0.1,
                        key_padding_mask=keep, executor="te")  # fmt: skip
    ref = _sdpa_float64(q, k, v, visible, 0.1)
    error = (out.double() - ref).abs().max().item()
    assert error < (2e-2 if dtype == torch.bfloat16 else 3e-3), error


@pytest.mark.parametrize("mask_type, window_left", [("causal_bottom_right", -1), ("causal_bottom_right", 100),
                                                     ("no_mask", -1)])  # fmt: skip
@pytest.mark.parametrize("q_len, kv_len", [(1, 384), (1, 21), (1, 30), (64, 384)])
def test_key_padding_with_a_kv_cache_in_inference_on_te_matches_float64(q_len, kv_len, mask_type, window_left):
    """Decode against a padded KV cache (left padding, a hole, an all-padded row; odd cache lengths too, which TE
    needs padded): all visible keys with the key bias (the window folded into it), a row at a time, against
    explicit float64 attention at every position. Several
    queries bottom-right with a key bias, which TE gets wrong, are refused by the executor, and a clear error
    from the op."""
    from te_fx import ops
    from te_fx.core.plan import AttentionPlan
    from te_fx.executors import AttentionCall, unsupported_call_reason

    batch = 3
    q, k, v = _inputs(batch, q_len, kv_len, 8, 2, 128, torch.bfloat16, grad=False)
    keep = torch.ones(batch, kv_len, dtype=torch.bool, device="cuda")
    keep[0, : kv_len // 8] = False
    keep[1, kv_len // 2 : kv_len // 2 + 3] = False
    keep[2] = False
    rows = torch.arange(q_len, device="cuda")[:, None] + (kv_len - q_len)
    cols = torch.arange(kv_len, device="cuda")[None, :]
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device="cuda")
    if mask_type != "no_mask":
        visible = (cols <= rows) & ((cols >= rows - window_left) | (window_left < 0))
    window = (-1, -1) if mask_type == "no_mask" else (window_left, 0)
    plan = AttentionPlan(mask_type, window, key_padding=keep)
    refused = q_len > 1 and mask_type == "causal_bottom_right"
    assert unsupported_call_reason("te", AttentionCall.of_plan(q, k, v, plan)) == ("fallback_mask" if refused else None)
    if refused:
        with pytest.raises(NotImplementedError, match="bottom-right"):
            ops.attention(q, k, v, mask_type=mask_type, window_size=window, softmax_scale=0.1, key_padding_mask=keep,
                          executor="te")  # fmt: skip
        return
    out = ops.attention(q, k, v, mask_type=mask_type, window_size=window, softmax_scale=0.1,
                        key_padding_mask=keep, executor="te")  # fmt: skip
    ref = _sdpa_float64(q, k, v, visible[None] & keep[:, None, :], 0.1)
    error = (out.double() - ref).abs().max().item()
    assert error < 2e-2, error
    assert torch.equal(out[2], torch.zeros_like(out[2]))


TRAINING_LAYOUTS = ("ones", "right", "left", "both_ends", "inside")


@pytest.mark.parametrize("layout", TRAINING_LAYOUTS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("window_left", [-1, 100])
def test_key_padding_in_training_on_te_matches_a_float64_oracle(layout, batch, window_left):
    """Training with an unchecked key padding mask: the op reads the layout off the mask and runs the causal kernel,
    the rows as they are, the row partition or (padding inside a row) the reference kernels; output and gradients
    at every position against float64 autograd, within twice bf16 SDPA's own error."""
    from te_fx import ops

    seq = 384
    q, k, v = _inputs(batch, seq, seq, 8, 2, 128, torch.bfloat16)
    positions = torch.arange(seq, device="cuda")
    keep = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    if layout == "right":
        keep[0, 300:] = False
    elif layout == "left":
        keep[-1, :70] = False
    elif layout == "both_ends":
        keep[0, :20] = False
        keep[-1, 330:] = False
    elif layout == "inside":
        keep[0, 150:190] = False
        keep[-1, :10] = False
    visible = (positions[None, :] <= positions[:, None]) & keep[:, None, :]
    if window_left >= 0:
        visible &= positions[None, :] >= positions[:, None] - window_left
    sees = visible.any(-1)
    d_out = torch.randn(batch, seq, 8, 128, device="cuda", dtype=torch.bfloat16)
    out = ops.attention(q, k, v, mask_type="causal", window_size=(window_left, 0), softmax_scale=0.1,
                        key_padding_mask=keep, executor="te")  # fmt: skip
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    # rows that see no key: zero in both oracles, which let them see every key to stay finite, then drop them
    safe = visible | ~sees[:, :, None]

    def oracle(dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        qh, kh, vh = (t.transpose(1, 2) for t in inputs)
        kh, vh = kh.repeat_interleave(4, 1), vh.repeat_interleave(4, 1)
        result = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=safe[:, None], scale=0.1)
        result = result.transpose(1, 2) * sees[:, :, None, None]
        return result, torch.autograd.grad(result, inputs, d_out.to(dtype))

    ref, ref_grads = oracle(torch.float64)
    sdpa, sdpa_grads = oracle(torch.bfloat16)
    for name, got, base, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (sdpa, *sdpa_grads), (ref, *ref_grads)):
        error, sdpa_error = ((t.double() - want).abs().max().item() for t in (got, base))
        assert error <= 2 * sdpa_error + 1e-3, (name, error, sdpa_error)


def test_te_module_runs_key_padding_and_packed_plans(rel_error):
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling

    from te_fx import ops
    from te_fx.core.plan import AttentionPlan
    from te_fx.executors.te import TEDotProductAttention

    module = TEDotProductAttention(8, 64, num_gqa_groups=2, qkv_format="bshd")
    q, k, v = (t.detach() for t in _inputs(2, 256, 256, 8, 2, 64, torch.bfloat16))
    keep = torch.ones(2, 256, dtype=torch.long, device="cuda")
    keep[0, 200:] = 0
    plans = [
        AttentionPlan("causal", (31, 0), key_padding=keep),
        AttentionPlan("causal", (-1, 0), cu_seqlens=_packed(PACKED_ROWS)),
        AttentionPlan("no_mask", (-1, -1), cu_seqlens=_packed(PACKED_ROWS)),
    ]
    for plan in plans:
        assert module.unsupported_reason(q, k, v, plan) is None
        out = module.run(q, k, v, plan)
        leaves = [t.double() for t in (q, k, v)]
        ref = ops.attention(*leaves, mask_type=plan.mask_type, window_size=plan.window_size,
                            softmax_scale=module.softmax_scale, key_padding_mask=plan.key_padding,
                            cu_seqlens=plan.cu_seqlens, executor="reference")  # fmt: skip
        assert out.shape == (2, 256, 8, 64) and rel_error(out, ref) < 1e-2
        with te.autocast(enabled=True, recipe=DelayedScaling(fp8_dpa=True)):
            assert module.unsupported_reason(q, k, v, plan) == "fallback_fp8"


def test_thd_backend_check_accepts_a_typical_shape():
    from te_fx.executors.te import shape_unsupported_reason

    shape = (5, 32, 8, 4096, 4096, 128, 128)
    assert shape_unsupported_reason(torch.bfloat16, shape, "padding_causal", (-1, 0), 0.0, True, 0, None, "thd") is None
    assert (
        shape_unsupported_reason(torch.bfloat16, shape, "padding_causal", (4095, 0), 0.0, True, 0, None, "thd") is None
    )
    assert shape_unsupported_reason(torch.bfloat16, shape, "padding_causal", (4095, 0), 0.0, True) is None


SINK_PLANS = {
    "causal": dict(mask_type="causal", window_size=(-1, 0)),
    "window": dict(mask_type="causal", window_size=(127, 0)),
    "bottom_right": dict(mask_type="causal_bottom_right", window_size=(-1, 0)),
    "right_padding": dict(mask_type="causal", window_size=(-1, 0), key_padding_layout=(False, True, True)),
    "left_padding_window": dict(mask_type="causal", window_size=(31, 0)),
    "packed": dict(mask_type="causal", window_size=(-1, 0)),
}


@pytest.mark.parametrize("plan", list(SINK_PLANS))
def test_sinks_on_te_match_float64(plan, rel_error):
    """Attention sinks on TE's learnable softmax (every path of the op) against the reference in float64: output
    and the gradients of q, k, v and the sinks, where TE's backend query accepts the configuration (all but thd on
    an H200 with TE 2.20 and cuDNN 9.19)."""
    from te_fx import ops
    from te_fx.core.plan import AttentionPlan
    from te_fx.executors import AttentionCall
    from te_fx.executors.te import call_unsupported_reason

    q_len = 64 if plan == "bottom_right" else 256
    q, k, v = _inputs(2, q_len, 256, 8, 2, 64, torch.bfloat16)
    q = q.detach()[:, :q_len].requires_grad_()
    config = dict(SINK_PLANS[plan], softmax_scale=0.125)
    if "padding" in plan:
        keep = torch.ones(2, 256, dtype=torch.long, device="cuda")
        keep[1, slice(200, None) if plan == "right_padding" else slice(0, 57)] = 0
        config["key_padding_mask"] = keep
    if plan == "packed":
        config["cu_seqlens"] = _packed(PACKED_ROWS)
    sinks = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0], device="cuda", requires_grad=True)
    sinks64 = sinks.detach().double().requires_grad_()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]

    te_plan = AttentionPlan(config["mask_type"], config["window_size"], key_padding=config.get("key_padding_mask"),
                            cu_seqlens=config.get("cu_seqlens"))  # fmt: skip
    reason = call_unsupported_reason(AttentionCall.of_plan(q, k, v, te_plan, 0.0, True, "learnable"))
    if plan == "packed" and reason is not None:  # TE 2.20 with cuDNN 9.19 on an H200: te_fx's backend runs eager
        pytest.skip(f"TE's backend query refuses sinks in the thd format on this card ({reason})")
    assert reason is None
    out = ops.attention(q, k, v, executor="te", softmax_offset=sinks, **config)
    ref = ops.attention(*leaves, executor="reference", softmax_offset=sinks64, **config)
    weight = torch.randn_like(out)
    out.backward(weight)
    ref.backward(weight.double())
    errors = [rel_error(out, ref)] + [rel_error(t.grad, r.grad) for t, r in zip((q, k, v, sinks), (*leaves, sinks64))]
    print(f"sinks {plan}: rel err out, dq, dk, dv, dsinks = {errors}")
    assert errors[0] < 1e-2 and max(errors[1:4]) < 3e-2 and errors[4] < 3e-2
    plain = ops.attention(q.detach(), k.detach(), v.detach(), executor="te", **config)
    assert rel_error(plain, ref) > 0.01  # the sinks matter
