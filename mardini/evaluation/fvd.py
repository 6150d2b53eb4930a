"""Fréchet Video Distance: streaming feature statistics, the Fréchet distance, and FVD between video sets.

    FVD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

between Gaussians fitted to I3D features (i3d.py) of two sets of videos. Contents:
  FeatureStats         mean and covariance accumulated batch by batch in float64 (sums and outer-product sums
                       around a fixed shift, so memory is O(D^2) whatever the number of videos)
  frechet_distance     scipy.linalg.sqrtm with the usual safeguards
  fvd_between          FVD between two iterables of video batches
  fvd_folders          FVD between two folders of videos (video files and/or frame folders)
  fvd_model_vs_reference  FVD of a method's outputs against the reference clips it was conditioned on
  periodic_fvd         metrics on a small fixed validation set, for the trainer (see its docstring)

An ``extractor`` is any callable ``videos [B, T, 3, H, W] in [-1, 1] -> features [B, D]`` (numpy or tensor);
normally an ``I3DFeatureExtractor``. The covariance normalisation follows the extractor's lineage (its ``ddof``:
1 = unbiased, as ``np.cov``, TF-GAN and VideoGPT; 0 = divide by N, as StyleGAN-V), unless a call passes ddof; a
plain callable gets ddof=1.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from scipy import linalg
from tqdm.auto import tqdm

from .data import list_videos, read_frames, to_model_frames

log = logging.getLogger(__name__)

Extractor = Callable[[torch.Tensor], "np.ndarray | torch.Tensor"]


# ------------------------------------------------------------------------------------------ statistics
class FeatureStats:
    """Streaming mean / covariance of feature vectors, float64.

    Keeps n, S1 = sum(x - k) and S2 = sum((x - k)(x - k)^T), where the shift k is the mean of the first batch
    (shifting keeps the sums small, so the covariance does not suffer from cancellation when |mean| >> spread).
    Any split of the same rows into batches gives the same mean and covariance (to rounding).
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s1: np.ndarray | None = None
        self.s2: np.ndarray | None = None

    def update(self, features) -> "FeatureStats":
        x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        x = x.astype(np.float64, copy=False)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {x.shape}")
        if x.shape[0] == 0:
            return self
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise ValueError(f"feature size {x.shape[1]} differs from earlier batches ({self.dim})")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.s1 = np.zeros(self.dim)
            self.s2 = np.zeros((self.dim, self.dim))
        d = x - self.shift
        self.s1 += d.sum(axis=0)
        self.s2 += d.T @ d
        self.n += x.shape[0]
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add another FeatureStats' rows (e.g. from another process)."""
        if other.n == 0:
            return self
        if self.n == 0:
            self.dim, self.n = other.dim, other.n
            self.shift, self.s1, self.s2 = other.shift.copy(), other.s1.copy(), other.s2.copy()
            return self
        if other.dim != self.dim:
            raise ValueError(f"cannot merge feature sizes {self.dim} and {other.dim}")
        delta = other.shift - self.shift  # rows of other, relative to our shift: d + delta
        self.s1 += other.s1 + other.n * delta
        self.s2 += other.s2 + np.outer(other.s1, delta) + np.outer(delta, other.s1) + other.n * np.outer(delta, delta)
        self.n += other.n
        return self

    @property
    def mean(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("no features accumulated")
        return self.shift + self.s1 / self.n

    def cov(self, ddof: int = 1) -> np.ndarray:
        if self.n - ddof <= 0:
            raise ValueError(f"covariance with ddof={ddof} needs more than {ddof} rows, got {self.n}")
        c = (self.s2 - np.outer(self.s1, self.s1) / self.n) / (self.n - ddof)
        return (c + c.T) / 2  # exactly symmetric

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        np.savez(path, n=self.n, shift=self.shift, s1=self.s1, s2=self.s2)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        data = np.load(path)
        out = cls(int(data["shift"].shape[0]))
        out.n, out.shift, out.s1, out.s2 = int(data["n"]), data["shift"], data["s1"], data["s2"]
        return out

    @classmethod
    def of(cls, features) -> "FeatureStats":
        return cls().update(features)


# ------------------------------------------------------------------------------------------ distance
def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, imag_tol: float = 1e-3) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    The trace term uses scipy.linalg.sqrtm(sigma1 @ sigma2). Safeguards (as pytorch-fid / StyleGAN do):
    * singular product (sqrtm not finite, or its square far from the product): retry with eps added to both
      diagonals;
    * complex result from rounding: the imaginary part must be small on the diagonal (else ValueError), then it
      is dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    diff = mu1 - mu2

    def sqrt_product(s1, s2):
        product = s1 @ s2
        with warnings.catch_warnings():  # singularity is detected below from the residual
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            root = linalg.sqrtm(product)
        scale = max(np.linalg.norm(product), 1e-300)
        ok = np.isfinite(root).all() and np.linalg.norm(root @ root - product) / scale < 1e-3
        return root, ok

    covmean, ok = sqrt_product(sigma1, sigma2)
    if not ok:
        log.warning("Fréchet distance: sigma1 @ sigma2 is (nearly) singular; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean, ok = sqrt_product(sigma1 + offset, sigma2 + offset)
        if not np.isfinite(covmean).all():
            raise ValueError("matrix square root is not finite even with a diagonal offset")
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(np.diagonal(covmean).imag))
        if largest > imag_tol:
            raise ValueError(f"matrix square root has a large imaginary component ({largest:.3g})")
        covmean = covmean.real
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(value)


def extractor_ddof(extractor, ddof: int | None = None) -> int:
    """The covariance normalisation to use: an explicit ddof, else the extractor's lineage (I3DFeatureExtractor
    .ddof), else 1."""
    return int(ddof if ddof is not None else getattr(extractor, "ddof", 1))


def fvd_from_stats(a: FeatureStats, b: FeatureStats, ddof: int = 1) -> float:
    return frechet_distance(a.mean, a.cov(ddof), b.mean, b.cov(ddof))


def fvd_from_features(features_a, features_b, ddof: int = 1) -> float:
    """FVD between two feature arrays [N, D] and [M, D]."""
    return fvd_from_stats(FeatureStats.of(features_a), FeatureStats.of(features_b), ddof)


# ------------------------------------------------------------------------------------------ video sets
def accumulate(batches: Iterable[torch.Tensor], extractor: Extractor, stats: FeatureStats | None = None,
               progress: str | None = None) -> FeatureStats:
    """Run extractor over video batches [B, T, 3, H, W] and add their features to stats; progress: the description
    of a bar counting the videos (None: no bar)."""
    stats = stats if stats is not None else FeatureStats()
    with tqdm(desc=progress, unit=" videos", disable=progress is None, dynamic_ncols=True) as bar:
        for batch in batches:
            stats.update(extractor(batch))
            bar.update(len(batch))
    return stats


def fvd_between(videos_a: Iterable[torch.Tensor], videos_b: Iterable[torch.Tensor], extractor: Extractor,
                ddof: int | None = None) -> float:
    """FVD between two iterables of video batches [B, T, 3, H, W] in [-1, 1]."""
    return fvd_from_stats(accumulate(videos_a, extractor), accumulate(videos_b, extractor),
                          extractor_ddof(extractor, ddof))


def iter_folder_batches(folder: str | Path, num_frames: int | None = 16, batch_size: int = 8,
                        height: int | None = None, width: int | None = None, max_videos: int | None = None,
                        counter: dict | None = None) -> Iterator[torch.Tensor]:
    """Batches [B, T, 3, H, W] of the first num_frames frames of every video under folder (sorted by id).

    Videos shorter than num_frames are skipped (counted in counter['skipped']); without height/width the native
    size is kept, and a batch is flushed whenever the size changes.
    """
    counter = counter if counter is not None else {}
    counter.setdefault("used", 0)
    counter.setdefault("skipped", 0)
    pending: list[torch.Tensor] = []
    for source in list_videos(folder):
        if max_videos is not None and counter["used"] >= max_videos:
            break
        frames = read_frames(source)
        if num_frames is not None:
            if frames.shape[0] < num_frames:
                log.warning("FVD: skipping %s (%d frames < %d)", source.id, frames.shape[0], num_frames)
                counter["skipped"] += 1
                continue
            frames = frames[:num_frames]
        video = to_model_frames(frames, height, width)
        if pending and (video.shape != pending[0].shape or len(pending) == batch_size):
            yield torch.stack(pending)
            pending = []
        pending.append(video)
        counter["used"] += 1
    if pending:
        yield torch.stack(pending)


def fvd_folders(folder_a: str | Path, folder_b: str | Path, extractor: Extractor, num_frames: int | None = 16,
                batch_size: int = 8, height: int | None = None, width: int | None = None,
                max_videos: int | None = None, ddof: int | None = None, progress: bool = False) -> dict:
    """FVD between two folders of videos (mp4/avi/... files and/or frame folders, any mix); progress: a bar per
    folder counting its videos.

    Returns {"fvd", "num_videos_a", "num_videos_b", "skipped_a", "skipped_b", "num_frames", "height", "width"}
    (height, width: the size videos were resized to, None for their native size: FVD depends on it)."""
    def stats_of(folder, count: dict) -> FeatureStats:
        batches = iter_folder_batches(folder, num_frames, batch_size, height, width, max_videos, count)
        return accumulate(batches, extractor, progress=f"I3D features of {folder}" if progress else None)

    count_a, count_b = {}, {}
    stats_a, stats_b = stats_of(folder_a, count_a), stats_of(folder_b, count_b)
    for folder, count in ((folder_a, count_a), (folder_b, count_b)):
        if count["used"] < 2:
            raise ValueError(f"FVD needs at least 2 videos with >= {num_frames} frames in {folder}; found "
                             f"{count['used']} ({count['skipped']} too short)")
    return {"fvd": fvd_from_stats(stats_a, stats_b, extractor_ddof(extractor, ddof)), "num_videos_a": count_a["used"],
            "num_videos_b": count_b["used"], "skipped_a": count_a["skipped"], "skipped_b": count_b["skipped"],
            "num_frames": num_frames, "height": height, "width": width}


def fvd_model_vs_reference(generate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                           reference: torch.Tensor, mask: torch.Tensor, extractor: Extractor,
                           batch_size: int = 8, reference_stats: FeatureStats | None = None,
                           ddof: int | None = None) -> float:
    """FVD of generated videos against the reference clips they were conditioned on.

    reference: [N, T, 3, H, W] in [-1, 1]; mask: [T] or [N, T] bool (True = generate). ``generate(given, mask)``
    receives a batch whose masked frames are zeroed and must return [B, T, 3, H, W]. Pass reference_stats to
    reuse the reference features of an earlier call.
    """
    N, T = reference.shape[:2]
    mask = torch.as_tensor(mask, dtype=torch.bool)
    mask = mask.expand(N, T) if mask.ndim == 1 else mask
    generated = FeatureStats()
    for start in range(0, N, batch_size):
        ref, m = reference[start:start + batch_size], mask[start:start + batch_size]
        given = ref.masked_fill(m[:, :, None, None, None].to(ref.device), 0.0)
        generated.update(extractor(generate(given, m)))
    if reference_stats is None:
        reference_stats = accumulate((reference[i:i + batch_size] for i in range(0, N, batch_size)), extractor)
    return fvd_from_stats(generated, reference_stats, extractor_ddof(extractor, ddof))


# ------------------------------------------------------------------------------------------ training
PERIODIC_TASKS = {"interpolation": dict(task="interpolation"), "i2v": dict(task="i2v", position="middle")}


def load_default_extractor(weights: str | Path | None = None, weights_dir: str | Path | None = None,
                           device="cpu", short_clips: str = "stretch", batch_size: int = 8,
                           settings: str | None = None):
    """An I3DFeatureExtractor from an explicit file or the weights folder (with the settings of the file's
    lineage unless named, see i3d.FVD_SETTINGS), or None when no file is there."""
    from .i3d import I3DFeatureExtractor
    from .weights import find_i3d_weights

    path = Path(weights) if weights else find_i3d_weights(weights_dir)
    if path is None or not path.is_file():
        return None
    return I3DFeatureExtractor.from_file(path, device=device, settings=settings, short_clips=short_clips,
                                         batch_size=batch_size)


def model_generate_fn(model, autoencoder, diffusion, lowres_mode: str = "latents", num_steps: int | None = None,
                      seed: int = 0):
    """A ``generate(given, mask)`` for periodic_fvd from the trainer's objects (same calls as
    training.sampling.validation_videos): encode the given frames and build the planner input with the training
    run's lowres_mode (data.latent_cache.encode_given), model.generate, decode."""
    from ..data.latent_cache import encode_given

    @torch.no_grad()
    def generate(given: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        given, mask = given.to(device), mask.to(device)
        z, z_lo = encode_given(autoencoder, given, mask, model.cfg.lowres_factor, lowres_mode)
        generator = torch.Generator(device=device).manual_seed(seed)
        out = model.generate(z, mask, diffusion, z_lo=z_lo, num_steps=num_steps, generator=generator)
        return autoencoder.decode(out).float()

    return generate


@torch.no_grad()
def periodic_fvd(generate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], videos: torch.Tensor,
                 extractor: Extractor | None = None, tasks: Iterable[str] = ("interpolation", "i2v"),
                 batch_size: int = 4, cache: dict | None = None, prefix: str = "val/") -> dict[str, float]:
    """Metrics on a small fixed validation set, cheap enough to run every few thousand steps.

    generate: ``(given [B, T, 3, H, W] with masked frames zeroed, mask [B, T] bool) -> [B, T, 3, H, W]`` in
    [-1, 1] (build one from the trainer's objects with ``model_generate_fn``). videos: [N, T, 3, H, W] fixed
    ground-truth clips. extractor: I3DFeatureExtractor (``load_default_extractor(short_clips='stretch')``) or
    None to skip FVD (PSNR/SSIM are still computed). cache: a dict the caller keeps between calls; the
    reference features are computed once and stored there.

    Returns {f"{prefix}{task}_psnr", f"{prefix}{task}_ssim", f"{prefix}{task}_fvd" (when an extractor is
    given)} for each task, PSNR/SSIM on generated frames only: PSNR per clip (metrics.clip_psnr, as the learning
    benchmark's), SSIM per frame, each averaged. With N videos the covariance has rank < N, so the
    FVD of a small set is biased upwards; compare it across steps of one run, not with published numbers.

    How the trainer calls it (``Trainer.evaluate``, every ``train.eval_every`` steps, main process only)::

        extractor = load_default_extractor(weights_dir=cfg.train.eval_weights_dir or None, device=device)  # once
        cache = {}                                                                                          # once
        gen = model_generate_fn(ema_model, autoencoder, diffusion, cfg.data.lowres_mode, seed=cfg.seed)
        metrics = periodic_fvd(gen, val_videos, extractor, cache=cache)
    """
    from ..masking import task_mask
    from .metrics import clip_psnr, ssim_frames

    cache = cache if cache is not None else {}
    N, T = videos.shape[:2]
    metrics: dict[str, float] = {}
    if extractor is not None:
        key = ("reference_stats", id(extractor), tuple(videos.shape), float(videos.float().sum()))
        if key not in cache:
            cache[key] = accumulate((videos[i:i + batch_size] for i in range(0, N, batch_size)), extractor)
        reference_stats = cache[key]
    for name in tasks:
        if name not in PERIODIC_TASKS:
            raise ValueError(f"unknown task {name!r}; expected one of {', '.join(PERIODIC_TASKS)}")
        spec = PERIODIC_TASKS[name]
        mask_t = task_mask(spec["task"], T, **{k: v for k, v in spec.items() if k != "task"})
        psnrs, ssims, generated = [], [], FeatureStats()
        for start in range(0, N, batch_size):
            ref = videos[start:start + batch_size]
            m = mask_t[None].expand(ref.shape[0], T)
            given = ref.masked_fill(m[:, :, None, None, None].to(ref.device), 0.0)
            out = generate(given, m).to(ref.device)
            psnrs.append(clip_psnr(out, ref, mask_t))
            ssims.append(ssim_frames(out[m], ref[m]))
            if extractor is not None:
                generated.update(extractor(out))
        metrics[f"{prefix}{name}_psnr"] = float(torch.cat(psnrs).mean())
        metrics[f"{prefix}{name}_ssim"] = float(torch.cat(ssims).mean())
        if extractor is not None:
            metrics[f"{prefix}{name}_fvd"] = fvd_from_stats(generated, reference_stats, extractor_ddof(extractor))
    return metrics
