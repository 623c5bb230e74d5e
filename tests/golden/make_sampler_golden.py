"""Golden outputs of the samplers before they moved to `models/sampling.py`.

Run against the commit before the refactor, d56b905fb06e40b7241f8eae032794fae733f071, where
`GaussianDiffusion.sample` chose ancestral DDPM at `sampling_timesteps == timesteps` and DDIM below:

    git -C /work/main worktree add /tmp/eddy-head d56b905fb06e40b7241f8eae032794fae733f071
    cd /tmp/eddy-head && PYTHONPATH=/tmp/eddy-head /work/main/.venv/bin/python \
        /work/main/tests/golden/make_sampler_golden.py /work/main/tests/golden/sampler_golden.pt
    git -C /work/main worktree remove /tmp/eddy-head

The file holds plain tensors (loadable with `weights_only=True`): for each case
`{objective}-sc{self_condition}-clip{clip_denoised}-{sampler}` the output of `sample(2, ...)` with
`torch.Generator().manual_seed(0)`, and per self-conditioning flag `net-sc{0,1}`, the network's output on
a fixed input, which tells a changed network (regenerate) from a changed sampler (a bug).
`tests/test_sampling.py` rebuilds the same networks with `golden_network` below.
"""

import sys

import torch

import models.diffusion
from models import GaussianDiffusion, Unet

T = 30
SHAPE = (1, 8, 8)
# name -> sample() keyword arguments at the old commit (steps == T meant DDPM, fewer meant DDIM).
CASES = {
    "ddpm": dict(sampling_timesteps=T),
    "ddim4": dict(sampling_timesteps=4, eta=0.0),
    "ddim10": dict(sampling_timesteps=10, eta=0.0),
    "ddim5-eta0.7": dict(sampling_timesteps=5, eta=0.7),
}
SETTINGS = [  # (objective, self_condition, clip_denoised)
    ("pred_v", False, False),
    ("pred_v", True, False),
    ("pred_v", False, True),
    ("pred_noise", False, True),  # unclipped, an untrained eps-network's x0_hat reaches ~1e3 at T-1
    ("pred_noise", True, True),
]


def golden_network(self_condition):
    """Unet with weights from torch.manual_seed(0), every parameter perturbed by 0.02 N(0, 1) (seed 1)."""
    torch.manual_seed(0)
    net = Unet(dim=8, dim_mults=(1, 2), channels=1, attn_heads=1, attn_dim_head=8, self_condition=self_condition)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return net.eval()


def network_fingerprint(net):
    """The network's output at t = [3, 17] on a fixed input (and self-conditioning input)."""
    g = torch.Generator().manual_seed(2)
    x, x_self_cond = torch.randn(2, *SHAPE, generator=g), torch.randn(2, *SHAPE, generator=g)
    with torch.no_grad():
        return net(x, torch.tensor([3, 17]), x_self_cond=x_self_cond if net.self_condition else None)


def case_name(objective, self_condition, clip, sampler):
    return f"{objective}-sc{int(self_condition)}-clip{int(clip)}-{sampler}"


def main(path):
    if not hasattr(models.diffusion, "ddpm_sample"):
        sys.exit("run this against d56b905 (see its docstring): later code has no implicit DDPM at steps == T")
    golden = {}
    for sc in (False, True):
        golden[f"net-sc{int(sc)}"] = network_fingerprint(golden_network(sc))
    for objective, sc, clip in SETTINGS:
        diffusion = GaussianDiffusion(golden_network(sc), sample_shape=SHAPE, timesteps=T, objective=objective,
                                      clip_denoised=clip)
        for sampler, kwargs in CASES.items():
            out = diffusion.sample(2, generator=torch.Generator().manual_seed(0), **kwargs)
            golden[case_name(objective, sc, clip, sampler)] = out
    torch.save(golden, path)
    print(f"wrote {len(golden)} tensors to {path}")


if __name__ == "__main__":
    main(sys.argv[1])
