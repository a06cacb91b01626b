"""The parts of one text-to-image model, assembled from a run config, and where a trained one is saved.

A run's trained model lives in `<run_dir>/model/` as diffusers folders: `unet/`, `unet_ema/`,
`scheduler/` (safetensors + json). The frozen text encoder and autoencoder are not copied: they are
rebuilt from the config (pretrained ids, or deterministic tiny ones).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .autoencoder import load_autoencoder
from .config import RunConfig
from .diffusion import Objective
from .text import TextEncoder, load_text_encoder


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_frozen_parts(cfg: RunConfig, device=None):
    device = device or default_device()
    text_encoder = load_text_encoder(cfg.text_encoder, cfg.max_tokens, device)
    autoencoder = load_autoencoder(cfg.autoencoder, cfg.autoencoder_subfolder, device)
    return text_encoder, autoencoder


def latent_size(cfg: RunConfig, autoencoder) -> int:
    return cfg.resolution // autoencoder.downsample


def noise_scheduler(cfg: RunConfig):
    """The training-time noise schedule; samplers are built from its config (helpers.sample). A flow-matching run's
    is the rectified-flow one, its config marked with prediction_type "flow_prediction" as diffusers' solvers name
    it (beta_schedule plays no part there)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if cfg.prediction_type == "flow_prediction":
        from .schedulers import marked_flow

        return marked_flow(FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps))
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=False)


def training_objective(cfg: RunConfig, device=None) -> Objective:
    """The run's loss and its draw of t (helpers.diffusion.Objective), on `device`."""
    flow = cfg.prediction_type == "flow_prediction"
    alphas_cumprod = None if flow else noise_scheduler(cfg).alphas_cumprod.to(device)
    return Objective(cfg.prediction_type, cfg.num_train_timesteps, alphas_cumprod, cfg.min_snr_gamma,
                     cfg.timestep_density, cfg.logit_mean, cfg.logit_std, cfg.immiscible_noise)


def save_model(cfg: RunConfig, unet, ema_unet, scheduler) -> Path:
    """Write U-Net, EMA U-Net and scheduler config as diffusers folders (safetensors)."""
    out = cfg.layout.model
    if out.exists():
        print(f"Overwriting the trained model in {out} with the weights of this run's final step")
    unet.save_pretrained(out / "unet", safe_serialization=True)
    if ema_unet is not None:
        ema_unet.save_pretrained(out / "unet_ema", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    return out


@dataclass
class TextToImage:
    """Everything needed to turn prompts into images; see helpers.sample for the sampling itself."""

    cfg: RunConfig
    unet: torch.nn.Module
    text_encoder: TextEncoder
    autoencoder: object
    scheduler_config: dict
    # what helpers.weights.with_setting loaded besides the snapshot: a post-hoc EMA length, a guide's U-Net
    ema_length: float = 0.0
    guide: str = ""
    guide_weight: float = 1.0
    guide_unet: torch.nn.Module | None = None
    # prompt -> its embedding: the selection samples the same prompts in every cell (copies made by
    # dataclasses.replace share it; the text encoder is frozen, so an embedding never goes stale)
    encoded: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """[len(prompts), tokens, hidden]; each distinct prompt encoded once (the last PROMPTS_KEPT kept)."""
        prompts = list(prompts)
        new = list(dict.fromkeys(p for p in prompts if p not in self.encoded))
        if new:
            for prompt, embedding in zip(new, self.text_encoder.encode(new)):
                self.encoded[prompt] = embedding.clone()  # not a view that keeps its whole batch alive
        wanted = [self.encoded[p] for p in prompts]
        for oldest in list(self.encoded)[:max(0, len(self.encoded) - PROMPTS_KEPT)]:
            del self.encoded[oldest]
        return torch.stack(wanted) if wanted else self.text_encoder.encode([])


PROMPTS_KEPT = 2048  # the course's 1,063 test prompts at CLIP's 77 x 512: 168 MB


def load_model(cfg: RunConfig, use_ema: bool | None = None, device=None, unet_dir=None) -> TextToImage:
    """The trained model of a run: the U-Net in `unet_dir` (e.g. a snapshot), else the final EMA weights
    (the raw last-step weights if `use_ema=False` or `cfg.use_ema` is off)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from .progress import quiet_library_bars

    quiet_library_bars()
    use_ema = cfg.use_ema if use_ema is None else use_ema
    folder = Path(unet_dir) if unet_dir else cfg.layout.model / ("unet_ema" if use_ema else "unet")
    if not folder.exists():
        raise FileNotFoundError(f"No trained U-Net at {folder}: run notebooks/03_train_cfg.ipynb for run "
                                f"{cfg.run_name!r} first")
    device = device or default_device()
    text_encoder, autoencoder = load_frozen_parts(cfg, device)
    unet = UNet2DConditionModel.from_pretrained(folder).to(device).eval().requires_grad_(False)
    scheduler_config = dict(DDPMScheduler.load_config(cfg.layout.model / "scheduler"))
    return TextToImage(cfg, unet, text_encoder, autoencoder, scheduler_config)
