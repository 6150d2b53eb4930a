"""The learning benchmark: what a trained model does with clips it never saw, against the trivial answers.

A video model that loses to copying its input has learned nothing useful, whatever its loss, so every figure here
comes with the baseline it must beat, computed on the same held-out clips:

- interpolation (first and last frame given): PSNR / SSIM of one sample per clip vs the linear blend of the ends;
- posterior mean: the one-step clean estimate from (almost) pure noise, the model's mean-squared-optimal guess of
  the generated frames. It separates "the network has not learned" (posterior mean below the blend) from "the
  sampler is wrong" (posterior mean above the blend, samples far below it);
- conditioning ablations: the posterior mean again with the plan replaced by the null plan (zeros when the model has
  none), with each frame's plan tokens shuffled, and with the given frames replaced by noise: an input the model
  ignores shows no drop;
- image-to-video (middle frame given): best-of-K PSNR vs repeating the given frame, and the motion energy (mean
  absolute difference of consecutive frames) of generated vs real clips: a model that only copies has ratio 0.
  Its posterior mean too: a sample of a model that knows the motion's spread but not its direction can lose to
  the repeated frame (which hedges between directions) while the model's best guess beats it;
- the plan probe: how much of the generated frames' low-resolution content a linear read-out of their plan tokens
  recovers (R^2 on held-out clips), beside the low-resolution blend: a planner that plans puts the frames' layout
  into its tokens; one whose tokens are spatially uniform only passes on per-frame facts;
- the samples' error over the posterior mean's (both tasks) and, with K >= 2 samples, how much they differ from each
  other (image-to-video): a sample drawn from the posterior has twice the posterior mean's squared error (3.01 dB
  lower PSNR) and differs from another by twice its variance, so ratio 2 and spread 1 mark a calibrated sampler,
  a ratio near 1 samples that collapse onto the mean, larger values samples noisier than the posterior;
- optionally a sweep of the sampler's step count;
- on synthetic clips, their ceiling for both tasks (ceiling): the best guess a model that knew every shape's
  parameters in the given frames could make, and what a perfect sampler's draw (and best of 4) scores;
- for a model with a motion input, that input's PSNR and the share of clips on which the posterior mean beats it;
  with learned matching features, also the same matcher's PSNR without them (what the features learned);
- optionally the posterior mean from several noise inputs, averaged and compared with each other: a network that
  passes its pure-noise input through to its estimate gains when the draws are averaged;
- optionally the clean estimate by noise level: the real clip noised to level t, denoised in one step, scored where
  the scene moves and where it does not (beside the blend and beside just rescaling the noisy input). The sampler
  ends on the estimates at low t, so a model that cannot return its nearly clean input there caps every sample.

PSNR is per clip over its generated frames (at most metrics.PSNR_MAX_DB), then averaged over clips.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..data.latent_cache import encode_given
from ..masking import task_mask
from ..models.layers import patchify
from .benchmarks import linear_blend, repeat_nearest
from .metrics import clip_psnr, psnr_from_mse, squared_errors, ssim_frames, unit_range_pair

POSTERIOR_T = 0.999  # "pure noise": t = 1 is outside the training range (0, 1)


# ------------------------------------------------------------------------------------------------ clips
def held_out_clips(data: Mapping, count: int, num_frames: int | None = None,
                   consecutive: bool = False) -> Tensor:
    """[count, T, 3, H, W] clips in [-1, 1] that training never read, from a training data config (the ``data``
    entry of an export's config.json): synthetic clips of ``val_seed``'s stream, or clips of the held-out video files
    (``video.val_root``, else the ``val_fraction`` of the training files). More clips than files take other
    starts in the same files. consecutive: synthetic clips of consecutive frames even where training read them at
    random frame strides (data.synthetic.max_frame_stride), so that models trained either way meet the same clips."""
    source = data.get("source")
    if source == "synthetic":
        from ..data.synthetic import SyntheticVideoDataset

        dataset = SyntheticVideoDataset(held_out_synthetic_config(data, count, num_frames, consecutive))
        return torch.stack([dataset[i]["video"] for i in range(count)])
    if source == "video":
        from ..data.video import VideoDataset

        values = dict(data["video"], seed=data.get("val_seed", 0))
        if num_frames:
            values["num_frames"] = num_frames
        return VideoDataset(values, split="val").clips(count)
    raise ValueError(f"held-out clips of data.source={source!r} cannot be read without the training run (a latent "
                     f"cache needs its autoencoder): pass the clips' source explicitly (a manifest or 'synthetic')")


def held_out_synthetic_config(data: Mapping, count: int, num_frames: int | None = None, consecutive: bool = False):
    """The SyntheticVideoConfig of held_out_clips' synthetic clips (same arguments)."""
    from ..data.synthetic import SyntheticVideoConfig

    values = dict(data["synthetic"], seed=data["val_seed"], num_videos=count)
    if num_frames:
        values["num_frames"] = num_frames
    if consecutive:
        values["max_frame_stride"] = 1
    return SyntheticVideoConfig(**values)


def video_clips(root: str, count: int, num_frames: int, height: int, width: int, fps: float = 8.0) -> Tensor:
    """[count, T, 3, H, W] clips from every file of a folder or manifest (for files held out by construction,
    e.g. a corpus's val.csv), taken from each file's centre, cycling through the files."""
    from ..data.video import VideoDataConfig, VideoDataset

    return VideoDataset(VideoDataConfig(root=root, num_frames=num_frames, height=height, width=width, fps=fps,
                                        clip_start="center")).clips(count)


# ------------------------------------------------------------------------------------------------ metrics
def pooled_mse(pred: Tensor, target: Tensor, mask: Tensor) -> float:
    """Mean squared error over the generated frames of all clips (every clip has the same size)."""
    return float(squared_errors(pred, target, mask).mean())


def sample_error_ratio(samples: Tensor, mean: Tensor, target: Tensor, mask: Tensor) -> float:
    """Samples' squared error over the posterior mean's (pooled over clips). Why: a sample drawn from the posterior
    whose mean the posterior mean is has twice its error (E|x - x'|^2 = 2 Var for independent draws), so its PSNR
    is 3.01 dB lower by design; 1 means samples that collapse onto the mean, above 2 samples that carry error the
    posterior does not (noise left in, a drifted mean). It reads a sampled-vs-posterior-mean PSNR gap."""
    return pooled_mse(samples, target, mask) / max(pooled_mse(mean, target, mask), 1e-20)


def sample_spread(runs: Sequence[Tensor], mean: Tensor, target: Tensor, mask: Tensor) -> float:
    """How much K >= 2 samples of each clip differ, relative to the posterior mean's error: mean pairwise squared
    distance / (2 x the posterior mean's squared error). 1 for samples drawn from the posterior (each pair differs by
    2 Var, the mean errs by Var); below 1 samples too alike, above 1 too varied for what the best guess knows."""
    pairs = [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]]
    if not pairs:
        raise ValueError("sample_spread needs at least two samples per clip")
    distance = sum(pooled_mse(a, b, mask) for a, b in pairs) / len(pairs)
    return distance / (2 * max(pooled_mse(mean, target, mask), 1e-20))


def clip_ssim(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean SSIM per clip over its generated frames -> [N]."""
    return torch.stack([ssim_frames(p[mask], t[mask]).mean() for p, t in zip(pred, target)])


def motion_energy(videos: Tensor) -> float:
    """Mean absolute difference of consecutive frames (in [-1, 1] units) of [N, T, 3, H, W]."""
    return (videos[:, 1:].float() - videos[:, :-1].float()).abs().mean().item()


def baseline(videos: Tensor, mask: Tensor, name: str) -> Tensor:
    """The linear blend or the repeat-nearest answer for every clip: [N, T, 3, H, W]."""
    fn = {"linear_blend": linear_blend, "repeat_nearest": repeat_nearest}[name]
    return torch.stack([fn(v, mask) for v in videos])


# ------------------------------------------------------------------------------------------------ the model
@torch.no_grad()
def posterior_mean(pipe, videos: Tensor, mask: Tensor, t: float = POSTERIOR_T, seed: int = 0,
                   plan: str = "model", references: str = "given", batch_size: int = 16) -> Tensor:
    """The model's one-step clean estimate of the generated frames from (almost) pure noise: [N, T, 3, H, W] pixels
    with the given frames copied back. The generated frames are unknown here, so their noisy input is t * noise
    alone: only t near 1 is a real noise level (below 0.99 it is refused; noise_level_report noises the real clip).
    plan: "model" | "null" (the learned null plan, zeros without one) | "shuffled" (each frame's plan tokens
    permuted: same content, wrong places); references: "given" | "noise" (the given frames replaced by uniform noise
    images, for the planner and the generator alike)."""
    if t < 0.99:
        raise ValueError(f"posterior_mean: t={t} leaves signal the unknown frames cannot have; use t >= 0.99, or "
                         f"noise_level_report for lower noise levels")
    model, diffusion, device = pipe.model, pipe.diffusion, pipe.device
    out = []
    g = torch.Generator().manual_seed(seed)
    for chunk in videos.split(batch_size):
        n, T = chunk.shape[:2]
        m = mask[None].expand(n, T).to(device)
        pixels = chunk.to(device)
        if references == "noise":
            noise_images = torch.rand(pixels.shape, generator=g).to(device) * 2 - 1
            pixels = torch.where(m[:, :, None, None, None], pixels, noise_images)
        z, z_lo = encode_given(pipe.autoencoder, pixels, m, model.cfg.lowres_factor, pipe.lowres_mode)
        z, z_lo = z.to(pipe.dtype), z_lo.to(pipe.dtype)
        signals = model.plan(z_lo, m)
        if plan == "null":
            null = model.null_plan if model.null_plan is not None else torch.zeros(signals.shape[-1], device=device)
            signals = null.to(signals.dtype).expand_as(signals)
        elif plan == "shuffled":
            perm = torch.randperm(signals.shape[2], generator=g).to(device)
            signals = signals[:, :, perm]
        elif plan != "model":
            raise ValueError(f"plan must be model, null or shuffled; got {plan!r}")
        noise = torch.randn(z.shape, generator=g).to(device, z.dtype)
        estimate = model.clean_estimate(z, m, diffusion, torch.full((n,), t, device=device), noise, plan=signals)
        frames = pipe.autoencoder.decode(estimate.float()).cpu()
        out.append(torch.where(m.cpu()[:, :, None, None, None], frames, chunk))
    return torch.cat(out)


@torch.no_grad()
def motion_input(pipe, videos: Tensor, mask: Tensor, batch_size: int = 16, learned: bool = True,
                 spacing: float = 1.0) -> Tensor | None:
    """The motion-compensated estimate the model is given (model.motion), decoded: [N, T, 3, H, W] with the given
    frames copied back; None for a model without one. What the network adds is measured against it. learned=False:
    the same matcher without learned features (what they add); spacing: as MarDini.motion's."""
    model = pipe.model
    if model.cfg.motion.estimate == "none":
        return None
    out = []
    for chunk in videos.split(batch_size):
        m = mask[None].expand(chunk.shape[0], chunk.shape[1]).to(pipe.device)
        z, _ = encode_given(pipe.autoencoder, chunk.to(pipe.device), m, model.cfg.lowres_factor, pipe.lowres_mode)
        estimate = model.motion_estimate(model.motion(z.to(pipe.dtype), m, learned, spacing))
        frames = pipe.autoencoder.decode(estimate.float()).cpu()
        out.append(torch.where(m.cpu()[:, :, None, None, None], frames, chunk))
    return torch.cat(out)


@torch.no_grad()
def samples(pipe, videos: Tensor, mask: Tensor, num_steps: int | None = None, seed: int = 0,
            batch_size: int = 16, progress: bool = False, guidance_scale: float = 1.0) -> Tensor:
    """One sample per clip (seed + clip index): [N, T, 3, H, W], given frames exactly as given. The clips run in
    batches (MarDiniPipeline.generate_clips): each is the sample ``pipe(frames=..., seed=seed + i)`` makes."""
    return pipe.generate_clips(videos, mask, [seed + i for i in range(len(videos))], num_steps,
                               guidance_scale=guidance_scale, batch_size=batch_size, progress=progress)


@torch.no_grad()
def generator_attention(pipe, videos: Tensor, mask: Tensor, t: float = 0.5, seed: int = 0, radius: int = 1,
                        batch_size: int = 8) -> list[dict]:
    """Where the generated frames look, per generator block: for the self-attention queries of generated frames
    (heads and clips pooled), the attention mass on reference-frame keys and, of that mass, the share within
    `radius` tokens of the query's own place. Each figure comes with what uniform attention would give, so a
    block that ignores the given frames (mass at or below uniform) or cannot find the matching place in them
    (local share at uniform) shows it. Runs the model's clean estimate from noise level t."""
    model, diffusion, device = pipe.model, pipe.diffusion, pipe.device
    p = model.cfg.generator.patch_size
    g = torch.Generator().manual_seed(seed)
    blocks = model.generator.blocks
    totals = [{"ref_mass": 0.0, "local_mass": 0.0, "own_frame_mass": 0.0, "queries": 0} for _ in blocks]
    originals = [block.attn.attend for block in blocks]
    impls = [block.identity_impl for block in blocks]
    for chunk in videos.split(batch_size):
        n, T = chunk.shape[:2]
        m = mask[None].expand(n, T).to(device)
        z, z_lo = encode_given(pipe.autoencoder, chunk.to(device), m, model.cfg.lowres_factor, pipe.lowres_mode)
        h, w = z.shape[-2] // p, z.shape[-1] // p
        ys, xs = torch.arange(h, device=device).repeat_interleave(w), torch.arange(w, device=device).repeat(h)
        near = ((ys[:, None] - ys[None]).abs() <= radius) & ((xs[:, None] - xs[None]).abs() <= radius)  # [n, n]
        frame_of = torch.arange(T, device=device).repeat_interleave(h * w)                              # [N]
        gen_query = mask.to(device)[frame_of]                                                             # [N]
        ref_key = ~gen_query
        same_place = near.repeat(T, T)                                                                    # [N, N]
        same_frame = frame_of[:, None] == frame_of[None]

        def recorder(index, original):
            def attend(q, k, v, attn_mask=None):
                if q.shape[2] == T * h * w:  # the full (cross-frame) call; the own-frame call is per frame
                    tot = totals[index]
                    for b in range(q.shape[0]):  # one clip and head at a time: [Ng, N] probabilities
                        for head in range(q.shape[1]):
                            logits = q[b, head, gen_query].float() @ k[b, head].float().T * q.shape[-1] ** -0.5
                            if attn_mask is not None:
                                allowed = attn_mask.expand(q.shape[0], q.shape[1], -1, -1)[b, head, gen_query]
                                logits = logits.masked_fill(~allowed, float("-inf"))
                            probs = logits.softmax(-1)
                            tot["ref_mass"] += float(probs[:, ref_key].sum())
                            tot["local_mass"] += float((probs * same_place[gen_query])[:, ref_key].sum())
                            tot["own_frame_mass"] += float((probs * same_frame[gen_query]).sum())
                            tot["queries"] += probs.shape[0]
                return original(q, k, v, attn_mask)
            return attend

        try:
            for i, block in enumerate(blocks):
                block.attn.attend = recorder(i, originals[i])
                # gather's full call holds the generated frames' queries only; split's holds every query in place
                # (the same attention: generated frames' rows are those of the identity mask either way)
                block.identity_impl = "split" if impls[i] == "gather" else impls[i]
            noise = torch.randn(z.shape, generator=g).to(device, z.dtype)
            model.clean_estimate(z.to(pipe.dtype), m, diffusion, torch.full((n,), t, device=device), noise,
                                 z_lo=z_lo.to(pipe.dtype))
        finally:
            for block, original, impl in zip(blocks, originals, impls):
                block.attn.attend, block.identity_impl = original, impl
    n_ref, T = int((~mask).sum()), mask.shape[0]
    window = float(near.sum(1).float().mean()) / (h * w)  # uniform share of a frame within the radius
    return [{"block": i, "ref_mass": tot["ref_mass"] / tot["queries"], "uniform_ref_mass": n_ref / T,
             "local_share_of_ref_mass": tot["local_mass"] / max(tot["ref_mass"], 1e-12), "uniform_local_share": window,
             "own_frame_mass": tot["own_frame_mass"] / tot["queries"], "uniform_own_frame_mass": 1 / T}
            for i, tot in enumerate(totals)]


# The probe's ridge penalty, relative to the mean variance of the plan's channels. Plan tokens are nearly collinear
# (much of a plan is one vector per frame): least squares fits the residue of the noise in such directions, and its
# held-out R^2 fell to -0.38 at 4 clips of the default job's model (below -1000 for a barely trained one); 1e-3 gives
# 0.71 there and moves 32 clips' 0.830 to 0.843 (BENCHMARKS.md, "The plan probe's read-out").
PROBE_RIDGE = 1e-3


def ridge_read_out(x: Tensor, y: Tensor, ridge: float | None = None):
    """x [n, D], y [n, C] -> a function [..., D] -> [..., C]: the linear read-out (with a bias) of y from x by ridge
    regression on centred data, penalty `ridge` (default PROBE_RIDGE) times the mean variance of x's channels."""
    ridge = PROBE_RIDGE if ridge is None else ridge
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    gram = xc.T @ xc
    penalty = ridge * gram.diagonal().mean().clamp_min(1e-30)
    weight = torch.linalg.solve(gram + penalty * torch.eye(len(gram), dtype=x.dtype), xc.T @ (y - y_mean))
    return lambda z: (z - x_mean) @ weight + y_mean


@torch.no_grad()
def plan_probe(pipe, videos: Tensor, mask: Tensor | None = None, batch_size: int = 16) -> dict:
    """Does the planner plan? Its tokens for the generated frames (interpolation mask by default) against those
    frames' real low-resolution latents (what the planner would see if they were given), per planner token:
    - r2: a linear read-out (ridge_read_out) fitted on the first half of the clips, R^2 on the second half;
    - blend_r2: R^2 of the low-resolution latents of the linear blend, on the same held-out half;
    - motion_r2 (models with model.motion): the same for the motion-compensated estimate the generator is given —
      a plan above it knows something about the unseen frames that the generator's other input does not;
    - spatial_share: variance of the plan tokens across a frame's positions / their mean square (0: one vector
      repeated over the frame, which carries no layout).
    Needs at least 2 clips."""
    if len(videos) < 2:
        raise ValueError("plan_probe needs at least 2 clips (half fit the read-out, half score it)")
    model, device = pipe.model, pipe.device
    T = videos.shape[1]
    mask = task_mask("interpolation", T) if mask is None else mask
    guesses = {"blend": baseline(videos, mask, "linear_blend")}                                  # [N, T, 3, H, W]
    motion = motion_input(pipe, videos, mask, batch_size)
    if motion is not None:
        guesses["motion"] = motion
    p = model.cfg.planner.patch_size
    plans, reals, guesses_lo = [], [], {name: [] for name in guesses}
    for chunk, *guess_chunks in zip(videos.split(batch_size), *(g.split(batch_size) for g in guesses.values())):
        m = mask[None].expand(len(chunk), T).to(device)
        _, z_lo = encode_given(pipe.autoencoder, chunk.to(device), m, model.cfg.lowres_factor, pipe.lowres_mode)
        plans.append(model.plan(z_lo.to(pipe.dtype), m)[:, mask].float().cpu())                   # [n, G, m, D]
        for source, out in zip([chunk, *guess_chunks], [reals, *guesses_lo.values()]):
            _, lo = encode_given(pipe.autoencoder, source.to(device), torch.zeros_like(m), model.cfg.lowres_factor,
                                 pipe.lowres_mode)
            out.append(patchify(lo[:, mask].float(), p).cpu())                                    # [n, G, m, C p p]
    plan, real = torch.cat(plans), torch.cat(reals)
    half = len(videos) // 2
    read_out = ridge_read_out(plan[:half].flatten(0, 2).double(), real[:half].flatten(0, 2).double())
    target = real[half:].double()
    total = (target - real[:half].double().flatten(0, 2).mean(0)).pow(2).sum()
    r2 = lambda pred: float(1 - (pred - target).pow(2).sum() / total)  # noqa: E731
    spatial = plan.var(dim=2, unbiased=False).mean() / plan.pow(2).mean().clamp_min(1e-20)
    return {"r2": r2(read_out(plan[half:].double())), "spatial_share": float(spatial),
            **{f"{name}_r2": r2(torch.cat(lo)[half:].double()) for name, lo in guesses_lo.items()}}


MOVING_THRESHOLD = 0.05  # a pixel "moves" where the blend misses it by more than this (mean abs over RGB, [0, 1])


def _region_psnr(pred: Tensor, target: Tensor, region: Tensor) -> float:
    """PSNR over the pixels of `region` [N, T', H, W]; pred/target [N, T', 3, H, W] in [-1, 1] (nan if empty)."""
    if not bool(region.any()):
        return math.nan
    p, t = unit_range_pair(pred.flatten(0, 1), target.flatten(0, 1))                     # [N T', 3, H, W]
    err = (p - t).pow(2).mean(1)                                                          # [N T', H, W]
    return float(psnr_from_mse(err[region.flatten(0, 1)].mean()))


@torch.no_grad()
def noise_level_report(pipe, videos: Tensor, levels: Sequence[float], seed: int = 0, batch_size: int = 16) -> dict:
    """Interpolation (first + last given), real clips noised to each level t and denoised in one step: PSNR of the
    generated frames overall, where the scene moves and where it is still (MOVING_THRESHOLD), beside the blend and
    beside the noisy input rescaled to unit signal (what a model that only removes the mean of the noise gives).
    Every level uses the same noise draw."""
    model, diffusion, device = pipe.model, pipe.diffusion, pipe.device
    T = videos.shape[1]
    mask = task_mask("interpolation", T)
    blend = baseline(videos, mask, "linear_blend")
    real = videos[:, mask]
    moving = ((blend[:, mask] - real).abs().mean(2) / 2) > MOVING_THRESHOLD  # [N, T', H, W]
    regions = {"all": torch.ones_like(moving), "moving": moving, "still": ~moving}
    row = lambda x: {name: _region_psnr(x, real, r) for name, r in regions.items()}  # noqa: E731
    estimates = {float(t): [] for t in levels}
    rescaled = {float(t): [] for t in levels}
    for i, chunk in enumerate(videos.split(batch_size)):
        n = chunk.shape[0]
        m = mask[None].expand(n, T).to(device)
        pixels = chunk.to(device)
        z = pipe.autoencoder.encode(pixels).to(pipe.dtype)                              # every frame, the real latents
        _, z_lo = encode_given(pipe.autoencoder, pixels, m, model.cfg.lowres_factor, pipe.lowres_mode)
        plan = model.plan(z_lo.to(pipe.dtype), m)                                      # from the given frames only
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed + i)).to(device, z.dtype)
        for t in estimates:
            tt = torch.full((n,), t, device=device)
            estimate = model.clean_estimate(z, m, diffusion, tt, noise, plan=plan)
            estimates[t].append(pipe.autoencoder.decode(estimate.float()).cpu())
            x_t, _ = diffusion.noisy_and_target(z, noise, tt)
            signal, _ = diffusion.noisy_and_target(torch.ones_like(z), torch.zeros_like(z), tt)  # x0's coefficient
            scaled = torch.where(m[:, :, None, None, None], x_t / signal, z)
            rescaled[t].append(pipe.autoencoder.decode(scaled.float()).cpu())
    return {"moving_fraction": float(moving.float().mean()), "blend": row(blend[:, mask]),
            "levels": {t: {"model": row(torch.cat(estimates[t])[:, mask]),
                           "rescaled_input": row(torch.cat(rescaled[t])[:, mask])} for t in estimates}}


# ------------------------------------------------------------------------------------------------ the report
def _mean(x: Tensor) -> float:
    return float(x.float().mean())


def interpolation_report(pipe, videos: Tensor, num_steps: int | None = None, seed: int = 0,
                         ablations: bool = True, pm_seeds: int = 1, progress: bool = False,
                         guidance_scale: float = 1.0) -> dict:
    """Interpolation (first + last given) of every clip: sampled, posterior mean, blend, and the ablations.

    pm_seeds > 1 also draws the posterior mean from that many noise inputs: a network that has learned to ignore
    its pure-noise input at t near 1 gives the same estimate for each (agreement PSNR very high), one that passes
    the noise through gains when they are averaged (`posterior_mean_avg_psnr`)."""
    T = videos.shape[1]
    mask = task_mask("interpolation", T)
    blend = baseline(videos, mask, "linear_blend")
    sampled = samples(pipe, videos, mask, num_steps, seed, progress=progress, guidance_scale=guidance_scale)
    means = [posterior_mean(pipe, videos, mask, seed=seed + k) for k in range(max(pm_seeds, 1))]
    report = {
        "psnr": _mean(clip_psnr(sampled, videos, mask)), "ssim": _mean(clip_ssim(sampled, videos, mask)),
        "blend_psnr": _mean(clip_psnr(blend, videos, mask)), "blend_ssim": _mean(clip_ssim(blend, videos, mask)),
        "posterior_mean_psnr": _mean(clip_psnr(means[0], videos, mask)),
        "sample_error_ratio": sample_error_ratio(sampled, means[0], videos, mask),
    }
    if pm_seeds > 1:
        report["posterior_mean_seeds"] = pm_seeds
        report["posterior_mean_avg_psnr"] = _mean(clip_psnr(torch.stack(means).mean(0), videos, mask))
        report["posterior_mean_seed_agreement_psnr"] = _mean(clip_psnr(means[1], means[0], mask))
    given_motion = motion_input(pipe, videos, mask)
    if given_motion is not None:
        report["motion_input_psnr"] = _mean(clip_psnr(given_motion, videos, mask))
        # the share of clips on which the network's best guess improves on its input (0.5: a coin)
        report["posterior_mean_beats_motion_input"] = _mean(
            clip_psnr(means[0], videos, mask) > clip_psnr(given_motion, videos, mask))
    if pipe.model.match_features is not None:  # the matcher without its learned features, same settings
        report["fixed_matcher_psnr"] = _mean(clip_psnr(motion_input(pipe, videos, mask, learned=False), videos, mask))
    if ablations:
        for name, kw in (("null_plan", dict(plan="null")), ("shuffled_plan", dict(plan="shuffled")),
                         ("noise_references", dict(references="noise"))):
            estimate = posterior_mean(pipe, videos, mask, seed=seed, **kw)
            report[f"posterior_mean_psnr_{name}"] = _mean(clip_psnr(estimate, videos, mask))
    return report


def ceiling(cfg, videos: Tensor, task: str = "interpolation", draws: int = 32, seed: int = 0,
            best_of: int = 4) -> dict:
    """What a task could score on synthetic clips [N, T, 3, H, W] (clips 0..N-1 of SyntheticVideoConfig cfg):
    each clip's scene redrawn `draws` times from what its given frames leave open (interpolation, first and last
    given: synthetic.interpolation_posterior; i2v, the middle frame given: synthetic.image_to_video_posterior),
    rendered, and scored as the benchmark scores a model. The draws' mean is the best guess of a model that also knew
    every shape's exact parameters where given, so its PSNR bounds from above what any model's posterior mean
    reaches; one draw is what a perfect sampler's sample scores (3 dB lower where the posterior is wide: error ratio
    2), the best of `best_of` draws what its best of that many does (the benchmark's image-to-video figure).
    Where the draws would not be exact for cfg's clips (synthetic.why_ceiling_inexact): {"skipped": the reason}."""
    import numpy as np

    from ..data.synthetic import draw_scene, image_to_video_posterior, interpolation_posterior, why_ceiling_inexact

    reason = why_ceiling_inexact(cfg)
    if reason:
        return {"skipped": f"not exact for these clips: {reason}"}
    if not 1 <= best_of <= draws:
        raise ValueError(f"ceiling: best_of must be in 1..draws ({draws}), got {best_of}")
    if task not in ("interpolation", "i2v"):
        raise ValueError(f"ceiling: task must be interpolation or i2v, got {task!r}")
    T = videos.shape[1]
    mask = task_mask(task, T, position="middle") if task == "i2v" else task_mask(task, T)
    given = int((~mask).nonzero()[0]) if task == "i2v" else None  # the one given frame
    rng = np.random.default_rng(seed)

    def draw(scene):
        if task == "i2v":
            background, shapes = image_to_video_posterior(scene, given, rng)
            return scene.render(shapes, background)
        return scene.render(interpolation_posterior(scene, rng))

    mean_psnr, sample_psnr, best_psnr, mean_mse, sample_mse = [], [], [], 0.0, 0.0
    for i, clip in enumerate(videos):
        scene = draw_scene(cfg, i)
        if not torch.equal(torch.from_numpy(scene.render()), clip):
            raise ValueError(f"ceiling: clip {i} is not clip {i} of the synthetic config given")
        rendered = torch.from_numpy(np.stack([draw(scene) for _ in range(draws)]))  # [draws, T, 3, H, W]
        mean, truth = rendered.mean(0, keepdim=True), clip[None].expand_as(rendered)
        single = clip_psnr(rendered, truth, mask)  # [draws]
        mean_psnr.append(clip_psnr(mean, clip[None], mask)[0])
        sample_psnr.append(single.mean())  # a draw's PSNR, averaged over the draws
        best_psnr.append(single[: draws - draws % best_of].reshape(-1, best_of).amax(1).mean())  # disjoint groups
        mean_mse += pooled_mse(mean, clip[None], mask)
        sample_mse += pooled_mse(rendered, truth, mask)
    return {"draws": draws, "posterior_mean_psnr": _mean(torch.stack(mean_psnr)),
            "sample_psnr": _mean(torch.stack(sample_psnr)), "best_of": best_of,
            "best_psnr": _mean(torch.stack(best_psnr)),
            # pooled over clips, as sample_error_ratio's (undefined where the given frames fix every clip exactly)
            "sample_error_ratio": sample_mse / mean_mse if mean_mse > 0 else math.nan}


def i2v_report(pipe, videos: Tensor, num_seeds: int = 4, num_steps: int | None = None, seed: int = 0,
               progress: bool = False, guidance_scale: float = 1.0) -> dict:
    """Image-to-video from the middle frame: best-of-K and mean PSNR vs repeating the frame; the posterior mean
    (is the best guess above the repeated frame even where single samples are not?); motion energy."""
    T = videos.shape[1]
    mask = task_mask("i2v", T, position="middle")
    runs = [samples(pipe, videos, mask, num_steps, seed + 1000 * k, progress=progress, guidance_scale=guidance_scale)
            for k in range(num_seeds)]
    psnr = torch.stack([clip_psnr(r, videos, mask) for r in runs])  # [K, N]
    real = motion_energy(videos)
    generated = sum(motion_energy(r) for r in runs) / len(runs)
    mean = posterior_mean(pipe, videos, mask, seed=seed)
    report = {"best_of": num_seeds, "best_psnr": _mean(psnr.max(0).values), "mean_psnr": _mean(psnr),
              "posterior_mean_psnr": _mean(clip_psnr(mean, videos, mask)),
              "repeat_psnr": _mean(clip_psnr(baseline(videos, mask, "repeat_nearest"), videos, mask)),
              "motion_energy": generated, "real_motion_energy": real,
              "motion_ratio": generated / real if real > 0 else math.nan,
              "sample_error_ratio": sum(sample_error_ratio(r, mean, videos, mask) for r in runs) / len(runs)}
    if len(runs) >= 2:
        report["sample_spread"] = sample_spread(runs, mean, videos, mask)
    return report


def learning_report(pipe, videos: Tensor, num_steps: int | None = None, seed: int = 0, i2v_seeds: int = 4,
                    ablations: bool = True, step_sweep: Sequence[int] = (), noise_levels: Sequence[float] = (),
                    pm_seeds: int = 1, progress: bool = False, guidance_scale: float = 1.0) -> dict:
    """The whole benchmark on clips [N, T, 3, H, W]; a JSON-able dict. progress: a bar per sampling pass.
    guidance_scale: classifier-free guidance on the plan for every sample (the one-step estimates stay unguided:
    the posterior mean is the network's own best guess)."""
    report = {"clips": int(videos.shape[0]), "num_frames": int(videos.shape[1]),
              "num_steps": num_steps or pipe.diffusion.cfg.num_inference_steps, "guidance_scale": guidance_scale,
              "interpolation": interpolation_report(pipe, videos, num_steps, seed, ablations, pm_seeds,
                                                   progress, guidance_scale)}
    if len(videos) >= 2:
        report["plan_probe"] = plan_probe(pipe, videos)
    if i2v_seeds:
        report["i2v"] = i2v_report(pipe, videos, i2v_seeds, num_steps, seed, progress, guidance_scale)
    if step_sweep:
        mask = task_mask("interpolation", videos.shape[1])
        report["step_sweep"] = {int(n): _mean(clip_psnr(samples(pipe, videos, mask, n, seed, progress=progress,
                                                                guidance_scale=guidance_scale), videos, mask))
                                for n in step_sweep}
    if noise_levels:
        report["noise_levels"] = noise_level_report(pipe, videos, noise_levels, seed)
    return report
