"""The diffusion core: the training loss as its equation, and an EMA of the weights with a half-life.

Notation (Ho et al. 2020; Salimans & Ho 2022): a clean latent x0, Gaussian noise eps, a timestep t with
alpha_bar_t from the training schedule, and
    x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps            (the forward process)
    v_t = sqrt(alpha_bar_t) * eps - sqrt(1 - alpha_bar_t) * x0            (the v target)
    SNR(t) = alpha_bar_t / (1 - alpha_bar_t)
The U-Net predicts eps or v; min-SNR-gamma (Hang et al. 2023) weights each sample's squared error by
min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v, so easy low-noise steps count less.
"""
from __future__ import annotations

import torch


def diffusion_loss(unet, x0, context, eps, t, alphas_cumprod, prediction_type: str = "epsilon",
                   min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Mean over the batch of w(t) * ||F(x_t, t, context) - target||^2 (mean over pixels)."""
    alpha_bar = alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    target = eps if prediction_type == "epsilon" else alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
    prediction = unet(x_t, t, encoder_hidden_states=context).sample
    loss = (prediction.float() - target).square().mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        snr = (alpha_bar / (1 - alpha_bar)).flatten()
        loss = loss * snr.clamp(max=min_snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    return loss.mean()


class EMA:
    """Exponential moving average of a model's weights, its half-life counted in training images (Karras et al.
    2022, EDM): after a step of n images, ema <- beta * ema + (1 - beta) * weights with beta = 0.5 ** (n / h).
    The half-life ramps up as h = min(halflife_images, rampup * images_seen), so a young average forgets the random
    initialisation quickly (rampup = 0: the full half-life from the first step)."""

    def __init__(self, model: torch.nn.Module, halflife_images: float, rampup: float = 0.0):
        self.halflife_images, self.rampup, self.images_seen = float(halflife_images), float(rampup), 0
        self.names = [name for name, _ in model.named_parameters()]
        self.weights = [p.detach().clone().float() for p in model.parameters()]

    def halflife(self) -> float:
        return min(self.halflife_images, self.rampup * self.images_seen) if self.rampup > 0 else self.halflife_images

    @torch.no_grad()
    def update(self, model: torch.nn.Module, images: int) -> None:
        self.images_seen += images
        beta = 0.5 ** (images / max(self.halflife(), 1e-8))
        torch._foreach_lerp_(self.weights, [p.detach().float() for p in model.parameters()], 1.0 - beta)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        for p, w in zip(model.parameters(), self.weights):
            p.copy_(w)
        return model

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights by parameter name, plus the image count: what a checkpoint stores."""
        return {**dict(zip(self.names, self.weights)), "images_seen": torch.tensor(self.images_seen)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, w in zip(self.names, self.weights):
            w.copy_(state[name])
        self.images_seen = int(state["images_seen"])
