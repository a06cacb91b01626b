"""Classifier-free guided sampling with any diffusers scheduler, and the pictures that show what it does.

One sampler serves training previews, the test set, the notebook's widget and evaluation:
- the conditional and unconditional halves go through the U-Net in one batched forward per step;
- every image draws its noise from its own `torch.Generator("cpu").manual_seed(seed)`, so image i is
  the same whatever the batch it is sampled in, up to float rounding (and the same as diffusers' pipeline for that seed);
- on CUDA the U-Net and the decoder run under bf16 autocast, the scheduler's arithmetic stays float32.
"""
from __future__ import annotations

import contextlib
import io
import json

import torch
from PIL import Image
from tqdm.auto import tqdm

from .images import image_grid, tensor_to_pil

# name -> (diffusers class, kwargs on top of the training schedule's config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # PLMS: Runge-Kutta warm-up steps are wasteful at 25 steps
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    # Karras sigmas span the training schedule's sigma range; on the cosine schedule that is ~2e4 and
    # about 10 of 25 steps land at t >= 998, so pixel-space cosine runs do better with plain "dpm++2m".
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler",
                       {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

# For every sampler: "trailing" spacing starts at the last training step (pure noise), which the default
# "leading" spacing misses at few steps (25 steps start at t=961, where the cosine schedule still keeps
# 6 % of the signal, so samples come out washed-out; Lin et al. 2023, "Common Diffusion Noise Schedules
# and Sample Steps are Flawed"). steps_offset=1 is what StableDiffusionPipeline forces on load anyway,
# so an exported pipeline samples exactly as we do.
COMMON_KWARGS = {"timestep_spacing": "trailing", "steps_offset": 1}


def make_scheduler(name: str, train_scheduler_config: dict):
    """A sampling scheduler that shares the training run's noise schedule (betas, prediction type)."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    class_name, extra = SCHEDULERS[name]
    config = {k: v for k, v in dict(train_scheduler_config).items() if not k.startswith("_")}
    return getattr(diffusers, class_name).from_config(config, **{**COMMON_KWARGS, **extra})


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def sample_latents(unet, scheduler, cond, uncond, seeds, *, guidance: float, steps: int,
                   guidance_rescale: float = 0.0, latent_shape) -> torch.Tensor:
    """Denoise one latent per seed. cond [B, L, D]; uncond [1, L, D] is the "" embedding."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    p = next(unet.parameters())
    device, batch = p.device, len(seeds)
    if cond.shape[0] != batch:
        raise ValueError(f"{cond.shape[0]} prompt embeddings for {batch} seeds")
    use_cfg = guidance != 1.0
    context = torch.cat([uncond.expand(batch, -1, -1), cond]) if use_cfg else cond
    context = context.to(device, p.dtype)
    # Ancestral/stochastic steps draw fresh noise; one CPU generator per image keeps image i batch-independent.
    # They continue the seed's stream after the initial noise, exactly as diffusers' pipeline does.
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    scheduler.set_timesteps(steps, device=device)  # before the noise: init_noise_sigma depends on the steps
    if hasattr(scheduler, "set_begin_index"):
        # Count steps by position, not by looking t up: Karras sigmas on the cosine schedule (sigma_max ~2e4)
        # round to repeated timesteps, and the lookup would then skip a step and run off the end.
        scheduler.set_begin_index(0)
    latents = torch.cat([_draw(g, latent_shape) for g in generators]).to(device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * 2) if use_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        with _autocast(device):
            noise = unet(model_in.to(p.dtype), t, encoder_hidden_states=context, return_dict=False)[0].float()
        if use_cfg:
            noise_uncond, noise_cond = noise.chunk(2)
            noise = noise_uncond + guidance * (noise_cond - noise_uncond)
            if guidance_rescale > 0:
                noise = rescale_noise_cfg(noise, noise_cond, guidance_rescale=guidance_rescale)
        kwargs = {"generator": generators} if _takes_generator(scheduler) else {}
        latents = scheduler.step(noise, t, latents, return_dict=False, **kwargs)[0]
    return latents


def _draw(generator, latent_shape) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor((1, *latent_shape), generator=generator, device=torch.device("cpu"), dtype=torch.float32)


def _takes_generator(scheduler) -> bool:
    import inspect

    return "generator" in inspect.signature(scheduler.step).parameters


@torch.no_grad()
def sample_images(model, prompts, seeds, *, guidance: float, steps: int, scheduler: str = "dpm++2m-karras",
                  batch_size: int = 64, guidance_rescale: float = 0.0, progress: bool = False) -> torch.Tensor:
    """[B, 3, H, W] images in [-1, 1] (on the CPU) for `prompts`, one seed each, decoded by the autoencoder."""
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    sched = make_scheduler(scheduler, model.scheduler_config) if isinstance(scheduler, str) else scheduler
    device = model.device
    uncond = model.encode_prompts([""]).to(device)
    out = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=f"sampling ({scheduler}, {steps} steps)", disable=not progress):
        cond = model.encode_prompts(prompts[start:start + batch_size]).to(device)
        latents = sample_latents(model.unet, sched, cond, uncond, seeds[start:start + batch_size],
                                 guidance=guidance, steps=steps, guidance_rescale=guidance_rescale,
                                 latent_shape=model.latent_shape)
        with _autocast(device):
            out.append(model.autoencoder.decode(latents).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 3, *model.latent_shape[1:])


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


def sampling_guidance(cfg, guidance: float | None = None) -> float:
    """The guidance to sample with: the argument, else 05_eval's `best_guidance`, else the config's."""
    if guidance is not None:
        return float(guidance)
    metrics = cfg.run_dir / "metrics.json"
    if metrics.exists():
        best = json.loads(metrics.read_text(encoding="utf-8")).get("best_guidance")
        if best is not None:
            return float(best)
    return float(cfg.guidance)


# ---------------------------------------------------------------- looking at samples


def preview(model, prompt: str, *, guidance: float, steps: int, scheduler: str, seed: int, n: int = 4,
            cell: int = 128) -> Image.Image:
    """A row of `n` samples of one prompt (seeds seed … seed+n-1): what the widget's button shows."""
    images = sample_images(model, [prompt] * n, range(seed, seed + n), guidance=guidance, steps=steps,
                           scheduler=scheduler, batch_size=n)
    return image_grid([tensor_to_pil(x) for x in images], cols=n, cell=cell)


def make_panel(model, *, prompt: str = "", guidance: float | None = None, steps: int | None = None,
               scheduler: str | None = None, seed: int = 0, n: int = 4):
    """An ipywidgets box: prompt, guidance, steps, scheduler, seed and a Generate button that previews inline."""
    import ipywidgets as w

    cfg = model.cfg
    controls = dict(
        prompt=w.Text(value=prompt, description="prompt", layout=w.Layout(width="600px")),
        guidance=w.FloatSlider(value=guidance if guidance is not None else cfg.guidance, min=1.0, max=12.0,
                               step=0.5, description="guidance"),
        steps=w.IntSlider(value=steps or cfg.sample_steps, min=2, max=100, description="steps"),
        scheduler=w.Dropdown(options=list(SCHEDULERS), value=scheduler or cfg.scheduler, description="scheduler"),
        seed=w.IntText(value=seed, description="seed"),
    )
    button, status = w.Button(description="Generate", button_style="primary"), w.Label()
    image = w.Image(format="png")

    def on_click(_=None):
        status.value = "sampling…"
        grid = preview(model, controls["prompt"].value, guidance=controls["guidance"].value,
                       steps=controls["steps"].value, scheduler=controls["scheduler"].value,
                       seed=controls["seed"].value, n=n)
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        image.value = buf.getvalue()
        status.value = f"seeds {controls['seed'].value}…{controls['seed'].value + n - 1}"

    button.on_click(on_click)
    return w.VBox([controls["prompt"], w.HBox([controls["guidance"], controls["steps"]]),
                   w.HBox([controls["scheduler"], controls["seed"]]), w.HBox([button, status]), image])


def _show_row(ax, images: torch.Tensor, title: str = "") -> None:
    strip = image_grid([tensor_to_pil(x) for x in images], cols=len(images), cell=max(64, images.shape[-1]))
    ax.imshow(strip, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def guidance_steps_grid(model, prompts, guidances, steps_list, seed: int = 0, scheduler: str | None = None):
    """matplotlib Figure: rows = guidance scales, columns = step counts, each cell one strip of the prompts."""
    import matplotlib.pyplot as plt

    prompts, scheduler = list(prompts), scheduler or model.cfg.scheduler
    seeds = [seed + i for i in range(len(prompts))]
    fig, axes = plt.subplots(len(guidances), len(steps_list), squeeze=False,
                             figsize=(1.2 * len(prompts) * len(steps_list) + 1, 1.4 * len(guidances) + 0.8))
    for r, g in enumerate(tqdm(guidances, desc="guidance × steps grid")):
        for c, s in enumerate(steps_list):
            images = sample_images(model, prompts, seeds, guidance=g, steps=s, scheduler=scheduler)
            _show_row(axes[r][c], images, f"{s} steps" if r == 0 else "")
        axes[r][0].set_ylabel(f"guidance {g:g}")
    fig.suptitle(f"{scheduler}: guidance × steps (seeds {seeds[0]}…{seeds[-1]})")
    fig.tight_layout()
    return fig


def scheduler_grid(model, prompts, schedulers=None, steps: int = 25, seed: int = 0, guidance: float | None = None):
    """matplotlib Figure: one row per scheduler, same prompts and seeds, so only the solver differs."""
    import matplotlib.pyplot as plt

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    schedulers = list(schedulers or SCHEDULERS)
    guidance = model.cfg.guidance if guidance is None else guidance
    seeds = [seed + i for i in range(len(prompts))]
    fig, axes = plt.subplots(len(schedulers), 1, squeeze=False,
                             figsize=(1.2 * len(prompts) + 1.5, 1.3 * len(schedulers) + 0.8))
    for r, name in enumerate(tqdm(schedulers, desc="scheduler grid")):
        images = sample_images(model, prompts, seeds, guidance=guidance, steps=steps, scheduler=name)
        _show_row(axes[r][0], images)
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"{steps} steps, guidance {guidance:g}")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- a pretrained Stable Diffusion, for comparison


def load_sd_baseline(cfg, device=None):
    """`cfg.sd_model` (a Stable Diffusion v1.x pipeline id or folder) as a TextToImage, so every sampler,
    grid and the test-set writer here work on it unchanged. Offline: WeightsUnavailableError saying what
    to download."""
    from diffusers import StableDiffusionPipeline

    from .autoencoder import VaeAutoencoder
    from .hub import load_pretrained
    from .model import TextToImage, default_device
    from .text import TextEncoder

    device = device or default_device()
    pipe = load_pretrained(StableDiffusionPipeline.from_pretrained, cfg.sd_model, "Stable Diffusion pipeline",
                           safety_checker=None, requires_safety_checker=False)
    pipe.to(device)
    max_tokens = pipe.tokenizer.model_max_length
    text_encoder = TextEncoder(cfg.sd_model, pipe.tokenizer, pipe.text_encoder, max_tokens,
                               use_attention_mask=bool(getattr(pipe.text_encoder.config, "use_attention_mask", False)))
    return TextToImage(cfg, pipe.unet.eval().requires_grad_(False), text_encoder,
                       VaeAutoencoder(cfg.sd_model, pipe.vae), dict(pipe.scheduler.config))
