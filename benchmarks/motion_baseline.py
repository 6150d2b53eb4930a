"""Is motion locally observable in the synthetic clips? A non-learned motion-compensated interpolator vs the blend.

Bilateral matching, the classic frame-rate up-conversion estimate: for a frame at fraction a of the way from the
first given frame to the last, every candidate displacement d (whole pixels, |dx|, |dy| <= --radius) pairs the first
frame at p - a d with the last at p + (1 - a) d (bilinear sampling); the cost is their squared difference averaged
over a --window x --window neighbourhood plus --prior |d|^2 (small motion is likelier), and the estimate is the
softmax(-cost / --tau)-weighted blend of the paired values. It needs no training, so where it beats the linear
blend the motion between the given frames can be read from local appearance; where it does not, a model must
reason about whole objects. Held-out synthetic clips (the validation seed), first + last frame given, PSNR per clip
averaged as in the learning benchmark:

    python benchmarks/motion_baseline.py --hue-drift 0.03 0.01 0.005 0 --json motion_baseline.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from mardini.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset


def shifted(frames: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """frames [B, 3, H, W] -> the values at p + (dx, dy) pixels, bilinear, edges repeated."""
    B, _, H, W = frames.shape
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    grid = torch.stack([(xs + dx) / W * 2 - 1, (ys + dy) / H * 2 - 1], -1)
    return F.grid_sample(frames, grid[None].expand(B, -1, -1, -1), mode="bilinear", padding_mode="border",
                         align_corners=False)


def bilateral_estimate(first: torch.Tensor, last: torch.Tensor, a: float, radius: int, window: int, prior: float,
                       tau: float) -> torch.Tensor:
    """The frame at fraction a between first and last [B, 3, H, W] by soft bilateral matching."""
    costs, values = [], []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            before, after = shifted(first, -a * dx, -a * dy), shifted(last, (1 - a) * dx, (1 - a) * dy)
            mismatch = (before - after).pow(2).mean(1, keepdim=True)  # [B, 1, H, W]
            mismatch = F.avg_pool2d(mismatch, window, 1, window // 2, count_include_pad=False)
            costs.append(mismatch + prior * (dx * dx + dy * dy))
            values.append((1 - a) * before + a * after)
    weights = torch.softmax(-torch.cat(costs, 1) / tau, dim=1)  # [B, D, H, W] over displacements
    return (torch.stack(values, 1) * weights[:, :, None]).sum(1)


def psnr_per_clip(estimate: torch.Tensor, real: torch.Tensor) -> float:
    """Clips [B, T', 3, H, W] in [-1, 1]: PSNR of each clip, averaged."""
    mse = (estimate - real).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse)).mean().item()


def evaluate(clips: torch.Tensor, radius: int, window: int, prior: float, tau: float) -> dict:
    first, last, real = clips[:, 0], clips[:, -1], clips[:, 1:-1]
    T = clips.shape[1]
    fractions = [i / (T - 1) for i in range(1, T - 1)]
    blend = torch.stack([(1 - a) * first + a * last for a in fractions], 1)
    matched = torch.stack([bilateral_estimate(first, last, a, radius, window, prior, tau) for a in fractions], 1)
    return {"blend_psnr": psnr_per_clip(blend, real), "bilateral_psnr": psnr_per_clip(matched, real)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hue-drift", type=float, nargs="+", default=[0.03, 0.0])
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--max-shapes", type=int, default=3)
    p.add_argument("--seed", type=int, default=1_000_003, help="the validation seed of the data configs")
    p.add_argument("--radius", type=int, default=10, help="largest displacement tried, pixels")
    p.add_argument("--window", type=int, default=9, help="matching neighbourhood, pixels")
    p.add_argument("--prior", type=float, default=1e-4, help="cost per squared pixel of displacement")
    p.add_argument("--tau", type=float, default=0.01, help="softmax temperature of the costs")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    for hue_drift in args.hue_drift:
        cfg = SyntheticVideoConfig(num_videos=args.clips, num_frames=args.frames, height=args.size, width=args.size,
                                   max_shapes=args.max_shapes, seed=args.seed, hue_drift=hue_drift)
        data = SyntheticVideoDataset(cfg)
        clips = torch.stack([data[i]["video"] for i in range(len(data))])
        row = {"hue_drift": hue_drift, **evaluate(clips, args.radius, args.window, args.prior, args.tau)}
        rows.append(row)
        print(f"hue_drift {hue_drift:g}: blend {row['blend_psnr']:.2f} dB, bilateral matching "
              f"{row['bilateral_psnr']:.2f} dB ({row['bilateral_psnr'] - row['blend_psnr']:+.2f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
