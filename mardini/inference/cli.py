"""`mardini-sample`: videos from a trained model (export or checkpoint folder) for any task.

Everything that can be checked is checked before the model is loaded: the inputs are read (a missing or unreadable
one is named), the outputs must have a known suffix, a writable folder and an encoder, and must not exist unless
--overwrite is given; --task long shows the size of its plan and refuses more model calls than --max-windows.
User errors print one line (mardini.cli.user_errors); --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

TASKS = ("interpolate", "i2v", "expand", "loop", "slow_motion", "long")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from ..cli import ArgumentParser  # one-line errors
    from ..models.layers import ATTENTION_BACKENDS
    from .planning import KEYFRAME_MODES

    p = ArgumentParser(prog="mardini-sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="export folder (config.json + model.safetensors) or checkpoint")
    p.add_argument("--task", required=True, choices=TASKS,
                   help="interpolate: frames between two images; i2v: a video around one image; expand: continue "
                        "a clip; loop: a seamless loop of one image (writes --num-frames - 1 frames: the window's "
                        "last frame, a repeat of the first, is dropped); slow_motion: frames between consecutive "
                        "images; long: any length from one or more images")
    p.add_argument("--inputs", nargs="+", required=True,
                   help="input images in order (interpolate: first last; i2v/loop: one, or a one-frame video or "
                        "GIF; slow_motion/long: several); expand: one video file or several images")
    p.add_argument("--output", required=True, help="out.mp4, out.gif, or a folder for PNG frames")
    p.add_argument("--num-frames", type=positive_int, default=None,
                   help="interpolate, i2v, loop: window length (default: the training window; loop writes one "
                        "frame less, its repeated last frame dropped); long: total output frames; not for expand "
                        "(--num-new) or slow_motion (--factor)")
    # Options of one task or two (TASK_OPTIONS): None here, so that one given to another task is refused.
    p.add_argument("--position", help="i2v: first | middle | last | an index (default: middle)")
    p.add_argument("--positions", type=int, nargs="*",
                   help="long: output positions of the inputs (default: evenly spread over --num-frames)")
    p.add_argument("--num-new", type=positive_int, help="expand: frames to add (default: 16)")
    p.add_argument("--direction", choices=("forward", "backward"), help="expand: direction (default: forward)")
    p.add_argument("--factor", type=int, help="slow_motion: output frames per input interval, >= 2 (default: 4)")
    p.add_argument("--stride", type=positive_int, help="long: keyframe stride of the expansion stage (default: 1)")
    p.add_argument("--keyframes", choices=KEYFRAME_MODES,
                   help="slow_motion, long: a gap longer than the window is first split by the fewest keyframes "
                        "that leave each part one window long (sparse, the default: fewer, fuller windows, as good "
                        "and 3.6-5.7x faster measured) or by a whole window of keyframes (dense)")
    p.add_argument("--max-windows", type=positive_int,
                   help="long, expand, slow_motion: refuse a plan of more model calls (windows x seeds) than this "
                        "(default: 500)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default: the diffusion config's)")
    p.add_argument("--sampler", default=None, help="override the sampler: euler (rectified flow), ddim or ddpm "
                                                    "(DDPM models); default: the one the model was trained with")
    p.add_argument("--flow-shift", type=float, default=None, help="rectified flow: the sampler's time shift (> 1: "
                   "more steps at high noise, < 1 at low noise; default: the model's diffusion.flow_shift, 1, or "
                   "0.5 for the small_* GPU presets)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance on the plan (needs a "
                                                                 "model trained with plan_dropout > 0)")
    p.add_argument("--seed", type=int, default=None, help="the noise's seed (default: 0)")
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="several seeds: one output per seed")
    p.add_argument("--weights", default="ema", choices=("ema", "raw"))
    p.add_argument("--vae", default=None, help="folder of the model's VAE where it is not at the path its export "
                   "recorded (an export copied from another machine)")
    p.add_argument("--attn-backend", default=None, choices=ATTENTION_BACKENDS,
                   help="attention backend (default: the trained one where it runs on --device, else sdpa)")
    p.add_argument("--fps", type=positive_int, default=None, help="output frame rate (default: the model's; "
                   "expand from a video: the video's, so that its frames play at their speed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--compile", action="store_true", help="torch.compile the networks and the VAE: faster "
                   "on a GPU once compiled (the first window compiles for tens of seconds)")
    p.add_argument("--fp8", action="store_true", help="the generator's MLP and self-attention GEMMs from FP8 "
                   "inputs (a GPU of compute capability >= 8.9; emulated in float32 on the CPU, for checks): with "
                   "--compile and --dtype bfloat16, 6 %% faster on an H100 at bf16's error "
                   "(MarDiniPipeline.use_fp8_gemms)")
    p.add_argument("--vae-chunk", type=int, default=None, help="frames per VAE decoder call; 0: a window's generated "
                   "frames in one call, fastest on a large GPU for more memory (12 frames at 512 px, compiled, on an "
                   "H200: 0.071 s and 4.0 GiB against 0.102 s and 1.5 GiB at 4); default: the export's "
                   "autoencoder.frames_per_chunk")
    p.add_argument("--no-preview", action="store_true", help="skip the side-by-side preview with inputs marked")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (and the preview)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


VIDEO_INPUTS = (".mp4", ".webm", ".avi", ".mov", ".mkv", ".gif")


def read_inputs(paths: list[str]) -> tuple[list[np.ndarray], float | None]:
    """(uint8 [H, W, 3] frames, the video's frame rate): every image (None), or the frames of a single video file.
    A one-frame video (a still GIF) is an image, its rate None. Errors name the file."""
    from ..data.decode import read_clip

    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--inputs: {path} does not exist" + (" (it is a folder)" if Path(path).is_dir()
                                                                          else ""))
    if len(paths) == 1 and Path(paths[0]).suffix.lower() in VIDEO_INPUTS:
        frames, _, fps = read_clip(paths[0], lambda n, fps: list(range(n)))
        return list(frames), (fps if len(frames) > 1 else None)
    from PIL import Image

    from .pipeline import rgb_array

    frames = []
    for path in paths:
        try:
            with Image.open(path) as image:
                frames.append(rgb_array(image))  # 16-bit images kept at 16 bits (PIL's RGB clips them)
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ... for a bad file
            raise ValueError(f"--inputs: cannot read {path} as an image ({type(e).__name__}: {e})") from None
    return frames, None


def resize_note(paths: list[str], frames: list[np.ndarray], height: int, width: int) -> str | None:
    """One line for inputs not at the model's size (the pipeline resizes them to cover it, then centre-crops), so that
    a user sees that the output is the model's size and where a crop cut the picture; None when every input fits."""
    sizes = sorted({frame.shape[:2] for frame in frames})
    if sizes == [(height, width)]:
        return None
    names = paths[0] if len(paths) == 1 else f"{len(frames)} inputs"
    shown = ", ".join(f"{w}x{h}" for h, w in sizes)
    cropped = any(abs(h * width - w * height) > max(h, w) for h, w in sizes)  # another aspect ratio
    return (f"{names} ({shown}) resized to the model's {width}x{height}" +
            (", centre-cropped where the aspect ratio differs" if cropped else ""))


def output_paths(args) -> list[Path]:
    """Every file this run writes: one video per seed, then the preview (unless --no-preview)."""
    out, seeds = Path(args.output), args.seeds or [args.seed]
    paths = [_output_path(out, seed, len(seeds) > 1) for seed in seeds]
    if not args.no_preview:
        paths.append(out.with_name(f"{out.stem if out.suffix else out.name}_preview.mp4"))
    return paths


def check_outputs(args) -> None:
    """Before any work: suffix known, folder writable, an encoder installed, nothing replaced unasked."""
    from ..data.backends import MissingBackendError
    from ..data.video_io import check_output

    for path in output_paths(args):
        try:
            check_output(path)
        except MissingBackendError as e:
            hint = "; or pass --no-preview" if path.name.endswith("_preview.mp4") else ""
            raise MissingBackendError(f"{e}{hint}") from None
        if path.exists() and not args.overwrite:
            raise FileExistsError(f"{path} exists: pass --overwrite to replace it, or choose another --output")


def long_positions(args, num_inputs: int, window: int) -> tuple[int, list[int]]:
    """--task long: (frames to make, where the inputs go): --num-frames (default 8 windows) and --positions (default
    the inputs spread evenly)."""
    n = args.num_frames or 8 * window
    if n <= num_inputs:
        raise ValueError(f"--num-frames {n} leaves nothing to generate between {num_inputs} --inputs")
    positions = args.positions or [round(i * (n - 1) / max(1, num_inputs - 1)) for i in range(num_inputs)]
    if len(positions) != num_inputs:
        raise ValueError(f"--positions has {len(positions)} entries for {num_inputs} --inputs")
    if len(set(positions)) != len(positions) or not all(0 <= p < n for p in positions):
        raise ValueError(f"--positions {positions}: each input needs its own position in [0, {n})")
    return n, positions


PLAN_TASKS = ("long", "expand", "slow_motion")  # the tasks of many windows: their plan is shown and bounded
# What to change for a smaller plan, by task.
SMALLER_PLAN = {"long": "ask for fewer frames, a larger --stride", "expand": "ask for a smaller --num-new",
                "slow_motion": "ask for a smaller --factor or fewer inputs"}


def check_plan_size(args, config: dict, num_inputs: int) -> None:
    """Show the plan's size; refuse more model calls than --max-windows before planning an absurd length (a bound
    first, from the length alone, then the plan itself). config: the export's (mardini.export.read_config), so that
    this runs before the model is loaded."""
    from .planning import expansion_plan, interpolation_plan, long_video_plan, min_windows

    seeds, window = len(args.seeds or [args.seed]), config["num_frames"]
    if args.task == "long":
        num_frames, positions = long_positions(args, num_inputs, window)
        length = f"--num-frames {num_frames}"
    elif args.task == "expand":
        num_frames, positions = num_inputs + args.num_new, list(range(num_inputs))
        length = f"--num-new {args.num_new}"
    else:  # slow_motion
        num_frames, positions = (num_inputs - 1) * args.factor + 1, [i * args.factor for i in range(num_inputs)]
        length = f"--factor {args.factor} ({num_frames} frames)"
    least = min_windows(num_frames, len(set(positions)), window) * seeds
    smaller = SMALLER_PLAN[args.task]
    if least > args.max_windows:
        raise ValueError(f"{length} needs at least {least} model calls ({window}-frame windows"
                         f"{f' x {seeds} seeds' if seeds > 1 else ''}), more than --max-windows {args.max_windows}: "
                         f"{smaller}, or raise --max-windows")
    if args.task == "long":
        plan = long_video_plan(sorted(set(positions)), num_frames, window, args.stride, keyframes=args.keyframes)
    elif args.task == "expand":
        plan = expansion_plan(num_inputs, num_frames, window, None, args.direction)
    else:
        plan = interpolation_plan(positions, window, args.keyframes)
    calls = len(plan) * seeds
    gib = num_frames * 3 * config["height"] * config["width"] * 4 / 2**30
    how = f" ({args.keyframes} keyframes)" if args.task != "expand" else ""
    print(f"plan: {len(plan)} windows of up to {window} frames{how} for {num_frames} frames"
          f"{f', x {seeds} seeds' if seeds > 1 else ''} = {calls} model calls of "
          f"{args.steps or config['diffusion']['num_inference_steps']} sampler steps; the video takes {gib:.2f} GiB")
    if calls > args.max_windows:
        raise ValueError(f"the plan has {calls} model calls, more than --max-windows {args.max_windows}: "
                         f"{smaller}, or raise --max-windows")


INPUT_COUNTS = {"interpolate": (2, 2, "two images (the first and the last frame)"), "i2v": (1, 1, "one image"),
                "loop": (1, 1, "one image"), "expand": (1, None, "one or more frames (images or a video)"),
                "slow_motion": (2, None, "two or more images"), "long": (1, None, "one or more images")}


# Options that only some tasks read: the tasks, and the value when not given (num_frames: None, the window).
TASK_OPTIONS = {"num_frames": (("interpolate", "i2v", "loop", "long"), None), "position": (("i2v",), "middle"),
                "positions": (("long",), None), "num_new": (("expand",), 16), "direction": (("expand",), "forward"),
                "factor": (("slow_motion",), 4), "stride": (("long",), 1), "max_windows": (PLAN_TASKS, 500),
                "keyframes": (("slow_motion", "long"), "sparse")}
# What sets the length instead, for the tasks that take no --num-frames.
LENGTH_OPTIONS = {"expand": "--num-new (frames to add)", "slow_motion": "--factor (frames per input interval)"}


def check_arguments(args, inputs: list) -> None:
    """Before the model is loaded: every input and option is used (none silently dropped), the options make a video.
    Fills in the defaults of TASK_OPTIONS."""
    for name, (tasks, default) in TASK_OPTIONS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif args.task not in tasks:
            instead = f": the length follows from {LENGTH_OPTIONS[args.task]}" if name == "num_frames" else ""
            raise ValueError(f"--{name.replace('_', '-')} applies to --task {', '.join(tasks)} only, not "
                             f"{args.task}{instead}")
    low, high, what = INPUT_COUNTS[args.task]
    video = len(args.inputs) == 1 and Path(args.inputs[0]).suffix.lower() in VIDEO_INPUTS
    got = f"a video of {len(inputs)} frames" if video else f"{len(inputs)} image(s)"
    # A one-frame video (a still GIF) is an image, for i2v and loop as among interpolate's two inputs.
    if len(inputs) < low or (high is not None and len(inputs) > high) or (video and high == 1 and len(inputs) > 1):
        raise ValueError(f"--task {args.task} takes {what} as --inputs, got {got}")
    if args.seed is not None and args.seeds is not None:
        raise ValueError(f"--seed {args.seed} and --seeds {' '.join(map(str, args.seeds))}: give one of them")
    args.seed = 0 if args.seed is None else args.seed
    if args.seeds is not None and (not args.seeds or len(set(args.seeds)) != len(args.seeds)):
        raise ValueError(f"--seeds {args.seeds}: give one or more different seeds")
    if args.task == "slow_motion" and args.factor < 2:
        raise ValueError(f"--factor {args.factor}: slow motion makes at least 2 output frames per input interval")
    position = args.position
    if args.task == "i2v" and position not in ("first", "middle", "last") and not position.isdigit():
        raise ValueError(f"--position {position}: give first, middle, last or a frame index >= 0")


def check_model_options(args, config: dict) -> None:
    """Before the weights are loaded: --sampler and --flow-shift fit the trained formulation, --guidance a model
    trained for it."""
    from ..diffusion.config import with_sampling_options

    for flag, key, value in (("--sampler", "sampler", args.sampler), ("--flow-shift", "flow_shift", args.flow_shift)):
        if value is not None:
            try:
                with_sampling_options(config["diffusion"], **{key: value})
            except ValueError as e:
                raise ValueError(f"{flag} {value}: {e}") from None
    if args.guidance != 1.0 and not config["model"].get("plan_dropout", 0.0) > 0:
        raise ValueError(f"--guidance {args.guidance}: this model was trained without model.plan_dropout, so it has "
                         f"no null plan to guide against; use --guidance 1")


def check_device(device: str) -> None:
    """A one-line error for a device this machine does not have (torch's own is an assertion deep inside)."""
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ValueError(f"--device {device}: {e}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here (torch {torch.__version__}"
                         f"{'' if torch.version.cuda else ', a CPU-only build'}); use --device cpu")


def generate(args, pipe, inputs: list | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One (video [N, 3, H, W], given [N] bool) per seed, as each is made: the caller writes it before the next
    seed starts, so that a failure or an interrupt keeps the seeds already done."""
    inputs = read_inputs(args.inputs)[0] if inputs is None else inputs
    seeds = args.seeds or [args.seed]
    kw = dict(num_steps=args.steps, guidance_scale=args.guidance)
    for seed in seeds:
        if args.task == "interpolate":
            if len(inputs) != 2:
                raise ValueError(f"--task interpolate takes exactly two --inputs (first and last), got {len(inputs)}")
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
            v = pipe.slow_motion(inputs, args.factor, seed=seed, keyframes=args.keyframes, **kw)
            given_pos = [i * args.factor for i in range(len(inputs))]
        else:  # long
            n, positions = long_positions(args, len(inputs), pipe.num_frames)
            v = pipe.long_video(dict(zip(positions, inputs)), n, args.stride, seed=seed, keyframes=args.keyframes,
                                **kw)
            given_pos = positions
        given = torch.zeros(len(v), dtype=torch.bool)
        given[given_pos] = True
        yield v, given


def output_fps(args, input_fps: float | None, model_fps: int) -> float:
    """--fps; else, expanding a video, the video's own rate, with a note (at the model's rate its frames would play
    slower or faster than recorded); else the model's."""
    if args.fps or args.task != "expand" or not input_fps or round(input_fps, 3) == model_fps:
        return args.fps or model_fps
    print(f"writing at {input_fps:g} fps, the frame rate of {args.inputs[0]} (the model was trained at "
          f"{model_fps} fps; --fps sets another)")
    return input_fps


def _output_path(base: Path, seed: int, many: bool) -> Path:
    if not many:
        return base
    if base.suffix:
        return base.with_name(f"{base.stem}_seed{seed}{base.suffix}")
    return base / f"seed{seed}"


def main(argv=None) -> None:
    from ..cli import interrupts, user_errors

    args = build_parser().parse_args(argv)
    with interrupts("mardini-sample", args.debug), user_errors("mardini-sample", args.debug):
        sample(args)


def sample(args) -> None:
    from ..data.video_io import make_grid_video, write_video
    from ..export import read_config
    from ..models.fp8 import check_fp8_device
    from ..models.layers import check_backend
    from .pipeline import MarDiniPipeline

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if Path(args.model).is_file():
        parent = Path(args.model).parent
        hint = f" ({parent}?)" if (parent / "config.json").is_file() else ""
        raise ValueError(f"--model {args.model} is a file, not an export folder: give the export folder{hint} "
                         f"(config.json + model.safetensors) or a training checkpoint folder")
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such folder (give an export folder with config.json, "
                                f"or a training checkpoint folder)")
    if args.vae_chunk is not None and args.vae_chunk < 0:
        raise ValueError(f"--vae-chunk must be >= 0 (0: all frames in one decoder call), got {args.vae_chunk}")
    check_device(args.device)
    if args.fp8:
        check_fp8_device(args.device)  # before the model loads
    if args.attn_backend is not None:
        check_backend(args.attn_backend, args.device, DTYPES[args.dtype], "--attn-backend")
    inputs, input_fps = read_inputs(args.inputs)
    check_arguments(args, inputs)
    check_outputs(args)
    config = read_config(args.model)
    check_model_options(args, config)
    if args.task in PLAN_TASKS:  # its size is known from the export's config: refuse an absurd one before loading
        check_plan_size(args, config, len(inputs))
    pipe = MarDiniPipeline.from_pretrained(args.model, device=args.device, dtype=DTYPES[args.dtype],
                                           weights=args.weights, sampler=args.sampler, attn_backend=args.attn_backend,
                                           vae=args.vae, flow_shift=args.flow_shift)
    if args.vae_chunk is not None:
        pipe.autoencoder.frames_per_chunk = args.vae_chunk or None  # None: every frame in one call
    if args.fp8:
        pipe.use_fp8_gemms()
    if args.compile:
        pipe.compile()
    note = resize_note(args.inputs, inputs, pipe.height, pipe.width)
    if note:
        print(note)
    fps = output_fps(args, input_fps, pipe.fps)
    paths, videos, given = output_paths(args), [], None  # paths: one per seed, then the preview
    for path, (video, given) in zip(paths, generate(args, pipe, inputs)):
        size = f"{video.shape[-2]}x{video.shape[-1]}"
        print(f"wrote {write_video(path, video, fps=fps)} ({len(video)} frames, {size}, {fps:g} fps)", flush=True)
        videos.append(video)
    if not args.no_preview:
        preview = make_grid_video(list(videos), given=[given] * len(videos))
        print(f"wrote {write_video(paths[-1], preview, fps=fps)} (side by side, given frames outlined)")


if __name__ == "__main__":
    main()
