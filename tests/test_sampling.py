"""Samplers (models/sampling.py): golden outputs of the samplers before the refactor, accuracy against exact
probability-flow solutions (Gaussian and mixture data), the after_step hook, randomness and user errors.

Notation as in models/sampling.py: a = alpha_bar, alpha = sqrt(a), sigma = sqrt(1 - a), lambda = log(alpha / sigma).
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from conftest import single_thread
from models import GaussianDiffusion
from models.diffusion import sigmoid_beta_schedule
from models.sampling import SAMPLER_NAMES, SAMPLERS, ddim, ddpm, dpmpp_2m, time_grid

GOLDEN = Path(__file__).parent / "golden"
_spec = importlib.util.spec_from_file_location("make_sampler_golden", GOLDEN / "make_sampler_golden.py")
golden_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden_script)

# Golden case name -> the same sampling in the new API (the old code picked DDPM at steps == T, else DDIM).
GOLDEN_CALLS = {
    "ddpm": dict(sampler="ddpm", sampling_timesteps=golden_script.T),
    "ddim4": dict(sampler="ddim", sampling_timesteps=4, eta=0.0),
    "ddim10": dict(sampler="ddim", sampling_timesteps=10, eta=0.0),
    "ddim5-eta0.7": dict(sampler="ddim", sampling_timesteps=5, eta=0.7),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN / "sampler_golden.pt", weights_only=True)


# Golden values.


@pytest.mark.parametrize("self_condition", [False, True])
def test_golden_networks_are_unchanged(golden, self_condition):
    """If this fails, the Unet changed, not the samplers: regenerate the golden file (see its script)."""
    net = golden_script.golden_network(self_condition)
    expected = golden[f"net-sc{int(self_condition)}"]
    # 1e-5: float32 kernels round differently across CPUs (1.4e-6 between AVX-512 and AVX2 machines); a changed
    # network moves outputs of order one.
    torch.testing.assert_close(golden_script.network_fingerprint(net), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("objective, self_condition, clip", golden_script.SETTINGS)
def test_samplers_reproduce_the_pre_refactor_outputs(golden, objective, self_condition, clip):
    diffusion = GaussianDiffusion(golden_script.golden_network(self_condition), sample_shape=golden_script.SHAPE,
                                  timesteps=golden_script.T, objective=objective, clip_denoised=clip)
    for case, kwargs in GOLDEN_CALLS.items():
        out = diffusion.sample(2, generator=torch.Generator().manual_seed(0), **kwargs)
        expected = golden[golden_script.case_name(objective, self_condition, clip, case)]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0, msg=lambda m, case=case: f"{case}: {m}")


# Accuracy against exact probability-flow ODE solutions.
#
# Grids: for the order of convergence, a "schedule" of n levels uniform in lambda, so that time_grid(ac, n)
# visits every level and each step has the same h; the start and end levels are the same for every n, so one
# reference serves all. Errors are RMS over the batch, of the state at the last grid point (t = 0, a < 1),
# read through after_step: the last step to the clean end is x = x0_hat for every sampler and would hide
# nothing, but it is not part of the ODE.

LAMBDA_MIN, LAMBDA_MAX = -5.0, 4.6  # about the linear schedule's range at T = 1000
STEPS = (20, 40, 80, 160)


def lambda_uniform_schedule(n):
    """alpha_bar [n] with lambda uniform from LAMBDA_MAX (t = 0) to LAMBDA_MIN (t = n - 1): a = sigmoid(2 lambda)."""
    return torch.sigmoid(2 * torch.linspace(LAMBDA_MAX, LAMBDA_MIN, n, dtype=torch.float64))


def closed_form_denoiser(alphas_cumprod, x0_hat):
    """denoise(x_t, t) from a closed-form posterior mean x0_hat(x_t, a_t) (float64 inside, fp32 out)."""

    def denoise(x, t):
        a = alphas_cumprod[t].item()
        x0 = x0_hat(x.double(), a)
        eps = (x.double() - math.sqrt(a) * x0) / math.sqrt(1 - a)
        return eps.float(), x0.float()

    return denoise


def state_at_t0(sampler, denoise, x_T, grid, **options):
    """The sampler's state at the last grid point before the clean end (after step n - 2), in float64."""
    states = []

    def record(x, i):
        states.append(x)
        return x

    sampler(denoise, x_T.float(), grid, after_step=record, **options)
    return states[-2].double()


def rms(x):
    return x.pow(2).mean().sqrt().item()


def solver_errors(x0_hat, x_T, reference, schedule, steps=STEPS):
    """{sampler: [RMS error at t = 0 for each number of steps]} for DDIM (eta 0) and DPM-Solver++(2M)."""
    errors = {"ddim": [], "dpmpp_2m": []}
    for n in steps:
        ac = schedule(n)
        denoise, grid = closed_form_denoiser(ac, x0_hat), time_grid(ac, n)
        for name in errors:
            errors[name].append(rms(state_at_t0(SAMPLERS[name], denoise, x_T, grid) - reference))
    return errors


# Gaussian data x0 ~ N(mu, s^2 I).
S, DIM, BATCH = 0.5, 64, 256


def gaussian_data():
    g = torch.Generator().manual_seed(0)
    mu = 0.5 * torch.randn(DIM, generator=g, dtype=torch.float64)
    return mu, torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)


def gaussian_x0_hat(mu):
    """E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu)."""
    return lambda x, a: mu + math.sqrt(a) * S**2 / (a * S**2 + 1 - a) * (x - math.sqrt(a) * mu)


def gaussian_flow(mu, x, a_t, a_s):
    """The exact probability-flow map from level a_t to a_s, affine for Gaussian data:
    x_s = alpha_s mu + sqrt((alpha_s^2 s^2 + sigma_s^2) / (alpha_t^2 s^2 + sigma_t^2)) (x_t - alpha_t mu)."""
    scale = math.sqrt((a_s * S**2 + 1 - a_s) / (a_t * S**2 + 1 - a_t))
    return math.sqrt(a_s) * mu + scale * (x - math.sqrt(a_t) * mu)


def test_dpm_solver_is_second_order_on_gaussian_data():
    mu, x_T = gaussian_data()
    ac = lambda_uniform_schedule(2)
    reference = gaussian_flow(mu, x_T, ac[1].item(), ac[0].item())
    errors = solver_errors(gaussian_x0_hat(mu), x_T, reference, lambda_uniform_schedule)
    ddim_err, dpm_err = errors["ddim"], errors["dpmpp_2m"]
    # Measured: DDIM 5.98e-2 3.01e-2 1.51e-2 7.55e-3 (first order); DPM-Solver++ 7.21e-3 1.86e-3 4.62e-4 1.14e-4.
    assert dpm_err[0] * 5 < ddim_err[0]
    assert all(coarse > 3 * fine for coarse, fine in zip(dpm_err, dpm_err[1:]))
    assert all(coarse > 1.8 * fine for coarse, fine in zip(ddim_err, ddim_err[1:]))


def test_dpm_solver_converges_on_the_default_schedules_grid():
    """The uniform grid (--sampling_spacing uniform): sigmoid schedule, T = 1000, steps uniform in t. Its last step, from t ~ T/n to
    t = 0, spans a large h (about 2 at 20 steps), where the two-step extrapolation gains little: DPM-Solver++
    only matches DDIM at 20 steps and wins from 40."""
    mu, x_T = gaussian_data()
    ac = torch.cumprod(1 - sigmoid_beta_schedule(1000), 0)
    reference = gaussian_flow(mu, x_T, ac[-1].item(), ac[0].item())
    errors = solver_errors(gaussian_x0_hat(mu), x_T, reference, lambda n: ac, steps=(10, 20, 40, 80))
    ddim_err, dpm_err = errors["ddim"], errors["dpmpp_2m"]
    # Measured: DDIM 7.83e-2 3.99e-2 2.05e-2 1.05e-2; DPM-Solver++ 9.36e-2 3.77e-2 1.33e-2 4.46e-3.
    assert all(coarse > 2 * fine for coarse, fine in zip(dpm_err, dpm_err[1:]))
    assert dpm_err[2] * 1.3 < ddim_err[2] and dpm_err[3] * 2 < ddim_err[3]


# A mixture of Gaussians in 2-D: x0 ~ sum_k w_k N(mu_k, s^2 I).
MIX_MU = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]], dtype=torch.float64)  # [K, D]
MIX_LOG_W = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
MIX_S = 0.3


def mixture_x0_hat(x, a):
    """E[x0 | x_t] = sum_k r_k (mu_k + alpha s^2 / v (x_t - alpha mu_k)), v = alpha^2 s^2 + sigma^2, with the
    responsibilities r_k = softmax_k(log w_k - |x_t - alpha mu_k|^2 / (2 v))."""
    alpha, v = math.sqrt(a), a * MIX_S**2 + 1 - a
    offset = x[:, None, :] - alpha * MIX_MU  # [B, K, D]
    r = torch.softmax(MIX_LOG_W - offset.pow(2).sum(-1) / (2 * v), dim=-1)  # [B, K]
    return torch.einsum("bk,bkd->bd", r, MIX_MU + alpha * MIX_S**2 / v * offset)


def rk4_flow(x0_hat, x, lambda_from, lambda_to, n):
    """The probability-flow ODE by classical RK4 in lambda, on y = x / sigma.

    With Tweedie's score, grad log p_t(x) = -(x - alpha x0_hat) / sigma^2, the VP flow
    dx/dt = f x - g^2 / 2 grad log p (f = d log alpha / dt, g^2 = d sigma^2 / dt - 2 f sigma^2) becomes
    d(x / sigma)/dt = (d lambda / dt) e^lambda x0_hat, that is dy/dlambda = e^lambda x0_hat(sigma y, a),
    with a = sigmoid(2 lambda) and sigma = sqrt(1 - a) (Lu et al. 2022, DPM-Solver++, eq. 9 differentiated).
    """
    sigma = lambda lam: 1 / math.sqrt(1 + math.exp(2 * lam))  # noqa: E731
    f = lambda lam, y: math.exp(lam) * x0_hat(sigma(lam) * y, 1 - sigma(lam) ** 2)  # noqa: E731
    h, y = (lambda_to - lambda_from) / n, x / sigma(lambda_from)
    for k in range(n):
        lam = lambda_from + k * h
        k1 = f(lam, y)
        k2 = f(lam + h / 2, y + h / 2 * k1)
        k3 = f(lam + h / 2, y + h / 2 * k2)
        k4 = f(lam + h, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return sigma(lambda_to) * y


def test_rk4_reference_matches_the_gaussian_closed_form():
    mu, x_T = gaussian_data()
    ac = lambda_uniform_schedule(2)
    exact = gaussian_flow(mu, x_T, ac[1].item(), ac[0].item())
    integrated = rk4_flow(gaussian_x0_hat(mu), x_T, LAMBDA_MIN, LAMBDA_MAX, 250)
    torch.testing.assert_close(integrated, exact, atol=1e-6, rtol=0)


def test_dpm_solver_is_second_order_on_a_mixture():
    x_T = torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = rk4_flow(mixture_x0_hat, x_T, LAMBDA_MIN, LAMBDA_MAX, 1000)
    errors = solver_errors(mixture_x0_hat, x_T, reference, lambda_uniform_schedule)
    ddim_err, dpm_err = errors["ddim"], errors["dpmpp_2m"]
    # Measured: DDIM 7.06e-2 3.51e-2 1.77e-2 8.98e-3; DPM-Solver++ 1.26e-2 3.00e-3 7.28e-4 1.78e-4.
    assert dpm_err[0] * 3 < ddim_err[0]
    assert all(coarse > 3 * fine for coarse, fine in zip(dpm_err, dpm_err[1:]))


# The shared signature: hook, randomness, first steps.


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_after_step_sees_every_step_and_its_result_is_used(name):
    ac = lambda_uniform_schedule(6)
    seen = []  # the states the denoiser is called with
    inner = closed_form_denoiser(ac, gaussian_x0_hat(torch.zeros(3, dtype=torch.float64)))

    def denoise(x, t):
        seen.append(x.clone())
        return inner(x, t)

    calls, returned = [], []

    def after_step(x, i):
        calls.append(i)
        returned.append(x + i + 1.0)
        return returned[-1]

    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    out = SAMPLERS[name](denoise, x_T, time_grid(ac, 6), generator=torch.Generator().manual_seed(1),
                         after_step=after_step)
    assert calls == list(range(6))
    assert torch.equal(seen[0], x_T)
    assert all(torch.equal(seen[i + 1], returned[i]) for i in range(5))
    assert torch.equal(out, returned[-1])


def test_after_step_through_sample_writes_known_entries():
    """The inpainting use: write given entries back after every step; the sample keeps them."""
    diffusion = GaussianDiffusion(golden_script.golden_network(False), sample_shape=(1, 8, 8), timesteps=10,
                                  clip_denoised=False)

    def keep_corner(x, i):
        x = x.clone()
        x[..., :2, :2] = 0.25
        return x

    for name in SAMPLER_NAMES:
        out = diffusion.sample(2, sampler=name, sampling_timesteps=4, after_step=keep_corner)
        assert (out[..., :2, :2] == 0.25).all() and (out[..., 2:, 2:] != 0.25).all()


def _run(name, generator, **options):
    ac = lambda_uniform_schedule(8)
    denoise = closed_form_denoiser(ac, gaussian_x0_hat(torch.full((5,), 0.3, dtype=torch.float64)))
    x_T = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    return SAMPLERS[name](denoise, x_T, time_grid(ac, 8), generator=generator, **options)


@pytest.mark.parametrize("name, options", [("ddim", dict(eta=0.0)), ("dpmpp_2m", {})])
def test_deterministic_samplers_draw_nothing(name, options):
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    out = _run(name, g, **options)
    assert torch.equal(g.get_state(), state)
    assert torch.equal(out, _run(name, None, **options))
    assert torch.equal(out, _run(name, torch.Generator().manual_seed(2), **options))


@pytest.mark.parametrize("name, options", [("ddpm", {}), ("ddim", dict(eta=0.7))])
def test_stochastic_samplers_follow_the_generator(name, options):
    first = _run(name, torch.Generator().manual_seed(1), **options)
    assert torch.equal(first, _run(name, torch.Generator().manual_seed(1), **options))
    assert not torch.equal(first, _run(name, torch.Generator().manual_seed(2), **options))


@pytest.mark.parametrize("n", [1, 2])
def test_dpm_solver_with_one_or_two_steps_is_ddim(n):
    """The first step has no history (first order: DDIM with eta 0) and the last one jumps to x0_hat."""
    ac = lambda_uniform_schedule(n)
    denoise = closed_form_denoiser(ac, gaussian_x0_hat(torch.full((5,), 0.3, dtype=torch.float64)))
    x_T, grid = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)), time_grid(ac, n)
    torch.testing.assert_close(dpmpp_2m(denoise, x_T, grid), ddim(denoise, x_T, grid), atol=1e-6, rtol=0)
    if n == 1:
        x0 = denoise(x_T, 0)[1]
        assert torch.equal(dpmpp_2m(denoise, x_T, grid), x0) and torch.equal(ddpm(denoise, x_T, grid), x0)


# User errors.


def test_bad_sampler_options_raise():
    ac = torch.cumprod(1 - sigmoid_beta_schedule(30), 0)
    with pytest.raises(ValueError, match=r"sampling_timesteps must be in \[1, timesteps=30\], got 0"):
        time_grid(ac, 0)
    with pytest.raises(ValueError, match=r"sampling_timesteps must be in \[1, timesteps=30\], got 31"):
        time_grid(ac, 31)
    net = golden_script.golden_network(False)
    with pytest.raises(ValueError, match="unknown sampler 'euler'; valid: ddpm, ddim, dpmpp_2m"):
        GaussianDiffusion(net, sample_shape=(1, 8, 8), timesteps=30, sampler="euler")
    diffusion = GaussianDiffusion(net, sample_shape=(1, 8, 8), timesteps=30, sampler="dpmpp_2m")
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        diffusion.sample(1, sampler="heun")
    with pytest.raises(ValueError, match="eta=0.5 only applies to the ddim sampler; sampler 'dpmpp_2m'"):
        diffusion.sample(1, eta=0.5)
    with pytest.raises(ValueError, match="sampler 'ddpm' takes no eta"):
        diffusion.sample(1, sampler="ddpm", eta=1.0)
    with pytest.raises(ValueError, match="sampling_timesteps"):
        diffusion.sample(1, sampling_timesteps=31)
    assert diffusion.sample(1, eta=0.0, sampling_timesteps=2).shape == (1, 1, 8, 8)  # eta 0 means "none"


def test_the_log_snr_grid_makes_dpm_solver_four_times_closer_at_20_steps():
    """On the default sigmoid schedule (T = 1000), DPM-Solver++ on the log-SNR grid against both samplers on
    the uniform grid, from the same noise, against the exact flow of Gaussian data."""
    mu, x_T = gaussian_data()
    ac = torch.cumprod(1 - sigmoid_beta_schedule(1000), 0)
    reference = gaussian_flow(mu, x_T, ac[-1].item(), ac[0].item())
    x0_hat = gaussian_x0_hat(mu)
    error = {}
    for name, spacing in (("ddim", "uniform"), ("dpmpp_2m", "uniform"), ("dpmpp_2m", "logsnr")):
        grid = time_grid(ac, 20, spacing)
        error[name, spacing] = rms(state_at_t0(SAMPLERS[name], closed_form_denoiser(ac, x0_hat), x_T, grid) - reference)
    # Measured: DDIM 3.99e-2, DPM-Solver++ 3.77e-2 on the uniform grid, 9.89e-3 on the log-SNR grid.
    assert error["dpmpp_2m", "logsnr"] * 3.5 < min(error["ddim", "uniform"], error["dpmpp_2m", "uniform"])


def test_the_log_snr_grid_is_even_in_lambda_and_the_default_for_dpm_solver():
    from models.sampling import default_spacing

    ac = torch.cumprod(1 - sigmoid_beta_schedule(1000), 0)
    grid = time_grid(ac, 20, "logsnr")
    assert len(grid.steps) == 20 and grid.steps[0] == 999 and grid.steps[-1] == 0
    assert list(grid.steps) == sorted(set(grid.steps), reverse=True)
    lam = 0.5 * (grid.alpha_bar[:-1] / (1 - grid.alpha_bar[:-1])).log()
    gaps = lam.diff()[5:]  # past the noisiest few, where one timestep spans more than an even share of lambda
    assert gaps.min() > 0 and gaps.max() < 1.5 * gaps.median()
    assert default_spacing("dpmpp_2m") == "logsnr" and default_spacing("ddim") == "uniform"
    with pytest.raises(ValueError, match="unknown sampling spacing"):
        time_grid(ac, 5, "quadratic")
