"""The condition a denoising network receives: one dict, whose keys are documented here alone.

Every network in `models` is called as `net(x, t, *, cond=None, x_self_cond=None)`, with `x` the noisy
sample `[B, C, *spatial]`, `t` the timesteps `[B]` and `cond` None or a dict of these entries:

    fields   [B, Cf, *spatial]  static fields beside the generated channels (a boundary mask, offsets,
                                a forcing or control broadcast over the grid): read, never noised,
                                never generated. The network's `cond_channels` is Cf.
    params   [B, P]             a vector of physical parameters (viscosity, Reynolds number, a control
                                value), embedded and added to the time embedding. The network's
                                `cond_dim` is P.

A batch from a dataset is a dict too: `x` plus any of these keys, which the Trainer passes on as
`cond`. Entries that are given rather than generated inside `x` itself (the first frames of a
forecast, an inpainting mask) are not conditions: the diffusion replaces them in `x` (models/diffusion.py).
"""

from __future__ import annotations

import torch

FIELDS, PARAMS = "fields", "params"
COND_KEYS = (FIELDS, PARAMS)


def cond_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The condition entries of a batch, or None when it has none."""
    cond = {k: batch[k] for k in COND_KEYS if k in batch}
    return cond or None


def check_cond(cond: dict[str, torch.Tensor] | None, x: torch.Tensor, *, cond_channels: int, cond_dim: int,
               network: str) -> None:
    """Raise ValueError unless `cond` holds exactly what a network built with `cond_channels` and `cond_dim`
    reads, shaped to go with `x`."""
    cond = cond or {}
    unknown = sorted(set(cond) - set(COND_KEYS))
    if unknown:
        raise ValueError(f"{network} got cond keys {unknown}; the keys are {', '.join(COND_KEYS)} (models/cond.py)")
    expected = {FIELDS: (cond_channels, (x.shape[0], cond_channels, *x.shape[2:]), "cond_channels"),
                PARAMS: (cond_dim, (x.shape[0], cond_dim), "cond_dim")}
    for key, (size, shape, arg) in expected.items():
        given = cond.get(key)
        if size == 0 and given is not None:
            raise ValueError(f"{network} got cond[{key!r}] but was built with {arg}=0")
        if size > 0 and (given is None or tuple(given.shape) != shape):
            got = None if given is None else tuple(given.shape)
            raise ValueError(f"{network} was built with {arg}={size}: pass cond[{key!r}] of shape "
                             f"[{', '.join(map(str, shape))}], got {got}")
