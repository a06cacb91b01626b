"""The whole staged selection at a glance (helpers.sweep_view): every screened cell with its prompt count and a
bootstrap sd, the overview plot, the small multiples per setting field and the expandable table."""
import itertools
import json
import types

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from helpers.estimators import PROBE_ATTRIBUTES, scores_from  # noqa: E402
from helpers.setting import Setting  # noqa: E402
from helpers.staged import CellRecords, cell_id, prompt_order, save_reference  # noqa: E402
from helpers.sweep_view import _fid_of_resample, screened_cells  # noqa: E402

N, SIZES, SEED, D = 12, [4, 12], 7, 3
CONTEXT = {"prompts": "abc", "judge": "probe"}
PROBE = types.SimpleNamespace(
    kind="probe", plot_axes=(("frechet_distance", "probe Fréchet distance"), ("mean_accuracy", "mean accuracy")))


def synthetic_sweep(folder):
    """8 cells (guidance 1-4 x steps 2, 3, EMA 0) screened on 4 prompts; 3 finalists on all 12."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(N, D))
    save_reference(folder, CONTEXT, "probe", {"real_features": real})
    settings = [Setting(snapshot="model", guidance=g, steps=s) for s, g in itertools.product([2, 3], [1.0, 2.0, 3.0, 4.0])]
    order = prompt_order(N, SEED)
    finalists = [settings[1], settings[2], settings[5]]
    for s in settings:
        rec = CellRecords(folder, cell_id(s, "w", CONTEXT), N, {"setting": s.to_dict(), "weights": "w",
                                                                "context": CONTEXT})
        positions = order[:SIZES[1] if s in finalists else SIZES[0]]
        hit = rng.random((len(positions), len(PROBE_ATTRIBUTES))) < 0.3 + 0.15 * s.guidance
        rec.add(positions, {"features": real[positions] + rng.normal(size=(len(positions), D)) * s.guidance,
                            "correct": hit})
        rec.save()
    summary = {"context": CONTEXT, "stages": [
        {"prompts": SIZES[0], "cells": [s.to_dict() for s in settings], "screen": []},
        {"prompts": SIZES[1], "cells": [s.to_dict() for s in finalists]}]}
    rows = [{"setting": s.to_dict()} for s in finalists]
    return summary, rows, settings, finalists


@pytest.fixture
def sweep(tmp_path):
    summary, rows, settings, finalists = synthetic_sweep(tmp_path)
    choice = rows[1]
    cells = screened_cells(summary, tmp_path, rows, choice, seed=SEED, bootstrap=40)
    return types.SimpleNamespace(cells=cells, settings=settings, finalists=finalists, choice=choice, folder=tmp_path)


def test_every_screened_cell_with_its_prompt_count_and_a_bootstrap_sd(sweep):
    cells = sweep.cells
    assert [c.setting for c in cells] == [s.to_dict() for s in sweep.settings]
    finals = {json.dumps(s.to_dict()) for s in sweep.finalists}
    for c in cells:
        assert c.prompts == (12 if json.dumps(c.setting) in finals else 4)
        assert c.finalist == (json.dumps(c.setting) in finals) and c.stage == (1 if c.finalist else 0)
        assert c.sd["frechet_distance"] > 0 and c.sd["mean_accuracy"] >= 0
    assert sum(c.chosen for c in cells) == 1 and next(c for c in cells if c.chosen).setting == sweep.choice["setting"]
    assert any(c.sd["mean_accuracy"] > 0 for c in cells)
    # the same bootstrap seed gives the same sd
    summary, rows = synthetic_sweep(sweep.folder / "again")[:2]
    again = screened_cells(summary, sweep.folder / "again", rows, sweep.choice, seed=SEED, bootstrap=40)
    assert [c.sd for c in again] == [c.sd for c in cells]


def test_the_overview_holds_every_screened_cell_at_the_judges_quantities(sweep):
    from helpers.plots import FINALISTS, SCREENED, selection_overview

    fig = selection_overview(sweep.cells, PROBE, "highest mean accuracy; ties: lower FD", bootstrap=40)
    full = fig.axes[0]
    (screened,) = [c for c in full.collections if c.get_label() == SCREENED]
    assert len(screened.get_offsets()) == len(sweep.cells) == 8
    (ring,) = [c for c in full.collections if c.get_label() == FINALISTS]
    assert len(ring.get_offsets()) == 3
    (star,) = [line for line in full.lines if line.get_label() == "chosen"]
    chosen = next(c for c in sweep.cells if c.chosen)
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (chosen.scores["frechet_distance"], chosen.scores["mean_accuracy"])
    assert full.get_xlabel() == "probe Fréchet distance" and full.get_ylabel() == "mean accuracy"
    assert "8 settings screened" in fig._suptitle.get_text() and "rule: highest mean accuracy" in fig._suptitle.get_text()
    assert len(fig.axes[1].texts) == 3  # the finalists' panel, labelled


def test_one_panel_per_setting_field_that_varies(sweep):
    from helpers.plots import selection_axes

    fig = selection_axes(sweep.cells, PROBE, sweep.choice["setting"])
    panels = [ax for ax in fig.axes if ax.get_label().startswith("axis:")]
    assert sorted(ax.get_label() for ax in panels) == ["axis:guidance", "axis:steps"]
    guidance = next(ax for ax in panels if ax.get_label() == "axis:guidance")
    assert sorted(t.get_text() for t in guidance.texts) == ["n=12", "n=12", "n=4", "n=4"]
    assert any(line.get_marker() == "*" for line in guidance.lines)


def test_the_expandable_table_has_one_row_per_screened_cell(sweep):
    from helpers.tables import screened_table_html

    table = screened_table_html(sweep.cells, "probe")
    assert table.html.startswith("<details") and table.html.count('<tr class="monster-screened"') == 8
    assert table.html.count("★") == 2 and "every setting screened (8)" in table.html and " ± " in table.html
    assert len(table.text.splitlines()) == 2 + 8


def test_the_fast_bootstrap_fid_is_the_fid():
    rng = np.random.default_rng(1)
    feats, mu = rng.normal(size=(9, 5)), rng.normal(size=5)
    a = rng.normal(size=(5, 5))
    sigma = a @ a.T
    pick = rng.integers(0, 9, 9)
    want = scores_from("course", {"mu": mu, "sigma": sigma}, {"inception": feats}, pick)["fid"]
    got = _fid_of_resample(feats, feats @ feats.T, feats @ sigma @ feats.T, mu, float(np.trace(sigma)), pick)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("n, d", [(6, 9), (15, 4)])
def test_the_fast_bootstrap_frechet_distance_is_the_probes(n, d):
    from helpers.sweep_view import frechet_of_rows

    rng = np.random.default_rng(n)
    real, features = rng.normal(size=(n, d)), rng.normal(size=(n, d)) * 1.5 + 0.3
    pick = rng.integers(0, n, n)
    want = scores_from("probe", {"real_features": real},
                       {"features": features, "correct": np.ones((n, 5), bool)}, pick)["frechet_distance"]
    assert frechet_of_rows(features[pick], real[pick]) == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_a_run_without_stage_records_has_no_screened_cells_and_one_with_them_has_all(tmp_path):
    from helpers.sweep_view import run_cells

    cfg = types.SimpleNamespace(layout=types.SimpleNamespace(selection=tmp_path), seed=SEED)
    assert run_cells(cfg, {}) == []
    summary, rows, settings, _ = synthetic_sweep(tmp_path / "staged")
    (tmp_path / "stages.json").write_text(json.dumps(summary))
    cells = run_cells(cfg, {"table": rows, "choice": rows[0]}, bootstrap=10)
    assert len(cells) == len(settings) and sum(c.finalist for c in cells) == 3 and cells[1].chosen
    from helpers.sweep_view import caption

    assert caption(cells, "the rule").splitlines() == [
        "8 settings screened (4 / 12 prompts), 3 finalist(s) judged on every prompt; ±1 sd from 200 bootstrap "
        "resamples of each cell's own prompts", "rule: the rule"]
