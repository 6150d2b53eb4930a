"""Shared by the benchmark scripts."""

import time

import torch


def timed(fn, warmup: int, iters: int, device="cuda") -> tuple[float, float]:
    """Median seconds per call and peak memory in GiB: CUDA events on a GPU; on the CPU (smoke tests) wall-clock
    time and a peak memory of 0."""
    for _ in range(warmup):
        fn()
    if torch.device(device).type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        times.sort()
        return times[len(times) // 2], 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def mean_ms(fn, warmup: int, iters: int) -> float:
    """Mean milliseconds per call of a back-to-back loop on the GPU (CUDA events around the whole loop): for kernels
    so short that a per-call event and synchronisation would dominate them."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
