"""The reference executor against an independent float64 brute-force oracle, torch SDPA and autograd.

The oracle below does not use te_fx: for every batch item, head and query it lists the visible keys from the TE
semantics (mask type, window (left, right), per-row lengths for ``padding*`` types) and runs a softmax over just
those keys. TE's window normalisation (``check_set_window_size``) is part of the semantics: causal types force
right = 0 (so (-1, -1) and (w, r) mean (-1, 0) and (w, 0)).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import visible_keys

from te_fx.executors.reference import (
    MASK_TYPES,
    ReferenceDotProductAttention,
    reference_attention,
    reference_attention_backward,
)

# ----------------------------------------------------------------------------------------------------------------
# The oracle
# ----------------------------------------------------------------------------------------------------------------


def oracle_visible(mask_type, window, batch, q_len, kv_len, seqlens_q=None, seqlens_kv=None) -> torch.Tensor:
    """Bool (batch, q_len, kv_len) from :func:`visible_keys`."""
    out = torch.zeros(batch, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        sq = int(seqlens_q[b]) if seqlens_q is not None else q_len
        skv = int(seqlens_kv[b]) if seqlens_kv is not None else kv_len
        for i in range(q_len):
            for j in visible_keys(mask_type, window, i, q_len, kv_len, sq, skv):
                out[b, i, j] = True
    return out


def oracle_attention(q, k, v, mask_type, window, scale=None, seqlens_q=None, seqlens_kv=None) -> torch.Tensor:
    """float64 loops: q (B, Sq, H, D), k (B, Skv, Hkv, D), v (B, Skv, Hkv, Dv) -> (B, Sq, H, Dv). Differentiable."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads, v_dim = k.shape[1], k.shape[2], v.shape[-1]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    rows = []
    for b in range(batch):
        sq = int(seqlens_q[b]) if seqlens_q is not None else q_len
        skv = int(seqlens_kv[b]) if seqlens_kv is not None else kv_len
        per_query = []
        for i in range(q_len):
            keys = visible_keys(mask_type, window, i, q_len, kv_len, sq, skv)
            per_head = []
            for h in range(heads):
                if not keys:
                    per_head.append(torch.zeros(v_dim, dtype=torch.float64))
                    continue
                kh = k[b, keys, h // group].double()
                vh = v[b, keys, h // group].double()
                scores = (kh @ q[b, i, h].double()) * scale
                weights = torch.exp(scores - scores.max())
                per_head.append((weights / weights.sum()) @ vh)
            per_query.append(torch.stack(per_head))
        rows.append(torch.stack(per_query))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def attention_cases(draw, max_len: int = 7, mask_types=MASK_TYPES, padded_batch: tuple[int, int] = (1, 2)):
    mask_type = draw(st.sampled_from(mask_types))
    batch = draw(st.integers(*padded_batch) if mask_type.startswith("padding") else st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 3))
    q_len = draw(st.integers(1, max_len))
    kv_len = draw(st.integers(1, max_len))
    head_dim = draw(st.integers(1, 5))
    v_dim = draw(st.sampled_from([head_dim, draw(st.integers(1, 5))]))
    if "causal" in mask_type:
        window = draw(
            st.one_of(
                st.just((-1, 0)),
                st.just((-1, -1)),  # TE normalises to (-1, 0) for causal types
                st.tuples(st.integers(0, max_len + 1), st.just(0)),
                st.tuples(st.integers(0, max_len + 1), st.integers(1, 3)),  # right forced to 0
            )
        )
    else:
        window = (-1, -1)
    seqlens_q = seqlens_kv = None
    if mask_type.startswith("padding"):
        seqlens_q = torch.tensor(draw(st.lists(st.integers(0, q_len), min_size=batch, max_size=batch)))
        seqlens_kv = torch.tensor(draw(st.lists(st.integers(0, kv_len), min_size=batch, max_size=batch)))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    seed = draw(st.integers(0, 2**16))
    return dict(
        batch=batch, heads=heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim, v_dim=v_dim,
        mask_type=mask_type, window=window, seqlens_q=seqlens_q, seqlens_kv=seqlens_kv, scale=scale, seed=seed,
    )  # fmt: skip


def make_qkv(case, dtype=torch.float64, requires_grad=False):
    gen = torch.Generator().manual_seed(case["seed"])
    b, sq, skv = case["batch"], case["q_len"], case["kv_len"]
    q = torch.randn(b, sq, case["heads"], case["head_dim"], generator=gen, dtype=torch.float64)
    k = torch.randn(b, skv, case["kv_heads"], case["head_dim"], generator=gen, dtype=torch.float64)
    v = torch.randn(b, skv, case["kv_heads"], case["v_dim"], generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v))


def run_reference(case, q, k, v, **extra):
    return reference_attention(
        q, k, v, mask_type=case["mask_type"], window_size=case["window"], softmax_scale=case["scale"],
        seqlens_q=case["seqlens_q"], seqlens_kv=case["seqlens_kv"], **extra,
    )  # fmt: skip


def run_oracle(case, q, k, v):
    return oracle_attention(
        q, k, v, case["mask_type"], case["window"], case["scale"], case["seqlens_q"], case["seqlens_kv"]
    )


def case_visible(case) -> torch.Tensor:
    return oracle_visible(
        case["mask_type"], case["window"], case["batch"], case["q_len"], case["kv_len"], case["seqlens_q"],
        case["seqlens_kv"],
    )  # fmt: skip


def oracle_grads(out, inputs, grad_out):
    """Gradients of the oracle (zero where an input does not reach the output, e.g. everything padded)."""
    if not out.requires_grad:
        return tuple(torch.zeros_like(t) for t in inputs)
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs))


# ----------------------------------------------------------------------------------------------------------------
# The oracle itself (so that a wrong oracle cannot make the comparisons vacuous)
# ----------------------------------------------------------------------------------------------------------------


def test_oracle_visible_hand_written_patterns():
    causal = [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert oracle_visible("causal", (-1, 0), 1, 3, 3)[0].int().tolist() == causal
    # bottom-right: 2 queries at key positions 2 and 3
    assert oracle_visible("causal_bottom_right", (-1, 0), 1, 2, 4)[0].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    # top-left with fewer queries: query i sees 0..i
    assert oracle_visible("causal", (-1, 0), 1, 2, 4)[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]
    # window (1, 0): i-1..i
    assert oracle_visible("causal", (1, 0), 1, 3, 3)[0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    # padding_causal_bottom_right with lengths (2, 3) inside (3, 4): relative to the actual lengths
    got = oracle_visible("padding_causal_bottom_right", (-1, 0), 1, 3, 4, [2], [3])[0].int().tolist()
    assert got == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    got = oracle_visible("padding", (-1, -1), 1, 2, 3, [1], [2])[0].int().tolist()
    assert got == [[1, 1, 0], [0, 0, 0]]


def test_oracle_attention_matches_textbook_formula():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 1, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    expected = torch.softmax(q[0, :, 0] @ k[0, :, 0].T / math.sqrt(3), dim=-1) @ v[0, :, 0]
    torch.testing.assert_close(oracle_attention(q, k, v, "no_mask", (-1, -1))[0, :, 0], expected)


# ----------------------------------------------------------------------------------------------------------------
# reference_attention
# ----------------------------------------------------------------------------------------------------------------


@given(attention_cases())
def test_reference_matches_bruteforce_oracle(case):
    q, k, v = make_qkv(case)
    out = run_reference(case, q, k, v)
    expected = run_oracle(case, q, k, v)
    assert out.shape == (case["batch"], case["q_len"], case["heads"], case["v_dim"])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # rows with no visible key (padded or fully masked queries) are exactly zero
    visible = case_visible(case)
    empty = ~visible.any(-1)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.isfinite(out).all()


@given(attention_cases(max_len=5))
def test_reference_gradients_match_oracle(case):
    q, k, v = make_qkv(case, requires_grad=True)
    grad_out = torch.randn(case["batch"], case["q_len"], case["heads"], case["v_dim"], dtype=torch.float64)
    grads = torch.autograd.grad(run_reference(case, q, k, v), (q, k, v), grad_out)
    expected = oracle_grads(run_oracle(case, q, k, v), (q, k, v), grad_out)
    for got, want, name in zip(grads, expected, "qkv"):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"d{name}")


def run_backward(case, grad_out, q, k, v, **extra):
    return reference_attention_backward(
        grad_out, q, k, v, mask_type=case["mask_type"], window_size=case["window"], softmax_scale=case["scale"],
        seqlens_q=case["seqlens_q"], seqlens_kv=case["seqlens_kv"], **extra,
    )  # fmt: skip


@given(attention_cases(max_len=5))
def test_reference_backward_matches_oracle_gradients(case):
    """The closed-form backward (used below autograd, in the custom ops) against the oracle's autograd."""
    q, k, v = make_qkv(case, requires_grad=True)
    grad_out = torch.randn(case["batch"], case["q_len"], case["heads"], case["v_dim"], dtype=torch.float64)
    expected = oracle_grads(run_oracle(case, q, k, v), (q, k, v), grad_out)
    got = run_backward(case, grad_out, q.detach(), k.detach(), v.detach())
    for g, want, t, name in zip(got, expected, (q, k, v), "qkv"):
        assert g.shape == t.shape and g.dtype == t.dtype and g.is_contiguous(), name
        torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-9, msg=f"d{name}")


@given(attention_cases(max_len=5), st.sampled_from([0.2, 0.5]))
def test_reference_backward_replays_dropout(case, p):
    """With the same generator seed the closed-form backward equals autograd through the dropped-out forward."""
    q, k, v = make_qkv(case, requires_grad=True)
    grad_out = torch.randn(case["batch"], case["q_len"], case["heads"], case["v_dim"], dtype=torch.float64)
    out = run_reference(case, q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(case["seed"]))
    expected = oracle_grads(out, (q, k, v), grad_out)
    generator = torch.Generator().manual_seed(case["seed"])
    got = run_backward(case, grad_out, q.detach(), k.detach(), v.detach(), dropout_p=p, generator=generator)
    for g, want, name in zip(got, expected, "qkv"):
        torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-9, msg=f"d{name}")
    # the same seed reproduces the forward
    again = run_reference(case, q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(case["seed"]))
    assert torch.equal(again, out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_backward_low_precision(dtype):
    case = dict(
        batch=2, heads=4, kv_heads=2, q_len=5, kv_len=7, head_dim=8, v_dim=4, mask_type="causal_bottom_right",
        window=(3, 0), seqlens_q=None, seqlens_kv=None, scale=None, seed=12,
    )  # fmt: skip
    q, k, v = make_qkv(case, dtype=dtype)
    grad_out = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    expected = oracle_grads(run_oracle(case, q64, k64, v64), (q64, k64, v64), grad_out)
    got = run_backward(case, grad_out.to(dtype), q, k, v)
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for g, want in zip(got, expected):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("mask_type", "window"),
    [(t, w) for t in MASK_TYPES for w in [(-1, -1), (-1, 0), (1, 0)] if "causal" in t or w == (-1, -1)],
)
def test_reference_gradcheck(mask_type, window):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    # row 0 is full; row 1 has a padded query and two padded keys
    lengths = {}
    if mask_type.startswith("padding"):
        lengths = dict(seqlens_q=torch.tensor([3, 2]), seqlens_kv=torch.tensor([4, 2]))

    def fn(q, k, v):
        return reference_attention(q, k, v, mask_type=mask_type, window_size=window, softmax_scale=0.7, **lengths)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("mask_type", [t for t in MASK_TYPES if t.startswith("padding")])
def test_reference_gradcheck_with_fully_padded_sequence(mask_type):
    """A sequence of length 0 (all queries padded) next to a full one: zero output, zero and finite gradients."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lengths = dict(seqlens_q=torch.tensor([0, 3]), seqlens_kv=torch.tensor([2, 3]))

    def fn(q, k, v):
        return reference_attention(q, k, v, mask_type=mask_type, **lengths)

    out = fn(q, k, v)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0
    (out * torch.randn_like(out)).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[0], torch.zeros_like(t.grad[0]))
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


@settings(report_multiple_bugs=False)
@given(attention_cases(mask_types=tuple(t for t in MASK_TYPES if t.startswith("padding")), padded_batch=(2, 3)))
def test_reference_padding_batched_matches_oracle(case):
    """Per-row lengths in a batch (te_visible must not update a batch-1 tensor in place)."""
    q, k, v = make_qkv(case, requires_grad=True)
    out = run_reference(case, q, k, v)
    expected = run_oracle(case, q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for got, want in zip(grads, oracle_grads(expected, (q, k, v), grad_out)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@given(attention_cases())
def test_reference_matches_torch_sdpa_float32(case):
    """Torch SDPA with a bool mask built by the oracle, on rows that see at least one key."""
    q, k, v = make_qkv(case, dtype=torch.float32)
    out = run_reference(case, q, k, v)
    assert out.dtype == torch.float32
    visible = case_visible(case)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=visible[:, None], scale=case["scale"],
        enable_gqa=case["heads"] != case["kv_heads"],
    ).transpose(1, 2)  # fmt: skip
    rows = visible.any(-1)  # (B, Sq)
    torch.testing.assert_close(out[rows], expected[rows], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[~rows], torch.zeros_like(out[~rows]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_low_precision_keeps_dtype_and_accumulates_in_float32(dtype):
    """Half-precision inputs: the result is the exact attention of the rounded inputs, rounded once (within one
    unit in the last place); computing in the input dtype is off by hundreds of units."""
    case = dict(
        batch=1, heads=4, kv_heads=2, q_len=24, kv_len=32, head_dim=16, v_dim=8, mask_type="causal_bottom_right",
        window=(9, 0), seqlens_q=None, seqlens_kv=None, scale=None, seed=5,
    )  # fmt: skip
    q, k, v = make_qkv(case)
    q, k, v = (2 * q).to(dtype), (2 * k).to(dtype), v.to(dtype)
    out = run_reference(case, q, k, v)
    assert out.dtype == dtype
    expected = run_oracle(case, q, k, v)  # exact, on the rounded inputs
    if dtype == torch.float32:  # computed in float32 itself: a few rounding errors, no single final rounding
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
        return
    spacing = torch.finfo(dtype).eps * expected.abs().clamp_min(2**-10)
    ulps = ((out.double() - expected).abs() / spacing).max().item()
    assert ulps <= 1.0, f"{ulps:.1f} units in the last place off"


def test_reference_rejects_bad_arguments():
    q = torch.randn(1, 2, 3, 4)
    k = torch.randn(1, 2, 2, 4)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        reference_attention(q, k, k)
    q = torch.randn(1, 2, 2, 4)
    with pytest.raises(ValueError, match="mask_type"):
        reference_attention(q, k, k, mask_type="arbitrary")
    with pytest.raises(ValueError, match="seqlens"):
        reference_attention(q, k, k, mask_type="padding_causal")
    with pytest.raises(ValueError, match="bshd"):
        ReferenceDotProductAttention(2, 4, qkv_format="sbhd")


# ----------------------------------------------------------------------------------------------------------------
# ReferenceDotProductAttention
# ----------------------------------------------------------------------------------------------------------------


@given(attention_cases(max_len=6))
def test_module_output_layout_and_values(case):
    """(B, S, H * Dv) output; per-call mask type and window; cu_seqlens become per-row lengths."""
    q, k, v = make_qkv(case)
    kv_channels = case["head_dim"] if case["v_dim"] == case["head_dim"] else (case["head_dim"], case["v_dim"])
    module = ReferenceDotProductAttention(
        case["heads"], kv_channels, case["kv_heads"], qkv_format="bshd", attn_mask_type="no_mask",
        softmax_scale=case["scale"],
    ).eval()  # fmt: skip
    cu = {}
    if case["seqlens_q"] is not None:
        zero = torch.zeros(1, dtype=torch.int32)
        cu = dict(
            cu_seqlens_q=torch.cat([zero, case["seqlens_q"].cumsum(0).int()]),
            cu_seqlens_kv=torch.cat([zero, case["seqlens_kv"].cumsum(0).int()]),
        )
    out = module(q, k, v, attn_mask_type=case["mask_type"], window_size=case["window"], **cu)
    assert out.shape == (case["batch"], case["q_len"], case["heads"] * case["v_dim"])
    expected = run_oracle(case, q, k, v)
    torch.testing.assert_close(out.view_as(expected), expected, rtol=1e-10, atol=1e-10)


def test_module_defaults_come_from_the_constructor():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 6, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    module = ReferenceDotProductAttention(2, 4, attn_mask_type="causal", window_size=(2, 0), softmax_scale=0.3)
    expected = oracle_attention(q, k, v, "causal", (2, 0), 0.3)
    torch.testing.assert_close(module(q, k, v).view_as(expected), expected)
    # the per-call arguments win over the constructor's
    expected = oracle_attention(q, k, v, "no_mask", (-1, -1), 0.3)
    out = module(q, k, v, attn_mask_type="no_mask", window_size=(-1, -1))
    torch.testing.assert_close(out.view_as(expected), expected)
    # a causal type without any window means plain causal
    plain = ReferenceDotProductAttention(2, 4, attn_mask_type="causal")
    expected = oracle_attention(q, k, v, "causal", (-1, 0))
    torch.testing.assert_close(plain(q, k, v).view_as(expected), expected)


def test_module_no_mask_with_causal_window_default_is_full_attention():
    """TE's DotProductAttention built as te_fx builds it (window_size=(-1, 0)), called with attn_mask_type='no_mask'."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 4, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    module = ReferenceDotProductAttention(2, 4, window_size=(-1, 0)).eval()
    expected = oracle_attention(q, k, v, "no_mask", (-1, -1))
    torch.testing.assert_close(module(q, k, v, attn_mask_type="no_mask").view_as(expected), expected)


def _dropout_probe(module: ReferenceDotProductAttention, keys: int = 32, queries: int = 16, heads: int = 2):
    """q = 0 gives uniform weights 1/keys; v = identity makes the output the (dropped, rescaled) weights."""
    q = torch.zeros(1, queries, heads, 4, dtype=torch.float64)
    k = torch.randn(1, keys, heads, 4, dtype=torch.float64)
    v = torch.eye(keys, dtype=torch.float64).view(1, keys, 1, keys).expand(1, keys, heads, keys).contiguous()
    return module(q, k, v, attn_mask_type="no_mask", window_size=(-1, -1)).view(queries, heads, keys)


def test_module_dropout_only_in_train_mode():
    p, keys = 0.5, 32
    module = ReferenceDotProductAttention(2, (4, keys), attention_dropout=p)

    module.eval()
    out = _dropout_probe(module, keys)
    torch.testing.assert_close(out, torch.full_like(out, 1.0 / keys), rtol=0, atol=1e-15)
    torch.testing.assert_close(_dropout_probe(module, keys), out, rtol=0, atol=0)

    module.train()
    first, second = _dropout_probe(module, keys), _dropout_probe(module, keys)
    kept_value = 1.0 / (keys * (1.0 - p))
    for out in (first, second):
        # structure: each weight is either dropped or kept and rescaled by 1 / (1 - p)
        kept = torch.isclose(out, torch.full_like(out, kept_value), rtol=0, atol=1e-12)
        dropped = out == 0
        assert (kept | dropped).all()
        # statistics: 1024 Bernoulli(0.5) draws; the bounds are > 5 standard deviations wide
        assert 0.42 < dropped.double().mean().item() < 0.58
    assert not torch.equal(first, second)  # fresh randomness per call

    # dropout never brings back a masked key and keeps empty rows empty
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 5, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    cu_seqlens = torch.tensor([0, 3])
    out = module(q, k, v, attn_mask_type="padding_causal", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens)
    assert torch.equal(out[0, 3:], torch.zeros_like(out[0, 3:]))
    v_probe = torch.eye(5, dtype=torch.float64).view(1, 5, 1, 5).expand(1, 5, 2, 5).contiguous()
    weights = module(q, k, v_probe, attn_mask_type="causal").view(5, 2, 5)
    future = ~oracle_visible("causal", (-1, 0), 1, 5, 5)[0]
    assert torch.equal(weights.transpose(0, 1)[:, future], torch.zeros(2, int(future.sum()), dtype=torch.float64))


def test_module_train_mode_without_dropout_is_deterministic():
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 5, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    module = ReferenceDotProductAttention(2, 4).train()
    expected = oracle_attention(q, k, v, "causal", (-1, 0))
    torch.testing.assert_close(module(q, k, v).view_as(expected), expected)
