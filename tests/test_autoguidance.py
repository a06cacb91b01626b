"""Autoguidance in the sampler (helpers.sample.sample_latents): the formula, neutral cases, U-Net call counts."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers.sample import make_scheduler, sample_latents
from helpers.setting import Setting

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


def denoise(unet, guide=None, w=1.0, g=3.0, interval=(), steps=4, scheduler="dpm++2m"):
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 4, 32, generator=gen), torch.zeros(1, 4, 32)
    setting = Setting(guidance=g, steps=steps, scheduler=scheduler, guidance_interval=interval,
                      guide="step-000001" if guide is not None else "", guide_weight=w)
    return sample_latents(unet, make_scheduler(scheduler, TRAIN_SCHEDULE), cond, uncond, [5, 6, 7], setting,
                          latent_shape=SHAPE, guide_unet=guide)


def test_the_combined_prediction_is_the_documented_formula(monkeypatch):
    from diffusers import DDIMScheduler

    seen = []
    original = DDIMScheduler.step
    monkeypatch.setattr(DDIMScheduler, "step", lambda self, eps, t, x, **kw: (seen.append(eps), original(
        self, eps, t, x, **kw))[1])
    main, guide = Constant(0.5), Constant(0.2)
    g, w, c = 3.0, 2.5, 0.7
    cond, uncond = torch.full((2, 4, 32), c), torch.zeros(1, 4, 32)
    setting = Setting(guidance=g, steps=2, scheduler="ddim", guide="step-000001", guide_weight=w)
    sample_latents(main, make_scheduler("ddim", TRAIN_SCHEDULE), cond, uncond, [0, 1], setting, latent_shape=SHAPE,
                   guide_unet=guide)
    eps_c, eps_u, eps_guide = 0.5 + c, 0.5, 0.2 + c
    want = eps_c + (g - 1) * (eps_c - eps_u) + (w - 1) * (eps_c - eps_guide)
    assert len(seen) == 2 and all(torch.allclose(e, torch.full_like(e, want), atol=1e-6) for e in seen)


def test_guide_weight_1_gives_the_images_of_no_guide_and_never_calls_it(nets):
    main, bad = nets
    guide = Counting(bad)
    assert torch.equal(denoise(main, guide, w=1.0), denoise(main))
    assert guide.batches == []


@pytest.mark.parametrize("w", [0.5, 2.0, 4.0])
def test_a_guide_identical_to_the_main_net_changes_nothing(nets, w):
    main, _ = nets
    same = copy.deepcopy(main)
    # eps_c - eps_guide is 0 up to float rounding (the main net sees 2B inputs on CFG steps, the guide B)
    torch.testing.assert_close(denoise(main, same, w=w, interval=(0.3, 5.0)), denoise(main, interval=(0.3, 5.0)),
                               rtol=1e-4, atol=1e-5)


def test_a_worse_guide_changes_the_images(nets):
    main, bad = nets
    assert (denoise(main, bad, w=2.0) - denoise(main)).abs().max() > 1e-2


@pytest.mark.parametrize("g, w, interval", [(3.0, 2.0, (0.3, 5.0)), (1.0, 2.0, ()), (3.0, 1.0, ()),
                                            (3.0, 2.0, ())])
def test_one_extra_unet_call_per_step_only_while_the_guide_is_active(nets, g, w, interval):
    main, bad = nets
    counted_main, counted_guide = Counting(main), Counting(bad)
    steps, batch = 6, 3
    from helpers.sample import guided_steps

    cfg_steps, _ = guided_steps(TRAIN_SCHEDULE, Setting(guidance=g, steps=steps, guidance_interval=interval))
    denoise(counted_main, counted_guide, w=w, g=g, interval=interval, steps=steps)
    assert sorted(counted_main.batches) == sorted([2 * batch] * cfg_steps + [batch] * (steps - cfg_steps))
    assert counted_guide.batches == ([batch] * steps if w != 1.0 else [])
    if interval:
        assert 0 < cfg_steps < steps  # the interval test really mixes CFG and plain steps


# ---------------------------------------------------------------- settings, loading and the sweep


def test_setting_names_and_checks_its_ema_length_and_guide():
    s = Setting(snapshot="step-000004", guidance=2, guide="step-000002", guide_weight=2, ema_length=0.07)
    assert "step-000004 (EMA length 0.07)" in s.label() and "autoguided by step-000002 × 2" in s.label()
    assert Setting.from_dict(s.to_dict()) == s and s.autoguided
    assert not Setting(guide="step-000002").autoguided and not Setting(guide_weight=3.0).autoguided
    problems = " ".join(Setting(ema_length=0.5, guide_weight=float("nan"), guide=3).problems())
    assert "ema_length=0.5" in problems and "guide_weight=nan" in problems and "guide=3" in problems
    with pytest.raises(ValueError, match="ema_length"):
        Setting.from_dict({**Setting().to_dict(), "ema_length": -1})


def test_sweep_leaves_out_autoguidance_cells_that_cannot_differ():
    from helpers.selection import sweep_settings

    settings = sweep_settings(Setting(steps=2), snapshot=["step-000002", "step-000004", "model"], guidance=[1.0],
                              guide=["", "step-000002"], guide_weight=[1.0, 2.0], ema_length=[0.0, 0.05])
    got = [(s.snapshot, s.ema_length, s.guide, s.guide_weight) for s in settings]
    no_guide = [(snap, e, "", 1.0) for snap in ("step-000002", "step-000004", "model") for e in (0.0, 0.05)]
    guided = [(snap, e, "step-000002", 2.0) for snap in ("step-000004", "model") for e in (0.0, 0.05)]
    assert sorted(got) == sorted(no_guide + guided) and len(got) == len(set(got))
    keys = [(s.snapshot, s.ema_length, s.guide) for s in settings]  # each set of weights in one run of cells
    assert all(keys.index(k) == i or keys[i - 1] == k for i, k in enumerate(keys))


def test_sweep_says_when_a_guide_asked_for_has_no_cell_left(capsys):
    from helpers.selection import sweep_settings

    # one snapshot, and 'first' resolved to it: nothing is trained longer than the guide
    settings = sweep_settings(Setting(steps=2), snapshot=["step-000002"], guide=["", "step-000002"],
                              guide_weight=[2.0])
    assert [s.guide for s in settings] == [""]
    out = capsys.readouterr().out
    assert "guide 'step-000002' is left out of the sweep" in out and "(step-000002)" in out
    sweep_settings(Setting(steps=2), snapshot=["step-000002", "model"], guide=["", "step-000002"], guide_weight=[2.0])
    assert "left out" not in capsys.readouterr().out  # the guide keeps a cell: nothing to say


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import write_course_dataset
    from test_train import make_run

    from helpers.train import train

    root = tmp_path_factory.mktemp("ag")
    cfg = make_run(root, write_course_dataset(root / "course"), max_steps=4, snapshot_every=2, checkpoint_every=4)
    train(cfg, progress=False)  # tiny profile: post-hoc EMA profiles stored with each snapshot (steps 2 and 4)
    return cfg


def test_with_setting_loads_the_rebuilt_ema_and_the_guide(run, capsys):
    from safetensors.torch import load_file

    from helpers.model import load_model
    from helpers.sample import sample_images
    from helpers.weights import setting_weights_id, with_setting

    model = load_model(run)
    s = Setting(snapshot="step-000004", guidance=2.0, steps=2, scheduler="ddim", ema_length=0.05,
                guide="step-000002", guide_weight=2.0)
    loaded = with_setting(model, run, s)
    assert "step-000004: EMA length 0.05 at step 4 rebuilt from 4 stored profiles: its weight profile is 0.0% off" \
        in capsys.readouterr().out
    stored = load_file(str(run.layout.phema / "step-000004" / "phema-0.050.safetensors"))
    unet = dict(loaded.unet.named_parameters())
    for name, w in stored.items():  # a stored length comes back as stored (x = e_i up to float64 rounding)
        torch.testing.assert_close(unet[name].detach(), w.float(), rtol=1e-6, atol=1e-7)
    guide = load_file(str(run.layout.snapshots / "step-000002" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(dict(loaded.guide_unet.named_parameters())[k].detach(), v) for k, v in guide.items())
    images = sample_images(loaded, ["a monster number 1."], [3], s, batch_size=1)
    assert images.shape[0] == 1 and images.isfinite().all()
    with pytest.raises(ValueError, match="load it with helpers.weights.with_setting"):
        sample_images(model, ["a monster number 1."], [3], s)  # a model loaded for another setting
    from diffusers import UNet2DConditionModel

    from helpers.weights import setting_unet_folder

    folder = setting_unet_folder(run, s)  # what a hand-in would pack as its U-Net
    saved = dict(UNet2DConditionModel.from_pretrained(folder).named_parameters())
    assert all(torch.equal(saved[k].detach(), v.detach()) for k, v in loaded.unet.named_parameters())
    assert setting_unet_folder(run, s.replace(ema_length=0.0)) == run.layout.snapshots / "step-000004"
    ids = {setting_weights_id(run, x) for x in (s, s.replace(ema_length=0.0), s.replace(guide_weight=1.0))}
    assert len(ids) == 3 and any("guide:" in i for i in ids)


def test_sweep_over_ema_lengths_and_guides_loads_each_weight_set_once(run, monkeypatch, capsys):
    import helpers.selection as selection
    import helpers.weights as weights
    from helpers.model import load_model

    loads = []
    real = weights.with_setting
    monkeypatch.setattr(weights, "with_setting", lambda m, c, s: loads.append(s) or real(m, c, s))
    axes = selection.sweep_axes(run, snapshots=["step-000004"], guidances=[2.0], steps_list=[2],
                                ema_lengths=[0.0, 0.07], guides=["", "step-000002"], guide_weights=[2.0])
    settings = selection.sweep_settings(Setting(scheduler="ddim"), **axes)
    assert len(settings) == 4

    from helpers.staged import staged_sweep
    from judges_for_tests import BrightJudge

    sweep = lambda: staged_sweep(load_model(run), run, BrightJudge(), settings, ["a monster number 2."], [1],  # noqa: E731
                                 batch_size=1, stage_prompts=[], budget_hours=0, progress=False)[0]
    rows = sweep()
    assert len(loads) == 4 and len({r["weights"] for r in rows}) == 4 and len({r["clip_t"] for r in rows}) == 4
    again = sweep()
    assert again == rows and len(loads) == 4 and "stage 1 was sampled earlier" in capsys.readouterr().out


def test_sweep_axes_of_ema_and_guides_come_from_the_config_and_are_checked(run):
    from helpers.selection import sweep_axes

    axes = sweep_axes(run)
    assert (axes["ema_length"], axes["guide"], axes["guide_weight"]) == ([0.0], [""], [1.0])
    with pytest.raises(ValueError, match="guides: 'step-00002' is not a snapshot of run .* did you mean 'step-000002'"):
        sweep_axes(run, guides=["step-00002"])
    with pytest.raises(ValueError, match="ema_lengths: ema_length=0.4"):
        sweep_axes(run, ema_lengths=[0.4])
