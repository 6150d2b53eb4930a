"""benchmarks/motion_baseline.py: the model's non-learned matcher, scored against the blend on whole clips."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "motion_baseline.py"
spec = importlib.util.spec_from_file_location("motion_baseline", SCRIPT)
motion_baseline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(motion_baseline)


def moving_square(offset: float, colour=(0.9, -0.5, 0.2)) -> torch.Tensor:
    """[1, 3, 24, 24]: a 6-pixel square at x = 6 + offset on a dark smooth ramp."""
    ys, xs = torch.meshgrid(torch.arange(24) + 0.5, torch.arange(24) + 0.5, indexing="ij")
    frame = (-0.6 + 0.02 * ys).expand(3, -1, -1).clone()
    inside = (xs >= 6 + offset) & (xs < 12 + offset) & (ys >= 9) & (ys < 15)
    frame[:, inside] = torch.tensor(colour)[:, None]
    return frame[None]


def test_evaluate_moves_a_square_to_the_middle_far_better_than_the_blend():
    clips = torch.cat([moving_square(1.5 * t) for t in range(5)])[None]  # [1, 5, 3, 24, 24], 6 pixels in all
    report = motion_baseline.evaluate(clips)
    assert report["bilateral_psnr"] > report["blend_psnr"] + 3, report


def test_evaluate_scores_the_blend_exactly_on_a_fade():
    """Clips that fade linearly from one image to another: the blend is exact (PSNR capped by float error), and
    the report carries both figures."""
    a, b = moving_square(0), moving_square(0, colour=(-0.2, 0.4, 0.7))
    w = torch.linspace(0, 1, 5)[:, None, None, None]
    clips = ((1 - w) * a + w * b)[None]  # [1, 5, 3, 24, 24]
    report = motion_baseline.evaluate(clips)
    assert report["blend_psnr"] > 100 and report["bilateral_psnr"] > 25, report


def test_error_share_on_shapes_finds_where_the_matcher_fails():
    """A square seen only in the middle frame cannot be matched from the given ones: all of the estimate's error
    lies on the square's pixels. One that jumps beyond the search leaves a ghost where it was: half the error.
    shape_pixels marks a synthetic clip's shapes and nothing else."""
    empty, here, far = moving_square(100), moving_square(0), moving_square(12)           # ramp alone; two squares
    for clip, low, high in ((torch.cat([empty, here, empty]), 0.99, 1.0), (torch.cat([here, far, here]), 0.45, 0.55)):
        shapes = (clip - empty).abs().amax(1) > 0.05                                      # [3, 24, 24]
        report = motion_baseline.evaluate(clip[None], shapes[None], levels=1, radius=1)
        assert low <= report["error_share_on_shapes"] <= high, report

    from mardini.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset

    cfg = SyntheticVideoConfig(num_videos=2, num_frames=3, height=32, width=32, min_shapes=1, max_shapes=1)
    clips = torch.stack([SyntheticVideoDataset(cfg)[i]["video"] for i in range(2)])
    marked = motion_baseline.shape_pixels(cfg, clips)
    assert 0.01 < marked.float().mean() < 0.5                                          # one shape, not the frame
