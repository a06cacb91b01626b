"""A selection-sweep plot that reads at a glance: realism against the attribute that still tells settings apart.

Mean prompt adherence saturates for a well-trained model (every good setting at 1.000), so the y axis is the
judge's score column that varies most among the best settings (the demo: usually the probe's eyes accuracy; the
course: CLIP-T). One poor snapshot (an early one, say) stretches the axes so that the good settings crowd one
corner: `sweep_plot` draws every setting (left) and the best `zoom` by the judge's rule on their own axes (right).
One line per snapshot × EMA length × steps (colour: snapshot, dash: EMA length, marker: steps), its points
labelled by guidance; labels are nudged apart so that none overlaps another.
"""
from __future__ import annotations

import json

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
            parts.append(f"EMA length {s.get('ema_length', 0.0):g}" if s.get("ema_length") else "half-life EMA")
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


# ---------------------------------------------------------------- the whole staged selection (helpers.sweep_view)

SCREENED = "screened"  # the label of the scatter that holds one point per screened cell
FINALISTS = "finalists (judged on every prompt)"


def _axes_of(judge, cells) -> tuple[tuple[str, str], tuple[str, str]]:
    """(x, y) as (key, label): the judge's own plot axes; for a judge without one of them here (the course without
    FID), the prompt count stands in on x."""
    (x_key, x_label), (y_key, y_label_) = judge.plot_axes
    if cells and any(c.value(x_key) is None for c in cells):
        return ("prompts", "prompts judged"), (y_key, y_label_)
    return (x_key, x_label), (y_key, y_label_)


def _xy(cell, x_key: str, y_key: str):
    x = cell.prompts if x_key == "prompts" else cell.value(x_key)
    return x, cell.value(y_key), cell.sd.get(x_key, 0.0), cell.sd.get(y_key, 0.0)


def selection_overview(cells: list, judge, rule: str, bootstrap: int | None = None):
    """matplotlib Figure: every screened cell (left) at the judge's own quantities (x: realism, y: the rule's prompt
    adherence), ±1 bootstrap sd as error bars, colour = prompts judged; finalists ringed, the choice starred.
    Right (when two or more, but not all, cells moved on past the first screen): those cells alone, on their own
    axes, labelled by the setting fields that differ among them."""
    import matplotlib
    import matplotlib.pyplot as plt
    import numpy as np

    (x_key, x_label), (y_key, y_label_) = _axes_of(judge, cells)
    counts = sorted({c.prompts for c in cells})
    norm = matplotlib.colors.LogNorm(vmin=min(counts), vmax=max(max(counts), min(counts) + 1)) if cells else None
    cmap = matplotlib.colors.ListedColormap(matplotlib.colormaps["viridis_r"](np.linspace(0.25, 1, 256)))  # no pale
    with plt.rc_context({"font.size": FONT, "axes.titlesize": FONT + 1, "legend.fontsize": FONT - 1}):
        moved = [c for c in cells if c.stage > 0]
        two = 2 <= len(moved) < len(cells)
        fig, axes = plt.subplots(1, 2 if two else 1, figsize=(13, 6.2) if two else (9, 6.2), squeeze=False)
        panels = [(axes[0][0], cells, f"every setting screened ({len(cells)})")]
        if two:
            panels.append((axes[0][1], moved, f"the {len(moved)} that moved on past the first screen"))
        for ax, shown, title in panels:
            pts = [_xy(c, x_key, y_key) for c in shown]
            colours = [cmap(norm(c.prompts)) for c in shown]
            for (x, y, sx, sy), colour in zip(pts, colours):
                ax.errorbar([x], [y], xerr=[sx], yerr=[sy], fmt="none", ecolor=colour, alpha=0.45, lw=1)
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[c.prompts for c in shown], cmap=cmap, norm=norm,
                       s=26, zorder=3, label=SCREENED if ax is panels[0][0] else "_finalists")
            ring = [p for p, c in zip(pts, shown) if c.finalist]
            if ring:
                ax.scatter([p[0] for p in ring], [p[1] for p in ring], s=110, facecolors="none", edgecolors="black",
                           linewidths=1.3, zorder=4, label=FINALISTS)
            star = [p for p, c in zip(pts, shown) if c.chosen]
            if star:
                ax.plot([star[0][0]], [star[0][1]], "*", color="crimson", markersize=18, zorder=5, label="chosen")
            ax.set(xlabel=x_label, ylabel=y_label_, title=title)
            ax.grid(alpha=0.3)
        if cells:
            bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=[a for a, _, _ in panels],
                               pad=0.02, fraction=0.04)
            bar.set_label("prompts judged")
            bar.ax.minorticks_off()
            bar.set_ticks(counts, labels=[str(c) for c in counts])
        handles, labels = axes[0][0].get_legend_handles_labels()
        axes[0][0].legend(handles, [f"{lab} ({len(cells)})" if lab == SCREENED else lab for lab in labels],
                          loc="best", framealpha=0.8)
        from .sweep_view import BOOTSTRAP

        fig.suptitle(f"{len(cells)} settings screened; bars: ±1 sd over {bootstrap or BOOTSTRAP} bootstrap resamples "
                     f"of each cell's judged prompts\nrule: {rule}", fontsize=FONT)
        if two:
            ax = panels[1][0]
            ax.margins(x=0.3, y=0.12)  # room for the finalists' labels, beside their points
            ax.figure.canvas.draw()
            named = [c for c in moved if c.finalist] or moved  # the rest are in the table below the plot
            points = [(_xy(c, x_key, y_key)[0], _xy(c, x_key, y_key)[1]) for c in named]
            labels = [_cell_label(c, named) for c in named]
            width = 0.62 * (FONT - 2) * max(len(t) for t in labels)  # points, about
            lo, hi = ax.get_xlim()
            for (x, y), text, (dx, dy) in zip(points, labels, spread_labels(points, ax, width_pt=width)):
                left = (x - lo) / (hi - lo) > 0.55  # a label right of a point there would leave the axes
                ax.annotate(text, (x, y), xytext=(-dx if left else dx, dy), textcoords="offset points",
                            ha="right" if left else "left", fontsize=FONT - 2, annotation_clip=True)
    return fig


def _cell_label(cell, among: list) -> str:
    """The setting fields that differ among `among`, guidance first, short."""
    from .sweep_view import varying_fields
    from .tables import column_name, fmt

    fields = varying_fields(among)
    fields = (["guidance"] if "guidance" in fields else []) + [f for f in fields if f != "guidance"]

    def word(f):
        v = fmt(cell.setting[f])
        return {"guidance": f"g {v}", "steps": f"{v} steps", "snapshot": v}.get(f, f"{column_name(f)} {v}")

    return ", ".join(word(f) for f in fields[:4])


def selection_axes(cells: list, judge, choice_setting: dict, kind: str | None = None):
    """matplotlib Figure: one panel per setting field that varies among `cells`, the others held at the choice:
    the rule's quantity (left axis, solid) and its tie-break (right axis, dashed grey) against that field's values,
    ±1 bootstrap sd, each point labelled with its prompt count (n=); the choice starred."""
    import matplotlib.pyplot as plt

    from .sweep_view import along, quantities, varying_fields
    from .tables import SHORT, fmt

    kind = kind or judge.kind
    fields = varying_fields(cells)
    sample = cells[0].scores if cells else None
    quantity = quantities(kind, sample)
    n = max(len(fields), 1)
    cols = min(n, 3)
    rows_ = -(-n // cols)
    with plt.rc_context({"font.size": FONT - 1, "axes.titlesize": FONT}):
        fig, axes = plt.subplots(rows_, cols, figsize=(4.6 * cols, 4.0 * rows_), squeeze=False)
        for ax in axes.flat[len(fields):]:
            ax.set_visible(False)
        for ax, f in zip(axes.flat, fields):
            line = along(cells, choice_setting, f)
            values = list(dict.fromkeys(json.dumps(c.setting[f]) for c in cells))
            numeric = all(isinstance(c.setting[f], (int, float)) and not isinstance(c.setting[f], bool) for c in cells)
            def pos(c, f=f, values=values, numeric=numeric):
                return c.setting[f] if numeric else values.index(json.dumps(c.setting[f]))
            line = sorted(line, key=pos)
            twin = ax.twinx() if len(quantity) > 1 else None
            for (key, label, _), target, style, colour in zip(quantity, (ax, twin), ("-o", "--s"),
                                                              ("tab:blue", "0.45")):
                xs = [pos(c) for c in line]
                ys = [c.value(key) for c in line]
                target.errorbar(xs, ys, yerr=[c.sd.get(key, 0.0) for c in line], fmt=style, color=colour, capsize=3,
                                ms=5, lw=1.3)
                target.set_ylabel(label, color=colour if target is twin else "black")
                if target is ax:
                    for c, x, y in zip(line, xs, ys):
                        ax.annotate(f"n={c.prompts}", (x, y), xytext=(3, 4), textcoords="offset points",
                                    fontsize=FONT - 3, color="dimgray")
                        if c.setting == choice_setting:
                            ax.plot([x], [y], "*", color="crimson", markersize=15, zorder=5)
            if not numeric:
                ax.set_xticks(range(len(values)), [fmt(json.loads(v)) for v in values], rotation=15, fontsize=FONT - 3)
            elif len(values) <= 8:
                ax.set_xticks(sorted({c.setting[f] for c in cells}))
            ax.set_xlabel(SHORT.get(f, f) if f in SHORT else f.replace("_", " "))
            ax.set_title(f"{f.replace('_', ' ')} ({len(line)} of {len(values)} values)")
            ax.set_label(f"axis:{f}")
            ax.margins(x=0.12)
            ax.grid(alpha=0.3)
        if not fields:
            axes[0][0].text(0.5, 0.5, "no setting field varies", ha="center", va="center")
            axes[0][0].set_axis_off()
        fig.suptitle("each setting field that varies, the others at the choice (★); bars ±1 bootstrap sd, n = prompts "
                     "judged\n" + " and ".join(f"{lab} ({'dashed, right axis' if i else 'solid, left axis'})"
                                               for i, (_, lab, _) in enumerate(quantity)), fontsize=FONT - 1)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.38 / (4.0 * rows_)))
    return fig
