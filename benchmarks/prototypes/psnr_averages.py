"""Prototype: two ways to average a clip's PSNR, on one export's interpolation samples and on the linear blend.

Why: until session 52 the periodic evaluation logged the samples' PSNR as the mean of per-frame PSNRs, beside a
posterior mean and a blend scored per clip (the PSNR of each clip's mean squared error over its generated frames, as
the learning benchmark scores everything). How far apart do the two averages put the same frames?

    python benchmarks/prototypes/psnr_averages.py EXPORT --clips 16 32
"""

from __future__ import annotations

import argparse

from mardini.evaluation.learning import baseline, held_out_clips, samples
from mardini.evaluation.metrics import clip_psnr, psnr_frames
from mardini.inference import MarDiniPipeline
from mardini.masking import task_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an export folder (its config names the held-out clips)")
    parser.add_argument("--clips", type=int, nargs="+", default=[16, 32], help="numbers of held-out clips")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    pipe = MarDiniPipeline.from_pretrained(args.model, device=args.device)
    for count in args.clips:
        clips = held_out_clips(pipe.config["data"], count)
        mask = task_mask("interpolation", clips.shape[1])
        answers = {"samples": samples(pipe, clips, mask).cpu(), "blend": baseline(clips, mask, "linear_blend")}
        for name, out in answers.items():
            per_clip = clip_psnr(out, clips, mask).mean().item()
            per_frame = psnr_frames(out[:, mask].flatten(0, 1), clips[:, mask].flatten(0, 1)).mean().item()
            print(f"{count} clips, {name:7s}: per clip {per_clip:.2f} dB, mean of per-frame PSNRs {per_frame:.2f} dB "
                  f"({per_frame - per_clip:+.2f})")


if __name__ == "__main__":
    main()
