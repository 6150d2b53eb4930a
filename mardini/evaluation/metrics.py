"""Frame metrics for conditional generation: PSNR, SSIM (and LPIPS where its weights are on disk).

All functions take pixel tensors in [-1, 1] (this project's convention) shaped [N, 3, H, W] (N frames) and return
one value per frame, except clip_psnr (clips [N, T, 3, H, W] -> one value per clip); they are computed on the
[0, 1] scale (data range 1). For video tasks, evaluate only the generated frames (``mask`` True): given frames are
copies of the input and would inflate every score.

PSNR is capped at PSNR_MAX_DB (the MSE floored at 1e-20): a frame identical to its target scores 200 dB, not inf,
so that one exact match (a static clip, a duplicated frame) does not make a whole dataset's mean inf. No nonzero
8-bit error reaches the cap (one grey level off in one pixel of a 4K frame is ~122 dB). The learning benchmark's
per-clip PSNR uses the same cap (psnr_from_mse).

SSIM follows Wang et al. (2004): an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, weighted local
statistics with population (not sample) variances, computed per RGB channel over the "valid" region (no padding)
and averaged over channels and pixels. Frames smaller than 11 pixels use the largest odd window that fits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
PSNR_MAX_DB = 200.0  # PSNR of an exact match (see the module docstring)


def unit_range_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames [N, C, H, W] (or [C, H, W]) in [-1, 1] -> the same in [0, 1], float64, shapes checked: what every pixel
    metric here (and the learning benchmark's per-clip PSNR) compares."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.ndim == 3:
        pred, target = pred[None], target[None]
    if pred.ndim != 4:
        raise ValueError(f"frames must be [N, C, H, W] (or [C, H, W]), got {tuple(pred.shape)}")
    # [-1, 1] -> [0, 1]; float64 so that tiny differences are not lost
    return (pred.double().clamp(-1, 1) + 1) / 2, (target.double().clamp(-1, 1) + 1) / 2


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB (data range 1) of mean squared errors, at most PSNR_MAX_DB: finite for an exact match."""
    return -10.0 * torch.log10(mse.clamp_min(10.0 ** (-PSNR_MAX_DB / 10)))


def psnr_frames(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per frame ([N] float64); PSNR_MAX_DB (200) where a frame is identical to its target."""
    p, t = unit_range_pair(pred, target)
    return psnr_from_mse((p - t).pow(2).flatten(1).mean(1))


def squared_errors(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-clip squared errors of the generated frames, in [0, 1] pixel units (float64): pred/target
    [N, T, 3, H, W] in [-1, 1], mask [T] (True = generated) -> [N, G*3*H*W]."""
    p, t = unit_range_pair(pred[:, mask].flatten(0, 1), target[:, mask].flatten(0, 1))
    return (p - t).pow(2).reshape(pred.shape[0], -1)


def clip_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PSNR per clip over its generated frames -> [N] (dB, at most PSNR_MAX_DB). The learning benchmark, the
    periodic evaluation and the validation videos all report this, so their samples, posterior means and baselines
    compare. Why not the mean of per-frame PSNRs (mardini-eval's protocols, as published interpolation benchmarks):
    frames next to a given frame are easy, and averaging their high dBs lifts the score (the default job's samples
    +0.2 dB, the linear blend +0.4 dB on 32 held-out clips), and by different amounts for different answers."""
    return psnr_from_mse(squared_errors(pred, target, mask).mean(1))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """1-D normalised Gaussian [size] (float64)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _band(g: torch.Tensor, n: int) -> torch.Tensor:
    """[n - k + 1, n] matrix whose row i holds the window g at columns i .. i + k - 1 ('valid' correlation)."""
    k = g.numel()
    out = torch.zeros(n - k + 1, n, dtype=g.dtype, device=g.device)
    for i in range(n - k + 1):
        out[i, i:i + k] = g
    return out


def ssim_frames(pred: torch.Tensor, target: torch.Tensor, window: int = SSIM_WINDOW,
                sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """SSIM per frame ([N] float64) with a Gaussian window; 1.0 for identical frames."""
    p, t = unit_range_pair(pred, target)
    n, c, h, w = p.shape
    size = min(window, h, w)
    size -= (size + 1) % 2  # odd
    g = gaussian_window(size, sigma).to(p.device)
    band_h, band_w = _band(g, h), _band(g, w)  # [h - size + 1, h], [w - size + 1, w]

    def blur(x):  # separable Gaussian over the valid region, as two banded matmuls (fast in float64)
        return band_h @ x @ band_w.T

    mu_p, mu_t = blur(p), blur(t)
    var_p = blur(p * p) - mu_p ** 2
    var_t = blur(t * t) - mu_t ** 2
    cov = blur(p * t) - mu_p * mu_t
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # data range 1
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2))
    return ssim_map.flatten(1).mean(1)


def masked_frame_metrics(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                         lpips: Callable | None = None) -> dict[str, list[float]]:
    """Per-frame metrics on the generated frames of one video. pred, target: [T, 3, H, W]; mask: [T] bool
    (True = generated). Returns {"psnr": [...], "ssim": [...], ("lpips": [...])}, one value per masked frame."""
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if mask.ndim != 1 or mask.shape[0] != pred.shape[0]:
        raise ValueError(f"mask must be [T] with T={pred.shape[0]}, got {tuple(mask.shape)}")
    p, t = pred[mask.to(pred.device)], target[mask.to(target.device)]
    out = {"psnr": psnr_frames(p, t).tolist(), "ssim": ssim_frames(p, t).tolist()}
    if lpips is not None:
        out["lpips"] = [float(v) for v in torch.as_tensor(lpips(p.float(), t.float())).flatten().tolist()]
    return out


# ------------------------------------------------------------------------------------------------ LPIPS
def load_lpips(path: str | Path | None, device="cpu") -> Callable | None:
    """LPIPS from local weights only (None for no path). No download is ever attempted.

    path may be (a) a TorchScript module taking two [N, 3, H, W] tensors in [-1, 1] and returning N distances
    (export one once with the ``lpips`` package: ``torch.jit.trace(lpips.LPIPS(net='alex'), (x, y))``), or
    (b) the linear-layer weights file of the ``lpips`` package (e.g. ``alex.pth``), used when that package is
    installed and its backbone weights are already in the torch hub cache.
    Raises FileNotFoundError / ValueError naming the reason when the file cannot be used: the caller decides
    whether that stops the run (weights asked for by name) or only skips LPIPS (weights found in a folder).
    """
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights {path} do not exist")
    try:
        module = torch.jit.load(str(path), map_location=device).eval()
        return lambda a, b: module(a.to(device), b.to(device)).flatten().cpu()
    except Exception:  # noqa: BLE001 - not TorchScript; try the lpips package
        pass
    try:
        import lpips as lpips_pkg  # optional; not a dependency of this project
    except ImportError:
        raise ValueError(f"{path} is not a TorchScript LPIPS module, and the lpips package that reads its own "
                         f"weights files (alex.pth) is not installed: pip install lpips, or give a TorchScript "
                         f"export") from None
    try:
        net = lpips_pkg.LPIPS(net=path.stem if path.stem in ("alex", "vgg", "squeeze") else "alex",
                              model_path=str(path), verbose=False).to(device).eval()
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path} is neither a TorchScript LPIPS module nor lpips weights ({exc})") from None

    @torch.no_grad()
    def distance(a, b):
        return net(a.to(device), b.to(device)).flatten().cpu()

    return distance
