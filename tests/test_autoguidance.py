"""Autoguidance in the sampler (helpers.sample.sample_latents): the formula, neutral cases, U-Net call counts."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers.sample import make_scheduler, sample_latents

TRAIN_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}
SHAPE = (3, 8, 8)


class Counting(torch.nn.Module):
    """Wraps a U-Net and records the batch size of every call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.batches = unet, []

    def forward(self, x, t, encoder_hidden_states=None, return_dict=False):
        self.batches.append(x.shape[0])
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, return_dict=return_dict)


class Constant(torch.nn.Module):
    """eps = value + mean of the caption embedding: eps_c, eps_u and eps_guide are known numbers."""

    def __init__(self, value: float):
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(float(value)))

    def forward(self, x, t, encoder_hidden_states=None, return_dict=False):
        return (x * 0 + self.value + encoder_hidden_states.float().mean(dim=(1, 2)).view(-1, 1, 1, 1),)


@pytest.fixture(scope="module")
def nets():
    from helpers.unet import build_unet

    main = build_unet("tiny", in_channels=3, cross_attention_dim=32, sample_size=8, seed=0).eval()
    bad = build_unet("tiny", in_channels=3, cross_attention_dim=32, sample_size=8, seed=1).eval()
    return main, bad


def run(unet, guide=None, w=1.0, g=3.0, interval=None, steps=4, scheduler="dpm++2m"):
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 4, 32, generator=gen), torch.zeros(1, 4, 32)
    return sample_latents(unet, make_scheduler(scheduler, TRAIN_SCHEDULE), cond, uncond, [5, 6, 7], guidance=g,
                          steps=steps, guidance_interval=interval, latent_shape=SHAPE, guide_unet=guide,
                          guide_weight=w)


def test_the_combined_prediction_is_the_documented_formula(monkeypatch):
    from diffusers import DDIMScheduler

    seen = []
    original = DDIMScheduler.step
    monkeypatch.setattr(DDIMScheduler, "step", lambda self, eps, t, x, **kw: (seen.append(eps), original(
        self, eps, t, x, **kw))[1])
    main, guide = Constant(0.5), Constant(0.2)
    g, w, c = 3.0, 2.5, 0.7
    cond, uncond = torch.full((2, 4, 32), c), torch.zeros(1, 4, 32)
    sample_latents(main, make_scheduler("ddim", TRAIN_SCHEDULE), cond, uncond, [0, 1], guidance=g, steps=2,
                   latent_shape=SHAPE, guide_unet=guide, guide_weight=w)
    eps_c, eps_u, eps_guide = 0.5 + c, 0.5, 0.2 + c
    want = eps_c + (g - 1) * (eps_c - eps_u) + (w - 1) * (eps_c - eps_guide)
    assert len(seen) == 2 and all(torch.allclose(e, torch.full_like(e, want), atol=1e-6) for e in seen)


def test_guide_weight_1_gives_the_images_of_no_guide_and_never_calls_it(nets):
    main, bad = nets
    guide = Counting(bad)
    assert torch.equal(run(main, guide, w=1.0), run(main))
    assert guide.batches == []


@pytest.mark.parametrize("w", [0.5, 2.0, 4.0])
def test_a_guide_identical_to_the_main_net_changes_nothing(nets, w):
    main, _ = nets
    same = copy.deepcopy(main)
    # eps_c - eps_guide is 0 up to float rounding (the main net sees 2B inputs on CFG steps, the guide B)
    torch.testing.assert_close(run(main, same, w=w, interval=(0.3, 5.0)), run(main, interval=(0.3, 5.0)),
                               rtol=1e-4, atol=1e-5)


def test_a_worse_guide_changes_the_images(nets):
    main, bad = nets
    assert (run(main, bad, w=2.0) - run(main)).abs().max() > 1e-2


@pytest.mark.parametrize("g, w, interval", [(3.0, 2.0, (0.3, 5.0)), (1.0, 2.0, None), (3.0, 1.0, None),
                                            (3.0, 2.0, None)])
def test_one_extra_unet_call_per_step_only_while_the_guide_is_active(nets, g, w, interval):
    main, bad = nets
    counted_main, counted_guide = Counting(main), Counting(bad)
    steps, batch = 6, 3
    sampler = make_scheduler("dpm++2m", TRAIN_SCHEDULE)
    sampler.set_timesteps(steps)
    from helpers.sample import guided_at, noise_level

    cfg_steps = sum(guided_at(noise_level(sampler, t), g, interval) for t in sampler.timesteps)
    run(counted_main, counted_guide, w=w, g=g, interval=interval, steps=steps)
    assert sorted(counted_main.batches) == sorted([2 * batch] * cfg_steps + [batch] * (steps - cfg_steps))
    assert counted_guide.batches == ([batch] * steps if w != 1.0 else [])
    if interval:
        assert 0 < cfg_steps < steps  # the interval test really mixes CFG and plain steps
