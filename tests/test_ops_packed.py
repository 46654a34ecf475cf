"""Packed documents (thd) and windowed key padding through ``te_fx.ops.attention`` on the reference executor, the
executor interface, and the attention modules' plan methods (CPU).

The oracle is autograd through plain SDPA with an explicit bool mask written here from document ids and positions
(block-diagonal causal for documents; causal & window & keep for padding), in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_ops import _qkv, _sdpa_mask, _sdpa_reference
from torch import nn
from torch.library import opcheck

from te_fx import ops
from te_fx.core.plan import AttentionPlan
from te_fx.executors import AttentionCall, Executor, ExecutorModule, TEUnavailableError, get_executor
from te_fx.executors import reference as reference_module
from te_fx.executors.reference import ReferenceDotProductAttention

FWD = torch.ops.te_fx.attention_fwd.default
BWD = torch.ops.te_fx.attention_bwd.default
NO_DROPOUT_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

# per row of S = 8 tokens, the lengths of its documents (a zero-length document in the second batch's first row)
DOCUMENTS = {
    "one_per_row": [[8], [8]],
    "unequal": [[3, 5], [2, 2, 4]],
    "singletons": [[1, 1, 6], [5, 1, 1, 1]],
    "empty_document": [[8], [0, 6, 2]],
}


def _cu_seqlens(rows: list[list[int]]) -> torch.Tensor:
    lengths = [length for row in rows for length in row]
    return F.pad(torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))


def _document_mask(rows: list[list[int]], mask_type: str, window: tuple[int, int]) -> torch.Tensor:
    """Bool (B, 1, S, S), True = attend, by loops over each row's documents: a query sees the keys of its own
    document, causally (and within ``window``) for "causal", all of them for "no_mask" (within a two-sided window)."""
    seq = sum(rows[0])
    mask = torch.zeros(len(rows), 1, seq, seq, dtype=torch.bool)
    left, right = window
    if mask_type == "causal":
        right = 0
    for b, lengths in enumerate(rows):
        start = 0
        for length in lengths:
            for i in range(length):
                for j in range(length):
                    if (right < 0 or j <= i + right) and (left < 0 or j >= i - left):
                        mask[b, 0, start + i, start + j] = True
            start += length
    return mask


def _compare(out, ref, inputs, weight=None):
    """Outputs equal, and gradients of sum(out * weight) equal, through both."""
    torch.testing.assert_close(out, ref)
    weight = torch.randn_like(out) if weight is None else weight
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weight).sum(), inputs)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad)
    return grads


# --------------------------------------------------------------------------------------------- packed documents

PACKED_CASES = [
    ("causal", (-1, 0)),
    ("causal", (1, 0)),
    ("causal", (0, 0)),
    ("no_mask", (-1, -1)),
    ("no_mask", (1, 2)),
]


@pytest.mark.parametrize("documents", list(DOCUMENTS))
@pytest.mark.parametrize("mask_type, window", PACKED_CASES)
def test_packed_documents_match_sdpa_with_a_block_diagonal_mask(documents, mask_type, window):
    rows = DOCUMENTS[documents]
    q, k, v = _qkv(q_len=8, kv_len=8)
    out = ops.attention(q, k, v, mask_type=mask_type, window_size=window, softmax_scale=0.6,
                        cu_seqlens=_cu_seqlens(rows), executor="reference")  # fmt: skip
    mask = _document_mask(rows, mask_type, window)
    ref = _sdpa_reference(q, k, v, mask, 0.6)
    _compare(out, ref, (q, k, v))
    # guard: the documents matter (unless each query sees itself only), so the comparison above could fail
    plain = ops.attention(q, k, v, mask_type=mask_type, window_size=window, softmax_scale=0.6, executor="reference")
    if documents != "one_per_row" and window != (0, 0):
        assert not torch.allclose(out, plain)


def test_packed_documents_gradcheck():
    q, k, v = _qkv(q_len=8, kv_len=8, heads=2, kv_heads=1)
    cu_seqlens = _cu_seqlens(DOCUMENTS["unequal"])

    def attention(q, k, v):
        return ops.attention(q, k, v, mask_type="causal", window_size=(2, 0), softmax_scale=0.5,
                             cu_seqlens=cu_seqlens, executor="reference")  # fmt: skip

    assert torch.autograd.gradcheck(attention, (q, k, v))


def test_packed_documents_float32_matches_float64():
    q, k, v = _qkv(q_len=8, kv_len=8, grad=False)
    kwargs = dict(mask_type="causal", window_size=(-1, 0), softmax_scale=0.5,
                  cu_seqlens=_cu_seqlens(DOCUMENTS["unequal"]), executor="reference")  # fmt: skip
    out32 = ops.attention(*(t.float() for t in (q, k, v)), **kwargs)
    torch.testing.assert_close(out32.double(), ops.attention(q, k, v, **kwargs), rtol=1e-5, atol=1e-6)


def test_a_document_crossing_a_row_is_refused_by_the_reference():
    """The reference checks the contract the op cannot check without a host sync."""
    q, k, v = _qkv(q_len=8, kv_len=8, grad=False)
    crossing = torch.tensor([0, 6, 12, 16], dtype=torch.int32)
    with pytest.raises(ValueError, match="no document may cross a row"):
        ops.attention(q, k, v, mask_type="causal", window_size=(-1, 0), softmax_scale=0.5, cu_seqlens=crossing,
                      executor="reference")  # fmt: skip


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(cu_seqlens=_cu_seqlens(DOCUMENTS["unequal"]).long()), "int32"),
        (dict(cu_seqlens=_cu_seqlens(DOCUMENTS["unequal"])[None]), "1D"),
        (dict(mask_type="causal_bottom_right"), "'causal' or 'no_mask'"),
        (dict(window_size=(2, 1)), r"window_size \(w, 0\)"),
        (dict(key_padding_mask=torch.ones(2, 8, dtype=torch.bool)), "at most one of"),
        (dict(k=lambda k: k[:, :4], v=lambda v: v[:, :4]), "q_len == kv_len"),
    ],
)
def test_packed_arguments_no_executor_can_run_are_clear_errors(change, match):
    q, k, v = _qkv(q_len=8, kv_len=8, grad=False)
    arguments = dict(q=q, k=k, v=v, mask_type="causal", window_size=(-1, 0), softmax_scale=0.5,
                     cu_seqlens=_cu_seqlens(DOCUMENTS["unequal"]), executor="reference")  # fmt: skip
    for name, value in change.items():
        arguments[name] = value(arguments[name]) if callable(value) else value
    with pytest.raises(ValueError, match=match):
        ops.attention(**arguments)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck_attention_fwd_thd(dropout_p):
    q, k, v = _qkv(q_len=8, kv_len=8)
    cu_seqlens = _cu_seqlens(DOCUMENTS["unequal"])
    for mask_type, window in (("padding_causal", (2, 0)), ("padding", (-1, -1))):
        for training in (True, False):
            args = (q, k, v, cu_seqlens, cu_seqlens, mask_type, window[0], window[1], 0.4, dropout_p, training,
                    "reference", "thd")  # fmt: skip
            result = opcheck(FWD, args, test_utils=NO_DROPOUT_UTILS)
            assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_attention_bwd_thd():
    q, k, v = _qkv(q_len=8, kv_len=8, grad=False)
    cu_seqlens = _cu_seqlens(DOCUMENTS["singletons"])
    config = ("padding_causal", 1, 0, 0.4, 0.0, "reference", "thd")
    out, stats, rng = FWD(q, k, v, cu_seqlens, cu_seqlens, *config[:5], True, *config[5:])
    args = (torch.randn_like(out), q, k, v, out, stats, rng, cu_seqlens, cu_seqlens, *config)
    result = opcheck(BWD, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    assert set(result.values()) == {"SUCCESS"}, result


def _packed_attention(q, k, v, cu_seqlens):
    return ops.attention(q, k, v, mask_type="causal", window_size=(2, 0), softmax_scale=0.5, cu_seqlens=cu_seqlens,
                         executor="reference")  # fmt: skip


@pytest.mark.parametrize("backend, dynamic", [("aot_eager", False), ("aot_eager", True), ("inductor", False)])
def test_torch_compile_fullgraph_of_packed_attention(backend, dynamic):
    """No graph break (fullgraph=True raises on one), and the compiled op gives the eager op's output and grads."""
    torch._dynamo.reset()
    q, k, v = (t.detach().float().requires_grad_() for t in _qkv(q_len=8, kv_len=8))
    cu_seqlens = _cu_seqlens(DOCUMENTS["unequal"])
    compiled = torch.compile(_packed_attention, backend=backend, fullgraph=True, dynamic=dynamic)
    out = compiled(q, k, v, cu_seqlens)
    ref = _packed_attention(q, k, v, cu_seqlens)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    # other documents, same shapes: the compiled code reads cu_seqlens' values at run time
    other = _cu_seqlens(DOCUMENTS["singletons"])
    torch.testing.assert_close(compiled(q, k, v, other), _packed_attention(q, k, v, other), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------- windowed key padding

WINDOW_PADDING = {
    "right": [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]],
    "left": [[0, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]],
    "both_ends": [[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]],
    "empty_row": [[0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]],
}


@pytest.mark.parametrize("window_left", [0, 1, 3, 20])
@pytest.mark.parametrize("padding", list(WINDOW_PADDING))
def test_windowed_key_padding_matches_sdpa_everywhere(padding, window_left):
    """Padding at the ends of rows: exact at every position, padded ones included; rows that see no key are exactly
    zero, with zero gradients."""
    keep = torch.tensor(WINDOW_PADDING[padding])
    window = (window_left, 0)
    q, k, v = _qkv(q_len=8, kv_len=8)
    out = ops.attention(q, k, v, mask_type="causal", window_size=window, softmax_scale=0.5, key_padding_mask=keep,
                        executor="reference")  # fmt: skip
    mask = _sdpa_mask("causal", window, 8, 8, keep)
    ref = _sdpa_reference(q, k, v, mask, 0.5)
    grads = _compare(out, ref, (q, k, v))
    no_key = ~mask.any(dim=-1)[:, 0]  # (B, S): queries that see no key
    assert torch.equal(out[no_key], torch.zeros_like(out[no_key]))
    assert torch.equal(grads[0][no_key], torch.zeros_like(grads[0][no_key]))
    assert all(torch.isfinite(grad).all() for grad in grads)
    if padding == "right" and window_left < 3:  # guard: right padding past the window leaves queries without a key
        assert no_key[0, 4 + window_left :].all()


def test_windowed_key_padding_gradcheck():
    keep = torch.tensor(WINDOW_PADDING["both_ends"])
    q, k, v = _qkv(q_len=8, kv_len=8, heads=2, kv_heads=1)

    def attention(q, k, v):
        return ops.attention(q, k, v, mask_type="causal", window_size=(1, 0), softmax_scale=0.5,
                             key_padding_mask=keep, executor="reference")  # fmt: skip

    assert torch.autograd.gradcheck(attention, (q, k, v))


def test_windowed_key_padding_gives_the_kernel_no_query_without_a_key(monkeypatch):
    """TE's kernels on a row without a visible key are unspecified: the kernel's query rows stop at L + w (its row r
    sees ranks max(0, r - w)..min(r, L - 1)), and every row it runs sees a key."""
    seen = []
    real = reference_module.reference_attention

    def recording(q, k, v, seqlens_q=None, seqlens_kv=None, **kwargs):
        seen.append((seqlens_q.tolist(), seqlens_kv.tolist()))
        return real(q, k, v, seqlens_q=seqlens_q, seqlens_kv=seqlens_kv, **kwargs)

    monkeypatch.setattr(reference_module, "reference_attention", recording)
    q, k, v = _qkv(q_len=8, kv_len=8)  # training: the partition
    keep = torch.tensor(WINDOW_PADDING["empty_row"])
    ops.attention(q, k, v, mask_type="causal", window_size=(2, 0), softmax_scale=0.5, key_padding_mask=keep,
                  executor="reference")  # fmt: skip
    assert seen == [([3, 5], [1, 3])]


def test_windowed_key_padding_with_holes_stays_finite():
    """Holes inside a row break the window's exactness (documented); the output stays finite all the same."""
    keep = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1], [1, 1, 0, 1, 1, 1, 1, 1]])
    q, k, v = _qkv(q_len=8, kv_len=8)
    out = ops.attention(q, k, v, mask_type="causal", window_size=(1, 0), softmax_scale=0.5, key_padding_mask=keep,
                        executor="reference")  # fmt: skip
    out.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))


# --------------------------------------------------------------------------------------------- executors


def test_get_executor():
    reference = get_executor("reference")
    assert isinstance(reference, Executor) and reference.name == "reference" and get_executor("reference") is reference
    with pytest.raises(ValueError, match="unknown te_fx executor"):
        get_executor("tee")
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 -- TE missing or broken: the te executor says how to get it
        with pytest.raises(TEUnavailableError, match="executor='reference'"):
            get_executor("te")


def test_reference_fake_aux_shapes_match_its_forward():
    q, k, v = _qkv(grad=False)
    reference = get_executor("reference")
    for dropout_p in (0.0, 0.5):
        _, stats, rng = reference.forward(q, k, v, None, None, "bshd", "causal", (-1, 0), 0.5, dropout_p, True)
        fake_stats, fake_rng = reference.fake_aux(q, "bshd", dropout_p, True)
        assert (stats.shape, rng.shape) == (fake_stats.shape, fake_rng.shape)
        assert (stats.dtype, rng.dtype) == (fake_stats.dtype, fake_rng.dtype)
    assert reference.call_unsupported_reason(AttentionCall.of_bshd(q, k, v, "padding", (-1, -1), "thd", 3)) is None


class _FakeTEModule(nn.Module):
    """Stands in for TE's DotProductAttention: an nn.Module subclass whose __init__ calls nn.Module's."""

    inits = 0

    def __init__(self, heads: int) -> None:
        super().__init__()
        _FakeTEModule.inits += 1
        self.heads = heads
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class _FakeTEDotProductAttention(ExecutorModule, _FakeTEModule):
    pass


def test_executor_module_goes_first_in_the_bases_of_a_te_like_module():
    """As in TEDotProductAttention(ExecutorModule, te.DotProductAttention): nn.Module's __init__ runs once (a second
    run would drop the parameters registered before it), the base's forward and parameters work."""
    nn_inits = []
    real_init = nn.Module.__init__

    def counting_init(self, *args, **kwargs):
        nn_inits.append(type(self))
        real_init(self, *args, **kwargs)

    _FakeTEModule.inits = 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nn.Module, "__init__", counting_init)
        module = _FakeTEDotProductAttention(4)
    assert nn_inits == [_FakeTEDotProductAttention] and _FakeTEModule.inits == 1
    assert isinstance(module, ExecutorModule) and module.heads == 4
    assert [name for name, _ in module.named_parameters()] == ["weight"]
    assert torch.equal(module(torch.full((2,), 3.0)), torch.full((2,), 3.0))
    with pytest.raises(NotImplementedError):
        module.run(*_qkv(grad=False), AttentionPlan("causal", (-1, 0)))


# --------------------------------------------------------------------------------------------- the reference module


def _plans(batch: int, seq: int) -> dict[str, tuple[AttentionPlan, torch.Tensor]]:
    """Each plan kind with the explicit (B, 1, S, S) bool mask it means."""
    keep = torch.tensor(WINDOW_PADDING["right"])
    rows = DOCUMENTS["unequal"]
    return {
        "causal": (AttentionPlan("causal", (-1, 0)), _sdpa_mask("causal", (-1, 0), seq, seq)),
        "window": (AttentionPlan("causal", (2, 0)), _sdpa_mask("causal", (2, 0), seq, seq)),
        "no_mask": (AttentionPlan("no_mask", (-1, -1)), _sdpa_mask("no_mask", (-1, -1), seq, seq)),
        "key_padding": (AttentionPlan("causal", (-1, 0), key_padding=keep),
                        _sdpa_mask("causal", (-1, 0), seq, seq, keep)),
        "key_padding_window": (AttentionPlan("causal", (1, 0), key_padding=keep),
                               _sdpa_mask("causal", (1, 0), seq, seq, keep)),
        "documents": (AttentionPlan("causal", (-1, 0), cu_seqlens=_cu_seqlens(rows)),
                      _document_mask(rows, "causal", (-1, 0))),
        "documents_no_mask": (AttentionPlan("no_mask", (-1, -1), cu_seqlens=_cu_seqlens(rows)),
                              _document_mask(rows, "no_mask", (-1, -1))),
    }  # fmt: skip


@pytest.mark.parametrize("kind", list(_plans(2, 8)))
def test_reference_module_runs_every_plan_kind(kind):
    plan, mask = _plans(2, 8)[kind]
    module = ReferenceDotProductAttention(4, 3, num_gqa_groups=2)
    q, k, v = _qkv(q_len=8, kv_len=8)
    assert module.unsupported_reason(q, k, v, plan) is None
    out = module.run(q, k, v, plan)
    assert out.shape == (2, 8, 4, 3)
    _compare(out, _sdpa_reference(q, k, v, mask, 3**-0.5), (q, k, v))


def test_reference_module_run_uses_its_softmax_scale_and_dropout_in_training_only():
    plan, mask = _plans(2, 8)["documents"]
    q, k, v = _qkv(q_len=8, kv_len=8, grad=False)
    scaled = ReferenceDotProductAttention(4, 3, num_gqa_groups=2, softmax_scale=0.9)
    torch.testing.assert_close(scaled.run(q, k, v, plan), _sdpa_reference(q, k, v, mask, 0.9))
    dropping = ReferenceDotProductAttention(4, 3, num_gqa_groups=2, attention_dropout=0.5)
    dropping.eval()
    torch.testing.assert_close(dropping.run(q, k, v, plan), _sdpa_reference(q, k, v, mask, 3**-0.5))
    dropping.train()
    assert not torch.allclose(dropping.run(q, k, v, plan), dropping.run(q, k, v, plan))


def test_reference_module_thd_format_is_te_call_contract():
    """qkv_format="thd": (T, H, D) tensors with cu_seqlens_q/kv, "causal" run as padding_causal (as TE's module
    does), output (T, H * Dv); equal to the op's packed path."""
    rows = DOCUMENTS["unequal"]
    cu_seqlens = _cu_seqlens(rows)
    q, k, v = _qkv(q_len=8, kv_len=8, grad=False)
    module = ReferenceDotProductAttention(4, 3, num_gqa_groups=2, qkv_format="thd", window_size=(1, 0))
    out = module(*(t.flatten(0, 1) for t in (q, k, v)), attn_mask_type="causal", cu_seqlens_q=cu_seqlens,
                 cu_seqlens_kv=cu_seqlens)  # fmt: skip
    ref = _sdpa_reference(q, k, v, _document_mask(rows, "causal", (1, 0)), 3**-0.5)
    torch.testing.assert_close(out, ref.flatten(0, 1).flatten(1))
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_kv"):
        module(*(t.flatten(0, 1) for t in (q, k, v)))


def _document_visibility(position_ids: torch.Tensor, window_left: int) -> torch.Tensor:
    """(B, S, S) brute force: query i sees key j <= i (and >= i - w) of the same maximal run of +1 positions."""
    batch, seq = position_ids.shape
    visible = torch.zeros(batch, seq, seq, dtype=torch.bool)
    for b in range(batch):
        start = 0
        for i in range(seq):
            if i and position_ids[b, i] != position_ids[b, i - 1] + 1:
                start = i
            for j in range(start, i + 1):
                visible[b, i, j] = window_left < 0 or i - j <= window_left
    return visible


@pytest.mark.parametrize("window_left", [-1, 2])
def test_position_ids_run_the_documents_they_give(window_left):
    """``position_ids``: documents wherever a position is not the previous one plus 1 (restarts and jumps alike),
    each causal (and windowed) on its own: output and gradients against SDPA with a brute-force mask."""
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2], [5, 6, 7, 9, 10, 11, 12, 13, 14, 15]])
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 10, heads, 8, dtype=torch.float64, requires_grad=True) for heads in (4, 2, 2))

    def attention(q, k, v):
        return ops.attention(q, k, v, mask_type="causal", window_size=(window_left, 0), softmax_scale=0.3,
                             position_ids=position_ids, executor="reference")  # fmt: skip

    visible = _document_visibility(position_ids, window_left)
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
        attn_mask=visible[:, None], scale=0.3,
    ).transpose(1, 2)  # fmt: skip
    out = attention(q, k, v)
    torch.testing.assert_close(out, ref)
    for grad, ref_grad in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(grad, ref_grad)
    assert torch.autograd.gradcheck(attention, (q, k, v))
    args = (q, k, v, *ops.packed_documents(position_ids), "causal", window_left, 0, 0.3, 0.0, True, "reference")
    result = torch.library.opcheck(torch.ops.te_fx.packed_attention_fwd.default, args)
    assert set(result.values()) == {"SUCCESS"}, result
