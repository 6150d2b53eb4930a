"""Videos longer than the window: how the way a long gap is split changes quality and the number of model calls.

    python benchmarks/long_video_plans.py outputs/tiny_synthetic/<run>/export --num-frames 33 --given 0 32
    python benchmarks/long_video_plans.py EXPORT --num-frames 33 --given 0 16 32 --keyframes dense sparse --json o.json
    python benchmarks/long_video_plans.py EXPORT --num-frames 33 --given 0 32 --window-strides 1 4 8

A gap between two known frames that does not fit one window is filled hierarchically
(mardini/inference/planning.py): first a window of keyframes spread over the gap, then each part between them.
``--keyframes dense`` spreads a whole window of keyframes, so the parts are short and filled by small windows;
``sparse`` the fewest that leave each part one window long, so the parts are filled by whole windows of
consecutive frames. Either way the model sees a window's frames as consecutive, so the keyframe window shows it the
motion of several frames per frame.

On held-out clips of the export's data at --num-frames (the ground truth; consecutive frames, also for a model
trained at random frame strides, data.synthetic.max_frame_stride), with the frames at --given known, each
plan is run and scored: PSNR of the generated frames against the real ones, beside the linear blend of the nearest
given frames, with the model calls, the frames they process and the wall time.

``--window-strides S ...`` also scores the kind of window a plan starts with, alone: each clip read every S-th frame
(at most a window of frames), its first and last given, the rest sampled in one call; beside the blend and the
model's motion-compensated input. A long video is only as good as its keyframe windows, whose frames lie S apart.

``--spacing one`` tells every window's motion estimate that its frames are consecutive (the prior as it was before
it became per frame of the scene, MarDini.motion): the ablation of the spacing a plan passes (default ``scene``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mardini.cli import ArgumentParser, interrupts, user_errors
from mardini.evaluation.learning import baseline, clip_psnr, held_out_clips, motion_input
from mardini.inference import MarDiniPipeline
from mardini.inference.planning import KEYFRAME_MODES, long_video_plan

PROG = "long_video_plans.py"


def score_plan(pipe: MarDiniPipeline, clips: torch.Tensor, given: list[int], keyframes: str, seed: int,
               num_steps: int | None) -> dict:
    """Run one plan on every clip -> its PSNR, model calls and time. clips [N, L, 3, H, W] in [-1, 1]."""
    L = clips.shape[1]
    plan = long_video_plan(given, L, pipe.num_frames, keyframes=keyframes)
    generated = torch.ones(L, dtype=torch.bool)
    generated[given] = False
    videos, start = [], time.perf_counter()
    for i, clip in enumerate(clips):
        known = {p: pipe.preprocess(clip[p]) for p in given}
        videos.append(pipe.run_plan(plan, known, L, seed=seed + i, progress=False, num_steps=num_steps).cpu())
    seconds = time.perf_counter() - start
    psnr = clip_psnr(torch.stack(videos).float(), clips, generated)
    return {"keyframes": keyframes, "psnr": psnr.mean().item(), "psnr_per_clip": psnr.tolist(),
            "windows": len(plan), "frames_processed": sum(len(w.positions) for w in plan),
            "frames_generated_per_window": [len(w.generated) for w in plan],
            "seconds_per_video": seconds / len(clips)}


def score_spaced_windows(pipe: MarDiniPipeline, clips: torch.Tensor, strides: list[int], seed: int,
                         num_steps: int | None, tell_spacing: bool = True) -> list[dict]:
    """Interpolation in one window of frames `stride` apart, per stride: clips [N, L, 3, H, W] read every stride-th
    frame (at most the window's frames, at least 3), the first and last given -> sampled PSNR, blend and motion
    input (None without an estimate) over the generated frames. tell_spacing False: the estimate is told 1."""
    results = []
    for stride in strides:
        if stride < 1:
            raise ValueError(f"--window-strides {stride}: frames must lie at least 1 apart")
        window = clips[:, ::stride][:, :pipe.num_frames]
        T = window.shape[1]
        if T < 3:
            raise ValueError(f"--window-strides {stride}: clips of {clips.shape[1]} frames give {T} frames at that "
                             f"stride; interpolation needs 3 (ask for more --num-frames)")
        generated = torch.ones(T, dtype=torch.bool)
        generated[[0, T - 1]] = False
        # as a plan runs such a window: the motion estimate told the frames' spacing (MarDini.motion)
        spacing = stride if tell_spacing else 1
        sampled = pipe.generate_clips(window, generated, [seed + i for i in range(len(window))], num_steps,
                                      spacing=spacing)
        estimate = motion_input(pipe, window, generated, spacing=spacing)
        results.append({"stride": stride, "frames": T,
                        "psnr": clip_psnr(sampled.float(), window, generated).mean().item(),
                        "blend_psnr": clip_psnr(baseline(window, generated, "linear_blend"), window,
                                                generated).mean().item(),
                        "motion_input_psnr": None if estimate is None else
                        clip_psnr(estimate, window, generated).mean().item()})
    return results


def tell_every_window_spacing_one(pipe: MarDiniPipeline) -> None:
    """The ablation of --spacing one for plans: every window's motion estimate reads its frames as consecutive
    (run_plan passes each window's Window.spacing to _generate_window)."""
    generate_window = pipe._generate_window
    pipe._generate_window = lambda *a, spacing=1.0, **k: generate_window(*a, spacing=1.0, **k)


def main(argv=None) -> None:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", help="export folder (or checkpoint) of a model trained on synthetic or video data")
    p.add_argument("--num-frames", type=int, required=True, help="length of the held-out clips (> the window)")
    p.add_argument("--given", type=int, nargs="+", required=True,
                   help="known frame positions; the first and the last frame (0 and num-frames - 1) among them")
    p.add_argument("--keyframes", nargs="+", default=list(KEYFRAME_MODES), choices=KEYFRAME_MODES)
    p.add_argument("--window-strides", type=int, nargs="*", default=[],
                   help="also score one window of frames this many apart (the first and last given)")
    p.add_argument("--spacing", choices=("scene", "one"), default="scene",
                   help="the spacing each window's motion estimate is told: its frames' (scene) or 1 (one)")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the export's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    with interrupts(PROG), user_errors(PROG):
        given = sorted(set(args.given))
        if given[0] != 0 or given[-1] != args.num_frames - 1:
            raise ValueError(f"--given {args.given}: include the first (0) and the last ({args.num_frames - 1}) "
                             f"frame, so that every generated frame lies between known ones")
        pipe = MarDiniPipeline.from_pretrained(args.export, device=args.device)
        if args.spacing == "one":
            tell_every_window_spacing_one(pipe)
        if args.num_frames <= pipe.num_frames:
            raise ValueError(f"--num-frames {args.num_frames}: a clip of the window's {pipe.num_frames} frames or "
                             f"fewer is one model call whatever the plan; ask for more")
        clips = held_out_clips(pipe.config["data"], args.clips, args.num_frames, consecutive=True)
        generated = torch.ones(args.num_frames, dtype=torch.bool)
        generated[given] = False
        blend = clip_psnr(baseline(clips, generated, "linear_blend"), clips, generated).mean().item()
        print(f"{args.clips} held-out clips of {args.num_frames} frames, given {given}, window {pipe.num_frames}")
        print(f"linear blend     PSNR {blend:6.2f} dB")
        results = []
        for keyframes in args.keyframes:
            r = score_plan(pipe, clips, given, keyframes, args.seed, args.steps)
            results.append(r)
            print(f"{keyframes:16s} PSNR {r['psnr']:6.2f} dB  ({r['windows']} windows, {r['frames_processed']} "
                  f"frames processed, {r['seconds_per_video']:.2f} s per video)")
        spaced = score_spaced_windows(pipe, clips, args.window_strides, args.seed, args.steps,
                                      tell_spacing=args.spacing == "scene")
        for r in spaced:
            estimate = "" if r["motion_input_psnr"] is None else f", motion input {r['motion_input_psnr']:.2f}"
            print(f"one window of frames {r['stride']} apart ({r['frames']} frames): PSNR {r['psnr']:6.2f} dB "
                  f"(blend {r['blend_psnr']:.2f}{estimate})")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "export": args.export, "num_frames": args.num_frames, "given": given, "window": pipe.num_frames,
                "clips": args.clips, "steps": args.steps, "device": args.device, "spacing": args.spacing,
                "blend_psnr": blend, "plans": results, "spaced_windows": spaced,
                "command": " ".join(sys.argv)}, indent=1))


if __name__ == "__main__":
    main()
