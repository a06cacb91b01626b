"""Staged selection: successive halving over prompts, its screening estimator, its cost, and its replay."""
import numpy as np
import pytest
import torch

import helpers.sample
from helpers.estimators import kid, kid_to_gaussian, scores_from, screen_score
from helpers.model import load_model
from helpers.score import feature_statistics, frechet_distance
from helpers.selection import read_cells, sweep_settings
from helpers.setting import Setting
from helpers.staged import (StagePlan, best, cells_per_stage, halving, prompt_order, stage_sizes, staged_sweep,
                            trim_to_budget)
from judges_for_tests import BrightJudge, FreshBrightJudge
from test_selection import run  # noqa: F401 (the trained tiny run, a module-scoped fixture)



REAL_SAMPLE = helpers.sample.sample_images
PROMPTS = [f"a monster number {i}." for i in range(8)]
SEEDS = [100 + i for i in range(8)]


def test_the_plan_halves_the_cells_and_ends_on_every_prompt():
    assert stage_sizes([24, 80], 240) == [24, 80, 240] and stage_sizes([24, 80], 60) == [24, 60]
    assert stage_sizes([], 240) == [240]
    assert cells_per_stage(36, 3, 0.33) == [36, 12, 4] and cells_per_stage(3, 3, 0.33) == [3, 1, 1]
    assert best([3.0, 1.0, 2.0, 1.0], 2) == [1, 3]  # the two smallest, ties to the earlier, in original order
    assert prompt_order(10, 0) == prompt_order(10, 0) != prompt_order(10, 1) and sorted(prompt_order(10, 0)) == list(
        range(10))
    true = [0.1 * c for c in range(9)]  # cell 0 is best
    stages = halving(9, [3, 6, 12], 0.34, lambda c, n: true[c])
    assert stages == [list(range(9)), [0, 1, 2, 3], [0, 1]]
    plan = StagePlan([Setting()] * 9, [3, 6, 12], [9, 4, 2], [10] * 9)
    assert plan.images == [27, 12, 12] and plan.full_images == 108 and sum(plan.evals()) == 510


def test_budget_drops_the_oldest_snapshots_costliest_cells_first_and_says_so():
    settings = [Setting(snapshot=s, guidance=g, steps=n) for s in ("step-000002", "step-000004")
                for g in (1.0, 3.0) for n in (2, 3)]
    evals = [n * (1 if g == 1.0 else 2) for s in (0, 1) for g in (1.0, 3.0) for n in (2, 3)]
    plan = StagePlan(settings, [2, 8], cells_per_stage(8, 2, 0.5), evals)
    cost = sum(plan.evals())  # seconds at 1 s per evaluation
    assert trim_to_budget(plan, 1.0, 0, ["step-000002", "step-000004"], 0.5) is plan  # no budget
    assert trim_to_budget(plan, 1.0, cost / 3600, ["step-000002", "step-000004"], 0.5).dropped == []
    trimmed = trim_to_budget(plan, 1.0, 0.6 * cost / 3600, ["step-000002", "step-000004"], 0.5)
    assert sum(trimmed.evals()) <= 0.6 * cost and trimmed.dropped
    assert trimmed.dropped[0] == Setting(snapshot="step-000002", guidance=3.0, steps=3)  # oldest, costliest
    assert all(s.snapshot == "step-000002" for s in trimmed.dropped)
    assert len(trimmed.settings) + len(trimmed.dropped) == 8
    assert len(trim_to_budget(plan, 1.0, 1e-9, ["step-000002", "step-000004"], 0.5).settings) == 1


def test_kid_to_the_reference_gaussian_is_unbiased_at_any_n_while_fid_is_not():
    rng = np.random.default_rng(0)
    d, mu, sigma = 3, np.zeros(3), np.eye(3)
    # the self term of the reference Gaussian, closed form vs Monte Carlo: KID of the reference itself is 0
    draws = [kid_to_gaussian(rng.normal(size=(200, d)), mu, sigma) for _ in range(300)]
    assert abs(np.mean(draws)) < 3 * np.std(draws) / np.sqrt(len(draws))

    def mean_at(n, spread, metric, reps=400):
        return np.mean([metric(rng.normal(0.3, spread, size=(n, d))) for _ in range(reps)])

    kid_g = lambda x: kid_to_gaussian(x, mu, sigma)  # noqa: E731
    fid = lambda x: frechet_distance(*feature_statistics(x), mu, sigma)  # noqa: E731
    for spread in (0.5, 1.5):  # a low- and a high-diversity setting
        small, large = mean_at(8, spread, kid_g), mean_at(128, spread, kid_g, reps=100)
        assert abs(small - large) < 0.15 * max(abs(large), 0.05) + 0.02, (spread, small, large)
    # the two-sample KID (the probe's screen) is unbiased too: the same expectation at 8 and 128 images
    two = lambda n: np.mean([kid(rng.normal(0.3, 1.5, size=(n, d)), rng.normal(size=(n, d)))  # noqa: E731
                             for _ in range(300)])
    assert abs(two(8) - two(128)) < 0.15 * abs(two(128)) + 0.02
    # FID's expectation depends on N, and its small-N bias grows with the spread: it favours low diversity
    bias = lambda spread: mean_at(8, spread, fid) - mean_at(256, spread, fid, reps=50)  # noqa: E731
    assert bias(1.5) > 2 * bias(0.5) > 0


def test_screening_is_the_mean_accuracy_for_the_probe_and_kid_for_the_course():
    rng = np.random.default_rng(1)
    correct = rng.random((6, 5)) < 0.5
    probe = {"correct": correct, "features": rng.normal(size=(6, 4))}
    real = {"real_features": rng.normal(size=(6, 4))}
    row = scores_from("probe", real, probe)
    screen = screen_score("probe", real, probe)
    assert screen[0] == pytest.approx(-row["mean_accuracy"])
    assert screen[1] == pytest.approx(kid(probe["features"], real["real_features"]))
    assert row["mean_accuracy"] == pytest.approx(correct[:, [0, 1, 4]].mean())
    subset = scores_from("probe", real, probe, [0, 2, 4])
    assert subset["accuracy"]["color"] == pytest.approx(correct[[0, 2, 4], 0].mean())
    course = {"inception": rng.normal(size=(6, 4)), "clip_t": rng.random(6)}
    ref = {"mu": np.zeros(4), "sigma": np.eye(4)}
    kid_course = kid_to_gaussian(course["inception"], ref["mu"], ref["sigma"])
    assert screen_score("course", ref, course) == pytest.approx(kid_course)
    assert screen_score("course", {}, {"clip_t": course["clip_t"]}) == pytest.approx(-course["clip_t"].mean())


class Interrupted(Exception):
    """Stands for Ctrl-C or an ended session in the middle of a sweep."""


def _counting(monkeypatch, fail_after=None):
    calls, real = [], REAL_SAMPLE

    def sample(model, prompts, seeds, setting, **kw):
        if fail_after is not None and len(calls) >= fail_after:
            raise Interrupted("stopped by the test")
        calls.append((setting, list(prompts), list(seeds)))
        return real(model, prompts, seeds, setting, **kw)

    monkeypatch.setattr(helpers.sample, "sample_images", sample)
    return calls


def test_staged_sweep_reuses_stage_images_resumes_and_matches_the_full_sweep(run, monkeypatch, capsys, tmp_path):
    model, judge = load_model(run), BrightJudge()
    settings = sweep_settings(Setting(scheduler="ddim", steps=2), snapshot=run.layout.snapshot_names(),
                              guidance=[1.0, 2.0, 4.0])
    kw = dict(batch_size=4, stage_prompts=[2, 4], keep=0.5, budget_hours=0, progress=False)
    # interrupted in stage 2: the cells finished so far are kept on disk
    calls = _counting(monkeypatch, fail_after=7)
    with pytest.raises(Interrupted):
        staged_sweep(model, run, judge, settings, PROMPTS, SEEDS, **kw)
    assert len(calls) == 7
    order = prompt_order(8, run.seed)
    assert len({c[0] for c in calls[:6]}) == 6  # stage 1: every cell on the same first two prompts and seeds
    assert all(c[1] == [PROMPTS[p] for p in order[:2]] and c[2] == [SEEDS[p] for p in order[:2]] for c in calls[:6])
    calls = _counting(monkeypatch)
    rows, summary = staged_sweep(model, run, judge, settings, PROMPTS, SEEDS, **kw)
    out = capsys.readouterr().out
    assert "stage 1 was sampled earlier" in out and "the full sweep it replaces: 6 cells x 8 prompts = 48 images" in out
    assert [len(s["cells"]) for s in summary["stages"]] == [6, 3, 2] and summary["plan"]["images"] == [12, 6, 8]
    assert len(calls) == 2 + 2  # stage 2's last two cells, then the two finalists' last 4 prompts each
    # later stages sample only the prompts a cell lacked
    assert all(c[1] == [PROMPTS[p] for p in order[2:4]] and c[2] == [SEEDS[p] for p in order[2:4]] for c in calls[:2])
    assert all(c[1] == [PROMPTS[p] for p in order[4:8]] and c[2] == [SEEDS[p] for p in order[4:8]] for c in calls[2:])
    # the finalists' rows are those of the full sweep over the same cells (stage images are the final ones)
    winners = [Setting.from_dict(r["setting"]) for r in rows]
    # the full sweep (no stages) with a judge of another key, in a records folder of its own: it samples every
    # prompt of those cells afresh rather than reading the staged sweep's records
    fresh, own = FreshBrightJudge(), dict(batch_size=8, stage_prompts=[], budget_hours=0, progress=False,
                                          folder=tmp_path / "full")
    calls = _counting(monkeypatch)
    full, _ = staged_sweep(model, run, fresh, winners, PROMPTS, SEEDS, **own)
    assert sorted(sum((c[1] for c in calls), [])) == sorted(PROMPTS * len(winners))
    assert [r["clip_t"] for r in rows] == pytest.approx([r["clip_t"] for r in full], abs=1e-5)
    # and the halving kept the best of the screened cells: the full sweep's winner over all six is among them
    everything, _ = staged_sweep(model, run, fresh, settings, PROMPTS, SEEDS, **own)
    assert min(everything, key=judge.rank)["setting"] in [r["setting"] for r in rows]
    # a second run samples nothing and adds no duplicate rows to cells.jsonl
    calls = _counting(monkeypatch)
    before = len(read_cells(run.layout.cells))
    again, _ = staged_sweep(model, run, judge, settings, PROMPTS, SEEDS, **kw)
    assert calls == [] and again == rows and len(read_cells(run.layout.cells)) == before
    assert (run.layout.selection / "stages.json").exists()
    # the full sweep on the same records (only the prompts the staged sweep skipped are sampled), then its replay
    from helpers.replay import load_full_sweep, replay_table

    calls = _counting(monkeypatch)
    full_rows, _ = staged_sweep(model, run, judge, settings, PROMPTS, SEEDS, **{**kw, "stage_prompts": []})
    assert len(full_rows) == 6 and sum(len(c[1]) for c in calls) == 48 - 26
    sweep = load_full_sweep(run.layout.selection / "staged")
    assert sweep.n == 8 and len(sweep.settings) == 6 and sweep.kind == "course"
    assert sweep.settings[sweep.winner()] == min(full_rows, key=judge.rank)["setting"]
    table, results = replay_table(sweep, [([2, 4], 0.5)], orders=5, bootstrap=10)
    assert results[0]["images"] == 26 and "full sweep: 6 cells x 8 prompts" in table


def test_hw6_default_selection_and_test_set_cost_at_most_a_fifth_of_training():
    from helpers.config import profile_config
    from helpers.selection_cost import HW6_TEST_PROMPTS, HW6_TRAIN_STEPS, flop_report, flop_totals, selection_cost

    cfg = profile_config("hw6")
    cost = selection_cost(cfg, 9, HW6_TEST_PROMPTS)
    assert len(cost.plan.settings) == 225  # issue 22's count: 135 unguided + 90 autoguided cells
    assert cost.plan.sizes == [48, 192, 1063] and cost.plan.counts == [225, 45, 9]
    assert cost.test_evals_per_image == 30  # 15 steps, CFG at every one
    # the U-Net's and the SD decoder's GFLOP, as torch's counter gives them on the meta device (selection_cost
    # measures them; the test passes them in to stay fast)
    _, f = flop_totals(cfg, 9, HW6_TRAIN_STEPS, HW6_TEST_PROMPTS, gflop=89.22, decode_gflop=622.2)
    assert (f["selection_max"] + f["test_set"]) / f["training"] <= 0.20
    assert 1.3 < f["full_sweep"] / f["training"] < 1.4  # the 1.36x
    report = flop_report(cfg, 9, HW6_TRAIN_STEPS, HW6_TEST_PROMPTS, gflop=89.22, decode_gflop=622.2)
    assert "225 cells" in report and "of training" in report


def synthetic_probe_sweep(accuracies, n=240, seed=0):
    """A full sweep of the probe judge: cell c reads each attribute right with probability accuracies[c]."""
    from helpers.replay import FullSweep

    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n, 4))
    records = [{"correct": rng.random((n, 5)) < a, "features": real + rng.normal(0, 0.3, size=(n, 4))}
               for a in accuracies]
    settings = [Setting(guidance=1.0 + c, steps=10).to_dict() for c in range(len(accuracies))]
    return FullSweep("probe", {"real_features": real}, settings, records, n)


def test_replay_on_a_synthetic_sweep_finds_the_winner_or_a_near_tie_and_counts_images():
    from helpers.replay import plan_images, replay, replay_table, within_noise

    sweep = synthetic_probe_sweep([0.5, 0.6, 0.7, 0.8, 0.9, 0.895] + [0.55] * 10)
    winner, near = within_noise(sweep, bootstrap=60, alpha=0.05)
    assert winner in (4, 5) and near >= {4, 5} and 0 not in near and 3 not in near
    picks = replay(sweep, [24, 80], 0.33, orders=40)
    assert all(p in near for p in picks)
    table, results = replay_table(sweep, [([24, 80], 0.33), ([], 1.0)], orders=20, bootstrap=40)
    assert results[1]["images"] == 16 * 240 and results[1]["exact"] == 1.0  # no screening: the full sweep itself
    assert results[0]["images"] == plan_images(16, 240, [24, 80], 0.33) == 16 * 24 + 6 * 56 + 2 * 160
    assert results[0]["within_noise"] == 1.0 and "| 24 / 80 / 240 | 0.33 |" in table
    # a screen on too few prompts of nearly equal cells drops the winner in some orders: replay can tell
    close = synthetic_probe_sweep([0.70, 0.71, 0.72, 0.73, 0.74, 0.75], n=400, seed=1)
    w, near = within_noise(close, bootstrap=60, alpha=0.05)
    picks = replay(close, [4], 0.2, orders=40)
    assert len(set(picks)) > 1


def test_stage_fields_are_checked_with_one_line_naming_them():
    from helpers.config import profile_config

    cfg = profile_config("demo")
    for field, bad in (("sweep_stage_prompts", [80, 24]), ("sweep_stage_prompts", [1]), ("sweep_keep", 0.0),
                       ("sweep_keep", 1.5), ("select_budget_hours", -1.0)):
        with pytest.raises(ValueError, match=field):
            cfg.replace(**{field: bad})
    assert cfg.replace(sweep_stage_prompts=[]).sweep_stage_prompts == []  # the full sweep
