"""The GPU's paths, executed on a CPU: fp16 with a real loss scaler, and training on two processes.

- fp16: `mixed_precision="auto"` on a (mocked) T4 gives Accelerate fp16 with loss scaling. Accelerate makes no
  GradScaler on a CPU, so the test puts a real `torch.amp.GradScaler("cpu")` where Accelerate puts its CUDA one
  (`accelerator.scaler`, with `native_amp`: accelerate/accelerator.py, "Mixed precision attributes"); from there
  Accelerate's own code runs as on a GPU: fp16 autocast, `scaler.scale(loss).backward()`, `unscale_` before the
  clip, `scaler.step` / `update` and `optimizer_step_was_skipped`, inside the project's real loop
  (helpers.train), whose LossScaleWatch, checkpoints (helpers.saves) and resume then run for real.
- two processes: gloo on CPU under torchrun (as tests/test_shards.py), the worker tests/train_worker.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import helpers.precision as precision
import helpers.train as train_module
from helpers.checkpoint import latest_checkpoint, list_checkpoints
from helpers.precision import LossScaleWatch
from helpers.train import train
from helpers.trainlog import read_log
from test_train import make_run, model_weights


# ---------------------------------------------------------------- fp16 with a real GradScaler


def reset_accelerate():
    """A new Accelerate state, as in a new process: AcceleratorState is shared by every Accelerator of a process
    and refuses another mixed_precision once set (the other tests' train() calls set "no")."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


# The scaler's settings put every step far from the edge of fp16's range, so which steps overflow does not hang on
# the gradients' exact size: the tiny model's scaled gradients overflow fp16 from a scale of about 2**18-2**20
# (measured), so 2**45 and 2**30 overflow for certain and 2**15 never does. A fresh scaler: 2**45 overflows (the
# step is skipped, the scale drops to 2**30), 2**30 overflows (-> 2**15), two good steps at 2**15 grow it to 2**30,
# which overflows (-> 2**15), ...: skips in every session, and a checkpoint after step 3 falls mid growth interval.
SCALER = dict(init_scale=2.0**45, growth_factor=2.0**15, backoff_factor=2.0**-15, growth_interval=2)


class Session:
    """What one train() call did, step by step, seen from inside the loop."""

    def __init__(self):
        self.scaler = None  # the GradScaler this session's Accelerator used
        self.restored = None  # the scaler's state just after resume_from loaded the checkpoint
        self.forward_dtypes = set()  # the dtypes the U-Net's first convolution computed in
        self.steps = []  # per step: (skipped, scale after the step, U-Net weights before, weights after)


def fp16_on_a_cpu(monkeypatch) -> list[Session]:
    """Every train() from now on runs as on a T4: helpers.precision.decide("auto") picks fp16 (capability mocked
    as sm_75, as tests/test_precision.py does), and the Accelerator gets a real CPU GradScaler; returns the sessions."""
    sessions: list[Session] = []
    monkeypatch.setattr(precision, "capability", lambda device: (7, 5))
    make_accelerator, resume_from = train_module.make_accelerator, train_module.resume_from

    def fp16_accelerator(cfg):
        reset_accelerate()  # each train() is a new session, as a new process would be
        accelerator = make_accelerator(cfg)
        assert accelerator.mixed_precision == "fp16" and "sm_75" in accelerator.precision_reason
        assert accelerator.scaler is None and not accelerator.native_amp  # Accelerate's CPU: fp16 in name only
        # what Accelerator.__init__ does for fp16 on a GPU (get_grad_scaler), with a scaler that works on a CPU;
        # prepare() then hands it to the AcceleratedOptimizer, as there
        accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", **SCALER)
        sessions.append(Session())
        sessions[-1].scaler = accelerator.scaler
        return accelerator

    def recording_resume_from(run, accelerator):
        out = resume_from(run, accelerator)
        sessions[-1].restored = dict(accelerator.scaler.state_dict())
        return out

    class RecordingWatch(LossScaleWatch):
        def __init__(self, accelerator):
            super().__init__(accelerator)
            self.weights = self._weights()
            sessions[-1].forward_dtypes = set()
            unet = self.accelerator._models[0]
            unet.conv_in.register_forward_hook(lambda m, i, out: sessions[-1].forward_dtypes.add(out.dtype))

        def _weights(self):
            return [p.detach().clone() for p in self.accelerator._models[0].parameters()]

        def after_step(self):
            before = self.skipped
            super().after_step()
            now = self._weights()
            sessions[-1].steps.append((self.skipped > before, self.scale, self.weights, now))
            self.weights = now

    monkeypatch.setattr(train_module, "make_accelerator", fp16_accelerator)
    monkeypatch.setattr(train_module, "resume_from", recording_resume_from)
    monkeypatch.setattr(train_module, "LossScaleWatch", RecordingWatch)
    return sessions


def expected_scales(state: dict, skipped: list[bool]) -> list[float]:
    """GradScaler's rule, step by step from `state`: an overflow multiplies the scale by backoff_factor and restarts
    the count of good steps; growth_interval good steps in a row multiply it by growth_factor."""
    scale, tracker, out = state["scale"], state["_growth_tracker"], []
    for skip in skipped:
        tracker = 0 if skip else tracker + 1
        scale *= state["backoff_factor"] if skip else 1.0
        if tracker == state["growth_interval"]:
            scale, tracker = scale * state["growth_factor"], 0
        out.append(scale)
    return out


def test_fp16_steps_with_a_real_loss_scaler_skip_overflows_and_resume_exactly(tmp_path, course_dir, monkeypatch,
                                                                               fresh_accelerate):
    sessions = fp16_on_a_cpu(monkeypatch)
    n, k = 6, 3
    # a constant lr: a run trained to max_steps=k, then extended to n, follows the lr of one trained to n
    settings = dict(max_steps=n, lr_schedule="constant", warmup_steps=0, checkpoint_every=k, snapshot_every=0)
    a = make_run(tmp_path / "a", course_dir, **settings)
    straight = train(a, progress=False)
    b = make_run(tmp_path / "b", course_dir, **settings)
    first = train(b, progress=False, max_steps=k)
    saved = latest_checkpoint(b.run_dir / "checkpoints")[1]["state"]["scaler"]
    second = train(b, progress=False, max_steps=n)
    one, two, three = sessions
    assert [len(s.steps) for s in sessions] == [n, k, n - k]

    # the U-Net ran in fp16 (autocast) while its weights, and so what the optimizer steps, stayed fp32
    assert all(s.forward_dtypes == {torch.float16} for s in sessions)
    assert all(w.dtype == torch.float32 for w in one.steps[-1][3])
    # every session: a skipped step left the weights exactly as they were, a taken one moved them, and the
    # scale followed GradScaler's rule from where the session started (SCALER, or the restored checkpoint's)
    fresh = dict(SCALER, scale=SCALER["init_scale"], _growth_tracker=0)
    for s, start in ((one, fresh), (two, fresh), (three, saved)):
        skipped = [skip for skip, _, _, _ in s.steps]
        for skip, _, before, after in s.steps:
            same = all(torch.equal(x, y) for x, y in zip(before, after))
            assert same == skip
        assert [scale for _, scale, _, _ in s.steps] == expected_scales(start, skipped)
    flags = lambda s: [skip for skip, _, _, _ in s.steps]  # noqa: E731
    # skipped steps happen (the scale starts too high) and are counted: TrainResult == LossScaleWatch == the steps
    assert flags(one) == [True, True, False, False, True, False]  # as SCALER's comment says
    assert straight.skipped_steps == sum(flags(one))
    assert (first.skipped_steps, second.skipped_steps) == (sum(flags(two)), sum(flags(three)))
    assert second.skipped_steps >= 1  # the scale grows back to overflowing after the resume too

    # the checkpoint holds the scaler as it was after step k, mid growth interval, and the resume restores it
    assert saved == two.scaler.state_dict() and saved["_growth_tracker"] > 0
    assert saved["scale"] != SCALER["init_scale"]  # a scaler left fresh by the resume would show
    assert three.restored == saved
    # and the resumed run is the uninterrupted one: same skips, same scales, same losses, same weights
    assert flags(two) + flags(three) == flags(one)
    assert [x[1] for x in two.steps + three.steps] == [x[1] for x in one.steps]
    assert three.scaler.state_dict() == one.scaler.state_dict()
    assert read_log(b)["loss"] == pytest.approx(read_log(a)["loss"], rel=1e-5, abs=1e-6)
    for folder in ("unet", "unet_ema"):
        wa, wb = model_weights(a, folder), model_weights(b, folder)
        for name in wa:
            torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6)
