"""The benchmark's command-line arguments, apart from the benchmark itself so that parsing them imports no torch
(``te-fx --help`` and usage errors answer at once)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["PROFILE_NAMES", "DTYPE_NAMES", "add_arguments"]

PROFILE_NAMES = ("full", "quick", "smoke")  # bench.run.PROFILES holds what each measures
DTYPE_NAMES = ("bf16", "fp16")  # bench.run.DTYPES holds the torch dtypes


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's arguments to ``parser`` (``python -m bench``'s, or ``te-fx bench``'s subparser)."""
    parser.add_argument("--profile", choices=PROFILE_NAMES, default="quick")
    parser.add_argument("--only", choices=("kernels", "models", "all"), default="all")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results/<card>)")
    parser.add_argument("--reps", type=_positive_int, help="timed repetitions per measurement (default: the profile's)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16", help="the kernels' dtype on a GPU")
    parser.add_argument(
        "--seq", type=_positive_int, nargs="+", metavar="S", help="only the kernel cases of these lengths"
    )
    parser.add_argument("--merge", action="store_true", help="add to the folder's results.json instead of replacing it")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="--merge, skipping the kernel cases and models the folder's results.json already holds",
    )
    return parser
