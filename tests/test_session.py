"""Runs that span sessions: a checkpoint by the wall clock, and a clean stop after session_hours that resumes exactly."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import helpers.train as train_module
from helpers.checkpoint import list_checkpoints
from helpers.session import SessionClock
from helpers.train import train
from helpers.trainlog import read_log
from test_train import make_run, model_weights


class FakeClock:
    """Advances `tick` seconds at every reading."""

    def __init__(self, tick: float):
        self.t, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t


def test_the_clock_says_when_a_checkpoint_is_due_and_when_the_session_is_over():
    clock = SessionClock(checkpoint_minutes=30, session_hours=2, now=FakeClock(600))  # 10 min per reading
    due = [clock.checkpoint_due() for _ in range(3)]
    assert due == [False, False, True]  # 10, 20, 30 min
    clock.checkpointed()  # at 40 min
    assert not clock.checkpoint_due()  # 50 min: 10 since the checkpoint
    assert not SessionClock(now=FakeClock(10**6)).session_over()  # 0 = no limit
    assert "stops with a checkpoint after 2 h" in clock.describe()


def test_session_hours_stops_with_a_checkpoint_and_the_next_session_ends_identical(tmp_path, course_dir, monkeypatch,
                                                                                    capsys):
    settings = dict(max_steps=6, checkpoint_every=100, snapshot_every=0, log_every=1)
    straight = make_run(tmp_path / "a", course_dir, **settings)
    train(straight, progress=False)

    run = make_run(tmp_path / "b", course_dir, **settings, session_hours=1.5)
    monkeypatch.setattr(train_module, "SessionClock", functools.partial(SessionClock, now=FakeClock(3600)))
    first = train(run, progress=False)  # the session starts at 1 h; step 1 reads 2 h, step 2 reads 3 h: 2 h in, over
    assert first.stopped_for == "session_hours" and first.last_step == 2 and first.model_dir is None
    assert [p.name for p in list_checkpoints(run.run_dir / "checkpoints")] == ["step-000002"]
    assert "run the same command again to resume" in capsys.readouterr().out

    monkeypatch.setattr(train_module, "SessionClock", SessionClock)  # a fresh session: the real clock
    second = train(run, progress=False)
    assert second.resumed_from.endswith("step-000002") and second.last_step == 6 and not second.stopped_for
    assert read_log(run)["loss"] == pytest.approx(read_log(straight)["loss"], rel=1e-5, abs=1e-6)
    for folder in ("unet", "unet_ema"):
        wa, wb = model_weights(straight, folder), model_weights(run, folder)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_checkpoint_minutes_writes_checkpoints_by_the_clock(tmp_path, course_dir, monkeypatch):
    run = make_run(tmp_path, course_dir, max_steps=5, checkpoint_every=100, snapshot_every=0, log_every=1,
                   keep_checkpoints=0, checkpoint_minutes=1)
    monkeypatch.setattr(train_module, "SessionClock", functools.partial(SessionClock, now=FakeClock(40)))
    train(run, progress=False)  # readings every 40 s: a checkpoint is due every second step
    steps = [p.name for p in list_checkpoints(run.run_dir / "checkpoints")]
    assert steps == ["step-000002", "step-000004", "step-000005"]


def test_the_disk_guard_knows_kaggles_20_gb_working_folder(tmp_path, monkeypatch):
    import helpers.disk as disk

    assert disk.QUOTAS[Path("/kaggle/working")] == 20 * 10**9
    working = tmp_path / "kaggle" / "working"
    (working / "runs").mkdir(parents=True)
    (working / "runs" / "weights.bin").write_bytes(b"x" * 3000)
    monkeypatch.setattr(disk, "QUOTAS", {working: 10_000})
    assert disk.free_bytes(working / "runs") == 7_000  # the quota, not the filesystem's free space
    assert disk.free_bytes(tmp_path) > 7_000  # outside the quota's folder: the filesystem
