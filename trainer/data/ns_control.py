"""Built-in fluid control data: Kolmogorov flow whose forcing amplitude is the control, one value per interval.

The flow is the `kolmogorov` preset of trainer/data/navier_stokes.py (box [0, 2 pi)^2, vorticity forcing
-4 cos(4y), drag 0.1, nu = 1e-3, RK4 with dt = 0.01) on a 32^2 grid. Each trajectory starts from a GRF
vorticity, is spun up with the forcing at amplitude 1 for SPIN_UP time units, and then runs CONTROL_STEPS
intervals of INTERVAL time units with the forcing scaled by the control a_k, k = 0..K-1; a_k ~ U(-1.5, 1.5)
independently (a negative amplitude pushes against the forced mode). The K + 1 recorded frames are the
vorticity at the start of each interval and at the end.

The control problem: from a given initial state, reach low kinetic energy at the final frame at a small
control cost, J = E(T) + w mean(a^2), E = 1/2 <|u|^2> over the box. Graded by re-simulating the generated
amplitudes from the true initial state with the same solver.

Layout of a sample x [2, K + 1, S, S] (a clip for the Unet3D): channel 0 the vorticity frames, channel 1
the control broadcast over the grid, frame k holding a_k and frame K (which no control follows) 0. Each
channel is standardized with the training statistics. Known entries: the initial vorticity frame and the
control channel's last frame.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.data.base import ClipData, normalize_index
from trainer.data.fluid import Normalization, cache_root
from trainer.errors import ConfigError

SIZE = 32
CONTROL_STEPS = 8
INTERVAL = 0.5
SPIN_UP = 5.0
AMPLITUDE = 1.5  # controls ~ U(-AMPLITUDE, AMPLITUDE)
COUNTS = (128, 16)  # (train, test) trajectories by default
_VERSION = 1


def preset():
    from trainer.data import navier_stokes as ns

    return ns.get_preset("kolmogorov", resolution=SIZE, size=SIZE, n_frames=CONTROL_STEPS + 1)


def simulate(omega0: torch.Tensor, amplitudes: torch.Tensor, *, spin_up: float = 0.0) -> torch.Tensor:
    """Vorticity frames [B, K + 1, S, S] from omega0 [B, S, S] under the forcing amplitudes [B, K] (one per
    INTERVAL), after `spin_up` time units at amplitude 1; float64 state, as the solver keeps it."""
    from trainer.data import navier_stokes as ns

    p = preset()
    base = ns._operators(p, omega0.shape[-1], omega0.device, omega0.dtype)
    steps = round(INTERVAL / p.dt)

    def run(omega_hat, amplitude, n):
        ops = dataclasses.replace(base, forcing_hat=base.forcing_hat * amplitude.to(torch.complex128)[:, None, None])
        step = ns._stepper(ops, p.dt, p.scheme)
        for _ in range(n):
            omega_hat = step(omega_hat)
        return omega_hat

    omega_hat = ns._rfft2(omega0.double())
    if spin_up:
        omega_hat = run(omega_hat, torch.ones(len(omega0), dtype=torch.float64, device=omega0.device),
                        round(spin_up / p.dt))
    frames = [ns._irfft2(omega_hat, omega0.shape[-1])]
    for k in range(amplitudes.shape[1]):
        omega_hat = run(omega_hat, amplitudes[:, k].double(), steps)
        frames.append(ns._irfft2(omega_hat, omega0.shape[-1]))
    return torch.stack(frames, 1)


def kinetic_energy(omega: torch.Tensor) -> torch.Tensor:
    """E = 1/2 <|u|^2> of vorticity [..., S, S] in this box; differentiable."""
    from trainer.data import navier_stokes as ns

    return ns.kinetic_energy(omega, preset().length)


def generate(num: int, *, seed: int, start: int, progress: bool = True, batch_size: int = 64):
    """(vorticity [num, K + 1, S, S], amplitudes [num, K]) float32, of trajectories start..start+num-1."""
    from trainer.data import navier_stokes as ns

    omegas, amps = [], []
    bar = tqdm(total=num, desc="fluid control data", unit="trajectory", disable=not progress)
    for lo in range(start, start + num, batch_size):
        idx = range(lo, min(lo + batch_size, start + num))
        omega0 = ns.initial_vorticity(preset(), idx, seed=seed, dtype=torch.float64)
        g = torch.Generator().manual_seed(seed * 1_000_003 + lo)
        a = (torch.rand(len(idx), CONTROL_STEPS, generator=g, dtype=torch.float64) * 2 - 1) * AMPLITUDE
        a = a.float().double()  # what is stored is what was simulated
        omegas.append(simulate(omega0, a, spin_up=SPIN_UP).float())
        amps.append(a.float())
        bar.update(len(idx))
    bar.close()
    return torch.cat(omegas), torch.cat(amps)


def pack(omega: torch.Tensor, a: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """Vorticity [..., K + 1, S, S] and amplitudes [..., K] -> x [..., 2, K + 1, S, S] in model space."""
    (m0, m1), (s0, s1) = norm.mean, norm.std
    control = torch.zeros_like(omega)
    control[..., :-1, :, :] = ((a - m1) / s1)[..., None, None]
    control[..., -1, :, :] = 0.0
    return torch.stack([(omega - m0) / s0, control], -4)


def unpack(x: torch.Tensor, norm: Normalization) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., 2, K + 1, S, S] -> (vorticity [..., K + 1, S, S], amplitudes [..., K]): the control frame's
    mean over the grid, in physical units."""
    (m0, m1), (s0, s1) = norm.mean, norm.std
    return x[..., 0, :, :, :] * s0 + m0, x[..., 1, :-1, :, :].mean((-2, -1)) * s1 + m1


def known_mask() -> torch.Tensor:
    """[2, K + 1, S, S] bool: the initial vorticity frame and the control's last (padding) frame."""
    known = torch.zeros(2, CONTROL_STEPS + 1, SIZE, SIZE, dtype=torch.bool)
    known[0, 0] = True
    known[1, -1] = True
    return known


def score(omega0: torch.Tensor, a: torch.Tensor, energy_weight: float) -> dict[str, torch.Tensor]:
    """Re-simulate amplitudes a [B, K] from omega0 [B, S, S]: per problem the final energy, the control cost
    mean(a^2) and J = energy + energy_weight * cost (float64, [B]); non-finite runs score inf."""
    frames = simulate(omega0.double(), a.double())
    energy = kinetic_energy(frames[:, -1]).nan_to_num(nan=torch.inf)
    cost = a.double().square().mean(-1)
    return {"energy": energy, "cost": cost, "J": energy + energy_weight * cost, "frames": frames}


class ControlledFlow(ClipData):
    """Controlled Kolmogorov trajectories as clips x [2, K + 1, S, S] (see the module doc)."""

    channels, frames, image_size, bounded = 2, CONTROL_STEPS + 1, SIZE, False

    def __init__(self, omega: torch.Tensor, a: torch.Tensor, normalization: Normalization, source: str):
        self.omega, self.a, self.normalization, self.source = omega, a, normalization, source

    def __len__(self) -> int:
        return len(self.omega)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        i = normalize_index(index, len(self))
        return {"x": pack(self.omega[i], self.a[i], self.normalization).float()}

    def unpack(self, x):
        return unpack(x, self.normalization)

    def problems(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(initial vorticity [B, S, S], the data's own amplitudes [B, K]) float64."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return self.omega[idx, 0].double(), self.a[idx].double()

    def x_known(self, omega0: torch.Tensor) -> torch.Tensor:
        omega = torch.zeros(len(omega0), CONTROL_STEPS + 1, SIZE, SIZE, dtype=omega0.dtype)
        omega[:, 0] = omega0
        mean_a = torch.full((len(omega0), CONTROL_STEPS), self.normalization.mean[1], dtype=omega0.dtype)
        return pack(omega, mean_a, self.normalization)


def controlled_flow_dataset(*, split: str, num_train: int = COUNTS[0], num_test: int = COUNTS[1], seed: int = 0,
                            progress: bool = True) -> ControlledFlow:
    """The built-in fluid control data of `split`, generated once into `$EDDY_CACHE/ns_control/<key>/`."""
    if split not in ("train", "test"):
        raise ConfigError(f"--split {split!r}: the fluid control data has the splits train and test")
    spec = {"seed": seed, "num_train": num_train, "num_test": num_test, "size": SIZE, "steps": CONTROL_STEPS,
            "interval": INTERVAL, "spin_up": SPIN_UP, "amplitude": AMPLITUDE, "version": _VERSION}
    folder = cache_root() / "ns_control" / hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    if not (folder / "stats.json").is_file():
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        splits = {"train": generate(num_train, seed=seed, start=0, progress=progress),
                  "test": generate(num_test, seed=seed, start=num_train, progress=progress)}
        for name, (omega, a) in splits.items():
            np.save(tmp / f"{name}_omega.npy", omega.numpy())
            np.save(tmp / f"{name}_a.npy", a.numpy())
        omega, a = splits["train"]
        Normalization(mean=(float(omega.double().mean()), float(a.double().mean())),
                      std=(float(omega.double().std()), float(a.double().std()))).save(tmp / "stats.json")
        (tmp / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return ControlledFlow(torch.from_numpy(np.load(folder / f"{split}_omega.npy")),
                          torch.from_numpy(np.load(folder / f"{split}_a.npy")), Normalization.load(folder / "stats.json"),
                          source=f"fluid control ({split})")
