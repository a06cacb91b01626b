"""Fitting a run to a device: micro-batch splits, the automatic fit after an out-of-memory, measuring a step."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers import fit
from helpers.cache import load_cache
from helpers.config import PROJECT_ROOT, profile_config
from helpers.run_folder import load_config
from helpers.diffusion import diffusion_loss
from helpers.model import noise_scheduler
from helpers.train import train
from helpers.step import DeviceCache, split_backward, train_rows, unet_for_cache
from helpers.trainlog import read_log
from test_train import make_run, model_weights

# Splitting changes only the order of float32 sums (per-chunk means, gradients accumulated chunk by chunk) and the
# kernels' batch size: ~1e-7 relative. AdamW's update (lr 1e-3 here) divides by sqrt(v), which magnifies the relative
# error of tiny gradients, so weights drift by a few 1e-7 over 3 steps (measured: at most 7.2e-7 for 8 splits, loss
# 7e-8 relative): the tolerances leave ~7x room and stay 200x below one step's update. AdamW is nearly blind to a
# constant gradient scale, so the chunks' weighting is checked on the gradients themselves (first test).
LOSS_TOL = dict(rel=1e-5, abs=1e-6)
WEIGHT_TOL = dict(rtol=1e-5, atol=5e-6)


def test_split_backward_gives_the_whole_batch_gradient(tmp_path, course_dir):
    cfg = make_run(tmp_path, course_dir)
    cache = load_cache(cfg)
    batch = fit.draw_batch(cfg, DeviceCache.from_cache(cache, "cpu"), train_rows(cfg, cache))
    alphas_cumprod = noise_scheduler(cfg).alphas_cumprod
    grads, losses = [], []
    for splits in (1, 3, 8, 50):  # 3 does not divide the batch of 8; 50 is clamped to 8 chunks of one image
        unet = unet_for_cache(cfg, cache)
        loss = split_backward(lambda *c: diffusion_loss(unet, *c, alphas_cumprod, cfg.prediction_type,
                                                        cfg.min_snr_gamma), batch, splits)
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    assert losses[1:] == pytest.approx([losses[0]] * 3, **LOSS_TOL)
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-6)  # sums of 1-8 chunks: rounding only
    assert grads[0].abs().sum() > 0


def test_auto_fit_after_out_of_memory_trains_like_the_unsplit_step(tmp_path, course_dir, monkeypatch, capsys):
    """The first attempt (the configured step) fails with a CUDA out-of-memory error; auto_fit picks a split or
    checkpointing, and training gives the losses and weights of the unsplit run."""
    settings = dict(max_steps=3, checkpoint_every=3, batch_size=8)
    plain = make_run(tmp_path / "plain", course_dir, auto_fit=False, **settings)
    train(plain, progress=False)

    attempts, measure = [], fit.measure_step

    def measure_or_oom(cfg, unet, batch, micro_splits=1, gradient_checkpointing=False, **kw):
        attempts.append((micro_splits, gradient_checkpointing))
        if len(attempts) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return measure(cfg, unet, batch, micro_splits, gradient_checkpointing, **kw)

    monkeypatch.setattr(fit, "measure_step", measure_or_oom)
    monkeypatch.setattr(fit, "auto_fit_applies", lambda cfg, device: cfg.auto_fit)  # as if on CUDA
    fitted = make_run(tmp_path / "fitted", course_dir, **settings)
    train(fitted, progress=False)
    out = capsys.readouterr().out
    assert attempts[0] == (1, False) and set(attempts[1:]) == {(2, False), (1, True)}
    saved = load_config(fitted.run_dir)
    assert (saved.micro_splits, saved.gradient_checkpointing) in {(2, False), (1, True)}
    assert "auto_fit: batch 8 as configured does not fit" in out and "out of memory" in out
    assert f"Training with {'micro_splits 2' if saved.micro_splits == 2 else 'micro_splits 1, gradient'}" in out
    assert read_log(fitted)["loss"] == pytest.approx(read_log(plain)["loss"], **LOSS_TOL)
    for folder in ("unet", "unet_ema"):
        a, b = model_weights(plain, folder), model_weights(fitted, folder)
        for k in a:
            torch.testing.assert_close(b[k], a[k], **WEIGHT_TOL)


def test_a_forced_split_trains_like_the_unsplit_step(tmp_path, course_dir):
    settings = dict(max_steps=3, checkpoint_every=3, batch_size=8)
    plain, split = (make_run(tmp_path / n, course_dir, micro_splits=s, **settings) for n, s in (("a", 1), ("b", 3)))
    train(plain, progress=False)
    train(split, progress=False)
    assert read_log(split)["loss"] == pytest.approx(read_log(plain)["loss"], **LOSS_TOL)
    a, b = model_weights(plain, "unet"), model_weights(split, "unet")
    for k in a:
        torch.testing.assert_close(b[k], a[k], **WEIGHT_TOL)


def test_nothing_is_measured_or_changed_on_a_cpu_without_a_budget(tmp_path, course_dir, monkeypatch):
    monkeypatch.setattr(fit, "measure_step", lambda *a, **k: pytest.fail("measured on a CPU run without a budget"))
    cfg = make_run(tmp_path, course_dir, max_steps=2, checkpoint_every=2, auto_fit=True)
    before = cfg.to_json()
    assert train(cfg, progress=False).last_step == 2
    assert load_config(cfg.run_dir).to_json() == before


def test_plan_fit_picks_the_faster_setting_that_fits_and_says_when_nothing_does():
    def cost(splits, ckpt, peak_gb, ips):
        return fit.StepCost(64, splits, ckpt, int(peak_gb * 2**30), 16 * 2**30, ips, 2**30, "GPU", "test")

    # peak 4 GiB of states + 0.3 GiB/image / splits, checkpointing cuts activations by 4 and costs 30 % speed
    def try_step(splits, ckpt):
        peak = 4 + 0.3 * 64 / splits / (4 if ckpt else 1)
        if peak > 16:
            raise torch.cuda.OutOfMemoryError("simulated")
        return cost(splits, ckpt, peak, 100 * (0.7 if ckpt else 1) * (1 - 0.02 * splits))

    chosen, tried = fit.plan_fit(64, try_step)
    assert [t[:2] for t in tried] == [(1, False), (2, False), (1, True)]
    assert (chosen.micro_splits, chosen.gradient_checkpointing) == (2, False)  # 96 images/s against 70
    slow_split = lambda splits, ckpt: cost(splits, ckpt, 4 + 19.2 / splits / (4 if ckpt else 1), 100 / splits)
    assert fit.plan_fit(64, slow_split)[0].gradient_checkpointing  # 8 splits at 12.5 images/s lose to 100
    with pytest.raises(fit.DoesNotFitError, match="batch_size=64 does not fit .* lower batch_size"):
        fit.plan_fit(64, lambda s, c: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("simulated")))


def mocked_clock(seconds_per_call: float):
    """perf_counter for helpers.fit: each call advances by `seconds_per_call`, so a measured step takes a known time."""
    now = [1000.0]

    def clock():
        now[0] += seconds_per_call
        return now[0]
    return clock


def test_measure_run_prints_memory_speed_and_the_run_time(tmp_path, course_dir):
    cfg = make_run(tmp_path, course_dir, max_steps=40, batch_size=8)
    estimate = fit.measure_run(cfg, steps=2)
    text = estimate.describe()
    cost = estimate.cost
    assert cost.images_per_s > 0 and cost.param_bytes < cost.peak_bytes < cost.device_bytes
    assert "peak memory" in text and "images/s" in text and "40 steps x 8 images" in text
    assert estimate.seconds == pytest.approx(40 * 8 / cost.images_per_s)
    split = fit.measure_run(cfg.replace(micro_splits=4), steps=1).cost
    assert split.peak_bytes < cost.peak_bytes  # a quarter of the activations per backward


def test_config_checks_the_fit_fields():
    with pytest.raises(ValueError, match=r"micro_splits=0 must be at least 1(.|\n)*time_budget_hours=-1.0 must be"):
        profile_config("tiny", micro_splits=0, time_budget_hours=-1.0)
    with pytest.raises(ValueError, match="time_budget_hours=nan must be a finite number"):
        profile_config("tiny", time_budget_hours=float("nan"))
    assert profile_config("tiny", auto_fit="false").auto_fit is False


@pytest.mark.slow
def test_bench_fit_tiny_measures_and_fits_under_a_cap():
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks" / "bench_fit.py"), "--device", "cpu",
                           "--preset", "tiny", "--batch", "8", "--steps", "1", "--simulate-oom"],
                          capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| tiny | 8 |" in done.stdout and "auto_fit" in done.stdout
