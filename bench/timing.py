"""Timing and peak measurement shared by the benchmarks: CUDA events on a GPU, the wall clock on a CPU."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable

import torch

SAMPLE_MS = 5.0  # a GPU sample times back-to-back calls for about this long


def _sample_ms(fn: Callable[[], object], calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()  # untimed: the GPU works on it while the host queues the timed calls, as in a running model
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 5, reps: int = 20) -> float:
    """Median milliseconds per call of ``fn`` after ``warmup`` untimed calls.

    On a GPU each of the ``reps`` samples times back-to-back calls between two CUDA events (about
    :data:`SAMPLE_MS` in all, at least one call) behind an untimed one, so the host runs ahead as it does in a
    running model and a call costs the larger of its host time and its GPU time: per-call Python overhead shows
    where it exceeds the kernels' time, and only there."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        calls = min(200, math.ceil(SAMPLE_MS / max(_sample_ms(fn, 1), 1e-3)))
        return statistics.median(_sample_ms(fn, calls) for _ in range(reps))
    times = []
    for _ in range(reps):
        start_s = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192) -> float:
    """The card's measured dense matmul rate in TFLOP/s (random data, median of timed products)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def training_step(
    model: torch.nn.Module,
    runner: Callable[..., object],
    batch: dict,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Callable[[], torch.Tensor]:
    """A training step of ``model`` called through ``runner`` (the model, or it compiled): gradients cleared, the LM
    loss of ``batch`` inside ``context()``, its backward; returns the loss."""

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with context():
            loss = runner(**batch).loss
        loss.backward()
        return loss

    return step
