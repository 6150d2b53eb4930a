"""diffusers KL autoencoders as VideoAutoencoders: image VAEs applied per frame, and video VAEs.

``KLAutoencoder`` wraps an image VAE (``AutoencoderKL``: SD 1.x/2.x, SDXL, SD3, FLUX.1 ...). Frames are folded
into the batch and encoded ``frames_per_chunk`` at a time (the base class does this), so memory is bounded
whatever the clip length. ``VideoKLAutoencoder`` wraps a video VAE (``AutoencoderKLCogVideoX`` by default;
any diffusers class taking [B, C, T, H, W]) that compresses time as well (``temporal_compression`` > 1).

Both load from a local folder (``pretrained``; ``subfolder="vae"`` inside a pipeline folder) or build from a
config dict with random weights (tests, experiments), and normalise latents with the VAE config's
``scaling_factor`` / ``shift_factor`` (``z = (mean - shift) * scale``) unless overridden. Where the config has
per-channel ``latents_mean`` / ``latents_std`` (e.g. Wan, some SDXL variants) those are applied first:
``z = ((mean - latents_mean) / latents_std - shift) * scale``. Training uses the posterior mean by default
(``sample_posterior=True`` draws from it instead). The VAE is frozen (``requires_grad_(False)``, eval mode).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from einops import rearrange
from torch import Tensor

from .base import VideoAutoencoder, _check_5d

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _vae_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"diffusers has no class {name!r} (installed diffusers {diffusers.__version__})")
    return cls


def absolute_folder(pretrained: str | Path) -> str:
    """A local path (a VAE folder, a data root, ...) as the absolute path runs, caches and exports record (`~`
    expanded, links kept): what reads it later may run in another working directory."""
    return os.path.abspath(os.path.expanduser(pretrained))


def vae_folder(pretrained: str, subfolder: str = "") -> Path:
    """The local folder holding a VAE's config.json. Nothing is looked up on a model hub: a name that is not a
    folder here (a hub id, or the path an export recorded on another machine) fails in one line."""
    folder = Path(pretrained).expanduser() / (subfolder or "")
    if not (folder / "config.json").is_file():
        found = "holds no config.json" if folder.is_dir() else "does not exist"
        raise FileNotFoundError(f"VAE folder {folder} {found}: give the local folder of a diffusers VAE "
                                f"(config.json + weights; nothing is downloaded)")
    return folder


def read_vae_config(pretrained: str, subfolder: str = "", vae_class: str = "AutoencoderKL") -> dict:
    """The config.json of a saved VAE, without loading weights (e.g. to check latent channels at start-up)."""
    vae_folder(pretrained, subfolder)
    return dict(_vae_class(vae_class).load_config(pretrained, subfolder=subfolder or None, local_files_only=True))


def _spatial_compression(config: dict) -> int:
    if config.get("spatial_compression_ratio"):
        return int(config["spatial_compression_ratio"])
    return 2 ** (len(config["block_out_channels"]) - 1)


def _temporal_compression(config: dict) -> int:
    for key in ("temporal_compression_ratio", "temporal_compression", "scale_factor_temporal"):
        if config.get(key):
            return int(config[key])
    return 1


def latent_properties(config: dict) -> dict:
    """{"latent_channels", "spatial_compression", "temporal_compression"} of a VAE config (read_vae_config)."""
    channels = config.get("latent_channels", config.get("z_dim"))
    return {"latent_channels": int(channels), "spatial_compression": _spatial_compression(config),
            "temporal_compression": _temporal_compression(config)}


def _load_vae(pretrained: str, subfolder: str, config: Optional[dict], vae_class: str, dtype: str, seed: int):
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if bool(pretrained) == (config is not None):
        raise ValueError("give exactly one of `pretrained` (a local folder) and `config` (a dict: random weights)")
    cls = _vae_class(vae_class)
    if pretrained:
        vae_folder(pretrained, subfolder)
        vae = cls.from_pretrained(pretrained, subfolder=subfolder or None, torch_dtype=DTYPES[dtype],
                                  local_files_only=True)
    else:
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG alone
            torch.manual_seed(seed)
            vae = cls.from_config(dict(config))
        vae = vae.to(DTYPES[dtype])
    vae.requires_grad_(False)
    return vae.eval()


class _DiffusersVAE(VideoAutoencoder):
    """What the image and video wrappers share: loading, normalisation constants, posterior choice."""

    default_vae_class = "AutoencoderKL"

    def __init__(
        self,
        pretrained: str = "",
        subfolder: str = "",
        config: Optional[dict] = None,
        vae_class: str = "",
        scaling_factor: Optional[float] = None,
        shift_factor: Optional[float] = None,
        sample_posterior: bool = False,
        frames_per_chunk: Optional[int] = None,
        dtype: str = "float32",
        seed: int = 0,
    ):
        vae_class = vae_class or self.default_vae_class
        vae = _load_vae(pretrained, subfolder, config, vae_class, dtype, seed)
        cfg = dict(vae.config)
        scale = cfg.get("scaling_factor") if scaling_factor is None else scaling_factor
        shift = cfg.get("shift_factor") if shift_factor is None else shift_factor
        scale = 1.0 if scale is None else float(scale)
        shift = 0.0 if shift is None else float(shift)
        if scale == 0:
            raise ValueError("scaling_factor must be non-zero")
        if frames_per_chunk is not None and frames_per_chunk < 1:
            raise ValueError(f"frames_per_chunk must be >= 1 or None, got {frames_per_chunk}")
        super().__init__(scaling_factor=scale, shift_factor=shift, frames_per_chunk=frames_per_chunk)
        self.vae = vae
        props = latent_properties(cfg)
        self.latent_channels = props["latent_channels"]
        self.spatial_compression = props["spatial_compression"]
        self.sample_posterior = bool(sample_posterior)
        self.generator: Optional[torch.Generator] = None  # used by sample_posterior=True when set
        # An absolute folder: a cache or an export that records it is read from other working directories too.
        self.source = {"pretrained": absolute_folder(pretrained) if pretrained else pretrained, "subfolder": subfolder,
                       "vae_class": vae_class, "dtype": dtype, "seed": seed if config is not None else None}
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is not None and std is not None:
            shape = self._channel_shape()
            self.register_buffer("latents_mean", torch.tensor(mean, dtype=torch.float32).view(shape), persistent=False)
            self.register_buffer("latents_std", torch.tensor(std, dtype=torch.float32).view(shape), persistent=False)
        else:
            self.latents_mean = self.latents_std = None

    def _channel_shape(self) -> tuple[int, ...]:
        return (1, -1, 1, 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _latents(self, x: Tensor) -> Tensor:
        """Pixels in the VAE's layout -> raw latents (posterior mean or sample), float32, per-channel-normalised."""
        dist = self.vae.encode(x.to(self.dtype)).latent_dist
        z = dist.sample(generator=self.generator) if self.sample_posterior else dist.mean
        z = z.float()
        if self.latents_mean is not None:
            z = (z - self.latents_mean) / self.latents_std
        return z

    def _pixels(self, z: Tensor) -> Tensor:
        if self.latents_mean is not None:
            z = z * self.latents_std + self.latents_mean
        return self.vae.decode(z.to(self.dtype)).sample.float()

    def describe(self) -> dict[str, Any]:
        """JSON-able description: where the weights came from, normalisation, the VAE config (cache metadata)."""
        return {**super().describe(), **self.source, "sample_posterior": self.sample_posterior,
                "vae_config": {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}}

    def extra_repr(self) -> str:
        src = self.source["pretrained"] or "random init"
        return (f"source={src!r}, scaling_factor={self.scaling_factor}, shift_factor={self.shift_factor}, "
                f"sample_posterior={self.sample_posterior}, frames_per_chunk={self.frames_per_chunk}")


class KLAutoencoder(_DiffusersVAE):
    """An image VAE (diffusers ``AutoencoderKL`` by default) applied to every frame.

    Examples::

        KLAutoencoder("/models/sdxl", subfolder="vae")          # a pipeline folder
        KLAutoencoder("/models/flux-vae", frames_per_chunk=4)   # scaling 0.3611 / shift 0.1159 from its config
        KLAutoencoder(config={"block_out_channels": [32, 32], "down_block_types": [...], ...})  # random weights

    Args: pretrained (local folder) or config (dict, random weights drawn with ``seed``); subfolder; vae_class
    (a diffusers class name); scaling_factor / shift_factor (None = the VAE config's); sample_posterior (False:
    the posterior mean); frames_per_chunk (frames per VAE call, None = all at once); dtype of the VAE weights.
    """

    temporal_compression = 1

    def __init__(self, pretrained: str = "", subfolder: str = "", config: Optional[dict] = None,
                 vae_class: str = "AutoencoderKL", scaling_factor: Optional[float] = None,
                 shift_factor: Optional[float] = None, sample_posterior: bool = False,
                 frames_per_chunk: Optional[int] = 8, dtype: str = "float32", seed: int = 0):
        super().__init__(pretrained, subfolder, config, vae_class, scaling_factor, shift_factor, sample_posterior,
                         frames_per_chunk, dtype, seed)

    def encode_frames(self, frames: Tensor) -> Tensor:
        """[N, 3, H, W] in [-1, 1] -> raw latents [N, C, H/s, W/s] (float32)."""
        return self._latents(frames)

    def decode_frames(self, latents: Tensor) -> Tensor:
        """Raw latents [N, C, h, w] -> [N, 3, h*s, w*s] (float32, not clamped)."""
        return self._pixels(latents)


class VideoKLAutoencoder(_DiffusersVAE):
    """A video VAE (diffusers ``AutoencoderKLCogVideoX`` by default) that also compresses time.

    Causal video VAEs map T = 1 + r*k frames to 1 + k latent frames (r = temporal_compression), so clips must
    have such a length. ``frames_per_chunk`` here counts *videos* per VAE call (the VAE itself batches frames
    internally); ``tiling=True`` turns on the VAE's spatial tiling for large frames where it supports it.
    """

    default_vae_class = "AutoencoderKLCogVideoX"

    def __init__(self, pretrained: str = "", subfolder: str = "", config: Optional[dict] = None,
                 vae_class: str = "AutoencoderKLCogVideoX", scaling_factor: Optional[float] = None,
                 shift_factor: Optional[float] = None, sample_posterior: bool = False,
                 frames_per_chunk: Optional[int] = 1, dtype: str = "float32", seed: int = 0, tiling: bool = False):
        super().__init__(pretrained, subfolder, config, vae_class, scaling_factor, shift_factor, sample_posterior,
                         frames_per_chunk, dtype, seed)
        self.temporal_compression = _temporal_compression(dict(self.vae.config))
        if tiling and hasattr(self.vae, "enable_tiling"):
            self.vae.enable_tiling()

    def _channel_shape(self) -> tuple[int, ...]:
        return (1, -1, 1, 1, 1)

    def _check_frames(self, t: int) -> None:
        r = self.temporal_compression
        if r > 1 and (t - 1) % r:
            raise ValueError(f"this video VAE compresses time by {r}: clips need 1 + {r}*k frames, got {t}")

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Shape (T', C, h, w) of one clip's latents: T' = (T - 1) / r + 1."""
        self._check_frames(num_frames)
        s, r = self.spatial_compression, self.temporal_compression
        return ((num_frames - 1) // r + 1, self.latent_channels, height // s, width // s)

    def encode(self, video: Tensor) -> Tensor:
        """[B, T, 3, H, W] in [-1, 1] -> normalised latents [B, T', C, H/s, W/s]."""
        _check_5d(video, "video")
        self._check_frames(video.shape[1])
        s = self.spatial_compression
        if video.shape[-2] % s or video.shape[-1] % s:
            raise ValueError(f"video height and width {tuple(video.shape[-2:])} must be divisible by {s}")
        x = rearrange(video, "b t c h w -> b c t h w")
        z = torch.cat([self._latents(chunk) for chunk in self._chunks(x)], dim=0)
        z = (z - self.shift_factor) * self.scaling_factor
        return rearrange(z, "b c t h w -> b t c h w")

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, T', C, h, w] -> [B, T, 3, h*s, w*s] clamped to [-1, 1]."""
        _check_5d(latents, "latents")
        z = rearrange(latents, "b t c h w -> b c t h w") / self.scaling_factor + self.shift_factor
        x = torch.cat([self._pixels(chunk) for chunk in self._chunks(z)], dim=0)
        return rearrange(x, "b c t h w -> b t c h w").clamp(-1.0, 1.0)

    def _chunks(self, x: Tensor):
        n = self.frames_per_chunk
        return [x] if n is None or x.shape[0] <= n else list(x.split(n))


def kl_kwargs_from_config(cfg: Any) -> dict:
    """Constructor kwargs of KLAutoencoder / VideoKLAutoencoder from a run config's ``autoencoder`` node.

    Reads (attribute access, missing keys take the defaults): pretrained, subfolder, vae_class, scaling_factor,
    shift_factor, sample_posterior, frames_per_chunk (0 = all frames at once), dtype.
    """

    def get(key: str, default):
        value = cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)
        return default if value is None and default is not None else value

    if not get("pretrained", ""):
        raise ValueError("autoencoder.pretrained must name a local folder holding a diffusers VAE (config.json + "
                         "weights), e.g. a pipeline folder with autoencoder.subfolder=vae")
    kwargs = {"pretrained": str(get("pretrained", "")), "subfolder": str(get("subfolder", "")),
              "scaling_factor": get("scaling_factor", None), "shift_factor": get("shift_factor", None),
              "sample_posterior": bool(get("sample_posterior", False)), "dtype": str(get("dtype", "float32"))}
    if get("vae_class", ""):
        kwargs["vae_class"] = str(get("vae_class", ""))
    chunk = get("frames_per_chunk", None)
    if chunk is not None:
        kwargs["frames_per_chunk"] = int(chunk) or None
    return kwargs
