"""MarDiniPipeline: from given frames to a video, for every task one model serves.

The core call places the given frames at chosen positions of a window of T frames and fills in the rest: encode
the given frames, run the planner once, run the sampler on the masked frames, decode. The tasks (interpolation,
image-to-video, expansion, looping, slow motion, long videos) only choose positions, and for videos longer than
the window, a plan of calls (planning.py) whose context frames come from earlier calls.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import export as export_format
from ..autoencoders import build_autoencoder
from ..diffusion import Diffusion
from ..diffusion.config import with_sampling_options
from ..data.latent_cache import LOWRES_MODES, encode_given
from ..models import MarDini
from ..models.fp8 import FP8_LAYERS, use_fp8_gemms
from ..models.layers import check_backend
from .planning import Window, check_plan, expansion_plan, interpolation_plan, long_video_plan

log = logging.getLogger(__name__)

ImageLike = "torch.Tensor | np.ndarray | PIL.Image.Image | str | Path"


def _with_vae(cfg: dict, vae: str | None) -> dict:
    """An export's autoencoder config with its VAE folder replaced by `vae` (None: as recorded). `vae` is the VAE's
    own folder (holding config.json) or, as recorded, a pipeline folder with the recorded subfolder inside."""
    if vae is None:
        return cfg
    if cfg["name"] == "identity":
        raise ValueError(f"vae={vae}: this export uses the identity autoencoder (pixels patched into latents), so "
                         f"there is no VAE to give")
    from ..autoencoders.kl import absolute_folder

    own = (Path(vae).expanduser() / "config.json").is_file()  # recorded absolute, as a training run records it
    return {**cfg, "pretrained": absolute_folder(vae), "subfolder": "" if own else cfg.get("subfolder", "")}


def _autoencoder_from_config(cfg: dict):
    """The autoencoder an export names: identity (no weights) or a diffusers VAE from its local folder."""
    name = cfg["name"]
    if name == "identity":
        return build_autoencoder(name, **{k: cfg[k] for k in ("patch_size", "scale", "shift") if k in cfg})
    if name == "kl":
        from ..autoencoders.kl import kl_kwargs_from_config

        return build_autoencoder(name, **kl_kwargs_from_config(cfg))
    raise ValueError(f"autoencoder {name!r} is not supported by MarDiniPipeline (per-frame autoencoders only: "
                     f"a temporally compressing VAE does not map given frames to latent frames one to one)")


def check_counts(**counts) -> None:
    """Refuse a count below 1, naming its argument (None: the default): 0 would otherwise silently mean the default
    (it is falsy) or fail deep inside (range()'s "arg 3 must not be zero")."""
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def rgb_array(image) -> np.ndarray:
    """A PIL image -> HxWx3 array: uint8, or uint16 for 16-bit images (PIL's own RGB conversion clips those to 255,
    turning most of a 16-bit PNG white). The alpha channel, if any, is dropped."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(image).astype(np.int64)
        return np.repeat(array.clip(0, 65535).astype(np.uint16)[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


class MarDiniPipeline:
    def __init__(self, model: MarDini, diffusion: Diffusion, autoencoder, config: dict):
        self.model = model.eval()
        self.diffusion = diffusion
        self.autoencoder = autoencoder.eval()
        self.config = config
        self.num_frames = int(config.get("num_frames", model.cfg.max_frames))  # the training window T
        self.height, self.width = int(config["height"]), int(config["width"])
        self.fps = int(config.get("fps", 8))
        # How the planner's low-resolution input was made in training (exports before it was recorded pooled
        # latents, the only mode inference then knew).
        self.lowres_mode = config.get("lowres_mode", "latents")
        if self.lowres_mode not in LOWRES_MODES:
            raise ValueError(f"config.json lowres_mode={self.lowres_mode!r} must be one of {LOWRES_MODES}")
        self.planner_calls = 0  # how many times the planner ran (once per window)

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=torch.float32, weights: str = "ema",
                        sampler: str | None = None, attn_backend: str | None = None, vae: str | None = None,
                        flow_shift: float | None = None):
        """Load an export folder (or a training checkpoint folder) with its EMA (default) or raw weights.
        `sampler` overrides the trained formulation's default sampler (e.g. "ddpm" or "ddim" for a DDPM model);
        `flow_shift` a rectified-flow model's sampling time shift (diffusion.flow_shift);
        `attn_backend` the attention backend (sdpa, xformers, fa4; default: the trained one where it runs on
        `device` at `dtype`, else sdpa); `vae` the folder of the export's VAE where it is not at the recorded path
        (an export copied from another machine)."""
        if attn_backend is not None:  # before the weights load: one line if it has no kernels here
            check_backend(attn_backend, device, dtype, "attn_backend")
        autoencoder_cfg = _with_vae(export_format.read_config(path)["autoencoder"], vae)
        try:  # the VAE first: a missing folder fails before the weights load
            autoencoder = _autoencoder_from_config(autoencoder_cfg)
        except FileNotFoundError as e:
            where = "the VAE given" if vae else "the export's VAE (config.json: autoencoder.pretrained)"
            raise FileNotFoundError(f"{path}: {where}: {e}; an export copied from another machine takes its VAE's "
                                    f"folder here with --vae DIR (from_pretrained(vae=...))") from None
        model, config = export_format.load_model(path, weights, device, attn_backend, dtype)
        config["autoencoder"] = autoencoder_cfg
        for key in ("height", "width"):
            if key not in config:
                raise ValueError(f"{path}: config.json lacks {key!r}")
        diffusion = Diffusion(with_sampling_options(config["diffusion"], sampler, flow_shift))
        return cls(model, diffusion, autoencoder, config).to(device, dtype)

    def save_pretrained(self, path: str | Path) -> Path:
        state = self.model.state_dict()
        config = {k: v for k, v in self.config.items() if k not in ("format", "format_version", "mardini_version")}
        config["model"] = self.model.cfg.to_dict()
        config["lowres_mode"] = self.lowres_mode
        return export_format.save_export(path, state, config,
                                         scheduler_config=dict(self.diffusion.make_scheduler().config))

    def to(self, device=None, dtype=None):
        self.model.to(device=device, dtype=dtype)
        self.autoencoder.to(device=device)
        return self

    def compile(self, mode: str = "default", backend: str = "inductor", dynamic: bool | None = False
                ) -> "MarDiniPipeline":
        """torch.compile the planner, the generator (its forward and its reference frames' pass) and the VAE's
        encoder and decoder in place (weights and state_dict keys unchanged). On one H200 in bf16, the paper model
        makes 12 frames at 512 px with 25 steps in 0.65 s (image-to-video) and 0.59 s (interpolation) compiled, the
        given frames encoded and the generated ones decoded in one VAE call each (BENCHMARKS.md, "Inference, eighth
        step"); the first call at each shape compiles (tens of seconds), so it pays for batches of generations, not
        for one. `dynamic` is torch.compile's. False (the default) compiles each shape static, up to
        torch._dynamo.config.recompile_limit shapes (beyond that dynamo runs the new shape eagerly): measured on the
        user's call, a second task compiled static peaks at 6.2 GiB where None (torch's default, which recompiles
        with dynamic sizes when a second shape comes) peaks at 8.0 and is 0.017 s slower (BENCHMARKS.md, "Inference,
        ninth step"). Pass None for a stream of many different frame counts or sizes."""
        kwargs = dict(mode=mode, backend=backend, dynamic=dynamic)
        self.model.planner.compile(**kwargs)
        self.model.generator.compile(**kwargs)
        # once per generation: CUDA graphs would not pay, and their output buffers are reused by the next replay
        self.model.generator.compile_reference_pass(backend=backend, dynamic=dynamic)
        vae = getattr(self.autoencoder, "vae", None)  # diffusers VAEs
        for part in (getattr(vae, "encoder", None), getattr(vae, "decoder", None)):
            if part is not None:
                part.compile(**kwargs)
        return self

    def use_fp8_gemms(self, layers: Sequence[str] = FP8_LAYERS, fast_accum: bool = True) -> "MarDiniPipeline":
        """Compute the generator's SwiGLU MLPs and self-attention projections (`layers`, among mardini.models.fp8's
        FP8_LAYERS) from e4m3 inputs, in place (weights and state_dict keys unchanged), before `compile`. On one H100,
        compiled in bf16, it makes the paper model's image-to-video call (12 frames at 512 px, 25 steps) 0.041 s
        faster (0.626 s against 0.667), its samples as far from the eager bf16 model's as the compiled bf16 model's
        are; on the CPU (float32 arithmetic) it leaves samples as far from float32 as bf16 does (BENCHMARKS.md,
        "Inference, twelfth step"). Needs a GPU of compute capability >= 8.9 (or the CPU, slowly); a trained model
        should be checked with `benchmarks/demo_quality.py --fp8` before trusting it."""
        use_fp8_gemms(self.model.generator, tuple(layers), fast_accum)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------------------------------- inputs
    def preprocess(self, image) -> torch.Tensor:
        """An image -> [3, H, W] in [-1, 1] at the model's resolution (resize the short side, then centre crop).
        Takes a path or PIL image (8- or 16-bit, grey or colour), an HxWx3 (or HxW) array, or a [3, H, W] tensor:
        integer values span their type (uint8: 0-255, uint16: 0-65535), floats must already lie in [-1, 1]."""
        if isinstance(image, (str, Path)):
            from PIL import Image

            with Image.open(image) as opened:
                image = rgb_array(opened)
        elif not isinstance(image, (torch.Tensor, np.ndarray)):  # a PIL image
            image = rgb_array(image)
        if isinstance(image, np.ndarray):
            if image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=-1)
            if image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"images must be HxWx3 (or HxW), got shape {image.shape}")
            image = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)  # PIL arrays are read-only
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensors must be [3, H, W], got {tuple(image.shape)}")
        if not torch.is_floating_point(image):
            top = {torch.uint8: 255.0, torch.uint16: 65535.0}.get(image.dtype)
            if top is None:
                raise ValueError(f"integer images must be uint8 (0-255) or uint16 (0-65535), got {image.dtype}")
            image = image.float() / (top / 2) - 1.0
        else:
            image = image.float()
            low, high = float(image.min()), float(image.max())
            if low < -1.01 or high > 1.01:
                raise ValueError(f"float images must lie in [-1, 1], got values in [{low:.3g}, {high:.3g}] (pass "
                                 f"uint8 for 0-255 pixels, or x * 2 - 1 for [0, 1] ones)")
        h, w = image.shape[1:]
        if (h, w) != (self.height, self.width):
            scale = max(self.height / h, self.width / w)
            size = (max(self.height, round(h * scale)), max(self.width, round(w * scale)))
            image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
            top, left = (size[0] - self.height) // 2, (size[1] - self.width) // 2
            image = image[:, top:top + self.height, left:left + self.width]
        return image.clamp(-1, 1)

    # ------------------------------------------------------------------------------------------- core call
    @torch.inference_mode()
    def __call__(self, frames: dict[int, object], num_frames: int | None = None, num_steps: int | None = None,
                 seed: int | Sequence[int] = 0, guidance_scale: float = 1.0, progress: bool = False) -> torch.Tensor:
        """Generate one window. frames: {position: image}; returns [T, 3, H, W] in [-1, 1] (or [S, T, 3, H, W]
        for a list of S seeds). Given frames come back exactly as they were preprocessed."""
        check_counts(num_frames=num_frames)
        T = num_frames or self.num_frames
        if T > self.model.cfg.max_frames:
            raise ValueError(f"num_frames={T} exceeds the model's max_frames={self.model.cfg.max_frames}; "
                             f"use long_video() (mardini-sample --task long) for longer videos")
        pixels = {int(p): self.preprocess(img) for p, img in frames.items()}
        bad = [p for p in pixels if not 0 <= p < T]
        if bad:
            raise ValueError(f"frame positions {bad} are outside the window [0, {T})")
        seeds = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(x) for x in seed]
        video = self._generate_window(pixels, T, seeds, num_steps, guidance_scale, progress)
        return video[0] if isinstance(seed, (int, np.integer)) else video

    @torch.inference_mode()
    def generate_clips(self, videos: torch.Tensor, mask: torch.Tensor, seeds: Sequence[int],
                       num_steps: int | None = None, guidance_scale: float = 1.0, batch_size: int = 16,
                       progress: bool = False, spacing: float = 1.0) -> torch.Tensor:
        """Many clips at once, one seed each, in batches: videos [N, T, 3, H, W] in [-1, 1] at the model's size,
        mask [T] (True = generate; those frames' pixels are ignored) -> [N, T, 3, H, W] on the host, the given
        frames exactly as given. Clip i is what ``self(frames={p: videos[i, p] for given p}, seed=seeds[i])``
        makes, up to the rounding of a batched matmul (spacing: as _generate_window's): evaluation of a small
        model is launch-bound, so batching the clips makes it as many times faster as the batch holds clips."""
        check_counts(batch_size=batch_size)
        N, T = videos.shape[:2]
        if videos.ndim != 5 or tuple(videos.shape[2:]) != (3, self.height, self.width):
            raise ValueError(f"videos must be [N, T, 3, {self.height}, {self.width}], got {tuple(videos.shape)}")
        if mask.shape != (T,) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool [T] = [{T}] (one task for every clip), got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        if len(seeds) != N:
            raise ValueError(f"one seed per clip: {N} clips, {len(seeds)} seeds")
        if T > self.model.cfg.max_frames:
            raise ValueError(f"clips of {T} frames exceed the model's max_frames={self.model.cfg.max_frames}")
        out = []
        for start in tqdm(range(0, N, batch_size), desc="clips", disable=not progress):
            chunk = videos[start:start + batch_size].to(self.device, torch.float32).clamp(-1, 1)
            out.append(self._generate(chunk, mask, list(seeds[start:start + batch_size]), num_steps,
                                      guidance_scale, spacing=spacing))
        return torch.cat(out)

    def _generate_window(self, pixels: dict[int, torch.Tensor], T: int, seeds: list[int], num_steps, guidance_scale,
                         progress=False, spacing: float = 1.0) -> torch.Tensor:
        """pixels: {position: [3, H, W]} -> [S, T, 3, H, W]; given frames are copied back exactly. spacing: output
        frames between two frames of the window (a long video's keyframe window: Window.spacing), for the motion
        estimate's prior (MarDini.motion)."""
        given = sorted(pixels)
        # The window is built on the device and comes back in one copy: no full-size host buffers per call.
        video = torch.zeros(1, T, 3, self.height, self.width, device=self.device)
        if given:  # none: _generate says so
            video[0, given] = torch.stack([pixels[p] for p in given]).to(self.device)
        mask = torch.ones(T, dtype=torch.bool)
        mask[given] = False
        return self._generate(video, mask, seeds, num_steps, guidance_scale, progress, spacing)

    def _generate(self, video: torch.Tensor, mask: torch.Tensor, seeds: list[int], num_steps, guidance_scale,
                  progress=False, spacing: float = 1.0) -> torch.Tensor:
        """video [B, T, 3, H, W] on the device, its given frames in place (mask [T] False); B = 1 (one clip for
        every seed) or B = len(seeds) (a seed per clip) -> [S, T, 3, H, W] on the host, given frames exact."""
        check_counts(num_steps=num_steps)
        S, (B, T), device = len(seeds), video.shape[:2], self.device
        if B not in (1, S):
            raise ValueError(f"{B} clips for {S} seeds: give one clip, or one seed per clip")
        if bool(mask.all()):
            raise ValueError("at least one frame must be given")
        if not bool(mask.any()):
            raise ValueError(f"all {T} frames are given: nothing to generate")
        generated = mask.cpu().nonzero().flatten().to(device)  # found on the host: no device-to-host wait
        mask = mask.to(device)
        # The given frames are encoded once (the given frames only: encode_given), a single clip's expanded to S.
        z, z_lo = encode_given(self.autoencoder, video, mask.expand(B, T), self.model.cfg.lowres_factor,
                               self.lowres_mode)
        z, z_lo = (x.to(self.dtype).expand(S, *x.shape[1:]) for x in (z, z_lo))
        noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds]).to(device, self.dtype)
        self.planner_calls += 1
        out = self.model.generate(z, mask.expand(S, T), self.diffusion, z_lo=z_lo,
                                  num_steps=num_steps, guidance_scale=guidance_scale, noise=noise,
                                  generator=[torch.Generator(device).manual_seed(int(s)) for s in seeds],
                                  progress=progress, spacing=spacing)
        # Decode the generated frames only: the given ones are returned as given, their exact pixels.
        video = video.expand(S, -1, -1, -1, -1).clone()
        video[:, generated] = self.autoencoder.decode(out[:, generated].float()).to(video.dtype)
        return video.cpu()

    # ------------------------------------------------------------------------------------------- tasks
    def interpolate(self, first, last, num_frames: int | None = None, **kw) -> torch.Tensor:
        """first ... last, with num_frames - 2 frames generated between them."""
        check_counts(num_frames=num_frames)
        T = num_frames or self.num_frames
        return self(frames={0: first, T - 1: last}, num_frames=T, **kw)

    def image_to_video(self, image, position: int | str = "middle", num_frames: int | None = None, **kw):
        """One given frame at the start, the middle (the paper's main setting) or the end of the window."""
        check_counts(num_frames=num_frames)
        T = num_frames or self.num_frames
        index = {"first": 0, "middle": T // 2, "last": T - 1}.get(position, position)
        if not isinstance(index, int):
            raise ValueError(f"position must be 'first', 'middle', 'last' or an int, got {position!r}")
        return self(frames={index: image}, num_frames=T, **kw)

    def loop(self, image, num_frames: int | None = None, **kw) -> torch.Tensor:
        """A seamless loop: the same image first and last; returns T - 1 frames (the repeat dropped) so that
        playing the clip on repeat has no seam."""
        check_counts(num_frames=num_frames)
        T = num_frames or self.num_frames
        return self(frames={0: image, T - 1: image}, num_frames=T, **kw)[..., :-1, :, :, :]

    @torch.inference_mode()
    def expand(self, video, num_new: int, direction: str = "forward", context: int | None = None,
               seed: int = 0, progress: bool = True, **kw) -> torch.Tensor:
        """Continue a clip [k, 3, H, W] by num_new frames forwards (or backwards), window after window."""
        check_counts(num_new=num_new, context=context)
        given = [self.preprocess(f) for f in video]
        total = len(given) + num_new
        plan = expansion_plan(len(given), total, self.num_frames, context, direction)
        offset = 0 if direction == "forward" else num_new
        return self.run_plan(plan, {offset + i: f for i, f in enumerate(given)}, total, seed, progress, **kw)

    @torch.inference_mode()
    def slow_motion(self, frames, factor: int, seed: int = 0, progress: bool = True, keyframes: str = "sparse",
                    **kw) -> torch.Tensor:
        """Insert factor - 1 frames between consecutive frames: k frames -> (k - 1) * factor + 1 frames.
        `keyframes`: how a gap longer than the window is split (planning.interpolation_plan)."""
        if factor < 2:
            raise ValueError(f"factor must be >= 2, got {factor}")
        given = [self.preprocess(f) for f in frames]
        total = (len(given) - 1) * factor + 1
        known = {i * factor: f for i, f in enumerate(given)}
        plan = interpolation_plan(sorted(known), self.num_frames, keyframes)
        return self.run_plan(plan, known, total, seed, progress, **kw)

    @torch.inference_mode()
    def long_video(self, frames: dict[int, object], num_frames: int, stride: int = 1, context: int | None = None,
                   seed: int = 0, progress: bool = True, keyframes: str = "sparse", **kw) -> torch.Tensor:
        """Any length: given frames at output positions; expand on a grid of every `stride`-th frame, then
        interpolate recursively (e.g. 4 images -> 128 frames with a 17-frame window; `keyframes`: how a gap longer
        than the window is split, planning.interpolation_plan)."""
        check_counts(num_frames=num_frames, stride=stride, context=context)
        known = {int(p): self.preprocess(img) for p, img in frames.items()}
        plan = long_video_plan(sorted(known), num_frames, self.num_frames, stride, context, keyframes)
        return self.run_plan(plan, known, num_frames, seed, progress, **kw)

    def run_plan(self, plan: list[Window], known: dict[int, torch.Tensor], num_frames: int, seed: int = 0,
                 progress: bool = True, num_steps: int | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
        """Execute a plan; returns [num_frames, 3, H, W]. Window i draws its noise from a seed derived from
        (seed, i), so results are reproducible and different seeds share no window's noise."""
        check_plan(plan, sorted(known), num_frames, self.num_frames)
        frames = dict(known)
        for i, window in enumerate(tqdm(plan, desc="windows", disable=not progress)):
            given = {j: frames[p] for j, (p, c) in enumerate(zip(window.positions, window.context)) if c}
            with torch.inference_mode():
                window_seed = (int(seed) * 1_000_003 + i) % 2**63
                out = self._generate_window(given, len(window.positions), [window_seed], num_steps,
                                            guidance_scale, spacing=window.spacing)[0]
            for j, (p, c) in enumerate(zip(window.positions, window.context)):
                if not c:
                    frames[p] = out[j]
        return torch.stack([frames[p] for p in range(num_frames)])
