"""te_fx's custom ops (``te_fx::attention_fwd`` / ``te_fx::attention_bwd``), ``te_fx.ops.attention`` and the
``te_attn`` backend's option handling and report (CPU, reference executor).

* ``torch.library.opcheck`` of both ops (schema, fake implementation, autograd registration, AOT dispatch);
* float64 gradcheck of ``te_fx.ops.attention``, and its outputs/gradients against autograd through SDPA with the
  equivalent explicit mask (key padding left/right/holes included);
* dropout: the backward replays the forward's dropout (checked through the rng_state the forward returns, and
  through an identity that holds only if the backward uses the forward's mask);
* ``torch.compile(fullgraph=True)`` of code calling the op (aot_eager, inductor);
* backend options, registration, and compile_report semantics.
"""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

import te_fx
from te_fx import ops
from te_fx.compile.backend import te_attn
from te_fx.executors.reference import reference_attention, reference_attention_backward

F64 = torch.float64
FWD = torch.ops.te_fx.attention_fwd.default
BWD = torch.ops.te_fx.attention_bwd.default
NO_DROPOUT_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
OPTIONS = {"executor": "reference", "inner": "aot_eager"}
REPORT_KEYS = {"node", "decision", "reason", "detail", "mask_kind", "num_heads", "num_kv_heads", "head_dim",
               "window_size", "executor"}  # fmt: skip


def _qkv(batch=2, q_len=5, kv_len=5, heads=4, kv_heads=2, dqk=3, dv=3, dtype=F64, grad=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = (
        torch.randn(batch, q_len, heads, dqk, generator=generator, dtype=dtype),
        torch.randn(batch, kv_len, kv_heads, dqk, generator=generator, dtype=dtype),
        torch.randn(batch, kv_len, kv_heads, dv, generator=generator, dtype=dtype),
    )
    return tuple(t.requires_grad_(grad) for t in tensors)


def _cu(lengths) -> torch.Tensor:
    return F.pad(torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))


# --------------------------------------------------------------------------------------------- opcheck

# (name, shapes kwargs, cu_seqlens_q lengths, cu_seqlens_kv lengths, mask_type, window, dropout_p)
OPCHECK_CASES = [
    ("mha_causal", dict(heads=2, kv_heads=2), None, None, "causal", (-1, 0), 0.0),
    ("gqa_no_mask", dict(), None, None, "no_mask", (-1, -1), 0.0),
    ("mqa_window", dict(kv_heads=1), None, None, "causal", (1, 0), 0.0),
    ("band_window", dict(), None, None, "no_mask", (2, 1), 0.0),
    ("bottom_right", dict(q_len=3, kv_len=6), None, None, "causal_bottom_right", (-1, 0), 0.0),
    ("dv_unlike_dqk", dict(dqk=5, dv=2), None, None, "causal", (-1, 0), 0.0),
    ("padding_causal", dict(), [5, 5], [3, 5], "padding_causal", (-1, 0), 0.0),
    ("padding", dict(), [4, 2], [5, 1], "padding", (-1, -1), 0.0),
    ("padding_causal_bottom_right", dict(q_len=4, kv_len=6), [2, 4], [6, 3], "padding_causal_bottom_right",
     (-1, 0), 0.0),
    ("dropout", dict(), None, None, "causal", (-1, 0), 0.3),
    ("dropout_padding", dict(), [5, 5], [2, 4], "padding_causal", (-1, 0), 0.5),
]  # fmt: skip


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[case[0] for case in OPCHECK_CASES])
def test_opcheck_attention_fwd(case):
    """Schema, fake tensor, autograd registration and AOT dispatch (the latter runs the backward, attention_bwd,
    against the eager op's gradients). With dropout the op draws its seed from torch's RNG, which opcheck's
    comparisons replay, so all of opcheck's tests apply there too."""
    _, shapes, lengths_q, lengths_kv, mask_type, window, dropout_p = case
    q, k, v = _qkv(**shapes)
    cu_q = None if lengths_q is None else _cu(lengths_q)
    cu_kv = None if lengths_kv is None else _cu(lengths_kv)
    for training in (True, False):
        args = (q, k, v, cu_q, cu_kv, mask_type, window[0], window[1], 0.4, dropout_p, training, "reference")
        result = opcheck(FWD, args, test_utils=NO_DROPOUT_UTILS)
        assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_attention_bwd():
    q, k, v = _qkv(grad=False)
    out, stats, rng = FWD(q, k, v, None, None, "causal", 1, 0, 0.4, 0.0, True, "reference")
    d_out = torch.randn_like(out)
    args = (d_out, q, k, v, out, stats, rng, None, None, "causal", 1, 0, 0.4, 0.0, "reference")
    result = opcheck(BWD, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    assert set(result.values()) == {"SUCCESS"}, result


PADDED_LAYOUTS = {  # keep mask of a (2, 5) batch: the route padding_route gives its layout in training
    "causal": [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]],
    "rows": [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]],
    "partition": [[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]],
    "reference": [[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]],
}


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("route", list(PADDED_LAYOUTS))
def test_opcheck_padded_attention(route, dropout_p):
    """te_fx::padded_attention_fwd on each route it picks at run time (and its backward through AOT dispatch), with
    and without dropout, with sinks."""
    from te_fx.core.masks import padding_layout
    from te_fx.core.plan import padding_route

    q, k, v = _qkv()
    keep = torch.tensor(PADDED_LAYOUTS[route], dtype=torch.bool)
    layout = padding_layout(keep)
    assert padding_route(tuple(layout.tolist()), True) == route
    sinks = torch.randn(q.shape[2], dtype=F64, requires_grad=True)
    args = (q, k, v, keep, layout, 1, 0.4, dropout_p, "reference", sinks)
    result = opcheck(torch.ops.te_fx.padded_attention_fwd.default, args, test_utils=NO_DROPOUT_UTILS)
    assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_attention_fwd_non_contiguous_inputs():
    """q/k/v views with (B, H, S, D) memory, as the FX pass produces when it inserts transpose(1, 2)."""
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in _qkv())
    assert not q.is_contiguous()
    args = (q, k, v, None, None, "causal", -1, 0, 0.4, 0.0, True, "reference")
    assert set(opcheck(FWD, args, test_utils=NO_DROPOUT_UTILS).values()) == {"SUCCESS"}


def test_opcheck_attention_bwd_non_contiguous_inputs():
    """Was: the fake returned empty_like(q) (q's strides) while the real op returns contiguous (B, S, H, D)
    gradients, a stride mismatch that broke compiled backwards through a transpose the pass inserted."""
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(grad=False))
    out, stats, rng = FWD(q, k, v, None, None, "causal", -1, 0, 0.4, 0.0, True, "reference")
    args = (torch.randn_like(out), q, k, v, out, stats, rng, None, None, "causal", -1, 0, 0.4, 0.0, "reference")
    result = opcheck(BWD, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    assert set(result.values()) == {"SUCCESS"}, result


def test_fake_outputs_without_training():
    """Not training, the reference executor's rng_state is empty without dropout and a 2-element seed with it."""
    q, k, v = _qkv(grad=False)
    out, stats, rng = FWD(q, k, v, None, None, "causal", -1, 0, 0.4, 0.0, False, "reference")
    assert out.shape == (2, 5, 4, 3) and stats.numel() == 0 and rng.numel() == 0
    _, _, rng = FWD(q, k, v, None, None, "causal", -1, 0, 0.4, 0.5, False, "reference")
    assert rng.shape == (2,) and rng.dtype == torch.int64


# --------------------------------------------------------------------------------------------- against SDPA


def _sdpa_mask(mask_type, window, q_len, kv_len, key_padding=None):
    """Bool (B or 1, 1, q_len, kv_len) SDPA mask, True = attend, written out independently of te_fx.core.masks."""
    rows = torch.arange(q_len)[:, None]
    cols = torch.arange(kv_len)[None, :]
    diagonal = rows + (kv_len - q_len if mask_type.endswith("bottom_right") else 0)
    left, right = window
    if "causal" in mask_type:
        right = 0
    visible = torch.ones(q_len, kv_len, dtype=torch.bool)
    if right >= 0:
        visible &= cols <= diagonal + right
    if left >= 0:
        visible &= cols >= diagonal - left
    visible = visible[None, None]
    if key_padding is not None:
        visible = visible & (key_padding != 0)[:, None, None, :]
    return visible


def _sdpa_reference(q, k, v, mask, scale):
    """Autograd through SDPA (bhsd, enable_gqa) with an explicit mask; bshd in and out."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # fmt: skip
    return out.transpose(1, 2)


ATTENTION_CASES = [
    ("no_mask", dict(), "no_mask", (-1, -1)),
    ("causal_gqa", dict(), "causal", (-1, 0)),
    ("causal_mha", dict(kv_heads=4), "causal", (-1, 0)),
    ("causal_window_mqa", dict(kv_heads=1), "causal", (1, 0)),
    ("window_zero", dict(), "causal", (0, 0)),
    ("band", dict(), "no_mask", (1, 2)),
    ("bottom_right", dict(q_len=3, kv_len=6), "causal_bottom_right", (-1, 0)),
    ("bottom_right_window", dict(q_len=3, kv_len=6), "causal_bottom_right", (2, 0)),
    ("dv_unlike_dqk", dict(dqk=4, dv=2), "causal", (-1, 0)),
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_attention_matches_sdpa_and_gradcheck(case):
    _, shapes, mask_type, window = case
    q, k, v = _qkv(**shapes)
    scale = 0.7

    def attention(q, k, v):
        return ops.attention(q, k, v, mask_type=mask_type, window_size=window, softmax_scale=scale,
                             executor="reference")  # fmt: skip

    out = attention(q, k, v)
    ref = _sdpa_reference(q, k, v, _sdpa_mask(mask_type, window, q.shape[1], k.shape[1]), scale)
    torch.testing.assert_close(out, ref)
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), d_out)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad)
    assert torch.autograd.gradcheck(attention, (q, k, v))


REFINEMENTS = {  # name: (ops.attention's refinement, the te_fx ops an eager call of it runs)
    "position_ids": (
        {"position_ids": torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]])},
        {"packed_documents", "packed_attention_fwd", "packed_attention_bwd"},
    ),
    "key_padding_mask": (
        {"key_padding_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])},
        {"padding_layout", "padded_attention_fwd", "padded_attention_bwd"},
    ),
    "none": ({}, {"attention_fwd", "attention_bwd"}),
}


def _weighted_loss(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, refine: dict) -> torch.Tensor:
    out = ops.attention(q, k, v, mask_type="causal", window_size=(-1, 0), softmax_scale=0.7, executor="reference",
                        **refine)  # fmt: skip
    return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum()


@pytest.mark.parametrize("inputs", list(REFINEMENTS))
def test_gradients_of_a_tensor_subclass_equal_plain_tensors(inputs):
    """Eager calls of plain tensors run the ops' functions and autograd rule through te_fx's own path, tensor
    subclasses through the ops' registration: the gradients are the same."""
    q, k, v = _qkv(batch=2, q_len=6, kv_len=6)
    refine = REFINEMENTS[inputs][0]
    expected = torch.autograd.grad(_weighted_loss(q, k, v, refine), (q, k, v))
    subclassed = [t.detach().as_subclass(_Marked).requires_grad_() for t in (q, k, v)]
    for grad, ref in zip(torch.autograd.grad(_weighted_loss(*subclassed, refine), subclassed), expected):
        torch.testing.assert_close(grad.as_subclass(torch.Tensor), ref)


class _OpRecorder(TorchDispatchMode):
    """A dispatch mode such as a user's FLOP counter or tracer: it records the ops it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("inputs", list(REFINEMENTS))
def test_a_dispatch_mode_sees_te_fx_ops_and_the_same_gradients(inputs):
    """Eager calls run te_fx's ops without the dispatcher only while nothing watches: a dispatch mode installed
    around them sees every forward and backward op, and the gradients do not change."""
    q, k, v = _qkv(batch=2, q_len=6, kv_len=6)
    refine, names = REFINEMENTS[inputs]
    expected = torch.autograd.grad(_weighted_loss(q, k, v, refine), (q, k, v))
    with _OpRecorder() as recorder:
        grads = torch.autograd.grad(_weighted_loss(q, k, v, refine), (q, k, v))
    assert {f"te_fx::{name}" for name in names} <= recorder.seen
    for grad, ref in zip(grads, expected):
        torch.testing.assert_close(grad, ref, rtol=0, atol=0)


@pytest.mark.parametrize("inputs", list(REFINEMENTS))
def test_a_second_derivative_is_a_clear_error(inputs):
    """te_fx's backward has no derivative of its own (TE's kernels return gradients without a graph): a backward
    differentiated again raises, never a second derivative that misses attention's terms."""
    q, k, v = _qkv(batch=2, q_len=6, kv_len=6)
    (dq,) = torch.autograd.grad(_weighted_loss(q, k, v, REFINEMENTS[inputs][0]), q, create_graph=True)
    with pytest.raises(RuntimeError, match="te_fx.*_bwd"):
        torch.autograd.grad(dq.square().sum(), q)


@pytest.mark.parametrize("inputs", list(REFINEMENTS))
def test_meta_tensors_get_the_shapes_of_real_ones(inputs):
    """Meta tensors (shape inference, deferred initialisation) run the ops' fake kernels: outputs of the shapes a
    real call returns, with no data read."""
    q, k, v = (t.detach().to("meta").requires_grad_() for t in _qkv(batch=2, q_len=6, kv_len=6))
    refine = {name: value.to("meta") for name, value in REFINEMENTS[inputs][0].items()}
    out = ops.attention(q, k, v, mask_type="causal", window_size=(-1, 0), softmax_scale=0.7, executor="reference",
                        **refine)  # fmt: skip
    assert out.is_meta and out.shape == q.shape


def test_a_traced_module_holds_the_op():
    """torch.jit.trace of a module whose parameters need gradients records te_fx's op (not a Python autograd
    function, which TorchScript cannot save), and the saved module computes the same."""

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=F64))

        def forward(self, q, k, v):
            return ops.attention(q * self.weight, k, v, mask_type="causal", window_size=(-1, 0), softmax_scale=0.7,
                                 executor="reference")  # fmt: skip

    q, k, v = _qkv(grad=False)
    traced = torch.jit.trace(Scaled(), (q, k, v), check_trace=False)
    assert "te_fx::attention_fwd" in str(traced.graph)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(q, k, v), Scaled()(q, k, v))


class _Marked(torch.Tensor):
    """A tensor subclass with no behaviour of its own."""


KEY_PADDING = {
    "ones": [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]],
    "right": [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]],
    "left": [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]],
    "holes": [[1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 1, 1]],
    "empty_row": [[0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]],
}


@pytest.mark.parametrize("window", [(-1, 0), (2, 0)])
@pytest.mark.parametrize("dtype", [torch.long, torch.bool, torch.int32])
@pytest.mark.parametrize("padding", list(KEY_PADDING))
def test_key_padding_mask_matches_sdpa_and_gradcheck(padding, dtype, window):
    """HF's ``causal & attention_mask[b, kv]``, with and without a window: exact at every position wherever the
    padding sits (rows that see no key at all are zero, as in SDPA), in training with its gradients and in
    inference."""
    key_padding = torch.tensor(KEY_PADDING[padding]).to(dtype)
    q, k, v = _qkv(q_len=6, kv_len=6)

    def attention(q, k, v):
        return ops.attention(q, k, v, mask_type="causal", window_size=window, softmax_scale=0.5,
                             key_padding_mask=key_padding, executor="reference")  # fmt: skip

    out = attention(q, k, v)
    ref = _sdpa_reference(q, k, v, _sdpa_mask("causal", window, 6, 6, key_padding), 0.5)
    torch.testing.assert_close(out, ref)
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v), ref)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad)
    assert torch.autograd.gradcheck(attention, (q, k, v))


def test_compiled_key_padding_takes_every_layout_without_recompiling():
    """One compiled training graph with an unchecked key padding mask is exact for every layout it is later given
    (no padding, right, left, inside a row, an empty row): the op reads the layout at run time."""
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm

    def attention(q, k, v, key_padding):
        return ops.attention(q, k, v, mask_type="causal", window_size=(2, 0), softmax_scale=0.5,
                             key_padding_mask=key_padding, executor="reference")  # fmt: skip

    compiled = torch.compile(attention, backend=backend, fullgraph=True)
    for padding in KEY_PADDING:
        key_padding = torch.tensor(KEY_PADDING[padding])
        q, k, v = _qkv(q_len=6, kv_len=6)
        out = compiled(q, k, v, key_padding)
        ref = _sdpa_reference(q, k, v, _sdpa_mask("causal", (2, 0), 6, 6, key_padding), 0.5)
        torch.testing.assert_close(out, ref)
        weight = torch.randn_like(out)
        grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
        ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
        for grad, ref_grad in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref_grad)
    assert len(compiles) == 1


KEPT_FIRST = {
    "ones": [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]],
    "right": [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]],
    "one_key": [[1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]],
}


@pytest.mark.parametrize("window", [(-1, 0), (1, 0), (0, 0)])
@pytest.mark.parametrize("padding", list(KEPT_FIRST))
def test_kept_first_key_padding_runs_rows_as_they_are_and_matches_sdpa(padding, window):
    """A checked right-padding layout runs without the row partition, exact at every position (the
    padding queries after the kept keys see them, within the window, as in SDPA; past the window they see none and
    are zero)."""
    key_padding = torch.tensor(KEPT_FIRST[padding])
    q, k, v = _qkv(q_len=7, kv_len=7)

    def attention(q, k, v):
        return ops.attention(
            q, k, v, mask_type="causal", window_size=window, softmax_scale=0.5, key_padding_mask=key_padding,
            key_padding_layout=(False, True, True), executor="reference",
        )  # fmt: skip

    out = attention(q, k, v)
    ref = _sdpa_reference(q, k, v, _sdpa_mask("causal", window, 7, 7, key_padding), 0.5)
    torch.testing.assert_close(out, ref)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad)
    assert torch.autograd.gradcheck(attention, (q, k, v))


def test_a_fully_padded_row_reaches_the_kernel_as_one_key_and_comes_back_zero(monkeypatch):
    """No executor sees an empty sequence (TE's bshd kernels may leave such rows unwritten, and garbage times zero
    can be NaN): the row gets one padding key, and its output and gradients are exactly zero."""
    from te_fx.executors import reference

    seen = []
    real = reference.reference_attention

    def recording(q, k, v, seqlens_q=None, seqlens_kv=None, **kwargs):
        seen.append(seqlens_kv.tolist())
        return real(q, k, v, seqlens_q=seqlens_q, seqlens_kv=seqlens_kv, **kwargs)

    monkeypatch.setattr(reference, "reference_attention", recording)
    q, k, v = _qkv(q_len=6, kv_len=6)
    padding = torch.tensor(KEY_PADDING["empty_row"])
    out = ops.attention(q, k, v, mask_type="causal", window_size=(-1, 0), softmax_scale=0.5,
                        key_padding_mask=padding, executor="reference")  # fmt: skip
    assert seen == [[1, 3]]
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad[0], torch.zeros_like(t.grad[0]))


def test_key_padding_mask_needs_a_pattern_it_has_a_route_for():
    """Clear errors: a window that is not (w, 0) on a causal type or (-1, -1) without a mask, "causal" with fewer
    queries than keys, more queries than keys bottom-right, and a KV cache's queries or all-visible keys in training
    (te_fx runs those in inference only)."""
    q, k, v = _qkv()
    padding = torch.ones(2, 5, dtype=torch.long)
    for mask_type, window in (("no_mask", (2, 2)), ("causal", (2, 1)), ("causal_bottom_right", (-1, 1))):
        with pytest.raises(ValueError, match="key_padding_mask"), torch.no_grad():
            ops.attention(q, k, v, mask_type=mask_type, window_size=window, softmax_scale=0.5,
                          key_padding_mask=padding, executor="reference")  # fmt: skip
    for mask_type in ("causal", "causal_bottom_right"):
        with pytest.raises(ValueError, match="q_len"), torch.no_grad():
            ops.attention(q[:, :3] if mask_type == "causal" else q, k[:, :4], v[:, :4], mask_type=mask_type,
                          window_size=(-1, 0), softmax_scale=0.5, key_padding_mask=padding[:, :4],
                          executor="reference")  # fmt: skip
    for mask_type, window in (("no_mask", (-1, -1)), ("causal_bottom_right", (-1, 0))):
        with pytest.raises(ValueError, match="inference only"):
            ops.attention(q[:, :2], k, v, mask_type=mask_type, window_size=window, softmax_scale=0.5,
                          key_padding_mask=padding, executor="reference")  # fmt: skip


@pytest.mark.parametrize("mask_type, window", [("causal_bottom_right", (-1, 0)), ("causal_bottom_right", (1, 0)),
                                               ("causal_bottom_right", (0, 0)), ("no_mask", (-1, -1))])  # fmt: skip
@pytest.mark.parametrize("q_len", [1, 2, 6])
@pytest.mark.parametrize("padding", list(KEY_PADDING))
def test_key_padding_with_a_kv_cache_in_inference_matches_sdpa(padding, q_len, mask_type, window):
    """Decode (q_len 1) and chunked prefill against a KV cache whose keys are padded anywhere: HF's
    ``causal (bottom-right) & attention_mask[b, kv]``, or all keys visible, exact at every position; rows that see
    no key zero, as in SDPA."""
    key_padding = torch.tensor(KEY_PADDING[padding])
    q, k, v = _qkv(q_len=q_len, kv_len=6, grad=False)
    out = ops.attention(q, k, v, mask_type=mask_type, window_size=window, softmax_scale=0.5,
                        key_padding_mask=key_padding, executor="reference")  # fmt: skip
    ref = _sdpa_reference(q, k, v, _sdpa_mask(mask_type, window, q_len, 6, key_padding), 0.5)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(executor="tee"), "unknown te_fx executor"),
        (dict(q=lambda q: q[0]), "4D"),
        (dict(k=lambda k: k.half()), "dtype"),
        (dict(dropout_p=1.0), "dropout_p"),
        (dict(dropout_p=-0.1), "dropout_p"),
        (dict(key_padding_mask=torch.zeros(2, 5)), "bool or integer"),  # additive float: 0 would read as padding
        (dict(key_padding_mask=torch.ones(2, 1, 1, 5, dtype=torch.bool)), "bool or integer"),
        (dict(key_padding_mask=torch.ones(1, 5, dtype=torch.bool)), "batch differs"),  # no broadcast
        (dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), "length differs"),  # gather would cut q/k/v
        (dict(mask_type="no_mask", window_size=(1, 1), q=lambda q: q[:, :3]), "needs q_len == kv_len"),
    ],
)
def test_arguments_no_executor_can_run_are_clear_errors(change, match):
    q, k, v = _qkv(grad=False)
    arguments = dict(q=q, k=k, v=v, mask_type="causal", window_size=(-1, 0), softmax_scale=0.5, executor="reference")
    for name, value in change.items():
        arguments[name] = value(arguments[name]) if callable(value) else value
    with pytest.raises(ValueError, match=match):
        ops.attention(**arguments)


def test_attention_float32_and_no_grad():
    """fp32 outputs equal fp64 ones to fp32 precision; under no_grad the op runs without training state."""
    q, k, v = _qkv(grad=False)
    kwargs = dict(mask_type="causal", window_size=(-1, 0), softmax_scale=1 / math.sqrt(3), executor="reference")
    with torch.no_grad():
        out32 = ops.attention(*(t.float() for t in (q, k, v)), **kwargs)
    assert out32.dtype == torch.float32 and not out32.requires_grad
    torch.testing.assert_close(out32.double(), ops.attention(q, k, v, **kwargs), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- dropout

DROPOUT_CONFIGS = [
    dict(mask_type="causal", window=(-1, 0), lengths=None),
    dict(mask_type="no_mask", window=(1, 1), lengths=None),
    dict(mask_type="padding_causal", window=(-1, 0), lengths=([5, 5], [3, 5])),
]


@pytest.mark.parametrize("config", DROPOUT_CONFIGS, ids=lambda c: c["mask_type"])
def test_dropout_rng_state_replays_forward_and_backward(config):
    """attention_fwd returns the seed it drew; a generator seeded from rng_state[0] reproduces the forward's output
    with reference_attention exactly, and attention_bwd equals both reference_attention_backward and autograd
    through reference_attention with that same dropout draw."""
    q, k, v = _qkv(grad=False)
    p, scale = 0.4, 0.6
    cu_q = cu_kv = seqlens = None
    if config["lengths"]:
        cu_q, cu_kv = (_cu(lengths) for lengths in config["lengths"])
        seqlens = dict(seqlens_q=cu_q.diff(), seqlens_kv=cu_kv.diff())
    left, right = config["window"]
    out, stats, rng = FWD(q, k, v, cu_q, cu_kv, config["mask_type"], left, right, scale, p, True, "reference")
    assert rng.shape == (2,)

    def generator():
        return torch.Generator().manual_seed(int(rng[0]))

    ref_kwargs = dict(mask_type=config["mask_type"], window_size=config["window"], softmax_scale=scale, dropout_p=p,
                      **(seqlens or {}))  # fmt: skip
    torch.testing.assert_close(out, reference_attention(q, k, v, generator=generator(), **ref_kwargs), rtol=0, atol=0)
    no_dropout = reference_attention(q, k, v, **{**ref_kwargs, "dropout_p": 0.0})
    assert not torch.allclose(out, no_dropout)  # guard: dropout really dropped something

    d_out = torch.randn_like(out)
    grads = BWD(d_out, q, k, v, out, stats, rng, cu_q, cu_kv, config["mask_type"], left, right, scale, p, "reference")
    expected = reference_attention_backward(d_out, q, k, v, generator=generator(), **ref_kwargs)
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    autograd = torch.autograd.grad(reference_attention(*leaves, generator=generator(), **ref_kwargs), leaves, d_out)
    for grad, closed_form, through_autograd in zip(grads, expected, autograd):
        torch.testing.assert_close(grad, closed_form, rtol=0, atol=0)
        torch.testing.assert_close(grad, through_autograd)
    # a different seed gives a different backward: the replay is what makes them equal
    other = reference_attention_backward(d_out, q, k, v, generator=torch.Generator().manual_seed(int(rng[0]) + 1),
                                         **ref_kwargs)  # fmt: skip
    assert not torch.allclose(other[0], grads[0])


def test_dropout_backward_uses_the_forward_mask_through_ops_attention():
    """out = (P * keep / (1 - p)) @ v is linear in v, so sum(out * w) == sum(dv * v) with dv the gradient of
    sum(out * w) -- only if the backward applies the forward's dropout mask. Fresh randomness per call."""
    q, k, v = _qkv()
    kwargs = dict(mask_type="causal", window_size=(-1, 0), softmax_scale=0.5, dropout_p=0.5, executor="reference")
    weight = torch.randn(2, 5, 4, 3, dtype=F64)
    out = ops.attention(q, k, v, **kwargs)
    (dv,) = torch.autograd.grad((out * weight).sum(), (v,))
    torch.testing.assert_close((out * weight).sum(), (dv * v).sum())
    # guard: with another draw the identity fails, so it does test the pairing
    other = ops.attention(q, k, v, **kwargs)
    assert not torch.allclose(other, out)
    assert not torch.allclose((other * weight).sum(), (dv * v).sum())


def test_dropout_statistics():
    """Each output is (kept probability mass) / (1 - p) times v: with v = 1 the mean over rows is ~1."""
    q = k = torch.zeros(4, 64, 2, 4)
    v = torch.ones(4, 64, 2, 4)
    out = ops.attention(q, k, v, mask_type="no_mask", window_size=(-1, -1), softmax_scale=1.0, dropout_p=0.25,
                        executor="reference")[..., 0]  # fmt: skip
    assert abs(out.mean().item() - 1.0) < 0.02
    assert out.min() >= 0 and not torch.allclose(out, torch.ones_like(out))


# --------------------------------------------------------------------------------------------- under torch.compile


def _padded_attention(q, k, v, key_padding):
    return ops.attention(q, k, v, mask_type="causal", window_size=(-1, 0), softmax_scale=0.5,
                         key_padding_mask=key_padding, executor="reference")  # fmt: skip


@pytest.mark.parametrize("backend, dynamic", [("aot_eager", False), ("aot_eager", True), ("inductor", False)])
def test_torch_compile_of_the_op(backend, dynamic):
    """Was (torch 2.11): the key_padding_mask size checks passed Dynamo a message closure it cannot trace."""
    torch._dynamo.reset()
    q, k, v = (t.detach().float().requires_grad_() for t in _qkv(q_len=6, kv_len=6))
    key_padding = torch.tensor(KEY_PADDING["left"])
    compiled = torch.compile(_padded_attention, backend=backend, fullgraph=True, dynamic=dynamic)
    out = compiled(q, k, v, key_padding)
    ref = _padded_attention(q, k, v, key_padding)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_of_the_op_checks_the_mask_size(dynamic):
    """A key_padding_mask shorter than the keys is an error under torch.compile too, never a result computed from
    a cut mask; the error says why where Dynamo can trace the message (torch >= 2.13)."""
    torch._dynamo.reset()
    q, k, v = _qkv(q_len=6, kv_len=6, grad=False)
    compiled = torch.compile(_padded_attention, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    with pytest.raises((ValueError, RuntimeError)) as error:
        compiled(q, k, v, torch.ones(2, 5, dtype=torch.bool))
    if ops._DYNAMO_TRACES_CHECK_MESSAGES:
        assert "its length differs from the keys'" in str(error.value)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------- backend options


def _sdpa(q):
    return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def _compile_sdpa(**compile_kwargs):
    torch._dynamo.reset()
    te_fx.reset_compile_report()
    q = torch.randn(1, 2, 4, 8)
    out = torch.compile(_sdpa, backend="te_attn", fullgraph=True, **compile_kwargs)(q)
    torch.testing.assert_close(out, _sdpa(q))
    return te_fx.compile_report()


def _dynamo_graph():
    """A Dynamo graph with one SDPA node and its example inputs, captured with a pass-through backend."""
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_sdpa, backend=capture, fullgraph=True)(torch.randn(1, 2, 4, 8))
    torch._dynamo.reset()
    return captured[0]


BAD_OPTIONS = [
    ({"executor": "bogus", "inner": "aot_eager"}, "unknown te_fx executor"),
    ({"executor": "reference", "inner": "bogus"}, "'inner' must be one of"),
    ({"executor": "reference", "inner": "aot_eager", "bogus": 1}, r"options \['bogus'\].*need inner='inductor'"),
    ({"executor": "reference", "inner": "eager", "max_autotune": True}, r"options \['max_autotune'\]"),
    ({"executor": "reference", "exectuor": "te"}, r"unknown option\(s\) \['exectuor'\].*'executor' and 'inner'"),
]


@pytest.mark.parametrize(("options", "match"), BAD_OPTIONS)
def test_bad_options_raise_value_error(options, match):
    """Rejected before anything else happens: no rewrite, no report entry."""
    gm, example_inputs = _dynamo_graph()
    te_fx.reset_compile_report()
    with pytest.raises(ValueError, match=match):
        te_attn(gm, example_inputs, options=dict(options))
    assert te_fx.compile_report() == []
    assert any(node.target is F.scaled_dot_product_attention or "scaled_dot_product" in str(node.target)
               for node in gm.graph.nodes)  # fmt: skip
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=match) as info:
        _compile_sdpa(options=dict(options))
    assert isinstance(info.value.inner_exception, ValueError)
    assert te_fx.compile_report() == []


def test_mode_needs_inner_inductor():
    gm, example_inputs = _dynamo_graph()
    with pytest.raises(ValueError, match="mode 'max-autotune' need inner='inductor'"):
        te_attn(gm, example_inputs, options={"executor": "reference", "inner": "aot_eager"}, mode="max-autotune")


def test_inductor_options_and_mode_reach_inductor(monkeypatch):
    """Was: te_attn called compile_fx(..., options=..., mode=...), keywords compile_fx does not take (TypeError),
    so no Inductor option or mode could be used with te_attn."""
    from torch._inductor import compile_fx as compile_fx_module

    patches = []
    real = compile_fx_module.compile_fx

    def spy(gm, example_inputs, *args, config_patches=None, **kwargs):
        patches.append(config_patches)
        return real(gm, example_inputs, *args, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    report = _compile_sdpa(options={"executor": "reference", "inner": "inductor", "epilogue_fusion": False})
    assert [entry["decision"] for entry in report] == ["te"]
    assert patches[0] == {"epilogue_fusion": False}  # (compile_fx then calls itself under the patched config)
    patches.clear()
    monkeypatch.setenv("TE_FX_EXECUTOR", "reference")
    report = _compile_sdpa(mode="max-autotune-no-cudagraphs")
    assert [entry["decision"] for entry in report] == ["te"]
    assert patches[0] == torch._inductor.list_mode_options("max-autotune-no-cudagraphs")


@pytest.mark.parametrize("inner", ["aot_eager", "eager"])
def test_inner_compilers(inner):
    report = _compile_sdpa(options={"executor": "reference", "inner": inner})
    assert [(entry["decision"], entry["executor"], entry["mask_kind"]) for entry in report] == [
        ("te", "reference", "causal")
    ]


def test_inner_inductor_default_options():
    report = _compile_sdpa(options={"executor": "reference"})  # inner defaults to inductor
    assert [(entry["decision"], entry["mask_kind"]) for entry in report] == [("te", "causal")]


def test_executor_environment_variable(monkeypatch):
    monkeypatch.setenv("TE_FX_EXECUTOR", "reference")
    assert [e["executor"] for e in _compile_sdpa(options={"inner": "aot_eager"})] == ["reference"]
    # an explicit option wins over the environment
    monkeypatch.setenv("TE_FX_EXECUTOR", "bogus")
    assert [e["executor"] for e in _compile_sdpa(options={"inner": "aot_eager", "executor": "reference"})] == [
        "reference"
    ]
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="unknown te_fx executor 'bogus'"):
        _compile_sdpa(options={"inner": "aot_eager"})


def test_default_executor_is_te_and_leaves_cpu_graphs_alone(monkeypatch):
    """Without option or environment the executor is "te", which needs CUDA fp16/bf16: on CPU every SDPA node stays
    (with its reason), without importing TransformerEngine."""
    monkeypatch.delenv("TE_FX_EXECUTOR", raising=False)
    (entry,) = _compile_sdpa(options={"inner": "aot_eager"})
    assert entry["executor"] == "te" and entry["decision"] == "sdpa"
    assert entry["reason"] == "fallback_device" and "the te executor refuses float32 on cpu" in entry["detail"], entry


def test_backend_is_registered():
    assert "te_attn" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("te_attn") is te_attn


# --------------------------------------------------------------------------------------------- compile report


def test_compile_report_semantics(caplog):
    te_fx.reset_compile_report()
    assert te_fx.compile_report() == []
    with caplog.at_level(logging.INFO, logger="te_fx"):
        first = _compile_sdpa(options=OPTIONS)
    assert len(first) == 1 and set(first[0]) == REPORT_KEYS
    assert first[0] == {
        "node": first[0]["node"], "decision": "te", "reason": "rewritten", "detail": "", "mask_kind": "causal",
        "num_heads": 2, "num_kv_heads": 2, "head_dim": 8, "window_size": (-1, 0), "executor": "reference",
    }  # fmt: skip
    assert any("te_attn:" in record.getMessage() and "-> te (rewritten)" in record.getMessage()
               for record in caplog.records)  # fmt: skip
    # entries accumulate over compilations until reset
    torch._dynamo.reset()
    compiled = torch.compile(_sdpa, backend="te_attn", options=OPTIONS, fullgraph=True, dynamic=False)
    compiled(torch.randn(1, 2, 4, 8))
    compiled(torch.randn(1, 2, 4, 8))  # cached: no new entry
    assert len(te_fx.compile_report()) == 2
    compiled(torch.randn(1, 2, 6, 8))  # a recompilation: one more
    assert len(te_fx.compile_report()) == 3
    # the returned list and dicts are copies
    report = te_fx.compile_report()
    report[0]["decision"] = "changed"
    report.clear()
    assert te_fx.compile_report()[0]["decision"] == "te" and len(te_fx.compile_report()) == 3
    te_fx.reset_compile_report()
    assert te_fx.compile_report() == []
    torch._dynamo.reset()


def test_report_on_a_graph_without_attention():
    torch._dynamo.reset()
    te_fx.reset_compile_report()
    out = torch.compile(lambda x: x.sin() + 1, backend="te_attn", options=OPTIONS, fullgraph=True)(torch.ones(3))
    torch.testing.assert_close(out, torch.ones(3).sin() + 1)
    assert te_fx.compile_report() == []


@pytest.mark.parametrize("window", [(-1, 0), (2, 0), (0, 0)])
@pytest.mark.parametrize("padding", list(KEY_PADDING))
def test_key_padding_in_inference_is_exact_at_every_position_wherever_it_sits(padding, window):
    """Without autograd the op runs TE's causal type with a key bias: exact at every position for padding anywhere
    (inside a row too, where a window counts the padded positions), rows that see no key zero, as in SDPA."""
    key_padding = torch.tensor(KEY_PADDING[padding])
    q, k, v = _qkv(q_len=6, kv_len=6, grad=False)
    out = ops.attention(q, k, v, mask_type="causal", window_size=window, softmax_scale=0.5,
                        key_padding_mask=key_padding, executor="reference")  # fmt: skip
    torch.testing.assert_close(out, _sdpa_reference(q, k, v, _sdpa_mask("causal", window, 6, 6, key_padding), 0.5))


@pytest.mark.parametrize("padding", [None, "holes", "left"])
def test_compiled_checkpointed_dropout_replays_the_forwards_randomness(padding):
    """Activation checkpointing under torch.compile recomputes te_fx's forward for the backward: with dropout it must
    draw the same mask (the ops are tagged as seeded random ops), so the gradient equals the uncompiled one's."""
    from torch.utils.checkpoint import checkpoint

    key_padding = None if padding is None else torch.tensor(KEY_PADDING[padding], dtype=torch.bool)
    q, k, v = _qkv(q_len=6, kv_len=6)

    def attend(q, k, v):
        return ops.attention(q.sin(), k, v, mask_type="causal", window_size=(2, 0), softmax_scale=0.5, dropout_p=0.4,
                             key_padding_mask=key_padding, executor="reference")  # fmt: skip

    def checkpointed(q, k, v):
        return checkpoint(attend, q, k, v, use_reentrant=False)

    torch._dynamo.reset()
    grads = []
    for fn in (attend, torch.compile(checkpointed, backend="aot_eager", fullgraph=True)):
        torch.manual_seed(7)
        out = fn(q, k, v)
        grads.append(torch.autograd.grad((out * out).sum(), (q, k, v)))
    for grad, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(grad, expected)
