"""The joint MarDini model: planner + generator, the training loss and generation.

Training is end-to-end with the diffusion loss: the planner gets its gradients through the generator's
cross-attention (and, with model.planner.loss_weight > 0, from its own loss; a learned motion estimate trains on
its own). Generation runs the planner once, then the sampler's K steps on the masked frames only, with the
reference frames held exactly at their clean latents.

With ``model.motion.estimate`` the generator also reads a motion-compensated estimate of each generated frame,
computed from the given frames (models/motion.py); with ``model.motion.residual`` the diffusion runs on the
generated frames' (scaled) difference from that estimate: an untrained clean-sample model answers the estimate.
With ``model.motion.plan_layout`` it also reads, beside the estimate, the planner's read-out of each generated frame
at the place each plan token covers (the read-out the planner's own loss trains).
"""

from __future__ import annotations

import torch
from torch import nn

from ..diffusion.diffusion import masked_frame_mse
from .config import MarDiniConfig, as_model_config
from .generator import Generator
from .generator import frame_counts as generator_frame_counts
from .layers import box_downsample
from .motion import MatchFeatures, between_given, motion_estimate
from .planner import Planner


def lowres_from_hires(z_hi: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, T, C, H, W] -> [B, T, C, H/r, W/r] by r x r average pooling (the latent-downsampling option)."""
    if z_hi.ndim != 5:
        raise ValueError(f"latents must be [B, T, C, H, W], got shape {tuple(z_hi.shape)}")
    return box_downsample(z_hi, factor)


def _per_draw(x: torch.Tensor | None, draws: int) -> torch.Tensor | None:
    """[B, ...] -> [B draws, ...], each sample repeated for its noise draws (consecutive, as t and noise hold them)."""
    return x if x is None or draws == 1 else x.repeat_interleave(draws, dim=0)


def check_mask(mask: torch.Tensor, num_frames: int, values: bool = True) -> None:
    """Shape and dtype always; with values, also that every sample generates and keeps a frame. Reading the values
    of a mask on an accelerator waits for its queue, so the training forward checks them only on the host (the
    trainer checks its masks there, before moving them; generation, once per call, checks them anywhere)."""
    if mask.dtype != torch.bool or mask.ndim != 2 or mask.shape[1] != num_frames:
        raise ValueError(f"mask must be bool [B, {num_frames}], got {tuple(mask.shape)} {mask.dtype}")
    if not values:
        return
    if not bool(mask.any(1).all()):
        raise ValueError("every sample needs at least one masked (generated) frame")
    if not bool((~mask).any(1).all()):
        raise ValueError("every sample needs at least one reference (given) frame")


class MarDini(nn.Module):
    def __init__(self, cfg: MarDiniConfig | dict):
        super().__init__()
        self.cfg = cfg = as_model_config(cfg)
        self.planner = Planner(cfg)
        self.generator = Generator(cfg)
        # Learned "no plan" for classifier-free guidance; exists only when the model is trained to use it.
        self.null_plan = nn.Parameter(torch.zeros(cfg.signal_dim)) if cfg.plan_dropout > 0 else None
        m = cfg.motion
        self.match_features = MatchFeatures(cfg.latent_channels, m.feature_width, m.feature_dim) \
            if m.estimate == "learned" else None
        self._motion_estimate = motion_estimate  # compile_motion() puts a compiled version here

    def compile_motion(self, **compile_kwargs) -> None:
        """torch.compile the motion estimate and the matching features (train.compile_motion), in place. Why: the
        matcher is dozens of small elementwise ops and grid samples per pyramid level, launched eagerly one by one
        otherwise; its shapes are fixed for a batch shape, so one graph serves every mask."""
        if self.cfg.motion.estimate != "none":
            self._motion_estimate = torch.compile(motion_estimate, **compile_kwargs)
        if self.match_features is not None:
            self.match_features.compile(**compile_kwargs)

    # ------------------------------------------------------------------ planning
    def plan(self, z_lo: torch.Tensor, mask: torch.Tensor, drop_plan: torch.Tensor | None = None) -> torch.Tensor:
        """Planning signals [B, T, n_lo, Dc]; samples with drop_plan [B] True get the null plan instead."""
        return self.with_null_plan(self.planner(z_lo, mask), drop_plan)

    def with_null_plan(self, signals: torch.Tensor, drop_plan: torch.Tensor | None) -> torch.Tensor:
        """signals with the null plan in place of those of the samples where drop_plan [B] is True."""
        if drop_plan is not None:
            if self.null_plan is None:
                raise ValueError("drop_plan needs a model built with plan_dropout > 0")
            # torch.where keeps null_plan in the graph even when nothing is dropped (DDP needs every parameter used).
            signals = torch.where(drop_plan[:, None, None, None], self.null_plan.to(signals.dtype), signals)
        return signals

    # ------------------------------------------------------------------ motion
    def motion(self, z_hi: torch.Tensor, mask: torch.Tensor, learned: bool = True,
               spacing: float = 1.0) -> torch.Tensor | None:
        """The motion-compensated estimate from the given frames of z_hi (None when not configured): [B, T, C, H, W],
        or with model.motion.pair [B, T, 3C, H, W] (the estimate, then the two matched frames). A fixed function of
        the inputs, without gradient, except that a learned estimate carries its features' gradient (for the motion
        loss; the generator and the diffusion target see it detached). learned=False: the same matcher without the
        learned features (what they add is measured against it). spacing: frames of the scene between two frames
        of the window (a long video's keyframe window: their spacing); the smoothness prior is on motion per frame of
        the scene, so a window whose frames lie k apart expects k times the displacement: smoothness / k^2."""
        m = self.cfg.motion
        if m.estimate == "none":
            return None
        if not spacing >= 1:
            raise ValueError(f"spacing must be >= 1 (frames of the scene between two frames), got {spacing}")
        args = (z_hi, mask, m.radius, m.levels, m.window, m.smoothness / spacing**2, m.temperature, m.pair)
        if self.match_features is None or not learned:
            with torch.no_grad():
                return self._motion_estimate(*args, coarse_radius=m.coarse_radius)
        return self._motion_estimate(*args, features=self.given_frame_features(z_hi, mask),
                                     coarse_radius=m.coarse_radius)

    def given_frame_features(self, z_hi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The matching features [B, T, D, H, W] of the frames the estimate reads: the given ones. On a GPU (or
        compiling) of every frame, for fixed shapes; on the CPU of the given frames alone (2 of the default job's 9
        frames), the others left zero."""
        B, T = mask.shape
        frames = z_hi.flatten(0, 1).float()                                                   # [B T, C, H, W]
        if z_hi.device.type != "cpu" or torch.compiler.is_compiling():
            return self.match_features(frames).unflatten(0, (B, T))
        given = (~mask).flatten().nonzero().squeeze(1)
        features = self.match_features(frames[given])
        return features.new_zeros(B * T, *features.shape[1:]).index_copy(0, given, features).unflatten(0, (B, T))

    def motion_input(self, estimate: torch.Tensor | None, mask: torch.Tensor,
                     plan: torch.Tensor) -> torch.Tensor | None:
        """What the generator reads beside its frames (None when not configured): the estimate (motion()), then with
        model.motion.plan_layout the plan's layout from plan [B, T, n_lo, Dc] (C channels more; it carries the
        planner's gradient, the generator sees it detached)."""
        if estimate is None or not self.cfg.motion.plan_layout:
            return estimate
        return torch.cat([estimate, self.plan_layout(plan, mask, estimate.shape[-2:]).to(estimate.dtype)], dim=2)

    def plan_layout(self, plan: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The planner's read-out of each generated frame's low-resolution latents (what its own loss trains),
        bilinearly upsampled to the generator's latent size: [B, T, C, H, W], zeros on the reference frames (their
        clean latents are given). Why: the plan reaches the generator's tokens through cross-attention, which must
        find each token's plan token by its position; its read-out at the token's own place is direct."""
        B, T, n_lo = plan.shape[:3]
        factor = self.cfg.lowres_factor
        h, w = size[0] // factor, size[1] // factor
        if h * w != n_lo * self.cfg.planner.patch_size ** 2:
            raise ValueError(f"plan of {n_lo} tokens per frame does not cover {size[0]}x{size[1]} latents at "
                             f"lowres_factor {factor}")
        low = self.planner.readout_frames(plan, h, w).flatten(0, 1).float()  # [B T, C, h, w]
        layout = nn.functional.interpolate(low, size=tuple(size), mode="bilinear", align_corners=False)
        return torch.where(mask[:, :, None, None, None], layout.unflatten(0, (B, T)), 0.0)

    def motion_loss(self, motion: torch.Tensor, z_hi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the estimate on the frames it estimates (between two given frames; 0 if none),
        weighted like the diffusion loss (each sample's frames averaged, then the samples that have any, so ranks'
        losses average to the global batch's): what trains a learned estimate's features. Fixed shapes."""
        return masked_frame_mse(self.motion_estimate(motion), z_hi, between_given(mask))

    def motion_estimate(self, motion: torch.Tensor) -> torch.Tensor:
        """The estimate part [B, T, C, H, W] of a motion input (its first latent_channels channels)."""
        return motion[:, :, :self.cfg.latent_channels]

    def to_diffused(self, z: torch.Tensor, motion: torch.Tensor | None) -> torch.Tensor:
        """Latents -> what the diffusion runs on: with model.motion.residual, the difference from the motion estimate
        times motion.residual_scale (a small residual would otherwise sit far below the noise); else z itself."""
        m = self.cfg.motion
        return (z - self.motion_estimate(motion)) * m.residual_scale if m.residual else z

    def from_diffused(self, x: torch.Tensor, motion: torch.Tensor | None) -> torch.Tensor:
        """The inverse of to_diffused."""
        m = self.cfg.motion
        return x / m.residual_scale + self.motion_estimate(motion) if m.residual else x

    # ------------------------------------------------------------------ training
    def forward(self, z_hi: torch.Tensor, z_lo: torch.Tensor | None, mask: torch.Tensor, diffusion,
                noise: torch.Tensor | None = None, t: torch.Tensor | None = None,
                drop_plan: torch.Tensor | None = None, frame_counts: tuple[int, int] | None = None) -> dict:
        """Diffusion loss on the masked frames.

        z_hi: [B, T, C, H, W] clean latents; z_lo: [B, T, C, h, w] (None: average-pool z_hi by lowres_factor);
        mask: [B, T] bool; noise: like z_hi; t: [B] noise levels in (0, 1); drop_plan: [B] bool;
        or several noise draws per sample (train.noise_draws = k): t [B k] and noise [B k, T, C, H, W], each sample's
        draws consecutive: the planner and the motion estimate run once per sample, the generator once per draw, and
        the diffusion loss averages over the draws (a lower-variance estimate for the price of generator passes);
        frame_counts: generator.frame_counts(mask) read from a host copy of the mask (the trainer passes it), so that
        identity_impl=gather needs no wait for the GPU (None: a CPU mask is read here; a device mask in gather).
        Missing noise / t / drop_plan are drawn from the global RNG (the trainer passes them explicitly so that a
        sample's randomness does not depend on how the batch is split across ranks).
        """
        B, T = z_hi.shape[:2]
        check_mask(mask, T, values=mask.device.type == "cpu")  # no wait for the GPU in the training step
        if frame_counts is None and mask.device.type == "cpu":
            frame_counts = generator_frame_counts(mask)
        if z_lo is None:
            z_lo = lowres_from_hires(z_hi, self.cfg.lowres_factor)
        if z_lo.shape[:3] != z_hi.shape[:3]:
            raise ValueError(f"z_lo {tuple(z_lo.shape)} and z_hi {tuple(z_hi.shape)} disagree in batch/frames/channels")
        if noise is None:
            noise = torch.randn_like(z_hi)
        if t is None:
            t = diffusion.sample_t(B, device=z_hi.device)
        draws = t.shape[0] // B if t.ndim == 1 else 0
        if draws < 1 or t.shape[0] != B * draws or noise.shape != (B * draws, *z_hi.shape[1:]):
            raise ValueError(f"t {tuple(t.shape)} and noise {tuple(noise.shape)} must hold k >= 1 draws for each of "
                             f"the {B} samples: t [B k], noise [B k, {', '.join(map(str, z_hi.shape[1:]))}]")
        if drop_plan is None and self.null_plan is not None:
            drop_plan = torch.rand(B, device=z_hi.device) < self.cfg.plan_dropout if self.training else \
                torch.zeros(B, dtype=torch.bool, device=z_hi.device)

        signals = self.planner(z_lo, mask)
        plan = self.with_null_plan(signals, drop_plan)
        motion = self.motion_input(self.motion(z_hi, mask), mask, plan)
        z_d, mask_d, plan_d, motion_d = (_per_draw(x, draws) for x in (z_hi, mask, plan, motion))  # [B k, ...]
        x_t, target, prediction = self._denoise_with(z_d, mask_d, diffusion, t, noise, plan_d, motion_d,
                                                     frame_counts)
        loss = diffusion.loss(prediction.float(), target.float(), mask_d, t)
        out = {"loss": loss, "prediction": prediction, "target": target}
        # Auxiliary losses, each logged apart: a learned estimate trains on its own error (the diffusion loss is
        # blind to it); the planner, optionally, on reading its plan back into the frames' low-resolution latents.
        parts = {}
        if self.match_features is not None:
            parts["motion_loss"] = (self.cfg.motion.loss_weight, self.motion_loss(motion, z_hi, mask))
        if self.planner.readout is not None:
            parts["plan_loss"] = (self.cfg.planner.loss_weight, self.planner.readout_loss(signals, z_lo, mask))
        if parts:
            out["diffusion_loss"] = loss
            out["loss"] = loss + sum(weight * part for weight, part in parts.values())
            out.update({key: part for key, (_, part) in parts.items()})
        return out

    def _denoise_at(self, z_hi, mask, diffusion, t, noise, plan, frame_counts=None):
        """Noise the masked frames of z_hi (as to_diffused maps them) to level t [B] and run the generator:
        (x_t, target, prediction, motion); motion keeps a learned estimate's gradient, all else sees it detached."""
        motion = self.motion_input(self.motion(z_hi, mask), mask, plan)
        return (*self._denoise_with(z_hi, mask, diffusion, t, noise, plan, motion, frame_counts), motion)

    def _denoise_with(self, z_hi, mask, diffusion, t, noise, plan, motion, frame_counts=None):
        """_denoise_at given the motion input: (x_t, target, prediction)."""
        fixed = None if motion is None else motion.detach()
        x_t, target = diffusion.noisy_and_target(self.to_diffused(z_hi, fixed), noise.to(z_hi.dtype), t)
        x_in = torch.where(mask[:, :, None, None, None], diffusion.network_input(x_t, t), z_hi)  # references clean
        frame_time = torch.where(mask, diffusion.model_time(t).float()[:, None], 0.0)  # [B, T], fp32 in any dtype
        prediction = self.generator(x_in, mask, frame_time, plan, motion=fixed, frame_counts=frame_counts)
        return x_t, target, prediction

    @torch.no_grad()
    def clean_estimate(self, z_hi: torch.Tensor, mask: torch.Tensor, diffusion, t: torch.Tensor, noise: torch.Tensor,
                       z_lo: torch.Tensor | None = None, plan: torch.Tensor | None = None) -> torch.Tensor:
        """The one-step estimate of the clean latents of the masked frames from noise level t [B] (near 1: the
        model's mean-squared-optimal guess from its conditioning alone). z_hi [B, T, C, H, W] with the reference
        frames given; plan (optional) replaces the planner's signals (conditioning ablations).
        Returns [B, T, C, H, W] with the reference frames as given."""
        check_mask(mask, z_hi.shape[1])
        if plan is None:
            if z_lo is None:
                z_lo = lowres_from_hires(torch.where(mask[:, :, None, None, None], 0.0, z_hi), self.cfg.lowres_factor)
            plan = self.plan(z_lo, mask)
        x_t, _, prediction, motion = self._denoise_at(z_hi, mask, diffusion, t, noise, plan,
                                                      generator_frame_counts(mask))
        clean = self.from_diffused(diffusion.predict_x0(x_t, prediction, t), motion)
        return torch.where(mask[:, :, None, None, None], clean, z_hi)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, z_hi: torch.Tensor, mask: torch.Tensor, diffusion, z_lo: torch.Tensor | None = None,
                 num_steps: int | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
                 guidance_scale: float = 1.0, noise: torch.Tensor | None = None, progress: bool = False,
                 reuse_references: bool = True, spacing: float = 1.0) -> torch.Tensor:
        """Fill in the masked frames.

        z_hi: [B, T, C, H, W] latents whose reference frames (mask False) are given (values of masked frames are
        ignored); mask: [B, T]; z_lo: planner input (None: pooled from z_hi). Returns [B, T, C, H, W] with the
        reference frames bit-identical to the input. The planner runs exactly once. `generator` may be a list
        with one generator per sample (initial noise and a stochastic sampler's fresh noise per sample).
        reuse_references: run the reference frames through the generator once and each step on the generated
        frames only (Generator.cache_references; exact, used where the attention and the mask allow it).
        spacing: frames of the scene between two frames of the window, for the motion estimate (motion()).
        """
        B, T = z_hi.shape[:2]
        check_mask(mask, T)
        counts = generator_frame_counts(mask)  # read once per call, not at every step
        if z_lo is None:
            z_lo = lowres_from_hires(torch.where(mask[:, :, None, None, None], 0.0, z_hi), self.cfg.lowres_factor)
        plan = self.plan(z_lo, mask)
        guided = guidance_scale != 1.0
        if guided:
            if self.null_plan is None:
                raise ValueError("guidance_scale != 1 needs a model trained with model.plan_dropout > 0")
            plan = torch.cat([plan, self.null_plan.to(plan.dtype).expand_as(plan)])
        if noise is None and isinstance(generator, (list, tuple)):  # one generator per sample
            noise = torch.stack([torch.randn(z_hi.shape[1:], generator=g, device=g.device) for g in generator])
        elif noise is None:
            noise_device = generator.device if generator is not None else z_hi.device
            noise = torch.randn(z_hi.shape, generator=generator, device=noise_device, dtype=torch.float32)
        noise = noise.to(z_hi.device, z_hi.dtype)
        is_gen = mask[:, :, None, None, None]

        def batch(a):  # a guided step runs each sample twice: with its plan, then with the null plan
            return torch.cat([a, a]) if guided else a

        estimate = self.motion(z_hi, mask, spacing=spacing)  # guided: the unguided half reads the null plan's layout
        motion = None if estimate is None else self.motion_input(batch(estimate), batch(mask), plan)

        cache = None
        if reuse_references and self.generator.caches_references(mask):
            cache = self.generator.cache_references(batch(z_hi), batch(mask), plan, motion=motion)

        def project(x):
            return torch.where(is_gen, x, z_hi)

        def denoise(x, model_time):
            # fp32 whatever the model dtype: bf16 would round timesteps (997 -> 996) before the embedding
            frame_time = torch.where(mask, model_time.reshape(-1).expand(B).float()[:, None], 0.0)
            x = project(diffusion.network_input(x, diffusion.time_of(model_time.reshape(-1).expand(B))))
            out = self.generator(batch(x), batch(mask), batch(frame_time), plan, motion=motion, cache=cache,
                                 frame_counts=counts)
            if not guided:
                return out
            cond, uncond = out.chunk(2)
            return uncond + guidance_scale * (cond - uncond)

        x = diffusion.sample(denoise, noise, num_steps, project=project, generator=generator, progress=progress)
        return project(self.from_diffused(x.to(z_hi.dtype), estimate))

    # ------------------------------------------------------------------ accounting
    def num_parameters(self) -> dict:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"planner": count(self.planner), "generator": count(self.generator), "total": count(self)}

    def estimate_flops(self, num_frames: int, latent_hw: tuple[int, int], num_masked: int | None = None,
                       batch_size: int = 1, lowres_hw: tuple[int, int] | None = None, executed: bool = False,
                       noise_draws: int = 1) -> dict:
        """Forward-pass FLOPs (multiply-add = 2) of the planner and one generator call (noise_draws in a training
        step); see flops.py."""
        from .flops import mardini_flops

        return mardini_flops(self.cfg, num_frames, latent_hw, num_masked, batch_size, lowres_hw, executed,
                             noise_draws)
