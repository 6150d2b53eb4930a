"""DataLoader workers: how many a process can use, and what to say when one is late."""

from __future__ import annotations

import os


def usable_workers(requested: int) -> int:
    """`requested` capped at the CPUs this process may run on: more workers only contend (PyTorch warns that they may
    freeze). Every sample is seeded by its index, so the batches are the same with any number of workers."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(requested, cpus)


def timed_out(err: BaseException) -> bool:
    """Whether `err` is torch's error for a batch its workers did not deliver within the DataLoader's timeout."""
    return isinstance(err, RuntimeError) and str(err).startswith("DataLoader timed out")


def items_in_words(dataset, items: list[int], most: int = 4) -> str:
    """Dataset items as a user finds them: "the files a, b" (a video dataset's manifest) or "the dataset's items
    3, 7", at most `most` of them named."""
    manifest = getattr(dataset, "manifest", None)
    names = [manifest[i].path for i in items] if manifest is not None else [str(i) for i in items]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ("the files " if manifest is not None else "the dataset's items ") + ", ".join(names[:most]) + more
