"""`mardini-eval`: FVD between video folders, and the interpolation / image-to-video benchmark protocols.

    mardini-eval fvd REAL_DIR FAKE_DIR [--num-frames 16] [--i3d FILE | --weights-dir DIR] [--output fvd.json]
    mardini-eval interpolation --data ROOT --out DIR [--model EXPORT] [--clips clips.json] [--seed 0] ...
    mardini-eval i2v --data ROOT --out DIR [--model EXPORT] ...

The benchmarks score baselines (--baselines; by default repeat_nearest and linear_blend for interpolation,
repeat_nearest for i2v, where a blend of one frame is that frame) and, with --model, the model; a --preset or
--clips file must be of the subcommand's task. FVD needs I3D
weights: --i3d FILE, else the first of i3d_pretrained_400.pt / i3d_torchscript.pt in --weights-dir (default
$MARDINI_WEIGHTS or ../shared/weights/). Nothing is downloaded (see scripts/download_weights.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import torch

from .benchmarks import DEFAULT_PRESETS, PROTOCOLS
from .i3d import FVD_SETTINGS

log = logging.getLogger("mardini.eval")

# Baselines scored by default: with one given frame a linear blend is that frame repeated, the same numbers twice.
DEFAULT_BASELINES = {"interpolation": ["repeat_nearest", "linear_blend"], "i2v": ["repeat_nearest"]}


def _add_i3d_args(p: argparse.ArgumentParser):
    p.add_argument("--i3d", default=None, help="I3D weights file (state_dict or TorchScript)")
    p.add_argument("--weights-dir", default=None, help="folder searched for the I3D / LPIPS files "
                                                        "(default $MARDINI_WEIGHTS or ../shared/weights/)")
    p.add_argument("--fvd-settings", default=None, choices=sorted(FVD_SETTINGS),
                   help="how the I3D file is run (default: its lineage: videogpt for i3d_pretrained_400.pt, "
                        "stylegan_v for i3d_torchscript.pt; see the README's FVD section)")
    p.add_argument("--resize", default=None, choices=("bilinear", "tf_legacy"),
                   help="override the settings' resizing to 224 (see i3d.preprocess_for_i3d)")
    p.add_argument("--bn-eps", type=float, default=None,
                   help="override the state_dict network's batch-norm eps (videogpt: 1e-5, tf: 1e-3)")
    p.add_argument("--stylegan-v-native", action="store_true", default=None,
                   help="TorchScript detector: feed uint8 frames with rescale=True, resize=True (StyleGAN-V's "
                        "call; the default for that file)")
    p.add_argument("--i3d-batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs of batch jobs)")


def build_parser() -> argparse.ArgumentParser:
    from ..cli import ArgumentParser  # one-line errors, for the subcommands too

    p = ArgumentParser(prog="mardini-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fvd", help="FVD between two folders of videos (video files and/or frame folders)")
    f.add_argument("folder_a")
    f.add_argument("folder_b")
    f.add_argument("--num-frames", type=int, default=16, help="first N frames of each video (FVD-16)")
    f.add_argument("--height", type=int, default=None, help="resize/crop videos first, with --width (default: "
                                                               "native size; the output records the size)")
    f.add_argument("--width", type=int, default=None)
    f.add_argument("--max-videos", type=int, default=None)
    f.add_argument("--output", default=None, help="write the result as JSON here")
    _add_i3d_args(f)

    for name, help_text in (("interpolation", "VIDIM-Bench interpolation (9 frames at 256x256, first + last "
                                              "given, 7 generated)"),
                            ("i2v", "image-to-video (17 frames, the middle one given)")):
        b = sub.add_parser(name, help=help_text)
        b.add_argument("--data", required=True, help="DAVIS-style frame folders or UCF-style video files")
        b.add_argument("--out", required=True, help="output folder")
        b.add_argument("--clips", default=None, help="clips JSON: reused if it exists, else written")
        b.add_argument("--preset", default=None, choices=sorted(PROTOCOLS),
                       help=f"protocol preset (default: {DEFAULT_PRESETS[name]})")
        preset = PROTOCOLS[DEFAULT_PRESETS[name]]
        b.add_argument("--num-frames", type=int, default=None,
                       help=f"frames per clip (default: the preset's, {preset.num_frames} for {DEFAULT_PRESETS[name]})")
        b.add_argument("--height", type=int, default=None,
                       help=f"evaluation height; frames are scaled to cover it and centre-cropped (default: "
                            f"the preset's, {preset.height})")
        b.add_argument("--width", type=int, default=None,
                       help=f"evaluation width (default: the preset's, {preset.width})")
        b.add_argument("--frame-stride", type=int, default=None,
                       help=f"take every k-th frame of the source video (default: the preset's, "
                            f"{preset.frame_stride})")
        b.add_argument("--clips-per-video", type=int, default=None,
                       help=f"clips drawn per video, distinct starts where it is long enough (default: "
                            f"the preset's, {preset.clips_per_video})")
        b.add_argument("--max-clips", type=int, default=None, help="keep a seeded subset of this many clips "
                                                                    "(default: all)")
        b.add_argument("--seed", type=int, default=None,
                       help=f"clip-selection seed (default: the preset's, {preset.seed})")
        b.add_argument("--model", default=None, help="MarDini export (or checkpoint) folder to evaluate")
        b.add_argument("--model-name", default="mardini", help="the model's name in the results (default: mardini)")
        b.add_argument("--vae", default=None, help="folder of the model's VAE where it is not at the path its export "
                       "recorded (an export copied from another machine)")
        b.add_argument("--steps", type=int, default=None, help="sampler steps for the model (default: the export's)")
        b.add_argument("--model-seed", type=int, default=0, help="seed of the model's noise (default: 0)")
        defaults = DEFAULT_BASELINES[name]
        b.add_argument("--baselines", nargs="*", default=defaults,
                       help=f"baselines scored beside the model (default: {' '.join(defaults)})")
        b.add_argument("--fvd", default="auto", choices=("auto", "off", "require"),
                       help="auto: FVD when I3D weights are found; require: fail without them")
        b.add_argument("--lpips", default=None, help="local LPIPS weights (TorchScript or lpips' alex.pth); one that "
                       "does not load stops the run (found in --weights-dir instead: skipped, with the reason)")
        b.add_argument("--num-grids", type=int, default=4, help="sample grid videos to write")
        b.add_argument("--fps", type=int, default=8, help="frame rate of the grid videos (default: 8)")
        _add_i3d_args(b)
    return p


def _extractor(args, short_clips: str):
    from .i3d import I3DFeatureExtractor
    from .weights import find_i3d_weights

    path = Path(args.i3d) if args.i3d else find_i3d_weights(args.weights_dir)
    if path is None or not path.is_file():
        return None, f"no I3D weights (looked for {args.i3d or 'i3d_pretrained_400.pt / i3d_torchscript.pt'})"
    extractor = I3DFeatureExtractor.from_file(
        path, device=args.device, settings=args.fvd_settings, bn_eps=args.bn_eps,
        native_torchscript=args.stylegan_v_native, resize=args.resize, batch_size=args.i3d_batch_size,
        short_clips=short_clips)
    log.info("I3D weights: %s (FVD settings %s)", path, extractor.settings)
    return extractor, str(path)


def run_fvd(args) -> dict:
    from .fvd import fvd_folders

    extractor, where = _extractor(args, short_clips="error")
    if extractor is None:
        raise FileNotFoundError(f"{where}; pass --i3d or --weights-dir (scripts/download_weights.py)")
    result = fvd_folders(args.folder_a, args.folder_b, extractor, num_frames=args.num_frames,
                         batch_size=args.i3d_batch_size, height=args.height, width=args.width,
                         max_videos=args.max_videos, progress=not args.no_progress)
    result["i3d_weights"] = where
    result["fvd_settings"] = extractor.settings
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return result


def _lpips(args):
    """(LPIPS function or None, why None). --lpips named a file: any failure to load it stops the run; a file only
    found in the weights folder is skipped with its reason, which results.md then gives."""
    from .metrics import load_lpips
    from .weights import find_lpips_weights

    if args.lpips:
        try:
            return load_lpips(args.lpips, device=args.device), None
        except (OSError, ValueError) as e:
            raise ValueError(f"--lpips {args.lpips}: {e}") from None
    path = find_lpips_weights(args.weights_dir)
    if path is None:
        return None, "no LPIPS weights: --lpips FILE, or lpips_alex_torchscript.pt / alex.pth in --weights-dir"
    try:
        return load_lpips(path, device=args.device), None
    except (OSError, ValueError) as e:
        log.warning("LPIPS skipped: %s", e)
        return None, str(e)


def run_protocol(args) -> dict:
    from .benchmarks import BASELINES, PipelineMethod, load_clips, run_benchmark

    clips_exist = args.clips is not None and Path(args.clips).is_file()
    protocol = None
    if clips_exist:
        _, protocol = load_clips(args.clips)
        log.info("reusing the %s clips in %s", protocol.task, args.clips)
        ignored = [k for k in ("preset", "num_frames", "height", "width", "frame_stride", "clips_per_video",
                               "max_clips", "seed") if getattr(args, k) is not None]
        if ignored:
            log.warning("the clips file fixes the protocol; ignoring %s", ", ".join(f"--{k.replace('_', '-')}"
                                                                            for k in ignored))
    else:
        protocol = PROTOCOLS[args.preset or DEFAULT_PRESETS[args.command]]
        overrides = {k: getattr(args, k) for k in ("num_frames", "height", "width", "frame_stride",
                                                    "clips_per_video", "max_clips", "seed")
                     if getattr(args, k) is not None}
        protocol = replace(protocol, **overrides)
    unknown = [b for b in args.baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"--baselines: unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
    extractor = None
    if args.fvd != "off":  # before the model: --fvd require fails without loading it
        extractor, where = _extractor(args, short_clips="stretch")
        if extractor is None:
            if args.fvd == "require":
                raise FileNotFoundError(f"--fvd require, but {where}; pass --i3d or --weights-dir, or --fvd auto")
            log.warning("FVD skipped: %s", where)
    lpips, lpips_skipped = _lpips(args)  # before the model too: a bad --lpips fails first
    methods = {b: BASELINES[b] for b in args.baselines}
    if args.model:
        model = PipelineMethod.from_pretrained(args.model, device=args.device, vae=args.vae, num_steps=args.steps,
                                               seed=args.model_seed)
        max_frames = model.pipe.model.cfg.max_frames
        if protocol.num_frames > max_frames:  # checked here: the pipeline's own error points to long_video()
            fix = f"pass --num-frames <= {max_frames}" + (" with another --clips path" if clips_exist else "")
            raise ValueError(f"--model {args.model} generates at most {max_frames} frames (its max_frames), but the "
                             f"{protocol.task} clips have {protocol.num_frames}: {fix}")
        methods[args.model_name] = model
    results = run_benchmark(args.data, methods, args.out, protocol=None if clips_exist else protocol,
                            clips_file=args.clips, extractor=extractor, lpips=lpips, num_grids=args.num_grids,
                            fps=args.fps, fvd_batch=args.i3d_batch_size, progress=not args.no_progress,
                            lpips_skipped=lpips_skipped)
    print((Path(args.out) / "results.md").read_text())
    return results


def check_arguments(parser: argparse.ArgumentParser, args) -> None:
    """Before any weights, model or video is read, and before --out is made: arguments that cannot work or that
    contradict each other, each refused with one argparse-style line (exit status 2)."""
    from .benchmarks import load_clips
    from .i3d import MIN_FRAMES

    if args.i3d_batch_size < 1:
        parser.error(f"--i3d-batch-size {args.i3d_batch_size}: give at least 1 (videos per I3D forward)")
    if args.command == "fvd":
        if args.num_frames < MIN_FRAMES:
            parser.error(f"--num-frames {args.num_frames}: I3D needs at least {MIN_FRAMES} frames per video "
                         f"(FVD-16 compares 16)")
        if (args.height is None) != (args.width is None):
            parser.error(f"--height and --width resize together: give both, or neither for the native size (got "
                         f"only {'--height' if args.width is None else '--width'})")
        return
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps}: the model's sampler needs at least 1 step")
    if not Path(args.data).is_dir():  # a file the user names: an error --debug shows with its traceback
        raise FileNotFoundError(f"--data {args.data} is not a folder (the dataset root: frame folders or video files)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file: give a folder for the results, grids and clips")
    # the subcommand picks the baselines, a preset or clips file the protocol: they must be of the same task
    if args.preset and PROTOCOLS[args.preset].task != args.command:
        task = PROTOCOLS[args.preset].task
        others = sorted(name for name, p in PROTOCOLS.items() if p.task == args.command)
        parser.error(f"{args.command}: --preset {args.preset} is an {task} protocol; run `mardini-eval {task} "
                     f"--preset {args.preset}`, or give an {args.command} preset ({', '.join(others)})")
    if args.clips and Path(args.clips).is_file():
        task = load_clips(args.clips)[1].task
        if task != args.command:
            parser.error(f"{args.command}: --clips {args.clips} holds {task} clips; run `mardini-eval {task} "
                         f"--clips {args.clips}`, or give {args.command} a clips file of its own (a new path)")


def main(argv: list[str] | None = None) -> int:
    from ..cli import interrupts, user_errors

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    with interrupts("mardini-eval", args.debug), user_errors("mardini-eval", args.debug):
        from ..inference.cli import check_device

        check_device(args.device)
        check_arguments(parser, args)
        if args.command == "fvd":
            run_fvd(args)
        else:
            run_protocol(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
