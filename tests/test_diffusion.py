"""GaussianDiffusion: schedules and conversions against closed forms, losses, samplers on 4-D and 5-D data."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from models import GaussianDiffusion, Unet
from models.diffusion import cosine_beta_schedule, extract, linear_beta_schedule, sigmoid_beta_schedule
from models.sampling import ddim, ddpm, time_grid


class TinyNet3d(nn.Module):
    """Stand-in network for clips `[B, C, F, H, W]` with the networks' call signature."""

    def __init__(self, channels=2, self_condition=False, cond_channels=0):
        super().__init__()
        self.channels = channels
        self.self_condition = self_condition
        self.cond_channels = cond_channels
        in_channels = channels * (2 if self_condition else 1) + cond_channels
        self.conv = nn.Conv3d(in_channels, channels, 3, padding=1)
        self.time = nn.Linear(1, channels)

    def forward(self, x, t, cond=None, x_self_cond=None):
        inputs = [x]
        if self.self_condition:
            inputs.append(x_self_cond if x_self_cond is not None else torch.zeros_like(x))
        if cond is not None:
            inputs.append(cond)
        time = self.time(t.float()[:, None] / 100)[:, :, None, None, None]
        return self.conv(torch.cat(inputs, dim=1)) + time


class CountingNet(TinyNet3d):
    """Counts its calls and records whether it got an x_self_cond."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def forward(self, x, t, cond=None, x_self_cond=None):
        self.calls.append(x_self_cond is not None)
        return super().forward(x, t, cond=cond, x_self_cond=x_self_cond)


def make_diffusion(net=None, shape=(2, 3, 4, 4), **kwargs):
    torch.manual_seed(0)
    net = net if net is not None else TinyNet3d(channels=shape[0])
    return GaussianDiffusion(net, sample_shape=shape, **{"timesteps": 30, **kwargs})


def tiny_unet(**kwargs):
    torch.manual_seed(0)
    return Unet(8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, **kwargs)


# Schedules.


def test_linear_schedule_closed_form():
    T = 100
    betas = linear_beta_schedule(T)
    assert betas.dtype == torch.float64
    scale = 1000 / T
    np.testing.assert_allclose(betas.numpy(), np.linspace(1e-4 * scale, 0.02 * scale, T), rtol=1e-12)
    assert betas[0].item() == pytest.approx(1e-3) and betas[-1].item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="timesteps > 20"):
        linear_beta_schedule(20)


def _alphas_cumprod(betas):
    return np.cumprod(1 - betas.numpy())


def test_cosine_schedule_closed_form():
    T, s = 50, 0.008
    alphas_cumprod = _alphas_cumprod(cosine_beta_schedule(T, s=s))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f(t) / f(0) for t in range(1, T + 1)])
    # The last beta is clipped to 0.999 (f(T) is ~0); all others follow the formula.
    np.testing.assert_allclose(alphas_cumprod[:-1], expected[:-1], rtol=1e-10)
    assert cosine_beta_schedule(T, s=s)[-1].item() == pytest.approx(0.999)


def test_sigmoid_schedule_closed_form():
    T, start, end, tau = 40, -3, 3, 0.7
    alphas_cumprod = _alphas_cumprod(sigmoid_beta_schedule(T, start=start, end=end, tau=tau))

    def sig(z):
        return 1 / (1 + math.exp(-z))

    def g(t):  # alpha_bar before normalization; g(0) = 1 already
        return (sig(end / tau) - sig((t / T * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))

    expected = np.array([g(t) / g(0) for t in range(1, T + 1)])
    np.testing.assert_allclose(alphas_cumprod[:-1], expected[:-1], rtol=1e-10)


def test_schedule_kwargs_reach_the_schedule():
    diffusion = make_diffusion(beta_schedule="sigmoid", schedule_kwargs=dict(start=-2, end=2, tau=0.5))
    expected = sigmoid_beta_schedule(30, start=-2, end=2, tau=0.5).float()
    assert torch.equal(diffusion.betas, expected)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
def test_schedule_buffers_are_valid(schedule):
    diffusion = make_diffusion(beta_schedule=schedule, timesteps=50)
    betas, abar = diffusion.betas, diffusion.alphas_cumprod
    assert betas.dtype == torch.float32 and betas.shape == (50,)
    assert ((betas > 0) & (betas < 1)).all()
    assert (abar[1:] < abar[:-1]).all() and abar[0] < 1 and abar[-1] > 0
    assert torch.allclose(abar, torch.cumprod(1 - betas.double(), 0).float(), rtol=1e-5)
    assert diffusion.alphas_cumprod_prev[0] == 1 and torch.equal(diffusion.alphas_cumprod_prev[1:], abar[:-1])
    assert torch.allclose(diffusion.snr, abar / (1 - abar), rtol=1e-4)


@pytest.mark.parametrize(
    "objective, weight",
    [
        ("pred_noise", lambda snr, g: snr.clamp(max=g) / snr),
        ("pred_x0", lambda snr, g: snr.clamp(max=g)),
        ("pred_v", lambda snr, g: snr.clamp(max=g) / (snr + 1)),
    ],
)
def test_min_snr_loss_weights(objective, weight):
    plain = make_diffusion(objective=objective)
    assert torch.equal(plain.loss_weight, torch.ones(30))
    gamma = 2.0
    weighted = make_diffusion(objective=objective, min_snr_loss_weight=True, min_snr_gamma=gamma)
    abar = torch.cumprod(1 - sigmoid_beta_schedule(30), 0)
    snr = abar / (1 - abar)
    assert torch.allclose(weighted.loss_weight, weight(snr, gamma).float(), rtol=1e-5)


def test_state_dict_holds_only_the_network():
    net = tiny_unet()
    diffusion = GaussianDiffusion(net, sample_shape=(3, 8, 8), timesteps=30)
    assert list(diffusion.state_dict()) == ["model." + key for key in net.state_dict()]


@pytest.mark.parametrize("cast", [lambda m: m.bfloat16(), lambda m: m.half(), lambda m: m.to(torch.bfloat16),
                                  lambda m: m.double()], ids=["bfloat16", "half", "to_bf16", "double"])
def test_the_schedule_stays_fp32_whatever_the_module_is_cast_to(cast):
    """In bf16, alpha_bar[0:6] would round to exactly 1 and the posterior coefficients would move."""
    diffusion = GaussianDiffusion(tiny_unet(), sample_shape=(3, 8, 8), timesteps=1000)
    before = {name: buf.clone() for name, buf in diffusion.named_buffers()}
    cast(diffusion)
    assert diffusion.model.init_conv.weight.dtype != torch.float32  # the network itself was cast
    for name, buf in diffusion.named_buffers():
        assert buf.dtype == torch.float32 and torch.equal(buf, before[name]), name
    assert (diffusion.alphas_cumprod[:6] < 1).all()


def test_keep_schedule_fp32_repairs_buffers_cast_behind_the_modules_back():
    diffusion = GaussianDiffusion(tiny_unet(), sample_shape=(3, 8, 8), timesteps=1000)
    reference = diffusion.posterior_mean_coef1.clone()
    for buf in diffusion.buffers():  # as an engine that casts buffer data directly would
        buf.data = buf.data.to(torch.bfloat16)
    assert bool((diffusion.alphas_cumprod[:6] == 1).all())  # the damage the repair undoes
    diffusion.keep_schedule_fp32()
    assert all(buf.dtype == torch.float32 for buf in diffusion.buffers())
    assert torch.equal(diffusion.posterior_mean_coef1, reference)


# Conversions.


@pytest.mark.parametrize("shape", [(3, 2, 4, 4), (3, 2, 2, 4, 4), (3, 5)])
def test_extract_broadcasts_to_any_rank(shape):
    a = torch.arange(10.0)
    t = torch.tensor([0, 4, 9])
    out = extract(a, t, shape)
    assert out.shape == (3,) + (1,) * (len(shape) - 1)
    assert out.flatten().tolist() == [0.0, 4.0, 9.0]


def test_q_sample_formula():
    diffusion = make_diffusion(beta_schedule="cosine")
    x0, noise = torch.randn(3, 2, 3, 4, 4), torch.randn(3, 2, 3, 4, 4)
    t = torch.tensor([0, 11, 29])
    abar = torch.cumprod(1 - cosine_beta_schedule(30), 0)[t].float().view(3, 1, 1, 1, 1)
    assert torch.allclose(diffusion.q_sample(x0, t, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6)


def test_objectives_convert_consistently():
    diffusion = make_diffusion()
    x0, noise = torch.randn(4, 2, 3, 4, 4), torch.randn(4, 2, 3, 4, 4)
    t = torch.tensor([0, 5, 17, 28])
    x_t = diffusion.q_sample(x0, t, noise)
    assert torch.allclose(diffusion.predict_start_from_noise(x_t, t, noise), x0, atol=1e-4)
    assert torch.allclose(diffusion.predict_noise_from_start(x_t, t, x0), noise, atol=1e-3)
    v = diffusion.predict_v(x0, t, noise)
    abar = diffusion.alphas_cumprod[t].view(4, 1, 1, 1, 1)
    assert torch.allclose(v, abar.sqrt() * noise - (1 - abar).sqrt() * x0, atol=1e-6)
    assert torch.allclose(diffusion.predict_start_from_v(x_t, t, v), x0, atol=1e-5)
    # x0 -> eps -> x0
    eps = diffusion.predict_noise_from_start(x_t, t, x0)
    assert torch.allclose(diffusion.predict_start_from_noise(x_t, t, eps), x0, atol=1e-4)


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
def test_model_predictions_are_consistent(objective):
    diffusion = make_diffusion(objective=objective)
    x_t = torch.randn(2, 2, 3, 4, 4)
    t = torch.tensor([3, 20])
    for clip in (False, True):
        eps, x0 = diffusion.model_predictions(x_t, t, clip_x0=clip)
        assert torch.allclose(diffusion.q_sample(x0, t, eps), x_t, atol=1e-4)
        if clip:
            assert x0.abs().max() <= 1
    out = diffusion.model(x_t, t)
    eps, x0 = diffusion.model_predictions(x_t, t)
    expected = {"pred_noise": eps, "pred_x0": x0, "pred_v": diffusion.predict_v(x0, t, eps)}[objective]
    assert torch.allclose(out, expected, atol=1e-4)


def test_posterior_matches_textbook():
    T = 30
    diffusion = make_diffusion(beta_schedule="linear", timesteps=T)
    betas = linear_beta_schedule(T).numpy()
    abar = np.cumprod(1 - betas)
    x0, x_t = torch.randn(1, 2, 3, 4, 4), torch.randn(1, 2, 3, 4, 4)
    for step in (1, 7, T - 1):
        t = torch.tensor([step])
        mean, variance, log_variance = diffusion.q_posterior(x0, x_t, t)
        # Ho et al. 2020, eq. 7
        c0 = math.sqrt(abar[step - 1]) * betas[step] / (1 - abar[step])
        ct = math.sqrt(1 - betas[step]) * (1 - abar[step - 1]) / (1 - abar[step])
        var = (1 - abar[step - 1]) / (1 - abar[step]) * betas[step]
        assert torch.allclose(mean, c0 * x0 + ct * x_t, atol=1e-5)
        assert variance.item() == pytest.approx(var, rel=1e-5)
        assert log_variance.item() == pytest.approx(math.log(var), rel=1e-5)
    # At t = 0 the posterior mean is x0 itself.
    mean, variance, _ = diffusion.q_posterior(x0, x_t, torch.tensor([0]))
    assert torch.allclose(mean, x0, atol=1e-6) and variance.item() == 0


# Training loss.


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_forward_equals_manual_loss(objective, loss_type):
    diffusion = make_diffusion(
        objective=objective, loss_type=loss_type, min_snr_loss_weight=True, offset_noise_strength=0.3
    )
    x0 = torch.randn(3, 2, 3, 4, 4)
    loss = diffusion(x0, generator=torch.Generator().manual_seed(7))
    assert loss.dtype == torch.float32 and loss.shape == ()

    # Same draws, in the same order, from the same seed.
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 30, (3,), generator=g)
    noise = torch.randn(x0.shape, generator=g) + 0.3 * torch.randn(3, 2, 1, 1, 1, generator=g)
    abar = torch.cumprod(1 - sigmoid_beta_schedule(30), 0).float()[t].view(3, 1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    target = {"pred_noise": noise, "pred_x0": x0, "pred_v": abar.sqrt() * noise - (1 - abar).sqrt() * x0}
    err = diffusion.model(x_t, t) - target[objective]
    per_sample = (err.abs() if loss_type == "l1" else err.square()).mean(dim=(1, 2, 3, 4))
    snr = abar.flatten() / (1 - abar.flatten())
    weight = {"pred_noise": snr.clamp(max=5) / snr, "pred_x0": snr.clamp(max=5), "pred_v": snr.clamp(max=5) / (snr + 1)}
    expected = (per_sample * weight[objective]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_forward_reproducible_with_generator():
    diffusion = make_diffusion()
    x0 = torch.randn(4, 2, 3, 4, 4)
    first = diffusion(x0, generator=torch.Generator().manual_seed(1))
    again = diffusion(x0, generator=torch.Generator().manual_seed(1))
    other = diffusion(x0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss_type="l1"),
        dict(loss_type="l2"),
        dict(min_snr_loss_weight=True),
        dict(objective="pred_noise", min_snr_loss_weight=True),
        dict(offset_noise_strength=0.1),
        dict(objective="pred_x0", beta_schedule="cosine"),
    ],
)
def test_loss_variants_backprop(kwargs):
    diffusion = GaussianDiffusion(tiny_unet(), sample_shape=(3, 8, 8), timesteps=30, **kwargs)
    loss = diffusion(torch.rand(2, 3, 8, 8) * 2 - 1, generator=torch.Generator().manual_seed(0))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in diffusion.parameters() if p.requires_grad)


def test_self_condition_coin_is_reproducible_and_fair():
    net = CountingNet(channels=2, self_condition=True)
    diffusion = make_diffusion(net)
    x0 = torch.randn(2, 2, 3, 4, 4)
    used = []
    for seed in range(40):
        net.calls.clear()
        loss = diffusion(x0, generator=torch.Generator().manual_seed(seed))
        loss.backward()
        assert torch.isfinite(loss)
        # Either one plain call, or a no-grad estimate then a call that gets it.
        assert net.calls in ([False], [False, True])
        used.append(len(net.calls) == 2)
        net.calls.clear()
        assert torch.equal(loss, diffusion(x0, generator=torch.Generator().manual_seed(seed)))
    assert 8 <= sum(used) <= 32
    # Without a generator it still runs (coin from the host RNG).
    assert torch.isfinite(diffusion(x0))


def test_self_condition_with_unet():
    diffusion = GaussianDiffusion(tiny_unet(self_condition=True), sample_shape=(3, 8, 8), timesteps=30)
    for seed in range(4):
        loss = diffusion(torch.randn(2, 3, 8, 8), generator=torch.Generator().manual_seed(seed))
        loss.backward()
        assert torch.isfinite(loss)


def test_loss_is_fp32_under_bf16_autocast():
    diffusion = GaussianDiffusion(tiny_unet(), sample_shape=(3, 8, 8), timesteps=30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diffusion(torch.randn(2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


def test_cond_reaches_the_network():
    net = tiny_unet(cond_channels=1)
    diffusion = GaussianDiffusion(net, sample_shape=(3, 8, 8), timesteps=30, sampling_timesteps=3)
    x0, cond = torch.randn(2, 3, 8, 8), {"fields": torch.randn(2, 1, 8, 8)}
    a = diffusion(x0, cond=cond, generator=torch.Generator().manual_seed(0))
    b = diffusion(x0, cond={"fields": -cond["fields"]}, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a, b)
    samples = diffusion.sample(2, cond=cond, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 3, 8, 8)


# Samplers.


def _abar(T, schedule=sigmoid_beta_schedule):
    return torch.cumprod(1 - schedule(T), 0)


def test_time_grid_steps():
    abar = _abar(30)
    grid = time_grid(abar, 4)
    assert len(grid.steps) == 4 and len(grid.alpha_bar) == 5
    # From T-1 to t = 0; the last step goes on to the clean end (alpha_bar = 1), where it returns x0_hat.
    assert grid.steps[0] == 29 and grid.steps[-1] == 0 and grid.alpha_bar[-1] == 1
    assert all(t > s for t, s in zip(grid.steps, grid.steps[1:]))
    assert torch.equal(grid.alpha_bar[:-1], abar[list(grid.steps)])
    assert list(grid.steps) == [29, 19, 10, 0]
    assert list(time_grid(_abar(5), 5).steps) == [4, 3, 2, 1, 0]
    assert time_grid(abar, 1).steps == (29,) and grid.alpha_bar.dtype == torch.float64


def test_ddpm_matches_ho_algorithm_2():
    """Posterior-mean form == Ho et al. 2020 eq. 11: x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
    + sigma_t z, sigma_t^2 = beta~_t, for an eps-predicting network without clipping."""
    T = 25
    diffusion = make_diffusion(objective="pred_noise", beta_schedule="linear", timesteps=T, clip_denoised=False)
    x_T = torch.randn(2, 2, 3, 4, 4)
    betas = linear_beta_schedule(T)
    abar = torch.cumprod(1 - betas, 0)
    out = ddpm(diffusion.denoiser(), x_T, time_grid(abar, T), generator=torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)
    x = x_T.double()
    with torch.no_grad():
        for step in reversed(range(T)):
            t = torch.full((2,), step)
            eps = diffusion.model(x.float(), t).double()
            x = (x - betas[step] / (1 - abar[step]).sqrt() * eps) / (1 - betas[step]).sqrt()
            if step > 0:
                sigma = (betas[step] * (1 - abar[step - 1]) / (1 - abar[step])).sqrt()
                x = x + sigma * torch.randn(x.shape, generator=g).double()
    assert torch.allclose(out.double(), x, atol=1e-3)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_song_eq_12(eta):
    T, steps = 30, 6
    diffusion = make_diffusion(objective="pred_v", timesteps=T, clip_denoised=False)
    x_T = torch.randn(2, 2, 3, 4, 4)
    abar = _abar(T)
    grid = time_grid(abar, steps)
    out = ddim(diffusion.denoiser(), x_T, grid, generator=torch.Generator().manual_seed(5), eta=eta)

    times = list(zip(grid.steps, grid.steps[1:] + (-1,)))  # (t, next t); -1: the clean end
    g = torch.Generator().manual_seed(5)
    x = x_T.double()
    with torch.no_grad():
        for step, step_next in times:
            v = diffusion.model(x.float(), torch.full((2,), step)).double()
            a = abar[step]
            x0 = a.sqrt() * x - (1 - a).sqrt() * v
            eps = a.sqrt() * v + (1 - a).sqrt() * x
            if step_next < 0:
                x = x0
                continue
            a_next = abar[step_next]
            sigma = eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)).sqrt()
            x = a_next.sqrt() * x0 + (1 - a_next - sigma**2).sqrt() * eps
            if eta > 0:
                x = x + sigma * torch.randn(x.shape, generator=g).double()
    assert torch.allclose(out.double(), x, atol=1e-3)


def test_oracle_network_recovers_its_target():
    """An eps-network that knows the one data point x0* sends every sampler to x0*."""
    target = torch.rand(1, 2, 3, 4, 4) * 1.6 - 0.8
    diffusion = make_diffusion(objective="pred_noise", timesteps=20)

    class Oracle(nn.Module):
        channels, self_condition, cond_channels = 2, False, 0

        def forward(self, x, t, cond=None, x_self_cond=None):
            return diffusion.predict_noise_from_start(x, t, target.expand_as(x))

    for sampler, steps in (("ddpm", 20), ("ddim", 5), ("dpmpp_2m", 5)):
        out = diffusion.sample(3, model=Oracle(), sampler=sampler, sampling_timesteps=steps,
                               generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out, target.expand(3, -1, -1, -1, -1), atol=1e-4)


def test_ddim_eta0_is_deterministic():
    diffusion = make_diffusion(sampling_timesteps=5, sampler="ddim")
    x_T = torch.randn(2, 2, 3, 4, 4)
    run = lambda g: ddim(diffusion.denoiser(), x_T, time_grid(_abar(30), 5), generator=g, eta=0.0)  # noqa: E731
    assert torch.equal(run(None), run(torch.Generator().manual_seed(9)))
    first = diffusion.sample(2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, diffusion.sample(2, generator=torch.Generator().manual_seed(4)))
    assert not torch.equal(first, diffusion.sample(2, generator=torch.Generator().manual_seed(5)))


SAMPLER_CASES = [("ddpm", None, None), ("ddim", 4, 0.0), ("ddim", 4, 1.0), ("dpmpp_2m", 4, None)]


@pytest.mark.parametrize("sampler, steps, eta", SAMPLER_CASES)
def test_samplers_on_images(sampler, steps, eta):
    diffusion = GaussianDiffusion(tiny_unet(), sample_shape=(3, 8, 8), timesteps=12)
    out = diffusion.sample(2, sampler=sampler, sampling_timesteps=steps, eta=eta,
                           generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 8, 8)
    assert torch.isfinite(out).all() and out.abs().max() <= 1  # clip_denoised


@pytest.mark.parametrize("sampler, steps, eta", SAMPLER_CASES)
@pytest.mark.parametrize("self_condition", [False, True])
def test_samplers_on_clips(sampler, steps, eta, self_condition):
    net = TinyNet3d(channels=2, self_condition=self_condition)
    diffusion = make_diffusion(net, shape=(2, 3, 4, 4), clip_denoised=False)
    out = diffusion.sample(3, sampler=sampler, sampling_timesteps=steps, eta=eta, progress=True,
                           generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 2, 3, 4, 4) and torch.isfinite(out).all()


def test_sample_uses_the_given_model():
    diffusion = make_diffusion(sampling_timesteps=3)
    other = TinyNet3d(channels=2)
    a = diffusion.sample(1, generator=torch.Generator().manual_seed(0))
    b = diffusion.sample(1, model=other, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a, b)


# User errors.


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(objective="pred_eps"), "pred_noise, pred_x0, pred_v"),
        (dict(beta_schedule="quadratic"), "linear, cosine, sigmoid"),
        (dict(loss_type="huber"), "l1, l2"),
        (dict(sampling_timesteps=31), r"sampling_timesteps must be in \[1, timesteps=30\]"),
        (dict(sampling_timesteps=0), "sampling_timesteps"),
        (dict(net=TinyNet3d(channels=2), shape=(3, 4, 4)), "3 channels but the network has 2"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_diffusion(**kwargs)


def test_bad_sampling_timesteps_at_sample_time():
    with pytest.raises(ValueError, match="sampling_timesteps"):
        make_diffusion().sample(1, sampling_timesteps=100)
