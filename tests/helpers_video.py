"""Shared by the video tests: which frame of one clip each frame of another is."""

from __future__ import annotations

import numpy as np


def nearest_frames(queries: np.ndarray, candidates: np.ndarray) -> tuple[list[int], np.ndarray]:
    """For each query frame [N, H, W, 3], the index of the nearest candidate frame [M, H, W, 3] and its distance
    (mean absolute difference in uint8 levels). Why: a lossy round trip keeps each frame within a few levels of its
    own source while neighbouring frames lie further away, so a shifted, repeated or misplaced frame shows here where
    a mean error over the clip would hide it."""
    distance = np.abs(queries[:, None].astype(np.float32) - candidates[None].astype(np.float32)).mean(axis=(2, 3, 4))
    return distance.argmin(axis=1).tolist(), distance.min(axis=1)
