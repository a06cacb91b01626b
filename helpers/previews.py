"""Training previews: fixed prompts with fixed seeds, sampled from the EMA U-Net into previews/step-NNNNNN.png."""
from __future__ import annotations

from pathlib import Path

from .cache import LatentCache, read_split
from .checkpoint import checkpoint_name
from .config import RunConfig
from .files import atomic_save_image, atomic_write_json
from .model import noise_scheduler


class Previewer:
    """Samples fixed prompts with fixed seeds from the EMA U-Net into previews/step-NNNNNN.png."""

    def __init__(self, cfg: RunConfig, cache: LatentCache, device, n: int = 8):
        from .model import load_frozen_parts

        self.cfg, self.prompts = cfg, preview_prompts(cfg, cache, n)
        self.text_encoder, self.autoencoder = load_frozen_parts(cfg, device)
        self.scheduler_config = dict(noise_scheduler(cfg).config)

    def save(self, ema_unet, step: int) -> Path:
        from .images import image_grid, tensor_to_pil
        from .model import TextToImage
        from .sample import sample_images
        from .setting import Setting

        cfg = self.cfg
        model = TextToImage(cfg, ema_unet, self.text_encoder, self.autoencoder, self.scheduler_config)
        setting = Setting.from_config(cfg).replace(ema_length=0.0, guide="")  # the half-life EMA, no guide
        images = sample_images(model, self.prompts, list(range(len(self.prompts))), setting,
                               batch_size=cfg.sample_batch_size)
        grid = image_grid([tensor_to_pil(x) for x in images], cols=min(len(self.prompts), 4),
                          cell=max(64, cfg.resolution))
        out = cfg.layout.previews / f"{checkpoint_name(step)}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_image(grid, out)
        atomic_write_json(out.parent / "prompts.json", self.prompts)
        return out


def preview_prompts(cfg: RunConfig, cache: LatentCache, n: int = 8) -> list[str]:
    """The first `n` distinct captions of validation monsters, then of training ones: fixed for a run."""
    val = set(read_split(cfg)["val"])
    order = [i for i, g in enumerate(cache.groups) if g in val] + [i for i, g in enumerate(cache.groups) if g not in val]
    prompts = []
    for i in order:
        caption = cache.captions[int(cache.caption_ids[i, 0])]
        if caption not in prompts:
            prompts.append(caption)
        if len(prompts) == n:
            break
    return prompts
