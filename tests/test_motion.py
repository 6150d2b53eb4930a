"""The motion-compensated estimate (mardini/models/motion.py) and how the joint model uses it (model.motion)."""

from __future__ import annotations

import pytest
import torch

from mardini.diffusion import Diffusion, DiffusionConfig
from mardini.masking import task_mask
from mardini.models import MarDini, model_config
from mardini.models import motion as motion_module
from mardini.models.motion import MatchFeatures, bilateral_estimate, motion_estimate, nearest_given

from helpers_models import fit_fixed_batch, frames_seen_by_blocks, randomize

C = 4
RF_X0 = dict(formulation="rectified_flow", prediction="sample", sampler="euler")
RF_V = dict(formulation="rectified_flow", prediction="velocity", sampler="euler")


def masks(*rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r] for r in rows], dtype=torch.bool)


def moving_square(T: int, size: int = 32, side: int = 6, start=(4, 5), velocity=(1.0, 0.5), channels: int = C):
    """[1, T, C, size, size]: a textured square moving at constant velocity (cells per frame) over a smooth
    background; positions are whole cells at the ends, fractional in between (rendered with area coverage)."""
    g = torch.Generator().manual_seed(0)
    texture = torch.rand(channels, side, side, generator=g) + 1.0
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    background = torch.stack([torch.sin(xs / 5 + c) * torch.cos(ys / 7 - c) * 0.3 for c in range(channels)])
    frames = []
    for t in range(T):
        y0, x0 = start[0] + velocity[0] * t, start[1] + velocity[1] * t
        frame = background.clone()
        iy, ix = int(round(y0)), int(round(x0))
        frame[:, iy:iy + side, ix:ix + side] = texture
        frames.append(frame)
    return torch.stack(frames)[None]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak 2 (values span about [-0.5, 2])."""
    return float(10 * torch.log10(4 / (a - b).pow(2).mean()))


# ------------------------------------------------------------------------------------------------ the estimate
def test_nearest_given_frames_on_each_side():
    before, after = nearest_given(masks("0110100", "1101111"))
    assert before.tolist() == [[0, 0, 0, 3, 3, 5, 6], [2, 2, 2, 2, 2, 2, 2]]
    assert after.tolist() == [[0, 3, 3, 3, 5, 5, 6], [2, 2, 2, 2, 2, 2, 2]]


def test_given_frames_are_their_own_estimate_and_one_sided_frames_copy_the_nearest():
    z = torch.randn(2, 6, C, 8, 8)
    mask = masks("011011", "110111")
    out = motion_estimate(z, mask)
    assert torch.equal(out[~mask], z[~mask])                       # exactly, not to rounding
    assert torch.equal(out[0, 4], z[0, 3]) and torch.equal(out[0, 5], z[0, 3])   # after the last given frame
    assert torch.equal(out[1, 0], z[1, 2]) and torch.equal(out[1, 5], z[1, 2])   # image-to-video
    assert not torch.equal(out[0, 1], z[0, 0])                     # between two given frames: matched
    # values of generated frames are never read
    assert torch.equal(motion_estimate(torch.where(mask[:, :, None, None, None], 9.0, z), mask), out)


def test_matching_follows_a_moving_square_far_better_than_the_blend():
    T = 9
    video = moving_square(T)                                       # moves 8 x 4 cells from first to last
    mask = task_mask("interpolation", T)[None]
    out = motion_estimate(video, mask)
    a = torch.linspace(0, 1, T)[None, :, None, None, None]
    blend = (1 - a) * video[:, :1] + a * video[:, -1:]
    middle = slice(1, T - 1)
    matched, blended = psnr(out[:, middle], video[:, middle]), psnr(blend[:, middle], video[:, middle])
    assert matched > blended + 8, (matched, blended)
    # the pyramid is what reaches 8 cells: one level of +-2 cells does not
    single = psnr(motion_estimate(video, mask, levels=1)[:, middle], video[:, middle])
    assert matched > single + 5, (matched, single)


def test_wider_coarse_levels_reach_motion_the_pyramid_misses():
    """A square moving 12 cells between the given frames is beyond what +-2 cells a level find in practice (the soft
    match falls short near the edge of each level's search); searching the levels above the finest +-3 cells finds
    it as radius 3 everywhere does, and the model's matcher takes that radius from model.motion.coarse_radius."""
    T = 9
    video, mask = moving_square(T, velocity=(1.5, 0.0)), task_mask("interpolation", T)[None]
    middle = slice(1, T - 1)
    score = lambda out: psnr(out[:, middle], video[:, middle])  # noqa: E731
    narrow = motion_estimate(video, mask)
    wide = motion_estimate(video, mask, coarse_radius=3)
    assert score(wide) > score(narrow) + 8, (score(wide), score(narrow))
    assert score(wide) > score(motion_estimate(video, mask, radius=3)) - 0.1
    assert torch.equal(motion_estimate(video, mask, coarse_radius=2), narrow)  # = radius: the default search
    model = MarDini(model_config("tiny", latent_channels=C, motion=dict(estimate="bilateral", coarse_radius=3)))
    assert torch.equal(model.motion(video, mask), wide)


def test_batched_estimate_equals_each_frame_matched_alone():
    """motion_estimate matches every frame at once (fixed shapes: no wait for the GPU to count the frames between
    given ones); each frame between two given frames must still equal its pair matched on its own."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 7, C, 16, 16, generator=g) * torch.tensor([1.0, 3.0, 0.2])[:, None, None, None, None]
    mask = masks("0111110", "0110101", "1011111")
    out = motion_estimate(z, mask)
    for b, t, before, after in [(0, 1, 0, 6), (0, 4, 0, 6), (1, 1, 0, 3), (1, 2, 0, 3), (1, 4, 3, 5)]:
        alone = bilateral_estimate(z[b, before][None], z[b, after][None], torch.tensor([(t - before) / (after - before)]))
        assert torch.allclose(out[b, t], alone[0], atol=1e-5), (b, t)
    assert torch.equal(out[1, 6], z[1, 5]) and torch.equal(out[2, 0], z[2, 1]) and torch.equal(out[2, 6], z[2, 1])


@pytest.mark.parametrize("pair", [False, True])
def test_matching_only_the_frames_between_given_ones_changes_nothing(pair):
    """On the CPU (compact) only the frames between two given frames go through the matcher; on a GPU every frame
    does. Both give the same estimate and the same gradient to learned features, for any mix of tasks, and a batch
    with no frame between given ones (image-to-video) skips the matcher."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 7, C, 16, 16, generator=g)
    raw = torch.randn(4, 7, 3, 16, 16, generator=g)
    mask = masks("0111110", "0110101", "1011111", "0111111")            # between given frames and one-sided
    outs, grads = [], []
    for compact in (True, False):
        features = raw.clone().requires_grad_()
        out = motion_estimate(z, mask, temperature=0.3, pair=pair, features=features, compact=compact)
        out.square().sum().backward()
        outs.append(out)
        grads.append(features.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-5)
    assert grads[0].abs().sum() > 0
    for mask in (mask, masks("1110111", "0111111", "1111110", "1101111")):  # the second: one-sided only
        compact = motion_estimate(z, mask, pair=pair, compact=True)
        torch.testing.assert_close(compact, motion_estimate(z, mask, pair=pair, compact=False), rtol=0, atol=1e-6)
        assert torch.equal(motion_estimate(z, mask, pair=pair), compact)  # the default on the CPU: compact


def test_estimate_is_independent_of_latent_scale_and_offset():
    video = moving_square(5)
    mask = task_mask("interpolation", 5)[None]
    out = motion_estimate(video, mask)
    scaled = motion_estimate(video * 3.5 - 1.0, mask)
    assert torch.allclose((scaled + 1.0) / 3.5, out, atol=1e-4)


def test_chunked_search_equals_one_chunk():
    g = torch.Generator().manual_seed(1)
    first, last = torch.randn(3, C, 16, 16, generator=g), torch.randn(3, C, 16, 16, generator=g)
    fraction = torch.tensor([0.25, 0.5, 0.9])
    whole = bilateral_estimate(first, last, fraction, max_elements=2**30)
    chunked = bilateral_estimate(first, last, fraction, max_elements=1)  # one displacement at a time
    assert torch.allclose(whole, chunked, atol=1e-5)


def test_a_fade_is_estimated_as_the_blend():
    """No motion, only a change of brightness: zero displacement pairs like with like, every other one mismatches
    the texture, so the estimate is (close to) the blend."""
    base = moving_square(1, size=16, side=4)[0]                    # [1, C, 16, 16]
    out = bilateral_estimate(base, base * 0.8, torch.tensor([0.5]))
    assert (out - 0.9 * base).abs().max() < 0.02 * base.abs().max()


def test_pair_carries_each_given_frame_along_the_motion_and_blends_to_the_estimate():
    T = 9
    video = moving_square(T)
    mask = task_mask("interpolation", T)[None]
    estimate, forward, backward = motion_estimate(video, mask, pair=True).chunk(3, dim=2)
    assert torch.allclose(estimate, motion_estimate(video, mask), atol=1e-5)
    a = torch.linspace(0, 1, T)[None, :, None, None, None]
    assert torch.allclose(estimate, (1 - a) * forward + a * backward, atol=1e-5)
    middle = slice(1, T - 1)
    blended = psnr(((1 - a) * video[:, :1] + a * video[:, -1:])[:, middle], video[:, middle])
    for side in (forward, backward):                               # each side alone follows the square
        assert psnr(side[:, middle], video[:, middle]) > blended + 6
        assert torch.equal(side[~mask], video[~mask])              # given frames: all parts the frame itself
    assert torch.equal(estimate[~mask], video[~mask])
    one_sided = masks("011111111")                                 # image-to-video: every part a copy
    out = motion_estimate(video, one_sided, pair=True)
    assert torch.equal(out[0, 5], video[0, 0].repeat(3, 1, 1))


# ------------------------------------------------------------------------------------------------ the model
def motion_model(residual: bool, pair: bool = False, residual_scale: float = 1.0, **overrides) -> MarDini:
    return MarDini(model_config("tiny", latent_channels=C, **overrides,
                                motion=dict(estimate="bilateral", residual=residual, pair=pair,
                                            residual_scale=residual_scale))).eval()


def test_generator_reads_the_estimate_and_needs_it_exactly_when_configured():
    torch.manual_seed(0)
    model = motion_model(residual=False)
    for p in model.generator.final.parameters():          # a non-zero output layer, so inputs show
        torch.nn.init.normal_(p, std=0.1)
    B, T = 1, 5
    x, mask = torch.randn(B, T, C, 8, 8), task_mask("interpolation", T)[None]
    time_, plan = torch.zeros(B, T), torch.randn(B, T, 16, model.cfg.signal_dim)
    motion = torch.randn_like(x)
    out = model.generator(x, mask, time_, plan, motion=motion)
    assert (model.generator(x, mask, time_, plan, motion=motion + 1) - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="motion"):
        model.generator(x, mask, time_, plan)
    plain = MarDini(model_config("tiny", latent_channels=C)).eval()
    assert plain.generator.motion_embed is None and plain.motion(x, mask) is None
    with pytest.raises(ValueError, match="motion"):
        plain.generator(x, mask, time_, plan, motion=motion)


def test_generator_reads_both_matched_frames_with_pair():
    """Swapping the two matched frames leaves the estimate as it is (a blend at a = 0.5) but changes the output:
    the generator sees which side said what. A motion input without the pair is refused by name."""
    torch.manual_seed(0)
    model = motion_model(residual=True, pair=True)
    for p in model.generator.final.parameters():
        torch.nn.init.normal_(p, std=0.1)
    B, T = 1, 5
    x, mask = torch.randn(B, T, C, 8, 8), task_mask("interpolation", T)[None]
    time_, plan = torch.zeros(B, T), torch.randn(B, T, 16, model.cfg.signal_dim)
    estimate, forward, backward = torch.randn(3, B, T, C, 8, 8)
    out = model.generator(x, mask, time_, plan, motion=torch.cat([estimate, forward, backward], 2))
    swapped = model.generator(x, mask, time_, plan, motion=torch.cat([estimate, backward, forward], 2))
    assert (swapped - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="motion.pair"):
        model.generator(x, mask, time_, plan, motion=estimate)


@pytest.mark.parametrize("pair", [False, True], ids=["estimate", "pair"])
def test_residual_model_starts_at_the_estimate(pair):
    """An untrained clean-sample model predicts 0 (zero-initialised output layer): with model.motion.residual its
    posterior mean and its samples are the motion estimate itself, so training starts from it."""
    torch.manual_seed(0)
    model, diffusion = motion_model(residual=True, pair=pair), Diffusion(DiffusionConfig(**RF_X0))
    z = moving_square(5, size=16, side=4, velocity=(1.0, 0.5))
    mask = task_mask("interpolation", 5)[None]
    estimate = model.motion_estimate(model.motion(z, mask))
    assert torch.equal(estimate, motion_estimate(z, mask))
    noise = torch.randn_like(z)
    posterior = model.clean_estimate(z, mask, diffusion, torch.tensor([0.999]), noise)
    assert torch.allclose(posterior, estimate, atol=1e-6)
    sample = model.generate(z, mask, diffusion, num_steps=3, noise=noise)
    assert torch.allclose(sample, estimate, atol=1e-5)
    assert torch.equal(sample[~mask], z[~mask])
    # without the residual the same untrained model answers 0 on the generated frames
    plain = motion_model(residual=False)
    assert plain.generate(z, mask, diffusion, num_steps=3, noise=noise)[mask].abs().max() < 1e-6


@pytest.mark.parametrize("residual", [False, True], ids=["input", "residual"])
def test_loss_target_is_relative_to_the_estimate_only_with_residual(residual):
    """The target is the residual from the estimate times motion.residual_scale (2 here), and generation maps it
    back: from_diffused inverts to_diffused."""
    torch.manual_seed(0)
    scale = 2.0 if residual else 1.0  # a scale other than 1 needs the residual (the config refuses it otherwise)
    model, diffusion = motion_model(residual=residual, residual_scale=scale), Diffusion(DiffusionConfig(**RF_X0))
    z = moving_square(5, size=16, side=4)
    mask = task_mask("interpolation", 5)[None]
    out = model(z, None, mask, diffusion, noise=torch.randn_like(z), t=torch.tensor([0.5]))
    motion = model.motion(z, mask)
    expected = (z - motion) * scale if residual else z
    assert torch.allclose(out["target"][mask], expected[mask], atol=1e-6)
    torch.testing.assert_close(model.from_diffused(model.to_diffused(z, motion), motion), z, rtol=0, atol=1e-6)


@pytest.mark.parametrize("residual", [False, True], ids=["input", "residual"])
def test_motion_model_overfits_a_fixed_batch_and_keeps_given_frames(residual):
    torch.manual_seed(0)
    model, diffusion = motion_model(residual=residual).train(), Diffusion(DiffusionConfig(**RF_V))
    z = moving_square(5, size=16, side=4)
    mask = masks("01110")
    losses = fit_fixed_batch(model, z, mask, diffusion, torch.randn_like(z), torch.tensor([0.5]), steps=100)
    assert min(losses[-10:]) < losses[0] / 5
    out = model.eval().generate(z, mask, diffusion, num_steps=2)
    assert torch.equal(out[~mask], z[~mask]) and torch.isfinite(out).all()


@pytest.mark.parametrize("overrides, key", [
    (dict(motion=dict(estimate="optical")), "motion.estimate"),
    (dict(motion=dict(residual=True)), "motion.residual"),
    (dict(motion=dict(pair=True)), "motion.pair"),
    (dict(motion=dict(estimate="bilateral", window=4)), "motion.window"),
    (dict(motion=dict(estimate="bilateral", levels=0)), "motion.levels"),
    (dict(motion=dict(estimate="bilateral", coarse_radius=-1)), "motion.coarse_radius"),
    (dict(motion=dict(estimate="bilateral", temperature=0.0)), "motion.temperature"),
    (dict(motion=dict(radus=2)), "motion.radus"),
    (dict(motion=dict(estimate="learned")), "motion.temperature"),  # 0.06 passes the features no gradient
    (dict(motion=dict(estimate="learned", temperature=0.3, loss_weight=0.0)), "motion.loss_weight"),
    (dict(motion=dict(estimate="learned", temperature=0.3, feature_dim=0)), "motion.feature_dim"),
    (dict(planner=dict(loss_weight=1.0), motion=dict(plan_layout=True)), "motion.plan_layout"),  # no estimate
    (dict(motion=dict(estimate="bilateral", plan_layout=True)), "motion.plan_layout"),  # no read-out
])
def test_bad_motion_config_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        model_config("tiny", **overrides)


@pytest.mark.parametrize("pair, layout", [(False, False), (True, False), (True, True)],
                         ids=["estimate", "pair", "pair_and_layout"])
def test_flop_estimate_counts_the_motion_embedding(pair, layout):
    from torch.utils.flop_counter import FlopCounterMode

    model = MarDini(model_config("tiny", latent_channels=C, sdpa_kernel="math", planner=dict(loss_weight=1.0),
                                 motion=dict(estimate="bilateral", pair=pair, plan_layout=layout))).eval()
    B, T, H, W = 1, 5, 8, 8
    mask = task_mask("interpolation", T)[None]
    z = torch.randn(B, T, C, H, W)
    with torch.no_grad():
        plan = model.planner(torch.randn(B, T, C, H // 2, W // 2), mask)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        blocks = 1 + 2 * pair + layout
        model.generator(z, mask, torch.rand(B, T) * 1000, plan, motion=torch.randn(B, T, C * blocks, H, W))
    assert model.estimate_flops(T, (H, W), 3, B, executed=True)["generator"] == counter.get_total_flops()


# ------------------------------------------------------------------------------------------ the plan's layout
def layout_model(**motion) -> MarDini:
    return MarDini(model_config("tiny", latent_channels=C, planner=dict(loss_weight=1.0),
                                motion=dict(estimate="bilateral", residual=True, plan_layout=True, **motion))).eval()


def test_plan_layout_is_the_readout_of_each_generated_frame_at_its_place():
    """The layout channels are the planner's read-out of each generated frame's plan, put back on the low-resolution
    grid (token k covers cell k) and upsampled to the latents; zeros on the given frames; the estimate as before."""
    torch.manual_seed(0)
    model = layout_model()
    B, T, H, W = 2, 5, 16, 16
    z, mask = torch.randn(B, T, C, H, W), masks("01110", "01111")
    plan = torch.randn(B, T, (H // 2) * (W // 2), model.cfg.signal_dim)
    out = model.motion_input(model.motion(z, mask), mask, plan)
    assert out.shape == (B, T, 2 * C, H, W)
    assert torch.equal(out[:, :, :C], model.motion(z, mask))
    layout = out[:, :, C:]
    assert torch.equal(layout[~mask], torch.zeros_like(layout[~mask]))
    cells = model.planner.readout(plan).reshape(B, T, H // 2, W // 2, C).permute(0, 1, 4, 2, 3)  # token k -> cell k
    want = torch.nn.functional.interpolate(cells.flatten(0, 1), size=(H, W), mode="bilinear").unflatten(0, (B, T))
    assert torch.allclose(layout[mask], want[mask], atol=1e-6)
    # a plan token moved to another cell moves its read-out there: the layout follows where each token is
    moved = plan.clone()
    moved[:, :, [0, 63]] = plan[:, :, [63, 0]]
    assert not torch.allclose(model.motion_input(model.motion(z, mask), mask, moved)[:, :, C:][mask], layout[mask],
                              atol=1e-3)


def test_generator_reads_the_plan_layout_and_only_the_plan_loss_trains_the_readout():
    """The generator's output depends on the read-out (through the layout), the diffusion loss sees the layout
    detached (no gradient reaches the read-out from it), the planner's own loss trains the read-out."""
    torch.manual_seed(0)
    model, diffusion = layout_model().train(), Diffusion(DiffusionConfig(**RF_X0))
    for p in model.generator.final.parameters():          # a non-zero output layer, so inputs show
        torch.nn.init.normal_(p, std=0.1)
    z, mask = moving_square(5, size=16, side=4), task_mask("interpolation", 5)[None]
    noise, t = torch.randn_like(z), torch.tensor([0.5])
    out = model(z, None, mask, diffusion, noise=noise, t=t)
    readout = list(model.planner.readout.parameters())
    assert all(g is None for g in torch.autograd.grad(out["diffusion_loss"], readout, allow_unused=True,
                                                       retain_graph=True))
    assert sum(g.abs().sum() for g in torch.autograd.grad(out["plan_loss"], readout)) > 0
    with torch.no_grad():
        model.planner.readout.bias.add_(1.0)              # another read-out, same plan: another prediction
    moved = model(z, None, mask, diffusion, noise=noise, t=t)["prediction"]
    assert (moved - out["prediction"]).abs().max() > 1e-3


@pytest.mark.parametrize("guidance", [1.0, 2.0], ids=["plain", "guided"])
def test_generation_with_the_plan_layout_caches_references_exactly(guidance):
    """The layout is computed once per generation, from the plan (and, guided, the null plan's for the unguided half):
    reusing the reference frames' pass gives what running every frame each step gives."""
    torch.manual_seed(0)
    model = MarDini(model_config("tiny", latent_channels=C, plan_dropout=0.1, planner=dict(loss_weight=1.0),
                                 motion=dict(estimate="bilateral", residual=True, plan_layout=True))).eval()
    for p in model.generator.final.parameters():
        torch.nn.init.normal_(p, std=0.1)
    torch.nn.init.normal_(model.null_plan, std=1.0)
    diffusion = Diffusion(DiffusionConfig(**RF_X0))
    z, mask = moving_square(5, size=16, side=4).expand(2, -1, -1, -1, -1), masks("01110", "01110")
    noise = torch.randn_like(z)
    with frames_seen_by_blocks(model) as seen_cached:
        cached = model.generate(z, mask, diffusion, num_steps=3, noise=noise, guidance_scale=guidance)
    full = model.generate(z, mask, diffusion, num_steps=3, noise=noise, guidance_scale=guidance,
                          reuse_references=False)
    assert set(seen_cached) == {2, 3}  # the cache is used: one pass of the 2 reference frames, steps of the 3 others
    assert torch.allclose(cached, full, atol=1e-5) and torch.equal(cached[~mask], z[~mask])
    seen = []  # the plans the layout is read from: once per generation; guided, the null plan for the second half
    layout = model.plan_layout
    model.plan_layout = lambda plan, *args: seen.append(plan) or layout(plan, *args)
    model.generate(z, mask, diffusion, num_steps=3, noise=noise, guidance_scale=guidance)
    assert len(seen) == 1 and seen[0].shape[0] == (4 if guidance != 1.0 else 2)
    if guidance != 1.0:
        assert torch.equal(seen[0][2:], model.null_plan.expand_as(seen[0][2:]))
        assert not torch.equal(seen[0][:2], seen[0][2:])


# ------------------------------------------------------------------------------------- a learned estimate
LEARNED = dict(estimate="learned", temperature=0.3, residual=True)


def uniform_square(T: int = 5, size: int = 16, side: int = 4, step: float = 2.0) -> torch.Tensor:
    """[1, T, C, size, size]: a uniformly coloured square crossing a smooth background fast (the case in which raw
    latents pair like with like both along its path and on the still background)."""
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    background = torch.stack([0.2 * torch.sin(xs / 6 + c) for c in range(C)])
    frames = []
    for t in range(T):
        frame = background.clone()
        x0 = int(2 + step * t)
        frame[:, 6:6 + side, x0:x0 + side] = torch.tensor([1.0, -1.0, 0.5, 0.8])[:, None, None]
        frames.append(frame)
    return torch.stack(frames)[None]


def test_constant_features_give_the_bilateral_estimate():
    """The features enter only the cost, as a difference: where they are equal everywhere the learned estimate is
    the plain one (same temperature), and the estimate is always a blend of the frames' own values."""
    z = moving_square(5, size=16, side=4)
    mask = task_mask("interpolation", 5)[None]
    constant = torch.full((1, 5, 3, 16, 16), 0.7)
    learned = motion_estimate(z, mask, temperature=0.3, features=constant)
    assert torch.allclose(learned, motion_estimate(z, mask, temperature=0.3), atol=1e-6)
    features = torch.randn(1, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(motion_estimate(z, mask, temperature=0.3, features=features), learned, atol=1e-3)


def test_a_window_of_frames_k_apart_expects_k_times_the_motion():
    """The smoothness prior is on motion per frame of the scene: in a window whose frames lie k apart (a long video's
    keyframes) MarDini.motion divides it by k^2, so that a strong prior that holds back the estimate of a window of
    consecutive frames lets the same displacement through when the frames lie that far apart."""
    model = MarDini(model_config("tiny", latent_channels=C, motion=dict(estimate="bilateral", smoothness=0.3)))
    T = 9
    video, mask = moving_square(T), task_mask("interpolation", T)[None]
    near, far = model.motion(video, mask), model.motion(video, mask, spacing=4.0)
    assert torch.equal(near, motion_estimate(video, mask, smoothness=0.3))
    assert torch.equal(far, motion_estimate(video, mask, smoothness=0.3 / 16))
    middle = slice(1, T - 1)
    assert psnr(far[:, middle], video[:, middle]) > psnr(near[:, middle], video[:, middle]) + 3
    with pytest.raises(ValueError, match="spacing must be >= 1"):
        model.motion(video, mask, spacing=0.5)


def test_the_matcher_without_learned_features_is_the_plain_one_with_the_same_settings():
    """model.motion(..., learned=False) is what the learning benchmark scores as the fixed matcher (what the features
    add): the learned model's matcher with its settings and no features, without gradient; with them it differs."""
    torch.manual_seed(0)
    model = MarDini(model_config("tiny", latent_channels=C, motion=dict(LEARNED, window=3, radius=1)))
    z, mask = uniform_square(), task_mask("interpolation", 5)[None]
    fixed = model.motion(z, mask, learned=False)
    assert not fixed.requires_grad
    assert torch.equal(fixed, motion_estimate(z, mask, radius=1, window=3, temperature=0.3))
    with torch.no_grad():  # features that vary (at initialisation they are small: the estimate moves by < 1e-4)
        for p in model.match_features.parameters():
            p.copy_(torch.randn_like(p))
    assert model.motion(z, mask).requires_grad
    assert not torch.allclose(model.motion(z, mask), fixed, atol=1e-4)


def test_motion_loss_trains_only_the_features_and_the_diffusion_sees_the_estimate_detached():
    torch.manual_seed(0)
    model = MarDini(model_config("tiny", latent_channels=C, motion=LEARNED)).train()
    diffusion = Diffusion(DiffusionConfig(**RF_X0))
    z, mask = uniform_square(), task_mask("interpolation", 5)[None]
    out = model(z, None, mask, diffusion, noise=torch.randn_like(z), t=torch.tensor([0.5]))
    features = list(model.match_features.parameters())
    assert torch.allclose(out["loss"], out["diffusion_loss"] + out["motion_loss"])
    assert all(g is None for g in torch.autograd.grad(out["diffusion_loss"], features, allow_unused=True,
                                                       retain_graph=True))
    grads = torch.autograd.grad(out["motion_loss"], features)
    assert all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    estimate = model.motion(z, mask)  # the target is relative to the estimate (residual), without its gradient
    assert torch.allclose(out["target"][mask], ((z - estimate) * model.cfg.motion.residual_scale)[mask], atol=1e-5)


def test_noise_draws_run_the_planner_and_estimate_once_and_average_the_single_draw_losses():
    """train.noise_draws = k: each clip's k noise levels and noises share one plan and one motion estimate (the
    planner and the matcher run once per clip) and the diffusion loss is the mean over draws, so the loss and every
    gradient equal the mean of the k single-draw steps (whose auxiliary losses are the same)."""
    torch.manual_seed(0)
    model = randomize(MarDini(model_config("tiny", latent_channels=C, planner=dict(loss_weight=1.0),
                                           motion=dict(LEARNED, residual_scale=3.0)))).train()
    diffusion = Diffusion(DiffusionConfig(**RF_X0))
    z = torch.cat([uniform_square(), uniform_square().flip(1)])
    mask = masks("01110", "01111")
    noise = torch.randn(2, 2, *z.shape[1:])                                  # [B, draws, T, C, H, W]
    t = torch.tensor([[0.2, 0.7], [0.45, 0.95]])
    calls = []
    model.planner.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))

    def step(noise, t):
        model.zero_grad()
        out = model(z, None, mask, diffusion, noise=noise, t=t)
        out["loss"].backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    both, both_grads = step(noise.flatten(0, 1), t.flatten())
    assert calls == [2], "the planner must run once per clip, not per draw"
    first, first_grads = step(noise[:, 0], t[:, 0])
    second, second_grads = step(noise[:, 1], t[:, 1])
    torch.testing.assert_close(both["diffusion_loss"], (first["diffusion_loss"] + second["diffusion_loss"]) / 2)
    assert abs(first["diffusion_loss"].item() - second["diffusion_loss"].item()) > 1e-3  # the draws do differ
    for key in ("motion_loss", "plan_loss"):
        torch.testing.assert_close(both[key], first[key])
    assert both_grads.keys() == first_grads.keys() and len(both_grads) > 0
    for name, grad in both_grads.items():
        torch.testing.assert_close(grad, (first_grads[name] + second_grads[name]) / 2, rtol=1e-4, atol=1e-6,
                                   msg=name)
    with pytest.raises(ValueError, match="draws"):
        model(z, None, mask, diffusion, noise=noise.flatten(0, 1), t=t[:, 0])
    with pytest.raises(ValueError, match="draws"):
        model(z, None, mask, diffusion, noise=noise[:, 0], t=t[0, 0])


def test_the_cpu_computes_features_of_the_given_frames_only_and_matches_the_frames_between_them_only(monkeypatch):
    """The learned estimate reads the features of given frames only and estimates only the frames between two given
    ones; on the CPU it computes no more (the GPU keeps fixed shapes: every frame). Same estimate and the same
    gradient to the feature network either way; a batch with nothing to match (image-to-video) still passes the
    features a (zero) gradient, which DDP needs of every parameter."""
    torch.manual_seed(0)
    model = MarDini(model_config("tiny", latent_channels=C, motion=LEARNED))
    z = torch.cat([uniform_square(), moving_square(5, size=16, side=4)])
    params = list(model.match_features.parameters())
    seen, matched = [], []
    model.match_features.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    real = motion_module.bilateral_estimate

    def bilateral_estimate(first, *args, **kw):
        matched.append(first.shape[0])
        return real(first, *args, **kw)
    monkeypatch.setattr(motion_module, "bilateral_estimate", bilateral_estimate)
    for mask in (masks("01110", "01010"), masks("01111", "11011")):  # interpolation-like; nothing between
        cpu = model.motion(z, mask)
        cpu_grads = torch.autograd.grad(cpu.square().sum(), params, allow_unused=True)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the fixed-shape path of a GPU
        fixed = model.motion(z, mask)
        fixed_grads = torch.autograd.grad(fixed.square().sum(), params, allow_unused=True)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
        torch.testing.assert_close(cpu, fixed, rtol=0, atol=1e-6)
        assert all(a is not None and b is not None for a, b in zip(cpu_grads, fixed_grads))
        for a, b in zip(cpu_grads, fixed_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert seen == [5, 10, 2, 10]  # given frames only on the CPU path, all 2 x 5 on the fixed one
    assert matched == [5, 10, 10, 10]  # frames between given ones only, unless there are none (then all)
    assert sum(g.abs().sum() for g in cpu_grads) == 0  # nothing between given frames: a zero gradient, not None


def test_learned_features_lower_the_estimate_error_of_a_uniform_object():
    """Trained on their own loss, the features make the matcher follow a uniform square that the raw latents lose
    (the estimate's error on the frames between the given ones falls well below the fixed matcher's)."""
    torch.manual_seed(0)
    model = MarDini(model_config("tiny", latent_channels=C, motion=LEARNED))
    z, mask = uniform_square(), task_mask("interpolation", 5)[None]
    fixed = model.motion_loss(motion_estimate(z, mask, temperature=0.3), z, mask).item()
    opt = torch.optim.Adam(model.match_features.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model.motion_loss(model.motion(z, mask), z, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.motion_loss(model.motion(z, mask), z, mask).item() < 0.5 * fixed


def test_flop_estimate_counts_the_feature_network():
    from torch.utils.flop_counter import FlopCounterMode

    from mardini.models.flops import match_features_flops

    cfg = model_config("tiny", latent_channels=C, motion=LEARNED)
    with FlopCounterMode(display=False) as counter:
        MatchFeatures(C, cfg.motion.feature_width, cfg.motion.feature_dim)(torch.randn(2 * 5, C, 8, 8))
    assert match_features_flops(cfg, 5, (8, 8), batch_size=2) == counter.get_total_flops() > 0


@pytest.mark.parametrize("estimate", ["bilateral", "learned"])
def test_compiled_motion_estimate_is_one_graph_and_equals_eager(estimate):
    """train.compile with train.compile_motion compiles the matcher and the features (parallelize): dynamo must trace
    the matcher whole (a graph break would put the eager launches back), one graph must serve every mask (the masks
    are tensors, not constants), and the compiled estimate and its features' gradient equal the eager ones.
    aot_eager traces forward and backward as inductor would, without its slow code generation."""
    from mardini.training.parallel import parallelize

    torch.manual_seed(0)
    motion = LEARNED if estimate == "learned" else dict(estimate="bilateral")
    eager = MarDini(model_config("tiny", latent_channels=C, motion=motion))
    compiled = MarDini(model_config("tiny", latent_channels=C, motion=motion))
    compiled.load_state_dict(eager.state_dict())
    parallelize(compiled, compile=True, compile_motion=False)
    assert compiled._motion_estimate is motion_estimate  # train.compile_motion=false keeps it eager
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled._motion_estimate = torch.compile(motion_estimate, backend=counter)
    z = moving_square(5, size=16, side=4)
    for rows in (("01110",), ("01010",), ("00110",)):  # interpolation, two gaps, a frame with a given one side only
        mask = masks(*rows)
        want, got = eager.motion(z, mask), compiled.motion(z, mask)
        assert torch.allclose(got, want, atol=1e-5)
        if estimate == "learned":
            grads = [torch.autograd.grad(m.motion_loss(out, z, mask), m.match_features.net[0].weight)[0]
                     for m, out in ((eager, want), (compiled, got))]
            assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-7) and grads[0].abs().sum() > 0
    assert counter.frame_count == 1  # one graph, traced once for all three masks

    trained = MarDini(model_config("tiny", latent_channels=C, motion=motion))
    parallelize(trained, compile=True)  # the default: the motion estimate compiled too
    assert trained._motion_estimate is not motion_estimate


class CompileCounter:
    """A torch.compile backend that counts the graphs it is given and runs them as traced (aot_eager)."""

    def __init__(self):
        from torch._dynamo.backends.common import aot_autograd

        self.frame_count = 0
        self._backend = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=lambda gm, _: gm)

    def __call__(self, gm, example_inputs):
        self.frame_count += 1
        return self._backend(gm, example_inputs)
