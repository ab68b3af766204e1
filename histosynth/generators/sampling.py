"""Sampling from a trained diffusion model: classifier-free guidance, the one sampling loop for
any diffusers scheduler (DDPM, DDIM, DPM-Solver++; optional SDEdit start from a noised image),
and RePaint inpainting (diffusers' RePaintScheduler) for the inpaint stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from histosynth.generators.autoencoder import decode, encode, latent_factor
from histosynth.generators.diffusion import _core, model_output, num_classes


def guided_output(model, x_t, t, cond, labels=None, guidance: float = 1.0) -> torch.Tensor:
    """Classifier-free guidance on the model output: out_u + g (out_c - out_u), the unconditional
    pass with the mask zeroed and the null label (as in training's condition dropout); g = 1: one
    conditional pass."""
    if guidance == 1.0:
        return model_output(model, x_t, t, cond, labels)
    null = None
    if num_classes(model):
        null = torch.full((len(x_t),), num_classes(model), device=x_t.device, dtype=torch.long)
        labels = null if labels is None else labels
    t = torch.as_tensor(t, device=x_t.device)
    t = t.repeat(2) if t.numel() > 1 else t
    out = model_output(
        model,
        torch.cat([x_t, x_t]),
        t,
        torch.cat([cond, torch.zeros_like(cond)]),
        None if null is None else torch.cat([labels, null]),
    )
    conditional, unconditional = out.chunk(2)
    return unconditional + guidance * (conditional - unconditional)


def noise_from_output(
    output: torch.Tensor, x_t: torch.Tensor, alpha_cumprod: torch.Tensor, prediction: str
) -> torch.Tensor:
    """The noise estimate behind a model output: the output itself for epsilon prediction, and
    sqrt(a) v + sqrt(1 - a) x_t for v-prediction (a = alpha_cumprod at the step)."""
    if prediction == "epsilon":
        return output
    if prediction == "v_prediction":
        a = alpha_cumprod.to(x_t.device, x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return a.sqrt() * output + (1 - a).sqrt() * x_t
    raise ValueError(f"prediction must be 'epsilon' or 'v_prediction', got {prediction!r}")


def resize_cond(cond: torch.Tensor, size) -> torch.Tensor:
    return cond if tuple(cond.shape[-2:]) == tuple(size) else F.interpolate(cond, size=tuple(size), mode="nearest")


@torch.no_grad()
def sample(
    model,
    scheduler,
    cond: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    steps: int = 50,
    guidance: float = 1.0,
    generator: torch.Generator | None = None,
    autoencoder=None,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Images in [-1, 1] for the masks `cond` (N, C, H, W) with any diffusers scheduler (DDPM,
    DDIM, DPMSolverMultistep); in latent space pass the autoencoder: cond is resized to the latent
    size and the result decoded. With `init` (N, 3, H, W images in [-1, 1]) and strength < 1 the
    run starts from init noised to that level (SDEdit): only the last round(steps * strength)
    steps are taken; strength 1 starts from pure noise."""
    from diffusers.utils.torch_utils import randn_tensor

    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    size = cond.shape[-2:] if autoencoder is None else [s // latent_factor(autoencoder) for s in cond.shape[-2:]]
    cond = resize_cond(cond, size)
    scheduler.set_timesteps(steps, device=cond.device)
    x = randn_tensor((len(cond), _core(model).config.out_channels, *size), generator=generator, device=cond.device)
    timesteps = scheduler.timesteps
    if init is not None and strength < 1:
        skipped = (steps - max(1, round(steps * strength))) * scheduler.order
        timesteps = timesteps[skipped:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(skipped)
        start = encode(autoencoder, init).float() if autoencoder is not None else init.to(x.dtype)
        x = scheduler.add_noise(start, x, timesteps[:1].repeat(len(x)))
    else:
        x = x * scheduler.init_noise_sigma
    for t in timesteps:
        out = guided_output(model, scheduler.scale_model_input(x, t), t, cond, labels, guidance)
        x = scheduler.step(out.float(), t, x, generator=generator).prev_sample
    return decode(autoencoder, x) if autoencoder is not None else x.clamp(-1, 1)


SAMPLERS = ("ddpm", "ddim", "dpmsolver++")


def make_sampler(name: str, scheduler_config):
    """A sampling scheduler sharing the training noise schedule: ddpm | ddim | dpmsolver++."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if name == "ddpm":
        return DDPMScheduler.from_config(scheduler_config)
    if name == "ddim":
        return DDIMScheduler.from_config(scheduler_config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++")
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")


# ----------------------------------------------------------------------------- RePaint


@torch.no_grad()
def repaint(
    model,
    scheduler,
    known: torch.Tensor,
    keep: torch.Tensor,
    cond: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    steps: int,
    jump_length: int,
    jump_n_sample: int,
    guidance: float = 1.0,
    generator=None,
    prediction: str = "epsilon",
) -> torch.Tensor:
    """RePaint sampling with diffusers' RePaintScheduler, in pixel or latent space alike: `known`
    (N, C, h, w) is kept where `keep` (N, 1, h, w) is 1, regenerated where it is 0; `cond` has
    the size of `known`; `prediction` is what the model predicts (RePaint steps on the noise
    estimate, so v is converted). Returns the final x_0 (not clamped, not decoded)."""
    from diffusers.utils.torch_utils import randn_tensor

    scheduler.set_timesteps(steps, jump_length, jump_n_sample)  # CPU timesteps: they index the CPU schedule
    x = randn_tensor(known.shape, generator=generator, device=known.device) * scheduler.init_noise_sigma
    t_last = scheduler.timesteps[0] + 1
    for t in scheduler.timesteps:
        if t < t_last:  # one denoising step; the known part is the source noised to t - 1
            out = guided_output(model, x, t, cond, labels, guidance)
            eps = noise_from_output(out.float(), x, scheduler.alphas_cumprod[t], prediction)
            x = scheduler.step(eps.float(), t, x, known, keep, generator=generator).prev_sample
        else:  # a jump back in time: re-noise by one step
            x = scheduler.undo_step(x, t_last, generator=generator)
        t_last = t
    return x


def repaint_scheduler(scheduler_config, eta: float):
    """A RePaintScheduler on the training noise schedule (clip_sample as trained: off in latent space)."""
    from diffusers import RePaintScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "clip_sample")
    return RePaintScheduler(**{key: scheduler_config[key] for key in keys if key in scheduler_config}, eta=eta)
