"""Kernel-level benchmark: one attention call, every way a user could run it, on HF's input layout.

Columns (variants): te_fx's eager replacement of SDPA (also inside TE's FP8 autocast with FP8 attention, for bf16
causal cases), te_fx's custom op (what compiled graphs run), TE's
``DotProductAttention`` called directly, SDPA as HF calls it in eager mode, SDPA with each backend forced, and SDPA
with the bool mask and repeated K/V that HF materialises under torch.compile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from te_fx import ops
from te_fx.core.masks import cached_decisions
from te_fx.executors.reference import ReferenceDotProductAttention, reference_attention
from te_fx.te_attention import _make_te_sdpa

from .timing import median_ms

__all__ = ["Case", "VARIANTS", "run_case", "quick_cases", "full_cases", "smoke_cases", "add_ratios", "flops"]

TE_FX_VARIANTS = ("te_fx eager", "te_fx eager fp8", "te_fx op")
SDPA_BACKENDS = {
    "sdpa cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa flash": SDPBackend.FLASH_ATTENTION,
    "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa math": SDPBackend.MATH,
}
VARIANTS = (*TE_FX_VARIANTS, "TE DotProductAttention", "sdpa default", *SDPA_BACKENDS, "sdpa HF compile mask")


@dataclass(frozen=True)
class Case:
    """One attention shape: ``kind`` is causal | sliding | padded | decode (q_len 1 against a KV cache)."""

    family: str
    kind: str
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    window: int | None = None

    @property
    def name(self) -> str:
        window = f" w{self.window}" if self.window else ""
        return (
            f"{self.family} {self.kind}{window} B{self.batch} S{self.seq} H{self.heads}/{self.kv_heads} "
            f"D{self.head_dim}"
        )

    @property
    def q_len(self) -> int:
        return 1 if self.kind == "decode" else self.seq

    def te_mask(self) -> tuple[str, tuple[int, int]]:
        """The TE mask type and window of this case (padded rows come from :meth:`key_padding`)."""
        if self.kind == "decode":
            return "no_mask", (-1, -1)
        return "causal", ((self.window - 1, 0) if self.window else (-1, 0))

    def key_padding(self, device: torch.device) -> torch.Tensor | None:
        """Right padding for the padded case: row b keeps seq - b * seq // (2 * batch) tokens."""
        if self.kind != "padded":
            return None
        keep = torch.ones(self.batch, self.seq, dtype=torch.long, device=device)
        for b in range(self.batch):
            keep[b, self.seq - b * self.seq // (2 * self.batch) :] = 0
        return keep

    def visible_pairs(self) -> int:
        """(query, key) pairs attended per head over the batch: the work of a kernel that skips masked blocks."""
        if self.kind == "decode":
            return self.batch * self.seq
        if self.kind == "padded":
            lengths = self.key_padding(torch.device("cpu")).sum(dim=1).tolist()
            return sum(n * (n + 1) // 2 for n in lengths)
        w = self.window or self.seq
        per_row = sum(min(i + 1, w) for i in range(self.seq))
        return self.batch * per_row


def flops(case: Case, backward: bool) -> float:
    """Matmul FLOPs: 2 products of 2 * D per visible pair forward; the backward does 2.5x the forward."""
    forward = 4 * case.heads * case.head_dim * case.visible_pairs()
    return forward * (3.5 if backward else 1.0)


def _hf_eager_mask(case: Case, device: torch.device) -> torch.Tensor | None:
    """The 4D bool mask HF passes to SDPA in eager mode (None when it relies on is_causal)."""
    keep = case.key_padding(device)
    if case.kind in ("causal", "decode") or (case.kind == "sliding" and case.seq <= case.window):
        return None
    return _hf_compile_mask(case, device, keep)


def _hf_compile_mask(case: Case, device: torch.device, keep: torch.Tensor | None) -> torch.Tensor:
    q_idx = torch.arange(case.q_len, device=device)[:, None] + (case.seq - case.q_len)
    kv_idx = torch.arange(case.seq, device=device)[None, :]
    visible = kv_idx <= q_idx
    if case.window:
        visible &= kv_idx > q_idx - case.window
    mask = visible[None, None]
    if keep is not None:
        mask = mask & keep.bool()[:, None, None, :]
    return mask.expand(case.batch, 1, case.q_len, case.seq)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class KernelBench:
    """Builds the inputs of one case and a callable per variant (None where the variant cannot run it)."""

    def __init__(self, case: Case, device: torch.device, dtype: torch.dtype, executor: str, backward: bool):
        self.case, self.device, self.dtype, self.executor, self.backward = case, device, dtype, executor, backward
        self.scale = case.head_dim**-0.5
        make = lambda s, h: torch.randn(  # noqa: E731
            case.batch, s, h, case.head_dim, device=device, dtype=dtype, requires_grad=backward
        )
        self.leaves = (make(case.q_len, case.heads), make(case.seq, case.kv_heads), make(case.seq, case.kv_heads))
        self.grad = torch.randn(case.batch, case.q_len, case.heads, case.head_dim, device=device, dtype=dtype)
        self.keep = case.key_padding(device)
        self.eager_mask = _hf_eager_mask(case, device)
        self.compile_mask = _hf_compile_mask(case, device, self.keep)
        mask_type, window = case.te_mask()
        self.te_module = self._te_module(mask_type, window)
        self.te_sdpa = _make_te_sdpa(self.te_module, case.heads, case.kv_heads, F.scaled_dot_product_attention,
                                     window, self.scale)  # fmt: skip

    def _te_module(self, mask_type: str, window: tuple[int, int]) -> torch.nn.Module:
        if self.executor == "reference":
            return ReferenceDotProductAttention(self.case.heads, self.case.head_dim, self.case.kv_heads,
                                                window_size=window, softmax_scale=self.scale)  # fmt: skip
        from te_fx.te_attention import _create_te_dot_product_attention

        return _create_te_dot_product_attention(self.case.heads, self.case.kv_heads, self.case.head_dim, window,
                                                self.scale)  # fmt: skip

    def _bhsd(self) -> tuple[torch.Tensor, ...]:
        return tuple(t.transpose(1, 2) for t in self.leaves)

    def _sdpa_eager_args(self) -> tuple[tuple, dict]:
        q, k, v = self._bhsd()
        gqa = self.case.kv_heads != self.case.heads
        if self.eager_mask is None:  # HF: enable_gqa when there is no mask
            return (q, k, v), dict(is_causal=self.case.q_len > 1, scale=self.scale, enable_gqa=gqa)
        n_rep = self.case.heads // self.case.kv_heads
        return (q, _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)), dict(attn_mask=self.eager_mask, scale=self.scale)

    def forward(self, variant: str) -> torch.Tensor | None:
        """The variant's output as (B, S, H, D), or None if it cannot run this case."""
        case = self.case
        mask_type, window = case.te_mask()
        if variant == "te_fx eager":
            args, kwargs = self._sdpa_eager_args()
            return self.te_sdpa(*args, **kwargs).transpose(1, 2)
        if variant == "te_fx eager fp8":
            if self.executor != "te" or self.dtype != torch.bfloat16 or case.kind != "causal":
                return None
            import transformer_engine.pytorch as te
            from transformer_engine.common.recipe import DelayedScaling

            args, kwargs = self._sdpa_eager_args()
            with te.autocast(enabled=True, recipe=DelayedScaling(fp8_dpa=True)):
                return self.te_sdpa(*args, **kwargs).transpose(1, 2)
        if variant == "te_fx op":
            return ops.attention(*self.leaves, mask_type=mask_type, window_size=window, softmax_scale=self.scale,
                                 key_padding_mask=self.keep, executor=self.executor)  # fmt: skip
        if variant == "TE DotProductAttention":
            return self._te_direct(mask_type, window)
        if variant == "sdpa default":
            args, kwargs = self._sdpa_eager_args()
            return F.scaled_dot_product_attention(*args, **kwargs).transpose(1, 2)
        if variant in SDPA_BACKENDS:
            if variant == "sdpa math" and case.batch * case.heads * case.q_len * case.seq > 2**30:
                return None  # the math backend materialises the score matrix: not feasible at this size
            args, kwargs = self._sdpa_eager_args()
            with sdpa_kernel(SDPA_BACKENDS[variant]):
                return F.scaled_dot_product_attention(*args, **kwargs).transpose(1, 2)
        if variant == "sdpa HF compile mask":
            q, k, v = self._bhsd()
            n_rep = case.heads // case.kv_heads
            out = F.scaled_dot_product_attention(q, _repeat_kv(k, n_rep), _repeat_kv(v, n_rep),
                                                 attn_mask=self.compile_mask, scale=self.scale)  # fmt: skip
            return out.transpose(1, 2)
        raise ValueError(f"unknown variant {variant!r}")

    def _te_direct(self, mask_type: str, window: tuple[int, int]) -> torch.Tensor | None:
        if self.executor != "te":
            return None
        import transformer_engine.pytorch as te

        module = getattr(self, "_plain_te", None)
        if module is None:
            module = self._plain_te = te.DotProductAttention(
                self.case.heads, self.case.head_dim, num_gqa_groups=self.case.kv_heads, qkv_format="bshd",
                attn_mask_type=mask_type, window_size=window, softmax_scale=self.scale,
            )  # fmt: skip
        q, k, v = (t.contiguous() for t in self.leaves)
        if self.keep is None:
            out = module(q, k, v, attn_mask_type=mask_type, window_size=window)
        else:
            out = module(q, k, v, attention_mask=~self.keep.bool()[:, None, None, :], attn_mask_type="padding_causal")
        return out.view(*q.shape[:3], -1)

    def step(self, variant: str) -> Callable[[], None] | None:
        """A timed call: forward, plus backward when benchmarking fwd+bwd; None when the variant cannot run."""
        try:
            out = self.forward(variant)
        except Exception:  # noqa: BLE001 - a backend that rejects this case is reported as n/a, not a crash
            return None
        if out is None:
            return None

        def run() -> None:
            result = self.forward(variant)
            if self.backward:
                result.backward(self.grad)

        return run

    def error(self, variant: str, rows: int = 1024) -> dict[str, float] | None:
        """Max and relative error of the variant's forward against float64 on a slice: batch 0, query head 0
        (KV head 0), the last ``rows`` queries (valid ones only for padded cases)."""
        try:
            with torch.no_grad():
                out = self.forward(variant)
        except Exception:  # noqa: BLE001 - see step()
            return None
        if out is None:
            return None
        q, k, v = (t.detach()[:1, :, :1].double() for t in self.leaves)
        mask_type, window = self.case.te_mask()
        out = out[:1, :, :1].double()
        if self.keep is not None:  # key padding needs every row: the padded cases are short
            ref = ops.attention(q, k, v, mask_type=mask_type, window_size=window, softmax_scale=self.scale,
                                key_padding_mask=self.keep[:1], executor="reference")  # fmt: skip
            valid = self.keep[0].bool()
            ref, out = ref[:, valid], out[:, valid]
        else:
            if q.shape[1] > rows:  # the last rows of a causal pattern are its bottom-right aligned version
                q, out = q[:, -rows:], out[:, -rows:]
                mask_type = "causal_bottom_right" if mask_type == "causal" else mask_type
            ref = reference_attention(q, k, v, mask_type=mask_type, window_size=window, softmax_scale=self.scale)
        diff = out - ref
        return {"max_abs": diff.abs().max().item(), "rel": (diff.norm() / ref.norm()).item()}


def run_case(case: Case, device: torch.device, dtype: torch.dtype, executor: str, reps: int) -> list[dict]:
    """Rows of results for one case: a row per (mode, variant) with ms, TFLOP/s and, for te_fx, errors."""
    rows = []
    for backward in (False, True):
        bench = KernelBench(case, device, dtype, executor, backward)
        mode = "fwd+bwd" if backward else "fwd"
        for variant in VARIANTS:
            step = bench.step(variant)
            fallbacks = _eager_fallbacks(bench, variant) if step and variant.startswith("te_fx eager") else None
            if variant == "te_fx eager fp8" and fallbacks and "te_hits" not in fallbacks:
                step = None  # SDPA would run, not TE's FP8 attention: no figure for this column
            # te_fx's eager path classifies a mask once per model forward: time it as a layer inside one
            with cached_decisions() if variant.startswith("te_fx eager") else contextlib.nullcontext():
                ms = None if step is None else median_ms(step, device, warmup=3, reps=reps)
            row = {"case": case.name, **asdict(case), "mode": mode, "variant": variant, "ms": ms,
                   "dtype": str(dtype).removeprefix("torch."),
                   "tflops": None if ms is None else flops(case, backward) / (ms * 1e-3) / 1e12}  # fmt: skip
            if variant in TE_FX_VARIANTS and not backward and ms is not None:
                row["error"] = bench.error(variant)
            if fallbacks is not None:
                row["te_fx_fallbacks"] = fallbacks
            rows.append(row)
        del bench
    return rows


def _eager_fallbacks(bench: KernelBench, variant: str) -> dict[str, int]:
    """What te_fx's eager path did with this case's call (te_hits or a fallback reason)."""
    from te_fx import get_te_attention_stats, reset_te_attention_stats

    reset_te_attention_stats()
    with torch.no_grad():
        bench.forward(variant)
    return {key: n for key, n in get_te_attention_stats().items() if n}


def quick_cases() -> list[Case]:
    """Cases of the quick profile: every target's shape plus one shape per family."""
    return [
        Case("tiny", "causal", 1, 128, 8, 8, 64),
        Case("llama3-8b", "causal", 2, 2048, 32, 8, 128),
        Case("llama3-8b", "causal", 2, 4096, 32, 8, 128),
        Case("llama3-8b", "causal", 1, 8192, 32, 8, 128),
        Case("llama3-8b", "causal", 1, 16384, 32, 8, 128),
        Case("llama3-8b", "sliding", 1, 8192, 32, 8, 128, window=1024),
        Case("qwen2-7b", "causal", 2, 4096, 28, 4, 128),
        Case("gemma3", "causal", 2, 4096, 8, 4, 256),
        Case("mistral", "sliding", 1, 16384, 32, 8, 128, window=4096),
        Case("llama3-8b", "padded", 4, 2048, 32, 8, 128),
        Case("llama3-8b", "decode", 8, 4096, 32, 8, 128),
        Case("mha", "causal", 4, 2048, 16, 16, 64),
    ]


def full_cases() -> list[Case]:
    """Every family over S from 128 to 32768 (batch keeps about 16K tokens per call)."""
    cases = [Case("tiny", "causal", 1, 128, 8, 8, 64)]
    for seq in (128, 512, 2048, 4096, 8192, 16384, 32768):
        batch = max(1, min(16, 16384 // seq))
        cases += [
            Case("llama3-8b", "causal", batch, seq, 32, 8, 128),
            Case("qwen2-7b", "causal", batch, seq, 28, 4, 128),
            Case("gemma3", "causal", batch, seq, 8, 4, 256),
            Case("mha", "causal", batch, seq, 16, 16, 64),
            Case("llama3-8b", "padded", max(2, batch), seq, 32, 8, 128),
            Case("llama3-8b", "decode", 8, seq, 32, 8, 128),
        ]
        if seq > 1024:
            cases.append(Case("llama3-8b", "sliding", batch, seq, 32, 8, 128, window=1024))
        if seq > 4096:
            cases.append(Case("mistral", "sliding", batch, seq, 32, 8, 128, window=4096))
    return cases


def smoke_cases() -> list[Case]:
    """Tiny shapes for the CPU (CI): every kind once."""
    return [
        Case("tiny", "causal", 1, 32, 4, 2, 16),
        Case("tiny", "sliding", 1, 32, 4, 2, 16, window=8),
        Case("tiny", "padded", 2, 16, 4, 2, 16),
        Case("tiny", "decode", 2, 16, 4, 2, 16),
    ]


def best_alternative_ms(rows: list[dict], case: str, mode: str, dtype: str) -> float | None:
    """The fastest non-te_fx variant for a case, mode and dtype."""
    times = [r["ms"] for r in rows if r["case"] == case and r["mode"] == mode and r["dtype"] == dtype
             and r["variant"] not in TE_FX_VARIANTS and r["ms"] is not None]  # fmt: skip
    return min(times) if times else None


def add_ratios(rows: list[dict], peak_tflops: float | None) -> None:
    """Fill in each row's fraction of the matmul peak and, for te_fx rows, the ratio best alternative / te_fx."""
    for row in rows:
        row["peak_fraction"] = None if peak_tflops is None or row["tflops"] is None else row["tflops"] / peak_tflops
        if row["variant"] in TE_FX_VARIANTS and row["ms"]:
            best = best_alternative_ms(rows, row["case"], row["mode"], row["dtype"])
            row["speedup_vs_best"] = None if best is None else best / row["ms"]
