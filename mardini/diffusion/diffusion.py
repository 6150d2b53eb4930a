"""The diffusion objective (noise path, target, masked loss) and the sampler loop.

Conventions (the model code relies on them):
- continuous noise level t in [0, 1] per sample, shape [B]: 0 = clean data, 1 = pure noise;
- model_time(t) in [0, num_train_timesteps] is what the network's timestep embedder sees (0 = clean);
- rectified flow: x_t = (1 - t) x0 + t noise, target v = noise - x0 (diffusers FlowMatchEuler: sigma = t), or with
  prediction "sample" the clean x0 itself (the sampler turns it into v = (x_t - x0) / t);
- ddpm: x_t from DDPMScheduler.add_noise at k = floor(t N), target epsilon (= noise) or v.
"""

import math
from typing import Callable, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .config import DiffusionConfig, validate_diffusion_config
from .schedulers import build_scheduler, ddpm_noise_scheduler

DenoiseFn = Callable[[Tensor, Tensor], Tensor]

# sample_t keeps t strictly inside (0, 1): t = 0 trains nothing, and sigmoid saturates to exactly 1.0 in float32.
_T_EPS = 1e-5


def _expand(t: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] broadcastable against `like` [B, ...]."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape [B]=[{like.shape[0]}], got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def masked_frame_mse(prediction: Tensor, target: Tensor, mask: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    """prediction/target [B, T, ...], mask [B, T] bool -> the MSE of the masked frames, each sample's frames averaged,
    then the samples that have any (0 if none), each times its sample_weight [B] if given. Fixed shapes (no wait for
    the GPU); unmasked frames are zeroed by torch.where before any arithmetic, so non-finite values there reach
    neither the result nor its gradients. The diffusion loss, and a learned motion estimate's loss
    (MarDini.motion_loss)."""
    mask = mask.to(device=prediction.device, dtype=torch.bool)
    frame_mask = mask.view(*mask.shape, *[1] * (prediction.ndim - 2))
    error = torch.where(frame_mask, prediction.float(), 0.0) - torch.where(frame_mask, target.float(), 0.0)
    per_frame = error.pow(2).flatten(2).mean(dim=2)  # [B, T], 0 on unmasked frames
    frames_per_sample = mask.sum(dim=1, keepdim=True)  # [B, 1]
    samples = (frames_per_sample > 0).sum().clamp_min(1)
    weight = mask / (frames_per_sample.clamp_min(1) * samples)  # [B, T]: 1 / (n_b * samples) on masked frames
    if sample_weight is not None:
        weight = weight * sample_weight.to(device=weight.device, dtype=torch.float32).view(-1, 1)
    return (per_frame * weight).sum()


class Diffusion:
    """Training objective and sampler for one DiffusionConfig; holds no learnable state."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = validate_diffusion_config(cfg)
        self.num_train_timesteps = self.cfg.num_train_timesteps
        self.is_flow = self.cfg.formulation == "rectified_flow"
        self.predicts_sample = self.is_flow and self.cfg.prediction == "sample"
        # DDPM: the training noise schedule. add_noise / get_velocity are stateless, so one instance is enough.
        self.noise_scheduler = None if self.is_flow else ddpm_noise_scheduler(self.cfg)
        # A private CPU copy: diffusers' add_noise moves the scheduler's own tensor to the data's device.
        self._alphas_cumprod = None if self.is_flow else self.noise_scheduler.alphas_cumprod.clone()
        self._alpha_tables: dict[torch.device, Tensor] = {}  # _alphas_cumprod on each device that asked for it
        p, c = self.cfg.loss_weight_power, self.cfg.loss_weight_offset  # (t + c)^p integrated over t in [0, 1]
        self._loss_weight_mean = math.log((1 + c) / c) if p == -1 else ((1 + c) ** (p + 1) - c ** (p + 1)) / (p + 1)

    # ----------------------------------------------------------------------------------------------- time
    def sample_t(self, batch_size: int, generator: Optional[torch.Generator] = None, device=None,
                 draws: int = 1) -> Tensor:
        """Training noise levels t [B] in (0, 1): uniform (the default), or logit-normal (SD3) to focus on mid
        noise levels. Conditioned video tasks are decided at high noise, where the model must build the frames from
        the given ones: logit-normal(0, 1) puts 0.16 % of the samples above t = 0.95, and models trained with it lost
        to a blend of the given frames (BENCHMARKS.md, "Learning").

        draws > 1: [B * draws], each sample's draws consecutive and stratified, one in each 1/draws of the
        distribution's quantiles (u, u + 1/draws, ... mod 1 from the quantile u of the first): a sample's noise levels
        then cover the range instead of clumping (train.noise_draws). The first draw, and whatever is drawn from
        `generator` afterwards, do not depend on draws."""
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        gen_device = generator.device if generator is not None else device
        uniform = self.cfg.timestep_sampling == "uniform"
        if uniform:
            t = torch.rand(batch_size, generator=generator, device=gen_device)
        else:
            z = torch.randn(batch_size, generator=generator, device=gen_device)
            t = torch.sigmoid(z * self.cfg.logit_std + self.cfg.logit_mean)
        if draws > 1:  # the first draw is the one above (the same stream); the others stepped along its quantile
            u = t.double() if uniform else torch.special.ndtr(z.double())
            q = torch.remainder(u[:, None] + torch.arange(draws, device=gen_device, dtype=torch.float64) / draws, 1.0)
            if not uniform:
                q = torch.sigmoid(torch.special.ndtri(q) * self.cfg.logit_std + self.cfg.logit_mean)
            t = q.flatten().float()
        return t.clamp(_T_EPS, 1 - _T_EPS).to(device)

    def timestep_index(self, t: Tensor) -> Tensor:
        """DDPM: the discrete timestep k = clamp(floor(t N), 0, N-1), long [B]."""
        n = self.num_train_timesteps
        return torch.floor(t.float() * n).clamp(0, n - 1).long()

    def model_time(self, t: Tensor) -> Tensor:
        """t [B] -> float [B] for the timestep embedder: t N (flow) or the DDPM index k."""
        if self.is_flow:
            return t.float() * self.num_train_timesteps
        return self.timestep_index(t).float()

    def time_of(self, model_time: Tensor) -> Tensor:
        """The inverse of model_time: t [B] in (0, 1) (DDPM: the middle of step k's interval, so k maps back)."""
        if self.is_flow:
            return model_time.float() / self.num_train_timesteps
        return (model_time.float() + 0.5) / self.num_train_timesteps

    def network_input(self, x_t: Tensor, t: Tensor) -> Tensor:
        """What the network reads of the noisy latents x_t at level t [B]: x_t itself, or with input_data_std = d > 0
        the linear least-squares estimate of x0 from x_t = a x0 + s noise, a d^2 / (a^2 d^2 + s^2) x_t. Same
        information for t < 1 (a known scalar per sample), but as t -> 1 the factor goes to 0 with the signal, so a
        network need not learn to ignore its input at high noise: on the default CPU job it otherwise passed part of
        that noise into its clean estimate (BENCHMARKS.md, "Learning", "A learned matcher on the GPU")."""
        d = self.cfg.input_data_std
        if d <= 0:
            return x_t
        if self.is_flow:
            s = _expand(t.float(), x_t)
            a, s2 = 1 - s, s * s
        else:
            a2 = self._alpha_bar(t, x_t)
            a, s2 = a2.sqrt(), 1 - a2
        return (a * d * d / (a * a * d * d + s2) * x_t.float()).to(x_t.dtype)

    def _alpha_bar(self, t: Tensor, like: Tensor) -> Tensor:
        """DDPM: alphas_cumprod at k(t), shaped [B, 1, ...] like `like`, in float32. Indexed on like's device (one
        copy of the table per device), so that the training step (network_input) does not wait for the GPU."""
        table = self._alpha_tables.get(like.device)
        if table is None:
            table = self._alpha_tables[like.device] = self._alphas_cumprod.to(like.device, torch.float32)
        return _expand(table[self.timestep_index(t.to(like.device))], like)

    # ------------------------------------------------------------------------------------------ objective
    def noisy_and_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """x0, noise [B, ...] (e.g. [B, T, C, H, W]); t [B]. Returns (x_t, target), both shaped like x0."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        if self.is_flow:
            tt = _expand(t, x0).to(x0.dtype)
            return (1 - tt) * x0 + tt * noise, x0 if self.predicts_sample else noise - x0
        k = self.timestep_index(t).to(x0.device)
        _expand(k, x0)  # shape check
        x_t = self.noise_scheduler.add_noise(x0, noise, k)
        target = noise if self.cfg.prediction == "epsilon" else self.noise_scheduler.get_velocity(x0, noise, k)
        return x_t, target

    def loss_weight(self, t: Tensor) -> Tensor:
        """Each sample's loss weight at noise level t [B]: (t + c)^p / (its mean over t ~ U(0, 1)), p =
        loss_weight_power, c = loss_weight_offset; all ones at p = 0. Dividing by the mean keeps the loss's scale,
        so the learning rate means what it meant (under logit-normal t the mean differs from 1)."""
        p, c = self.cfg.loss_weight_power, self.cfg.loss_weight_offset
        if p == 0:
            return torch.ones_like(t, dtype=torch.float32)
        return (t.float() + c).pow(p) / self._loss_weight_mean

    def loss(self, prediction: Tensor, target: Tensor, mask: Tensor, t: Tensor | None = None) -> Tensor:
        """MSE over the frames to generate only: prediction/target [B, T, C, H, W], mask [B, T] bool; t [B] the
        samples' noise levels, needed when diffusion.loss_weight_power weighs them (loss_weight).

        Each masked frame's MSE (mean over C, H, W) is averaged over the masked frames of its sample, then over
        the samples that have any: every sample weighs the same whatever its mask ratio, so the mean of per-rank
        losses under data parallelism equals the loss of the whole global batch. Unmasked frames are zeroed before
        any arithmetic (torch.where, which passes them no gradient), so even a non-finite value there changes
        neither loss nor grads. Fixed shapes throughout: no boolean indexing, so the GPU queue never waits for the
        host here (a mask on the host is also checked for a masked frame; on a device that would wait).
        """
        if prediction.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}")
        if mask.shape != prediction.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} must be [B, T]={tuple(prediction.shape[:2])}")
        if mask.device.type == "cpu" and not mask.any():
            raise ValueError("loss: no frame is masked (mask is all False), nothing to train on")
        if self.cfg.loss_weight_power == 0:
            return masked_frame_mse(prediction, target, mask)
        if t is None:
            raise ValueError("loss: diffusion.loss_weight_power weighs samples by their noise level; pass t")
        _expand(t, prediction)  # shape check: t [B]
        return masked_frame_mse(prediction, target, mask, self.loss_weight(t))

    def predict_x0(self, x_t: Tensor, model_output: Tensor, t: Tensor) -> Tensor:
        """Clean estimate from a model output at noise level t [B]; x_t, model_output [B, ...]."""
        if self.is_flow:
            if self.predicts_sample:
                return model_output
            return x_t - _expand(t, x_t).to(x_t.dtype) * model_output
        a = self._alpha_bar(t, x_t)
        x, out = x_t.float(), model_output.float()
        if self.cfg.prediction == "epsilon":
            x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
        else:  # v = sqrt(a) eps - sqrt(1 - a) x0  =>  x0 = sqrt(a) x_t - sqrt(1 - a) v
            x0 = a.sqrt() * x - (1 - a).sqrt() * out
        return x0.to(x_t.dtype)

    # ------------------------------------------------------------------------------------------- sampling
    def make_scheduler(self, num_inference_steps: Optional[int] = None):
        """A fresh diffusers scheduler (FlowMatchEuler / DDIM / DDPM) with set_timesteps called."""
        n = self.cfg.num_inference_steps if num_inference_steps is None else num_inference_steps
        return build_scheduler(self.cfg, n)

    @torch.no_grad()
    def sample(
        self,
        denoise_fn: DenoiseFn,
        noise: Tensor,
        num_steps: Optional[int] = None,
        project: Optional[Callable[[Tensor], Tensor]] = None,
        generator: Optional[torch.Generator] = None,
        progress: bool = False,
    ) -> Tensor:
        """Run the sampler from `noise` [B, ...] and return the x0 estimate, shaped like `noise`.

        denoise_fn(x_t, model_time [B]) returns the configured prediction (velocity / sample / epsilon / v).
        project(x) is applied before every denoise call and once at the end; the joint model uses it to hold
        reference frames at their clean latents. The generator drives the DDPM sampler's fresh noise.
        """
        project = project if project is not None else (lambda x: x)
        scheduler = self.make_scheduler(num_steps)
        # FlowMatchEulerDiscreteScheduler has no init_noise_sigma (its noise is unit-scale); DDIM/DDPM have 1.0.
        x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
        batch = noise.shape[0]
        # The scheduler's timesteps are already in model-time units: sigma * N (flow) or the index k (DDPM). Copied
        # to the device once: a copy from host memory waits for the GPU, and one per step would keep the host from
        # queueing a step while the GPU runs the last (what matters where steps are short: small models).
        model_times = scheduler.timesteps.to(device=noise.device, dtype=torch.float32)
        for i, timestep in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False)):
            x = project(x)
            mt = model_times[i].expand(batch)
            out = denoise_fn(x, mt)
            if self.predicts_sample:  # the Euler scheduler steps along v = (x_t - x0) / sigma (sigma > 0 here)
                sigma = _expand(mt / self.num_train_timesteps, x).to(x.dtype)
                out = (x - out) / sigma
            step = scheduler.step(out, timestep, x, generator=generator)
            x = step.prev_sample
        if not self.is_flow:
            # DDIM/DDPM compute the previous timestep as k - N // n: when n does not divide N, the last step lands
            # on k = 0 (alpha_bar < 1, and DDPM adds noise there) instead of clean data. The last step's own x0
            # estimate is what prev_sample equals whenever it does land on clean data, so return that.
            x = step.pred_original_sample.to(x.dtype)
        return project(x)
