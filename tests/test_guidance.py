"""Objective guidance and prior reweighting (models/guidance.py) against closed forms, and their errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models import GaussianDiffusion, Unet
from models import sampling
from models.guidance import Guidance, Prior, load_objective
from models.sampling import time_grid

pytestmark = pytest.mark.usefixtures("one_thread")


class ExactGaussian(nn.Module):
    """The exact noise prediction for data ~ N(0, I): E[eps | x_t] = sqrt(1 - a_t) x_t."""

    def __init__(self, channels, alphas_cumprod):
        super().__init__()
        self.channels, self.self_condition = channels, False
        self.register_buffer("a", alphas_cumprod.float())
        self.calls = 0

    def forward(self, x, t, *, cond=None, x_self_cond=None):
        self.calls += 1
        return (1 - self.a[t]).sqrt().view(-1, *(1,) * (x.ndim - 1)) * x


def gaussian_diffusion(channels=2, size=4, timesteps=100):
    probe = GaussianDiffusion(ExactGaussian(channels, torch.ones(timesteps)), sample_shape=(channels, size, size),
                              timesteps=timesteps, objective="pred_noise", beta_schedule="linear")
    net = ExactGaussian(channels, probe._schedule64["alphas_cumprod"])
    return GaussianDiffusion(net, sample_shape=(channels, size, size), timesteps=timesteps, objective="pred_noise",
                             beta_schedule="linear", clip_denoised=False)


def linear_objective(weights):
    """J(x0) = -<w, x0> per sample: guidance pushes x0 along w."""
    return lambda x0, cond: -(x0 * weights).flatten(1).sum(1)


@pytest.mark.parametrize("schedule", ["constant", "rising"])
def test_ddim_guided_by_a_linear_objective_on_a_gaussian_lands_where_the_closed_form_says(schedule):
    diffusion = gaussian_diffusion()
    w = torch.zeros(1, 2, 4, 4)
    w[:, 0] = 1.0  # push channel 0 up, leave channel 1 alone
    guidance = Guidance(linear_objective(w), scale=0.3, schedule=schedule)
    steps = 10
    x_T = torch.randn((6, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    out = diffusion.sample(6, sampler="ddim", sampling_timesteps=steps, generator=torch.Generator().manual_seed(0),
                           guidance=guidance)

    # eps~ = sqrt(1-a_t) x - lam_t w sqrt(a_t), x0~ = sqrt(a_t) x + lam_t w sqrt(1-a_t): DDIM is affine in x.
    grid = time_grid(diffusion._schedule64["alphas_cumprod"], steps)
    a = grid.alpha_bar.tolist()
    A, B = 1.0, 0.0  # x = A x_T + B w
    for i, t in enumerate(grid.steps):
        lam = guidance.scale_at(t, diffusion._schedule64["betas"])
        a_t, a_s = a[i], a[i + 1]
        gain = math.sqrt(a_s * a_t) + math.sqrt((1 - a_s) * (1 - a_t))
        push = lam * (math.sqrt(a_s * (1 - a_t)) - math.sqrt((1 - a_s) * a_t))
        A, B = gain * A, gain * B + push
    torch.testing.assert_close(out, A * x_T + B * w, rtol=1e-5, atol=1e-5)
    assert B > 0.05  # the push is real: channel 0 moved up, channel 1 did not move


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_every_sampler_moves_samples_down_the_objective(sampler):
    diffusion = gaussian_diffusion()
    w = torch.ones(1, 2, 4, 4)
    J = linear_objective(w)
    plain = diffusion.sample(64, sampler=sampler, sampling_timesteps=20, generator=torch.Generator().manual_seed(1))
    steered = diffusion.sample(64, sampler=sampler, sampling_timesteps=20, generator=torch.Generator().manual_seed(1),
                               guidance=Guidance(J, scale=0.5))
    assert J(steered, None).mean() < J(plain, None).mean() - 0.5 * 32  # every entry moved up by > 0.5 on average


def tiny_joint(timesteps=50, **kw):
    torch.manual_seed(0)
    net = Unet(dim=8, dim_mults=(1, 2), channels=2, attn_heads=1, attn_dim_head=8, **kw)
    return GaussianDiffusion(net, sample_shape=(2, 8, 8), timesteps=timesteps, clip_denoised=False)


def tiny_prior(timesteps=50, channels=1, beta_schedule="sigmoid"):
    net = Unet(dim=8, dim_mults=(1, 2), channels=channels, attn_heads=1, attn_dim_head=8)
    return GaussianDiffusion(net, sample_shape=(channels, 8, 8), timesteps=timesteps, clip_denoised=False,
                             beta_schedule=beta_schedule)


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m"])
def test_gamma_one_is_the_joint_model_bit_for_bit(sampler):
    joint, prior = tiny_joint(self_condition=True), tiny_prior()
    kw = dict(sampler=sampler, sampling_timesteps=6)
    plain = joint.sample(3, generator=torch.Generator().manual_seed(2), **kw)
    lite = joint.sample(3, generator=torch.Generator().manual_seed(2), prior=Prior(prior, (1,), gamma=1.0), **kw)
    assert torch.equal(plain, lite)


def test_prior_reweighting_adds_gamma_minus_one_times_the_prior_noise_on_its_channels():
    joint, prior = tiny_joint(), tiny_prior()
    x = torch.randn(3, 2, 8, 8)
    eps, _ = joint.denoiser()(x, 30)
    eps_prior, _ = prior.denoiser()(x[:, [1]], 30)
    steered, x0 = joint.denoiser(prior=Prior(prior, (1,), gamma=0.4))(x, 30)
    assert torch.equal(steered[:, 0], eps[:, 0])
    torch.testing.assert_close(steered[:, 1:], eps[:, 1:] - 0.6 * eps_prior)
    torch.testing.assert_close(x0, joint.predict_start_from_noise(x, torch.full((3,), 30), steered))


def test_guidance_gradient_flows_through_the_network_and_known_entries_stay_given():
    joint = tiny_joint()
    x_known = torch.randn(2, 2, 8, 8)
    known = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    known[:, 0, 0] = True
    out = joint.sample(2, x_known=x_known, known=known, sampling_timesteps=5, generator=torch.Generator().manual_seed(0),
                       guidance=Guidance(lambda x0, c: x0.square().flatten(1).mean(1), scale=1.0, schedule="beta"))
    assert torch.equal(out[:, 0, 0], x_known[:, 0, 0]) and torch.isfinite(out).all()


def test_an_objective_that_is_not_importable_or_returns_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="module 'no_such_module' could not be imported"):
        load_objective("no_such_module:J")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_objective("math:nope")
    with pytest.raises(ValueError, match="not a dotted path"):
        load_objective("J")
    assert load_objective("math.sqrt") is math.sqrt and load_objective("math:sqrt") is math.sqrt
    joint = tiny_joint()
    with pytest.raises(ValueError, match=r"returned \(\); it must return a tensor of shape \[B\] = \[2\]"):
        joint.sample(2, sampling_timesteps=3, guidance=Guidance(lambda x0, c: x0.sum(), scale=1.0))


def test_a_prior_of_other_channels_or_another_schedule_is_refused():
    joint = tiny_joint()
    with pytest.raises(ValueError, match="generates 2 channel"):
        joint.sample(1, sampling_timesteps=2, prior=Prior(tiny_prior(channels=2), (1,), gamma=0.5))
    with pytest.raises(ValueError, match="not distinct channels"):
        joint.sample(1, sampling_timesteps=2, prior=Prior(tiny_prior(), (2,), gamma=0.5))
    with pytest.raises(ValueError, match="another noise schedule"):
        joint.sample(1, sampling_timesteps=2, prior=Prior(tiny_prior(beta_schedule="cosine"), (1,), gamma=0.5))
    with pytest.raises(ValueError, match="another noise schedule"):
        joint.sample(1, sampling_timesteps=2, prior=Prior(tiny_prior(timesteps=60), (1,), gamma=0.5))
    with pytest.raises(ValueError, match="schedule 'late' is not one of"):
        Guidance(lambda x0, c: x0.sum(), scale=1.0, schedule="late")


def test_guidance_asked_of_a_sampler_that_reads_no_noise_estimate_is_refused(monkeypatch):
    def oracle(denoise, x, grid, **kw):  # returns its input: never asks the network
        return x

    monkeypatch.setitem(sampling.SAMPLERS, "oracle", oracle)
    with pytest.raises(ValueError, match="sampler 'oracle' reads no noise estimate"):
        tiny_joint().sample(1, sampler="oracle", sampling_timesteps=2,
                            guidance=Guidance(lambda x0, c: x0.flatten(1).sum(1), scale=1.0))
