"""Mixed precision by the card (one decision for training, the fit measurement and sampling; on a CPU by the use too) and
fp16's safeguards."""
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


@pytest.mark.parametrize("native", ["AMX", "AVX512-BF16", None])
def test_explicit_values_are_honoured_or_explained_on_any_cpu_for_both_uses(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: native)
    for use in ("train", "sample"):
        assert decide("no", "cpu", use=use).mode == "no" and "as set" in decide("no", "cpu", use=use).reason
        assert decide("fp16", "cpu", use=use).mode == "no" and "needs a GPU" in decide("fp16", "cpu", use=use).reason
        assert decide("bf16", "cpu", use=use).mode == "bf16"  # CPU autocast does bf16 (bench_fit's memory figures)
    monkeypatch.setattr(precision, "capability", lambda device: (7, 5))
    emulated = decide("bf16", "cuda")
    assert emulated.mode == "bf16" and "emulated" in emulated.reason  # as set, with the warning
    assert decide("no", "cuda").mode == "no"
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        decide("fp8", "cuda")
    with pytest.raises(ValueError, match="use='infer'"):
        decide("auto", "cpu", use="infer")


@pytest.mark.parametrize("native", ["AMX", "AVX512-BF16"])
def test_auto_on_a_cpu_with_native_bf16_samples_in_bf16_and_trains_in_fp32(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: native)
    sampling, training = decide("auto", "cpu", use="sample"), decide("auto", "cpu", use="train")
    assert sampling.mode == "bf16" and sampling.dtype == torch.bfloat16
    assert f"natively ({native}" in sampling.reason and "training stays fp32" in sampling.reason
    assert training.mode == "no" and training.dtype is None
    assert "0.74x" in training.reason and native in training.reason
    assert decide("auto", "cpu").mode == "no"  # the default use is training: callers that do not say get fp32
    assert decide("auto", "mps", use="sample").mode == "no"  # only the CPU's own autocast is measured


def test_auto_on_a_cpu_without_native_bf16_is_fp32_for_both_uses(monkeypatch):
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: None)  # e.g. an AVX2 laptop: bf16 would be emulated
    for use in ("train", "sample"):
        chosen = decide("auto", "cpu", use=use)
        assert chosen.mode == "no" and "no native bf16" in chosen.reason


@pytest.mark.parametrize("cc", [(9, 0), (7, 5), (6, 0)])
def test_the_use_changes_nothing_on_cuda(monkeypatch, cc):
    monkeypatch.setattr(precision, "capability", lambda device: cc)
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: "AMX")  # the host CPU plays no part
    for requested in precision.MODES:
        assert decide(requested, "cuda", use="sample") == decide(requested, "cuda", use="train")


@pytest.mark.parametrize("flags, native", [
    ({"amx_bf16": True, "avx512_bf16": True}, "AMX"),  # Sapphire Rapids and later
    ({"amx_bf16": False, "avx512_bf16": True}, "AVX512-BF16"),  # Cooper Lake, AMD Zen 4
    ({"amx_bf16": False, "avx512_bf16": False, "avx2": True}, None),  # emulated: fp32
])
def test_native_bf16_is_read_from_torchs_cpuinfo(monkeypatch, flags, native):
    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: flags, raising=False)
    assert precision.cpu_native_bf16() == native


def test_native_bf16_falls_back_to_proc_cpuinfo_without_torchs_private_api(monkeypatch):
    monkeypatch.delattr(torch._C._cpu, "_get_cpu_capability", raising=False)
    monkeypatch.setattr(precision, "_proc_cpuinfo_flags", lambda: {"avx2", "avx512_bf16"})
    assert precision.cpu_native_bf16() == "AVX512-BF16"
    monkeypatch.setattr(precision, "_proc_cpuinfo_flags", lambda: {"avx2", "fma"})
    assert precision.cpu_native_bf16() is None


def test_config_and_precision_name_the_same_modes():
    from helpers.config import MIXED_PRECISION

    assert MIXED_PRECISION == precision.MODES


def test_sampling_and_the_fit_measurement_use_the_one_decision(monkeypatch):
    """With the card mocked as sm_80, the sampler's and measure_step's U-Net calls run in bf16 (on the CPU); with the
    CPU mocked as having AMX only the sampler's do."""
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

    def run_both():  # (dtypes the sampler's U-Net calls saw, dtypes measure_step's saw)
        seen.clear()
        sample_latents(unet, make_scheduler("ddim", schedule), cond, cond[:1], [0, 1], Setting(steps=2),
                       latent_shape=(3, 8, 8))
        sampled = set(seen)
        seen.clear()
        batch = (torch.randn(2, 3, 8, 8), cond, torch.randn(2, 3, 8, 8), torch.tensor([10, 500]))
        measure_step(cfg, unet, batch, steps=1, warmup=0)
        return sampled, set(seen)

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: None)
    assert run_both() == ({torch.float32}, {torch.float32})  # a CPU without native bf16: fp32
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: "AMX")
    assert run_both() == ({torch.bfloat16}, {torch.float32})  # AMX: sampling bf16, training fp32
    monkeypatch.setattr(precision, "capability", lambda device: (8, 0))
    assert run_both() == ({torch.bfloat16}, {torch.bfloat16})


BF16_EPS = 2.0 ** -8  # bf16 keeps 8 significant bits (~2.4 decimal digits): its relative rounding step


def test_sampling_in_the_decided_cpu_bf16_gives_finite_images_close_to_fp32(monkeypatch, tmp_path, capsys):
    """The real thing on this CPU (bf16 autocast runs on any CPU, emulated where not native): the images differ from
    fp32's by bf16's rounding, a few of its steps, and the decision is printed once where sampling starts."""
    import dataclasses

    from helpers.sample import sample_images
    from helpers.setting import Setting
    from test_sample import PROMPTS, tiny_model

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: "AMX")
    monkeypatch.setattr(precision, "_reported", set())
    model = tiny_model(tmp_path)  # mixed_precision "auto"
    setting = Setting(guidance=3.0, steps=4, scheduler="ddim")
    bf16 = sample_images(model, PROMPTS, [1, 2, 3], setting)
    sample_images(model, PROMPTS[:1], [1], setting)
    fp32 = sample_images(dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, mixed_precision="no")),
                         PROMPTS, [1, 2, 3], setting)
    printed = capsys.readouterr().out
    assert printed.count("Sampling on cpu: bf16 autocast for sampling") == 1  # once, not per call
    assert "Sampling on cpu: fp32 on cpu as set" in printed
    diff = (bf16 - fp32).abs()
    assert torch.isfinite(bf16).all() and 0 < diff.max()  # bf16 really ran
    # images in [-1, 1]: a few bf16 steps on average (measured ~1), a handful at worst (measured ~7)
    assert diff.mean() < 4 * BF16_EPS and diff.max() < 32 * BF16_EPS, (diff.mean(), diff.max())


class FakeScaler:
    def __init__(self, scale):
        self.scale = scale

    def get_scale(self):
        return self.scale


def test_fp16_skipped_steps_are_counted_and_a_collapsed_scale_stops():
    # GradScaler halves its scale after exactly the steps it skipped, and grows it after a run of good ones
    accelerator = types.SimpleNamespace(scaler=FakeScaler(65536.0))
    watch = LossScaleWatch(accelerator)
    for scale in (32768.0, 16384.0, 16384.0, 32768.0):  # skipped, skipped, taken, taken (and grown)
        accelerator.scaler.scale = scale
        watch.after_step()
    assert watch.skipped == 2 and watch.problem(3) is None
    accelerator.scaler.scale = 0.25
    line = watch.problem(40)
    assert "collapsed to 0.25 by step 40" in line and "2 steps skipped" in line and "\n" not in line
    assert LossScaleWatch(types.SimpleNamespace(scaler=None)).problem(1) is None  # bf16/fp32: nothing to watch
