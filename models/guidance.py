"""Steering a sampler at sampling time: objective guidance on the x0 estimate and prior reweighting.

Both change the noise estimate that every sampler reads from `denoise(x_t, t) -> (eps_hat, x0_hat)`, and
x0_hat is re-derived from it, so DDPM, DDIM and DPM-Solver++ take them alike (Wei et al. 2024, DiffPhyCon):

- Guidance (their Eq. 7): eps~ = eps_hat + lambda_t grad_{x_t} J(x0_hat(x_t)), the gradient taken through the
  network; `J(x0_hat, cond) -> [B]` is to be made small. x0_hat is the network's own estimate in model space
  (before the known entries are written back), and `cond` holds the network's condition keys
  (models/cond.py) and "x_known", "known": the given entries and their mask (None where there are none). lambda_t follows a schedule over the steps:
  `constant`; `rising`, lambda (1 - t / (T - 1)), from 0 at the noisy end to lambda at the clean end; or
  `beta`, lambda beta_t / max(beta), which follows the noise schedule.
- Prior reweighting (their Eq. 9): sampling p_gamma(u, w | c) ~ p(w | c)^(gamma - 1) p(u, w | c) adds
  (gamma - 1) eps_prior to the noise estimate of the control channels w, with eps_prior from a second model
  trained on those channels alone. gamma = 1 is the joint model itself ("lite"), and samples it bit for bit;
  gamma < 1 flattens the prior over controls, so that guidance may leave the training distribution.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

SCALE_SCHEDULES = ("constant", "rising", "beta")

Objective = Callable[[torch.Tensor, dict | None], torch.Tensor]  # (x0_hat [B, ...], cond) -> J [B]


@dataclass(frozen=True)
class Guidance:
    """Objective guidance: `objective(x0_hat, cond) -> [B]`, its scale lambda and the schedule of the scale."""

    objective: Objective
    scale: float
    schedule: str = "constant"

    def __post_init__(self):
        if self.schedule not in SCALE_SCHEDULES:
            raise ValueError(f"guidance schedule {self.schedule!r} is not one of {', '.join(SCALE_SCHEDULES)}")

    def scale_at(self, t: int, betas: torch.Tensor) -> float:
        """lambda_t at network timestep t, for the float64 schedule `betas` [T]."""
        if self.schedule == "constant":
            return self.scale
        if self.schedule == "rising":
            return self.scale * (1 - t / max(1, len(betas) - 1))
        return self.scale * float(betas[t] / betas.max())


@dataclass(frozen=True)
class Prior:
    """Prior reweighting: `diffusion`, a GaussianDiffusion trained on the channels `channels` of the joint
    model's data alone, and the exponent `gamma`. Its network is called on those channels of x_t, with the
    given `cond` (None: unconditional)."""

    diffusion: torch.nn.Module
    channels: tuple[int, ...]
    gamma: float
    cond: dict | None = None
    model: torch.nn.Module | None = None  # the network to call (default: the diffusion's own, e.g. its EMA)


def load_objective(path: str) -> Objective:
    """The objective named by a dotted path, `package.module:function` or `package.module.function`.
    Raises ValueError naming the path and what went wrong."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"objective {path!r} is not a dotted path such as mypackage.objectives:final_state")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's path or module
        raise ValueError(f"objective {path!r}: module {module_name!r} could not be imported "
                         f"({type(e).__name__}: {e}); check the path and that the module is on PYTHONPATH") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"objective {path!r}: {module_name} has no function {attr!r}")
    return fn


def check_prior(joint, prior: Prior) -> None:
    """Raise ValueError unless `prior` models channels of the joint model's data under the same schedule."""
    n = joint.channels
    channels = tuple(prior.channels)
    if not channels or any(not 0 <= c < n for c in channels) or len(set(channels)) != len(channels):
        raise ValueError(f"prior channels {list(channels)} are not distinct channels of the joint model's {n}")
    if prior.diffusion.channels != len(channels):
        raise ValueError(f"the prior model generates {prior.diffusion.channels} channel(s) but is asked for the "
                         f"{len(channels)} channel(s) {list(channels)} of the joint model: train it on those alone")
    if tuple(prior.diffusion.sample_shape[1:]) != tuple(joint.sample_shape[1:]):
        raise ValueError(f"the prior model's samples are {list(prior.diffusion.sample_shape[1:])} but the joint "
                         f"model's are {list(joint.sample_shape[1:])}")
    mine, theirs = joint._schedule64["alphas_cumprod"], prior.diffusion._schedule64["alphas_cumprod"]
    if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=1e-12, atol=0):
        raise ValueError(f"the prior model was trained with another noise schedule ({len(theirs)} steps) than the "
                         f"joint model ({len(mine)} steps, the same --beta_schedule and --timesteps are needed)")
    if prior.gamma < 0:
        raise ValueError(f"prior weight gamma must be at least 0, got {prior.gamma}")


def evaluate_objective(guidance: Guidance, x0: torch.Tensor, cond: dict | None) -> torch.Tensor:
    """J(x0_hat) [B], checked: a tensor with one finite-or-not value per sample."""
    value = guidance.objective(x0, cond)
    if not isinstance(value, torch.Tensor) or value.shape != (x0.shape[0],):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"the objective {getattr(guidance.objective, '__name__', guidance.objective)} returned "
                         f"{shape}; it must return a tensor of shape [B] = [{x0.shape[0]}], one value per sample")
    return value
