"""The learning benchmark (mardini/evaluation/learning.py, benchmarks/demo_quality.py): held-out clips, the
baselines, the posterior mean and its ablations, and the report."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mardini.autoencoders.identity import IdentityAutoencoder
from mardini.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset
from mardini.diffusion import Diffusion, DiffusionConfig
from mardini.evaluation import learning
from mardini.evaluation.benchmarks import linear_blend, repeat_nearest
from mardini.evaluation.learning import (MOVING_THRESHOLD, baseline, clip_psnr, generator_attention, held_out_clips,
                                         i2v_report, interpolation_report, motion_energy, noise_level_report,
                                         plan_probe, posterior_mean)
from mardini.inference import MarDiniPipeline
from mardini.data.latent_cache import encode_given
from mardini.masking import task_mask
from mardini.models import MarDini, model_config
from mardini.models.layers import patchify

REPO = Path(__file__).resolve().parent.parent
T, H = 5, 16


def random_pipeline(seed: int = 0, **model_overrides) -> MarDiniPipeline:
    """A tiny model with every parameter random (no zero-initialised layer hides a dependence)."""
    torch.manual_seed(seed)
    model = MarDini(model_config("tiny", latent_channels=12, **model_overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name, p in m.named_parameters(recurse=False):
                gain = isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and name == "weight"
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if gain else 0.0))
    config = {"num_frames": T, "height": H, "width": H, "fps": 8, "lowres_mode": "latents",
              "diffusion": dataclasses.asdict(DiffusionConfig()),
              "autoencoder": {"name": "identity", "patch_size": 2, "scale": 3.5, "shift": -0.38}}
    return MarDiniPipeline(model, Diffusion(DiffusionConfig()), IdentityAutoencoder(2, 3.5, -0.38), config)


def clips(n: int = 3) -> torch.Tensor:
    data = SyntheticVideoDataset(SyntheticVideoConfig(seed=7, num_videos=n, num_frames=T, height=H, width=H))
    return torch.stack([data[i]["video"] for i in range(n)])


def test_held_out_clips_are_the_validation_seeds_stream():
    data = {"source": "synthetic", "val_seed": 11,
            "synthetic": dict(num_videos=64, num_frames=T, height=H, width=H, min_shapes=1, max_shapes=3, seed=0)}
    videos = held_out_clips(data, 3)
    expected = SyntheticVideoDataset(SyntheticVideoConfig(seed=11, num_videos=3, num_frames=T, height=H, width=H))
    assert torch.equal(videos, torch.stack([expected[i]["video"] for i in range(3)]))
    # trained at random frame strides: the held-out clips follow them, unless consecutive frames are asked for
    data["synthetic"]["max_frame_stride"] = 4
    assert not torch.equal(held_out_clips(data, 3), videos)
    assert torch.equal(held_out_clips(data, 3, consecutive=True), videos)
    train = SyntheticVideoDataset(SyntheticVideoConfig(seed=0, num_videos=64, num_frames=T, height=H, width=H))
    assert not any(torch.equal(videos[0], train[i]["video"]) for i in range(64))
    with pytest.raises(ValueError, match="data.source='cache'"):
        held_out_clips({"source": "cache"}, 3)


def test_baselines_and_metrics():
    videos = clips()
    mask = task_mask("interpolation", T)
    blend = baseline(videos, mask, "linear_blend")
    assert torch.equal(blend[1], linear_blend(videos[1], mask))
    assert torch.allclose(blend[:, 2], (videos[:, 0] + videos[:, -1]) / 2)
    assert torch.equal(baseline(videos, task_mask("i2v", T, position="middle"), "repeat_nearest")[0],
                       repeat_nearest(videos[0], task_mask("i2v", T, position="middle")))
    assert (clip_psnr(videos, videos, mask) > 150).all()  # identical: clamped, not inf
    noisy = videos + 0.1 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(0))
    noisier = videos + 0.2 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(0))
    assert (clip_psnr(noisy, videos, mask) > clip_psnr(noisier, videos, mask) + 5).all()
    still = videos[:, :1].expand_as(videos)
    assert motion_energy(still) == 0 and motion_energy(videos) > 0


def test_posterior_mean_keeps_given_frames_and_each_ablation_changes_it():
    pipe, videos = random_pipeline(), clips()
    mask = task_mask("interpolation", T)
    estimate = posterior_mean(pipe, videos, mask)
    assert torch.equal(estimate[:, ~mask], videos[:, ~mask])
    assert torch.equal(estimate, posterior_mean(pipe, videos, mask))  # seeded
    for kw in (dict(plan="null"), dict(plan="shuffled"), dict(references="noise")):
        ablated = posterior_mean(pipe, videos, mask, **kw)
        assert (ablated - estimate)[:, mask].abs().max() > 1e-3, kw
    # one denoising step from t = 0.999 with the same noise, done by hand
    model, diffusion = pipe.model, pipe.diffusion
    with torch.no_grad():
        z = pipe.autoencoder.encode(videos)
        m = mask[None].expand(len(videos), T)
        z = torch.where(m[:, :, None, None, None], 0.0, z)
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
        t = torch.full((len(videos),), 0.999)
        x_t, _ = diffusion.noisy_and_target(z, noise, t)
        plan = model.plan(model_lowres(model, z), m)
        pred = model.generator(torch.where(m[:, :, None, None, None], x_t, z), m, torch.where(m, 999.0, 0.0), plan)
        by_hand = pipe.autoencoder.decode(diffusion.predict_x0(x_t, pred, t))
    assert torch.allclose(estimate[:, mask], by_hand[:, mask], atol=1e-5)
    with pytest.raises(ValueError, match="plan must be"):
        posterior_mean(pipe, videos, mask, plan="other")
    with pytest.raises(ValueError, match="noise_level_report"):
        posterior_mean(pipe, videos, mask, t=0.7)


def model_lowres(model, z):
    from mardini.models import lowres_from_hires

    return lowres_from_hires(z, model.cfg.lowres_factor)


def test_interpolation_report_scores_the_blend_independently():
    pipe, videos = random_pipeline(), clips()
    report = interpolation_report(pipe, videos, num_steps=2, ablations=False)
    mask = task_mask("interpolation", T)
    expected = clip_psnr(torch.stack([linear_blend(v, mask) for v in videos]), videos, mask).mean().item()
    assert report["blend_psnr"] == pytest.approx(expected)
    assert report["psnr"] < report["blend_psnr"]  # a random model loses to the blend
    # the sampled figure scores clip i's own pipeline call with seed i (first and last frame given), the posterior
    # mean's figure the posterior mean
    sampled = torch.stack([pipe({0: v[0], T - 1: v[-1]}, num_steps=2, seed=i) for i, v in enumerate(videos)])
    assert report["psnr"] == pytest.approx(clip_psnr(sampled, videos, mask).mean().item(), abs=1e-3)
    estimate = posterior_mean(pipe, videos, mask)
    assert report["posterior_mean_psnr"] == pytest.approx(clip_psnr(estimate, videos, mask).mean().item())
    assert set(report) == {"psnr", "ssim", "blend_psnr", "blend_ssim", "posterior_mean_psnr", "sample_error_ratio"}


@pytest.mark.parametrize("estimate", ["bilateral", "learned"])
def test_interpolation_report_scores_the_matcher_without_its_learned_features(estimate):
    """With learned matching features the report also scores the same matcher without them (what they learned):
    the motion input computed with learned=False; a fixed matcher has no such line."""
    torch.manual_seed(0)
    pipe, videos, mask = random_pipeline(), clips(), task_mask("interpolation", T)
    pipe.model = MarDini(model_config("tiny", latent_channels=12, motion=dict(estimate=estimate, temperature=0.3)))
    with torch.no_grad():  # features far from constant, so that the two estimates differ
        for p in pipe.model.parameters() if estimate == "learned" else []:
            p.copy_(torch.randn_like(p))
    report = interpolation_report(pipe, videos, num_steps=1, ablations=False)
    assert report["motion_input_psnr"] == pytest.approx(
        clip_psnr(learning.motion_input(pipe, videos, mask), videos, mask).mean().item())
    if estimate == "bilateral":
        assert "fixed_matcher_psnr" not in report
        return
    fixed = learning.motion_input(pipe, videos, mask, learned=False)
    assert report["fixed_matcher_psnr"] == pytest.approx(clip_psnr(fixed, videos, mask).mean().item())
    assert report["fixed_matcher_psnr"] != pytest.approx(report["motion_input_psnr"], abs=1e-3)


def test_sample_error_ratio_and_spread_read_a_calibrated_sampler_as_2_and_1():
    """Clips drawn from a known Gaussian posterior (mean mu, std 0.1): samples from the same posterior err twice as
    much as mu and differ pairwise by twice its variance (ratio 2, spread 1); samples equal to mu give 1 and 0;
    samples with twice the posterior's std, 5 and 4. The figures are pooled, so they hold per pixel on average."""
    from mardini.evaluation.learning import sample_error_ratio, sample_spread

    g = torch.Generator().manual_seed(0)
    shape = (8, T, 3, H, H)
    mu = 0.5 * torch.rand(shape, generator=g) - 0.25
    draw = lambda std: mu + std * torch.randn(shape, generator=g)  # noqa: E731
    truth, mask = draw(0.1), task_mask("interpolation", T)
    calibrated = [draw(0.1) for _ in range(3)]
    assert sample_error_ratio(calibrated[0], mu, truth, mask) == pytest.approx(2.0, rel=0.02)
    assert sample_spread(calibrated, mu, truth, mask) == pytest.approx(1.0, rel=0.02)
    assert sample_error_ratio(mu, mu, truth, mask) == pytest.approx(1.0)
    assert sample_spread([mu, mu.clone()], mu, truth, mask) == 0.0
    wide = [draw(0.2) for _ in range(2)]
    assert sample_error_ratio(wide[0], mu, truth, mask) == pytest.approx(5.0, rel=0.03)
    assert sample_spread(wide, mu, truth, mask) == pytest.approx(4.0, rel=0.03)
    spoiled = calibrated[0].clone()
    spoiled[:, ~mask] += 1.0  # only the generated frames count
    assert sample_error_ratio(spoiled, mu, truth, mask) == sample_error_ratio(calibrated[0], mu, truth, mask)
    with pytest.raises(ValueError, match="at least two"):
        sample_spread(calibrated[:1], mu, truth, mask)


@pytest.mark.parametrize("carried", [0.0, 0.1])
def test_posterior_mean_seeds_show_noise_carried_through(monkeypatch, carried):
    """A network that ignores its pure-noise input gives one estimate whatever the noise: averaging K draws changes
    nothing. One that passes the noise through (here `carried` x the noise, a fake) gains when K draws are averaged,
    by ~10 log10(K) dB where that noise dominates, and two draws disagree. The motion-input comparison counts clips."""

    pipe, videos = random_pipeline(), clips(4)
    mask = task_mask("interpolation", T)
    bias = 0.02 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(1))  # the estimate's own error

    def fake_posterior_mean(pipe, videos, mask, seed=0, **kw):
        noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(100 + seed))
        return torch.where(mask[None, :, None, None, None], videos + bias + carried * noise, videos)

    motion = torch.where(mask[None, :, None, None, None], videos + 0.05, videos)  # error 0.05 everywhere
    monkeypatch.setattr(learning, "posterior_mean", fake_posterior_mean)
    monkeypatch.setattr(learning, "motion_input", lambda pipe, videos, mask: motion)
    report = interpolation_report(pipe, videos, num_steps=1, ablations=False, pm_seeds=4)
    gain = report["posterior_mean_avg_psnr"] - report["posterior_mean_psnr"]
    if carried == 0:  # mean square error 0.0004 < 0.0025: better than its input on every clip
        assert gain == pytest.approx(0.0, abs=1e-9) and report["posterior_mean_seed_agreement_psnr"] > 150
        assert report["posterior_mean_beats_motion_input"] == 1.0
    else:  # 0.0104 > 0.0025 for one draw, ~0.0029 for the mean of four
        assert 3.0 < gain < 10 * math.log10(4)
        assert report["posterior_mean_seed_agreement_psnr"] < 30
        assert report["posterior_mean_beats_motion_input"] == 0.0
    assert report["posterior_mean_seeds"] == 4
    single = interpolation_report(pipe, videos, num_steps=1, ablations=False)
    assert "posterior_mean_avg_psnr" not in single and single["posterior_mean_psnr"] == report["posterior_mean_psnr"]


def test_i2v_report_scores_the_posterior_mean_of_the_middle_frame_task(monkeypatch):
    """The image-to-video posterior mean is the model's best guess with only the middle frame given, scored on the
    other frames: a guess that repeats the frame scores exactly the repeat baseline, one nearer the truth scores
    above it, whatever the samples do."""

    pipe, videos = random_pipeline(), clips(3)
    i2v_mask = task_mask("i2v", T, position="middle")
    repeated = baseline(videos, i2v_mask, "repeat_nearest")
    seen = []

    def fake_posterior_mean(pipe, videos, mask, seed=0, **kw):
        seen.append(mask.clone())
        return guess

    monkeypatch.setattr(learning, "posterior_mean", fake_posterior_mean)
    guess = repeated
    report = i2v_report(pipe, videos, num_seeds=1, num_steps=1)
    assert all(torch.equal(m, i2v_mask) for m in seen) and seen
    assert report["posterior_mean_psnr"] == pytest.approx(report["repeat_psnr"])
    guess = 0.5 * (repeated + videos)  # half-way to the truth: the error halves, +6.02 dB
    better = i2v_report(pipe, videos, num_seeds=1, num_steps=1)
    assert better["posterior_mean_psnr"] - better["repeat_psnr"] == pytest.approx(20 * math.log10(2), abs=0.01)
    assert better["best_psnr"] == report["best_psnr"]  # the samples are the model's, untouched by the fake
    assert better["sample_error_ratio"] == pytest.approx(4 * report["sample_error_ratio"], rel=1e-9)  # error / 4
    assert "sample_spread" not in report  # one sample per clip: no pair to compare


def test_noise_level_report_scores_regions_against_the_blend_and_the_rescaled_input(monkeypatch):
    pipe, videos = random_pipeline(), clips(4)
    mask = task_mask("interpolation", T)
    blend = baseline(videos, mask, "linear_blend")
    moving = ((blend[:, mask] - videos[:, mask]).abs().mean(2) / 2) > MOVING_THRESHOLD
    assert 0 < moving.float().mean() < 0.5  # the clips have both moving and still pixels
    report = noise_level_report(pipe, videos, [0.01, 0.5, 0.99], batch_size=3)  # two chunks
    assert report["moving_fraction"] == pytest.approx(moving.float().mean().item())
    still_mse = ((blend[:, mask] - videos[:, mask]) / 2).pow(2).mean(2)[~moving].mean()
    assert report["blend"]["still"] == pytest.approx(-10 * math.log10(still_mse), rel=1e-6)
    assert report["blend"]["moving"] < report["blend"]["all"] < report["blend"]["still"]
    rescaled = [report["levels"][t]["rescaled_input"]["all"] for t in (0.01, 0.5, 0.99)]
    assert rescaled[0] > rescaled[1] > rescaled[2]  # less noise, closer input
    assert rescaled[0] > 35  # rectified flow at t = 0.01: the input is the clip up to 1 % of noise
    random_model = report["levels"][0.01]["model"]["all"]
    assert random_model < rescaled[0] - 10  # a random network does not return its input

    # An oracle that returns the real latents scores far above everything; one that returns the blend scores as
    # the blend, region by region (the estimate, the regions and the decoding line up).
    def oracle(answer):
        def clean_estimate(z_hi, mask_, diffusion, t, noise, z_lo=None, plan=None):
            return pipe.autoencoder.encode(answer[: z_hi.shape[0]]) if answer is blend else z_hi
        return clean_estimate

    monkeypatch.setattr(pipe.model, "clean_estimate", oracle(videos))
    exact = noise_level_report(pipe, videos, [0.5])["levels"][0.5]["model"]
    assert min(exact.values()) > 100
    monkeypatch.setattr(pipe.model, "clean_estimate", oracle(blend))
    as_blend = noise_level_report(pipe, videos, [0.5], batch_size=len(videos))["levels"][0.5]["model"]
    assert as_blend == pytest.approx(report["blend"], rel=1e-5)


def test_plan_probe_tells_a_plan_with_layout_from_one_without(monkeypatch):
    pipe, videos = random_pipeline(), clips(6)
    model = pipe.model
    D = model.cfg.signal_dim
    with torch.no_grad():
        _, real_lo = encode_given(pipe.autoencoder, videos, torch.zeros(len(videos), T, dtype=torch.bool),
                                  model.cfg.lowres_factor)
    tokens = patchify(real_lo, model.cfg.planner.patch_size)                    # [N, T, m, C]: the real layout
    oracle = torch.nn.functional.pad(tokens, (0, D - tokens.shape[-1]))
    monkeypatch.setattr(model, "plan", lambda z_lo, m, drop_plan=None: oracle[: len(z_lo)])
    knows = plan_probe(pipe, videos, batch_size=len(videos))
    assert knows["r2"] > 0.999 and knows["spatial_share"] > 0.05
    assert 0 < knows["blend_r2"] < 0.999  # the blend is a good guess, not the answer
    uniform = oracle.mean(2, keepdim=True).expand_as(oracle)                    # per-frame facts, no layout
    monkeypatch.setattr(model, "plan", lambda z_lo, m, drop_plan=None: uniform[: len(z_lo)])
    flat = plan_probe(pipe, videos, batch_size=len(videos))
    assert flat["spatial_share"] < 1e-9 and flat["r2"] < knows["r2"] - 0.3
    assert flat["blend_r2"] == pytest.approx(knows["blend_r2"])
    with pytest.raises(ValueError, match="at least 2 clips"):
        plan_probe(pipe, videos[:1])
    assert "motion_r2" not in knows  # a model without a motion input


def test_the_probe_read_out_is_ridge_so_weak_directions_do_not_blow_up():
    """Plan channels are nearly collinear: least squares gives the residue of their noise huge weights, and held-out
    tokens that vary a little more along it get absurd predictions (R^2 -5445 seen on a barely trained model). The
    ridge read-out keeps them near the signal's answer, and still reads an exact linear relation exactly."""
    from mardini.evaluation.learning import ridge_read_out

    g = torch.Generator().manual_seed(0)

    def tokens(n, weak):  # one signal channel and 8 copies of it off by noise of size `weak`
        a = torch.randn(n, 1, generator=g, dtype=torch.float64)
        x = torch.cat([a, a + weak * torch.randn(n, 8, generator=g, dtype=torch.float64)], 1)
        return x, 2 * a + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)

    (x, y), (x_test, y_test) = tokens(64, 1e-5), tokens(64, 1e-2)
    r2 = lambda fit: float(1 - (fit(x_test) - y_test).pow(2).sum() / (y_test - y.mean()).pow(2).sum())  # noqa: E731
    assert r2(ridge_read_out(x, y, ridge=1e-12)) < -10      # least squares in effect: the weak directions blow up
    assert r2(ridge_read_out(x, y)) > 0.95                  # the default penalty
    exact = ridge_read_out(x, x @ torch.arange(1.0, 10.0, dtype=torch.float64)[:, None] + 3)
    assert torch.allclose(exact(x), x @ torch.arange(1.0, 10.0, dtype=torch.float64)[:, None] + 3, atol=0.05)


def test_plan_probe_scores_the_motion_input_beside_the_blend(monkeypatch):
    """With model.motion the probe also scores the generator's motion input at low resolution: an input that is the
    true clip scores R^2 1, the blend as input scores what the blend does, and the plan's own score is unchanged."""
    import mardini.evaluation.learning as learning

    pipe, videos = random_pipeline(), clips(6)
    monkeypatch.setattr(learning, "motion_input", lambda pipe_, v, m, batch_size=16: v)          # a perfect input
    perfect = plan_probe(pipe, videos, batch_size=4)
    assert perfect["motion_r2"] == pytest.approx(1.0) and perfect["blend_r2"] < 0.999
    as_blend = lambda pipe_, v, m, batch_size=16: baseline(v, m, "linear_blend")  # noqa: E731
    monkeypatch.setattr(learning, "motion_input", as_blend)
    blend = plan_probe(pipe, videos, batch_size=4)
    assert blend["motion_r2"] == pytest.approx(blend["blend_r2"]) and blend["r2"] == pytest.approx(perfect["r2"])


@pytest.mark.slow
def test_demo_quality_cli_writes_the_report(tmp_path):
    pipe = random_pipeline()
    pipe.config["data"] = {"source": "synthetic", "val_seed": 5, "synthetic": dict(
        num_videos=10, num_frames=T, height=H, width=H, min_shapes=1, max_shapes=3, seed=0)}
    export = pipe.save_pretrained(tmp_path / "export")
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "demo_quality.py"), str(export), "--clips", "2",
                             "--steps", "2", "--i2v-seeds", "2", "--step-sweep", "1", "--device", "cpu",
                             "--attention", "--noise-levels", "0.5", "--pm-seeds", "2", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "interpolation    PSNR" in result.stdout and "linear blend     PSNR" in result.stdout
    report = json.loads(out.read_text())
    assert report["clips"] == 2 and "validation seed 5" in report["clips_from"]
    i, v = report["interpolation"], report["i2v"]
    assert i["posterior_mean_psnr_noise_references"] != i["posterior_mean_psnr"]
    assert math.isfinite(i["posterior_mean_avg_psnr"]) and "mean of 2" in result.stdout
    assert v["best_psnr"] >= v["mean_psnr"] and v["best_of"] == 2 and math.isfinite(v["motion_ratio"])
    assert math.isfinite(v["posterior_mean_psnr"]) and "  posterior mean PSNR" in result.stdout
    assert v["sample_error_ratio"] > 0 and v["sample_spread"] > 0 and i["sample_error_ratio"] > 0
    assert result.stdout.count("  samples' error  x") == 2 and "samples differ x" in result.stdout
    assert set(report["step_sweep"]) == {"1"} and math.isfinite(report["step_sweep"]["1"])
    blocks = len(pipe.model.generator.blocks)
    assert {t: len(rows) for t, rows in report["attention"].items()} == {"0.5": blocks, "0.999": blocks}
    assert "attention at t=0.5" in result.stdout
    assert list(report["noise_levels"]["levels"]) == ["0.5"] and "clean estimate by noise level" in result.stdout
    assert set(report["plan_probe"]) == {"r2", "blend_r2", "spatial_share"} and "plan probe" in result.stdout
    # synthetic clips: the ceiling of these very clips (what their first and last frames leave open)
    c, ci = i["ceiling"], v["ceiling"]
    assert c["draws"] == ci["draws"] == 64 and "ceiling          PSNR" in result.stdout
    assert c["posterior_mean_psnr"] > c["sample_psnr"] > i["blend_psnr"]
    assert ci["best_of"] == v["best_of"] == 2 and "  ceiling        PSNR" in result.stdout
    assert ci["best_psnr"] >= ci["sample_psnr"] and ci["posterior_mean_psnr"] > ci["sample_psnr"]


def test_demo_quality_fp8_scores_the_model_with_fp8_gemms(tmp_path):
    """--fp8 (MarDiniPipeline.use_fp8_gemms): the same clips and noise, the generator's GEMMs from e4m3 inputs; the
    score moves by FP8 rounding only."""
    pipe = random_pipeline()
    pipe.config["data"] = {"source": "synthetic", "val_seed": 5, "synthetic": dict(
        num_videos=10, num_frames=T, height=H, width=H, min_shapes=1, max_shapes=3, seed=0)}
    export = pipe.save_pretrained(tmp_path / "export")
    reports = {}
    for fp8 in (False, True):
        out = tmp_path / f"report_{fp8}.json"
        result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "demo_quality.py"), str(export),
                                 "--clips", "2", "--steps", "2", "--i2v-seeds", "0", "--no-ablations", "--device",
                                 "cpu", "--no-progress", "--ceiling-draws", "0", "--json", str(out),
                                 *(["--fp8"] if fp8 else [])],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        reports[fp8] = json.loads(out.read_text())
    assert reports[False]["fp8"] is False and reports[True]["fp8"] is True
    plain, fp8 = reports[False]["interpolation"], reports[True]["interpolation"]
    assert plain["psnr"] != fp8["psnr"] and abs(plain["psnr"] - fp8["psnr"]) < 0.5
    assert plain["blend_psnr"] == fp8["blend_psnr"]  # the same clips
    assert "ceiling" not in plain  # --ceiling-draws 0 skips it (--i2v-seeds 0: no image-to-video at all)


def test_demo_quality_reports_user_errors_in_one_line(tmp_path, capsys):
    """A missing export or clips folder, or a bad option, is one line on stderr and exit status 2 (no traceback);
    --debug shows the traceback."""
    script = str(REPO / "benchmarks" / "demo_quality.py")
    export = random_pipeline().save_pretrained(tmp_path / "export")
    cases = [([str(tmp_path / "missing")], "is not a folder"),
             ([str(export), "--data", str(tmp_path / "nope.csv")], "no such manifest or folder"),
             ([str(export), "--clips", "0"], "--clips must be >= 1"),
             ([str(export), "--guidance", "-1"], "--guidance must be >= 0"),
             ([str(export), "--flow-shift", "0"], "--flow-shift must be > 0"),
             ([str(export), "--guidance", "2"], "needs a model trained with model.plan_dropout > 0"),
             # these three once failed with a traceback, the last after the whole benchmark had run
             ([str(export), "--i2v-seeds", "-1"], "--i2v-seeds must be >= 0"),
             ([str(export), "--step-sweep", "4", "0"], "--steps and --step-sweep take sampler step counts >= 1"),
             ([str(export), "--json", str(tmp_path)], "is a folder: give a file name"),
             ([str(export), "--ceiling-draws", "-1"], "--ceiling-draws must be >= 0")]
    if not torch.cuda.is_available():
        cases.append(([str(export), "--device", "cuda"], "--device cuda: no CUDA device here"))
    bench = demo_quality()  # in-process: the script's main() is what its __main__ runs (one start-up, not ten)
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_:
            bench.main([*args, "--no-progress"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err, (args, err[-1000:])
        assert "Traceback" not in err
    # the script as users run it: the one line and status 2; --debug shows the traceback
    result = subprocess.run([sys.executable, script, str(tmp_path / "missing")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "is not a folder" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, script, str(tmp_path / "missing"), "--debug"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" in result.stderr


def demo_quality():
    """benchmarks/demo_quality.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_quality", REPO / "benchmarks" / "demo_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_quality_takes_the_vae_folder_of_a_moved_export(monkeypatch):
    """The missing-VAE error tells the user to pass --vae DIR; demo_quality.py once had no such option. --flow-shift
    reaches the loader, and the report records the shift its samples used."""
    loaded = []
    monkeypatch.setattr(MarDiniPipeline, "from_pretrained",
                        lambda path, **kwargs: loaded.append(kwargs) or random_pipeline())
    report = demo_quality().main(["export", "--vae", "/elsewhere/sd", "--data", "synthetic", "--clips", "2",
                                  "--steps", "1", "--i2v-seeds", "0", "--no-ablations", "--no-progress",
                                  "--device", "cpu", "--flow-shift", "0.5"])
    assert loaded == [dict(weights="ema", device="cpu", vae="/elsewhere/sd", flow_shift=0.5)]
    assert report["clips"] == 2 and report["flow_shift"] == 1.0  # the stand-in pipeline keeps its own sampler


def test_demo_quality_warns_when_the_data_given_is_the_models_training_data(tmp_path, monkeypatch, capsys):
    """--data naming the manifest (or folder) the model trained on is scored, but said not to be held out; its
    held-out counterpart, or the same file by another path, is compared resolved."""
    from mardini.data.counter_videos import write_test_video
    from mardini.data.manifest import write_manifest

    video = write_test_video(tmp_path / "a.mp4", num_frames=12, fps=8, height=16, width=16)
    for name in ("train.csv", "val.csv"):
        write_manifest(tmp_path / name, [{"path": str(video)}])
    bench, pipe = demo_quality(), random_pipeline()
    pipe.config["data"] = {"source": "video", "video": {"root": str(tmp_path / "train.csv")}}
    monkeypatch.chdir(tmp_path)
    _, where, _ = bench.load_clips(pipe, "./train.csv", 1)
    err = capsys.readouterr().err
    assert "warning: --data ./train.csv is the data this model was trained on (data.video.root" in err, err
    assert "not held-out" in err and "not held out" in where
    _, where, _ = bench.load_clips(pipe, "val.csv", 1)
    assert "warning" not in capsys.readouterr().err and where == "video files of val.csv"
    # trained from a latent cache: the videos it was cached from, where the cache records them
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cache.json").write_text(json.dumps({"dataset": {"config": {"root": "train.csv"}}}))
    assert bench.training_roots({"source": "cache", "cache_dir": str(tmp_path / "cache")}) == {
        (tmp_path / "train.csv").resolve(): "the videos of data.cache_dir"}
    assert bench.training_roots({"source": "cache", "cache_dir": str(tmp_path / "gone")}) == {}


def test_guidance_zero_samples_from_the_null_plan_and_reaches_every_figure(monkeypatch):
    """--guidance (learning_report's guidance_scale) samples with classifier-free guidance on the plan: at 0 a sample
    is the one the null plan alone gives (the plan replaced by it, unguided), at 1 the unguided sample; the
    interpolation, image-to-video and step-sweep figures all sample with it, the one-step estimates do not."""
    pipe, videos = random_pipeline(plan_dropout=0.1), clips(2)
    mask = task_mask("interpolation", T)
    plain = learning.samples(pipe, videos, mask, num_steps=2)
    assert torch.equal(learning.samples(pipe, videos, mask, num_steps=2, guidance_scale=1.0), plain)
    unconditional = learning.samples(pipe, videos, mask, num_steps=2, guidance_scale=0.0)
    planned = pipe.model.plan
    monkeypatch.setattr(pipe.model, "plan", lambda *a, **k: pipe.model.null_plan.expand_as(planned(*a, **k)))
    null_planned = learning.samples(pipe, videos, mask, num_steps=2)
    monkeypatch.undo()
    assert torch.allclose(unconditional, null_planned, atol=1e-5)
    assert (unconditional - plain).abs().max() > 1e-3  # the plan matters to this random model

    seen = []
    original = learning.samples
    monkeypatch.setattr(learning, "samples", lambda *a, guidance_scale=1.0, **k: seen.append(guidance_scale) or
                        original(*a, guidance_scale=guidance_scale, **k))
    report = learning.learning_report(pipe, videos, num_steps=2, i2v_seeds=2, ablations=False, step_sweep=(1,),
                                      guidance_scale=2.5)
    assert report["guidance_scale"] == 2.5 and seen == [2.5] * 4  # interpolation, 2 image-to-video, 1 sweep
    unguided = learning.learning_report(pipe, videos, num_steps=2, i2v_seeds=0, ablations=False)
    i, u = report["interpolation"], unguided["interpolation"]
    assert i["posterior_mean_psnr"] == u["posterior_mean_psnr"] and i["psnr"] != u["psnr"]


def _set_query_key(pipe: MarDiniPipeline, weight_scale: float, bias: float) -> None:
    """Every generator self-attention's queries and keys = weight_scale * W x + bias (values untouched)."""
    with torch.no_grad():
        for block in pipe.model.generator.blocks:
            D = block.attn.qkv.in_features
            block.attn.qkv.weight[: 2 * D] *= weight_scale
            block.attn.qkv.bias[: 2 * D] = bias


@pytest.mark.parametrize("impl", ["gather", "split", "mask"])
def test_attention_diagnostic_reads_uniform_attention_as_uniform(impl):
    """Queries and keys of zero give uniform attention: every figure must equal its uniform reference exactly (every
    identity-attention implementation: generated frames attend to every frame in each)."""
    pipe = random_pipeline()
    for block in pipe.model.generator.blocks:
        block.identity_impl = impl
    _set_query_key(pipe, 0.0, 0.0)
    mask = task_mask("interpolation", T)
    for row in generator_attention(pipe, clips(2), mask):
        assert row["ref_mass"] == pytest.approx(row["uniform_ref_mass"], abs=1e-5) == 2 / T
        assert row["own_frame_mass"] == pytest.approx(row["uniform_own_frame_mass"], abs=1e-5)
        assert row["local_share_of_ref_mass"] == pytest.approx(row["uniform_local_share"], abs=1e-5)


def test_attention_diagnostic_sees_attention_that_stays_at_its_place():
    """Constant queries and keys rotated by RoPE attend most where the key sits at the query's own place and frame:
    the diagnostic must report own-frame mass and local share far above uniform."""
    pipe = random_pipeline()
    _set_query_key(pipe, 0.0, 3.0)
    mask = task_mask("interpolation", T)
    for row in generator_attention(pipe, clips(2), mask):
        assert row["own_frame_mass"] > 2 * row["uniform_own_frame_mass"]
        assert row["local_share_of_ref_mass"] > 2 * row["uniform_local_share"]


def test_learning_sweep_trains_each_variant_and_scores_it(tmp_path):
    """benchmarks/learning_sweep.py: one real run per variant and seed, its overrides applied, each scored."""
    out = tmp_path / "sweep.jsonl"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "learning_sweep.py"), "--variant", "base=",
         "--variant", "slow=train.lr=1e-5 train.lr_schedule=constant", "--seeds", "3", "--clips", "2",
         "--i2v-seeds", "0", "--out", str(out), "--runs", str(tmp_path / "runs"),
         "--", "train.max_steps=4", "train.warmup_steps=1", "train.checkpoint_every=4"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"base", "slow"}
    for name, row in rows.items():
        assert row["exit"] == 0 and row["seed"] == 3, row
        interpolation = row["report"]["interpolation"]
        assert interpolation["blend_psnr"] > 10 and "posterior_mean_psnr" in interpolation, row
        config = (tmp_path / "runs" / f"sweep_{name}_s3" / "config.yaml").read_text()
        assert "seed: 3" in config
        assert ("lr: 1.0e-05" in config) == (name == "slow"), name
    # the same clips for every variant: the blend is the same
    base, slow = (rows[name]["report"]["interpolation"] for name in ("base", "slow"))
    assert base["blend_psnr"] == slow["blend_psnr"]
    assert "base" in result.stdout and "slow" in result.stdout  # the summary table
    with pytest.raises(SystemExit, match="NAME=OVERRIDES"):
        sys.path.insert(0, str(REPO / "benchmarks"))
        try:
            import learning_sweep
        finally:
            sys.path.pop(0)
        learning_sweep.parse_variant("no_equals_sign")


def test_long_video_plans_benchmark_scores_each_plan_against_the_real_frames(tmp_path, monkeypatch, capsys):
    """benchmarks/long_video_plans.py: both plans run on the same held-out clips, each scored over its generated
    frames against the real ones (a plan that returned the real clip would score the PSNR ceiling), with its calls."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("long_video_plans", REPO / "benchmarks" / "long_video_plans.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pipe = random_pipeline()
    pipe.config["data"] = {"source": "synthetic", "val_seed": 11, "synthetic": dict(
        num_videos=64, num_frames=T, height=H, width=H, min_shapes=1, max_shapes=3, seed=0)}
    monkeypatch.setattr(MarDiniPipeline, "from_pretrained", lambda *args, **kwargs: pipe)
    out = tmp_path / "plans.json"
    bench.main(["export", "--num-frames", "9", "--given", "0", "8", "--clips", "2", "--steps", "1", "--device", "cpu",
                "--window-strides", "1", "2", "--json", str(out)])
    report = json.loads(out.read_text())
    dense, sparse = report["plans"]
    # 9 frames, a 5-frame window: dense (0, 2, 4, 6, 8) then four 3-frame windows; sparse (0, 4, 8), two 5-frame ones
    assert (dense["keyframes"], dense["windows"], dense["frames_processed"]) == ("dense", 5, 17)
    assert (sparse["keyframes"], sparse["windows"], sparse["frames_processed"]) == ("sparse", 3, 13)
    clips = held_out_clips(pipe.config["data"], 2, 9)
    generated = torch.ones(9, dtype=torch.bool)
    generated[[0, 8]] = False
    assert report["blend_psnr"] == pytest.approx(clip_psnr(baseline(clips, generated, "linear_blend"), clips,
                                                           generated).mean().item())
    assert all(math.isfinite(p["psnr"]) and p["psnr"] < 60 for p in report["plans"])
    # each window of a plan tells its motion estimate its frames' spacing (sparse: (0, 4, 8), then two windows of
    # consecutive frames); --spacing one tells every window 1
    told, window_call = [], pipe._generate_window
    monkeypatch.setattr(pipe, "_generate_window", lambda *a, spacing=1.0, **kw: told.append(spacing) or window_call(
        *a, spacing=spacing, **kw))
    bench.score_plan(pipe, clips[:1], [0, 8], "sparse", 0, 1)
    bench.tell_every_window_spacing_one(pipe)
    bench.score_plan(pipe, clips[:1], [0, 8], "sparse", 0, 1)
    assert told == [4.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    monkeypatch.setattr(pipe, "run_plan", lambda plan, known, L, **kw: held_out_clips(pipe.config["data"], 2, 9)[
        int(kw["seed"])])  # the real clip itself: the ceiling
    assert bench.score_plan(pipe, clips, [0, 8], "sparse", 0, 1)["psnr"] == pytest.approx(200.0)
    # one window of frames 1 and 2 apart: frames 0-4, then 0, 2, 4, 6, 8 of each clip (the window holds 5)
    for spaced, frames in zip(report["spaced_windows"], ([0, 1, 2, 3, 4], [0, 2, 4, 6, 8])):
        window, inner = clips[:, frames], torch.tensor([False, True, True, True, False])
        assert (spaced["frames"], spaced["motion_input_psnr"]) == (5, None)  # this model reads no motion estimate
        assert spaced["blend_psnr"] == pytest.approx(clip_psnr(baseline(window, inner, "linear_blend"), window,
                                                               inner).mean().item())
        assert math.isfinite(spaced["psnr"]) and spaced["psnr"] < 60
    monkeypatch.setattr(pipe, "generate_clips", lambda videos, mask, seeds, steps, spacing: videos)  # real frames
    (ceiling,) = bench.score_spaced_windows(pipe, clips, [2], 0, 1)
    assert ceiling["psnr"] == pytest.approx(200.0) and ceiling["blend_psnr"] < 60
    told = []
    monkeypatch.setattr(pipe, "generate_clips", lambda videos, mask, seeds, steps, spacing: told.append(spacing)
                        or videos)
    bench.score_spaced_windows(pipe, clips, [2], 0, 1)
    bench.score_spaced_windows(pipe, clips, [2], 0, 1, tell_spacing=False)
    assert told == [2, 1]
    with pytest.raises(ValueError, match="interpolation needs 3"):  # frames 0 and 5 only
        bench.score_spaced_windows(pipe, clips, [5], 0, 1)
    with pytest.raises(ValueError, match="at least 1 apart"):
        bench.score_spaced_windows(pipe, clips, [0], 0, 1)
    with pytest.raises(SystemExit):  # the ends must be given: every generated frame lies between known ones
        bench.main(["export", "--num-frames", "9", "--given", "0", "4"])
    assert "include the first (0) and the last (8) frame" in capsys.readouterr().err


def test_sampling_temperature_prototype_scales_the_samplers_starting_noise():
    """benchmarks/prototypes/sampling_temperature.py: tau = 1 samples exactly what the pipeline does, tau = 0 the same
    sample whatever the seed (no noise left), and a tau in between differs from both."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sampling_temperature", REPO / "benchmarks" / "prototypes" / "sampling_temperature.py")
    proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proto)
    videos, mask = clips(2), task_mask("interpolation", T)

    def sample(tau, seed):
        pipe = random_pipeline()
        if tau is not None:
            proto.scaled_noise_sampler(pipe, tau)
        return learning.samples(pipe, videos, mask, num_steps=3, seed=seed)

    shipped = sample(None, 0)
    assert torch.equal(sample(1.0, 0), shipped)
    cold = sample(0.0, 0)
    assert torch.allclose(cold, sample(0.0, 5), atol=1e-6) and not torch.allclose(cold, shipped, atol=1e-3)
    warm = sample(0.5, 0)
    assert not torch.allclose(warm, cold, atol=1e-3) and not torch.allclose(warm, shipped, atol=1e-3)
    report = proto.score(random_pipeline(), videos, i2v_seeds=2, num_steps=3)
    assert set(report) == {"interpolation_psnr", "i2v_best_psnr", "i2v_mean_psnr", "motion_ratio"}
    assert report["i2v_best_psnr"] >= report["i2v_mean_psnr"] and report["motion_ratio"] > 0


def test_demo_quality_says_why_a_ceiling_was_skipped(capsys):
    """Clips whose given frames leave more open than the ceiling's draws cover get a line saying so, not a figure."""
    from mardini.evaluation.learning import ceiling, held_out_clips, held_out_synthetic_config

    data = {"source": "synthetic", "val_seed": 5, "synthetic": dict(num_frames=33, height=8, width=8, max_shapes=1)}
    skipped = ceiling(held_out_synthetic_config(data, 1), held_out_clips(data, 1), "i2v", draws=2, best_of=2)
    demo_quality().print_ceiling(skipped, "  ceiling       ", "what the middle frame leaves open", best=True)
    out = capsys.readouterr().out
    assert "ceiling        not computed: not exact for these clips: over 32 frames" in out and "PSNR" not in out
