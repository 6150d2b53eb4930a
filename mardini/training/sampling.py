"""Validation videos during training: interpolation and image-to-video on fixed clips, with the EMA weights."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.latent_cache import encode_given
from ..data.video_io import make_grid_video, to_uint8_frames, write_video
from ..evaluation.metrics import clip_psnr
from ..masking import task_mask

VALIDATION_TASKS = {"interpolation": dict(task="interpolation"), "i2v": dict(task="i2v", position="middle")}


@torch.no_grad()
def validation_videos(model, autoencoder, diffusion, videos: torch.Tensor, lowres_mode: str, out_dir: Path,
                      step: int, num_steps: int, seed: int, fps: int = 8) -> tuple[dict, dict[str, Path], dict]:
    """videos: [N, T, 3, H, W] ground-truth clips in [-1, 1]. For each task: generate the masked frames from the
    given ones (planner input made with the run's data.lowres_mode, as in training), write a grid (ground truth |
    generated, given frames outlined) to out_dir, and measure PSNR on the generated frames (per clip, as the
    periodic evaluation and the learning benchmark). Returns (metrics as {"samples/<task>_psnr": dB}, {task: mp4
    path}, {task: the grid as uint8 [T, H', W', 3]}): trackers log the frames without reading the file back (which
    would need a video decoder). The metrics are named after the videos they score (samples/<task>, as trackers
    log the videos), not val/: these few clips are not the periodic evaluation's set."""
    device = next(model.parameters()).device
    videos = videos.to(device)
    N, T = videos.shape[:2]
    metrics, paths, grids = {}, {}, {}
    for name, spec in VALIDATION_TASKS.items():
        frame_mask = task_mask(spec["task"], T, **{k: v for k, v in spec.items() if k != "task"}).to(device)
        mask = frame_mask[None].expand(N, T)
        given, z_lo = encode_given(autoencoder, videos, mask, model.cfg.lowres_factor, lowres_mode)
        generator = torch.Generator(device=device).manual_seed(seed)
        z = model.generate(given, mask, diffusion, z_lo=z_lo, num_steps=num_steps, generator=generator)
        frames = autoencoder.decode(z)
        metrics[f"samples/{name}_psnr"] = clip_psnr(frames, videos, frame_mask).mean().item()
        grid = torch.cat([make_grid_video([videos[i], frames[i]], given=[~mask[i].cpu(), ~mask[i].cpu()])
                          for i in range(N)], dim=-2)  # clips stacked vertically
        grids[name] = to_uint8_frames(grid.cpu())
        paths[name] = write_video(out_dir / f"step_{step:06d}_{name}.mp4", grids[name], fps=fps)
    return metrics, paths, grids
