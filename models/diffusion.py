"""Gaussian diffusion over `[B, C, *spatial]` tensors: schedules, objectives, loss and sampling.

Notation follows Ho et al. 2020: beta_t, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s,
x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps. Timesteps are 0-based: t in [0, T).
Data is in model space ([-1, 1] for images, standardized for physical fields); nothing here rescales it.
The samplers themselves are pure functions in `models/sampling.py`.
"""

import functools
import hashlib
import math

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from models.compiled import compiled
from models.guidance import check_prior, evaluate_objective
from models.layers import default
from models.sampling import SPACINGS, STEERABLE, default_spacing, sampler_by_name, time_grid

OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")
LOSS_TYPES = ("l1", "l2")


# Beta schedules: pure functions of the number of steps, float64 [T].


def linear_beta_schedule(timesteps):
    """Ho et al. 2020: betas linear from 1e-4 to 0.02 at T=1000, both scaled by 1000/T."""
    scale = 1000 / timesteps
    if 0.02 * scale >= 1:
        raise ValueError(
            f"the linear beta schedule needs timesteps > 20 (its last beta is 20/timesteps), got {timesteps}"
        )
    return torch.linspace(1e-4 * scale, 0.02 * scale, timesteps, dtype=torch.float64)


def _betas_from_alphas_cumprod(alphas_cumprod):
    """alpha_bar at t = 0..T (alpha_bar(0) = 1) -> betas [T], clipped to 0.999 as in Nichol & Dhariwal 2021."""
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(0, 0.999)


def cosine_beta_schedule(timesteps, s=0.008):
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2."""
    t = torch.linspace(0, 1, timesteps + 1, dtype=torch.float64)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return _betas_from_alphas_cumprod(f / f[0])


def sigmoid_beta_schedule(timesteps, start=-3, end=3, tau=1):
    """Jabri et al. 2022: alpha_bar(t) ~ (sigmoid(end/tau) - sigmoid(((end - start) t/T + start)/tau)), normalized
    to 1 at t = 0. Works better than cosine for larger images."""
    t = torch.linspace(0, 1, timesteps + 1, dtype=torch.float64)
    v_start = torch.tensor(start / tau, dtype=torch.float64).sigmoid()
    v_end = torch.tensor(end / tau, dtype=torch.float64).sigmoid()
    alphas_cumprod = (v_end - ((t * (end - start) + start) / tau).sigmoid()) / (v_end - v_start)
    return _betas_from_alphas_cumprod(alphas_cumprod / alphas_cumprod[0])


BETA_SCHEDULES = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
    "sigmoid": sigmoid_beta_schedule,
}


# Helpers.


def extract(a, t, x_shape):
    """a[t] for a schedule `a` [T] and timesteps t [B], shaped [B, 1, ..., 1] to broadcast over x_shape."""
    out = a.gather(-1, t)
    return rearrange(out, "b -> b" + " 1" * (len(x_shape) - 1))


def randn(shape, *, generator, device, dtype=torch.float32):
    """Standard normal draw from `generator` when given, else from the global RNG."""
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


class GaussianDiffusion(nn.Module):
    """Wraps a denoising network; `forward(x0)` returns the training loss, `sample(n)` generates.

    Args:
        model: network called as `model(x_t, t, cond=cond, x_self_cond=...)`, with attributes
            `channels` and `self_condition`.
        sample_shape: shape of one sample, `(C, *spatial)`.
        timesteps: number of diffusion steps T.
        sampling_timesteps: default steps for `sample()` (default T).
        sampler: default sampler of `sample()`, one of `models.sampling.SAMPLER_NAMES`.
        sampling_spacing: default spacing of the sampling steps: "uniform" in t, "logsnr", or "auto" (log-SNR
            for DPM-Solver++, uniform for the others).
        objective: what the network predicts: "pred_noise" (eps), "pred_x0" or "pred_v"
            (v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0, Salimans & Ho 2022).
        beta_schedule: "linear", "cosine" or "sigmoid".
        schedule_kwargs: extra keyword arguments of the schedule function (e.g. `s`, `start`, `tau`).
        loss_type: "l1" or "l2" on the objective's target.
        min_snr_loss_weight: weight the loss by min-SNR-gamma (Hang et al. 2023).
        min_snr_gamma: gamma of min-SNR weighting.
        offset_noise_strength: add this times a per-(sample, channel) constant normal to the noise.
        ddim_eta: default eta of DDIM sampling.
        clip_denoised: clamp predicted x0 to [-1, 1] while sampling; False for unbounded fields.
        cond_steps: for clips `[B, C, F, H, W]`, the first `cond_steps` frames are given, not generated:
            the default mask of known entries (see below).
        known: a boolean mask shaped like one sample (a tensor or nested lists), the default known entries
            of every sample instead (e.g. the initial and target states of a control problem).

    Known entries. A boolean mask `known` (broadcastable to x0) marks entries that are given rather than
    generated: the first frames of a forecast, the observed pixels of an inpainting, a given initial
    state laid out along any axis. In training they replace the noisy entries of x_t (the network sees
    them clean) and carry no loss; in every sampler they start clean and are written back after each
    step, so they come out exactly as they went in. Static fields that are never generated are no
    known entries but conditions (`cond["fields"]`, models/cond.py).
    """

    def __init__(
        self,
        model,
        *,
        sample_shape,
        timesteps=1000,
        sampling_timesteps=None,
        sampler="ddim",
        sampling_spacing="auto",
        objective="pred_v",
        beta_schedule="sigmoid",
        schedule_kwargs=None,
        loss_type="l2",
        min_snr_loss_weight=False,
        min_snr_gamma=5.0,
        offset_noise_strength=0.0,
        ddim_eta=0.0,
        clip_denoised=True,
        cond_steps=0,
        known=None,
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        sampler_by_name(sampler)  # raises on an unknown name
        sample_shape = tuple(sample_shape)
        if cond_steps and (len(sample_shape) != 4 or not 0 < cond_steps < sample_shape[1]):
            raise ValueError(f"cond_steps={cond_steps} needs clips (sample_shape (C, F, H, W)) with more than "
                             f"cond_steps frames, got sample_shape {sample_shape}")
        if sample_shape[0] != model.channels:
            raise ValueError(
                f"sample_shape {sample_shape} starts with {sample_shape[0]} channels but the network has "
                f"{model.channels}"
            )

        self.model = model
        self.sample_shape = sample_shape
        self.channels = model.channels
        self.self_condition = model.self_condition
        self.objective = objective
        self.loss_type = loss_type
        self.offset_noise_strength = offset_noise_strength
        self.ddim_eta = ddim_eta
        self.sampler = sampler
        if sampling_spacing not in ("auto", *SPACINGS):
            raise ValueError(f"unknown sampling_spacing {sampling_spacing!r}; valid: auto, {', '.join(SPACINGS)}")
        self.sampling_spacing = sampling_spacing
        self.clip_denoised = clip_denoised
        self.cond_steps = cond_steps
        self._compiled_losses = None  # compile_loss()
        if known is not None:
            known = torch.as_tensor(known, dtype=torch.bool)
            if tuple(known.shape) != sample_shape or cond_steps:
                raise ValueError(f"known must be a mask shaped like one sample {list(sample_shape)} (and replaces "
                                 f"cond_steps), got {list(known.shape)} with cond_steps={cond_steps}")
            known = known[None]
        self.register_buffer("known_default", known, persistent=False)

        betas = BETA_SCHEDULES[beta_schedule](timesteps, **default(schedule_kwargs, {}))
        self.num_timesteps = len(betas)
        self.sampling_timesteps = self._check_sampling_timesteps(default(sampling_timesteps, timesteps))

        # Schedule tensors, computed in float64 and stored as float32 buffers outside the state dict.
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)  # beta~_t, eq. 7
        snr = alphas_cumprod / (1 - alphas_cumprod)
        if min_snr_loss_weight:  # Hang et al. 2023: weight min(snr, gamma) on the x0 loss, converted.
            clipped_snr = snr.clamp(max=min_snr_gamma)
            loss_weight = {
                "pred_noise": clipped_snr / snr,
                "pred_x0": clipped_snr,
                "pred_v": clipped_snr / (snr + 1),
            }[objective]
        else:
            loss_weight = torch.ones_like(snr)

        schedule = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
            "posterior_variance": posterior_variance,
            # beta~_0 = 0: its log takes beta~_1 instead (it is never used to add noise).
            "posterior_log_variance_clipped": torch.cat((posterior_variance[1:2], posterior_variance[1:])).log(),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
            "snr": snr,
            "loss_weight": loss_weight,
        }
        # The float64 originals stay on the host (not buffers): sampling grids are built from them, and
        # `keep_schedule_fp32` restores the buffers from them after a cast.
        self._schedule64 = schedule
        for name, value in schedule.items():
            self.register_buffer(name, value.float(), persistent=False)

    def keep_schedule_fp32(self):
        """Put the schedule buffers back in fp32 wherever a cast changed them. In bf16 the schedule breaks:
        alpha_bar[0:6] rounds to exactly 1.0 and DDPM samples move by up to 0.27. `module.to(dtype)`,
        `.bfloat16()` and `.half()` call this through `_apply`; a training engine that casts buffers in
        another way is followed by an explicit call (trainer/parallel/zero.py)."""
        for name, value in self._schedule64.items():
            buffer = getattr(self, name)
            if buffer.dtype != torch.float32:
                setattr(self, name, value.to(buffer.device, torch.float32))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.keep_schedule_fp32()
        return self

    def _check_sampling_timesteps(self, steps):
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"sampling_timesteps must be in [1, timesteps={self.num_timesteps}], got {steps}")
        return steps

    # Conversions between x0, eps and v at step t.

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4)."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
        )

    def predict_start_from_noise(self, x_t, t, noise):
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise
        )

    def predict_noise_from_start(self, x_t, t, x0):
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0) / extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
        )

    def predict_v(self, x0, t, noise):
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022)."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * noise
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0
        )

    def predict_start_from_v(self, x_t, t, v):
        return (
            extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
        )

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and log-variance of q(x_{t-1} | x_t, x0) (Ho et al. 2020, eq. 6-7)."""
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.shape) * x0
            + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = extract(self.posterior_variance, t, x_t.shape)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def model_predictions(self, x, t, *, model=None, cond=None, x_self_cond=None, clip_x0=False):
        """Run the network on x_t and return (eps_hat, x0_hat) in fp32, consistent with each other.

        With `clip_x0`, x0_hat is clamped to [-1, 1] and eps_hat re-derived from the clamped x0_hat.
        """
        net = default(model, self.model)
        out = net(x, t, cond=cond, x_self_cond=x_self_cond).float()
        x = x.float()
        if self.objective == "pred_noise":
            pred_noise = out
            x0 = self.predict_start_from_noise(x, t, out)
        elif self.objective == "pred_x0":
            x0 = out
        else:
            x0 = self.predict_start_from_v(x, t, out)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        if clip_x0 or self.objective != "pred_noise":
            pred_noise = self.predict_noise_from_start(x, t, x0)
        return pred_noise, x0

    # Training.

    def known_mask(self, x):
        """The default known entries of a batch shaped like `x`: the constructor's `known`, else the first
        `cond_steps` frames, or None."""
        if self.known_default is not None:
            return self.known_default
        if not self.cond_steps:
            return None
        mask = torch.zeros((1, 1, x.shape[2], *(1,) * (x.ndim - 3)), dtype=torch.bool, device=x.device)
        mask[:, :, : self.cond_steps] = True
        return mask

    def forward(self, x0, *, cond=None, known=None, generator=None):
        """Training loss (fp32 scalar) at random t ~ U{0..T-1}; draws use `generator` when given.
        `known` (default `known_mask(x0)`) marks the given entries of x0, which carry no loss."""
        batch, device = x0.shape[0], x0.device
        t = torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)
        noise = randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        if self.offset_noise_strength > 0:  # one constant per (sample, channel): shifts the mean too
            offset_shape = (*x0.shape[:2], *(1,) * (x0.ndim - 2))
            noise = noise + self.offset_noise_strength * randn(
                offset_shape, generator=generator, device=device, dtype=x0.dtype
            )
        return self.p_losses(x0, t, noise, cond=cond, known=default(known, self.known_mask(x0)), generator=generator)

    def p_losses(self, x0, t, noise, *, cond=None, known=None, generator=None):
        """Loss at given timesteps t [B] and noise (shaped like x0); `generator` only feeds the
        self-conditioning coin. Known entries of x_t are x0's own, and the loss averages over the others."""
        self_cond = bool(self.self_condition and self._self_condition_coin(generator))
        if self._compiled_losses is not None:
            return self._compiled_losses[self_cond](x0, t, noise, cond, known)
        return self.loss_at(x0, t, noise, cond, known, self_cond=self_cond)

    def loss_at(self, x0, t, noise, cond=None, known=None, *, self_cond=False):
        """The loss as a function of tensors alone (no generator, no host read): what `compile_loss` compiles.
        `self_cond`: condition on a detached x0 estimate of a first, gradient-free pass (Chen et al. 2022)."""
        x_t = self.q_sample(x0, t, noise)
        if known is not None:
            x_t = torch.where(known, x0, x_t)

        x_self_cond = None
        if self_cond:
            with torch.no_grad():
                _, x_self_cond = self.model_predictions(x_t, t, cond=cond)
            x_self_cond = x_self_cond.detach().to(x0.dtype)
            if known is not None:
                x_self_cond = torch.where(known, x0, x_self_cond)

        model_out = self.model(x_t, t, cond=cond, x_self_cond=x_self_cond).float()
        if self.objective == "pred_noise":
            target = noise
        elif self.objective == "pred_x0":
            target = x0
        else:
            target = self.predict_v(x0, t, noise)
        target = target.float()

        if self.loss_type == "l1":
            loss = F.l1_loss(model_out, target, reduction="none")
        else:
            loss = F.mse_loss(model_out, target, reduction="none")
        if known is None:
            loss = reduce(loss, "b ... -> b", "mean")
        else:  # the mean over each sample's generated entries; known ones get no gradient
            weight = (~known).expand_as(loss).float()
            loss = reduce(loss * weight, "b ... -> b", "sum") / reduce(weight, "b ... -> b", "sum").clamp(min=1)
        return (loss * extract(self.loss_weight, t, loss.shape)).mean()

    def compile_loss(self, *, mode="default", backend="inductor"):
        """Compile the training loss, network included, as one graph per self-conditioning branch
        (`models.compiled`): the random draws stay outside, so a compiled run draws what an eager one does."""
        self._compiled_losses = {
            flag: compiled(functools.partial(self.loss_at, self_cond=flag), name=f"the training loss of "
                           f"{type(self.model).__name__}", mode=mode, backend=backend)
            for flag in (False, True)
        }

    @staticmethod
    def _self_condition_coin(generator):
        """A fair coin drawn on the host, so the step never waits on the device.

        With a generator, the coin is seeded from the generator's state (kept on the host, also for
        CUDA generators), which advances with every draw: reproducible, and new at every step.
        """
        if generator is None:
            return torch.rand(()).item() < 0.5
        digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest()
        host = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        return torch.rand((), generator=host).item() < 0.5

    # Sampling.

    def denoiser(self, model=None, cond=None, known=None, x_known=None, guidance=None, prior=None):
        """The closure `denoise(x_t, t) -> (eps_hat, x0_hat)` (fp32) that the samplers call, for an integer
        timestep t. With self-conditioning (Chen et al. 2022) each call gets the previous call's x0_hat as
        `x_self_cond`; a new closure starts without one. Known entries of x0_hat are `x_known`'s own.
        `guidance` (models.guidance.Guidance) and `prior` (models.guidance.Prior) steer the noise estimate,
        and x0_hat is re-derived from the steered one."""
        x0_prev = None
        reweight = prior is not None and prior.gamma != 1
        context = {**(cond or {}), "x_known": x_known, "known": known}  # what an objective reads beside x0_hat
        betas = self._schedule64["betas"]

        def predict(x, time):
            eps, x0 = self.model_predictions(x, time, model=model, cond=cond, x_self_cond=x0_prev,
                                             clip_x0=self.clip_denoised)
            if known is not None:
                x0 = torch.where(known, x_known, x0)
            return eps, x0

        def denoise(x, t):
            nonlocal x0_prev
            time = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            if guidance is None:
                eps, x0 = predict(x, time)
            else:
                with torch.enable_grad():
                    x_in = x.detach().float().requires_grad_(True)
                    eps, x0 = self.model_predictions(x_in, time, model=model, cond=cond, x_self_cond=x0_prev,
                                                     clip_x0=self.clip_denoised)
                    J = evaluate_objective(guidance, x0, context)  # the network's own estimate, given entries too
                    (grad,) = torch.autograd.grad(J.sum(), x_in)
                eps = eps.detach() + guidance.scale_at(t, betas) * grad
            if reweight:
                channels = list(prior.channels)
                eps_prior, _ = prior.diffusion.model_predictions(x[:, channels], time, model=prior.model,
                                                                 cond=prior.cond)
                eps = eps.clone()
                eps[:, channels] += (prior.gamma - 1) * eps_prior
            if guidance is not None or reweight:
                x0 = self.predict_start_from_noise(x.float(), time, eps)
                if self.clip_denoised:
                    x0 = x0.clamp(-1.0, 1.0)
                    eps = self.predict_noise_from_start(x.float(), time, x0)
                if known is not None:
                    x0 = torch.where(known, x_known, x0)
                x0 = x0.detach()
            if self.self_condition:
                x0_prev = x0
            return eps, x0

        return denoise

    @torch.no_grad()
    def sample(self, batch_size, *, model=None, cond=None, x_known=None, known=None, generator=None, sampler=None,
               sampling_timesteps=None, eta=None, progress=False, after_step=None, guidance=None, prior=None,
               spacing=None):
        """Generate `[batch_size, *sample_shape]` in model space.

        Args:
            model: network to sample with (e.g. the EMA copy); default the trained one.
            cond: the condition dict passed to the network (models/cond.py).
            x_known: `[batch_size, *sample_shape]` holding the given entries (the first frames of a forecast);
                they come out exactly as they went in.
            known: boolean mask of the given entries, broadcastable to x (default: `known_mask`, the
                first `cond_steps` frames).
            generator: torch.Generator on the buffers' device for every random draw.
            sampler: a name in `models.sampling.SAMPLER_NAMES` (default: the constructor's).
            sampling_timesteps: network evaluations, in [1, timesteps] (default: the constructor's).
            spacing: "uniform", "logsnr" or "auto" (`models.sampling.default_spacing` of the sampler) (default:
                the constructor's `sampling_spacing`).
            eta: DDIM noise scale (default: the constructor's `ddim_eta`); only the "ddim" sampler takes it.
            progress: show a tqdm bar.
            after_step: `after_step(x, i) -> x`, applied to the state after each step i (see `models.sampling`),
                after the known entries are written back.
            guidance: a `models.guidance.Guidance`: steer the samples towards a small objective (its gradient is
                taken through the network).
            prior: a `models.guidance.Prior`: reweight the prior of some channels by a second model; gamma = 1
                samples the model itself.
        """
        sampler = default(sampler, self.sampler)
        sample_fn = sampler_by_name(sampler)
        if (guidance is not None or prior is not None) and not getattr(sample_fn, "steerable", False):
            raise ValueError(f"sampler {sampler!r} reads no noise estimate that guidance or a prior could steer; "
                             f"use one of {', '.join(STEERABLE)}")
        if prior is not None:
            check_prior(self, prior)
        options = {}
        if sampler == "ddim":
            options["eta"] = default(eta, self.ddim_eta)
        elif eta:
            raise ValueError(f"eta={eta} only applies to the ddim sampler; sampler {sampler!r} takes no eta")
        spacing = default(spacing, self.sampling_spacing)
        grid = time_grid(self._schedule64["alphas_cumprod"], default(sampling_timesteps, self.sampling_timesteps),
                         default_spacing(sampler) if spacing == "auto" else spacing)
        shape = (batch_size, *self.sample_shape)
        x_T = randn(shape, generator=generator, device=self.betas.device)
        if x_known is not None:
            if tuple(x_known.shape) != shape:
                raise ValueError(f"x_known must have the samples' shape {list(shape)}, got {list(x_known.shape)}")
            known = default(known, self.known_mask(x_T))
            if known is None:
                raise ValueError("x_known was given but no mask of known entries: pass known=, or build the "
                                 "diffusion with cond_steps")
            x_known = x_known.to(x_T)
            x_T = torch.where(known, x_known, x_T)
            after_step = _write_back(known, x_known, after_step)
        return sample_fn(self.denoiser(model, cond, known, x_known, guidance, prior), x_T, grid, generator=generator,
                         progress=progress, after_step=after_step, **options)


def _write_back(known, x_known, after_step):
    """An `after_step` hook that restores the known entries, then calls `after_step` if given."""
    def hook(x, i):
        x = torch.where(known, x_known, x)
        return after_step(x, i) if after_step is not None else x

    return hook
