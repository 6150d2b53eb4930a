"""Shared by the benchmark scripts."""

import torch


def timed(fn, warmup: int, iters: int) -> tuple[float, float]:
    """Median seconds per call (CUDA events) and peak memory in GiB."""
    for _ in range(warmup):
        fn()
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
