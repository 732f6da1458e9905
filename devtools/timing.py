"""Median wall time of a callable: CUDA events on a GPU (after warm-up), perf_counter on CPU."""
from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, *, device: str, warmup: int = 5, reps: int = 30) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
