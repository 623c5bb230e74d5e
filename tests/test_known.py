"""Known entries (given frames, inpainting masks): seen clean and loss-free in training, written back in
every sampler, so they come out exactly as they went in."""

import pytest
import torch
from torch import nn

from models import GaussianDiffusion
from models.sampling import SAMPLER_NAMES
from test_diffusion import TinyNet3d

SHAPE = (2, 5, 4, 4)  # C, F, H, W


class Recorder(TinyNet3d):
    """Records the x_t and x_self_cond it is called with; its output is a learnable tensor, so a test can see
    which output entries receive gradient."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.out = nn.Parameter(torch.randn(3, *SHAPE))
        self.inputs = []

    def forward(self, x, t, cond=None, x_self_cond=None):
        self.inputs.append((x.detach().clone(), None if x_self_cond is None else x_self_cond.detach().clone()))
        return self.out[: x.shape[0]] + 0 * super().forward(x, t, cond=cond, x_self_cond=x_self_cond)


def diffusion_with(net, **kwargs):
    return GaussianDiffusion(net, sample_shape=SHAPE, timesteps=30, clip_denoised=False, cond_steps=2, **kwargs)


def test_the_default_mask_is_the_first_cond_steps_frames():
    mask = diffusion_with(TinyNet3d()).known_mask(torch.zeros(3, *SHAPE))
    assert mask.shape == (1, 1, 5, 1, 1) and mask.flatten().tolist() == [True, True, False, False, False]
    assert GaussianDiffusion(TinyNet3d(), sample_shape=SHAPE, timesteps=30).known_mask(torch.zeros(1, *SHAPE)) is None


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
def test_given_frames_are_seen_clean_and_get_no_gradient_in_training(objective):
    torch.manual_seed(0)
    net = Recorder()
    diffusion = diffusion_with(net, objective=objective)
    x0 = torch.randn(3, *SHAPE)
    loss = diffusion(x0, generator=torch.Generator().manual_seed(1))
    loss.backward()
    x_t, _ = net.inputs[-1]
    assert torch.equal(x_t[:, :, :2], x0[:, :, :2])  # the network sees the given frames clean
    assert not torch.allclose(x_t[:, :, 2:], x0[:, :, 2:])  # and the others noised
    grad = net.out.grad
    assert bool((grad[:, :, :2] == 0).all()) and bool((grad[:, :, 2:] != 0).all())


def test_the_loss_is_the_mean_over_the_generated_entries():
    torch.manual_seed(0)
    net = Recorder()
    diffusion = diffusion_with(net, objective="pred_x0")
    x0, t, noise = torch.randn(3, *SHAPE), torch.tensor([0, 10, 29]), torch.randn(3, *SHAPE)
    loss = diffusion.p_losses(x0, t, noise, known=diffusion.known_mask(x0))
    expected = ((net.out - x0) ** 2)[:, :, 2:].mean()  # pred_x0 without min-SNR: every weight is 1
    torch.testing.assert_close(loss, expected)


def test_a_custom_mask_overrides_the_frames():
    torch.manual_seed(0)
    net = Recorder()
    diffusion = diffusion_with(net)
    x0 = torch.randn(3, *SHAPE)
    pixels = torch.zeros(1, 1, 1, 4, 4, dtype=torch.bool)
    pixels[..., 0, :] = True  # the first row of every frame is observed
    diffusion(x0, known=pixels, generator=torch.Generator().manual_seed(0)).backward()
    x_t, _ = net.inputs[-1]
    assert torch.equal(x_t[..., 0, :], x0[..., 0, :]) and not torch.allclose(x_t[:, :, :2, 1:], x0[:, :, :2, 1:])
    assert bool((net.out.grad[..., 0, :] == 0).all()) and bool((net.out.grad[..., 1:, :] != 0).all())


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
@pytest.mark.parametrize("self_condition", [False, True])
def test_given_frames_come_out_of_every_sampler_exactly_as_they_went_in(sampler, self_condition):
    torch.manual_seed(0)
    net = Recorder(self_condition=self_condition)
    diffusion = diffusion_with(net)
    x_known = torch.randn(3, *SHAPE)
    seen = []
    out = diffusion.sample(3, x_known=x_known, sampler=sampler, sampling_timesteps=6,
                           generator=torch.Generator().manual_seed(0), after_step=lambda x, i: seen.append(i) or x)
    assert torch.equal(out[:, :, :2], x_known[:, :, :2])
    assert not torch.allclose(out[:, :, 2:], x_known[:, :, 2:])
    assert seen == list(range(6))  # the caller's hook still runs, after the write-back
    for x_t, x_self in net.inputs:  # every network call saw the given frames clean, self-conditioning too
        assert torch.equal(x_t[:, :, :2], x_known[:, :, :2])
        assert x_self is None or torch.equal(x_self[:, :, :2], x_known[:, :, :2])


def test_known_entries_need_a_mask_and_the_samples_shape():
    plain = GaussianDiffusion(TinyNet3d(), sample_shape=SHAPE, timesteps=30)
    with pytest.raises(ValueError, match="no mask of known entries"):
        plain.sample(1, x_known=torch.zeros(1, *SHAPE))
    with pytest.raises(ValueError, match="x_known must have the samples' shape"):
        diffusion_with(TinyNet3d()).sample(2, x_known=torch.zeros(1, *SHAPE))
    with pytest.raises(ValueError, match="more than cond_steps frames"):
        GaussianDiffusion(TinyNet3d(), sample_shape=SHAPE, timesteps=30, cond_steps=5)
