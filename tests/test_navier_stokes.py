"""The Navier-Stokes solver of trainer/data/navier_stokes.py: closed forms, invariants, orders, seeds.

All on the CPU at 32x32 or 64x64 with a few trajectories; float64 where round-off is asserted.
"""

import dataclasses
import math

import pytest
import torch

from trainer.data import navier_stokes as ns
from trainer.errors import ConfigError, DataError

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def grid(n: int, length: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x[i, j] = x_i, y[i, j] = y_j (the solver's layout)."""
    x = torch.arange(n, dtype=F64) * (length / n)
    return torch.meshgrid(x, x, indexing="ij")


def spectral_derivative(a: torch.Tensor, length: float, axis: str) -> torch.Tensor:
    sp = ns.spectral(a.shape[-1], length, a.device, a.dtype)
    k = sp.kx if axis == "x" else sp.ky
    return torch.fft.irfft2(1j * k * torch.fft.rfft2(a), s=a.shape[-2:])


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def cn_factors(decay: float, dt: float, scheme: str) -> float:
    """The solver's amplification of a mode with decay rate Lam in one step, N = 0."""
    shares = [1.0] if scheme == "euler" else [c1 - c0 for c0, c1 in zip(ns._CK_C[:-1], ns._CK_C[1:])]
    return math.prod((1 - s * dt / 2 * decay) / (1 + s * dt / 2 * decay) for s in shares)


# ----------------------------------------------------------------------------------------------
# 1. Taylor-Green vortex


@pytest.mark.parametrize("scheme", ns.SCHEMES)
def test_taylor_green_decays_as_the_closed_form(scheme):
    """omega0 = 2k cos(kx) cos(ky) is an eigenfunction of the Laplacian, so u . grad(omega) = 0 and
    omega(t) = omega0 exp(-(2 nu k^2 + mu) t). The solver must reproduce its own Crank-Nicolson
    factor to round-off (the nonlinear term vanishes on the grid too), and the exponential within
    Crank-Nicolson's O(dt^2) error."""
    n, length, k, nu, dt, steps = 32, 2 * math.pi, 2, 0.05, 0.01, 100
    x, y = grid(n, length)
    omega0 = 2 * k * torch.cos(k * x) * torch.cos(k * y)
    for drag in (0.0, 0.3):
        preset = ns.NSPreset(name="taylor_green", length=length, viscosity=nu, drag=drag, dt=dt, scheme=scheme)
        omega = ns.advance(omega0[None], preset, steps)[0]
        decay = 2 * nu * k**2 + drag
        discrete = omega0 * cn_factors(decay, dt, scheme) ** steps
        assert (omega - discrete).abs().max() < 1e-13 * omega0.abs().max()
        exact = omega0 * math.exp(-decay * dt * steps)
        # Crank-Nicolson: per step (1 - a)/(1 + a) = exp(-2a) (1 + (2a)^3 / 12 + ...), a = Lam dt / 2.
        assert (omega - exact).abs().max() < 2 * steps * (decay * dt) ** 3 / 12 * omega0.abs().max()


def test_taylor_green_velocity_has_the_stated_signs():
    """psi = cos(kx) cos(ky) / k, u = d(psi)/dy = -cos(kx) sin(ky), v = -d(psi)/dx = sin(kx) cos(ky)."""
    n, length, k = 32, 2 * math.pi, 3
    x, y = grid(n, length)
    u, v = ns.velocity(2 * k * torch.cos(k * x) * torch.cos(k * y), length)
    assert torch.allclose(u, -torch.cos(k * x) * torch.sin(k * y), atol=1e-13)
    assert torch.allclose(v, torch.sin(k * x) * torch.cos(k * y), atol=1e-13)


def test_laminar_kolmogorov_flow_has_the_forcing_sign():
    """From rest, Kolmogorov flow stays the shear flow u = A(t) sin(4y), v = 0 (no nonlinear term);
    Crank-Nicolson keeps the steady state exactly: A = 1 / (16 nu + mu), omega = -4 A cos(4y)."""
    n, nu, drag = 32, 0.05, 0.1
    preset = ns.get_preset("kolmogorov", viscosity=nu, drag=drag, dt=0.1, resolution=n, size=n)
    omega = ns.advance(torch.zeros(1, n, n, dtype=F64), preset, 600)[0]  # t = 60, e^{-54}
    amplitude = 1 / (16 * nu + drag)
    x, y = grid(n, preset.length)
    u, v = ns.velocity(omega, preset.length)
    assert torch.allclose(omega, -4 * amplitude * torch.cos(4 * y), atol=1e-12)
    assert torch.allclose(u, amplitude * torch.sin(4 * y), atol=1e-12)
    assert v.abs().max() < 1e-12


# ----------------------------------------------------------------------------------------------
# 2. Velocity


def test_velocity_is_divergence_free_and_has_the_vorticity_as_curl():
    """div u, computed spectrally, is round-off of u differentiated: at most a few eps kappa_max
    max|u| (measured max|div| / max|u|: 7e-14 in float64, 3.6e-5 in float32, kappa_max = 2 pi 32)."""
    preset = ns.PRESETS["fno"]
    for dtype, eps in ((F64, 2.2e-16), (torch.float32, 1.2e-7)):
        omega = ns.initial_vorticity(preset, range(3), seed=1, resolution=64, dtype=dtype)
        u, v = ns.velocity(omega)
        div = spectral_derivative(u, 1.0, "x") + spectral_derivative(v, 1.0, "y")
        assert div.abs().max() / u.abs().max() < 10 * eps * (2 * math.pi * 32)
        if dtype == F64:
            assert div.abs().max() / u.abs().max() < 1e-10
    # curl u = omega for a field without Nyquist modes (first derivatives drop them).
    omega = ns.downsample(ns.initial_vorticity(preset, range(2), dtype=F64), 64)
    u, v = ns.velocity(omega)
    curl = spectral_derivative(v, 1.0, "x") - spectral_derivative(u, 1.0, "y")
    assert (curl - omega).abs().max() < 1e-12 * omega.abs().max()


def test_fields_stacks_the_chosen_channels():
    omega = ns.initial_vorticity(ns.PRESETS["kolmogorov"], range(2), resolution=32)
    stacked = ns.fields(omega[:, None], ("v", "vorticity", "u"), length=2 * math.pi)  # [B, 1, C, N, N]
    u, v = ns.velocity(omega, 2 * math.pi)
    assert stacked.shape == (2, 1, 3, 32, 32)
    assert torch.equal(stacked[:, 0, 1], omega)
    assert torch.equal(stacked[:, 0, 0], v) and torch.equal(stacked[:, 0, 2], u)


def test_downsampling_is_exact_on_band_limited_fields_and_commutes_with_velocity():
    x, y = grid(64, 1.0)
    xc, yc = grid(32, 1.0)
    band = lambda x, y: torch.cos(2 * math.pi * (3 * x + 2 * y)) + torch.sin(2 * math.pi * (15 * x - 7 * y))
    assert torch.allclose(ns.downsample(band(x, y), 32), band(xc, yc), atol=1e-13)
    omega = ns.initial_vorticity(ns.PRESETS["fno"], range(2), dtype=F64)
    for fine, coarse in zip(ns.velocity(omega), ns.velocity(ns.downsample(omega, 32))):
        assert torch.allclose(ns.downsample(fine, 32), coarse, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# 3. Time convergence


@pytest.mark.parametrize("scheme, order", [("euler", 1), ("rk4", 2)])
def test_halving_dt_shrinks_the_error_by_the_order(scheme, order):
    """A GRF field (x10: velocities 0.2, advective time 5), nu = 1e-2, forced, to T = 1, against
    "rk4" at dt = T / 1024. Measured ratios: euler 2.03, 2.01; rk4 4.01, 4.01 (Crank-Nicolson
    makes rk4 second order; its explicit part alone is fourth)."""
    preset = ns.get_preset("fno", viscosity=1e-2, scheme=scheme, resolution=32, size=32)
    omega0 = 10 * ns.initial_vorticity(preset, range(2), dtype=F64)
    reference = ns.simulate(omega0, dataclasses.replace(preset, scheme="rk4"), (1.0,), dt=1 / 1024)
    errors = [relative_l2(ns.simulate(omega0, preset, (1.0,), dt=1 / steps), reference) for steps in (32, 64, 128)]
    for coarse, fine in zip(errors, errors[1:]):
        assert 0.9 * 2**order < coarse / fine < 1.15 * 2**order, errors


def test_float32_runs_follow_float64_ones():
    """float32 FFTs on the float64 state: 2000 steps of fno's dt = 1e-4 stay within float32 rounding
    of the float64 run. Measured for the same steps with a float32 state: 5.6e-6 away, and 3.3e-5
    in the form of Li et al.'s float32 generator (a = (1 - dt/2 Lam) / (1 + dt/2 Lam) rounded)."""
    preset = ns.get_preset("fno", resolution=32, size=32)
    omega0 = ns.initial_vorticity(preset, range(2), dtype=F64)
    exact = ns.simulate(omega0, preset, (0.1, 0.2))
    single = ns.simulate(omega0.float(), preset, (0.1, 0.2))
    assert single.dtype == torch.float32
    assert relative_l2(single.double(), exact) < 1e-7


# ----------------------------------------------------------------------------------------------
# 4. Seeds


def small_kolmogorov(**changes) -> ns.NSPreset:
    return ns.get_preset("kolmogorov", resolution=32, size=16, t_first=0.2, t_every=0.2, n_frames=2, **changes)


def test_same_seed_same_data_whatever_the_batch():
    preset = small_kolmogorov()
    whole = ns.generate(preset, 5, seed=3, batch_size=5, progress=False)  # [5, 2, 16, 16]
    assert whole.shape == (5, 2, 16, 16) and whole.dtype == torch.float32
    assert torch.equal(whole, ns.generate(preset, 5, seed=3, batch_size=2, progress=False))  # batches 2, 2, 1
    assert torch.equal(whole[3:], ns.generate(preset, 2, seed=3, start=3, batch_size=1, progress=False))
    other = ns.generate(preset, 2, seed=4, progress=False)
    assert not torch.allclose(other, whole[:2], atol=1e-2)
    assert not torch.allclose(whole[0], whole[1], atol=1e-2)


def test_initial_fields_do_not_depend_on_dtype_or_batch():
    preset = ns.PRESETS["fno"]
    single = ns.initial_vorticity(preset, [7], seed=11, dtype=F64)
    batch = ns.initial_vorticity(preset, [2, 7, 9], seed=11, dtype=F64)
    assert torch.equal(single[0], batch[1])
    assert torch.equal(ns.initial_vorticity(preset, [7], seed=11, dtype=torch.float32), single.float())


# ----------------------------------------------------------------------------------------------
# 5. The GRF's spectrum


@pytest.mark.parametrize("length", [1.0, 2 * math.pi])
def test_grf_has_the_covariance_spectrum_and_zero_mean(length):
    """E|omega_hat(k)|^2 = sigma^2 (|kappa|^2 + tau^2)^-alpha, sigma = tau^(alpha - 1), kappa =
    2 pi k / L (on the unit torus 4 pi^2 |k|^2), per shell within 6% over 800 draws, and the log-log
    slope at high |k| is the formula's (on the unit torus about -2 alpha there)."""
    n, draws, alpha, tau = 32, 800, 2.5, 7.0
    generator = torch.Generator().manual_seed(0)
    omega = torch.stack([ns.grf(n, generator, alpha=alpha, tau=tau, length=length) for _ in range(draws)])
    assert omega.mean(dim=(-2, -1)).abs().max() < 1e-15
    power = (torch.fft.rfft2(omega, norm="forward").abs() ** 2).mean(0)  # [N, N // 2 + 1]
    kx = torch.fft.fftfreq(n, 1 / n, dtype=F64)[:, None]
    ky = torch.fft.rfftfreq(n, 1 / n, dtype=F64)[None, :]
    k = (kx**2 + ky**2).sqrt()
    expected = tau ** (2 * (alpha - 1)) * ((2 * math.pi / length) ** 2 * k**2 + tau**2) ** -alpha
    assert power[0, 0] < 1e-30
    shells = range(1, n // 2)
    ratios = [(power[(k.round() == s)].sum() / expected[(k.round() == s)].sum()).item() for s in shells]
    assert all(abs(r - 1) < 0.06 for r in ratios), ratios

    # Slope of the shell means between |k| = 6 and 15, data against formula.
    def slope(values):
        logk = torch.log(torch.tensor([float(s) for s in range(6, 16)], dtype=F64))
        logp = torch.log(torch.stack([values[(k.round() == s)].mean() for s in range(6, 16)]))
        return (((logk - logk.mean()) * (logp - logp.mean())).sum() / ((logk - logk.mean()) ** 2).sum()).item()

    assert abs(slope(power) - slope(expected)) < 0.05 * 2 * alpha
    if length == 1.0:
        assert abs(slope(expected) + 2 * alpha) < 0.03 * 2 * alpha


def test_grf_is_li_et_al_gaussian_rf_on_the_same_normals():
    """Their `GaussianRF(2, s, alpha=2.5, tau=7).sample`: sqrt_eig = s^2 sqrt(2) sigma (4 pi^2 |k|^2 +
    tau^2)^(-alpha/2), zero mean mode, times complex normals, `ifftn(...).real`."""
    s, alpha, tau = 32, 2.5, 7.0
    sigma = tau ** (0.5 * (2 * alpha - 2))
    k = torch.cat((torch.arange(0, s // 2), torch.arange(-s // 2, 0))).to(F64).repeat(s, 1)
    sqrt_eig = s**2 * math.sqrt(2.0) * sigma * ((4 * math.pi**2 * (k.T**2 + k**2) + tau**2) ** (-alpha / 2.0))
    sqrt_eig[0, 0] = 0.0
    z = torch.randn(s, s, dtype=torch.complex128, generator=torch.Generator().manual_seed(5))
    theirs = torch.fft.ifftn(sqrt_eig * z, dim=[-1, -2]).real
    ours = ns.grf(s, torch.Generator().manual_seed(5), alpha=alpha, tau=tau)
    assert torch.allclose(ours, theirs, atol=1e-14, rtol=0)


def test_euler_is_li_et_al_step():
    """Our "euler" against a transcription of the loop in their `navier_stokes_2d` (full fft2)."""
    n, visc, dt, steps = 32, 1e-3, 1e-3, 20
    preset = ns.get_preset("fno", dt=dt, resolution=n, size=n)
    w0 = ns.initial_vorticity(preset, range(2), dtype=F64) * 5
    x, y = grid(n, 1.0)
    f_h = torch.fft.fft2(ns.fno_forcing(x, y))[None]
    k_max = n // 2
    k_y = torch.cat((torch.arange(0, k_max), torch.arange(-k_max, 0))).to(F64).repeat(n, 1)
    k_x = k_y.T
    lap = 4 * math.pi**2 * (k_x**2 + k_y**2)
    lap[0, 0] = 1.0
    dealias = ((k_y.abs() <= 2 / 3 * k_max) & (k_x.abs() <= 2 / 3 * k_max)).to(F64)[None]
    w_h = torch.fft.fft2(w0)
    for _ in range(steps):
        psi_h = w_h / lap
        q = torch.fft.ifft2(2 * math.pi * k_y * 1j * psi_h).real
        v = torch.fft.ifft2(-2 * math.pi * k_x * 1j * psi_h).real
        w_x = torch.fft.ifft2(2 * math.pi * k_x * 1j * w_h).real
        w_y = torch.fft.ifft2(2 * math.pi * k_y * 1j * w_h).real
        F_h = dealias * torch.fft.fft2(q * w_x + v * w_y)
        w_h = (-dt * F_h + dt * f_h + (1.0 - 0.5 * dt * visc * lap) * w_h) / (1.0 + 0.5 * dt * visc * lap)
    theirs = torch.fft.ifft2(w_h).real
    ours = ns.advance(w0, preset, steps)
    assert (ours - theirs).abs().max() < 1e-13 * theirs.abs().max()


# ----------------------------------------------------------------------------------------------
# 6. Energy budget


def test_energy_budget_closes():
    """Unforced, undamped: dE/dt = -2 nu Z (E = <|u|^2>/2, Z = <omega^2>/2). dE/dt from a
    Richardson-extrapolated central difference (h = 0.02, 0.01), so the check sees the solver, not
    the difference (a plain h = 0.01 difference alone is off by 6e-5)."""
    preset = ns.get_preset("fno", forcing=None, viscosity=1e-2, scheme="rk4", dt=2.5e-3, resolution=32, size=32)
    omega0 = 10 * ns.initial_vorticity(preset, range(2), dtype=F64)
    t, h = 0.5, 0.01
    frames = ns.simulate(omega0, preset, (t - 2 * h, t - h, t, t + h, t + 2 * h))  # [B, 5, N, N]
    energy = ns.kinetic_energy(frames)
    d1 = (energy[:, 3] - energy[:, 1]) / (2 * h)
    d2 = (energy[:, 4] - energy[:, 0]) / (4 * h)
    dedt = (4 * d1 - d2) / 3
    budget = -2 * preset.viscosity * ns.enstrophy(frames[:, 2])
    assert ((dedt - budget).abs() / budget.abs()).max() < 1e-6


# ----------------------------------------------------------------------------------------------
# 7. Bad input


def test_bad_input_raises_clear_errors():
    with pytest.raises(ConfigError, match="fno, kolmogorov"):
        ns.get_preset("taylor")
    with pytest.raises(ConfigError, match="vorticity, u, v"):
        ns.fields(torch.zeros(2, 8, 8), ("vorticity", "pressure"))
    with pytest.raises(ConfigError, match="resolution must be an even integer"):
        ns.get_preset("fno", resolution=63)
    with pytest.raises(ConfigError, match="size"):
        ns.get_preset("fno", resolution=32, size=64)
    for dt in (0.0, -1e-3, float("nan")):
        with pytest.raises(ConfigError, match="dt must be > 0"):
            ns.get_preset("fno", dt=dt)
        with pytest.raises(ConfigError, match="dt must be > 0"):
            ns.advance(torch.zeros(1, 8, 8), ns.PRESETS["fno"], 3, dt=dt)
    with pytest.raises(ConfigError, match="scheme"):
        ns.get_preset("fno", scheme="rk45")
    with pytest.raises(ConfigError, match="has no field viscousity"):
        ns.get_preset("fno", viscousity=1e-4)
    with pytest.raises(ConfigError, match="multiples of dt"):
        ns.simulate(torch.zeros(1, 8, 8), ns.PRESETS["fno"], (0.5,), dt=3e-4)
    with pytest.raises(DataError, match="even"):
        ns.simulate(torch.zeros(1, 9, 9), ns.PRESETS["fno"], (0.0,))
    with pytest.raises(DataError, match="square"):
        ns.velocity(torch.zeros(1, 8, 16))
