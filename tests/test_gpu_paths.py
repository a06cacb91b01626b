"""The GPU's paths, executed on a CPU: fp16 with a real loss scaler, and training on two processes.

- fp16: `mixed_precision="auto"` on a (mocked) T4 gives Accelerate fp16 with loss scaling. Accelerate makes no
  GradScaler on a CPU, so the test puts a real `torch.amp.GradScaler("cpu")` where Accelerate puts its CUDA one
  (`accelerator.scaler`, with `native_amp`: accelerate/accelerator.py, "Mixed precision attributes"); from there
  Accelerate's own code runs as on a GPU: fp16 autocast, `scaler.scale(loss).backward()`, `unscale_` before the
  clip, `scaler.step` / `update` (the fused AdamW's step skipping an overflow itself), inside the project's real loop
  (helpers.train), whose LossScaleWatch, checkpoints (helpers.run_state) and resume then run for real.
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
from test_train import make_run, model_weights

import helpers.train as train_module
from helpers.run_state import CheckpointIO
from helpers import precision
from helpers.checkpoint import latest_checkpoint, list_checkpoints
from helpers.precision import LossScaleWatch
from helpers.train import train
from helpers.trainlog import read_log

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
# (measured at batch 8 and 2), so 2**45 and 2**30 overflow for certain and 2**15 never does. A fresh scaler: 2**45
# overflows (the step is skipped, the scale drops to 2**30), 2**30 overflows (-> 2**15), two good steps at 2**15 grow
# it to 2**30, which overflows (-> 2**15), ...: skips in every session, and a checkpoint after step 3 falls mid
# growth interval.
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
    make_accelerator, load_latest = train_module.make_accelerator, CheckpointIO.load_latest

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

    def recording_load_latest(io):
        out = load_latest(io)
        sessions[-1].restored = dict(io.accelerator.scaler.state_dict())
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
    monkeypatch.setattr(CheckpointIO, "load_latest", recording_load_latest)
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


# A skipped first step means the LR schedule steps before the optimizer ever has: PyTorch warns. The loop steps its
# schedule once per step, taken or skipped (as diffusers' training scripts do), so that is expected here.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_fp16_steps_with_a_real_loss_scaler_skip_overflows_and_resume_exactly(tmp_path, course_dir, monkeypatch,
                                                                               fresh_accelerate):
    sessions = fp16_on_a_cpu(monkeypatch)
    n, k = 5, 3
    # a constant lr: a run trained to max_steps=k, then extended to n, follows the lr of one trained to n
    settings = dict(max_steps=n, lr_schedule="constant", warmup_steps=0, checkpoint_every=k, snapshot_every=0,
                    batch_size=2)  # fp16 on a CPU is emulated: about 0.6 s per image and step
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
    flags = lambda s: [skip for skip, _, _, _ in s.steps]
    # skipped steps happen (the scale starts too high) and are counted: TrainResult == LossScaleWatch == the steps
    assert flags(one) == [True, True, False, False, True]  # as SCALER's comment says
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


# ---------------------------------------------------------------- two processes (gloo) == one at twice the batch

WORKER = Path(__file__).with_name("train_worker.py")


def _launch(outputs: Path, out: Path, *runs: str) -> str:
    """tests/train_worker.py on 2 gloo processes under torchrun (as tests/test_shards.py launches its worker)."""
    from test_shards import _free_port

    out.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    args = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(WORKER), str(outputs),
            str(out), *runs]
    done = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "rank 0 done" in done.stdout and "rank 1 done" in done.stdout
    return done.stdout


def record_steps(monkeypatch, ranks_draws: bool = False) -> dict:
    """What train() in this process draws, as train_worker.py records it: the cache rows of each micro-step and
    the gradient norm each step clips. `ranks_draws`: a one-process step at 2b draws each half of its batch with
    the generator a process of a two-process run uses for it, (seed, step, micro-step, rank) with rank 0 for the
    first half and rank 1 for the second, in place of rank 0 for the whole batch."""
    from accelerate import Accelerator

    from helpers import step as step_module

    drawn, key = {"rows": [], "grad_norms": []}, {}
    batch, generator, clip = step_module.DeviceCache.batch, step_module.step_generator, Accelerator.clip_grad_norm_

    def keyed_generator(seed, *parts, device="cpu"):
        key.update(seed=seed, parts=parts, device=device)
        return generator(seed, *parts, device=device)

    def recording_batch(self, rows, gen, *args, **kwargs):
        drawn["rows"].append(rows.clone())
        if not ranks_draws:
            return batch(self, rows, gen, *args, **kwargs)
        (step, micro, rank), half = key["parts"], len(rows) // 2
        assert rank == 0 and len(rows) == 2 * half
        halves = [batch(self, rows[r * half:(r + 1) * half], generator(key["seed"], step, micro, r,
                                                                       device=key["device"]), *args, **kwargs)
                  for r in (0, 1)]
        return tuple(torch.cat(parts) for parts in zip(*halves))

    def recording_clip(self, *args, **kwargs):
        norm = clip(self, *args, **kwargs)
        drawn["grad_norms"].append(float(norm))
        return norm

    monkeypatch.setattr(train_module, "step_generator", keyed_generator)
    monkeypatch.setattr(step_module.DeviceCache, "batch", recording_batch)
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", recording_clip)
    return drawn


def differences(cfg_a, cfg_b, folder: str) -> torch.Tensor:
    """|a - b| of every weight of the two runs' saved U-Nets (`folder`: unet or unet_ema), flattened."""
    wa, wb = model_weights(cfg_a, folder), model_weights(cfg_b, folder)
    assert wa.keys() == wb.keys()
    return torch.cat([(wa[k].float() - wb[k].float()).abs().flatten() for k in wa])


@pytest.mark.slow
def test_two_processes_train_as_one_at_twice_the_batch_and_resume_exactly(tmp_path, course_dir, monkeypatch):
    n, k, b = 4, 2, 4
    lr = 1e-3
    # a constant lr: a run trained to max_steps=k, then extended to n, follows the lr of one trained to n
    settings = dict(max_steps=n, lr=lr, lr_schedule="constant", warmup_steps=0, checkpoint_every=k, snapshot_every=0)
    two = make_run(tmp_path, course_dir, name="two", batch_size=b, **settings)  # 2 processes x b
    paused = make_run(tmp_path, course_dir, name="paused", batch_size=b, **settings)  # the same, in two launches
    out = tmp_path / "drawn"
    _launch(tmp_path, out, f"two:{n}", f"paused:{k}")
    resumed = _launch(tmp_path, out, f"paused:{n}")  # a new launch: the resume reads the checkpoint from disk
    assert f"rank 0: paused steps {k + 1}-{n}" in resumed and f"rank 1: paused steps {k + 1}-{n}" in resumed
    drawn = lambda name, steps, rank: torch.load(out / f"drawn-{name}-{steps}-rank{rank}.pt")
    rows = lambda name, steps, rank: [r.tolist() for r in drawn(name, steps, rank)["rows"]]

    # one process at 2b, as a notebook trains it
    one = make_run(tmp_path, course_dir, name="one", batch_size=2 * b, **settings)
    one_drawn = record_steps(monkeypatch)
    train(one, progress=False)
    # The design (helpers.step, README "Several GPUs"): the processes split one seeded stream of images; step s
    # of process r takes b items from position + r*b. So the two processes' rows side by side are exactly the rows
    # of the one process at 2b, step by step.
    assert [len(r) for r in one_drawn["rows"]] == [2 * b] * n
    assert [x + y for x, y in zip(rows("two", n, 0), rows("two", n, 1))] == [r.tolist() for r in one_drawn["rows"]]
    # But each process draws its items' noise, timesteps, caption choice and dropout from a generator of its own,
    # seeded by (seed, step, micro-step, rank): one process at 2b trains the same images with other noise, so it is
    # another run, not the two processes' run: its weights differ by about n * lr (Adam moves a weight by up to lr
    # per step), not by rounding.
    other_draw = differences(one, two, "unet")
    assert float(other_draw.median()) > 0.1 * lr and float(other_draw.max()) > n * lr

    # One process at 2b whose halves draw with the two processes' generators: the same batch, split differently.
    # DDP averages the processes' gradients of their b-image mean losses: the gradient of the 2b-image mean loss,
    # up to float rounding (sums in another order). The clipped gradient norms show it before Adam (a sum in
    # place of the average would double them).
    drawn_as_two = make_run(tmp_path, course_dir, name="drawn_as_two", batch_size=2 * b, **settings)
    monkeypatch.undo()  # the recording above, replaced by this one
    as_two_drawn = record_steps(monkeypatch, ranks_draws=True)
    train(drawn_as_two, progress=False)
    assert [r.tolist() for r in as_two_drawn["rows"]] == [r.tolist() for r in one_drawn["rows"]]
    norms = drawn("two", n, 0)["grad_norms"]
    assert drawn("two", n, 1)["grad_norms"] == norms  # every process clips the same averaged gradient
    assert as_two_drawn["grad_norms"] == pytest.approx(norms, rel=1e-5)
    assert read_log(drawn_as_two)["loss"] == pytest.approx(read_log(two)["loss"], rel=1e-5)  # mean over processes
    # The weights: Adam divides each gradient element by its own running RMS, so the bulk of the weights differ
    # by rounding (median < 1e-6), but an element whose gradient is a near-cancelling sum keeps a rounding error
    # that is large next to it, and Adam turns that into a lr-sized relative change of its step: measured here
    # up to ~3e-5 (1 % of n * lr), against > n * lr for another draw. The bound: 5 % of n * lr.
    for folder in ("unet", "unet_ema"):
        diff = differences(drawn_as_two, two, folder)
        assert float(diff.median()) < 1e-6 and float(diff.max()) < 0.05 * n * lr, folder

    # resume: trained to k in one launch and on to n in another, the two processes equal the uninterrupted run
    for rank in (0, 1):  # each process goes on drawing where it stopped in the stream
        assert rows("paused", k, rank) + rows("paused", n, rank) == rows("two", n, rank)
    assert read_log(paused)["step"] == [float(s) for s in range(1, n + 1)]  # one writer, no duplicated rows
    assert read_log(paused)["loss"] == pytest.approx(read_log(two)["loss"], rel=1e-5, abs=1e-6)
    for folder in ("unet", "unet_ema"):
        wa, wb = model_weights(two, folder), model_weights(paused, folder)
        for name in wa:
            torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6)
    assert [p.name for p in list_checkpoints(paused.run_dir / "checkpoints")] == [f"step-{k:06d}", f"step-{n:06d}"]
