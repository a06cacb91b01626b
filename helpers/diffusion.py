"""The diffusion core: the training loss as its equation, and an EMA of the weights with a half-life.

Notation (Ho et al. 2020; Salimans & Ho 2022): a clean latent x0, Gaussian noise eps, a timestep t with
alpha_bar_t from the training schedule, and
    x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps            (the forward process)
    v_t = sqrt(alpha_bar_t) * eps - sqrt(1 - alpha_bar_t) * x0            (the v target)
    SNR(t) = alpha_bar_t / (1 - alpha_bar_t)
The U-Net predicts eps or v; min-SNR-gamma (Hang et al. 2023) weights each sample's squared error by
min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v, so easy low-noise steps count less.

Rectified flow (Liu et al. 2022; Lipman et al. 2022; SD3: Esser et al. 2024), prediction_type "flow_prediction":
a time t in (0, 1) instead of a timestep, and a straight path from the image to the noise,
    x_t = (1 - t) * x0 + t * eps                                          (the forward process)
    u_t = eps - x0 = dx_t / dt                                            (the velocity target)
The U-Net sees the timestep t * num_train_timesteps, as diffusers' flow schedulers give it when sampling. t is drawn
uniform or logit-normal, t = sigmoid(n) with n ~ N(mean, std) (SD3's best: mean 0, std 1; mean > 0 trains the
noisier half more), and the loss is unweighted: the density is the weighting. Its noise level in the sigma of the
other objectives is t / (1 - t), since x_t / (1 - t) = x0 + t / (1 - t) * eps.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def flow_matching_loss(unet, x0, context, eps, t, num_train_timesteps: int) -> torch.Tensor:
    """Mean over the batch of ||F(x_t, t * num_train_timesteps, context) - (eps - x0)||^2 (mean over pixels)."""
    t_ = t.float().view(-1, 1, 1, 1)
    x_t = (1 - t_) * x0 + t_ * eps
    prediction = unet(x_t, t * num_train_timesteps, encoder_hidden_states=context).sample
    return (prediction.float() - (eps - x0)).square().mean(dim=(1, 2, 3)).mean()


def flow_times(batch: int, density: str, mean: float, std: float, generator, device) -> torch.Tensor:
    """[batch] times t in (0, 1): uniform, or logit-normal t = sigmoid(n), n ~ N(mean, std) (diffusers'
    compute_density_for_timestep_sampling draws the same numbers from the same generator)."""
    if density == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    return torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))


def immiscible_pairing(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """eps reordered so that the batch's total squared distance image-to-noise is least (Li et al. 2024,
    "Immiscible Diffusion"): a linear assignment over the batch, so each image is noised towards nearby noise and
    the network learns an easier map. Every noise is still used once, so the noise stays Gaussian."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x0.flatten(1).float(), eps.flatten(1).float()).square()
    _, columns = linear_sum_assignment(cost.cpu().numpy())
    return eps[torch.as_tensor(columns, device=eps.device)]


@dataclass(frozen=True, eq=False)  # eq=False: it holds a tensor, and two objectives are never compared
class Objective:
    """What a run trains the U-Net to predict, at which noise levels, and with which noise: draws t and computes
    the loss of a batch (helpers.model.training_objective builds it from a run config)."""

    prediction_type: str  # epsilon | v_prediction | flow_prediction
    num_train_timesteps: int
    alphas_cumprod: torch.Tensor | None = None  # the DDPM schedule (epsilon / v_prediction)
    min_snr_gamma: float = 0.0  # epsilon / v_prediction
    timestep_density: str = "logit_normal"  # flow_prediction: uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    immiscible: bool = False

    @property
    def flow(self) -> bool:
        return self.prediction_type == "flow_prediction"

    def draw_t(self, batch: int, generator, device) -> torch.Tensor:
        """Timesteps 0 .. num_train_timesteps - 1 (epsilon / v), or flow times in (0, 1)."""
        if self.flow:
            return flow_times(batch, self.timestep_density, self.logit_mean, self.logit_std, generator, device)
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=device)

    def pair_noise(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return immiscible_pairing(x0, eps) if self.immiscible else eps

    def loss(self, unet, x0, context, eps, t) -> torch.Tensor:
        if self.flow:
            return flow_matching_loss(unet, x0, context, eps, t, self.num_train_timesteps)
        return diffusion_loss(unet, x0, context, eps, t, self.alphas_cumprod, self.prediction_type,
                              self.min_snr_gamma)


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
