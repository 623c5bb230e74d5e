"""How far Eddy's 64x64 `fno` trajectories are from Li et al.'s 256x256-then-downsampled ones.

A benchmark, not a test: it prints numbers and asserts nothing.

1. Step time: one `fno` trajectory-step at 64x64 in float32 on the CPU ("euler", and "rk4" for
   comparison), in batches of 1, 8 and 32, median of a few repeats.
2. Convergence: --trajectories initial fields drawn at the finest resolution (256) and spectrally
   truncated to each coarser one, solved with the `fno` preset (nu = --viscosity, "euler",
   dt = --dt on every grid) to t = --t_end, frames at t = 1, 2, ...; each solution is downsampled
   spectrally to 64x64 and compared with the finest one: relative L2 difference per recorded time,
   ||w_N - w_256|| / ||w_256|| over all trajectories. Extra rows on the coarsest grid only: a
   larger dt (--coarse_dt, "euler" and "rk4"; Li et al.'s stepper is stable there while
   dt < 2 nu / max|u|^2, about 0.01 here), and float64 against float32 (the round-off floor).

    python benchmarks/ns_convergence.py                      # about 8 minutes on one busy CPU core
    python benchmarks/ns_convergence.py --t_end 1 --trajectories 1 --resolutions 64 128   # seconds

Measured (defaults: 2 trajectories, float32 FFTs on the float64 state; the 256 run took 380 s):

| grid, dt, scheme | t=1 | t=2 | t=3 | t=4 | t=5 |
|---|---|---|---|---|---|
| 64, dt 0.0001, euler | 1.67e-07 | 1.79e-07 | 1.99e-07 | 1.98e-07 | 1.85e-07 |
| 128, dt 0.0001, euler | 1.49e-07 | 1.49e-07 | 1.50e-07 | 1.48e-07 | 1.28e-07 |
| 64, dt 0.001, euler | 2.74e-05 | 2.81e-05 | 2.55e-05 | 2.30e-05 | 2.14e-05 |
| 64, dt 0.001, rk4 | 3.06e-06 | 3.13e-06 | 2.84e-06 | 2.58e-06 | 2.38e-06 |
| 64: float64 vs float32 | 1.75e-07 | 1.87e-07 | 1.82e-07 | 1.94e-07 | 1.80e-07 |

so in float32 the grids agree to float32 rounding. In float64 (`--dtype float64 --t_end 2
--trajectories 1 --coarse_dt`): 64 vs 256 4.3e-10 at t=1, 8.2e-11 at t=2; 128 vs 256 1.2e-12,
2.9e-13. Li et al.'s nu = 1e-3 flow is resolved at 64^2 to far below their reported errors (FNO-3D
0.0086); the first-order time error of dt = 1e-3 (2.7e-5) is also far below them.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from trainer.data import navier_stokes as ns

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def time_step(preset: ns.NSPreset, batch: int, dtype: torch.dtype, steps: int = 50, repeats: int = 5) -> float:
    """Median seconds per trajectory-step of `preset` at its resolution."""
    omega = ns.initial_vorticity(preset, range(batch), dtype=dtype)
    ns.simulate(omega, preset, (5 * preset.dt,))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ns.simulate(omega, preset, (steps * preset.dt,))
        times.append((time.perf_counter() - start) / (steps * batch))
    return statistics.median(times)


def relative_l2(frames: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Per recorded time: [B, T, N, N] pairs -> T numbers."""
    diff = torch.linalg.vector_norm(frames.double() - reference.double(), dim=(0, 2, 3))
    return (diff / torch.linalg.vector_norm(reference.double(), dim=(0, 2, 3))).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t_end", type=int, default=5, help="last recorded time (frames at 1, 2, ..., t_end)")
    parser.add_argument("--trajectories", type=int, default=2)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 256],
                        help="grids to solve on; the last is the reference, the first the frame size")
    parser.add_argument("--viscosity", type=float, default=1e-3)
    parser.add_argument("--dt", type=float, default=1e-4, help="time step on every grid (Li et al.: 1e-4)")
    parser.add_argument("--coarse_dt", type=float, nargs="*", default=[1e-3],
                        help="extra rows: larger time steps on the coarsest grid")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_timing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    preset = ns.get_preset("fno", viscosity=args.viscosity, dt=args.dt)

    # Step time.
    if not args.skip_timing:
        print(f"CPU time per trajectory-step, fno at 64x64, float32, {args.threads} thread(s):")
        for scheme in ns.SCHEMES:
            for batch in (1, 8, 32):
                seconds = time_step(dataclasses.replace(preset, scheme=scheme), batch, torch.float32)
                print(f"  {scheme:5s} batch {batch:2d}: {seconds * 1e3:.3f} ms")

    # Convergence.
    size, fine = args.resolutions[0], args.resolutions[-1]
    times = tuple(float(t) for t in range(1, args.t_end + 1))
    omega_fine = ns.initial_vorticity(preset, range(args.trajectories), seed=args.seed, resolution=fine,
                                      dtype=torch.float64)

    def run(n: int, dt: float, scheme: str = "euler", run_dtype: torch.dtype = dtype) -> torch.Tensor:
        omega0 = (omega_fine if n == fine else ns.downsample(omega_fine, n)).to(run_dtype)
        start = time.perf_counter()
        frames = ns.simulate(omega0, dataclasses.replace(preset, scheme=scheme), times, dt=dt)
        print(f"  solved {n}x{n}, dt {dt:g}, {scheme}, {str(run_dtype).removeprefix('torch.')}: "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        return ns.downsample(frames, size)

    print(f"\nsolving {args.trajectories} trajectories to t = {args.t_end} (nu = {args.viscosity:g})")
    reference = run(fine, args.dt)
    rows = {f"{n}, dt {args.dt:g}, euler": run(n, args.dt) for n in args.resolutions[:-1]}
    for dt in args.coarse_dt:
        for scheme in ns.SCHEMES:
            rows[f"{size}, dt {dt:g}, {scheme}"] = run(size, dt, scheme)
    coarse = rows.get(f"{size}, dt {args.dt:g}, euler")
    other_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    if coarse is not None:
        roundoff = relative_l2(run(size, args.dt, run_dtype=other_dtype), coarse)

    print(f"\nrelative L2 difference to {fine}x{fine} (dt {args.dt:g}, euler), all downsampled to {size}x{size}\n")
    print("| grid, dt, scheme | " + " | ".join(f"t={t:g}" for t in times) + " |")
    print("|---|" + "---|" * len(times))
    for name, frames in rows.items():
        print(f"| {name} | " + " | ".join(f"{e:.2e}" for e in relative_l2(frames, reference)) + " |")
    if coarse is not None:
        print(f"| {size}: {str(other_dtype).removeprefix('torch.')} vs {args.dtype} | "
              + " | ".join(f"{e:.2e}" for e in roundoff) + " |")


if __name__ == "__main__":
    main()
