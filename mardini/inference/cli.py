"""`mardini-sample`: videos from a trained model (export or checkpoint folder) for any task."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

TASKS = ("interpolate", "i2v", "expand", "loop", "slow_motion", "long")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mardini-sample", description=__doc__)
    p.add_argument("--model", required=True, help="export folder (config.json + model.safetensors) or checkpoint")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--inputs", nargs="+", required=True,
                   help="input images in order (interpolate: first last; i2v/loop: one; slow_motion/long: several); "
                        "expand: one video file or several images")
    p.add_argument("--output", required=True, help="out.mp4, out.gif, or a folder for PNG frames")
    p.add_argument("--num-frames", type=int, default=None, help="window length (default: the training window); "
                                                                 "long: total output frames")
    p.add_argument("--position", default="middle", help="i2v: first | middle | last | an index")
    p.add_argument("--positions", type=int, nargs="*", default=None,
                   help="long: output positions of the inputs (default: evenly spread over --num-frames)")
    p.add_argument("--num-new", type=int, default=16, help="expand: frames to add")
    p.add_argument("--direction", default="forward", choices=("forward", "backward"), help="expand direction")
    p.add_argument("--factor", type=int, default=4, help="slow_motion: output frames per input interval")
    p.add_argument("--stride", type=int, default=1, help="long: keyframe stride of the expansion stage")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the diffusion config's)")
    p.add_argument("--sampler", default=None, help="override the sampler: euler (rectified flow), ddim or ddpm "
                                                    "(DDPM models); default: the one the model was trained with")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance on the plan (needs a "
                                                                 "model trained with plan_dropout > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="several seeds: one output per seed")
    p.add_argument("--weights", default="ema", choices=("ema", "raw"))
    p.add_argument("--fps", type=int, default=None, help="output frame rate (default: the model's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--no-preview", action="store_true", help="skip the side-by-side preview with inputs marked")
    return p


def _read_inputs(paths: list[str]) -> list:
    """Images as paths (the pipeline opens them); a single video file becomes its frames."""
    if len(paths) == 1 and Path(paths[0]).suffix.lower() in (".mp4", ".webm", ".avi", ".mov", ".mkv", ".gif"):
        import imageio.v3 as iio

        return list(iio.imread(paths[0], plugin="pyav"))
    return paths


def run(args, pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (videos [S, N, 3, H, W], given [N] bool)."""
    inputs = _read_inputs(args.inputs)
    seeds = args.seeds or [args.seed]
    kw = dict(num_steps=args.steps, guidance_scale=args.guidance)
    videos, given = [], None
    for seed in seeds:
        if args.task == "interpolate":
            if len(inputs) != 2:
                raise SystemExit("interpolate takes exactly two inputs: first and last")
            v = pipe.interpolate(inputs[0], inputs[1], args.num_frames, seed=seed, **kw)
            given_pos = [0, len(v) - 1]
        elif args.task == "i2v":
            position = int(args.position) if args.position.lstrip("-").isdigit() else args.position
            v = pipe.image_to_video(inputs[0], position, args.num_frames, seed=seed, **kw)
            T = len(v)
            given_pos = [{"first": 0, "middle": T // 2, "last": T - 1}.get(position, position)]
        elif args.task == "loop":
            v = pipe.loop(inputs[0], args.num_frames, seed=seed, **kw)
            given_pos = [0]
        elif args.task == "expand":
            v = pipe.expand(inputs, args.num_new, args.direction, seed=seed, **kw)
            k = len(inputs)
            given_pos = list(range(k)) if args.direction == "forward" else list(range(len(v) - k, len(v)))
        elif args.task == "slow_motion":
            v = pipe.slow_motion(inputs, args.factor, seed=seed, **kw)
            given_pos = [i * args.factor for i in range(len(inputs))]
        else:  # long
            n = args.num_frames or 8 * pipe.num_frames
            positions = args.positions or [round(i * (n - 1) / max(1, len(inputs) - 1)) for i in range(len(inputs))]
            if len(positions) != len(inputs):
                raise SystemExit(f"--positions has {len(positions)} entries for {len(inputs)} inputs")
            v = pipe.long_video(dict(zip(positions, inputs)), n, args.stride, seed=seed, **kw)
            given_pos = positions
        videos.append(v)
        given = torch.zeros(len(v), dtype=torch.bool)
        given[given_pos] = True
    return torch.stack(videos), given


def _output_path(base: Path, seed: int, many: bool) -> Path:
    if not many:
        return base
    if base.suffix:
        return base.with_name(f"{base.stem}_seed{seed}{base.suffix}")
    return base / f"seed{seed}"


def main(argv=None) -> None:
    from ..data.video_io import make_grid_video, write_video
    from .pipeline import MarDiniPipeline

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    pipe = MarDiniPipeline.from_pretrained(args.model, device=args.device, dtype=DTYPES[args.dtype],
                                           weights=args.weights, sampler=args.sampler)
    videos, given = run(args, pipe)
    fps = args.fps or pipe.fps
    out = Path(args.output)
    seeds = args.seeds or [args.seed]
    for seed, video in zip(seeds, videos):
        path = write_video(_output_path(out, seed, len(seeds) > 1), video, fps=fps)
        print(f"wrote {path} ({len(video)} frames)")
    if not args.no_preview:
        preview = make_grid_video(list(videos), given=[given] * len(videos))
        stem = out.stem if out.suffix else out.name
        path = write_video(out.with_name(f"{stem}_preview.mp4"), preview, fps=fps)
        print(f"wrote {path} (side by side, given frames outlined)")


if __name__ == "__main__":
    main()
