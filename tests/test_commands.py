"""Issue 18, tried as a new user would: every command ends in one line, trains the steps it was asked for, and
checks the disk before a long run. One test (or more) per case of the issue.

Read-only folders are made with `chattr +i` when the tests run as root (root ignores chmod), else with chmod.
Helpers that are new with the fixes are imported inside the tests, so on a tree without them each test fails for
its own reason.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers.checkpoint import checkpoint_config, list_checkpoints
from helpers.config import PROJECT_ROOT, RunConfig, profile_config
from helpers.run_folder import load_config, open_run
from helpers.train import train
from helpers.trainlog import read_log
from test_score import StandInFeatures, results, write_sprites  # noqa: F401 (results: the fixture, shared)
from test_train import make_run, model_weights


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` unwritable for this process (nothing can be created, renamed or removed in it), then restored."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a filesystem without chattr +i: cannot make a folder read-only")
        try:
            yield folder
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(mode)


def one_line(text: str) -> str:
    text = text.strip()
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


def files_under(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


# ---------------------------------------------------------------- 1. the steps a user asks for


def test_hw6_with_max_steps_30000_trains_30000_steps(capsys):
    from helpers.length import resolve_length

    cfg = profile_config("hw6", max_steps=30000, batch_size=128)  # the example of helpers/runs.py's docstring
    assert "max_steps=30000 is set, so it replaces max_epochs=60" in capsys.readouterr().out
    resolved, line = resolve_length(cfg, 38_970)
    assert (resolved.max_steps, cfg.max_epochs) == (30_000, 0) and "max_steps 30,000 (set by you)" in line
    assert resolved.warmup_steps == 1_500 and "5 % of them (warmup_fraction of the hw6 profile)" in line
    planned = cfg.replace(time_budget_hours=8.5)  # helpers.fit wrote max_steps for the budget, not the user
    assert "max_steps 30,000 (planned for time_budget_hours=8.5)" in resolve_length(planned, 38_970)[1]
    by_epochs, line = resolve_length(profile_config("hw6"), 38_970)
    assert by_epochs.max_steps == -(-60 * 38_970 // 64) == 36_535
    assert "36,535 steps = 60 epochs × 38,970 images / 64 per step" in line and "(max_epochs of the hw6 profile)" in line


def test_warmup_steps_set_by_the_user_replace_the_profiles_fraction():
    from helpers.length import resolve_length

    cfg = profile_config("hw6", warmup_steps=100)
    resolved, line = resolve_length(cfg, 38_970)
    assert (cfg.warmup_fraction, resolved.warmup_steps) == (0.0, 100) and "warm-up 100 steps (set by you)" in line


@pytest.mark.parametrize("both", [dict(max_steps=100, max_epochs=2), dict(warmup_steps=10, warmup_fraction=0.1)])
def test_both_fields_of_a_pair_set_at_once_is_an_error_naming_both(both, tmp_path):
    first, second = both
    for entry in (lambda: profile_config("hw6", **both), lambda: RunConfig().replace(**both),
                  lambda: open_run("r", "tiny", outputs_dir=str(tmp_path), **both)):
        with pytest.raises(ValueError, match=rf"{first}=.* and {second}=.* both set"):
            entry()
    assert not (tmp_path / "runs" / "r").exists()
    assert getattr(profile_config("hw6", **{first: both[first], second: 0}), second) == 0  # 0: the count counts


def test_runner_refuses_both_fields_with_exit_2(tmp_path, capsys):
    from helpers.runs import main

    with pytest.raises(SystemExit) as stop:
        main(["--profile", "tiny", "--outputs-dir", str(tmp_path), "-p", "max_steps=5", "-p", "max_epochs=2"])
    assert stop.value.code == 2
    assert "max_steps=5 and max_epochs=2 both set the training length" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_a_notebook_parameter_max_steps_replaces_the_runs_max_epochs(tmp_path, capsys):
    open_run("r", "tiny", outputs_dir=str(tmp_path), max_epochs=3)
    cfg = open_run("r", None, outputs_dir=str(tmp_path), max_steps=7)  # 03_train_cfg's `max_steps` parameter
    assert (cfg.max_steps, cfg.max_epochs) == (7, 0) and "replaces max_epochs=3" in capsys.readouterr().out
    assert json.loads((cfg.run_dir / "config.json").read_text())["max_epochs"] == 0


def test_train_cli_max_steps_6_on_a_one_epoch_run_trains_6_and_says_why(tmp_path, course_dir, capsys):
    """The issue's case: `--max-steps 6` on a max_epochs=1 run printed "max_steps 4 -> 6" and trained to 810."""
    from helpers.train import main

    cfg = make_run(tmp_path, course_dir, max_epochs=1, checkpoint_every=2, snapshot_every=0)
    first = train(cfg, progress=False)
    assert first.last_step == 3  # one epoch: 20 images / 8 per step, rounded up
    out = capsys.readouterr().out
    assert "3 steps = 1 epoch × 20 images / 8 per step, rounded up (max_epochs set by you)" in out
    stored = checkpoint_config(list_checkpoints(cfg.run_dir / "checkpoints")[-1])
    assert (stored["max_epochs"], stored["max_steps"]) == (1, 4)  # as the user set it, not the resolved 3
    result = main(["--run-name", str(cfg.run_dir), "--no-progress", "--max-steps", "6"])
    assert (result.first_step, result.last_step) == (4, 6) and read_log(cfg)["step"] == [1, 2, 3, 4, 5, 6]
    out = capsys.readouterr().out
    assert "replaces max_epochs=1" in out and "max_steps 6 (set by you)" in out
    assert (load_config(cfg.run_dir).max_steps, load_config(cfg.run_dir).max_epochs) == (6, 0)


# ---------------------------------------------------------------- 2. the final snapshot


@pytest.mark.parametrize("every, expected", [(0, ["step-000003"]), (2, ["step-000002", "step-000003"])])
def test_the_final_snapshot_is_written_whatever_snapshot_every(tmp_path, course_dir, every, expected):
    cfg = make_run(tmp_path, course_dir, max_steps=3, snapshot_every=every, checkpoint_every=3)
    result = train(cfg, progress=False)
    assert [Path(p).name for p in result.snapshots] == expected
    assert sorted(p.name for p in (cfg.run_dir / "snapshots").iterdir()) == expected
    last = load_file(str(cfg.run_dir / "snapshots" / expected[-1] / "diffusion_pytorch_model.safetensors"))
    final = model_weights(cfg, "unet_ema")
    assert all(torch.equal(last[k], final[k]) for k in final)


# ---------------------------------------------------------------- 3. reference statistics


def write_stats(folder: Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "test_mu.npy", mu)
    np.save(folder / "test_sigma.npy", sigma)
    return folder


def good_stats(d: int = 8):
    features = np.random.default_rng(0).normal(size=(50, d))
    return features.mean(0), np.cov(features, rowvar=False)


@pytest.mark.parametrize("damage, file, message", [
    (lambda mu, s: (np.where(np.arange(len(mu)) == 2, np.nan, mu), s), "test_mu.npy", "1 of 8 values are NaN or inf"),
    (lambda mu, s: (mu, np.where(np.eye(len(mu)) > 0, np.inf, s)), "test_sigma.npy", "8 of 64 values are NaN or inf"),
    (lambda mu, s: (mu, s + np.triu(np.full_like(s, 1e-3), 1)), "test_sigma.npy", "not symmetric"),
    (lambda mu, s: (mu[None], s), "test_mu.npy", r"expected a vector of feature means, got shape \(1, 8\)"),
    (lambda mu, s: (mu, s[:, :4]), "test_sigma.npy", r"expected shape \(8, 8\)"),
])
def test_reference_statistics_are_checked_when_loaded(tmp_path, damage, file, message):
    from helpers.score import load_reference_stats

    mu, sigma = good_stats()
    assert load_reference_stats(write_stats(tmp_path / "good", mu, sigma))[0].shape == (8,)
    float32 = write_stats(tmp_path / "f32", mu.astype(np.float32), sigma.astype(np.float32))
    assert np.isfinite(load_reference_stats(float32)[1]).all()  # the course's files may be float32: symmetric still
    with pytest.raises(ValueError, match=rf"{tmp_path / 'bad' / file}: .*{message}"):
        load_reference_stats(write_stats(tmp_path / "bad", *damage(mu, sigma)))


def test_cached_reference_statistics_are_checked_when_reused(tmp_path):
    from helpers.score import reference_stats_from_folder

    real = tmp_path / "real"
    write_sprites(real, 6)
    reference_stats_from_folder(real, tmp_path / "stats", StandInFeatures(), progress=False)
    sigma = np.load(tmp_path / "stats" / "test_sigma.npy")
    sigma[0, 0] = np.nan
    np.save(tmp_path / "stats" / "test_sigma.npy", sigma)
    with pytest.raises(ValueError, match=r"stats/test_sigma.npy: 1 of \d+ values are NaN"):
        reference_stats_from_folder(real, tmp_path / "stats", StandInFeatures(), progress=False)


def score_argv(results, tmp_path, **extra):
    folder, test_json, _ = results
    argv = ["--results", str(folder), "--test-json", str(test_json)]
    return argv + [x for k, v in extra.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture
def stand_in_models(monkeypatch):
    """An 8-feature stand-in for Inception; CLIP unavailable (offline)."""
    import helpers.score as score

    monkeypatch.setattr(score, "load_inception", lambda weights=None, device=None: StandInFeatures())

    def no_clip(*a, **k):
        raise score.ScorerUnavailable("offline in tests")

    monkeypatch.setattr(score, "load_clip_scorer", no_clip)


def test_scorer_with_nan_statistics_names_the_file_instead_of_a_sqrtm_error(results, tmp_path, stand_in_models,
                                                                              capsys):
    from helpers.score import main

    mu, sigma = good_stats()
    mu[3] = np.nan
    stats = write_stats(tmp_path / "score", mu, sigma)
    assert main(score_argv(results, tmp_path, ref_stats=stats, out=tmp_path / "s.json")) == 0
    printed = capsys.readouterr()
    assert f"fid: SKIPPED: {stats / 'test_mu.npy'}: 1 of 8 values are NaN or infinite" in printed.out
    assert "sqrtm" not in printed.out + printed.err
    assert json.loads((tmp_path / "s.json").read_text())["fid"] is None


# ---------------------------------------------------------------- 4. OS errors of the commands


@pytest.mark.parametrize("code, words", [
    (errno.EACCES, "permission denied — make it writable"), (errno.EROFS, "read-only file system — choose a folder"),
    (errno.EISDIR, "is a folder, not a file — give the path of a file"),
    (errno.ENOSPC, "no space left on the disk — free space"), (errno.EPERM, "operation not permitted — check"),
])
def test_os_errors_become_one_line_with_the_path_and_what_to_do(tmp_path, code, words):
    from helpers.files import os_error_line

    temp = tmp_path / f".score.json.{os.getpid()}.tmp"  # atomic_write's temporary name: the real file is named
    line = one_line(os_error_line("helpers.x", OSError(code, os.strerror(code), str(temp))))
    assert line.startswith(f"helpers.x: {tmp_path / 'score.json'}: ") and words in line
    ckpt = os_error_line("helpers.x", OSError(code, os.strerror(code), str(tmp_path / ".tmp-step-000002-77")))
    assert ckpt.startswith(f"helpers.x: {tmp_path}: ")
    assert os_error_line("helpers.x", FileNotFoundError("No run config at x")) == "helpers.x: No run config at x"


def test_scorer_out_onto_a_folder_fails_before_scoring_in_one_line(results, tmp_path, capsys):
    from helpers.score import main

    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit) as stop:
        main(score_argv(results, tmp_path, out=tmp_path / "taken"))
    printed = capsys.readouterr()
    assert stop.value.code == 1 and printed.out == ""  # nothing scored: it stopped first
    assert one_line(printed.err) == (f"helpers.score: {tmp_path / 'taken'}: is a folder, not a file — give the path "
                                     f"of a file (or remove the folder)")


def test_scorer_out_in_a_read_only_folder_fails_before_scoring_in_one_line(results, tmp_path, capsys):
    from helpers.score import main

    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked), pytest.raises(SystemExit) as stop:
        main(score_argv(results, tmp_path, out=locked / "sub" / "score.json"))
    printed = capsys.readouterr()
    assert stop.value.code == 1 and printed.out == "" and list(locked.iterdir()) == []
    assert re.fullmatch(rf"helpers\.score: {re.escape(str(locked))}: (permission denied|operation not permitted) — .*",
                        one_line(printed.err))


def test_scorer_on_a_full_disk_leaves_no_partial_file(results, tmp_path, stand_in_models, monkeypatch, capsys):
    from helpers.score import main

    real_write = Path.write_text

    def disk_full(self, *a, **k):
        if self.name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", disk_full)
    out = tmp_path / "out" / "score.json"
    with pytest.raises(SystemExit) as stop:
        main(score_argv(results, tmp_path, out=out))
    assert stop.value.code == 1
    assert one_line(capsys.readouterr().err) == (f"helpers.score: {out}: no space left on the disk — free space or "
                                                 f"choose a folder on another disk, then run again")
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_train_on_a_read_only_run_folder_is_one_line_and_changes_nothing(tmp_path, course_dir, capsys):
    from helpers.train import main

    cfg = make_run(tmp_path, course_dir, max_steps=2, snapshot_every=0)
    before = files_under(cfg.run_dir)
    with read_only(cfg.run_dir), pytest.raises(SystemExit) as stop:
        main(["--run-name", str(cfg.run_dir), "--no-progress"])
    assert stop.value.code == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"helpers.train: {cfg.run_dir}") and " — " in line
    assert files_under(cfg.run_dir) == before  # no lock left behind, nothing written


def test_train_with_a_read_only_checkpoints_folder_is_one_line_and_releases_the_lock(tmp_path, course_dir, capsys):
    from helpers.train import main

    cfg = make_run(tmp_path, course_dir, max_steps=2, checkpoint_every=1, snapshot_every=0)
    root = cfg.run_dir / "checkpoints"
    root.mkdir()
    with read_only(root), pytest.raises(SystemExit) as stop:
        main(["--run-name", str(cfg.run_dir), "--no-progress"])
    assert stop.value.code == 1
    assert re.fullmatch(rf"helpers\.train: {re.escape(str(root))}: (permission denied|operation not permitted) — .*",
                        one_line(capsys.readouterr().err))
    assert list(root.iterdir()) == [] and not (cfg.run_dir / "run.lock").exists()


def test_runner_on_a_read_only_outputs_folder_is_one_line(tmp_path, capsys):
    from helpers.runs import main

    (tmp_path / "runs").mkdir()
    with read_only(tmp_path / "runs"), pytest.raises(SystemExit) as stop:
        main(["--profile", "tiny", "--run-name", "r", "--outputs-dir", str(tmp_path), "--only", "01_data"])
    assert stop.value.code == 1
    assert one_line(capsys.readouterr().err).startswith(f"helpers.runs: {tmp_path / 'runs'}")
    assert list((tmp_path / "runs").iterdir()) == []


@pytest.mark.slow
def test_python_dash_m_helpers_train_on_a_missing_run_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "helpers.train", "--run-name", str(tmp_path / "nope"), "--no-progress"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert run.returncode == 1
    assert "no run folder there" in one_line(run.stderr) and run.stderr.startswith("helpers.train: ")


# ---------------------------------------------------------------- 5. the disk


def test_snapshot_and_checkpoint_counts_match_the_training_loop():
    from helpers.disk import checkpoint_count, snapshot_count

    for max_steps in (1, 5, 12):
        for every in (0, 1, 3, 5, 20):
            for start in range(max_steps):
                for end in range(start, max_steps + 1):  # start == end: a finished run, resumed
                    loop = [d for d in range(start + 1, end + 1) if d == max_steps or (every and d % every == 0)]
                    assert snapshot_count(start, end, max_steps, every) == len(loop)
                    if every:
                        loop = [d for d in range(start + 1, end + 1) if d % every == 0 or d == end]
                        assert checkpoint_count(start, end, every) == len(loop)


def test_the_estimate_is_an_upper_bound_within_10_percent_of_what_a_run_writes(tmp_path, course_dir):
    from helpers.cache import load_cache
    from helpers.disk import WriteSizes
    from helpers.step import unet_for_cache

    cfg = make_run(tmp_path, course_dir, max_steps=2, checkpoint_every=2, snapshot_every=0)
    train(cfg, progress=False)
    sizes = WriteSizes.of(unet_for_cache(cfg, load_cache(cfg)), len(cfg.phema_ema_lengths))  # post-hoc EMA on
    written = dict(checkpoint=cfg.run_dir / "checkpoints" / "step-000002",
                   snapshot=cfg.run_dir / "snapshots" / "step-000002", model=cfg.run_dir / "model",
                   phema=cfg.run_dir / "phema" / "step-000002")
    for name, folder in written.items():
        actual = sum(files_under(folder).values())
        assert actual <= getattr(sizes, name) <= 1.1 * actual, name


def fake_free(monkeypatch, free):
    """Replace the free-space reading: `free(path)` -> bytes."""
    import helpers.disk

    monkeypatch.setattr(helpers.disk, "free_bytes", free)


def test_a_run_that_cannot_fit_is_refused_before_step_1_with_settings_that_fit(tmp_path, course_dir, monkeypatch,
                                                                              capsys):
    from helpers.disk import RESERVE_BYTES, NotEnoughDiskError, DiskPlan, WriteSizes, check_room
    from helpers.cache import load_cache
    from helpers.train import main
    from helpers.step import unet_for_cache

    cfg = make_run(tmp_path, course_dir, max_steps=8, snapshot_every=1, checkpoint_every=4)
    sizes = WriteSizes.of(unet_for_cache(cfg, load_cache(cfg)), len(cfg.phema_ema_lengths))  # post-hoc EMA stores
    free = RESERVE_BYTES + 2 * sizes.checkpoint + sizes.model + 3 * (sizes.snapshot + sizes.phema)  # 3, not 8
    fake_free(monkeypatch, lambda path: free)
    before = files_under(cfg.run_dir)
    with pytest.raises(SystemExit) as stop:
        main(["--run-name", str(cfg.run_dir), "--no-progress"])
    line = one_line(capsys.readouterr().err)
    assert stop.value.code == 1 and line.startswith(f"helpers.train: Not enough disk to train {cfg.run_dir}")
    assert "8 EMA snapshot(s)" in line and "Settings that fit: snapshot_every=" in line
    files_after = files_under(cfg.run_dir)
    assert files_after == {**before, "config.json": files_after["config.json"]}  # no checkpoint, snapshot or log
    every = int(re.search(r"snapshot_every=(\d+)", line).group(1))
    assert every > 1 and check_room(DiskPlan(0, 8, every, 4, 2), sizes, cfg.run_dir)  # the advice does fit
    with pytest.raises(NotEnoughDiskError):
        check_room(DiskPlan(0, 8, every - 1, 4, 2), sizes, cfg.run_dir)  # and it is the smallest that does


def test_a_disk_filling_up_mid_run_stops_with_a_resumable_checkpoint(tmp_path, course_dir, monkeypatch):
    from helpers.disk import RESERVE_BYTES, NotEnoughDiskError

    cfg = make_run(tmp_path, course_dir, max_steps=6, snapshot_every=1, checkpoint_every=2)
    root = cfg.run_dir / "checkpoints"
    # another program fills the disk once the first checkpoint is written: only ~1 MB stays above the reserve
    fake_free(monkeypatch, lambda path: 10**12 if not list_checkpoints(root) else RESERVE_BYTES + 10**6)
    with pytest.raises(NotEnoughDiskError, match=r"Stopped after step 2 with a resumable checkpoint .*step-000002.* "
                                                 r"steps 3-4 would write .*python -m helpers.train --run-name"):
        train(cfg, progress=False)
    assert [p.name for p in list_checkpoints(root)] == ["step-000002"] and not (cfg.run_dir / "run.lock").exists()
    assert not list(root.glob(".tmp-*")) and not (cfg.run_dir / "model").exists()
    fake_free(monkeypatch, lambda path: 10**12)  # space freed: resume
    result = train(cfg, progress=False)
    assert result.resumed_from.endswith("step-000002") and result.last_step == 6
    assert sorted(p.name for p in (cfg.run_dir / "snapshots").iterdir()) == [f"step-00000{i}" for i in range(1, 7)]


def test_a_write_that_fails_on_a_full_disk_leaves_no_partial_checkpoint(tmp_path, course_dir, monkeypatch, capsys):
    import helpers.checkpoint
    from helpers.train import main

    cfg = make_run(tmp_path, course_dir, max_steps=2, checkpoint_every=1, snapshot_every=0)
    full = []
    fake_free(monkeypatch, lambda path: 0 if full else 10**12)

    def save_file_on_a_full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")  # what a real writer leaves when the disk fills up
        full.append(True)
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(helpers.checkpoint, "save_file", save_file_on_a_full_disk)
    with pytest.raises(SystemExit) as stop:
        main(["--run-name", str(cfg.run_dir), "--no-progress"])
    assert stop.value.code == 1
    assert one_line(capsys.readouterr().err).startswith(
        f"helpers.train: {cfg.run_dir / 'checkpoints'}: no space left on the disk — free space")
    assert list((cfg.run_dir / "checkpoints").iterdir()) == [] and not (cfg.run_dir / "run.lock").exists()
