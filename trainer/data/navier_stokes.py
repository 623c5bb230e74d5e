"""A batched pseudo-spectral solver of 2D incompressible Navier-Stokes in vorticity form, in torch.

Equations, on the periodic box [0, L)^2 (Li et al. 2021, "Fourier neural operator", section 5.3):

    d(omega)/dt + u . grad(omega) = nu Laplacian(omega) - mu omega + f             (1)
    -Laplacian(psi) = omega,    u = d(psi)/dy,    v = -d(psi)/dx                     (2)

`nu` is the viscosity, `mu` a linear drag (the `- alpha omega` of Kolmogorov flow; named `drag` in
`NSPreset` so it does not collide with the GRF exponent alpha), `f` the vorticity forcing. With (2),
omega = dv/dx - du/dy (the z component of curl u) and div u = 0 identically.

Layout: `omega[..., i, j] = omega(x_i, y_j)` with x_i = i L / N, y_j = j L / N: the first spatial axis
is x and the second is y, as in Li et al.'s generator (`meshgrid(..., indexing="ij")`). Fourier
coefficients are `rfft2(omega, norm="forward")` (the mean of omega e^{-i kappa.x} over the grid),
so they do not depend on N; kappa = 2 pi k / L with integer k (k_x full, k_y >= 0 halved).

Space: derivatives and the Poisson solve (2) are exact on the grid's Fourier modes (the Nyquist
wavenumber is zeroed in first derivatives, kept in the Laplacian); the product u . grad(omega) is
formed on the grid and its transform kept only where |k_x|, |k_y| <= N/3 (the 2/3 rule, exactly
Li et al.'s mask `|k| <= (2/3) floor(N/2)`).

Time. Write Lam(k) = nu |kappa|^2 + mu for the linear decay and
N(omega) = f - P(u . grad omega) for the explicit terms (P: the 2/3 mask). Two steppers:

- `"euler"`, Li et al.'s released generator (`data_generation/navier_stokes/ns_2d.py`) exactly:
  Crank-Nicolson for the linear term, forward Euler for the nonlinear and forcing terms,

      omega^{n+1} = [(1 - dt/2 Lam) omega^n + dt N(omega^n)] / (1 + dt/2 Lam).         (3)

  First order in time (the explicit part is forward Euler; the paper says only "Crank-Nicolson").
  For a mode advected at speed |u|, the amplification (1 - a + i |u| kappa dt) / (1 + a), with
  a = nu kappa^2 dt / 2, stays within 1 iff dt <= 2 nu / |u|^2, whatever kappa. Ours differs from
  theirs only in rounding: rfft2 instead of fft2 (their `.real` of odd derivatives drops the Nyquist
  wavenumber as our zeroing does), (3) evaluated as omega + ((a - 1) omega + b N) with
  a = (1 - dt/2 Lam) / (1 + dt/2 Lam), b = dt / (1 + dt/2 Lam) precomputed, and the Fourier state
  kept in float64 (see "Precision"). They set lap[0, 0] = 1, which touches only the mean mode,
  zero throughout.
- `"rk4"`, the low-storage 5-stage fourth-order Runge-Kutta of Carpenter & Kennedy (1994, NASA
  TM-109112, "(5,4) 2N-storage", solution 3) for N, with Crank-Nicolson over each stage's share
  (c_{s+1} - c_s) dt for the linear term, as jax-cfd's `crank_nicolson_rk4` (used by Kochkov et al.
  2021 for Kolmogorov flow). With h_0 = 0, for s = 1..5:

      h_s = N(omega_{s-1}) + A_s h_{s-1},    m_s = dt (c_{s+1} - c_s) / 2,
      omega_s = [(1 - m_s Lam) omega_{s-1} + dt B_s h_s] / (1 + m_s Lam),              (4)

  evaluated, like (3), as an increment of omega_{s-1}; omega^{n+1} = omega_5.

  Second order overall (Crank-Nicolson substeps; measured: halving dt divides the error by 4.0),
  but the explicit error is fourth order and the explicit part is stable for advection up to a
  Courant number (|u| kappa_x + |v| kappa_y) dt of 3.34 (its stability polynomial on the imaginary
  axis; forward Euler has no such range without viscosity). Needed for `kolmogorov`, where (3)
  would need dt < 2 nu / max|u|^2, about 1e-4.

Precision: `dtype` (float32 or float64, that of omega0) is the dtype of the FFTs, of the product
u . grad(omega) and of the frames returned; the Fourier state omega_hat and the update (3) / (4)
are float64 always. An increment dt N is 1e-5 to 1e-6 of omega at fno's dt = 1e-4: added to a
float32 state it would keep only 1 to 2 digits, and since it barely changes from step to step, that
rounding is a bias, not noise (so is rounding a = 1 - 4e-6 itself, by 1.5% of a - 1 for fno's
lowest modes, the form of Li et al.'s float32 generator). Measured at 64^2, dt = 1e-4: float32
FFTs on a float64 state stay within 3e-8 of float64 at t = 1..3 (the rounding of the frames); a
float32 state drifted 1e-6 to 1.4e-5 away over t = 1..5. The float64 state costs a few
elementwise operations per step; the FFTs, which dominate, run in the chosen dtype.

Presets (`PRESETS`, `get_preset`): `fno` is Li et al.'s protocol, `kolmogorov` the forced turbulence
of Kochkov et al. 2021; see their docstrings in `_fno` and `_kolmogorov`.

Randomness: trajectory `index` starts from a GRF drawn with a CPU `torch.Generator` seeded from
(seed, index) in float64, then cast, so the same seed and index give the same initial field in any
batch, dtype and device. On the CPU the whole trajectory is bit-for-bit the same whatever the batch
(see `_as_batch`); on a GPU the FFTs round differently from the CPU's, and cuFFT may pick plans by
batch size, so results can differ in the last bits (and, over a long chaotic run, grow from there).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.errors import ConfigError, DataError

CHANNELS = ("vorticity", "u", "v")
SCHEMES = ("euler", "rk4")

_SEED_MASK = (1 << 64) - 1
_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}

# Carpenter & Kennedy (1994), (5,4) 2N-storage Runge-Kutta, solution 3: A_s, B_s, c_s (c_6 = 1).
_CK_A = (0.0, -567301805773 / 1357537059087, -2404267990393 / 2016746695238,
         -3550918686646 / 2091501179385, -1275806237668 / 842570457699)
_CK_B = (1432997174477 / 9575080441755, 5161836677717 / 13612068292357, 1720146321549 / 2090206949498,
         3134564353537 / 4481467310338, 2277821191437 / 14882151754819)
_CK_C = (0.0, 1432997174477 / 9575080441755, 2526269341429 / 6820363962896,
         2006345519317 / 3224310063776, 2802321613138 / 2924317926251, 1.0)


# ----------------------------------------------------------------------------------------------
# Forcings and presets


def fno_forcing(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Li et al.'s vorticity forcing f(x, y) = 0.1 (sin(2 pi (x + y)) + cos(2 pi (x + y)))."""
    phase = 2 * math.pi * (x + y)
    return 0.1 * (torch.sin(phase) + torch.cos(phase))


def kolmogorov_forcing(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Vorticity forcing of Kolmogorov flow: the body force (sin(4y), 0) in the momentum equation
    has curl d(0)/dx - d(sin 4y)/dy = -4 cos(4y)."""
    return -4.0 * torch.cos(4.0 * y) + 0.0 * x


def _check_positive(name: str, value: float) -> None:
    if not value > 0:  # also catches NaN
        raise ConfigError(f"NSPreset.{name} must be > 0, got {value}")


def check_resolution(n: int, what: str = "the resolution") -> None:
    """A grid side must be an even integer >= 4 (the 2/3 rule and the rfft layout assume it)."""
    if not isinstance(n, int) or n < 4 or n % 2:
        raise ConfigError(f"{what} must be an even integer >= 4, got {n!r}")


@dataclass(frozen=True)
class NSPreset:
    """One data-generation protocol: the equation (1), its initial fields, stepping and recording.

    Change a field with `dataclasses.replace` or `get_preset(name, field=value)`.
    """

    name: str
    length: float = 1.0
    """Side L of the periodic box [0, L)^2."""
    viscosity: float = 1e-3
    """nu in (1)."""
    drag: float = 0.0
    """Linear drag mu in (1) (the `- alpha omega` of Kolmogorov flow)."""
    forcing: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """Vorticity forcing f(x, y) (x, y broadcastable grids); None for no forcing."""
    grf_alpha: float = 2.5
    """Initial vorticity ~ N(0, sigma^2 (-Laplacian + tau^2)^-alpha): alpha."""
    grf_tau: float = 7.0
    """tau of the initial GRF."""
    grf_sigma: float | None = None
    """sigma of the initial GRF; None for Li et al.'s tau^(alpha - 1) (= tau^(0.5 (2 alpha - d)), d = 2)."""
    dt: float = 1e-4
    """Time step of the solver."""
    scheme: str = "euler"
    """Time stepper: "euler" (Crank-Nicolson + forward Euler, Li et al.) or "rk4" (Crank-Nicolson + RK4)."""
    resolution: int = 64
    """Grid the solver runs on (even); frames are downsampled spectrally to `size` if larger."""
    size: int = 64
    """Side of the recorded frames (even, at most `resolution`)."""
    t_first: float = 1.0
    """Time of the first recorded frame; earlier times are spin-up, not recorded."""
    t_every: float = 1.0
    """Time between recorded frames."""
    n_frames: int = 50
    """Number of recorded frames."""
    n_train: int = 1000
    """Default number of training trajectories."""
    n_test: int = 200
    """Default number of test trajectories."""

    def __post_init__(self):
        _check_positive("length", self.length)
        _check_positive("dt", self.dt)
        _check_positive("t_every", self.t_every)
        for name in ("viscosity", "drag", "t_first"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"NSPreset.{name} must be >= 0, got {getattr(self, name)}")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"NSPreset.scheme {self.scheme!r} is not one of {', '.join(SCHEMES)}")
        check_resolution(self.resolution, "NSPreset.resolution")
        check_resolution(self.size, "NSPreset.size")
        if self.size > self.resolution:
            raise ConfigError(f"NSPreset.size ({self.size}) must be at most NSPreset.resolution ({self.resolution})")
        for name in ("n_frames", "n_train", "n_test"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (1 if name == "n_frames" else 0):
                raise ConfigError(f"NSPreset.{name} must be a {'positive' if name == 'n_frames' else 'non-negative'} "
                                  f"integer, got {getattr(self, name)!r}")

    @property
    def times(self) -> tuple[float, ...]:
        """The recorded times t_first + i t_every, i < n_frames."""
        return tuple(self.t_first + i * self.t_every for i in range(self.n_frames))


def _fno() -> NSPreset:
    """Li et al. 2021, Navier-Stokes with nu = 1e-3: unit torus, their forcing, GRF initial vorticity
    N(0, 7^{3/2} (-Laplacian + 49 I)^{-2.5}) (in their code sigma = 7^{3/2} scales the standard
    deviation: the covariance is 7^3 (4 pi^2 |k|^2 + 49)^{-2.5}), dt 1e-4 with their stepper (3),
    frames at t = 1, ..., 50. They simulate at 256^2 and downsample to 64^2; Eddy simulates at 64^2
    (`resolution=256` for theirs). benchmarks/ns_convergence.py measured how far that is, from the
    same initial fields: relative L2 to the 256^2 run 4e-10 (t = 1) and 8e-11 (t = 2) in float64,
    float32 rounding (2e-7) in float32 up to t = 5; a 10x larger dt costs more (3e-5), and all are
    far below the errors Li et al. report (FNO-3D 0.0086). Not measured beyond t = 5. Their other
    viscosities record fewer frames: `get_preset("fno", viscosity=1e-4, n_frames=30)` and
    `viscosity=1e-5, n_frames=20`; rerun the benchmark with `--viscosity` before trusting 64^2 there.
    """
    return NSPreset(name="fno", length=1.0, viscosity=1e-3, drag=0.0, forcing=fno_forcing,
                    grf_alpha=2.5, grf_tau=7.0, dt=1e-4, scheme="euler", resolution=64, size=64,
                    t_first=1.0, t_every=1.0, n_frames=50, n_train=1000, n_test=200)


def _kolmogorov() -> NSPreset:
    """Kolmogorov flow (Kochkov et al. 2021): box [0, 2 pi)^2, body force sin(4y) along x (vorticity
    forcing -4 cos(4y)), drag 0.1, nu = 1e-3. With the forcing amplitude chi = 1 and the length
    L / 2 pi = 1 as units, the velocity scale is sqrt(chi L / 2 pi) = 1 and Re = 1 / nu = 1000
    (Chandler & Kerswell 2013's Re = sqrt(chi) (L / 2 pi)^{3/2} / nu). GRF initial vorticity as
    `fno`'s, in this box's wavenumbers (|kappa|^2 + 49)^{-2.5}; spin-up to t = 20 discarded, then 40
    frames every 0.5. dt = 0.01 with the "rk4" stepper: measured at 64^2 (4 trajectories, t up to
    40), max |u| 5.0, max |v| 4.4, so a Courant number (max|u| + max|v|) 21 dt of 2.0, within its
    3.34; the "euler" stepper (3) would need dt < 2 nu / max|u|^2, about 1e-4, and blows up at
    0.01 (NaN by t = 5). The flow is statistically steady from t of about 5 (energy about 1, rms
    vorticity about 4.7). Its energy spectrum over t = 20..40 has a local peak at the forcing
    wavenumber 4 (E(3) = 0.18, E(4) = 0.20, E(5) = 0.036) under the inverse-cascade energy at
    k = 1, 2 (0.29, 0.25).
    """
    return NSPreset(name="kolmogorov", length=2 * math.pi, viscosity=1e-3, drag=0.1, forcing=kolmogorov_forcing,
                    grf_alpha=2.5, grf_tau=7.0, dt=0.01, scheme="rk4", resolution=64, size=64,
                    t_first=20.0, t_every=0.5, n_frames=40, n_train=1000, n_test=200)


PRESETS: dict[str, NSPreset] = {"fno": _fno(), "kolmogorov": _kolmogorov()}


def get_preset(name: str, **changes) -> NSPreset:
    """The preset `name` from `PRESETS`, with the fields in `changes` replaced."""
    if name not in PRESETS:
        raise ConfigError(f"unknown Navier-Stokes preset {name!r}; choose one of: {', '.join(PRESETS)}")
    fields = [f.name for f in dataclasses.fields(NSPreset)]
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise ConfigError(f"NSPreset has no field {', '.join(unknown)}; its fields are: {', '.join(fields)}")
    return dataclasses.replace(PRESETS[name], **changes)


# ----------------------------------------------------------------------------------------------
# Spectral operators


@dataclass(frozen=True)
class Spectral:
    """Wavenumbers of an N x N grid on [0, L)^2 in the rfft2 layout `[N, N // 2 + 1]` (x, y)."""

    n: int
    kx: torch.Tensor
    """[N, 1] kappa_x for first derivatives (Nyquist zeroed)."""
    ky: torch.Tensor
    """[1, N // 2 + 1] kappa_y for first derivatives (Nyquist zeroed)."""
    k2: torch.Tensor
    """[N, N // 2 + 1] |kappa|^2, the symbol of -Laplacian."""
    inv_k2: torch.Tensor
    """[N, N // 2 + 1] 1 / |kappa|^2, 0 for the mean mode: the symbol of -Laplacian^-1 in (2)."""
    dealias: torch.Tensor
    """[N, N // 2 + 1] 1 where |k_x|, |k_y| <= N / 3, else 0."""


@functools.lru_cache(maxsize=32)
def spectral(n: int, length: float, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> Spectral:
    """The wavenumbers of an N x N grid on [0, L)^2 (cached)."""
    check_resolution(n, "the grid side N")
    kx = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64)  # 0..N/2-1, -N/2..-1 (integers)
    ky = torch.fft.rfftfreq(n, 1.0 / n, dtype=torch.float64)  # 0..N/2
    kx, ky = kx[:, None], ky[None, :]
    scale = 2 * math.pi / length
    k2 = scale**2 * (kx**2 + ky**2)
    inv_k2 = torch.where(k2 > 0, 1.0 / torch.where(k2 > 0, k2, 1.0), 0.0)
    dealias = ((3 * kx.abs() <= n) & (3 * ky.abs() <= n)).to(torch.float64)
    kx_d = torch.where(kx.abs() == n // 2, 0.0, scale * kx)
    ky_d = torch.where(ky.abs() == n // 2, 0.0, scale * ky)
    put = dict(device=device, dtype=dtype)
    return Spectral(n, kx_d.to(**put), ky_d.to(**put), k2.to(**put), inv_k2.to(**put), dealias.to(**put))


def _grid_side(omega: torch.Tensor) -> int:
    if omega.ndim < 2 or omega.shape[-1] != omega.shape[-2]:
        raise DataError(f"vorticity must be [..., N, N] (square), got shape {tuple(omega.shape)}")
    if omega.dtype not in _COMPLEX:
        raise DataError(f"vorticity must be float32 or float64, got {omega.dtype}")
    n = omega.shape[-1]
    if n < 4 or n % 2:
        raise DataError(f"the grid side N of the vorticity must be even and >= 4, got {n}")
    return n


def _as_batch(transform: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor) -> torch.Tensor:
    """`transform` over the last two axes, with a single transform run as a batch of two: MKL takes
    another code path for one transform than for a batch, with other rounding, and a trajectory's
    bits must not depend on its batch size (batches of 2 or more agree with each other)."""
    if math.prod(a.shape[:-2]) != 1:
        return transform(a)
    out = transform(a.reshape(1, *a.shape[-2:]).repeat(2, 1, 1))[0]
    return out.reshape(*a.shape[:-2], *out.shape)


def _rfft2(a: torch.Tensor) -> torch.Tensor:
    return _as_batch(lambda x: torch.fft.rfft2(x, norm="forward"), a)


def _irfft2(a_hat: torch.Tensor, n: int) -> torch.Tensor:
    return _as_batch(lambda x: torch.fft.irfft2(x, s=(n, n), norm="forward"), a_hat)


def velocity(omega: torch.Tensor, length: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) [..., N, N] of vorticity [..., N, N] through the stream function (2):
    psi_hat = omega_hat / |kappa|^2, u = d(psi)/dy, v = -d(psi)/dx."""
    n = _grid_side(omega)
    sp = spectral(n, float(length), omega.device, omega.dtype)
    psi_hat = _rfft2(omega) * sp.inv_k2
    return _irfft2(1j * sp.ky * psi_hat, n), _irfft2(-1j * sp.kx * psi_hat, n)


def fields(omega: torch.Tensor, channels: Sequence[str], length: float = 1.0) -> torch.Tensor:
    """Channels chosen among `CHANNELS` ("vorticity", "u", "v"): [..., N, N] -> [..., C, N, N]."""
    channels = (channels,) if isinstance(channels, str) else tuple(channels)
    unknown = [c for c in channels if c not in CHANNELS]
    if unknown or not channels:
        raise ConfigError(f"unknown Navier-Stokes channel(s) {unknown or list(channels)}; "
                          f"choose among: {', '.join(CHANNELS)}")
    u, v = velocity(omega, length) if {"u", "v"} & set(channels) else (None, None)
    by_name = {"vorticity": omega, "u": u, "v": v}
    return torch.stack([by_name[c] for c in channels], dim=-3)


def downsample(omega: torch.Tensor, size: int) -> torch.Tensor:
    """Spectral truncation [..., N, N] -> [..., size, size]: keeps the modes |k_x|, |k_y| < size / 2
    (the coarse grid's Nyquist modes are dropped, also when size == N). Commutes with `velocity`."""
    n = _grid_side(omega)
    check_resolution(size, "the downsampled size")
    if size > n:
        raise ConfigError(f"cannot downsample a {n}x{n} field to {size}x{size}")
    h = size // 2
    omega_hat = _rfft2(omega)
    coarse = omega_hat.new_zeros(*omega.shape[:-2], size, h + 1)
    coarse[..., :h, :h] = omega_hat[..., :h, :h]  # k_x = 0..h-1
    coarse[..., h + 1:, :h] = omega_hat[..., n - h + 1:, :h]  # k_x = -(h-1)..-1
    return _irfft2(coarse, size)


# ----------------------------------------------------------------------------------------------
# Initial fields


def _generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, index)."""
    if index < 0:
        raise ConfigError(f"trajectory indices must be >= 0, got {index}")
    lo, hi = np.random.SeedSequence((seed & _SEED_MASK, index)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(lo) | int(hi) << 32)


def grf(n: int, generator: torch.Generator, *, alpha: float = 2.5, tau: float = 7.0, sigma: float | None = None,
        length: float = 1.0) -> torch.Tensor:
    """One draw [N, N] (float64) of omega ~ N(0, sigma^2 (-Laplacian + tau^2 I)^-alpha), periodic, mean 0.

    As Li et al.'s `GaussianRF.sample`: complex normals z_k (E|z_k|^2 = 1) times
    sqrt(2) sigma (|kappa|^2 + tau^2)^(-alpha/2), inverse-transformed, real part kept. Taking the real
    part halves the variance, which the sqrt(2) restores: the Fourier coefficients then have
    E|omega_hat(k)|^2 = sigma^2 (|kappa|^2 + tau^2)^-alpha, the covariance's eigenvalues (on the unit
    torus |kappa|^2 = 4 pi^2 |k|^2), whatever N. Their coefficients carry N^2 because their ifft
    divides by N^2; ours are the `norm="forward"` ones. All N x N modes are drawn as theirs are
    (k = -N/2..N/2-1 on both axes), so a draw uses the same number of normals.
    """
    check_resolution(n, "the GRF grid side N")
    sigma = tau ** (alpha - 1.0) if sigma is None else sigma  # tau^(0.5 (2 alpha - d)), d = 2
    k = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64)
    k2 = (2 * math.pi / length) ** 2 * (k[:, None] ** 2 + k[None, :] ** 2)
    sqrt_eig = math.sqrt(2.0) * sigma * (k2 + tau**2) ** (-alpha / 2.0)
    sqrt_eig[0, 0] = 0.0
    z = torch.randn(n, n, dtype=torch.complex128, generator=generator)
    return torch.fft.ifft2(sqrt_eig * z, norm="forward").real


def initial_vorticity(preset: NSPreset, indices: Sequence[int], *, seed: int = 0, resolution: int | None = None,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The initial fields [B, N, N] of trajectories `indices`, each from the generator (seed, index);
    N = `resolution` (default the preset's)."""
    n = preset.resolution if resolution is None else resolution
    if len(indices) == 0:
        raise ConfigError("initial_vorticity needs at least one trajectory index")
    draws = [grf(n, _generator(seed, int(i)), alpha=preset.grf_alpha, tau=preset.grf_tau, sigma=preset.grf_sigma,
                 length=preset.length) for i in indices]
    return torch.stack(draws).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Time stepping


@dataclass(frozen=True)
class _Operators:
    """What a step needs on one grid, device and dtype."""

    n: int
    grad: torch.Tensor
    """[4, 1, N, M] complex: omega_hat -> (u, v, d omega/dx, d omega/dy) hats, from (2)."""
    dealias: torch.Tensor
    """[N, M] complex 2/3 mask."""
    forcing_hat: torch.Tensor | None
    """[N, M] complex128 f_hat, or None."""
    decay: torch.Tensor
    """[N, M] float64 Lam = nu |kappa|^2 + mu."""


def _operators(preset: NSPreset, n: int, device: torch.device, dtype: torch.dtype) -> _Operators:
    sp = spectral(n, float(preset.length), device, torch.float64)
    cdtype = _COMPLEX[dtype]
    grad = torch.stack(torch.broadcast_tensors(1j * sp.ky * sp.inv_k2, -1j * sp.kx * sp.inv_k2,
                                               1j * sp.kx + 0 * sp.ky, 1j * sp.ky + 0 * sp.kx))
    forcing_hat = None
    if preset.forcing is not None:
        x = torch.arange(n, dtype=torch.float64) * (preset.length / n)
        f = preset.forcing(x[:, None], x[None, :]).expand(n, n)  # f[i, j] = f(x_i, y_j)
        forcing_hat = _rfft2(f).to(device=device)
    return _Operators(n=n, grad=grad[:, None].to(cdtype), dealias=sp.dealias.to(cdtype), forcing_hat=forcing_hat,
                      decay=preset.viscosity * sp.k2 + preset.drag)


def _explicit(omega_hat: torch.Tensor, ops: _Operators) -> torch.Tensor:
    """N(omega) = f - P(u . grad omega), in Fourier space: [B, N, M] complex128 -> complex128, the
    product and its transforms in the working dtype."""
    u, v, omega_x, omega_y = _irfft2(ops.grad * omega_hat.to(ops.grad.dtype), ops.n).unbind(0)  # [4, B, N, N]
    rhs = _rfft2(u * omega_x + v * omega_y).mul_(ops.dealias).to(torch.complex128).neg_()
    return rhs if ops.forcing_hat is None else rhs.add_(ops.forcing_hat)


def _crank_nicolson(ops: _Operators, m: float, dt_explicit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a - 1, b) [N, M] complex128 for omega <- omega + ((a - 1) omega + b N), Crank-Nicolson over
    2 m: a = (1 - m Lam) / (1 + m Lam), b = dt_explicit / (1 + m Lam)."""
    denominator = 1.0 + m * ops.decay
    return (-2.0 * m * ops.decay / denominator).to(torch.complex128), (dt_explicit / denominator).to(torch.complex128)


def _stepper(ops: _Operators, dt: float, scheme: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """One step of size dt in Fourier space, by (3) ("euler") or (4) ("rk4")."""
    if scheme == "euler":
        a1, b = _crank_nicolson(ops, dt / 2, dt)

        def euler(omega_hat: torch.Tensor) -> torch.Tensor:  # (3)
            return _explicit(omega_hat, ops).mul_(b).add_(a1 * omega_hat).add_(omega_hat)

        return euler
    if scheme == "rk4":
        stages = [(ck_a, *_crank_nicolson(ops, dt * (c1 - c0) / 2, dt * ck_b))
                  for ck_a, ck_b, c0, c1 in zip(_CK_A, _CK_B, _CK_C[:-1], _CK_C[1:])]

        def rk4(omega_hat: torch.Tensor) -> torch.Tensor:  # (4)
            h = None
            for ck_a, a1, b in stages:
                h = _explicit(omega_hat, ops) if h is None else _explicit(omega_hat, ops).add_(h, alpha=ck_a)
                omega_hat = (b * h).add_(a1 * omega_hat).add_(omega_hat)
            return omega_hat

        return rk4
    raise ConfigError(f"NSPreset.scheme {scheme!r} is not one of {', '.join(SCHEMES)}")


def _check_dt(dt: float) -> float:
    if not dt > 0:
        raise ConfigError(f"the time step dt must be > 0, got {dt}")
    return float(dt)


def advance(omega: torch.Tensor, preset: NSPreset, n_steps: int, *, dt: float | None = None) -> torch.Tensor:
    """Vorticity [..., N, N] after `n_steps` steps of size dt (default `preset.dt`) of (1)."""
    if not isinstance(n_steps, int) or n_steps < 0:
        raise ConfigError(f"the number of steps must be a non-negative integer, got {n_steps!r}")
    return simulate(omega, preset, (n_steps * _check_dt(preset.dt if dt is None else dt),), dt=dt)[..., 0, :, :]


def _steps_at(times: Sequence[float], dt: float) -> list[int]:
    """Step counts of the recorded times, which must be non-decreasing multiples of dt."""
    steps = []
    for t in times:
        k = round(t / dt)
        if not t >= 0 or abs(k * dt - t) > 1e-9 * max(1.0, abs(t)):
            raise ConfigError(f"recorded times must be non-negative multiples of dt = {dt}, got {t}")
        if steps and k < steps[-1]:
            raise ConfigError(f"recorded times must be non-decreasing, got {list(times)}")
        steps.append(k)
    return steps


def simulate(omega0: torch.Tensor, preset: NSPreset, times: Sequence[float] | None = None, *,
             dt: float | None = None, size: int | None = None,
             on_frame: Callable[[int], None] | None = None) -> torch.Tensor:
    """Solve (1) from omega0 [B, N, N] and record omega at `times` (default `preset.times`) ->
    [B, T, N, N] on omega0's device and dtype; with `size`, each frame is `downsample`d to
    [size, size] as it is recorded. dt defaults to `preset.dt`; each recorded time must be a
    multiple of dt. `on_frame(i)` is called after frame i is recorded."""
    n = _grid_side(omega0)
    dt = _check_dt(preset.dt if dt is None else dt)
    record = (lambda omega: omega) if size is None else (lambda omega: downsample(omega, size))
    times = preset.times if times is None else tuple(times)
    step = _stepper(_operators(preset, n, omega0.device, omega0.dtype), dt, preset.scheme)
    omega_hat, done, frames = _rfft2(omega0.double()), 0, []  # the state is float64: see the module's "Precision"
    for i, k in enumerate(_steps_at(times, dt)):
        for _ in range(k - done):
            omega_hat = step(omega_hat)
        done = k
        frames.append(record(_irfft2(omega_hat, n).to(omega0.dtype)))
        if on_frame is not None:
            on_frame(i)
    return torch.stack(frames, dim=-3)  # [..., T, N, N]


# ----------------------------------------------------------------------------------------------
# Data generation


def generate(preset: NSPreset, n_trajectories: int, *, seed: int = 0, start: int = 0,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 8,
             progress: bool = True) -> torch.Tensor:
    """Vorticity frames [n, T, size, size] (on the CPU, `dtype`) of trajectories start..start+n-1.

    Trajectory i starts from `initial_vorticity(preset, [i], seed=seed)` at `preset.resolution`, is
    solved `batch_size` at a time on `device`, and its frames at `preset.times` are downsampled
    spectrally to `preset.size`. Velocities follow with `fields(frames, ("u", "v"), preset.length)`
    (exactly: downsampling commutes with `velocity`). The progress bar counts frames of all
    trajectories. Use different `start` (or `seed`) for train and test trajectories.

    Cost on one CPU core at 64^2 in float32, per trajectory-step: "euler" 0.06-0.08 ms in batches
    of 8 (0.12 ms alone, 0.14 ms in batches of 32, which fall out of cache), "rk4" 0.4 ms. So the
    full `fno` protocol (500000 steps) is about 35 s per trajectory on a core; on a GPU use batches
    of hundreds.
    """
    if not isinstance(n_trajectories, int) or n_trajectories < 1:
        raise ConfigError(f"the number of trajectories must be a positive integer, got {n_trajectories!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"the batch size must be a positive integer, got {batch_size!r}")
    if dtype not in _COMPLEX:
        raise ConfigError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    out = torch.empty(n_trajectories, preset.n_frames, preset.size, preset.size, dtype=dtype)
    bar = tqdm(total=n_trajectories * preset.n_frames, unit="frame", desc=f"navier-stokes {preset.name}",
               disable=not progress)
    for lo in range(0, n_trajectories, batch_size):
        indices = range(start + lo, start + min(lo + batch_size, n_trajectories))
        omega0 = initial_vorticity(preset, indices, seed=seed, device=device, dtype=dtype)
        size = None if preset.size == preset.resolution else preset.size
        frames = simulate(omega0, preset, size=size, on_frame=lambda _: bar.update(len(indices)))  # [B, T, S, S]
        out[lo:lo + len(indices)] = frames.cpu()
    bar.close()
    return out


def kinetic_energy(omega: torch.Tensor, length: float = 1.0) -> torch.Tensor:
    """E = 1/2 <|u|^2>, the mean over the box: [..., N, N] -> [...]."""
    u, v = velocity(omega, length)
    return 0.5 * (u**2 + v**2).mean(dim=(-2, -1))


def enstrophy(omega: torch.Tensor) -> torch.Tensor:
    """Z = 1/2 <omega^2>: [..., N, N] -> [...]. Unforced, undamped, dE/dt = -2 nu Z."""
    return 0.5 * (omega**2).mean(dim=(-2, -1))


__all__ = ["CHANNELS", "PRESETS", "SCHEMES", "NSPreset", "Spectral", "advance", "check_resolution", "downsample",
           "enstrophy", "fields", "fno_forcing", "generate", "get_preset", "grf", "initial_vorticity",
           "kinetic_energy", "kolmogorov_forcing", "simulate", "spectral", "velocity"]
