"""The frozen map between images and the space the U-Net works in.

`identity` is pixel space (the offline demo); otherwise an `AutoencoderKL` (the SD VAE, or a tiny one
built from config for tests). Latents are always *scaled* by the VAE's own `scaling_factor`, so the
U-Net sees roughly unit-variance inputs whichever autoencoder is used.
"""
from __future__ import annotations

import torch

from .hub import load_pretrained


class IdentityAutoencoder:
    """Pixel space: the 'latent' of an image is the image itself, in [-1, 1]."""

    name, latent_channels, downsample = "identity", 3, 1

    def to(self, device, dtype=None):
        return self

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, torch.zeros_like(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


class VaeAutoencoder:
    def __init__(self, name: str, vae):
        self.name, self.vae = name, vae.eval().requires_grad_(False)
        self.scaling_factor = vae.config.scaling_factor
        self.latent_channels = vae.config.latent_channels
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    def to(self, device, dtype=None):
        self.vae.to(device, dtype)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the scaled latent distribution; training samples mean + std * noise."""
        p = next(self.vae.parameters())
        dist = self.vae.encode(images.to(p.device, p.dtype)).latent_dist
        return dist.mean.float() * self.scaling_factor, dist.std.float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        return self.vae.decode(latents.to(p.device, p.dtype) / self.scaling_factor).sample.float().clamp(-1, 1)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         layers_per_block=1, sample_size=32)


def load_autoencoder(name: str, subfolder: str = "", device="cpu"):
    if name == "identity":
        return IdentityAutoencoder()
    if name == "tiny":
        return VaeAutoencoder(name, tiny_vae()).to(device)
    from diffusers import AutoencoderKL

    kwargs = {"subfolder": subfolder} if subfolder else {}
    vae = load_pretrained(AutoencoderKL.from_pretrained, name, "autoencoder (VAE)", **kwargs)
    return VaeAutoencoder(name, vae).to(device)
