"""A pretrained Stable Diffusion v1.x pipeline as a TextToImage: the comparison the course does not allow for submissions."""
from __future__ import annotations


def load_pipeline(cfg, model_id: str, device=None):
    """`model_id` (a Stable Diffusion v1.x pipeline id or folder) as a TextToImage, so every sampler, grid and
    the test-set writer here work on it unchanged. Offline: WeightsUnavailableError saying what to download."""
    from diffusers import StableDiffusionPipeline

    from .autoencoder import VaeAutoencoder
    from .hub import load_pretrained
    from .model import TextToImage, default_device
    from .text import TextEncoder

    device = device or default_device()
    pipe = load_pretrained(StableDiffusionPipeline.from_pretrained, model_id, "Stable Diffusion pipeline",
                           safety_checker=None, requires_safety_checker=False)
    pipe.to(device)
    max_tokens = pipe.tokenizer.model_max_length
    text_encoder = TextEncoder(model_id, pipe.tokenizer, pipe.text_encoder, max_tokens,
                               use_attention_mask=bool(getattr(pipe.text_encoder.config, "use_attention_mask", False)))
    return TextToImage(cfg, pipe.unet.eval().requires_grad_(False), text_encoder,
                       VaeAutoencoder(model_id, pipe.vae), dict(pipe.scheduler.config))


def compare_with_sd(cfg, model, prompts: list[str], setting, sd_guidance: float = 7.5):
    """A figure: our images (top row) and `cfg.sd_model`'s (bottom) for the same prompts and seeds, or None
    (after printing what to download) when the pretrained pipeline cannot be had."""
    import matplotlib.pyplot as plt

    from .hub import WeightsUnavailableError
    from .sample import sample_images

    try:
        baseline = load_pipeline(cfg, cfg.sd_model)
    except WeightsUnavailableError as e:
        print(e)
        return None
    seeds = [cfg.seed + i for i in range(len(prompts))]
    fig, axes = plt.subplots(2, len(prompts), figsize=(2.2 * len(prompts), 4.6), squeeze=False)
    # the pretrained pipeline at its usual guidance, every step; the same steps and solver as ours
    rows = [("ours", model, setting), (cfg.sd_model, baseline, setting.replace(guidance=sd_guidance,
                                                                               guidance_interval=()))]
    for row, (name, m, s) in enumerate(rows):
        images = sample_images(m, prompts, seeds, s, batch_size=len(prompts))
        for ax, x in zip(axes[row], images):
            ax.imshow(((x.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
        axes[row][0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    return fig
