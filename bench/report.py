"""The benchmark's outputs: JSON, a Markdown report with the targets, and PNG plots (matplotlib)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

from .kernels import TE_FX_VARIANTS, VARIANTS

__all__ = ["evaluate_targets", "write_report", "finish", "plots_available"]


def side_by_side_arguments(doc: str, argv: list[str] | None, cases: bool = False) -> argparse.Namespace:
    """The options of the side-by-side scripts (``bench.eager_batches``, ``bench.hf_backend``,
    ``bench.compile_batches``); ``cases``: also ``--cases``, the case numbers to run."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--small", action="store_true", help="shrink every case (a CPU run takes seconds)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    if cases:
        parser.add_argument("--cases", type=int, nargs="+", help="only these case numbers")
    return parser.parse_args(argv)


def versions_line(results: dict, *extra: str) -> str:
    """The side-by-side scripts' first line: device, versions, executor, then ``extra``."""
    return "  ".join([
        f"device: {results['device']}", f"torch {results['torch']}", f"transformers {results['transformers']}",
        f"TE {results['transformer_engine']}", f"executor {results['executor']}", *extra,
    ])  # fmt: skip


def variant_lines(case: dict, width: int, keys: tuple[str, ...] | None = None) -> list[str]:
    """One line per variant of a case's results: its ms and the rest of its entry (only ``keys``, where given)."""
    lines = []
    for variant, v in case.items():
        if isinstance(v, dict) and "ms" in v:
            shown = [k for k in (keys or v) if k in v and k != "ms"]
            extra = {k: round(v[k], 4) if isinstance(v[k], float) else v[k] for k in shown}
            lines.append(f"    {variant:<{width}} {v['ms']:9.2f} ms  {extra}")
    return lines


def finish(results: dict, targets: list[tuple[str, bool, str]], json_path: str | None) -> None:
    """Print a script's targets as PASS / FAIL lines, store them in ``results`` and write it as JSON if asked."""
    for label, ok, detail in targets:
        print(f"{'PASS' if ok else 'FAIL'}: {label} ({detail})")
    results["targets"] = {label: {"pass": ok, "detail": detail} for label, ok, detail in targets}
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))


TARGET_DTYPE = "bfloat16"  # the targets are bf16 figures


def _rows(results: dict, **match: Any) -> list[dict]:
    return [r for r in results.get("kernels", []) if all(r.get(k) == v for k, v in match.items())]


def _dtypes(results: dict) -> list[str]:
    return list(dict.fromkeys(r["dtype"] for r in results.get("kernels", [])))


def _one_dtype(results: dict, dtype: str) -> dict:
    return {**results, "kernels": _rows(results, dtype=dtype)}


def _ms(results: dict, case: str, mode: str, variant: str) -> float | None:
    rows = _rows(results, case=case, mode=mode, variant=variant)
    return rows[0]["ms"] if rows else None


def _target(label: str, value: float | None, goal: float, higher_is_better: bool, unit: str = "x") -> dict:
    if value is None:
        return {"target": label, "pass": None, "value": None, "detail": "not measured in this run"}
    ok = value >= goal if higher_is_better else value <= goal
    miss = "" if ok else f", missed by {abs(value - goal) / goal:.0%}"
    return {"target": label, "pass": ok, "value": value, "detail": f"{value:.2f}{unit} (goal {goal}{unit}){miss}"}


def evaluate_targets(results: dict) -> list[dict]:
    """The issue's five targets, each PASS / FAIL with by how much (None where the run did not measure it)."""
    results = _one_dtype(results, TARGET_DTYPE)
    targets = []
    small = [r for r in _rows(results, family="tiny", kind="causal", seq=128, mode="fwd", variant="te_fx eager")]
    ratio = None
    if small and small[0]["ms"]:
        sdpa = _ms(results, small[0]["case"], "fwd", "sdpa default")
        ratio = small[0]["ms"] / sdpa if sdpa else None
    targets.append(_target("te_fx per-call time at B1 S128 H8 D64 within 1.5x of SDPA", ratio, 1.5, False))

    worst = None
    for row in _rows(results, kind="causal", mode="fwd+bwd", variant="te_fx eager"):
        if row["seq"] >= 2048 and row["kv_heads"] < row["heads"] and row["ms"]:
            sdpa = [
                r["ms"]
                for r in _rows(results, case=row["case"], mode="fwd+bwd")
                if r["variant"].startswith("sdpa") and r["variant"] != "sdpa HF compile mask" and r["ms"]
            ]
            if sdpa:
                worst = min(worst or float("inf"), min(sdpa) / row["ms"])
    targets.append(_target("te_fx at least as fast as the best SDPA backend, causal GQA S >= 2048 fwd+bwd",
                           worst, 1.0, True))  # fmt: skip

    sliding = _rows(results, kind="sliding", window=1024, seq=8192, mode="fwd+bwd", variant="te_fx eager")
    ratio = None
    if sliding and sliding[0]["ms"]:
        hf = _ms(results, sliding[0]["case"], "fwd+bwd", "sdpa default")
        ratio = hf / sliding[0]["ms"] if hf else None
    targets.append(_target("sliding window 1024, S 8192: >= 3.5x over SDPA with the mask HF passes", ratio, 3.5, True))

    step = None
    for name, variants in results.get("models", {}).items():
        if name.startswith("llama") and "inductor" in variants and "te_attn" in variants:
            step = variants["inductor"]["fwd_bwd_ms"] / variants["te_attn"]["fwd_bwd_ms"]
    targets.append(_target("compiled Llama-style training step (forward + backward, as in the compile issue) "
                           ">= 1.3x over Inductor", step, 1.3, True))  # fmt: skip

    fractions = [r["peak_fraction"] for r in _rows(results, kind="causal", mode="fwd", variant="te_fx eager")
                 if r["seq"] >= 4096 and r.get("peak_fraction")]  # fmt: skip
    best = max(fractions) if fractions else None
    targets.append(_target("attention forward at S >= 4096 reaching >= 70% of the bf16 matmul peak",
                           None if best is None else best * 100, 70, True, unit="%"))  # fmt: skip
    return targets


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _kernel_table(results: dict, mode: str) -> list[str]:
    cases = list(dict.fromkeys(r["case"] for r in _rows(results, mode=mode)))
    header = ["case", *VARIANTS, "te_fx eager vs best", "te_fx eager TFLOP/s", "te_fx rel err"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in cases:
        eager = _rows(results, case=case, mode=mode, variant="te_fx eager")[0]
        fwd_eager = _rows(results, case=case, mode="fwd", variant="te_fx eager")
        error = fwd_eager[0].get("error") if fwd_eager else None
        cells = [case, *(_fmt(_ms(results, case, mode, v)) for v in VARIANTS),
                 f"{_fmt(eager.get('speedup_vs_best'), 2)}x", _fmt(eager["tflops"], 0),
                 "n/a" if not error else f"{error['rel']:.1e}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _model_table(results: dict) -> list[str]:
    header = ["model", "variant", "fwd+bwd ms", "step ms", "tokens/s", "prefill ms", "peak GB", "warm-up s", "graphs",
              "te_fx"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, variants in results.get("models", {}).items():
        for variant, r in variants.items():
            summary = (
                r["te_fx_eager"] if variant == "eager te_fx" else (r["te_fx_compile"] if variant == "te_attn" else "")
            )
            lines.append(f"| {name} | {variant} | {_fmt(r['fwd_bwd_ms'], 1)} | {_fmt(r['step_ms'], 1)} | "
                         f"{r['tokens_per_s']:.0f} | "
                         f"{_fmt(r['prefill_ms'], 1)} | {_fmt(r['peak_gb'], 1)} | {r['warmup_s']:.1f} | "
                         f"{r['graphs_compiled']} | {summary} |")  # fmt: skip
    return lines


def plots_available() -> bool:
    """Whether matplotlib is there to draw the plots (the ``bench`` extra); without it the report has none."""
    return importlib.util.find_spec("matplotlib") is not None


def _plots(results: dict, out: Path) -> list[str]:
    if not plots_available():
        return []
    import matplotlib

    dtypes = _dtypes(results)
    results = _one_dtype(results, TARGET_DTYPE if TARGET_DTYPE in dtypes or not dtypes else dtypes[0])
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = [r for r in _rows(results, mode="fwd+bwd", kind="causal") if r["ms"] and r["heads"] != r["kv_heads"]]
    family = "llama3-8b" if any(r["family"] == "llama3-8b" for r in rows) else (rows[0]["family"] if rows else None)
    rows = [r for r in rows if r["family"] == family]
    if rows:
        figure, axis = plt.subplots(figsize=(9, 5))
        for variant in VARIANTS:
            points = sorted((r["seq"], r["tflops"]) for r in rows if r["variant"] == variant)
            if points:
                style = "-o" if variant in TE_FX_VARIANTS else "--."
                axis.plot([p[0] for p in points], [p[1] for p in points], style, label=variant)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length")
        axis.set_ylabel(f"TFLOP/s (fwd+bwd, causal GQA, {family}, {rows[0]['dtype']})")
        axis.set_title(f"Attention fwd+bwd on {results['device']}")
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / "kernels_tflops.png", dpi=120)
        plt.close(figure)
        written.append("kernels_tflops.png")
    speedups = [r for r in _rows(results, variant="te_fx eager") if r.get("speedup_vs_best")]
    if speedups:
        figure, axis = plt.subplots(figsize=(9, max(3, 0.3 * len(speedups))))
        labels = [f"{r['case']} {r['mode']}" for r in speedups]
        axis.barh(labels, [r["speedup_vs_best"] for r in speedups])
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_xlabel("best alternative ms / te_fx eager ms")
        axis.tick_params(axis="y", labelsize=6)
        figure.tight_layout()
        figure.savefig(out / "speedup_vs_best.png", dpi=120)
        plt.close(figure)
        written.append("speedup_vs_best.png")
    return written


def write_report(results: dict, out: Path) -> dict[str, Path]:
    """Write results.json, report.md and the plots into ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    results["targets"] = evaluate_targets(results)
    paths = {"json": out / "results.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(results, indent=1, default=str))
    plots = _plots(results, out)
    lines = [f"# te_fx benchmark on {results['device']}", "",
             f"torch {results['torch']}, transformers {results['transformers']}, TE {results['te']}, "
             f"profiles {', '.join(results['profiles'])}, bf16 matmul peak "
             f"{_fmt(results.get('matmul_peak_tflops'), 0)} TFLOP/s. Times are medians in ms per call, each timed "
             "over back-to-back calls (bench/timing.py).", "",
             "Columns: te_fx eager is the SDPA replacement `inject_te_attention` installs, on HF's eager inputs, "
             "timed as a layer inside a model's forward (a mask is classified once per forward, not in the figure); "
             "te_fx eager fp8 the same inside `te.autocast(recipe=DelayedScaling(fp8_dpa=True))` (bf16 causal cases; "
             "n/a where TE's FP8 attention cannot run and te_fx would fall back); te_fx op the custom op compiled "
             "graphs run; sdpa HF compile mask is SDPA with the bool mask and repeated K/V of a compiled HF model. "
             "Errors are relative to float64 on a slice.", ""]  # fmt: skip
    for dtype in _dtypes(results):
        for mode in ("fwd", "fwd+bwd"):
            if _rows(results, mode=mode, dtype=dtype):
                lines += [f"## Attention {mode}, {dtype}", "", *_kernel_table(_one_dtype(results, dtype), mode), ""]
    if results.get("models"):
        lines += ["## Models (fwd+bwd: forward + backward of the LM loss; step: that plus AdamW; prefill: forward, "
                  "no grad)", "", *_model_table(results), ""]  # fmt: skip
    lines += ["## Targets", ""] + [
        f"- {'PASS' if t['pass'] else ('FAIL' if t['pass'] is False else 'NOT RUN')}: {t['target']}: {t['detail']}"
        for t in results["targets"]
    ]
    lines += ["", *(f"![{p}]({p})" for p in plots)]
    paths["markdown"].write_text("\n".join(lines) + "\n")
    paths.update({p: out / p for p in plots})
    return paths
