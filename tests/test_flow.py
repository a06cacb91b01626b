"""Flow matching (prediction_type "flow_prediction"): the loss and the draw of t as their equations, sampling a known
Gaussian with its exact velocity, immiscible noise pairing, what a flow run refuses, and a tiny run end to end."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from helpers.config import profile_config
from helpers.diffusion import Objective, flow_matching_loss, flow_times, immiscible_pairing
from helpers.model import noise_scheduler
from helpers.sample import guided_steps, make_scheduler, noise_level, sample_latents
from helpers.schedulers import FLOW_SCHEDULERS, schedulers_for
from helpers.setting import Setting

FLOW = dict(prediction_type="flow_prediction", min_snr_gamma=0.0)


class Recorder(torch.nn.Module):
    def __init__(self, prediction):
        super().__init__()
        self.prediction, self.seen = prediction, {}

    def forward(self, x_t, t, encoder_hidden_states):
        self.seen = dict(x_t=x_t, t=t)
        return type("Out", (), {"sample": self.prediction})()


def test_flow_loss_is_its_equation_on_a_hand_computed_case():
    # x0 = 2, eps = -1 everywhere: x_t = (1 - t) 2 - t = 2 - 3t, target eps - x0 = -3
    x0, eps = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), -1.0)
    t = torch.tensor([0.25, 0.5])
    unet = Recorder(torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), -3.0)]))  # errors 3 and 0
    loss = flow_matching_loss(unet, x0, None, eps, t, 1000)
    assert float(loss) == pytest.approx((9 + 0) / 2)
    torch.testing.assert_close(unet.seen["x_t"][:, 0, 0, 0], torch.tensor([1.25, 0.5]))
    torch.testing.assert_close(unet.seen["t"], torch.tensor([250.0, 500.0]))  # what flow schedulers feed it
    objective = Objective("flow_prediction", 1000, min_snr_gamma=0.0)
    assert float(objective.loss(unet, x0, None, eps, t)) == pytest.approx(4.5)


def test_logit_normal_times_are_diffusers_density_and_the_mean_shifts_them():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    for density, mean in (("logit_normal", 0.0), ("logit_normal", 0.8), ("uniform", 0.0)):
        ours = flow_times(5000, density, mean, 1.0, torch.Generator().manual_seed(3), "cpu")
        theirs = compute_density_for_timestep_sampling(density, 5000, mean, 1.0,
                                                       generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours, theirs)
        assert 0 < float(ours.min()) and float(ours.max()) < 1
        # the median of sigmoid(N(mean, 1)) is sigmoid(mean); of U(0, 1) it is 1/2; 5000 draws: sd ~0.007
        assert float(ours.median()) == pytest.approx(1 / (1 + math.exp(-mean)), abs=0.03)
    ddpm = Objective("epsilon", 1000).draw_t(64, torch.Generator().manual_seed(0), "cpu")
    assert ddpm.dtype == torch.int64 and 0 <= int(ddpm.min()) and int(ddpm.max()) < 1000


def test_immiscible_pairing_is_the_least_total_distance_permutation():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 2, 3, 3, generator=g), torch.randn(6, 2, 3, 3, generator=g)
    paired = immiscible_pairing(x0, eps)
    order = [next(j for j in range(6) if torch.equal(paired[i], eps[j])) for i in range(6)]
    assert sorted(order) == list(range(6))  # a permutation: every noise used once
    cost = lambda perm: sum(float((x0[i] - eps[p]).square().sum()) for i, p in enumerate(perm))
    assert cost(order) == pytest.approx(min(cost(p) for p in itertools.permutations(range(6))), rel=1e-6)
    assert cost(order) < cost(range(6))
    assert Objective("epsilon", 1000).pair_noise(x0, eps) is eps
    assert torch.equal(Objective("epsilon", 1000, immiscible=True).pair_noise(x0, eps), paired)


class GaussianVelocity(torch.nn.Module):
    """The exact velocity E[eps - x0 | x_t = x] when x0 ~ N(mu, s^2) per pixel: x_t ~ N((1 - t) mu, var_t) with
    var_t = (1 - t)^2 s^2 + t^2, and u(x, t) = (t - (1 - t) s^2) / var_t * (x - (1 - t) mu) - mu."""

    def __init__(self, mu: float, s: float):
        super().__init__()
        self.mu, self.s = mu, s
        self.unused = torch.nn.Parameter(torch.zeros(()))  # the sampler reads device and dtype off a parameter

    def forward(self, x, timestep, encoder_hidden_states=None, return_dict=False):
        t = torch.as_tensor(timestep, dtype=torch.float64) / 1000
        var = (1 - t) ** 2 * self.s ** 2 + t ** 2
        u = (t - (1 - t) * self.s ** 2) / var * (x.double() - (1 - t) * self.mu) - self.mu
        return (u.float(),)


@pytest.mark.parametrize("scheduler", list(FLOW_SCHEDULERS))
def test_sampling_the_exact_velocity_of_a_gaussian_recovers_it(scheduler):
    mu, s = 1.5, 0.5
    config = dict(noise_scheduler(profile_config("tiny", **FLOW)).config)
    sampler = make_scheduler(scheduler, config)
    seeds = list(range(8))
    cond, uncond = torch.zeros(len(seeds), 2, 4), torch.zeros(1, 2, 4)
    steps = 100 if scheduler == "euler" else 20  # Euler's error is first order: 3.5 % of the sd at 40 steps
    x = sample_latents(GaussianVelocity(mu, s), sampler, cond, uncond, seeds,
                       Setting(guidance=1.0, steps=steps, scheduler=scheduler), latent_shape=(1, 32, 32))
    # 8192 samples: the sample mean's sd is s / 90 = 0.006, the sample sd's ~0.8 %
    assert float(x.mean()) == pytest.approx(mu, abs=0.025)
    assert float(x.std()) == pytest.approx(s, rel=0.03)
    within_one_sd = float(((x - mu).abs() < s).float().mean())
    assert within_one_sd == pytest.approx(0.6827, abs=0.02)  # Gaussian in shape too, not only in two moments


def test_flow_schedules_state_sigma_as_t_over_1_minus_t_and_refuse_other_solvers():
    config = dict(noise_scheduler(profile_config("tiny", **FLOW)).config)
    euler = make_scheduler("euler", config)
    assert noise_level(euler, 500) == pytest.approx(1.0) and noise_level(euler, 800) == pytest.approx(4.0)
    assert noise_level(euler, 1000) == math.inf  # pure noise
    assert schedulers_for(config) == list(FLOW_SCHEDULERS)
    with pytest.raises(ValueError, match="'ddim' cannot sample a flow-matching run.*euler, dpm\\+\\+2m, unipc"):
        make_scheduler("ddim", config)
    # euler at 5 steps visits t = 1, .75, .5, .25, .001: sigma inf, 3, 1, 1/3, 0.001; (0.3, 5] guides three
    assert guided_steps(config, Setting(guidance=3.0, steps=5, scheduler="euler", guidance_interval=(0.3, 5.0))) \
        == (3, 5)


def test_a_flow_run_config_names_what_it_cannot_combine_with():
    with pytest.raises(ValueError, match="min_snr_gamma=5.0 weights epsilon / v_prediction losses: set 0"):
        profile_config("tiny", prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="scheduler='ddim' cannot sample prediction_type='flow_prediction'"):
        profile_config("tiny", scheduler="ddim", **FLOW)
    with pytest.raises(ValueError, match="timestep_density='normal' is not one of uniform, logit_normal"):
        profile_config("tiny", timestep_density="normal", **FLOW)
    with pytest.raises(ValueError, match="logit_std=0.0 must be greater than 0"):
        profile_config("tiny", logit_std=0.0, **FLOW)
    assert profile_config("tiny", logit_mean=-0.5, **FLOW).logit_mean == -0.5


def test_a_flow_run_resumes_exactly_and_goes_through_post_hoc_ema_autoguidance_sweep_and_panel(tmp_path, course_dir):
    from safetensors.torch import load_file

    from helpers.model import load_model
    from helpers.panel import make_panel
    from helpers.sample import sample_images
    from helpers.selection import sweep_settings
    from helpers.weights import with_setting
    from helpers.staged import staged_sweep
    from helpers.train import train
    from helpers.trainlog import read_log
    from judges_for_tests import BrightJudge
    from test_train import make_run

    settings = dict(max_steps=4, checkpoint_every=2, snapshot_every=2, logit_mean=0.5, immiscible_noise=True,
                    scheduler="dpm++2m", offset_noise=0.1, **FLOW)
    a = make_run(tmp_path / "a", course_dir, **settings)
    train(a, progress=False)
    b = make_run(tmp_path / "b", course_dir, **settings)
    train(b, progress=False, stop_at=2)
    assert train(b, progress=False).resumed_from.endswith("step-000002")
    assert read_log(b)["loss"] == pytest.approx(read_log(a)["loss"], rel=1e-5, abs=1e-6)
    for folder in ("unet", "unet_ema"):
        wa, wb = (load_file(str(c.run_dir / "model" / folder / "diffusion_pytorch_model.safetensors")) for c in (a, b))
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)

    model = load_model(b)
    assert model.scheduler_config["prediction_type"] == "flow_prediction"
    s = Setting(snapshot="step-000004", guidance=2.0, steps=3, scheduler="unipc", guidance_interval=(0.3, 5.0),
                ema_length=0.05, guide="step-000002", guide_weight=2.0)
    images = sample_images(with_setting(model, b, s), ["a monster number 1."], [3], s, batch_size=1)
    assert images.shape[0] == 1 and images.isfinite().all()
    settings = sweep_settings(Setting(scheduler="dpm++2m"), snapshot=b.layout.snapshot_names(), guidance=[1.0, 4.0],
                              steps=[2])
    rows, _ = staged_sweep(model, b, BrightJudge(), settings, ["a monster number 1.", "a monster number 2."], [5, 6],
                           batch_size=2, stage_prompts=[], budget_hours=0, progress=False)
    assert len({r["clip_t"] for r in rows}) == 4  # snapshot and guidance both change the flow run's images
    panel = make_panel(model, setting=Setting("model", 3.0, 4, "dpm++2m", (0.3, 5.0)), n=1)
    assert list(panel.c["scheduler"].options) == list(FLOW_SCHEDULERS)
    # the panel opens at the run's choice: 3 dpm++2m flow steps, t = .999, .666, .333 -> sigma 999, 2, 0.5
    assert "guided at 2 of 3 steps" in panel.guided.value


def test_a_flow_run_exports_as_a_pipeline_that_gives_our_image(tmp_path):
    from diffusers import DiffusionPipeline

    from helpers.export import export_pipeline
    from helpers.sample import sample_images
    from test_sample import PROMPTS, tiny_model

    # fp32 like the exported pipeline ("auto" samples bf16 on a CPU with AMX or AVX512-BF16)
    model = tiny_model(tmp_path, "tiny", scheduler="dpm++2m", mixed_precision="no", **FLOW)
    with pytest.raises(ValueError, match="StableDiffusionPipeline cannot drive FlowMatchEulerDiscreteScheduler"):
        export_pipeline(model, tmp_path / "euler", scheduler="euler")
    pipe = DiffusionPipeline.from_pretrained(export_pipeline(model, tmp_path / "pipe"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "flow_prediction" and pipe.scheduler.config.use_flow_sigmas
    theirs = pipe(PROMPTS[0], num_inference_steps=5, guidance_scale=3.0, height=16, width=16, output_type="pt",
                  generator=torch.Generator().manual_seed(3)).images[0]
    ours = sample_images(model, [PROMPTS[0]], [3], Setting(guidance=3.0, steps=5, scheduler="dpm++2m"))[0]
    assert torch.allclose((ours + 1) / 2, theirs, atol=1e-4), (ours / 2 + 0.5 - theirs).abs().max()
