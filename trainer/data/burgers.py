"""Built-in 1D Burgers control data (the Burgers task of DiffPhyCon, Wei et al. 2024): a batched torch
solver, the random initial states and controls, the dataset of 2-channel images, and the re-simulation score.

Equation, on [0, 1] with zero Dirichlet boundaries, for t in [0, T], T = 1:

    u_t = -1/2 (u^2)_x + nu u_xx + f(t, x),    u(t, 0) = u(t, 1) = 0,    nu = 0.01.          (1)

Grid: N = 128 interior points x_i = i dx, i = 1..N, dx = 1 / (N + 1) = 1/129; the boundary points x_0 = 0
and x_{N+1} = 1 hold u = 0. Arrays hold the interior only: `u[..., i - 1] = u(x_i)`.

Scheme: forward Euler in time, central differences in space, with u_0 = u_{N+1} = 0:

    u_i^{n+1} = u_i^n + dt [ -(u_{i+1}^2 - u_{i-1}^2) / (4 dx) + nu (u_{i-1} - 2 u_i + u_{i+1}) / dx^2 + f_i^n ]  (2)

and dt = 1e-4 (1000 steps per control interval, 10000 in all). This is the scheme, step and grid of
DiffPhyCon's released generator (`burgers_numeric_solve_free` in `dataset/apps/generate_burgers.py` of
github.com/AI4Science-WestlakeU/diffphycon, adapted from Hwang et al. 2022's code): their first and second
difference matrices divided by 2 dx and dx^2 on the zero-padded state, the padding reset every step. (2) is
first order in time. It is stable here: the diffusion number nu dt / dx^2 = 0.017 (< 1/2), and forward Euler
on central advection needs |u|^2 dt <= 2 nu, i.e. |u| <= 14; the cell Peclet number |u| dx / nu < 2 (no
wiggles) holds for |u| < 2.6, about the size of the data's states.

Control and saved states: f is piecewise constant in time over 10 intervals [k/10, (k+1)/10), k = 0..9;
f[k] drives u(k/10) to u((k+1)/10). The 11 saved states are u(t_j), t_j = j/10, j = 0..10, with u(t_0) = u0.
So saved state j + 1 is the first one control row j reaches (as DiffPhyCon's: the control index advances at
steps 0, 1000, 2000, ..., a state is recorded after steps 1000, 2000, ...).

Randomness (DiffPhyCon's `make_data_varying_f`, same file), per trajectory:
- u0 = a1 exp(-(x - c1)^2 / (2 s1^2)) + a2 exp(-(x - c2)^2 / (2 s2^2)) with c1 ~ U(0.2, 0.4), a1 ~ U(0, 2),
  c2 ~ U(0.6, 0.8), a2 ~ U(-2, 0), s1, s2 ~ U(0.05, 0.15): a positive bump on the left, a negative one on
  the right.
- f = sum of 8 space-time Gaussians  A_m g * exp(-(x - cx_m)^2 / (2 sx_m^2)) exp(-(tau_k - ct_m)^2 / (2 st_m^2)),
  with cx, ct ~ U(0, 1), sx, st ~ U(0.05, 0.2) (their U(0.1, 0.4) / 2), A_1 ~ U(-1.5, 1.5) and, for the 7
  others, A_m = B_m U(-1.5, 1.5) with B_m ~ Bernoulli(1/2); g = 2 (their `amp_compensate`, for the loss of
  amplitude by the time Gaussian), and 4 under partial control. The time Gaussian of row k is evaluated at
  tau_k = (k + 1) / 11 (their `linspace(1/11, 10/11, 10)`), not at the interval's middle; kept as theirs.
  Under partial control every Gaussian is multiplied by the control mask (below), so f = 0 outside it.
- The target state u_target is the trajectory's own u(T) (as DiffPhyCon's `get_target(...)[:, 10]`).
Each trajectory draws from a numpy generator seeded by (seed, index), so a trajectory does not depend on
the batch it is drawn in; the draws are rounded to float32 (what is stored) before they are simulated in
float64, so re-simulating the stored u0 and f reproduces the stored states.

Settings (DiffPhyCon's "front_rear_quarter"): observe = "partial" observes only the outer quarters,
x-indices [0, N/4) and [3N/4, N) (32 + 32 of 128 points); control = "partial" controls only those.

Layout of a sample x [2, H, W] = [2, 16, 128] (DiffPhyCon's: u and f zero-padded to 16 rows and stacked):
time along H, space along W (column i is x_{i+1}).
- channel 0, the state: row j = u(t_j), j = 0..10 (row 0 is u0, row 10 is u(T) = u_target); rows 11..15 padding.
- channel 1, the control: row k = f on [k/10, (k+1)/10), k = 0..9 (below the state it drives, u_k -> u_{k+1});
  rows 10..15 padding.
Each channel is standardized, x = (v - mean_c) / std_c, with the per-channel statistics of the training
split (`stats.json`, a `fluid.Normalization`); padding is 0 in model space. `pack` and `unpack` convert.

Conditioning: u0 and u_target are given as known entries of x (state rows 0 and 10), not as `cond` fields or
params, as DiffPhyCon does (`is_condition_u0`, `is_condition_uT`). In training both are the trajectory's own
rows, so the network needs no extra input; in sampling the sampler writes them back each step, so the
generated trajectory starts at u0 and ends at the target exactly. The dataset yields only {"x"}. `known_mask`
marks every given entry: the padding, rows 0 and 10 on the observed columns, and (partial observation) the
whole unobserved state, which is given as 0, as DiffPhyCon trains and samples its partially observed models
with the unobserved state set to 0; (partial control) the uncontrolled control entries, 0 in the data.

Score (DiffPhyCon's `burgers_metric`, `utils.py`): the control, zeroed outside the controlled region, is
re-simulated from the full u0 (also under partial observation); J_actual = mean over the observed x of
(u(T) - u_target)^2; the control energy = sum over all 10 x 128 entries of f^2, a plain sum without dt or dx
weights (times dx / 10 = 1/1290 for the integral of f^2 over [0, 1] x [0, T]). DiffPhyCon reports the two
separately and weighs neither in its released Burgers inference (`inference/inference_1d_burgers.py` calls
`evaluate` with the guidance weights wu = wf = 0): the target is reached through the u_target condition.
Counts: DiffPhyCon generates 90000 training and 10000 test trajectories (`free_u_f_1e5`, and
`free_u_f_1e5_front_rear_quarter` for partial control) and evaluates on the first 50 test ones; the CPU
default here is 2000 and 50 (`COUNTS`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.data.base import EddyData, normalize_index
from trainer.data.fluid import Normalization, cache_root
from trainer.errors import ConfigError, DataError

N_POINTS = 128
"""Interior grid points N."""
N_INTERVALS = 10
"""Control intervals over [0, T]; the saved states are their N_INTERVALS + 1 ends."""
T_END = 1.0
VISCOSITY = 0.01
STEPS_PER_INTERVAL = 1000
"""Solver steps per control interval: dt = T_END / (N_INTERVALS * STEPS_PER_INTERVAL) = 1e-4."""
HEIGHT = 16
"""Rows of a sample: the 11 states (10 controls) zero-padded to a multiple of 2^4."""
SETTINGS = ("full", "partial")
"""Values of `observe` and `control`: the whole domain, or only its outer quarters."""
COUNTS = {"cpu": (2000, 50), "diffphycon": (90000, 10000)}
"""(train, test) trajectory counts by name: a CPU default, and DiffPhyCon's."""
CHANNELS = ("u", "f")

_N_FORCE_GAUSSIANS = 8
_VERSION = 1


def check_setting(name: str, value: str) -> str:
    """`value` if it is one of `SETTINGS`, else a ConfigError naming the argument `name`."""
    if value not in SETTINGS:
        raise ConfigError(f"Burgers {name}={value!r} is not a setting; choose one of: {', '.join(SETTINGS)}")
    return value


def grid(n: int = N_POINTS) -> torch.Tensor:
    """The interior points x_i = i / (n + 1), i = 1..n: [n] float64."""
    return torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)


# ----------------------------------------------------------------------------------------------
# Solver


def simulate(u0: torch.Tensor, f: torch.Tensor, *, nu: float = VISCOSITY, t_end: float = T_END,
             n_intervals: int = N_INTERVALS, steps_per_interval: int = STEPS_PER_INTERVAL,
             with_boundary: bool = False, on_interval: Callable[[int], None] | None = None) -> torch.Tensor:
    """Solve (1) by (2) from u0 [B, N] under the control f [B, K, N] -> the saved states [B, n_intervals + 1, N]
    at t_j = j t_end / n_intervals (row 0 is u0), on u0's device and in its dtype (float32 or float64).

    Row r of f is held constant over the r-th of K equal pieces of [0, t_end]: K = n_intervals for DiffPhyCon's
    piecewise-constant controls, K = n_intervals * steps_per_interval for one row per step. K must divide the
    number of steps; a step where (2) is unstable for any u (nu dt / dx^2 > 1/2) is a ConfigError. (2) also
    needs |u|^2 dt <= 2 nu; a control that drives u beyond that makes the solution blow up to inf or NaN,
    which is returned as it is. `with_boundary` returns [B, n_intervals + 1, N + 2] with the boundary values
    (zero) at both ends. `on_interval(j)` is called after state j + 1 is saved.
    """
    if u0.ndim != 2 or f.ndim != 3 or f.shape[0] != u0.shape[0] or f.shape[2] != u0.shape[1]:
        raise DataError(f"simulate needs u0 [B, N] and f [B, K, N], got {tuple(u0.shape)} and {tuple(f.shape)}")
    if u0.dtype not in (torch.float32, torch.float64):
        raise DataError(f"u0 must be float32 or float64, got {u0.dtype}")
    if u0.shape[1] < 2:
        raise DataError(f"the grid needs at least 2 interior points, got {u0.shape[1]}")
    for name, value in (("n_intervals", n_intervals), ("steps_per_interval", steps_per_interval)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not (nu >= 0 and t_end > 0):
        raise ConfigError(f"simulate needs nu >= 0 and t_end > 0, got nu={nu}, t_end={t_end}")
    steps = n_intervals * steps_per_interval
    if steps % f.shape[1]:
        raise ConfigError(f"the {f.shape[1]} control rows must divide the {steps} steps "
                          f"({n_intervals} intervals of {steps_per_interval})")
    steps_per_row = steps // f.shape[1]
    batch, n = u0.shape
    dt, dx = t_end / steps, 1.0 / (n + 1)
    a, b = nu * dt / dx**2, dt / (4 * dx)
    if a > 0.5:
        raise ConfigError(f"the diffusion number nu dt / dx^2 = {a:.3g} exceeds 1/2, where (2) is unstable: raise "
                          f"steps_per_interval above {int(2 * nu * t_end / n_intervals / dx**2)}")
    dt_f = dt * f.to(u0.dtype)  # [B, K, N]

    u = u0.new_zeros(batch, n + 2)  # with the boundary points, which stay 0
    u[:, 1:-1] = u0
    saved = [u.clone()]
    for step in range(steps):
        inner, sq = u[:, 1:-1], u * u
        diffusion = a * (u[:, :-2] + u[:, 2:] - 2 * inner)
        inner.add_(diffusion - b * (sq[:, 2:] - sq[:, :-2]) + dt_f[:, step // steps_per_row])  # (2)
        if (step + 1) % steps_per_interval == 0:
            saved.append(u.clone())
            if on_interval is not None:
                on_interval(len(saved) - 2)
    out = torch.stack(saved, dim=1)  # [B, n_intervals + 1, N + 2]
    return out if with_boundary else out[..., 1:-1]


# ----------------------------------------------------------------------------------------------
# Masks


def region(setting: str, n: int = N_POINTS) -> torch.Tensor:
    """The x-indices a setting covers, [n] bool: all for "full"; the outer quarters [0, n/4) and [3n/4, n)
    for "partial" (DiffPhyCon's "front_rear_quarter")."""
    check_setting("setting", setting)
    mask = torch.ones(n, dtype=torch.bool)
    if setting == "partial":
        mask[n // 4: (3 * n) // 4] = False
    return mask


def known_mask(observe: str = "full", control: str = "full", n: int = N_POINTS) -> torch.Tensor:
    """The given entries of a sample, [2, HEIGHT, n] bool (broadcasts over a batch): the padding rows; u0 and
    u_target (state rows 0 and N_INTERVALS) on the observed x; under partial observation all of the unobserved
    state (given as 0); under partial control the uncontrolled control entries (0)."""
    observed, controlled = region(check_setting("observe", observe), n), region(check_setting("control", control), n)
    known = torch.zeros(2, HEIGHT, n, dtype=torch.bool)
    known[0, N_INTERVALS + 1:] = True  # padding
    known[1, N_INTERVALS:] = True
    known[0, [0, N_INTERVALS]] = observed
    known[0, : N_INTERVALS + 1, ~observed] = True
    known[1, :N_INTERVALS, ~controlled] = True
    return known


def control_mask(control: str = "full", n: int = N_POINTS) -> torch.Tensor:
    """The entries of a sample the control may set, [2, HEIGHT, n] bool: control rows 0..N_INTERVALS-1 on the
    controlled x."""
    mask = torch.zeros(2, HEIGHT, n, dtype=torch.bool)
    mask[1, :N_INTERVALS] = region(check_setting("control", control), n)
    return mask


# ----------------------------------------------------------------------------------------------
# Layout


IDENTITY = Normalization(mean=(0.0, 0.0), std=(1.0, 1.0))


def pack(u: torch.Tensor, f: torch.Tensor, normalization: Normalization = IDENTITY) -> torch.Tensor:
    """States u [..., N_INTERVALS + 1, N] and controls f [..., N_INTERVALS, N] (physical) -> x [..., 2, HEIGHT, N]
    in model space: each channel standardized, the padding rows 0."""
    if u.shape[-2] != N_INTERVALS + 1 or f.shape[-2] != N_INTERVALS or u.shape[:-2] != f.shape[:-2] \
            or u.shape[-1] != f.shape[-1]:
        raise DataError(f"pack needs u [..., {N_INTERVALS + 1}, N] and f [..., {N_INTERVALS}, N], "
                        f"got {tuple(u.shape)} and {tuple(f.shape)}")
    (mean_u, mean_f), (std_u, std_f) = normalization.mean, normalization.std
    x = u.new_zeros(*u.shape[:-2], 2, HEIGHT, u.shape[-1])
    x[..., 0, : N_INTERVALS + 1, :] = (u - mean_u) / std_u
    x[..., 1, :N_INTERVALS, :] = (f - mean_f) / std_f
    return x


def unpack(x: torch.Tensor, normalization: Normalization = IDENTITY) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., 2, HEIGHT, N] in model space -> (u [..., N_INTERVALS + 1, N], f [..., N_INTERVALS, N]) physical."""
    if x.ndim < 3 or x.shape[-3:-1] != (2, HEIGHT):
        raise DataError(f"unpack needs x [..., 2, {HEIGHT}, N], got {tuple(x.shape)}")
    (mean_u, mean_f), (std_u, std_f) = normalization.mean, normalization.std
    return x[..., 0, : N_INTERVALS + 1, :] * std_u + mean_u, x[..., 1, :N_INTERVALS, :] * std_f + mean_f


def given(u: torch.Tensor, f: torch.Tensor, observe: str = "full",
          control: str = "full") -> tuple[torch.Tensor, torch.Tensor]:
    """(u, f) with what a setting does not give set to 0: the unobserved state, the uncontrolled control."""
    observed = region(check_setting("observe", observe), u.shape[-1])
    controlled = region(check_setting("control", control), f.shape[-1])
    return u * observed.to(u.device, u.dtype), f * controlled.to(f.device, f.dtype)


def x_known(u0: torch.Tensor, u_target: torch.Tensor, normalization: Normalization = IDENTITY, *,
            observe: str = "full", control: str = "full") -> torch.Tensor:
    """The given entries of a control problem as x [B, 2, HEIGHT, N] in model space (the sampler's `x_known`,
    with `known_mask(observe, control)`): u0 [B, N] in state row 0, u_target [B, N] in row N_INTERVALS, 0
    (physical) for the unobserved state and the uncontrolled control; the other entries are not given."""
    u = u0.new_zeros(u0.shape[0], N_INTERVALS + 1, u0.shape[-1])
    u[:, 0], u[:, -1] = u0, u_target
    f = u0.new_zeros(u0.shape[0], N_INTERVALS, u0.shape[-1])
    return pack(*given(u, f, observe, control), normalization)


# ----------------------------------------------------------------------------------------------
# Random problems and data generation


def _rng(seed: int, index: int) -> np.random.Generator:
    if index < 0:
        raise ConfigError(f"trajectory indices must be >= 0, got {index}")
    return np.random.default_rng((seed & ((1 << 64) - 1), index))


def _gaussian(x: torch.Tensor, center: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * (x - center) ** 2 / width**2)


def draw(indices: Sequence[int], *, seed: int = 0, control: str = "full",
         n: int = N_POINTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial states u0 [B, n] and controls f [B, N_INTERVALS, n] of trajectories `indices`, float64 holding
    float32 values (see the module's "Randomness")."""
    controlled = region(check_setting("control", control), n).to(torch.float64)
    gain = 2.0 * (2.0 if control == "partial" else 1.0)
    params_u, params_f = [], []
    for index in indices:
        rng = _rng(seed, int(index))
        params_u.append([rng.uniform(0.2, 0.4), rng.uniform(0, 2), rng.uniform(0.05, 0.15),
                         rng.uniform(0.6, 0.8), rng.uniform(-2, 0), rng.uniform(0.05, 0.15)])
        on = np.concatenate([[1.0], rng.integers(0, 2, _N_FORCE_GAUSSIANS - 1)])
        params_f.append(np.stack([on * rng.uniform(-1.5, 1.5, _N_FORCE_GAUSSIANS),
                                  rng.uniform(0, 1, _N_FORCE_GAUSSIANS), rng.uniform(0.05, 0.2, _N_FORCE_GAUSSIANS),
                                  rng.uniform(0, 1, _N_FORCE_GAUSSIANS), rng.uniform(0.05, 0.2, _N_FORCE_GAUSSIANS)]))
    if not params_u:
        raise ConfigError("draw needs at least one trajectory index")
    pu = torch.tensor(np.array(params_u))[:, :, None]  # [B, 6, 1]
    x = grid(n)
    u0 = pu[:, 1] * _gaussian(x, pu[:, 0], pu[:, 2]) + pu[:, 4] * _gaussian(x, pu[:, 3], pu[:, 5])  # [B, n]
    amp, cx, sx, ct, st = torch.tensor(np.array(params_f)).unbind(1)  # each [B, M]
    tau = torch.arange(1, N_INTERVALS + 1, dtype=torch.float64) / (N_INTERVALS + 1)
    space = _gaussian(x, cx[..., None], sx[..., None]) * controlled  # [B, M, n]
    time = gain * _gaussian(tau, ct[..., None], st[..., None])  # [B, M, K]
    f = torch.einsum("bm,bmk,bmn->bkn", amp, time, space)
    return u0.float().double(), f.float().double()


def generate(num: int, seed: int = 0, *, start: int = 0, control: str = "full", batch_size: int = 512,
             device: torch.device | str = "cpu", steps_per_interval: int = STEPS_PER_INTERVAL,
             progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Trajectories start..start+num-1: states u [num, N_INTERVALS + 1, N] and controls f [num, N_INTERVALS, N],
    float32 on the CPU, solved in float64 `batch_size` at a time on `device`. The progress bar counts control
    intervals of all trajectories. Cost on one CPU thread: about 0.4 us per trajectory and step, 4 ms per
    trajectory; measured, the default 2000 + 50 in 8-9 s (with two threads on a shared 2-core machine, 30 s:
    the tensors are too small to split), DiffPhyCon's 100000 would take about 7 minutes."""
    if not isinstance(num, int) or num < 1:
        raise ConfigError(f"the number of trajectories must be a positive integer, got {num!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"the batch size must be a positive integer, got {batch_size!r}")
    u_out = torch.empty(num, N_INTERVALS + 1, N_POINTS)
    f_out = torch.empty(num, N_INTERVALS, N_POINTS)
    bar = tqdm(total=num * N_INTERVALS, unit="interval", desc=f"burgers ({control} control)", disable=not progress)
    for lo in range(0, num, batch_size):
        indices = range(start + lo, start + min(lo + batch_size, num))
        u0, f = draw(indices, seed=seed, control=control)
        u = simulate(u0.to(device), f.to(device), steps_per_interval=steps_per_interval,
                     on_interval=lambda _: bar.update(len(indices)))
        if not torch.isfinite(u[:, -1]).all():
            raise DataError(f"Burgers trajectories {indices.start}..{indices.stop - 1} blew up at "
                            f"steps_per_interval={steps_per_interval}; explicit Euler needs |u|^2 dt <= 2 nu: raise it")
        u_out[lo: lo + len(indices)] = u.float().cpu()
        f_out[lo: lo + len(indices)] = f.float()
    bar.close()
    return u_out, f_out


# ----------------------------------------------------------------------------------------------
# Score


def score(u0: torch.Tensor, f: torch.Tensor, u_target: torch.Tensor, *, observe: str = "full", control: str = "full",
          f_data: torch.Tensor | None = None, steps_per_interval: int = STEPS_PER_INTERVAL) -> dict[str, torch.Tensor]:
    """Re-simulate controls and score them against the target, as DiffPhyCon's `burgers_metric`.

    Args:
        u0: [B, N] the full initial states (physical; under partial observation too).
        f: [B, N_INTERVALS, N] the controls to score (physical); zeroed outside the controlled x first.
        u_target: [B, N] the target states.
        observe, control: "full" or "partial" (the outer quarters).
        f_data: optional [B, N_INTERVALS, N] the data set's own controls, scored the same way as a baseline.

    Returns, each [B] float64 (and "u" [B, N_INTERVALS + 1, N], the states under f):
        "J": mean over the observed x of (u(T) - u_target)^2 under f (inf where the re-simulation blew up);
        "energy": sum of f^2 over all entries;
        "J_zero": J under zero control;  "J_data", "energy_data": those of f_data, when given.
    """
    observed, controlled = region(check_setting("observe", observe)), region(check_setting("control", control))
    if u0.ndim != 2 or u_target.shape != u0.shape or f.shape != (u0.shape[0], N_INTERVALS, u0.shape[1]):
        raise DataError(f"score needs u0 and u_target [B, N] and f [B, {N_INTERVALS}, N], got {tuple(u0.shape)}, "
                        f"{tuple(u_target.shape)} and {tuple(f.shape)}")
    if f_data is not None and f_data.shape != f.shape:
        raise DataError(f"f_data must have the shape of f {tuple(f.shape)}, got {tuple(f_data.shape)}")
    u0, u_target = u0.double(), u_target.double()
    mask = controlled.to(u0.device, torch.float64)
    controls = [f.double() * mask, torch.zeros_like(u0)[:, None].expand_as(f)]
    if f_data is not None:
        controls.append(f_data.to(u0.device).double() * mask)
    u = simulate(u0.repeat(len(controls), 1), torch.cat(controls), steps_per_interval=steps_per_interval)
    error = (u[:, -1] - u_target.repeat(len(controls), 1))[:, observed.to(u0.device)]
    j = error.square().mean(-1).nan_to_num(nan=torch.inf).chunk(len(controls))
    out = {"J": j[0], "energy": controls[0].square().sum((-2, -1)), "J_zero": j[1], "u": u.chunk(len(controls))[0]}
    if f_data is not None:
        out.update(J_data=j[2], energy_data=controls[2].square().sum((-2, -1)))
    return out


# ----------------------------------------------------------------------------------------------
# Dataset


class BurgersData(EddyData):
    """Burgers control trajectories as 2-channel images x [2, HEIGHT, N] (see the module's "Layout").

    Item i is {"x": float32 [2, 16, 128]}, standardized with `normalization`; under `observe="partial"` the
    unobserved state is 0 (physical), as DiffPhyCon trains its partially observed models. The Trainer's
    known entries for a sampler are `known_mask()` with `x_known(u0, u_target)`; `problems` gives the test
    problems and `score` (module function) scores generated controls.

    Args:
        u: [n, N_INTERVALS + 1, N] states (physical), array or tensor.
        f: [n, N_INTERVALS, N] controls (physical).
        normalization: per-channel statistics (default: those of u and f).
        observe, control: the setting, "full" or "partial".
        source: where the data came from, for messages.
    """

    channels = 2
    bounded = False

    def __init__(self, u, f, *, normalization: Normalization | None = None, observe: str = "full",
                 control: str = "full", source: str = ""):
        self.observe, self.control = check_setting("observe", observe), check_setting("control", control)
        self.u = torch.as_tensor(np.asarray(u, dtype=np.float32))  # [n, N_INTERVALS + 1, N]
        self.f = torch.as_tensor(np.asarray(f, dtype=np.float32))  # [n, N_INTERVALS, N]
        if self.u.ndim != 3 or self.u.shape[1] != N_INTERVALS + 1 or \
                self.f.shape != (len(self.u), N_INTERVALS, self.u.shape[2]):
            raise DataError(f"{source or 'Burgers data'}: states must be [n, {N_INTERVALS + 1}, N] and controls "
                            f"[n, {N_INTERVALS}, N], got {tuple(self.u.shape)} and {tuple(self.f.shape)}")
        if len(self.u) == 0:
            raise DataError(f"{source or 'Burgers data'} holds no trajectories")
        if not (torch.isfinite(self.u).all() and torch.isfinite(self.f).all()):
            raise DataError(f"{source or 'Burgers data'} holds NaN or infinite values")
        self.normalization = normalization or statistics(self.u, self.f)
        self.image_size = (HEIGHT, self.u.shape[2])
        self.source = source

    def __len__(self) -> int:
        return len(self.u)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        i = normalize_index(index, len(self))
        return {"x": self.pack(*given(self.u[i], self.f[i], self.observe, "full"))}

    def pack(self, u: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """`pack` with this data's normalization."""
        return pack(u, f, self.normalization)

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`unpack` with this data's normalization."""
        return unpack(x, self.normalization)

    def known_mask(self) -> torch.Tensor:
        """`known_mask` of this data's setting, [2, HEIGHT, N] bool."""
        return known_mask(self.observe, self.control, self.u.shape[2])

    def x_known(self, u0: torch.Tensor, u_target: torch.Tensor) -> torch.Tensor:
        """`x_known` of this data's setting and normalization, [B, 2, HEIGHT, N]."""
        return x_known(u0, u_target, self.normalization, observe=self.observe, control=self.control)

    def problems(self, indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u0 [B, N], u_target [B, N], f_data [B, N_INTERVALS, N]) float64, physical and full (what `score`
        takes), of trajectories `indices` (default all)."""
        idx = torch.arange(len(self)) if indices is None else torch.as_tensor(list(indices), dtype=torch.long)
        u = self.u[idx].double()
        return u[:, 0], u[:, -1], self.f[idx].double()


class ChannelSubset(EddyData):
    """Some channels of a BurgersData alone: the data of a prior model (--burgers_part control trains on the
    control channel), with the base data's problems, normalization and masks at hand as `base`."""

    bounded = False

    def __init__(self, base: BurgersData, channels: Sequence[int]):
        self.base, self.kept = base, list(channels)
        self.channels, self.image_size, self.source = len(self.kept), base.image_size, f"{base.source}, channels {self.kept}"

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        return {"x": self.base[index]["x"][self.kept]}


def statistics(u: torch.Tensor, f: torch.Tensor) -> Normalization:
    """Mean and standard deviation of the states and of the controls (two channels), in float64."""
    stats = [(v.double().mean().item(), v.double().std(unbiased=False).item()) for v in (u, f)]
    return Normalization(mean=tuple(m for m, _ in stats), std=tuple(s if s > 1e-12 else 1.0 for _, s in stats))


def burgers_dataset(*, split: str, observe: str = "full", control: str = "full", counts: str = "cpu",
                    num_train: int | None = None, num_test: int | None = None, seed: int = 0,
                    device: str | None = None, progress: bool = True) -> BurgersData:
    """The built-in Burgers data of `split` ("train" or "test"), generated on the first call (on the GPU when
    there is one) into `$EDDY_CACHE/burgers/<control>-<key>/` and loaded afterwards. `counts` names the
    (train, test) sizes in `COUNTS`; `num_train`, `num_test` override them. Test trajectories are other indices
    than the training ones; both splits use the training statistics. The data depend on `control` (partial
    control draws controls on the outer quarters only); `observe` only changes the items and masks."""
    check_setting("observe", observe)
    check_setting("control", control)
    if split not in ("train", "test"):
        raise ConfigError(f"--split {split!r}: the Burgers data has the splits train and test")
    if counts not in COUNTS:
        raise ConfigError(f"Burgers counts {counts!r} is not one of: {', '.join(COUNTS)}")
    num_train = COUNTS[counts][0] if num_train is None else num_train
    num_test = COUNTS[counts][1] if num_test is None else num_test
    spec = {"control": control, "seed": seed, "num_train": num_train, "num_test": num_test, "n": N_POINTS,
            "n_intervals": N_INTERVALS, "steps_per_interval": STEPS_PER_INTERVAL, "nu": VISCOSITY, "t_end": T_END,
            "version": _VERSION}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root() / "burgers" / f"{control}-{key}"
    if not (folder / "stats.json").is_file():
        _generate(folder, spec, device, progress)
    return BurgersData(np.load(folder / f"{split}_u.npy"), np.load(folder / f"{split}_f.npy"),
                       normalization=Normalization.load(folder / "stats.json"), observe=observe, control=control,
                       source=f"burgers {control} control ({split})")


def _generate(folder: Path, spec: dict, device: str | None, progress: bool) -> None:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = 8192 if str(device).startswith("cuda") else 512  # a step is a few small kernels: fill the GPU
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count, start in (("train", spec["num_train"], 0), ("test", spec["num_test"], spec["num_train"])):
        arrays[split] = generate(count, spec["seed"], start=start, control=spec["control"], batch_size=batch_size,
                                 device=device, progress=progress)
        np.save(tmp / f"{split}_u.npy", arrays[split][0].numpy())
        np.save(tmp / f"{split}_f.npy", arrays[split][1].numpy())
    statistics(*arrays["train"]).save(tmp / "stats.json")
    (tmp / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["CHANNELS", "COUNTS", "HEIGHT", "IDENTITY", "N_INTERVALS", "N_POINTS", "SETTINGS", "STEPS_PER_INTERVAL",
           "T_END", "VISCOSITY", "BurgersData", "ChannelSubset", "burgers_dataset", "check_setting", "control_mask", "draw",
           "generate", "given", "grid", "known_mask", "pack", "region", "score", "simulate", "statistics", "unpack",
           "x_known"]
