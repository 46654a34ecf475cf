"""``python -m bench`` / ``te-fx bench``: kernel- and model-level benchmarks, then report.md, results.json and
plots under bench/results/<card>/ (or --out), and the targets as PASS / FAIL lines.

Profiles: ``quick`` (every target's shape; about 4 minutes on an H200, within one 10-minute command), ``full``
(S 128 to 32768, every family and model), ``smoke`` (tiny shapes: CPU, CI). Long runs go in parts (``--only``,
``--seq``, ``--dtype``) with ``--merge``, which keeps what the folder's results.json holds for the same card and this
run did not measure. results.json is saved after every case, so a run cut short (a time limit) keeps what it
measured; ``--resume`` goes on from there. Without matplotlib (the ``bench`` extra) the report has no plots.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from . import kernels, models
from .args import add_arguments
from .report import plots_available, write_report
from .timing import matmul_peak_tflops

__all__ = ["build_parser", "merge_results", "run"]

PROFILES = {
    "quick": (kernels.quick_cases, models.quick_models, 20),
    "full": (kernels.full_cases, models.full_models, 30),
    "smoke": (kernels.smoke_cases, models.smoke_models, 3),
}


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class BenchError(Exception):
    """A run that cannot be made here (no GPU for a GPU profile, TE missing for the te executor): exit code 3."""

    exit_code = 3


class BenchUsageError(BenchError):
    """Arguments that cannot work anywhere (an output folder that cannot be one, a results file that cannot be
    merged into, lengths no case has): exit code 2."""

    exit_code = 2


def build_parser() -> argparse.ArgumentParser:
    """``python -m bench``'s parser (``te-fx bench`` adds the same arguments to its subparser)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return add_arguments(parser)


def _card(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def _setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, str]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA GPU is visible")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
                          if args.device != "auto" else "cpu")  # fmt: skip
    if device.type == "cpu":
        if args.profile != "smoke":
            raise BenchError(f"profile {args.profile!r} needs a CUDA GPU; on a CPU use --profile smoke")
        return device, torch.float32, "reference"
    from te_fx.executors import TEUnavailableError, load_te_executor

    try:
        load_te_executor()
    except TEUnavailableError as error:
        raise BenchError(str(error)) from error
    return device, DTYPES[args.dtype], "te"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _previous_results(out: Path, device: torch.device) -> dict | None:
    """The results.json in ``out`` to merge into (None if there is none), checked to be from this card."""
    path = out / "results.json"
    if not path.exists():
        return None
    try:
        previous = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BenchUsageError(f"--merge: {path} is not a readable results file ({error})") from None
    if not isinstance(previous, dict) or not isinstance(previous.get("kernels"), list):
        raise BenchUsageError(f"--merge: {path} is not a te-fx bench results file")
    if previous.get("device") != _device_name(device):
        raise BenchUsageError(
            f"--merge: {path} holds results of {previous.get('device')!r}, not {_device_name(device)!r}"
        )
    return previous


def _output_folder(out: Path) -> Path:
    """``out``, created now and written to once, so that a path that cannot be the output folder (a file, a
    read-only folder) fails before the measurements, not after."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
        if (out / "results.json").exists():
            (out / "results.json").open("a").close()
    except OSError as error:
        raise BenchUsageError(f"--out {out}: cannot be used as the output folder ({error.strerror})") from None
    return out


def merge_results(old: dict, new: dict) -> dict:
    """``new`` plus what ``old`` (an earlier run on the same card) measured and ``new`` did not: kernel rows of
    other (case, mode, variant, dtype) and other models. The matmul peak is the higher of the two measurements,
    and every row's fraction of it and ratio to the best alternative are computed again."""
    key = lambda row: (row["case"], row["mode"], row["variant"], row["dtype"])  # noqa: E731
    measured = {key(row) for row in new["kernels"]}
    peaks = [r["matmul_peak_tflops"] for r in (old, new) if r.get("matmul_peak_tflops")]
    merged = {
        **new,
        "profiles": list(dict.fromkeys([*old.get("profiles", []), *new["profiles"]])),
        "kernels": [row for row in old.get("kernels", []) if key(row) not in measured] + new["kernels"],
        "models": {**old.get("models", {}), **new["models"]},
        "matmul_peak_tflops": max(peaks, default=None),
    }
    kernels.add_ratios(merged["kernels"], merged["matmul_peak_tflops"])
    return merged


def _save_progress(results: dict, previous: dict | None, out: Path) -> None:
    """results.json as it would be if the run ended now (report.md and the plots are written at the end)."""
    merged = merge_results(previous, results) if previous is not None else results
    (out / "results.json").write_text(json.dumps(merged, indent=1, default=str))


def _already_measured(previous: dict | None, dtype: torch.dtype) -> tuple[set[str], set[str]]:
    """(kernel case names measured in ``dtype``, model names) that ``previous`` holds."""
    if previous is None:
        return set(), set()
    dtype_name = str(dtype).removeprefix("torch.")
    cases = {row["case"] for row in previous["kernels"] if row.get("dtype") == dtype_name}
    return cases, set(previous.get("models", {}))


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; returns 0 when every measured target passed, 1 otherwise (2 for arguments that cannot
    work, 3 when it cannot run here)."""
    case_list, model_list, default_reps = PROFILES[args.profile]
    cases = [case for case in case_list() if args.seq is None or case.seq in args.seq]
    try:
        if not cases and args.only != "models":
            lengths = ", ".join(map(str, sorted({case.seq for case in case_list()})))
            raise BenchUsageError(f"--seq: profile {args.profile!r} has no kernel case of those lengths ({lengths})")
        device, dtype, executor = _setup(args)
        out = _output_folder(args.out or Path(__file__).parent / "results" / _card(device))
        previous = _previous_results(out, device) if args.merge or args.resume else None
    except BenchError as error:
        print(f"te-fx bench: {error}", file=sys.stderr)
        return error.exit_code
    if not plots_available():
        print("te-fx bench: matplotlib is not installed: report.md and results.json without plots "
              "(pip install -e '.[bench]' adds them)", file=sys.stderr)  # fmt: skip
    import transformers

    model_dtype = torch.bfloat16 if device.type == "cuda" else dtype  # --dtype is the kernels' dtype
    reps = args.reps or default_reps
    te_version = "n/a"
    if executor == "te":
        import transformer_engine

        te_version = transformer_engine.__version__
    results = {"device": _device_name(device),
               "torch": torch.__version__, "transformers": transformers.__version__, "te": te_version,
               "profiles": [args.profile], "executor": executor, "kernels": [], "models": {}}  # fmt: skip
    if device.type == "cuda":
        results["matmul_peak_tflops"] = matmul_peak_tflops(device, torch.bfloat16)
    done_cases, done_models = _already_measured(previous, dtype) if args.resume else (set(), set())
    if args.only in ("kernels", "all"):
        for case in tqdm([c for c in cases if c.name not in done_cases], desc="kernels", unit="case"):
            results["kernels"] += kernels.run_case(case, device, dtype, executor, reps)
            _save_progress(results, previous, out)
        kernels.add_ratios(results["kernels"], results.get("matmul_peak_tflops"))
    if args.only in ("models", "all"):
        for case in tqdm([m for m in model_list() if m.name not in done_models], desc="models", unit="model"):
            results["models"][case.name] = models.run_model_case(case, device, model_dtype, executor, max(3, reps // 4))
            _save_progress(results, previous, out)
    if previous is not None:
        results = merge_results(previous, results)
    paths = write_report(results, out)
    print(f"results: {', '.join(str(p) for p in paths.values())}")
    failed = False
    for target in results["targets"]:
        status = {True: "PASS", False: "FAIL", None: "NOT RUN"}[target["pass"]]
        failed |= target["pass"] is False
        print(f"{status}: {target['target']}: {target['detail']}")
    return 1 if failed else 0
