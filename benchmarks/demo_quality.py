"""Sample quality of a model trained on the synthetic data, against the trivial baselines, on validation clips.

    python benchmarks/demo_quality.py outputs/tiny_synthetic/<run>/export [--clips 8 --steps 25]

Interpolation (first and last frame given): PSNR of the 7 generated frames vs a linear blend of the two ends.
Image-to-video (middle frame given): PSNR of the 8 generated frames vs repeating the given frame.
Clips come from the validation stream (seed 1000003), so they were never trained on.
"""

import argparse

import torch

from mardini.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset
from mardini.inference import MarDiniPipeline
from mardini.training.sampling import psnr


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="export or checkpoint folder")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--weights", default="ema", choices=("ema", "raw"))
    args = p.parse_args()
    pipe = MarDiniPipeline.from_pretrained(args.model, weights=args.weights)
    T = pipe.num_frames
    data = SyntheticVideoDataset(SyntheticVideoConfig(seed=1_000_003, num_videos=args.clips, num_frames=T,
                                                      height=pipe.height, width=pipe.width))
    scores = {"interpolation": [], "linear blend": [], "image-to-video": [], "repeat frame": []}
    w = torch.linspace(0, 1, T)[:, None, None, None]
    others = [i for i in range(T) if i != T // 2]
    for i in range(args.clips):
        video = data[i]["video"]
        generated = pipe.interpolate(video[0], video[-1], num_steps=args.steps, seed=i)
        scores["interpolation"].append(psnr(generated[1:-1], video[1:-1]))
        scores["linear blend"].append(psnr(((1 - w) * video[0] + w * video[-1])[1:-1], video[1:-1]))
        generated = pipe.image_to_video(video[T // 2], num_steps=args.steps, seed=i)
        scores["image-to-video"].append(psnr(generated[others], video[others]))
        scores["repeat frame"].append(psnr(video[T // 2].expand(len(others), -1, -1, -1), video[others]))
    for name, values in scores.items():
        print(f"{name:16s} PSNR {sum(values) / len(values):6.2f} dB")


if __name__ == "__main__":
    main()
