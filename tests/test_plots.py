"""The selection-sweep plot: the best settings get their own axes, and no two labels overlap."""
import itertools
import types

import matplotlib
from matplotlib.text import Text

matplotlib.use("Agg")

from helpers.plots import sweep_plot  # noqa: E402


def sweep_rows():
    rows = []
    for snapshot, steps, g in itertools.product(["step-000300", "step-000900"], [10, 20], [1.0, 2.0, 3.0]):
        poor = snapshot == "step-000300"
        rows.append({"setting": {"snapshot": snapshot, "steps": steps, "guidance": g, "guidance_interval": [0.3, 5.0]},
                     "fd": (300.0 if poor else 80.0) + g * 0.4 + steps * 0.0001,  # 10 and 20 steps nearly coincide
                     "acc": (0.2 if poor else 0.95) + g * 0.001})
    return rows


JUDGE = types.SimpleNamespace(plot_axes=(("fd", "Fréchet distance"), ("acc", "accuracy")),
                              rank=lambda r: (-r["acc"], r["fd"]))


def test_the_best_settings_get_their_own_axes_and_labels_do_not_overlap():
    rows = sweep_rows()
    choice = min(rows, key=JUDGE.rank)
    fig = sweep_plot(rows, JUDGE, choice, zoom=6)
    full, close = fig.axes
    assert full.get_xlim()[1] - full.get_xlim()[0] > 200  # every setting, the poor snapshot included
    lo, hi = close.get_xlim()
    assert hi - lo < 5 and lo > 70  # only the six good settings
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in close.texts]  # the text alone, not its leader line
    assert len(boxes) == 6 and {t.get_text() for t in close.texts} == {"1", "2", "3"}
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    assert any(line.get_label() == "chosen" for line in close.lines)


def test_the_y_axis_is_the_score_that_still_discriminates_and_each_series_is_one_weights_and_steps():
    rows = []
    for snapshot, ema, g in itertools.product(["step-000300", "step-000900"], [0.0, 0.05], [1.0, 2.0, 3.0]):
        rows.append({"setting": {"snapshot": snapshot, "steps": 10, "guidance": g, "ema_length": ema},
                     "frechet_distance": 50 - 5 * g + 10 * ema, "mean_accuracy": 1.0,
                     "accuracy": {"color": 1.0, "eyes": 0.6 + 0.05 * g + ema}})
    judge = types.SimpleNamespace(
        plot_axes=(("frechet_distance", "FD"), ("mean_accuracy", "mean accuracy")),
        columns=["accuracy.color", "accuracy.eyes", "mean_accuracy", "frechet_distance"],
        rank=lambda r: (-r["mean_accuracy"], r["frechet_distance"]))
    fig = sweep_plot(rows, judge, rows[-1])
    (full,) = close, = fig.axes  # 12 settings, the best 12: one panel
    assert full.get_ylabel().startswith("probe accuracy: eyes")
    series = [line for line in full.lines if line.get_label() != "chosen"]
    assert len(series) == 4 and all(len(line.get_xdata()) == 3 for line in series)  # never σ_rel 0 and 0.05 joined
    assert {line.get_label() for line in series} == {
        f"{s}, {e}, 10 steps" for s in ("step-000300", "step-000900") for e in ("half-life EMA", "EMA length 0.05")}
    assert all(t.get_fontsize() >= 10 for t in close.texts)


def test_real_vs_generated_names_every_probed_attribute_and_stays_crisp():
    import torch

    from helpers.data import Prompt
    from helpers.judges import probe_verdict_grid
    from helpers.probe import CLASSES

    n = 5
    probe = types.SimpleNamespace(predict=lambda x: {a: torch.zeros(len(x), dtype=torch.long) for a in CLASSES})
    attributes = [{a: CLASSES[a][i % len(CLASSES[a])] for a in CLASSES} for i in range(n)]
    judge = types.SimpleNamespace(probe=probe, attributes=attributes, real=torch.rand(n, 3, 16, 16) * 2 - 1)
    judged = types.SimpleNamespace(judge=judge, prompts=[Prompt(f"k{i}", f"{i}.png", "x") for i in range(n)])
    fig = probe_verdict_grid(judged, torch.rand(n, 3, 16, 16) * 2 - 1, n=n)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == n
    label = shown[1].get_xlabel()
    assert all(f"{a}: " in label for a in CLASSES) and "eyes" in CLASSES and "✗ (asked:" in label
    assert shown[0].images[0].get_interpolation() == "nearest" and shown[0].xaxis.label.get_fontsize() >= 10


def test_the_data_grid_is_crisp_and_never_breaks_a_word(tmp_path):
    from PIL import Image

    from helpers.grids import data_grid

    records = []
    for i in range(3):
        path = tmp_path / f"m{i}.png"
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(path)
        records.append(types.SimpleNamespace(path=path, captions=[
            "a red round monster with big eyes and horns, moving to the left while it jumps up high"]))
    fig = data_grid(records, 16, n=3, cols=3)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    words = set(records[0].captions[0].replace(",", "").split())
    assert len(titles) == 3 and all(w.strip(",…") in words | {""} for t in titles
                                    for line in t.splitlines()[1:] for w in line.split())
    assert all(ax.images[0].get_interpolation() == "nearest" for ax in fig.axes if ax.images)
