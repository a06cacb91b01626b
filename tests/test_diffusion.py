"""The diffusion core against diffusers' own arithmetic, and the EMA's half-life."""
import math

import pytest
import torch

from helpers.config import profile_config
from helpers.diffusion import EMA, diffusion_loss
from helpers.model import noise_scheduler


class Recorder(torch.nn.Module):
    """A stand-in U-Net that returns a fixed prediction and records what it was given."""

    def __init__(self, prediction):
        super().__init__()
        self.prediction, self.seen = prediction, {}

    def forward(self, x_t, t, encoder_hidden_states):
        self.seen = dict(x_t=x_t, t=t, context=encoder_hidden_states)
        return type("Out", (), {"sample": self.prediction})()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["squaredcos_cap_v2", "linear", "scaled_linear"])
def test_loss_is_the_equation_diffusers_computes(prediction_type, beta_schedule):
    from diffusers.training_utils import compute_snr

    sched = noise_scheduler(profile_config("tiny", prediction_type=prediction_type, beta_schedule=beta_schedule))
    g = torch.Generator().manual_seed(0)
    x0, eps, pred = (torch.randn(5, 3, 8, 8, generator=g) for _ in range(3))
    t, context = torch.tensor([0, 7, 300, 700, 999]), torch.randn(5, 4, 16)
    unet = Recorder(pred)
    for gamma in (0.0, 5.0):
        loss = diffusion_loss(unet, x0, context, eps, t, sched.alphas_cumprod, prediction_type, gamma)
        torch.testing.assert_close(unet.seen["x_t"], sched.add_noise(x0, eps, t), rtol=1e-5, atol=1e-6)
        target = eps if prediction_type == "epsilon" else sched.get_velocity(x0, eps, t)
        per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        if gamma:
            snr = compute_snr(sched, t)
            per_sample = per_sample * snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)
        torch.testing.assert_close(loss, per_sample.mean(), rtol=1e-5, atol=1e-7)
        assert unet.seen["context"] is context and torch.equal(unet.seen["t"], t)


def test_min_snr_weighting_down_weights_only_easy_steps():
    sched = noise_scheduler(profile_config("tiny", prediction_type="epsilon"))
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    unet = Recorder(torch.zeros(2, 3, 4, 4))
    for t, lighter in ((torch.tensor([1, 2]), True), (torch.tensor([900, 990]), False)):
        plain = diffusion_loss(unet, x0, None, eps, t, sched.alphas_cumprod, "epsilon")
        weighted = diffusion_loss(unet, x0, None, eps, t, sched.alphas_cumprod, "epsilon", 5.0)
        assert (float(weighted) < 0.5 * float(plain)) == lighter  # SNR >> 5 at t=1; SNR < 5 keeps weight 1


def test_ema_halves_the_distance_every_halflife_and_ramps_up():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, halflife_images=100)
    torch.nn.init.ones_(model.weight)
    for _ in range(10):
        ema.update(model, images=10)  # 100 images = one half-life
    assert ema.weights[0].item() == pytest.approx(0.5, rel=1e-6)
    ramped = EMA(model, halflife_images=1e6, rampup=0.5)
    ramped.update(model, images=10)  # half-life min(1e6, 0.5 * 10) = 5 images: two half-lives in one step
    assert ramped.weights[0].item() == pytest.approx(1.0, rel=1e-6)  # started at the current weights already
    torch.nn.init.zeros_(model.weight)
    ramped.update(model, images=10)  # seen 20: half-life 10 images
    assert ramped.weights[0].item() == pytest.approx(0.5, rel=1e-6)
    assert ramped.halflife() == 10 and math.isclose(EMA(model, 7).halflife(), 7)


def test_ema_state_round_trips_and_copies_into_a_model():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ema = EMA(a, 50, rampup=0.1)
    ema.update(b, 8)
    state = ema.state_dict()
    assert set(state) == {"weight", "bias", "images_seen"} and int(state["images_seen"]) == 8
    again = EMA(torch.nn.Linear(3, 2), 50, rampup=0.1)
    again.load_state_dict(state)
    assert again.images_seen == 8 and all(torch.equal(x, y) for x, y in zip(again.weights, ema.weights))
    target = again.copy_to(torch.nn.Linear(3, 2))
    assert torch.equal(target.weight, ema.weights[0]) and torch.equal(target.bias, ema.weights[1])
