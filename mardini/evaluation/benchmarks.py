"""Benchmark protocols: VIDIM-Bench interpolation and middle-frame image-to-video, on local data.

A protocol fixes the clip length, which frames are given, the resolution and how clips are drawn. Presets are
named after what they reproduce:
  vidim          VIDIM-Bench (Jain et al. 2024, "Video Interpolation with Diffusion Models"; DAVIS and UCF101):
                 9-frame clips, the first and last given, the 7 middle frames generated, at 256x256. VIDIM's
                 subsets (DAVIS-7: 357 non-overlapping 9-frame chunks of the DAVIS 2017 shots; UCF101-7: the first
                 400 of the UCF101 test split) come from its published scripts, whose output folders (9 frames
                 each) this preset reads whole; on other roots it draws one seeded clip per video. VIDIM does not
                 publish its FVD recipe: FVD here is on the full 9-frame clips, with the I3D file's lineage
                 (i3d.FVD_SETTINGS; videogpt for i3d_pretrained_400.pt). The README's Evaluate section cites
                 the sources.
  i2v_middle17   17-frame clips, the middle frame (index 8) given, 16 generated: this project's image-to-video
                 check (no published protocol)

Clips come from a local DAVIS-style root (``<root>/<video>/00000.jpg ...``) or UCF101-style root (``.avi/.mp4``
files at any depth); see data.py. Selection is deterministic for a seed: videos sorted by id, a seeded numpy
generator draws each clip's start, and the list is written to a JSON file. Passing that file back reuses exactly
those clips, so runs of different methods (and different machines) are comparable.

A *method* is any callable ``method(given, mask) -> video``: given [T, 3, H, W] in [-1, 1] with the frames to
generate zeroed (a method never sees them), mask [T] bool (True = generate); it returns [T, 3, H, W]. The
baselines every such table carries (repeat the nearest given frame; blend the surrounding given frames
linearly) and the model (``PipelineMethod`` around MarDiniPipeline) are all scored by the same code path.

Scores: PSNR and SSIM per generated frame (mean over a clip's generated frames, then over clips), LPIPS where
local weights are given, and FVD between the full output clips and the ground-truth clips when an extractor is
given. Outputs: ``results.json`` (no timings or output paths in it, so two runs of the same inputs give
identical files), ``results.md`` (a markdown table), ``clips.json`` and sample grids ``samples/*.mp4``
(ground truth | each method, given frames outlined in green).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.video_io import make_grid_video, write_video
from .data import VideoSource, count_frames, list_videos, read_frames, to_model_frames
from .fvd import FeatureStats, extractor_ddof, fvd_from_stats
from .metrics import masked_frame_metrics

log = logging.getLogger(__name__)

Method = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CLIPS_FORMAT = "mardini-clips"
CLIPS_VERSION = 1


# ------------------------------------------------------------------------------------------ protocols
@dataclass
class ProtocolConfig:
    """One benchmark protocol. Every field has a default; from_dict rejects unknown keys by name."""

    task: str = "interpolation"  # interpolation (first + last given) | i2v (one given frame)
    num_frames: int = 9  # frames per clip, T (VIDIM-Bench: 9, the first and last given)
    i2v_position: int | None = None  # i2v: index of the given frame (None = T // 2, the middle)
    height: int = 256  # evaluation resolution (frames are scaled to cover it, then centre-cropped)
    width: int = 256
    frame_stride: int = 1  # take every k-th frame of the source video
    clips_per_video: int = 1  # clips drawn per video (distinct starts when the video is long enough)
    max_clips: int | None = None  # keep at most this many clips (a seeded subset), None = all
    seed: int = 0  # drives clip selection only

    def __post_init__(self):
        if self.task not in ("interpolation", "i2v"):
            raise ValueError(f"protocol task must be 'interpolation' or 'i2v', got {self.task!r}")
        for name in ("num_frames", "height", "width", "frame_stride", "clips_per_video"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"protocol {name} must be a positive integer, got {value!r}")
        if self.num_frames < 3:
            raise ValueError(f"protocol num_frames must be >= 3, got {self.num_frames}")
        if self.max_clips is not None and self.max_clips < 1:
            raise ValueError(f"protocol max_clips must be >= 1 or None, got {self.max_clips}")
        if self.i2v_position is not None and not 0 <= self.i2v_position < self.num_frames:
            raise ValueError(f"protocol i2v_position must be in [0, {self.num_frames}), got {self.i2v_position}")

    @classmethod
    def from_dict(cls, values: Mapping) -> "ProtocolConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown protocol key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**dict(values))

    def mask(self) -> torch.Tensor:
        """[T] bool, True = generate."""
        mask = torch.ones(self.num_frames, dtype=torch.bool)
        if self.task == "interpolation":
            mask[0] = mask[-1] = False
        else:
            mask[self.num_frames // 2 if self.i2v_position is None else self.i2v_position] = False
        return mask

    @property
    def span(self) -> int:
        """Source frames a clip covers."""
        return (self.num_frames - 1) * self.frame_stride + 1


PROTOCOLS = {
    "vidim": ProtocolConfig(task="interpolation", num_frames=9, height=256, width=256),  # VIDIM-Bench
    "i2v_middle17": ProtocolConfig(task="i2v", num_frames=17, height=256, width=256),  # no published protocol
}
DEFAULT_PRESETS = {"interpolation": "vidim", "i2v": "i2v_middle17"}  # mardini-eval subcommand -> preset


# ------------------------------------------------------------------------------------------ clips
@dataclass(frozen=True)
class Clip:
    video: str  # VideoSource id (path relative to the root)
    start: int  # first source frame
    frame_stride: int
    num_frames: int

    @property
    def frames(self) -> list[int]:
        return [self.start + i * self.frame_stride for i in range(self.num_frames)]

    @property
    def name(self) -> str:
        return f"{self.video}@{self.start}"


def select_clips(root: str | Path, protocol: ProtocolConfig) -> list[Clip]:
    """Deterministic clips for protocol.seed: for each video (sorted by id) with enough frames, up to
    clips_per_video distinct starts drawn uniformly; then an optional seeded subset of max_clips (kept in order)."""
    rng = np.random.default_rng(protocol.seed)
    clips = []
    for source in list_videos(root):
        n = count_frames(source)
        room = n - protocol.span + 1  # number of valid starts
        if room < 1:
            log.info("clip selection: %s has %d frames < %d needed; skipped", source.id, n, protocol.span)
            continue
        k = min(protocol.clips_per_video, room)
        starts = sorted(int(s) for s in rng.choice(room, size=k, replace=False))
        clips += [Clip(source.id, s, protocol.frame_stride, protocol.num_frames) for s in starts]
    if not clips:
        raise ValueError(f"no video under {root} has the {protocol.span} frames a clip needs")
    if protocol.max_clips is not None and len(clips) > protocol.max_clips:
        keep = sorted(rng.choice(len(clips), size=protocol.max_clips, replace=False).tolist())
        clips = [clips[i] for i in keep]
    return clips


def save_clips(path: str | Path, clips: list[Clip], protocol: ProtocolConfig, root: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": CLIPS_FORMAT, "version": CLIPS_VERSION, "protocol": asdict(protocol),
           "dataset_root": str(root), "num_clips": len(clips),
           "clips": [{"video": c.video, "start": c.start, "frame_stride": c.frame_stride,
                      "num_frames": c.num_frames, "frames": c.frames} for c in clips]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path


def load_clips(path: str | Path) -> tuple[list[Clip], ProtocolConfig]:
    """Read a clips file written by save_clips: (clips, the protocol they were drawn for)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a clips file (not JSON: {e})") from None
    found = doc.get("format") if isinstance(doc, dict) else None
    if found != CLIPS_FORMAT:
        raise ValueError(f"{path} is not a clips file (format {found!r})")
    protocol = ProtocolConfig.from_dict(doc["protocol"])
    clips = [Clip(c["video"], int(c["start"]), int(c["frame_stride"]), int(c["num_frames"])) for c in doc["clips"]]
    return clips, protocol


# ------------------------------------------------------------------------------------------ methods
def _given_indices(mask: torch.Tensor) -> torch.Tensor:
    given = (~mask).nonzero().flatten()
    if given.numel() == 0:
        raise ValueError("a method needs at least one given frame")
    return given


def repeat_nearest(given: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Baseline: every generated frame copies the nearest given frame (the earlier one on a tie)."""
    idx = _given_indices(mask)
    t = torch.arange(mask.shape[0])
    nearest = idx[(t[:, None] - idx[None, :]).abs().argmin(dim=1)]  # argmin takes the first (earlier) on ties
    return given[nearest].clone()


def linear_blend(given: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Baseline: a generated frame between given frames a < t < b is (1 - w) f_a + w f_b, w = (t - a) / (b - a);
    before the first / after the last given frame it repeats that frame (with one given frame it equals
    repeat_nearest)."""
    idx = _given_indices(mask).tolist()
    out = given.clone()
    for t in range(mask.shape[0]):
        if not mask[t]:
            continue
        before = [i for i in idx if i < t]
        after = [i for i in idx if i > t]
        if before and after:
            a, b = before[-1], after[0]
            w = (t - a) / (b - a)
            out[t] = (1 - w) * given[a] + w * given[b]
        else:
            out[t] = given[before[-1] if before else after[0]]
    return out


BASELINES: dict[str, Method] = {"repeat_nearest": repeat_nearest, "linear_blend": linear_blend}


class PipelineMethod:
    """The model as a method: MarDiniPipeline called with num_frames = the protocol's T (the pipeline's training
    window may be longer; the model's max_frames must be >= T). A model that works at another resolution gets the
    given frames resized to its own (whole frames: no crop, so the geometry maps back) and its video resized back;
    the given frames are then returned exactly, as every baseline returns them. The same seed for every clip."""

    def __init__(self, pipe, num_steps: int | None = None, seed: int = 0, guidance_scale: float = 1.0):
        self.pipe, self.num_steps, self.seed, self.guidance_scale = pipe, num_steps, seed, guidance_scale

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", vae: str | None = None, **kw) -> "PipelineMethod":
        from ..inference.pipeline import MarDiniPipeline

        return cls(MarDiniPipeline.from_pretrained(path, device=device, vae=vae), **kw)

    def __call__(self, given: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        T, _, H, W = given.shape
        size = (self.pipe.height, self.pipe.width)
        inputs = given if size == (H, W) else \
            F.interpolate(given, size=size, mode="bilinear", antialias=True, align_corners=False)
        indices = [int(i) for i in _given_indices(mask)]
        video = self.pipe(frames={i: inputs[i] for i in indices}, num_frames=T, num_steps=self.num_steps,
                          seed=self.seed, guidance_scale=self.guidance_scale).float().cpu()
        if video.shape[-2:] != (H, W):
            video = F.interpolate(video, size=(H, W), mode="bilinear", antialias=True, align_corners=False)
        video = video.clamp(-1, 1)
        video[indices] = given[indices].to(video.dtype)
        return video

    def note(self, height: int, width: int) -> str | None:
        """What results.md should say about how the model met the protocol's resolution (None: it ran at it)."""
        h, w = self.pipe.height, self.pipe.width
        if (h, w) == (height, width):
            return None
        return (f"ran at its own {h}x{w}: the given frames resized from {height}x{width} (whole frames"
                f"{', aspect changed' if h * width != w * height else ''}) and its video resized back; the given "
                f"frames returned exactly")


# ------------------------------------------------------------------------------------------ running
def load_clip(root: str | Path, clip: Clip, protocol: ProtocolConfig, sources: dict[str, VideoSource]) -> torch.Tensor:
    """Ground truth [T, 3, H, W] in [-1, 1] at the protocol's resolution."""
    if clip.video not in sources:
        raise FileNotFoundError(f"clip video {clip.video!r} is not under {root}")
    frames = read_frames(sources[clip.video], clip.frames)
    return to_model_frames(frames, protocol.height, protocol.width)


def _mean(values: list[float]) -> float | None:
    """Mean of per-frame (or per-clip) scores, None when empty."""
    return float(np.mean(values)) if values else None


def _jsonable(value):
    """inf/nan -> strings (JSON has no such numbers); floats rounded to 6 significant digits for stable files."""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            return "nan"
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def markdown_table(results: dict) -> str:
    """The results as a markdown table (one row per method)."""
    p = results["protocol"]
    lines = [f"**{p['task']}**: {results['num_clips']} clips of {p['num_frames']} frames at "
             f"{p['height']}x{p['width']} (frames generated: {results['generated_frames']}); "
             f"dataset `{results['dataset_root']}`, seed {p['seed']}", "",
             "| method | PSNR ↑ | SSIM ↑ | LPIPS ↓ | FVD ↓ |", "|---|---:|---:|---:|---:|"]

    def fmt(v, digits):
        if v is None:
            return "–"
        if isinstance(v, str):
            return "∞" if v == "inf" else v
        return f"{v:.{digits}f}"

    for name, m in results["methods"].items():
        lines.append(f"| {name} | {fmt(m['psnr'], 2)} | {fmt(m['ssim'], 4)} | {fmt(m['lpips'], 4)} | "
                     f"{fmt(m['fvd'], 1)} |")
    if results.get("notes"):
        lines += [""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def run_benchmark(root: str | Path, methods: Mapping[str, Method], out_dir: str | Path,
                  protocol: ProtocolConfig | None = None, clips_file: str | Path | None = None,
                  extractor=None, lpips=None, num_grids: int = 4, fps: int = 8, fvd_batch: int = 8,
                  progress: bool = False, lpips_skipped: str | None = None) -> dict:
    """Score every method on the protocol's clips; write results.json, results.md, clips.json, samples/*.mp4.
    progress: a bar over the clips with each method's running PSNR (a benchmark of a large model takes hours).
    lpips_skipped: why lpips is None, for the notes (a file that failed to load is not "no weights").

    clips_file: an existing file is read and its clips and protocol reused (a protocol passed too must agree);
    a missing one is written with the freshly selected clips. Either way a copy is written to out_dir/clips.json.
    Returns the results dict (floats; PSNR at most metrics.PSNR_MAX_DB, finite for exact matches).
    """
    root, out_dir = Path(root), Path(out_dir)
    if not methods:
        raise ValueError("no methods to evaluate")
    # out_dir is made only once the clips are chosen: a bad root or clips file leaves no empty folder behind
    if clips_file is not None and Path(clips_file).is_file():
        clips, file_protocol = load_clips(clips_file)
        if protocol is not None and asdict(protocol) != asdict(file_protocol):
            raise ValueError(f"{clips_file} was drawn for protocol {asdict(file_protocol)}, not {asdict(protocol)}")
        protocol = file_protocol
    else:
        protocol = protocol or PROTOCOLS[DEFAULT_PRESETS["interpolation"]]
        clips = select_clips(root, protocol)
        if clips_file is not None:
            save_clips(clips_file, clips, protocol, root)
    save_clips(out_dir / "clips.json", clips, protocol, root)  # makes out_dir

    sources = {s.id: s for s in list_videos(root)}
    mask = protocol.mask()
    given_flags = ~mask
    per_clip: dict[str, dict] = {}
    frame_scores = {name: {"psnr": [], "ssim": [], "lpips": []} for name in methods}
    fvd_stats = {name: FeatureStats() for name in methods} if extractor is not None else None
    gt_stats = FeatureStats() if extractor is not None else None
    buffers: dict[str, list[torch.Tensor]] = {name: [] for name in list(methods) + ["__gt__"]}

    def flush(force=False):
        if extractor is None:
            return
        for name, buf in buffers.items():
            if buf and (force or len(buf) >= fvd_batch):
                feats = extractor(torch.stack(buf))
                (gt_stats if name == "__gt__" else fvd_stats[name]).update(feats)
                buf.clear()

    (out_dir / "samples").mkdir(exist_ok=True)
    bar = tqdm(clips, desc=f"{protocol.task} clips", unit="clip", disable=not progress, dynamic_ncols=True)
    for i, clip in enumerate(bar):
        gt = load_clip(root, clip, protocol, sources)
        given = gt.masked_fill(mask[:, None, None, None], 0.0)
        outputs, scores = {}, {}
        for name, method in methods.items():
            out = torch.as_tensor(method(given.clone(), mask.clone())).float().cpu()
            if out.shape != gt.shape:
                raise ValueError(f"method {name!r} returned shape {tuple(out.shape)}, expected {tuple(gt.shape)}")
            outputs[name] = out.clamp(-1, 1)
            m = masked_frame_metrics(outputs[name], gt, mask, lpips=lpips)
            scores[name] = {k: _mean(v) for k, v in m.items()}
            for k, v in m.items():
                frame_scores[name][k].append(_mean(v))
            if extractor is not None:
                buffers[name].append(outputs[name])
        if extractor is not None:
            buffers["__gt__"].append(gt)
            flush()
        per_clip[clip.name] = scores
        bar.set_postfix_str(", ".join(f"{n} {_mean(frame_scores[n]['psnr']):.2f} dB" for n in methods), refresh=False)
        if i < num_grids:
            grid = make_grid_video([gt] + [outputs[n] for n in methods], given=[given_flags] * (1 + len(methods)))
            safe = clip.video.replace("/", "_").rsplit(".", 1)[0]
            write_video(out_dir / "samples" / f"{i:03d}_{safe}_{clip.start}.mp4", grid, fps=fps)
    flush(force=True)

    notes = [f"methods, left to right in the sample grids: ground truth, {', '.join(methods)}"]
    for name, method in methods.items():
        note = getattr(method, "note", None)
        text = note(protocol.height, protocol.width) if callable(note) else None
        if text:
            notes.append(f"{name}: {text}")
    if extractor is None:
        notes.append("FVD not computed (no I3D feature extractor: --fvd off, or no I3D weights found)")
    else:
        notes.append(f"FVD settings: {getattr(extractor, 'settings', 'custom')} (covariance ddof="
                     f"{extractor_ddof(extractor)}); see the README's FVD section for the numbers they match")
        if protocol.num_frames < 9:
            notes.append(f"FVD on {protocol.num_frames}-frame clips: frames repeated to reach I3D's 9-frame minimum "
                         f"(both sets alike), a deviation from FVD-16")
    if lpips is None:
        notes.append(f"LPIPS not computed ({lpips_skipped or 'no local LPIPS weights'})")
    method_results = {}
    for name in methods:
        fs = frame_scores[name]
        fvd = fvd_from_stats(fvd_stats[name], gt_stats, extractor_ddof(extractor)) \
            if extractor is not None and len(clips) > 1 else None
        method_results[name] = {"psnr": _mean(fs["psnr"]), "ssim": _mean(fs["ssim"]),
                                "lpips": _mean(fs["lpips"]) if lpips is not None else None, "fvd": fvd}
    results = {"protocol": asdict(protocol), "dataset_root": str(root), "num_clips": len(clips),
               "generated_frames": mask.nonzero().flatten().tolist(), "methods": method_results,
               "per_clip": per_clip, "notes": notes}
    json_results = _jsonable(results)
    (out_dir / "results.json").write_text(json.dumps(json_results, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown_table(json_results))
    return results
