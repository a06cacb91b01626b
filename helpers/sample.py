"""Classifier-free guided sampling with any diffusers scheduler.

One sampler serves training previews, the test set, the notebook's widget (helpers.panel), the grids
(helpers.grids) and evaluation:
- the conditional and unconditional halves go through the U-Net in one batched forward per step;
- every image draws its noise from its own `torch.Generator("cpu").manual_seed(seed)`, so image i is
  the same whatever the batch it is sampled in, up to float rounding (and the same as diffusers' pipeline for that seed);
- guidance can be limited to an interval of noise levels (Kynkäänniemi et al. 2024, "Applying guidance in a
  limited interval improves sample and distribution quality"): outside it the plain conditional prediction is
  used, one U-Net call per image;
- the U-Net and the decoder run under the device's autocast for sampling (helpers.precision: bf16 on sm_80+, fp16
  below; bf16 on a CPU that computes it natively, AMX or AVX512-BF16), printed once per process where sampling
  starts; the scheduler's arithmetic stays float32.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from PIL import Image
from .progress import progress_bar

from .images import tensor_to_pil
from .precision import Precision, decide, report_once
from .setting import Setting

from .schedulers import COMMON_KWARGS, SCHEDULERS, make_scheduler  # noqa: F401 (re-exported)
from .schedulers import is_flow, schedulers_for


def noise_level(sampler, t) -> float:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of the training schedule at timestep t; for a flow-matching
    schedule s / (1 - s) at flow time s = t / num_train_timesteps (the same sigma: x_s / (1 - s) = x0 + sigma eps)."""
    if is_flow(sampler.config):
        s = float(t) / sampler.config.num_train_timesteps
        return s / (1 - s) if s < 1 else math.inf
    alpha_bar = sampler.alphas_cumprod[int(round(float(t)))].item()
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def sigma_range(train_scheduler_config) -> tuple[float, float]:
    """(lowest, highest) noise level sigma of the training schedule's timesteps."""
    schedule = make_scheduler(schedulers_for(train_scheduler_config)[0], train_scheduler_config)
    return noise_level(schedule, 0), noise_level(schedule, schedule.config.num_train_timesteps - 1)


def guided_at(sigma: float, setting: Setting) -> bool:
    """Whether a step at noise level `sigma` uses classifier-free guidance under `setting`."""
    if setting.guidance == 1.0:
        return False
    interval = setting.guidance_interval
    return not interval or interval[0] < sigma <= interval[1]


def guided_steps(train_scheduler_config: dict, setting: Setting) -> tuple[int, int]:
    """(k, n): how many of the setting's n sampling steps are guided (the others cost one U-Net call, not two)."""
    sampler = make_scheduler(setting.scheduler, train_scheduler_config)
    sampler.set_timesteps(setting.steps)
    guided = sum(guided_at(noise_level(sampler, t), setting) for t in sampler.timesteps)
    return guided, len(sampler.timesteps)


@torch.no_grad()
def sample_latents(unet, sampler, cond, uncond, seeds, setting: Setting, *, latent_shape,
                   on_step: Callable[[int, int], None] | None = None, guide_unet=None,
                   precision: Precision | None = None) -> torch.Tensor:
    """Denoise one latent per seed with `sampler` (made for setting.scheduler). cond [B, L, D]; uncond [1, L, D]
    is the "" embedding; `guide_unet`: the U-Net of setting.guide (needed only when setting.autoguided).

    With CFG weight g = setting.guidance and autoguidance weight w = setting.guide_weight (Karras et al. 2024,
    "Guiding a Diffusion Model with a Bad Version of Itself": the guide is a worse version of the same network,
    here an earlier snapshot), the prediction at each step is
        eps = eps_c + (g - 1)(eps_c - eps_u) + (w - 1)(eps_c - eps_guide)  where the step's noise level lies in
                                                                          setting.guidance_interval (sigma_lo, sigma_hi]
        eps = eps_c                          + (w - 1)(eps_c - eps_guide)  on the other steps
    (eps stands for what the U-Net predicts: eps, v or the flow velocity, all combined the same way;
    eps_c + (g - 1)(eps_c - eps_u) = eps_u + g (eps_c - eps_u) is plain CFG; the paper's D_guide + w (D_main -
    D_guide), applied at every step). Both networks are conditional, so w improves images without adding prompt
    adherence; the paper's text-to-image examples split one guidance budget between the two, i.e. hold
    (g - 1) + (w - 1) fixed. U-Net calls per step: one (the prompt and, on CFG steps, "" in the same batch) plus one
    of the guide while it is active (w != 1). w = 1, or a guide equal to the main U-Net, changes nothing.
    `on_step(done, total)` is called after each step (e.g. to move a progress bar; raising there stops).
    `precision`: the autocast of the U-Net calls (default: the device's for sampling,
    helpers.precision.decide("auto", device, use="sample")).
    """
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    p = next(unet.parameters())
    device, batch = p.device, len(seeds)
    precision = precision or decide("auto", device, use="sample")
    if cond.shape[0] != batch:
        raise ValueError(f"{cond.shape[0]} prompt embeddings for {batch} seeds")
    cond = cond.to(device, p.dtype)
    both = torch.cat([uncond.to(device, p.dtype).expand(batch, -1, -1), cond])
    # Ancestral/stochastic steps draw fresh noise; one CPU generator per image keeps image i batch-independent.
    # They continue the seed's stream after the initial noise, exactly as diffusers' pipeline does.
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    sampler.set_timesteps(setting.steps, device=device)  # before the noise: init_noise_sigma depends on the steps
    if hasattr(sampler, "set_begin_index"):
        # Count steps by position, not by looking t up: Karras sigmas on the cosine schedule (sigma_max ~2e4)
        # round to repeated timesteps, and the lookup would then skip a step and run off the end.
        sampler.set_begin_index(0)
    # flow schedulers start from unit noise and take the latents unscaled: diffusers leaves both out of them
    init_sigma, scale = getattr(sampler, "init_noise_sigma", 1.0), getattr(sampler, "scale_model_input", None)
    latents = torch.cat([_draw(g, latent_shape) for g in generators]).to(device) * init_sigma
    if setting.autoguided and guide_unet is None:
        raise ValueError(f"the setting is autoguided by {setting.guide!r} but no guide U-Net was given")
    for i, t in enumerate(sampler.timesteps):
        guided = guided_at(noise_level(sampler, t), setting)
        model_in = (scale(latents, t) if scale else latents).to(p.dtype)
        with precision.autocast(device):
            eps = unet(torch.cat([model_in] * 2) if guided else model_in, t,
                       encoder_hidden_states=both if guided else cond, return_dict=False)[0].float()
            # the guide is another network: its call cannot share the main one's batch
            eps_guide = guide_unet(model_in, t, encoder_hidden_states=cond, return_dict=False)[0].float() \
                if setting.autoguided else None
        eps_cond = eps.chunk(2)[1] if guided else eps
        if guided:
            eps_uncond = eps.chunk(2)[0]
            eps = eps_uncond + setting.guidance * (eps_cond - eps_uncond)
        if setting.autoguided:
            eps = eps + (setting.guide_weight - 1.0) * (eps_cond - eps_guide)
        if setting.guidance_rescale > 0 and (guided or setting.autoguided):
            eps = rescale_noise_cfg(eps, eps_cond, guidance_rescale=setting.guidance_rescale)
        kwargs = {"generator": generators} if _takes_generator(sampler) else {}
        latents = sampler.step(eps, t, latents, return_dict=False, **kwargs)[0]
        if on_step is not None:
            on_step(i + 1, len(sampler.timesteps))
    return latents


def _draw(generator, latent_shape) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor((1, *latent_shape), generator=generator, device=torch.device("cpu"), dtype=torch.float32)


def _takes_generator(sampler) -> bool:
    import inspect

    return "generator" in inspect.signature(sampler.step).parameters


@torch.no_grad()
def sample_images(model, prompts, seeds, setting: Setting, *, batch_size: int = 64, progress: bool = False,
                  on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """[B, 3, H, W] images in [-1, 1] (on the CPU) for `prompts`, one seed each, decoded by the autoencoder.

    `model` must already hold the U-Net of setting.snapshot (helpers.weights.with_setting), and of its ema_length
    and guide (helpers.weights.with_setting: checked here).
    `on_step(done, total)` is called after each denoising step of each batch of `batch_size` prompts.
    """
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    setting.checked()
    check_honoured(setting, model.scheduler_config)
    check_holds(model, setting)
    sampler = make_scheduler(setting.scheduler, model.scheduler_config)
    device = model.device
    precision = decide(model.cfg.mixed_precision, device, use="sample")
    report_once(precision, f"Sampling on {device.type}")
    uncond = model.encode_prompts([""]).to(device)
    out = []
    starts = range(0, len(prompts), batch_size)
    desc = f"sampling ({setting.scheduler}, {setting.steps} steps)"
    for start in progress_bar(starts, desc=desc, disable=not progress):
        cond = model.encode_prompts(prompts[start:start + batch_size]).to(device)
        latents = sample_latents(model.unet, sampler, cond, uncond, seeds[start:start + batch_size], setting,
                                 latent_shape=model.latent_shape, on_step=on_step,
                                 guide_unet=getattr(model, "guide_unet", None), precision=precision)
        with precision.autocast(device):
            out.append(model.autoencoder.decode(latents).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 3, *model.latent_shape[1:])


MAX_GUIDANCE_WEIGHT = 1e4  # beyond this the guidance term dwarfs the prediction 10,000-fold: images are noise, and
# well before float32's 3.4e38 the difference times the weight overflows to inf/NaN


def unhonoured(setting: Setting, scheduler_config: dict) -> list[str]:
    """Values the model cannot honour although the sampler accepts them, one message each (empty: fine)."""
    problems = []
    trained = scheduler_config.get("num_train_timesteps")
    if trained and isinstance(setting.steps, int) and setting.steps > trained:
        problems.append(f"steps={setting.steps} is more than the {trained} timesteps the model was trained with "
                        f"(at most {trained})")
    for name in ("guidance", "guide_weight"):
        value = getattr(setting, name)
        if isinstance(value, float) and value > MAX_GUIDANCE_WEIGHT:
            problems.append(f"{name}={value:g} is above {MAX_GUIDANCE_WEIGHT:g}: the guidance term would swamp the "
                            "prediction (and overflow float32 into NaN)")
    if setting.autoguided and setting.guide == setting.snapshot and not setting.ema_length:
        problems.append(f"guide={setting.guide!r} is the snapshot itself: a network guiding itself changes nothing "
                        "(name an earlier snapshot, or guide='')")
    return problems


def check_honoured(setting: Setting, scheduler_config: dict) -> None:
    problems = unhonoured(setting, scheduler_config)
    if problems:
        raise ValueError("Bad sampling setting: " + "; ".join(problems))


def check_holds(model, setting: Setting) -> None:
    """ValueError unless `model` holds the EMA length and guide that `setting` asks for (a model loaded for
    another setting would otherwise sample it silently with the wrong weights)."""
    ema_length, guide = float(getattr(model, "ema_length", 0.0)), getattr(model, "guide", "")
    if ema_length != setting.ema_length or (setting.autoguided and guide != setting.guide):
        raise ValueError(f"the model holds EMA length {ema_length:g} and guide {guide or 'none'!r}; the setting "
                         f"asks for {setting.ema_length:g} and {setting.guide if setting.autoguided else 'none'!r}: "
                         f"load it with helpers.weights.with_setting(model, cfg, setting)")


def to_output_pils(images: torch.Tensor, size: int = 256) -> list[Image.Image]:
    """RGB PIL images of `size`×`size`.

    Upscaling by a whole factor uses nearest-neighbour: the demo's 16 px sprites stay crisp pixel art
    instead of a bicubic blur that invents colours the model never drew. Any other enlargement is
    bicubic; shrinking (e.g. SD's 512 px) is Lanczos, which antialiases.
    """
    pils = []
    for x in images:
        im = tensor_to_pil(x)
        if im.size != (size, size):
            w = im.size[0]
            method = (Image.Resampling.LANCZOS if w > size else
                      Image.Resampling.NEAREST if size % w == 0 else Image.Resampling.BICUBIC)
            im = im.resize((size, size), method)
        pils.append(im)
    return pils
