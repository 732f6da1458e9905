"""Timing helpers shared by the demo and the benchmarks (warm-up first, medians, CUDA events on a GPU)."""
from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, *, device: str, warmup: int = 5, reps: int = 30) -> float:
    """Median wall time of one call: CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return events_us(fn, reps=reps, warmup=0) / 1e3


def events_us(fn, *, reps: int = 100, warmup: int = 10) -> float:
    """Median µs of one call between CUDA events (includes launch gaps when the host is the bottleneck)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def graph_us(fn, sets=((),), *, calls: int = 20, reps: int = 15) -> float:
    """Median µs per call of `calls` back-to-back calls captured in one CUDA graph (launch gaps removed),
    rotating through the argument tuples in `sets` so large inputs do not stay in L2."""
    for args in sets:
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*sets[i % len(sets)])
    return events_us(graph.replay, reps=reps, warmup=1) / calls
