"""Samplers: pure functions from noise x_T to a sample x0, over a grid of noise levels.

Every sampler has one signature (k-diffusion's shape):

    sampler(denoise, x, grid, *, generator=None, progress=False, after_step=None, **options) -> x0

- `denoise(x_t, t) -> (eps_hat, x0_hat)`: the network as a closure of the state and an integer network
  timestep (see `GaussianDiffusion.denoiser`), fp32 outputs, consistent with x_t = alpha_t x0_hat + sigma_t eps_hat.
- `x`: the initial noise x_T; `grid`: a `TimeGrid`; `generator`: torch.Generator for every random draw.
- `progress`: a tqdm bar; `after_step(x, i) -> x`: called on the state after each step i = 0..n-1, and
  what it returns is what step i + 1 sees (e.g. to write known entries back).

Notation, for a grid point with alpha_bar a_t: alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t),
lambda_t = log(alpha_t / sigma_t); step i goes from grid point t = i to s = i + 1, and the last grid point
is the clean end (a = 1, sigma = 0). Coefficients are computed in float64 from `grid.alpha_bar` as Python
scalars, which torch applies in the state's dtype (fp32: the denoiser's) on its device.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True, eq=False)
class TimeGrid:
    """The levels a sampler visits.

    Attributes:
        steps: network timesteps, descending from T-1 to 0, one per network evaluation.
        alpha_bar: float64 `[len(steps) + 1]`: alpha_bar at each step, then 1.0 (the clean end).
    """

    steps: tuple[int, ...]
    alpha_bar: torch.Tensor


SPACINGS = ("uniform", "logsnr")


def time_grid(alphas_cumprod, sampling_timesteps, spacing="uniform"):
    """`sampling_timesteps` steps from T-1 down to 0 (both included) as a TimeGrid over the float64 schedule
    `alphas_cumprod` [T]:

    - "uniform": evenly spaced in t (rounded);
    - "logsnr": the timesteps whose lambda = log(alpha / sigma) lie nearest to points evenly spaced in lambda
      from lambda(T-1) to lambda(0) (DPM-Solver's "logSNR" spacing, on the integer timesteps the network was
      trained at). Each step of a multistep solver then spans the same h, which is what its error bound
      assumes. Where points round to the same timestep (at the noisy end, where lambda falls fastest) the
      next ones move down by one, so there are always `sampling_timesteps` distinct steps.
    """
    T, n = len(alphas_cumprod), sampling_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"sampling_timesteps must be in [1, timesteps={T}], got {n}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown sampling spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    if spacing == "uniform" or n == 1:
        steps = torch.linspace(T - 1, 0, n, dtype=torch.float64).round().long()
    else:
        lam = 0.5 * (ac / (1 - ac)).log()  # decreasing in t
        targets = torch.linspace(float(lam[-1]), float(lam[0]), n, dtype=torch.float64)
        nearest = (lam[None, :] - targets[:, None]).abs().argmin(1).tolist()
        chosen = []
        for i, t in enumerate(nearest):  # strictly decreasing, leaving one timestep for each point still to come
            chosen.append(max(min(t, T - 1 if i == 0 else chosen[-1] - 1), n - 1 - i))
        steps = torch.tensor(chosen)
    alpha_bar = F.pad(ac[steps], (0, 1), value=1.0)
    return TimeGrid(tuple(steps.tolist()), alpha_bar)


def default_spacing(sampler):
    """The spacing a sampler gets unless one is asked for: log-SNR for DPM-Solver++ (on the default sigmoid
    schedule its 20-step error to the exact probability flow is a quarter of the uniform grid's, tests/
    test_sampling.py), uniform in t for DDPM and DDIM (whose first-order steps lose on the log-SNR grid)."""
    return "logsnr" if sampler == "dpmpp_2m" else "uniform"


# Shared by the samplers.


def _steps(grid, progress):
    """(i, t) for each step, behind a tqdm bar when `progress`."""
    return tqdm(enumerate(grid.steps), total=len(grid.steps), disable=not progress, desc="sampling", leave=False)


def _after(after_step, x, i):
    return x if after_step is None else after_step(x, i)


def _noise_like(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# Samplers.


def ddpm(denoise, x, grid, *, generator=None, progress=False, after_step=None):
    """Ancestral sampling through the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, Algorithm 2, eq. 6-7),
    between consecutive grid points with beta = 1 - a_t / a_s (respaced as in Nichol & Dhariwal 2021, Section 4):

        x_s = sqrt(a_s) beta / (1 - a_t) x0_hat + sqrt(1 - beta) (1 - a_s) / (1 - a_t) x_t + sqrt(beta~) z,
        beta~ = beta (1 - a_s) / (1 - a_t).

    On the full grid beta is the schedule's beta_t. At the clean end (a_s = 1) the mean is x0_hat and
    beta~ = 0, so the last step draws no noise.
    """
    a = grid.alpha_bar.tolist()
    for i, t in _steps(grid, progress):
        _, x0 = denoise(x, t)
        a_t, a_s = a[i], a[i + 1]
        beta = 1 - a_t / a_s
        x = math.sqrt(a_s) * beta / (1 - a_t) * x0 + math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t) * x
        variance = beta * (1 - a_s) / (1 - a_t)
        if variance > 0:
            x = x + math.sqrt(variance) * _noise_like(x, generator)
        x = _after(after_step, x, i)
    return x


def ddim(denoise, x, grid, *, generator=None, progress=False, after_step=None, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12):

        x_s = sqrt(a_s) x0_hat + sqrt(1 - a_s - sigma^2) eps_hat + sigma z,
        sigma = eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s)   (eq. 16).

    eta = 0 is deterministic (the probability-flow ODE's first-order solver), eta = 1 has DDPM's posterior
    noise. At the clean end (a_s = 1) sigma = 0 and x_s = x0_hat.
    """
    a = grid.alpha_bar.tolist()
    for i, t in _steps(grid, progress):
        eps, x0 = denoise(x, t)
        a_t, a_s = a[i], a[i + 1]
        sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
        x = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _noise_like(x, generator)
        x = _after(after_step, x, i)
    return x


def dpmpp_2m(denoise, x, grid, *, generator=None, progress=False, after_step=None):
    """DPM-Solver++(2M), multistep second order in data prediction (Lu et al. 2022, "DPM-Solver++", Algorithm 2).

    With h = lambda_s - lambda_t, the previous step's h' (so r = h' / h) and the previous x0_hat':

        D = (1 + 1 / (2 r)) x0_hat - 1 / (2 r) x0_hat',
        x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) D.

    First order (D = x0_hat, which is DDIM with eta = 0) on the first step, which has no history, and on the
    last step to the clean end, where sigma_s = 0 and the update is x_s = x0_hat (diffusers' lower_order_final).
    Deterministic: draws nothing from `generator`.
    """
    a = grid.alpha_bar.tolist()
    alpha, sigma = [math.sqrt(v) for v in a], [math.sqrt(1 - v) for v in a]
    lam = [math.log(al / si) for al, si in zip(alpha[:-1], sigma[:-1])]  # lambda = inf at the clean end
    last = len(grid.steps) - 1
    x0_prev = None
    for i, t in _steps(grid, progress):
        _, x0 = denoise(x, t)
        if i == last:
            x = x0
        else:
            h = lam[i + 1] - lam[i]
            d = x0
            if x0_prev is not None:
                r = (lam[i] - lam[i - 1]) / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * math.expm1(-h) * d
        x0_prev = x0
        x = _after(after_step, x, i)
    return x


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m}
SAMPLER_NAMES = tuple(SAMPLERS)
# Samplers that read every noise estimate through `denoise`, so that guidance and prior reweighting
# (models/guidance.py), which change that estimate, steer them.
for _sampler in SAMPLERS.values():
    _sampler.steerable = True
STEERABLE = tuple(name for name, fn in SAMPLERS.items() if getattr(fn, "steerable", False))


def sampler_by_name(name):
    """SAMPLERS[name], or a ValueError that lists the valid names."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLER_NAMES)}")
    return SAMPLERS[name]
