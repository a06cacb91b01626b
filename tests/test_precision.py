"""Mixed precision by the card (one decision for training, the fit measurement and sampling) and fp16's safeguards."""
from __future__ import annotations

import types

import pytest
import torch

import helpers.precision as precision
from helpers.precision import LossScaleWatch, decide


@pytest.mark.parametrize("cc, mode, words", [
    ((9, 0), "bf16", "natively"),  # H100
    ((8, 0), "bf16", "natively"),  # A100
    ((7, 5), "fp16", "loss scaling"),  # T4
    ((7, 0), "fp16", "no bf16 units"),  # V100
    ((6, 0), "fp16", "little or no speed"),  # P100
])
def test_auto_picks_what_the_card_computes_natively(monkeypatch, cc, mode, words):
    monkeypatch.setattr(precision, "capability", lambda device: cc)
    chosen = decide("auto", "cuda")
    assert chosen.mode == mode and words in chosen.reason and f"sm_{cc[0]}{cc[1]}" in chosen.reason
    assert chosen.loss_scaling == (mode == "fp16")


def test_auto_is_fp32_on_a_cpu_and_explicit_values_are_honoured_or_explained(monkeypatch):
    assert decide("auto", "cpu").mode == "no" and decide("auto", "cpu").dtype is None
    assert decide("fp16", "cpu").mode == "no" and "needs a GPU" in decide("fp16", "cpu").reason
    assert decide("bf16", "cpu").mode == "bf16"  # CPU autocast does bf16 (bench_fit's memory figures)
    monkeypatch.setattr(precision, "capability", lambda device: (7, 5))
    emulated = decide("bf16", "cuda")
    assert emulated.mode == "bf16" and "emulated" in emulated.reason  # as set, with the warning
    assert decide("no", "cuda").mode == "no"
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        decide("fp8", "cuda")


def test_config_and_precision_name_the_same_modes():
    from helpers.config import MIXED_PRECISION

    assert MIXED_PRECISION == precision.MODES


def test_sampling_and_the_fit_measurement_use_the_one_decision(monkeypatch):
    """With the card mocked as sm_80, the sampler's and measure_step's U-Net calls run in bf16 (on the CPU)."""
    from helpers.config import profile_config
    from helpers.fit import measure_step
    from helpers.sample import make_scheduler, sample_latents
    from helpers.setting import Setting
    from helpers.unet import build_unet

    cfg = profile_config("tiny")
    unet = build_unet("tiny", in_channels=3, cross_attention_dim=32, sample_size=8, seed=0)
    seen = []
    unet.conv_in.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    cond = torch.randn(2, 4, 32)
    schedule = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")

    def run_both():
        seen.clear()
        sample_latents(unet, make_scheduler("ddim", schedule), cond, cond[:1], [0, 1], Setting(steps=2),
                       latent_shape=(3, 8, 8))
        batch = (torch.randn(2, 3, 8, 8), cond, torch.randn(2, 3, 8, 8), torch.tensor([10, 500]))
        measure_step(cfg, unet, batch, steps=1, warmup=0)
        return set(seen)

    assert run_both() == {torch.float32}  # a CPU: fp32
    monkeypatch.setattr(precision, "capability", lambda device: (8, 0))
    assert run_both() == {torch.bfloat16}


class FakeScaler:
    def __init__(self, scale):
        self.scale = scale

    def get_scale(self):
        return self.scale


def test_fp16_skipped_steps_are_counted_and_a_collapsed_scale_stops():
    accelerator = types.SimpleNamespace(scaler=FakeScaler(65536.0), optimizer_step_was_skipped=True)
    watch = LossScaleWatch(accelerator)
    watch.after_step()
    watch.after_step()
    accelerator.optimizer_step_was_skipped = False
    watch.after_step()
    assert watch.skipped == 2 and watch.problem(3) is None
    accelerator.scaler.scale = 0.25
    line = watch.problem(40)
    assert "collapsed to 0.25 by step 40" in line and "2 steps skipped" in line and "\n" not in line
    assert LossScaleWatch(types.SimpleNamespace(scaler=None)).problem(1) is None  # bf16/fp32: nothing to watch
