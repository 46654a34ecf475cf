"""Graphs that look like attention the pass could rewrite, but where a rewrite would be wrong unless done with care:
in-place writes, dynamic integers, a padding mask shared over the batch, reshapes that are not repeat_kv, float
constants, dtype-limited positions, dropout 1, a symbolic batch. Each compiled output is compared with eager
SDPA (the oracle) and the report must show the expected decision (CPU, reference executor, aot_eager)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import te_fx

OPTIONS = {"executor": "reference", "inner": "aot_eager"}
ATOL = RTOL = 1e-5


def _causal(s: int) -> torch.Tensor:
    idx = torch.arange(s)
    return idx[None, :] <= idx[:, None]


def _compile_and_compare(fn, *args, dynamic=None) -> list[dict]:
    """Compile ``fn``, check it against eager on fresh copies of ``args``, and return the report."""
    torch._dynamo.reset()
    te_fx.reset_compile_report()
    expected = fn(*(a.clone() for a in args))
    compiled = torch.compile(fn, backend="te_attn", options=OPTIONS, fullgraph=True, dynamic=dynamic)
    torch.testing.assert_close(compiled(*(a.clone() for a in args)), expected, atol=ATOL, rtol=RTOL)
    return te_fx.compile_report()


def _qkv(batch=2, heads=2, seq=8, dim=16, kv_heads=None):
    torch.manual_seed(0)
    return (torch.randn(batch, heads, seq, dim), torch.randn(batch, kv_heads or heads, seq, dim),
            torch.randn(batch, kv_heads or heads, seq, dim))  # fmt: skip


def test_mask_edited_in_place_after_it_was_built_stays_on_sdpa():
    def prefix_lm(q, k, v):  # causal, then a bidirectional prefix written in place
        mask = _causal(q.shape[2])[None, None].repeat(q.shape[0], 1, 1, 1)
        mask[:, :, :, :3] = True
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def prefix_lm_masked_fill(q, k, v):
        mask = _causal(q.shape[2])[None, None].clone()
        mask.masked_fill_((torch.arange(q.shape[2]) < 3)[None, :], True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    for fn in (prefix_lm, prefix_lm_masked_fill):
        (entry,) = _compile_and_compare(fn, *_qkv())
        assert (
            entry["decision"] == "sdpa" and entry["reason"] == "fallback_mask" and "written in place" in entry["detail"]
        ), entry


def test_mask_written_by_an_aten_overload_stays_on_sdpa():
    def aten_fill(q, k, v):
        mask = _causal(q.shape[2])[None, None].clone()
        torch.ops.aten.fill_.Scalar(mask[:, :, :, :2], True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    (entry,) = _compile_and_compare(aten_fill, *_qkv())
    assert (
        entry["decision"] == "sdpa" and entry["reason"] == "fallback_mask" and "written in place" in entry["detail"]
    ), entry


def test_padding_input_written_in_place_stays_on_sdpa():
    pad = torch.tensor([[1] * 8, [0, 0] + [1] * 6])

    def edited_padding(q, k, v, attention_mask):
        keep = attention_mask.bool()
        keep[:, 0] = True
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=_causal(q.shape[2])[None, None] & keep[:, None, None, :]
        )

    def cleared_after_use(q, k, v, attention_mask):
        mask = _causal(q.shape[2])[None, None] & attention_mask[:, None, None, :].bool()
        attention_mask.zero_()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def foreach_cleared(q, k, v, attention_mask):
        mask = _causal(q.shape[2])[None, None] & attention_mask[:, None, None, :].bool()
        torch._foreach_mul_([attention_mask], 0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    for fn in (edited_padding, cleared_after_use, foreach_cleared):
        (entry,) = _compile_and_compare(fn, *_qkv(), pad)
        assert (
            entry["decision"] == "sdpa" and entry["reason"] == "fallback_mask" and "written in place" in entry["detail"]
        ), entry


def test_repeat_kv_source_written_after_the_copy_is_not_elided():
    def repeat_then_scale(q, k, v):
        b, kv, s, d = k.shape
        k_rep = k[:, :, None].expand(b, kv, 2, s, d).reshape(b, kv * 2, s, d)
        v_rep = v[:, :, None].expand(b, kv, 2, s, d).reshape(b, kv * 2, s, d)
        k.mul_(3.0)
        return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)

    (entry,) = _compile_and_compare(repeat_then_scale, *_qkv(heads=4, kv_heads=2))
    assert entry["decision"] == "te" and entry["num_kv_heads"] == 4, entry  # rewritten on the repeated copies


def test_reshape_of_an_expand_that_is_not_repeat_kv_is_not_elided():
    def other_reshape(q, k, v):  # (B, KV, 3, S, D) read as S heads of KV * 3 positions: not HF's repeat_kv
        b, kv, s, d = k.shape
        k_rep = k[:, :, None].expand(b, kv, 3, s, d).reshape(b, s, kv * 3, d)
        v_rep = v[:, :, None].expand(b, kv, 3, s, d).reshape(b, s, kv * 3, d)
        return F.scaled_dot_product_attention(q, k_rep, v_rep, enable_gqa=True)

    torch.manual_seed(0)
    (entry,) = _compile_and_compare(other_reshape, torch.randn(1, 4, 5, 8), torch.randn(1, 2, 4, 8),
                                    torch.randn(1, 2, 4, 8))  # fmt: skip
    assert entry["num_kv_heads"] == 4, entry  # the reshaped tensors' own head count


def test_padding_mask_shared_over_the_batch_stays_on_sdpa():
    def shared(q, k, v, attention_mask):  # attention_mask (1, S) broadcast over a batch of 2
        mask = _causal(q.shape[2])[None, None] & attention_mask[:, None, None, :].bool()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    (entry,) = _compile_and_compare(shared, *_qkv(), torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]]))
    assert entry["decision"] == "sdpa" and entry["reason"] == "fallback_mask" and "batch" in entry["detail"], entry


def test_window_from_a_dynamic_integer_stays_on_sdpa():
    def windowed(q, k, v, window: int):
        idx = torch.arange(q.shape[2])
        mask = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])

    torch._dynamo.reset()
    te_fx.reset_compile_report()
    compiled = torch.compile(windowed, backend="te_attn", options=OPTIONS, fullgraph=True)
    for seq, window in ((8, 16), (9, 20), (20, 3), (32, 8)):  # the second call compiles a dynamic graph
        q, k, v = _qkv(seq=seq)
        torch.testing.assert_close(compiled(q, k, v, window), windowed(q, k, v, window), atol=ATOL, rtol=RTOL)
    dynamic = te_fx.compile_report()[-1]
    assert (
        dynamic["decision"] == "sdpa"
        and dynamic["reason"] == "fallback_mask"
        and "dynamic integer" in dynamic["detail"]
    ), dynamic


def test_float_window_constant_is_sampled_beyond():
    def windowed(q, k, v):
        idx = torch.arange(q.shape[2])
        distance = idx[:, None] - idx[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=((distance >= 0) & (distance < 50.0))[None, None])

    torch._dynamo.reset()
    te_fx.reset_compile_report()
    compiled = torch.compile(windowed, backend="te_attn", options=OPTIONS, fullgraph=True)
    for seq in (16, 20, 64):  # the second call compiles a dynamic graph, which the third reuses
        q, k, v = _qkv(seq=seq)
        torch.testing.assert_close(compiled(q, k, v), windowed(q, k, v), atol=ATOL, rtol=RTOL)
    dynamic = te_fx.compile_report()[-1]
    assert dynamic["decision"] == "te" and dynamic["window_size"] == (49, 0), dynamic


def test_positions_in_a_low_precision_float_stay_on_sdpa():
    def bf16_positions(q, k, v):  # exact up to 256 positions only
        pos = torch.arange(q.shape[2], dtype=torch.bfloat16)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(pos[None, :] <= pos[:, None])[None, None])

    (entry,) = _compile_and_compare(bf16_positions, *_qkv(seq=300, batch=1, dim=8))
    assert entry["decision"] == "sdpa" and entry["reason"] == "fallback_mask" and "floating-point" in entry["detail"], (
        entry
    )


def test_dropout_of_one_stays_on_sdpa():
    def all_dropped(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=1.0, is_causal=True)

    (entry,) = _compile_and_compare(all_dropped, *_qkv())
    assert entry["decision"] == "sdpa" and entry["reason"] == "fallback_dropout" and "dropout_p" in entry["detail"], (
        entry
    )


def test_symbolic_batch_with_a_batch_free_mask_compiles():
    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal(q.shape[2])[None, None])

    torch._dynamo.reset()
    te_fx.reset_compile_report()
    compiled = torch.compile(causal, backend="te_attn", options=OPTIONS, fullgraph=True)
    for batch in (2, 3):  # the second call recompiles with a symbolic batch
        q, k, v = _qkv(batch=batch)
        torch.testing.assert_close(compiled(q, k, v), causal(q, k, v), atol=ATOL, rtol=RTOL)
    assert [e["decision"] for e in te_fx.compile_report()] == ["te", "te"]


def _compile_over(fn, shapes) -> list[dict]:
    """Compile ``fn`` and compare it with eager at each (batch, seq): the second shape compiles a dynamic graph,
    which the later ones reuse. Returns the report."""
    torch._dynamo.reset()
    te_fx.reset_compile_report()
    compiled = torch.compile(fn, backend="te_attn", options=OPTIONS, fullgraph=True)
    for batch, seq in shapes:
        q, k, v = _qkv(batch=batch, seq=seq, dim=8)
        torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), atol=ATOL, rtol=RTOL, msg=f"B{batch} S{seq}")
    return te_fx.compile_report()


def test_spans_hidden_in_shifts_reciprocals_or_narrow_integers_are_checked():
    """64-token chunks written as a shift or a reciprocal, and uint8 positions (wrapping at 256), are plain causal
    at every length up to 2 * 6 + 3: a dynamic graph must not carry that decision to 300 tokens."""

    def chunks_by_shift(q, k, v):
        idx = torch.arange(q.shape[2])
        block = idx >> 6
        mask = (idx[None, :] <= idx[:, None]) & (block[None, :] == block[:, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])

    def chunks_by_reciprocal(q, k, v):
        idx = torch.arange(q.shape[2])
        block = (idx * (1.0 / 64)).floor()
        mask = (idx[None, :] <= idx[:, None]) & (block[None, :] == block[:, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])

    def uint8_positions(q, k, v):
        idx = torch.arange(q.shape[2]).to(torch.uint8)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(idx[None, :] <= idx[:, None])[None, None])

    for fn in (chunks_by_shift, chunks_by_reciprocal, uint8_positions):
        report = _compile_over(fn, [(1, 16), (1, 20), (1, 300)])
        assert all(e["decision"] == "sdpa" for e in report[1:]), (fn.__name__, report)
    assert report[-1]["reason"] == "fallback_mask" and "narrower than 32 bits" in report[-1]["detail"]


def test_batch_rows_beyond_the_sampled_ones_are_checked():
    def rows_from_three_on_see_everything(q, k, v):
        idx, rows = torch.arange(q.shape[2]), torch.arange(q.shape[0])
        mask = (idx[None, :] <= idx[:, None])[None, None] | (rows >= 3)[:, None, None, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    report = _compile_over(rows_from_three_on_see_everything, [(2, 8), (3, 8), (5, 8)])
    assert report[-1]["decision"] == "sdpa", report


def test_a_key_mask_that_also_drops_a_token_id_stays_on_sdpa():
    """``causal & (ids != 0) & (ids != SEP)`` is not key padding on ``ids != 0``: separator keys must stay hidden
    (taken as padding_causal, the output would differ)."""
    sep = 5

    def drop_padding_and_separators(q, k, v, ids):
        keep = (ids != 0) & (ids != sep)
        mask = _causal(q.shape[2])[None, None] & keep[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    ids = torch.randint(6, 16, (2, 8), generator=torch.Generator().manual_seed(0))
    ids[:, 4], ids[0, 6:] = sep, 0
    (entry,) = _compile_and_compare(drop_padding_and_separators, *_qkv(), ids)
    assert (
        entry["decision"] == "sdpa"
        and entry["reason"] == "fallback_mask"
        and "other than key padding" in entry["detail"]
    ), entry


def test_kv_batch_broadcast_over_the_queries_stays_on_sdpa():
    def shared_memory(q, k, v, attention_mask):
        mask = _causal(q.shape[2])[None, None] & attention_mask[:, None, None, :].bool()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, _, _ = _qkv(batch=3)
    _, k, v = _qkv(batch=1)
    attention_mask = torch.ones(3, 8, dtype=torch.long)
    attention_mask[0, 6:] = 0
    (entry,) = _compile_and_compare(shared_memory, q, k, v, attention_mask)
    assert entry["decision"] == "sdpa" and entry["reason"] == "fallback_layout" and "K/V batch" in entry["detail"], (
        entry
    )


def test_output_viewed_as_sdpa_laid_it_out():
    """SDPA's output on contiguous (B, H, S, D) inputs is contiguous, and a user may ``.view`` it; the op's output,
    a transposed (B, S, H, D) tensor, is made contiguous there (the compile crashed before)."""

    def viewed(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.view(out.shape[0], out.shape[1], -1)

    (entry,) = _compile_and_compare(viewed, *_qkv())
    assert entry["decision"] == "te", entry


def test_a_top_left_causal_mask_is_not_taken_for_bottom_right_when_lengths_differ():
    """SDPA's documented explicit mask, ``ones(L, S).tril()``, is aligned top-left; a dynamic graph with separate
    query and key lengths must not become TE's bottom-right causal."""

    def top_left(q, k, v):
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])

    torch._dynamo.reset()
    te_fx.reset_compile_report()
    compiled = torch.compile(top_left, backend="te_attn", options=OPTIONS, fullgraph=True)
    generator = torch.Generator().manual_seed(0)
    for q_len, kv_len in ((8, 8), (12, 12), (5, 9)):
        q = torch.randn(1, 2, q_len, 8, generator=generator)
        k, v = (torch.randn(1, 2, kv_len, 8, generator=generator) for _ in range(2))
        torch.testing.assert_close(compiled(q, k, v), top_left(q, k, v), atol=ATOL, rtol=RTOL)
    assert te_fx.compile_report()[-1]["decision"] == "sdpa"


def test_chained_divisions_multiply_the_span():
    """``idx // 40 // 40`` has 1600-token chunks, though no constant is above 40."""

    def chunks(q, k, v):
        idx = torch.arange(q.shape[2])
        chunk = idx // 40 // 40
        mask = (idx[None, :] <= idx[:, None]) & (chunk[None, :] == chunk[:, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])

    report = _compile_over(chunks, [(1, 16), (1, 20), (1, 1700)])
    assert report[-1]["decision"] == "sdpa", report


def test_storage_read_after_the_transpose_back_sees_sdpa_layout():
    """``as_strided`` reads storage: the op's output gets the layout SDPA's traced output had."""

    def flat_storage(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        return torch.as_strided(out, (out.numel(),), (1,))

    (entry,) = _compile_and_compare(flat_storage, *_qkv())
    assert entry["decision"] == "te", entry


def test_a_mask_too_large_to_sample_stays_on_sdpa(monkeypatch):
    """A large static batch times the lengths a window must be checked at (2 * window + 3) could exhaust memory at
    compile time: such a mask stays on SDPA instead (the limit is lowered here to keep the test small)."""
    from te_fx.compile import mask_subgraph

    monkeypatch.setattr(mask_subgraph, "_MAX_SAMPLE_ELEMENTS", 20_000)

    def padded_window(q, k, v, attention_mask):
        idx = torch.arange(q.shape[2])
        distance = idx[:, None] - idx[None, :]
        mask = ((distance >= 0) & (distance < 50))[None, None] & attention_mask[:, None, None, :].bool()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    torch._dynamo.reset()
    te_fx.reset_compile_report()
    compiled = torch.compile(padded_window, backend="te_attn", options=OPTIONS, fullgraph=True)
    for seq in (16, 20):  # the second call compiles the dynamic graph: 4 * 103 * 103 elements at length 103
        q, k, v = _qkv(batch=4, seq=seq)
        attention_mask = torch.ones(4, seq, dtype=torch.long)
        torch.testing.assert_close(compiled(q, k, v, attention_mask), padded_window(q, k, v, attention_mask),
                                   atol=ATOL, rtol=RTOL)  # fmt: skip
    last = te_fx.compile_report()[-1]
    assert last["reason"] == "fallback_mask" and "too large to evaluate" in last["detail"], last


def _write_through(view):
    """A causal mask written in place through ``view`` (a function of the (S, S) mask returning a view to fill)."""

    def attend(q, k, v):
        mask = _causal(q.shape[2]).to(torch.uint8)
        view(mask).fill_(1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None].bool())

    return attend


ALIASING_VIEWS = {
    "ravel": lambda m: m.ravel()[1:3],
    "broadcast_to": lambda m: m.broadcast_to(m.shape)[0, 1:3],
    "hsplit": lambda m: torch.hsplit(m, 2)[1][:2],
    "vsplit": lambda m: torch.vsplit(m, 2)[0][:, -1],
    "unsafe_split": lambda m: m.unsafe_split(4, dim=1)[1][0],
    "unsafe_split_by_size": lambda m: m.unsafe_split(m.shape[1] // 2, dim=1)[1][0],
    "mH": lambda m: m.mH[5, 0:2],
    "adjoint": lambda m: m.adjoint()[5, 0:2],
    "conj": lambda m: m.conj()[0, 1:3],
    "atleast_3d": lambda m: torch.atleast_3d(m)[0, 1:3],
    "view_as": lambda m: m.view_as(m)[0, 1:3],
}


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", list(ALIASING_VIEWS))
def test_a_mask_written_through_any_view_stays_on_sdpa(name, dynamic):
    """An in-place write through a view of the mask (whatever op made the view) makes the mask one the pass cannot
    evaluate from its subgraph: the call stays on SDPA, and the output equals the stock backend's (eager's, except
    for ``unsafe_split``, whose views PyTorch's functionalization does not track)."""
    attend, qkv = _write_through(ALIASING_VIEWS[name]), _qkv()
    for tensor in qkv if dynamic else ():  # a symbolic sequence length, as automatic dynamic gives it
        torch._dynamo.mark_dynamic(tensor, 2)
    torch._dynamo.reset()
    te_fx.reset_compile_report()
    stock = torch.compile(attend, backend="aot_eager", fullgraph=True)(*qkv)
    if not name.startswith("unsafe_split"):
        torch.testing.assert_close(stock, attend(*qkv))
    torch._dynamo.reset()
    out = torch.compile(attend, backend="te_attn", options=OPTIONS, fullgraph=True)(*qkv)
    torch.testing.assert_close(out, stock, atol=ATOL, rtol=RTOL)
    (entry,) = te_fx.compile_report()
    assert entry["decision"] == "sdpa" and entry["reason"] == "fallback_mask", entry


def _one_query(q, k, v, keep, offset):
    """A decode call whose mask row comes from a subgraph the classifier cannot prove (a position counter, here a
    second input, indexes the padding input, as a sliding layer's rolling cache does)."""
    positions = torch.arange(k.shape[2]) + offset
    mask = keep[:, positions % keep.shape[1]].bool()[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("rows", ["padding", "random", "an empty row"])
def test_one_query_runs_its_mask_row_as_key_padding_whatever_built_it(rows):
    """One query sees exactly the keys its bool mask's row shows: the call runs te_fx's op with that row as key
    padding (SDPA's numbers, a row that sees nothing included), for masks whose subgraph is not understood."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 1, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    keep = {"padding": torch.tensor([[0] * 4 + [1] * 8, [1] * 12, [0] * 2 + [1] * 10]),
            "random": (torch.rand(3, 12) < 0.5).long(),
            "an empty row": torch.tensor([[0] * 12, [1] * 12, [1, 0] * 6])}[rows]  # fmt: skip
    with torch.no_grad():
        entries = _compile_and_compare(_one_query, q, k, v, keep, torch.tensor(5))
    assert [(e["decision"], e["mask_kind"]) for e in entries] == [("te", "padding")], entries


@pytest.mark.parametrize("change", ["per-head mask", "float mask", "training"])
def test_one_query_mask_rows_the_op_cannot_take_stay_on_sdpa(change):
    """A mask that differs between heads, an additive float mask (its values are not read at compile time) and a
    call with autograd (te_fx's key padding route under a KV cache is inference-only) stay on SDPA, counted."""

    def one_query(q, k, v, keep):
        mask = keep[:, None, None, :].expand(-1, q.shape[1], 1, -1).clone()
        if change == "per-head mask":
            mask[:, 0] = True
        if change == "float mask":
            mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 16, requires_grad=change == "training") for n in (1, 6, 6))
    keep = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1]]).bool()
    with torch.set_grad_enabled(change == "training"):
        (entry,) = _compile_and_compare(one_query, q, k, v, keep)
    assert entry["decision"] == "sdpa" and entry["reason"] == "fallback_mask", entry
