"""How far a non-learned motion estimate gets: the matcher the generator is given (model.motion) vs the blend.

Bilateral matching, the classic frame-rate up-conversion estimate (mardini/models/motion.py): for a frame at
fraction a of the way from the first given frame to the last, candidate displacements d pair the first frame at
p - a d with the last at p + (1 - a) d; the cost of d is their squared difference over a window, in units of the
frames' variance, plus a smoothness term, and the estimate is the softmax(-cost / temperature)-weighted blend of
the pairs, searched coarse to fine (--levels; --levels 1 is a single-level search of +-radius). It needs no
training, so where it beats the linear blend the motion between the given frames can be read from local appearance.
Held-out clips (synthetic of the validation seed, or a video manifest), first + last frame given, PSNR per clip
averaged as in the learning benchmark, matched on 2x2-patched pixels (the identity autoencoder's latents). On
synthetic clips it also reports where the estimate's error lies: its share on the pixels the shapes cover, and the
PSNR were those pixels exact.

    python benchmarks/motion_baseline.py --hue-drift 0.03 0 --json motion_baseline.json
    python benchmarks/motion_baseline.py --frames 17 --size 64 --hue-drift 0 --levels 1 3
    python benchmarks/motion_baseline.py --frames 17 --size 64 --hue-drift 0 --max-shapes 4 --window 7 --coarse-radius 3
    python benchmarks/motion_baseline.py --video data/photo_motion/val.csv --frames 17 --size 64
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
from einops import rearrange

from mardini.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset
from mardini.models.motion import motion_estimate


def psnr_per_clip(estimate: torch.Tensor, real: torch.Tensor) -> float:
    """Clips [B, T', 3, H, W] in [-1, 1]: PSNR of each clip, averaged."""
    mse = (estimate - real).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse)).mean().item()


def evaluate(clips: torch.Tensor, shapes: torch.Tensor | None = None, **matcher) -> dict:
    """clips [B, T, 3, H, W] in [-1, 1]: blend and matched PSNR of the inner frames, and the matcher's seconds; with
    shapes [B, T, H, W] (True where a synthetic shape covers the pixel) also the share of the matched estimate's
    squared error that lies on them, their share of the area, and the PSNR with those pixels exact."""
    T = clips.shape[1]
    mask = torch.zeros(clips.shape[:2], dtype=torch.bool)
    mask[:, 1:-1] = True
    a = torch.linspace(0, 1, T)[None, :, None, None, None]
    blend = (1 - a) * clips[:, :1] + a * clips[:, -1:]
    latents = rearrange(clips, "b t c (h p) (w q) -> b t (c p q) h w", p=2, q=2)
    start = time.perf_counter()
    matched = motion_estimate(latents, mask, **matcher)
    seconds = time.perf_counter() - start
    matched = rearrange(matched, "b t (c p q) h w -> b t c (h p) (w q)", p=2, q=2)
    inner = slice(1, T - 1)
    row = {"blend_psnr": psnr_per_clip(blend[:, inner], clips[:, inner]),
           "bilateral_psnr": psnr_per_clip(matched[:, inner], clips[:, inner]), "seconds": round(seconds, 3)}
    if shapes is not None:
        error = (matched - clips)[:, inner].pow(2).mean(2)                        # [B, T', H, W]
        on = shapes[:, inner]
        exact_shapes = torch.where(on, 0.0, error).flatten(1).mean(1).clamp_min(1e-10)  # per clip
        row.update(error_share_on_shapes=round((error * on).sum().item() / error.sum().item(), 3),
                   area_share_of_shapes=round(on.float().mean().item(), 3),
                   bilateral_psnr_shapes_exact=(10 * torch.log10(4.0 / exact_shapes)).mean().item())
    return row


def shape_pixels(cfg: SyntheticVideoConfig, clips: torch.Tensor) -> torch.Tensor:
    """[B, T, H, W] True where a shape covers the pixel: the same clips rendered without shapes differ there (the
    background is drawn first, so its random numbers do not depend on the shapes)."""
    bare = SyntheticVideoDataset(replace(cfg, min_shapes=0, max_shapes=0))
    background = torch.stack([bare[i]["video"] for i in range(len(clips))])
    return (clips - background).abs().amax(2) > 0.05


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hue-drift", type=float, nargs="+", default=[0.03, 0.0], help="synthetic clips' hue drift")
    p.add_argument("--video", default=None, help="a manifest or folder of videos instead of synthetic clips")
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--max-shapes", type=int, default=3)
    p.add_argument("--seed", type=int, default=1_000_003, help="the validation seed of the data configs")
    p.add_argument("--levels", type=int, nargs="+", default=[3], help="pyramid levels (each value is one row)")
    p.add_argument("--radius", type=int, default=2, help="search radius per level, latent cells")
    p.add_argument("--coarse-radius", type=int, default=0, help="radius of the levels above the finest (0: --radius)")
    p.add_argument("--window", type=int, default=5, help="matching neighbourhood, latent cells")
    p.add_argument("--smoothness", type=float, default=3e-3, help="cost per squared cell of displacement")
    p.add_argument("--temperature", type=float, default=0.06, help="softmax temperature of the costs")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    sources = []
    if args.video:
        from mardini.data.video import VideoDataConfig, VideoDataset

        data = VideoDataset(VideoDataConfig(root=args.video, num_frames=args.frames, height=args.size,
                                            width=args.size, clip_start="first"))
        sources.append(({"video": args.video}, torch.stack([data[i]["video"] for i in range(min(args.clips,
                                                                                                  len(data)))]), None))
    else:
        for hue_drift in args.hue_drift:
            cfg = SyntheticVideoConfig(num_videos=args.clips, num_frames=args.frames, height=args.size,
                                       width=args.size, max_shapes=args.max_shapes, seed=args.seed,
                                       hue_drift=hue_drift)
            data = SyntheticVideoDataset(cfg)
            clips = torch.stack([data[i]["video"] for i in range(len(data))])
            sources.append(({"hue_drift": hue_drift}, clips, shape_pixels(cfg, clips)))
    rows = []
    for source, clips, shapes in sources:
        for levels in args.levels:
            row = {**source, "levels": levels, **evaluate(clips, shapes, radius=args.radius, levels=levels,
                                                           coarse_radius=args.coarse_radius,
                                                           window=args.window, smoothness=args.smoothness,
                                                           temperature=args.temperature)}
            rows.append(row)
            print(f"{source}, levels {levels}: blend {row['blend_psnr']:.2f} dB, bilateral matching "
                  f"{row['bilateral_psnr']:.2f} dB ({row['bilateral_psnr'] - row['blend_psnr']:+.2f}), "
                  f"{row['seconds']:.2f} s for {len(clips)} clips", flush=True)
            if shapes is not None:
                print(f"  {row['error_share_on_shapes']:.1%} of the matched estimate's squared error lies on the "
                      f"shapes, {row['area_share_of_shapes']:.1%} of the area; with the shapes' pixels exact "
                      f"{row['bilateral_psnr_shapes_exact']:.2f} dB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
