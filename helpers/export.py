"""A trained model as a standard diffusers pipeline folder, loadable anywhere with `DiffusionPipeline.from_pretrained`.

The folder holds the U-Net (the weights we sample with, EMA by default), the frozen text encoder and
tokenizer, the VAE and the sampling scheduler, all as safetensors + json.
"""
from __future__ import annotations

from pathlib import Path

from .sample import make_scheduler


def export_pipeline(model, out_dir, scheduler: str | None = None) -> Path:
    """Save `model` as a `StableDiffusionPipeline` folder; `scheduler` defaults to the run's sampling one."""
    from diffusers import StableDiffusionPipeline

    vae = getattr(model.autoencoder, "vae", None)
    if vae is None:
        raise ValueError(
            f"Cannot export run {model.cfg.run_name!r} as a StableDiffusionPipeline: it works in pixel space "
            f"(autoencoder={model.cfg.autoencoder!r}) and that pipeline always decodes through a VAE. The trained "
            f"U-Net and scheduler are already diffusers folders in {model.cfg.run_dir / 'model'}.")
    sampler = make_scheduler(scheduler or model.cfg.scheduler, model.scheduler_config)
    if not hasattr(sampler, "init_noise_sigma"):  # StableDiffusionPipeline scales its first latents by it
        raise ValueError(f"StableDiffusionPipeline cannot drive {type(sampler).__name__}: export run "
                         f"{model.cfg.run_name!r} with scheduler 'dpm++2m' or 'unipc' (they sample flow matching too)")
    text = model.text_encoder
    if text.use_attention_mask:
        # The pipeline passes an attention mask only when the text encoder's config asks for one.
        text.model.config.use_attention_mask = True
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text.model, tokenizer=text.tokenizer, unet=model.unet,
        scheduler=sampler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
