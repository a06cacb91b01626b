"""A selection-sweep plot that stays readable when a few poor settings sit far from the good ones.

One poor snapshot (an early one, say) stretches the axes so that the good settings crowd one corner with their
labels on top of each other. `sweep_plot` draws two panels: every setting (left), and the best `zoom` by the
judge's rule on their own axes (right); labels are nudged apart so that none overlaps another.
"""
from __future__ import annotations

from .selection import lookup

ZOOM = 12  # the right panel's settings: this many best by the judge's rule


def sweep_plot(rows: list[dict], judge, choice: dict | None = None, zoom: int = ZOOM):
    """matplotlib Figure: fidelity (x) against prompt adherence (y), one line per snapshot and step count,
    all settings left and the best `zoom` right; labels give the guidance (and the σ interval when the sweep has
    several)."""
    import matplotlib.pyplot as plt

    best = sorted(rows, key=judge.rank)[:zoom]
    fig, (full, close) = plt.subplots(1, 2, figsize=(13, 5))
    panels = ((full, rows, "every setting"), (close, best, f"the best {len(best)} (by the judge's rule)"))
    for ax, shown, title in panels:
        _draw(ax, shown, judge, choice)
        ax.set_title(title, fontsize=10)
    full.legend(fontsize=7, loc="best")
    fig.suptitle("selection sweep (labels: guidance)")
    fig.tight_layout()  # before the labels: their spacing is worked out on the final axes
    for ax, shown, _ in panels:
        if ax is close or len(rows) <= zoom:
            _label(ax, shown, judge)
    return fig


def _draw(ax, rows: list[dict], judge, choice) -> None:
    (x_key, x_label), (y_key, y_label) = judge.plot_axes
    groups = {}
    for r in rows:
        groups.setdefault((r["setting"]["snapshot"], r["setting"]["steps"]), []).append(r)
    for (snapshot, steps), group in sorted(groups.items()):
        group = sorted(group, key=lambda r: r["setting"]["guidance"])
        ax.plot([lookup(r, x_key) for r in group], [lookup(r, y_key) for r in group], "o-",
                label=f"{snapshot}, {steps} steps", alpha=0.8)
    if choice is not None and any(r is choice or r == choice for r in rows):
        ax.plot([lookup(choice, x_key)], [lookup(choice, y_key)], "*", color="black", markersize=15, label="chosen")
    ax.set(xlabel=x_label, ylabel=y_label)
    ax.grid(alpha=0.3)


def _label(ax, rows: list[dict], judge) -> None:
    (x_key, _), (y_key, _) = judge.plot_axes
    several = len({tuple(r["setting"].get("guidance_interval") or ()) for r in rows}) > 1
    points = [(lookup(r, x_key), lookup(r, y_key), _point_label(r, several)) for r in rows]
    for (x, y, text), (dx, dy) in zip(points, spread_labels([(x, y) for x, y, _ in points], ax)):
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                    arrowprops=dict(arrowstyle="-", lw=0.4, alpha=0.5) if dy > 8 else None)


def _point_label(row: dict, show_interval: bool) -> str:
    s = row["setting"]
    interval = s.get("guidance_interval") or ()
    where = (f" ({interval[0]:g},{interval[1]:g}]" if interval else " all") if show_interval else ""
    return f"{s['guidance']:g}{where}"


def spread_labels(points: list[tuple[float, float]], ax, height_pt: float = 10.0, width_pt: float = 28.0):
    """Offsets in points, one per point, so that no two labels overlap: each label starts just above-right of its
    point and moves up, one label height at a time, while it would cover an earlier one."""
    import numpy as np

    ax.autoscale_view()
    to_points = 72.0 / ax.figure.dpi
    placed, offsets = [], []
    xy = ax.transData.transform(np.asarray(points, dtype=float).reshape(-1, 2)) * to_points
    for (x, y) in xy:
        dy = 3.0
        while any(abs(x - px) < width_pt and abs(y + dy - py) < height_pt for px, py in placed):
            dy += height_pt
        placed.append((x, y + dy))
        offsets.append((4.0, dy))
    return offsets
