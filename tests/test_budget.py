"""The whole job's time budget: the plan before step 1, its one correction at the end of warm-up, 04's share."""
from __future__ import annotations

import json
import types
from datetime import datetime, timezone

import pytest
import torch

from helpers import budget, fit
from helpers.cache import load_cache
from helpers.config import profile_config
from helpers.step import train_rows, unet_for_cache
from helpers.train import train
from test_fit import mocked_clock
from test_train import make_run

NOW = datetime(2026, 11, 29, 14, 0, tzinfo=timezone.utc)
HW6 = dict(images=39_000, param_bytes=int(296.4e6 * 4), ips=25.0)  # hw6-recipe on a T4


def test_plan_budget_fits_steps_and_saves_into_the_hours():
    cfg = profile_config("hw6", time_budget_hours=9.0)  # 60 epochs x 64 of hw6-recipe, the T4 case
    images, param_bytes, ips = HW6.values()
    plan = budget.plan_budget(cfg, ips, images, param_bytes, now=NOW)
    hours = 9 * 3600 * (1 - budget.BUDGET_MARGIN)
    one_step = 64 / ips + 4 * param_bytes / budget.DISK_BYTES_PER_S / cfg.checkpoint_every + 1  # generous bound
    assert plan.configured_steps == -(-60 * images // 64) > plan.steps
    assert hours - one_step < plan.seconds <= hours
    assert (plan.end - NOW).total_seconds() == pytest.approx(plan.seconds)
    assert plan.epochs == pytest.approx(plan.steps * 64 / images)
    assert plan.overhead_s > 0 and plan.seconds - plan.overhead_s == pytest.approx(plan.steps * 64 / ips)
    snapshots = plan.configured_steps // cfg.snapshot_every
    assert -(-plan.steps // plan.snapshot_every) == snapshots  # as many snapshots as the configured run
    roomy = budget.plan_budget(cfg.replace(time_budget_hours=100.0), ips, images, param_bytes, now=NOW)
    assert (roomy.steps, roomy.snapshot_every) == (roomy.configured_steps, cfg.snapshot_every)  # fits: unchanged
    with pytest.raises(budget.DoesNotFitBudgetError, match=r"time_budget_hours=0.001 is too short .* at least"):
        budget.plan_budget(cfg.replace(time_budget_hours=0.001), ips, images, param_bytes, now=NOW)


def test_a_plan_made_again_counts_the_steps_done_and_the_time_spent():
    cfg = profile_config("hw6", time_budget_hours=9.0)
    images, param_bytes, ips = HW6.values()
    first = budget.plan_budget(cfg, ips, images, param_bytes, now=NOW)
    # at step 1000, an hour in, the run turns out 20 % faster than measured: more steps fit the same hours
    again = budget.plan_budget(cfg, 1.2 * ips, images, param_bytes, now=NOW, done=1000, spent_s=3600.0)
    assert first.steps < again.steps <= again.configured_steps
    assert again.seconds == pytest.approx(first.seconds, abs=20)  # both end at the budget, less its margin
    assert (again.end - NOW).total_seconds() == pytest.approx(again.seconds - 3600.0)
    slower = budget.plan_budget(cfg, 0.8 * ips, images, param_bytes, now=NOW, done=1000, spent_s=3600.0)
    assert 1000 < slower.steps < first.steps
    overrun = budget.plan_budget(cfg, ips, images, param_bytes, now=NOW, done=1000, spent_s=9 * 3600.0)
    assert overrun.steps == 1001  # already past the budget at the correction: no error mid-run, one step and the end
    changes = budget.plan_changes(cfg, again, done=1000)  # the warm-up stays as long as it was
    assert changes["warmup_steps"] == budget.warmup_steps_for(cfg, cfg.max_steps) and changes["warmup_fraction"] == 0
    assert budget.plan_changes(cfg, first)["warmup_steps"] == round(0.05 * first.steps)  # hw6: 5 % of the plan


def test_the_correction_measures_the_later_half_of_warm_up_and_comes_once():
    planned = profile_config("tiny", max_steps=100, warmup_steps=40)
    replan = budget.Replan(planned, None, 4, planned, 800, 1, 0.0)
    marks = [(10, 10.0), (20, 15.0), (30, 20.0)]  # 10 slow steps, then 2 steps/s
    assert not any(replan.due(*m) for m in marks)
    assert replan.due(40, 25.0) and not replan.due(50, 30.0)  # once, at the first flush past warm-up
    replan.marks = replan.marks[:-1]
    assert replan.speed(8) == pytest.approx(20 * 8 / 10.0)  # steps 20..40, not the slow first ten


def test_the_reserve_counts_what_04_does_at_the_measured_sampling_speed(hw6_excerpt, monkeypatch):
    """One budget for the whole job: the hw6 T4 case, with the staged selection and the test set reserved first."""
    cfg = profile_config("hw6", time_budget_hours=9.0, data_dir=str(hw6_excerpt))
    cache = types.SimpleNamespace(mean=torch.empty(1, 2, 4, 32, 32), embeddings=torch.empty(1, 77, 512))
    per_row, timed = [0.004], []
    monkeypatch.setattr(budget, "forward_seconds", lambda c, u, k, d, rows: timed.append(set(rows)) or
                        {r: 0.01 + per_row[0] * r for r in rows})  # a fixed cost per forward, and one per row
    monkeypatch.setattr(budget, "png_seconds", lambda size: 0.01)
    monkeypatch.setattr(budget, "start_seconds", lambda cfg, device: 5.0)
    unet = torch.nn.Linear(1000, 1000)
    reserve = budget.after_training(cfg, cache, unet, "cpu")
    from helpers.data import load_prompts

    n_test = len(load_prompts(hw6_excerpt / "test.json"))  # under the first stage's 48: one stage of them all
    assert timed[0] == {n_test, 2 * n_test, budget.GRID_PROMPTS, 2 * budget.GRID_PROMPTS}  # the sizes 04 samples
    images, param_bytes, ips = HW6.values()
    alone = budget.plan_budget(cfg, ips, images, param_bytes, now=NOW)
    job = budget.plan_budget(cfg, ips, images, param_bytes, now=NOW, after_training=reserve)
    seconds, line, parts = reserve(alone.configured_steps // cfg.snapshot_every + 1)
    assert set(parts) == {"sweep", "test_set", "grids", "loads", "judge"} and parts["judge"] == 0  # no probe on hw6
    assert job.after_training_s == pytest.approx(seconds) == pytest.approx(sum(parts.values()))
    # the recipe's setting (15 steps, guidance 3 at every step) on the test prompts: 15 forwards of 2 rows each + PNGs
    decode = parts["test_set"] - 15 * (0.01 + 0.004 * 2 * n_test) - n_test * 0.01
    from helpers.selection_cost import sd_vae_decode_gflop, unet_gflop

    in_evals = sd_vae_decode_gflop(32) / unet_gflop(cfg, 4, 32, 512)  # the VAE's decode of an image, in U-Net forwards
    assert decode == pytest.approx(n_test * in_evals * (0.01 + 0.004 * 2 * n_test) / (2 * n_test))  # per row
    assert alone.seconds - job.seconds == pytest.approx(seconds, abs=10)  # training gives way by the reserve (± a step)
    assert job.seconds + job.after_training_s <= 9 * 3600 * (1 - budget.BUDGET_MARGIN)
    assert "selection" in line and "test set" in line and "whole job ends" in budget.describe_budget(cfg, job)
    bigger = profile_config("hw6", time_budget_hours=9.0, data_dir=str(hw6_excerpt), sweep_steps=[10, 15, 20, 30])
    assert budget.after_training(bigger, cache, unet, "cpu")(10)[2]["sweep"] > parts["sweep"]  # a wider sweep
    per_row[0] *= 2  # sampling slower: the sweep, test set and grids take longer
    slower = budget.after_training(cfg, cache, unet, "cpu")(alone.configured_steps // cfg.snapshot_every + 1)[2]
    assert all(slower[k] > 1.5 * parts[k] for k in ("sweep", "grids")) and slower["test_set"] > parts["test_set"]


def test_sampling_time_counts_each_batchs_forwards_at_their_size():
    forward = {r: 0.01 + 0.001 * r for r in (2, 4, 64, 128)}
    # 6 of 10 steps guided (CFG: 2 rows a prompt), the other 4 one row a prompt; 130 prompts in 64, 64 and 2
    expect = 2 * (6 * forward[128] + 4 * forward[64]) + 6 * forward[4] + 4 * forward[2]
    assert budget.sampling_seconds(6, 10, False, 130, 64, forward) == pytest.approx(expect)
    assert budget.sampling_seconds(6, 10, True, 2, 64, forward) == pytest.approx(6 * forward[4] + 14 * forward[2])
    assert budget.batches(130, 64) == [64, 64, 2] and budget.batches(128, 64) == [64, 64]


def test_04s_imports_are_timed_once_per_environment(tmp_path, monkeypatch):
    import subprocess
    import sys

    cfg = profile_config("tiny", outputs_dir=str(tmp_path))
    runs = []

    def run(args, **kwargs):
        runs.append(args)
        return types.SimpleNamespace(stdout="12.5\n")
    monkeypatch.setattr(subprocess, "run", run)
    assert budget.import_seconds(cfg) == budget.import_seconds(cfg) == 12.5 and len(runs) == 1  # then remembered
    assert budget.IMPORTS_04 in runs[0][-1]
    record = json.loads((cfg.cache_dir / "import_seconds.json").read_text())
    monkeypatch.setattr(sys, "executable", "/another/python")
    assert budget.import_seconds(cfg) == 12.5 and len(runs) == 2  # another environment: timed again
    assert record["seconds"] == 12.5

    def failing(args, **kwargs):
        raise subprocess.TimeoutExpired(args, 300)
    monkeypatch.setattr(subprocess, "run", failing)
    (cfg.cache_dir / "import_seconds.json").unlink()
    assert budget.import_seconds(cfg) == 0.0  # not timed: left out of the estimate, training goes on


def test_sampling_speed_is_measured_on_the_unet_in_the_sampling_precision(tmp_path, course_dir):
    cfg = make_run(tmp_path, course_dir)
    cache = load_cache(cfg)
    unet = unet_for_cache(cfg, cache).eval()
    forward = budget.forward_seconds(cfg, unet, cache, torch.device("cpu"), {2, 8})
    assert set(forward) == {2, 8} and all(0 < s < 1 for s in forward.values())
    assert budget.png_seconds(256) > 0


def test_time_budget_plans_the_run_corrects_it_at_warm_up_and_a_resume_keeps_it(tmp_path, course_dir, monkeypatch,
                                                                                 capsys):
    monkeypatch.setattr(fit, "perf_counter", mocked_clock(1.0))  # 3 timed steps of 8 images in 1 s: 24 images/s
    monkeypatch.setattr(budget, "forward_seconds", lambda c, u, k, d, rows: {r: 1e-3 * r for r in rows})
    monkeypatch.setattr(budget, "import_seconds", lambda cfg: 0.0)  # not timed in a child process here
    # the run's own steps turn out 1.5x the measured speed: the correction lengthens the plan
    monkeypatch.setattr(budget.Replan, "speed", lambda self, images_per_step: 36.0)
    monkeypatch.setattr(budget, "elapsed", lambda began: 1.0)  # the set-up and the first steps, whatever this host
    cfg = make_run(tmp_path, course_dir, max_steps=200, checkpoint_every=2, snapshot_every=20, warmup_steps=3,
                   time_budget_hours=0.004)
    first = train(cfg, progress=False, stop_at=4)
    out = capsys.readouterr().out
    planned = int(out.split("time budget 0.004 h at 24.0 images/s: training ")[1].split(" steps")[0])
    assert 2 < planned < 200 and "(shortened from the configured 200 steps)" in out
    assert "time budget corrected at step 3 (end of warm-up)" in out
    record = json.loads(cfg.layout.budget.read_text())
    corrected = record["steps"]
    assert record["first_plan"]["steps"] == planned < corrected <= 200 and record["corrected_at"] == 3
    assert set(record["parts"]) >= {"sweep", "test_set"} and record["sessions"][0]["steps"] == [1, 4]
    saved = json.loads(cfg.layout.config.read_text())
    assert (saved["max_steps"], saved["max_epochs"], saved["warmup_steps"]) == (corrected, 0, 3)
    assert first.last_step == 4 and first.model_dir is None

    monkeypatch.setattr(fit, "perf_counter", mocked_clock(100.0))  # a slower device now: the plan must not change
    second = train(cfg, progress=False)  # the stale cfg (max_steps 200) too: the checkpoint's plan wins
    out = capsys.readouterr().out
    assert "resuming the plan made in the first session" in out and "corrected" not in out
    assert second.last_step == corrected and second.model_dir is not None
    assert len(json.loads(cfg.layout.budget.read_text())["sessions"]) == 2
    from helpers.trainlog import read_log

    assert read_log(cfg)["lr"][-1] < 0.1 * cfg.lr  # the cosine decays over the corrected total, not the first plan


def test_a_budget_too_short_for_one_step_stops_with_one_line(tmp_path, course_dir, monkeypatch, capsys):
    from helpers.train import main

    monkeypatch.setattr(fit, "perf_counter", mocked_clock(1.0))
    monkeypatch.setattr(budget, "forward_seconds", lambda c, u, k, d, rows: {r: 1e-3 * r for r in rows})
    monkeypatch.setattr(budget, "import_seconds", lambda cfg: 0.0)  # not timed in a child process here
    cfg = make_run(tmp_path, course_dir, max_steps=4, time_budget_hours=1e-5)  # 0.036 s: less than one step
    with pytest.raises(SystemExit) as stop:
        main(["--run-name", str(cfg.run_dir), "--no-progress"])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1
    assert "helpers.train: time_budget_hours=1e-05 is too short" in err and "hours are needed" in err
    assert not (cfg.run_dir / "checkpoints").exists()


def test_04_gives_the_sweep_what_the_whole_budget_leaves_after_training(tmp_path, course_dir):
    cfg = make_run(tmp_path, course_dir, time_budget_hours=0.5)  # 1,710 s with the margin
    assert budget.sweep_budget_hours(cfg) == (0.0, "")  # no plan: no limit
    budget.write_record(cfg, time_budget_hours=0.5, seconds=1000.0, after_training_s=400.0,
                        parts=dict(sweep=300.0, test_set=100.0), sessions=[dict(steps=[1, 10], seconds=900.0)])
    hours, why = budget.sweep_budget_hours(cfg)  # 1,710 - 900 trained - 100 for the rest of 04
    assert hours * 3600 == pytest.approx(710) and "it fits" in why  # training ended early: room to spare
    budget.record_session(cfg, 11, 20, 500.0)  # 1,400 s against 1,000 planned
    hours, why = budget.sweep_budget_hours(cfg)
    assert hours * 3600 == pytest.approx(210) and "training took 23.3 min (planned 16.7 min)" in why
    assert "cells are dropped to fit" in why
    assert budget.sweep_budget_hours(cfg.replace(select_budget_hours=0.25))[0] == 0.25  # set by hand: it wins
