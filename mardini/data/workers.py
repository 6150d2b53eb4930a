"""How many DataLoader workers a process can use."""

from __future__ import annotations

import os


def usable_workers(requested: int) -> int:
    """`requested` capped at the CPUs this process may run on: more workers only contend (PyTorch warns that they may
    freeze). Every sample is seeded by its index, so the batches are the same with any number of workers."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(requested, cpus)
