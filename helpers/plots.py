"""A selection-sweep plot that reads at a glance: realism against the attribute that still tells settings apart.

Mean prompt adherence saturates for a well-trained model (every good setting at 1.000), so the y axis is the
judge's score column that varies most among the best settings (the demo: usually the probe's eyes accuracy; the
course: CLIP-T). One poor snapshot (an early one, say) stretches the axes so that the good settings crowd one
corner: `sweep_plot` draws every setting (left) and the best `zoom` by the judge's rule on their own axes (right).
One line per snapshot × EMA length × steps (colour: snapshot, dash: EMA length, marker: steps), its points
labelled by guidance; labels are nudged apart so that none overlaps another.
"""
from __future__ import annotations

from .selection import lookup

ZOOM = 12  # the right panel's settings: this many best by the judge's rule
FONT = 11  # points: readable at a notebook's width (the figure is about 1000 px wide there)
DASHES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v")


def discriminating_key(rows: list[dict], judge, zoom: int = ZOOM) -> str:
    """The judge's score column (besides the realism axis) with the largest spread among the best `zoom` rows."""
    x_key = judge.plot_axes[0][0]
    best = sorted(rows, key=judge.rank)[:zoom]
    candidates = [c for c in getattr(judge, "columns", []) if c != x_key and _numeric(best, c)]
    fallback = judge.plot_axes[1][0]
    if not candidates:
        return fallback
    spread = {c: max(lookup(r, c) for r in best) - min(lookup(r, c) for r in best) for c in candidates}
    top = max(spread.values())
    return fallback if spread.get(fallback) == top else max(candidates, key=lambda c: spread[c])


def _numeric(rows: list[dict], key: str) -> bool:
    try:
        return all(isinstance(lookup(r, key), (int, float)) for r in rows)
    except (KeyError, TypeError):
        return False


def y_label(judge, key: str) -> str:
    if key == judge.plot_axes[1][0]:
        return judge.plot_axes[1][1]
    name = key.split(".")[-1]
    return f"probe accuracy: {name} (the score that varies most)" if key.startswith("accuracy.") else name


def sweep_plot(rows: list[dict], judge, choice: dict | None = None, zoom: int = ZOOM):
    """matplotlib Figure: realism (x, the judge's first plot axis) against `discriminating_key` (y), all settings
    left and the best `zoom` right (one panel when there are no more); labels give the guidance (and the σ interval
    when the sweep has several)."""
    import matplotlib.pyplot as plt

    y_key = discriminating_key(rows, judge, zoom)
    best = sorted(rows, key=judge.rank)[:zoom]
    with plt.rc_context({"font.size": FONT, "axes.titlesize": FONT + 1, "legend.fontsize": FONT - 1}):
        if len(rows) > zoom:
            fig, (full, close) = plt.subplots(1, 2, figsize=(12, 6))
            panels = ((full, rows, "every setting"), (close, best, f"the best {len(best)} (by the judge's rule)"))
        else:  # the best `zoom` are every setting: one panel
            fig, full = plt.subplots(figsize=(9, 6))
            close, panels = full, ((full, rows, f"every setting ({len(rows)})"),)
        styles = _styles(rows)
        for ax, shown, title in panels:
            _draw(ax, shown, judge, y_key, choice, styles)
            ax.set_title(title)
        handles, labels = full.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), frameon=False)
        fig.suptitle("selection sweep: each line one snapshot × EMA length × steps, points labelled by guidance")
        rows_of_legend = -(-len(labels) // 3)
        fig.tight_layout(rect=(0, 0.045 * rows_of_legend + 0.02, 1, 1))  # before the labels: final axes
        for ax, shown, _ in panels:
            if ax is close:
                _label(ax, shown, judge, y_key)
    return fig


def _series_key(setting: dict) -> tuple:
    return tuple((k, repr(v)) for k, v in sorted(setting.items()) if k != "guidance")


def _styles(rows: list[dict]) -> dict:
    """{series key: (colour, dash, marker, legend label)}: colour by snapshot, dash by EMA length, marker by steps;
    the label names only the fields that differ between series."""
    import matplotlib

    settings = [r["setting"] for r in rows]
    snapshots = list(dict.fromkeys(s["snapshot"] for s in settings))
    lengths = list(dict.fromkeys(s.get("ema_length", 0.0) for s in settings))
    steps = list(dict.fromkeys(s["steps"] for s in settings))
    others = [k for k in settings[0] if k not in ("snapshot", "guidance", "ema_length", "steps")
              and len({repr(s.get(k)) for s in settings}) > 1] if settings else []
    cmap = matplotlib.colormaps["viridis"]
    styles = {}
    for s in settings:
        key = _series_key(s)
        if key in styles:
            continue
        parts = [s["snapshot"]]
        if len(lengths) > 1:
            parts.append(f"EMA σ_rel {s.get('ema_length', 0.0):g}" if s.get("ema_length") else "half-life EMA")
        parts.append(f"{s['steps']} steps")
        parts += [f"{k} {s[k]}" for k in others]
        colour = cmap(0.85 * snapshots.index(s["snapshot"]) / max(len(snapshots) - 1, 1))
        styles[key] = (colour, DASHES[lengths.index(s.get("ema_length", 0.0)) % len(DASHES)],
                       MARKERS[steps.index(s["steps"]) % len(MARKERS)], ", ".join(parts))
    return styles


def _draw(ax, rows: list[dict], judge, y_key: str, choice, styles: dict) -> None:
    x_key, x_label = judge.plot_axes[0]
    groups = {}
    for r in rows:
        groups.setdefault(_series_key(r["setting"]), []).append(r)
    for key, group in groups.items():
        group = sorted(group, key=lambda r: r["setting"]["guidance"])
        colour, dash, marker, label = styles[key]
        ax.plot([lookup(r, x_key) for r in group], [lookup(r, y_key) for r in group], linestyle=dash, marker=marker,
                color=colour, label=label, alpha=0.85)
    if choice is not None and any(r is choice or r == choice for r in rows):
        ax.plot([lookup(choice, x_key)], [lookup(choice, y_key)], "*", color="crimson", markersize=18,
                label="chosen", zorder=5)
    ax.set(xlabel=x_label, ylabel=y_label(judge, y_key))
    ax.grid(alpha=0.3)


def _label(ax, rows: list[dict], judge, y_key: str) -> None:
    x_key = judge.plot_axes[0][0]
    several = len({tuple(r["setting"].get("guidance_interval") or ()) for r in rows}) > 1
    points = [(lookup(r, x_key), lookup(r, y_key), _point_label(r, several)) for r in rows]
    for (x, y, text), (dx, dy) in zip(points, spread_labels([(x, y) for x, y, _ in points], ax)):
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=FONT - 1,
                    arrowprops=dict(arrowstyle="-", lw=0.4, alpha=0.5) if dy > 14 else None)


def _point_label(row: dict, show_interval: bool) -> str:
    s = row["setting"]
    interval = s.get("guidance_interval") or ()
    where = (f" ({interval[0]:g},{interval[1]:g}]" if interval else " all") if show_interval else ""
    return f"{s['guidance']:g}{where}"


def spread_labels(points: list[tuple[float, float]], ax, height_pt: float = 13.0, width_pt: float = 30.0):
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
