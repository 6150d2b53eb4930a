"""Tests for mardini.diffusion: config checks, noise-path algebra, the masked loss and the samplers.

The sampler tests use oracle denoisers: for data with a known distribution (a single point, or a Gaussian) the
exact model output at (x_t, t) has a closed form, so a correct sampler must return the data distribution.
"""

import math

import pytest
import torch
from omegaconf import OmegaConf

from mardini.diffusion import Diffusion, DiffusionConfig, validate_diffusion_config

RF = dict(formulation="rectified_flow", prediction="velocity", sampler="euler")
RF_X0 = dict(formulation="rectified_flow", prediction="sample", sampler="euler")
DDIM_EPS = dict(formulation="ddpm", prediction="epsilon", sampler="ddim")
DDIM_V = dict(formulation="ddpm", prediction="v", sampler="ddim")
DDPM_EPS = dict(formulation="ddpm", prediction="epsilon", sampler="ddpm")
DDPM_V = dict(formulation="ddpm", prediction="v", sampler="ddpm")
ALL = {"rf_euler": RF, "rf_x0_euler": RF_X0, "ddim_eps": DDIM_EPS, "ddim_v": DDIM_V, "ddpm_eps": DDPM_EPS,
       "ddpm_v": DDPM_V}


def make(**kw) -> Diffusion:
    return Diffusion(DiffusionConfig(**kw))


# ------------------------------------------------------------------------------------------------ oracles
def oracle(diffusion: Diffusion, x0_hat_fn):
    """A denoise_fn(x_t, model_time) whose output is the ideal one given a posterior-mean function
    x0_hat_fn(x_t, t_or_alpha_bar). Derived here from first principles, not from Diffusion.predict_x0."""
    cfg = diffusion.cfg
    n = cfg.num_train_timesteps
    if cfg.formulation == "rectified_flow":

        def fn(x, mt):
            t = (mt / n).reshape(-1, *([1] * (x.ndim - 1)))
            if cfg.prediction == "sample":
                return x0_hat_fn(x, t)
            # x_t = (1-t) x0 + t eps  =>  E[eps - x0 | x_t] = (x_t - E[x0 | x_t]) / t
            return (x - x0_hat_fn(x, t)) / t

        return fn
    alphas_cumprod = diffusion.make_scheduler().alphas_cumprod

    def fn(x, mt):
        assert torch.equal(mt, mt.round()), "ddpm model time must be an integer index"
        a = alphas_cumprod[mt.long()].reshape(-1, *([1] * (x.ndim - 1)))
        x0 = x0_hat_fn(x, a)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if cfg.prediction == "epsilon":
            return eps
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return fn


def delta_oracle(diffusion: Diffusion, x0: torch.Tensor):
    """Data = the single point x0: E[x0 | x_t] = x0 whatever x_t."""
    return oracle(diffusion, lambda x, _: x0.expand_as(x))


def gaussian_oracle(diffusion: Diffusion, mu: float, s: float):
    """Data ~ N(mu, s^2) per element: the posterior mean is affine in x_t."""
    if diffusion.cfg.formulation == "rectified_flow":  # x_t = (1-t) x0 + t eps
        return oracle(diffusion, lambda x, t: mu + (1 - t) * s**2 * (x - (1 - t) * mu) / ((1 - t) ** 2 * s**2 + t**2))
    # x_t = sqrt(a) x0 + sqrt(1-a) eps
    return oracle(diffusion, lambda x, a: mu + a.sqrt() * s**2 * (x - a.sqrt() * mu) / (a * s**2 + 1 - a))


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(formulation="score"), "formulation"),
        (dict(prediction="epsilon"), "prediction"),  # rectified_flow + epsilon
        (dict(formulation="ddpm", prediction="velocity", sampler="ddim"), "prediction"),
        (dict(formulation="ddpm", prediction="epsilon", sampler="euler"), "sampler"),
        (dict(sampler="ddim"), "sampler"),  # rectified_flow + ddim
        (dict(timestep_sampling="cosine"), "timestep_sampling"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(logit_std=0.0), "logit_std"),
        (dict(logit_std=-1.0), "logit_std"),
        (dict(num_train_timesteps=1), "num_train_timesteps"),
        (dict(beta_schedule="cosine"), "beta_schedule"),
        (dict(beta_start=0.02, beta_end=0.01), "beta_end"),
        (dict(flow_shift=0.0), "flow_shift"),
        (dict(input_data_std=-1.0), "input_data_std"),
        (dict(loss_weight_offset=0.0), "loss_weight_offset"),
        (dict(loss_weight_power=float("nan")), "loss_weight_power"),
        (dict(**DDIM_EPS, num_inference_steps=2000), "num_inference_steps"),
        (dict(num_inference_steps="25"), "num_inference_steps"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DiffusionConfig(**kwargs)


def test_validate_accepts_dictconfig_and_rejects_unknown_keys():
    structured = OmegaConf.structured(DiffusionConfig)
    assert validate_diffusion_config(structured) == DiffusionConfig()
    ddim = OmegaConf.merge(structured, DDIM_V)
    assert validate_diffusion_config(ddim).prediction == "v"
    # a structured merge type-checks single fields but not combinations; validate catches those
    bad = OmegaConf.merge(structured, {"prediction": "epsilon"})
    with pytest.raises(ValueError, match="prediction"):
        validate_diffusion_config(bad)
    with pytest.raises(ValueError, match="num_steps"):
        validate_diffusion_config(OmegaConf.create({"num_steps": 10}))
    with pytest.raises(ValueError, match="sampler"):
        validate_diffusion_config(OmegaConf.create({"sampler": "heun"}))
    # Diffusion takes a DictConfig too
    assert Diffusion(ddim).cfg.sampler == "ddim"


# ------------------------------------------------------------------------------------------------ sample_t
def test_sample_t_logit_normal_statistics_and_seed():
    d = make(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    t = d.sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,)
    assert (t > 0).all() and (t < 1).all()
    assert abs(t.median().item() - 1 / (1 + math.exp(-0.5))) < 0.01
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.03
    assert abs(logit.std().item() - 0.8) < 0.03
    again = d.sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    other = d.sample_t(20000, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(t, other)


def test_sample_t_uniform_statistics():
    t = make(timestep_sampling="uniform").sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert (t > 0).all() and (t < 1).all()
    assert abs(t.mean().item() - 0.5) < 0.01
    assert abs(t.var().item() - 1 / 12) < 0.005


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_sample_t_draws_are_stratified_and_keep_the_distribution(sampling):
    """draws = k: each sample's k levels lie one in each 1/k of the distribution's quantiles (equally spaced on the
    circle of quantiles), so together they keep its statistics; one draw is what sample_t always drew."""
    d = make(timestep_sampling=sampling, logit_mean=0.3, logit_std=0.8)
    t = d.sample_t(5000, generator=torch.Generator().manual_seed(0), draws=4)
    assert t.shape == (20000,) and (t > 0).all() and (t < 1).all()
    q = t.view(5000, 4).double()
    if sampling == "logit_normal":  # back to the normal's quantiles
        q = torch.special.ndtr((torch.log(q / (1 - q)) - 0.3) / 0.8)
    gaps = torch.remainder(q.diff(dim=1), 1.0)
    torch.testing.assert_close(gaps, torch.full_like(gaps, 0.25), rtol=0, atol=1e-5)
    assert ((q * 4).floor().sort(dim=1).values == torch.arange(4.0)).all(), "one level in each quarter"
    single = d.sample_t(20000, generator=torch.Generator().manual_seed(1))
    for stat in (torch.mean, torch.median, torch.std):
        assert abs(stat(t).item() - stat(single).item()) < 0.01, stat
    assert torch.equal(d.sample_t(7, generator=torch.Generator().manual_seed(2), draws=1),
                       d.sample_t(7, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="draws"):
        d.sample_t(3, draws=0)


def test_sample_t_extreme_std_stays_inside_open_interval():
    t = make(logit_std=50.0).sample_t(1000, generator=torch.Generator().manual_seed(0))
    assert (t > 0).all() and (t < 1).all()


def test_model_time():
    t = torch.tensor([0.0, 0.25, 0.9999, 1.0])
    assert torch.allclose(make(**RF).model_time(t), torch.tensor([0.0, 250.0, 999.9, 1000.0]))
    mt = make(**DDIM_EPS).model_time(t)
    assert mt.dtype == torch.float32
    assert torch.equal(mt, torch.tensor([0.0, 250.0, 999.0, 999.0]))


def test_time_of_inverts_model_time():
    t = torch.tensor([0.001, 0.25, 0.5, 0.999])
    rf = make(**RF)
    assert torch.allclose(rf.time_of(rf.model_time(t)), t)
    ddpm = make(**DDIM_EPS)
    k = torch.arange(1000).float()
    assert torch.equal(ddpm.model_time(ddpm.time_of(k)), k)  # every DDPM index maps back to itself


@pytest.mark.parametrize("name", ["rf_x0_euler", "ddim_eps"])
def test_network_input_is_the_least_squares_estimate_of_x0(name):
    """With input_data_std = d the network reads c(t) x_t, c the regression coefficient of x0 on x_t for data of
    std d: checked against the empirical regression on Gaussian data; 0 means x_t as is; pure noise fades out."""
    d = 1.7
    diffusion = make(**ALL[name], input_data_std=d)
    g = torch.Generator().manual_seed(0)
    x0 = d * torch.randn(4, 200_000, generator=g)
    t = torch.tensor([0.05, 0.4, 0.8, 0.97])
    x_t, _ = diffusion.noisy_and_target(x0, torch.randn(x0.shape, generator=g), t)
    factor = diffusion.network_input(x_t, t) / x_t
    assert torch.allclose(factor, factor[:, :1].expand_as(factor))  # one scalar per sample
    regression = (x0 * x_t).mean(1) / x_t.pow(2).mean(1)
    assert torch.allclose(factor[:, 0], regression, rtol=0.02, atol=0.015), (factor[:, 0], regression)  # ~3 s.e.
    plain = make(**ALL[name])
    assert plain.network_input(x_t, t) is x_t
    if name.startswith("rf"):  # at t = 1 the input carries no signal, and the network reads none of it
        assert diffusion.network_input(x_t, torch.ones(4)).abs().max() == 0


# ------------------------------------------------------------------------------------------ noise algebra
def test_rectified_flow_path_and_x0():
    d = make(**RF)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 5, 5, generator=g), torch.randn(3, 2, 4, 5, 5, generator=g)
    xt, v = d.noisy_and_target(x0, noise, torch.zeros(3))
    assert torch.equal(xt, x0)
    assert torch.equal(v, noise - x0)
    xt, _ = d.noisy_and_target(x0, noise, torch.ones(3))
    assert torch.equal(xt, noise)
    t = torch.tensor([0.1, 0.5, 0.9])
    xt, v = d.noisy_and_target(x0, noise, t)
    assert torch.allclose(xt[1], 0.5 * x0[1] + 0.5 * noise[1])
    assert torch.allclose(d.predict_x0(xt, v, t), x0, atol=1e-5)


def test_rectified_flow_sample_prediction_targets_x0():
    """prediction=sample: same noise path, the target is the clean x0, and the model output is the clean estimate
    (the sampler converts it to the velocity the Euler scheduler steps along)."""
    d, v = make(**RF_X0), make(**RF)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 5, 5, generator=g), torch.randn(3, 2, 4, 5, 5, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    xt, target = d.noisy_and_target(x0, noise, t)
    assert torch.equal(xt, v.noisy_and_target(x0, noise, t)[0]) and torch.equal(target, x0)
    assert torch.equal(d.predict_x0(xt, target, t), x0)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddpm_path_and_x0(prediction):
    d = make(formulation="ddpm", prediction=prediction, sampler="ddim")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 5, 5, generator=g), torch.randn(3, 2, 4, 5, 5, generator=g)
    t = torch.tensor([0.0, 0.5, 0.999])
    xt, target = d.noisy_and_target(x0, noise, t)
    # alpha_bar of the configured schedule (scaled_linear: betas evenly spaced in sqrt), not read back from the code
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, 0)[torch.tensor([0, 500, 999])].float().reshape(3, 1, 1, 1, 1)
    assert torch.allclose(xt, a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-5)
    expected = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    assert torch.allclose(target, expected, atol=1e-5)
    assert torch.allclose(d.predict_x0(xt, target, t), x0, atol=1e-4)


def test_noisy_and_target_checks_shapes():
    d = make(**RF)
    with pytest.raises(ValueError):
        d.noisy_and_target(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError):
        d.noisy_and_target(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2))


# ---------------------------------------------------------------------------------------------------- loss
def test_loss_hand_computed():
    d = make(**RF)
    # B=2, T=2, C=1, H=1, W=2; per-frame MSE = mean of squared entries
    target = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]], [[2.0, 2.0]], [[0.0, 4.0]]]).reshape(2, 2, 1, 1, 2)
    pred = torch.zeros_like(target)
    mask = torch.tensor([[True, False], [True, True]])
    # frames: (1+9)/2 = 5 ; skipped ; (4+4)/2 = 4 ; (0+16)/2 = 8
    # per sample: 5 and (4+8)/2 = 6 -> every sample weighs the same: 5.5 (not the frame mean 17/3)
    assert torch.allclose(d.loss(pred, target, mask), torch.tensor(5.5))
    mask = torch.tensor([[False, True], [False, False]])
    assert torch.allclose(d.loss(pred, target, mask), torch.tensor(37.0))


def test_loss_ignores_unmasked_frames():
    d = make(**RF)
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 3, 4, 4, generator=g, requires_grad=True)
    target = torch.randn(2, 4, 3, 4, 4, generator=g)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    base = d.loss(pred, target, mask)
    target2, pred2 = target.clone(), pred.detach().clone()
    target2[~mask] = torch.randn(int((~mask).sum()), 3, 4, 4, generator=g) * 100
    target2[0, 1] = float("inf")
    pred2[~mask] = float("nan")
    assert torch.equal(d.loss(pred, target2, mask), base)
    assert torch.equal(d.loss(pred2, target, mask), base)
    base.backward()
    assert (pred.grad[~mask] == 0).all()
    assert (pred.grad[mask] != 0).any()
    pred2[mask] = pred.detach()[mask]
    pred2.requires_grad_(True)
    d.loss(pred2, target2, mask).backward()  # non-finite values in unmasked frames reach no gradient either
    assert torch.equal(pred2.grad, pred.grad)


def test_loss_errors():
    d = make(**RF)
    x = torch.zeros(2, 3, 1, 2, 2)
    with pytest.raises(ValueError, match="masked"):
        d.loss(x, x, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        d.loss(x, x, torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("power", [-2.0, -1.0, -0.5, 1.0, 2.0])
def test_loss_weight_has_mean_one_over_uniform_t_and_leans_as_its_power(power):
    """(t + c)^p divided by its mean over U(0, 1): the loss keeps its scale whatever the power (the learning rate
    means what it meant); p < 0 weighs low noise levels more, p > 0 high ones."""
    d = make(**RF_X0, loss_weight_power=power, loss_weight_offset=0.05)
    t = (torch.arange(400_000, dtype=torch.float64) + 0.5) / 400_000  # midpoint rule
    w = d.loss_weight(t)
    assert w.dtype == torch.float32 and abs(w.double().mean().item() - 1) < 1e-3
    steps = w[1:] - w[:-1]
    assert (steps < 0).all() if power < 0 else (steps > 0).all()
    expected = (t[[0, -1]] + 0.05) ** power
    assert torch.allclose(w[[0, -1]].double() / w[-1].double(), expected / expected[-1], rtol=1e-5)


def test_weighted_loss_is_each_samples_loss_times_its_weight():
    """Each sample's masked-frame MSE (as without a weight) times loss_weight(t) of its own t, averaged over the
    samples; at power 0 the loss is the unweighted one exactly, whatever t."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 2, 3, 3, generator=g), torch.randn(3, 4, 2, 3, 3, generator=g)
    mask = torch.tensor([[True, False, True, False], [False, True, True, True], [True, True, True, True]])
    t = torch.tensor([0.02, 0.5, 0.97])
    plain, weighted = make(**RF_X0), make(**RF_X0, loss_weight_power=-1.0)
    assert torch.equal(plain.loss(pred, target, mask, t), plain.loss(pred, target, mask))
    per_sample = torch.stack([plain.loss(pred[i:i + 1], target[i:i + 1], mask[i:i + 1]) for i in range(3)])
    expected = (per_sample * weighted.loss_weight(t)).mean()
    assert torch.allclose(weighted.loss(pred, target, mask, t), expected, rtol=1e-6)
    assert weighted.loss_weight(t)[0] > 5 * weighted.loss_weight(t)[2]  # the low-noise sample weighs most
    with pytest.raises(ValueError, match="pass t"):
        weighted.loss(pred, target, mask)
    with pytest.raises(ValueError, match="t must have shape"):
        weighted.loss(pred, target, mask, t[:2])


# ------------------------------------------------------------------------------------------------ schedulers
def test_make_scheduler_is_fresh_and_starts_at_full_noise():
    d = make(**RF, flow_shift=3.0)
    s1, s2 = d.make_scheduler(), d.make_scheduler(4)
    assert s1 is not s2 and len(s1.timesteps) == 25 and len(s2.timesteps) == 4
    # sigmas: linspace(1, 1/n, n) shifted once, then 0; timesteps = sigma * N
    base = torch.tensor([1.0, 0.75, 0.5, 0.25])
    shifted = 3 * base / (1 + 2 * base)
    assert torch.allclose(s2.sigmas, torch.cat([shifted, torch.zeros(1)]))
    assert torch.allclose(s2.timesteps, shifted * 1000)
    for kw in (DDIM_EPS, DDPM_V):
        s = make(**kw).make_scheduler(10)
        assert s.timesteps[0] == 999 and len(s.timesteps) == 10
        assert s.config.clip_sample is False


# ---------------------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("steps", [1, 7, 25])
def test_sampler_recovers_point_mass(name, steps):
    """With the exact denoiser of a delta distribution every sampler must land on the point."""
    d = make(**ALL[name], flow_shift=2.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 3, 4, 6, 6, generator=g)
    noise = torch.randn(5, 3, 4, 6, 6, generator=g)
    seen = []

    def fn(x, mt):
        seen.append(mt.clone())
        assert mt.shape == (5,)
        return delta_oracle(d, x0)(x, mt)

    out = d.sample(fn, noise, num_steps=steps, generator=torch.Generator().manual_seed(1))
    assert out.shape == noise.shape
    assert torch.allclose(out, x0.expand_as(out), atol=1e-4), (out - x0).abs().max()
    assert len(seen) == steps
    assert seen[0][0] == (1000.0 if name.startswith("rf") else 999.0)  # starts at full noise
    assert all((a > b).all() for a, b in zip(seen, seen[1:]))  # noise level decreases


@pytest.mark.parametrize(
    "name, steps, tol", [("rf_euler", 50, 0.02), ("rf_x0_euler", 50, 0.02), ("ddim_eps", 50, 0.05),
                         ("ddim_v", 50, 0.05), ("ddpm_eps", 200, 0.05)]
)
def test_sampler_matches_gaussian_data(name, steps, tol):
    """Data N(mu, s^2): samples from the exact denoiser must have mean mu and std s (loose: discretisation,
    and DDPM's terminal alpha_bar is not 0 so pure noise is only nearly its marginal at the first step)."""
    mu, s = 1.0, 0.5
    d = make(**ALL[name])
    noise = torch.randn(8192, 1, generator=torch.Generator().manual_seed(0))  # DDPMScheduler.step needs ndim >= 2
    out = d.sample(gaussian_oracle(d, mu, s), noise, num_steps=steps, generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - mu) < tol
    assert abs(out.std().item() - s) < tol


@pytest.mark.parametrize("name", list(ALL))
def test_project_pins_frames(name):
    d = make(**ALL[name])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 3, 5, 5, generator=g)
    ref = torch.randn(2, 4, 3, 5, 5, generator=g)
    keep = torch.tensor([True, False, False, True])  # frames held at ref (e.g. reference frames)

    def project(x):
        x = x.clone()
        x[:, keep] = ref[:, keep]
        return x

    def fn(x, mt):
        assert torch.equal(x[:, keep], ref[:, keep])  # projection applied before every call
        return 0.3 * x + 0.1  # any model

    out = d.sample(fn, noise, num_steps=5, project=project, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, keep], ref[:, keep])
    assert not torch.equal(out[:, ~keep], ref[:, ~keep])


def test_ddpm_sampler_reproducible_from_seed():
    d = make(**DDPM_EPS)
    noise = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0))

    def fn(x, mt):
        return 0.5 * x

    def run(seed):
        return d.sample(fn, noise, num_steps=10, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


class _CountsCopies(torch.Tensor):
    """Counts .to(<device>) calls on the tensor and on the tensors taken from it."""

    copies = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and any(isinstance(a, torch.device) for a in (*args, *kwargs.values())):
            _CountsCopies.copies += 1
        return super().__torch_function__(func, types, args, kwargs)


@pytest.mark.parametrize("name", ["rf_euler", "ddim_eps"])
def test_sampler_copies_its_model_times_to_the_device_once(name, monkeypatch):
    """A copy from host memory to the GPU waits for the GPU: one per step would leave it idle while the host
    prepares each step. The schedule's times go to the device once (diffusers' scheduler reads one more itself)."""
    d = make(**ALL[name])
    build = d.make_scheduler

    def counting_scheduler(n=None):
        scheduler = build(n)
        scheduler.timesteps = scheduler.timesteps.as_subclass(_CountsCopies)
        return scheduler

    monkeypatch.setattr(d, "make_scheduler", counting_scheduler)
    _CountsCopies.copies = 0
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    times = []
    out = d.sample(lambda x, mt: times.append(mt.clone()) or 0.5 * x, noise, num_steps=7)
    assert len(times) == 7 and _CountsCopies.copies <= 2
    monkeypatch.undo()
    again = []
    plain = d.sample(lambda x, mt: again.append(mt.clone()) or 0.5 * x, noise, num_steps=7)
    assert torch.equal(out, plain) and all(torch.equal(a, b) for a, b in zip(times, again))


def test_sample_progress_bar_runs():
    d = make(**RF)
    out = d.sample(lambda x, mt: torch.zeros_like(x), torch.ones(2, 3), num_steps=3, progress=True)
    assert torch.equal(out, torch.ones(2, 3))  # zero velocity: x stays put
