"""Results as small rendered tables in a notebook: dicts of scores, the selection sweep, paths relative to the run.

A notebook prints what it measured; nested dicts with 16-digit floats and fixed-width text tables that wrap at a
laptop's window width read badly. These return a `Table`: HTML in JupyterLab (and in the executed copy), plain
text wherever there is no HTML. Numbers show 3 significant digits.
"""
from __future__ import annotations

import html
import json

from .selection import lookup, sweep_table

CHOSEN_BACKGROUND = "#fff1b8"
# short column names, so that the sweep table fits a laptop window
SHORT = {"frechet_distance": "FD", "mean_accuracy": "mean acc.", "clip_t": "CLIP-T", "fid": "FID",
         "guidance": "guidance", "steps": "steps", "ema_length": "EMA length", "guidance_interval": "guided σ",
         "guidance_rescale": "rescale", "guide": "guide", "guide_weight": "guide ×", "scheduler": "scheduler"}
_CELL = "padding:1px 8px;white-space:nowrap;text-align:right"
_TABLE = 'style="border-collapse:collapse;font-size:12px;font-variant-numeric:tabular-nums"'


class Table:
    """HTML for a notebook, plain text for everything else (print, logs, a terminal)."""

    def __init__(self, html_text: str, text: str):
        self.html, self.text = html_text, text

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


def fmt(value) -> str:
    """A value as a table shows it: floats to 3 significant digits, a guidance interval in words."""
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, float):
        if 1e3 <= abs(value) < 1e7:  # 3870, not 3.87e+03
            return f"{float(f'{value:.3g}'):.0f}"
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "every step"
        if len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
            return f"({value[0]:g}, {value[1]:g}]"
        return ", ".join(fmt(v) for v in value)
    return str(value)


def flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    """[(dotted key, value)] of a nested dict, in its order."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += flatten(v, key + ".") if isinstance(v, dict) else [(key, v)]
    return out


def scores_as_table(scores: dict, title: str = "") -> Table:
    """A dict of scores (nested dicts flattened to dotted names) as a two-column table, 3 significant digits."""
    items = flatten(scores)
    width = max((len(k) for k, _ in items), default=0)
    text = "\n".join(([title] if title else []) + [f"  {k.ljust(width)}  {fmt(v)}" for k, v in items])
    body = "".join(f'<tr><td style="{_CELL};text-align:left">{html.escape(k)}</td>'
                   f'<td style="{_CELL}">{html.escape(fmt(v))}</td></tr>' for k, v in items)
    caption = f'<caption style="text-align:left;font-weight:bold">{html.escape(title)}</caption>' if title else ""
    return Table(f'<table class="monster-scores" {_TABLE}>{caption}{body}</table>', text)


def varying(rows: list[dict], keys: list[str]) -> list[str]:
    """The keys (dotted) whose value differs between rows."""
    return [k for k in keys if len({json.dumps(_get(r, k), sort_keys=True) for r in rows}) > 1]


def _get(row: dict, key: str):
    try:
        return lookup(row, key)
    except (KeyError, TypeError):
        return None


def column_name(key: str) -> str:
    last = key.split(".")[-1]
    return SHORT.get(key.removeprefix("setting."), SHORT.get(last, last))


def sweep_table_html(rows: list[dict], columns: list[str], choice: dict | None = None) -> Table:
    """The selection sweep as a rendered table: grouped by snapshot (one header line each, in the rows' order),
    only the setting fields and scores that vary, the chosen row highlighted and starred. Works from the sweep's
    row dicts ({"setting": {...}, <score>: ..., ...}; helpers.selection)."""
    if not rows:
        return Table("<p>(no sweep rows)</p>", "(no sweep rows)")
    fields = [f"setting.{k}" for k in rows[0]["setting"] if k != "snapshot"]
    shown = varying(rows, fields) or [f"setting.guidance"]
    scores = varying(rows, columns) or list(columns)
    keys = shown + scores
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["setting"]["snapshot"], []).append(r)
    th = f'style="{_CELL};border-bottom:1px solid #999"'
    head = "<tr><th></th>" + "".join(f"<th {th}>{html.escape(column_name(k))}</th>" for k in keys) + "</tr>"
    body = []
    for snapshot, group in groups.items():
        body.append(f'<tr class="monster-group"><th colspan="{len(keys) + 1}" style="{_CELL};text-align:left;'
                    f'background:#eee">{html.escape(snapshot)}</th></tr>')
        for r in group:
            chosen = choice is not None and (r is choice or r == choice)
            style = f' style="background:{CHOSEN_BACKGROUND};font-weight:bold"' if chosen else ""
            body.append(f'<tr{style}{" class=monster-chosen" if chosen else ""}><td style="{_CELL}">'
                        f'{"★" if chosen else ""}</td>'
                        + "".join(f'<td style="{_CELL}">{html.escape(fmt(_get(r, k)))}</td>' for k in keys) + "</tr>")
    note = ('<div style="font-size:12px;color:gray">★ the chosen setting; columns that are the same in every row '
            'are left out</div>')
    table = f'<table class="monster-sweep" {_TABLE}><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'
    return Table(table + note, sweep_table(rows, columns, choice))


# 05's measures by the names a report uses
MEASURES = {"accuracy.color": "colour accuracy", "accuracy.shape": "shape accuracy", "accuracy.eyes": "eyes accuracy",
            "accuracy.extra": "extra accuracy", "accuracy.action": "action accuracy",
            "mean_accuracy": "mean accuracy (colour, shape, action)", "frechet_distance": "probe Fréchet distance",
            "fid": "FID", "clip_t": "CLIP-T", "clip_i": "CLIP-I", "kid": "KID"}


def chosen_table(chosen: dict, title: str = "") -> Table:
    """05's scores of the handed-in set as one table: a row per measure; its value on every test prompt, then on the
    sweep's prompts, next to what the sweep measured for the same setting on those prompts."""
    scores = [(k, v) for k, v in flatten({k: v for k, v in chosen.items() if k not in (
        "setting", "prompts", "skipped", "read_back", "weights_sha256", "on_sweep_prompts")})]
    again = chosen.get("on_sweep_prompts") or {}
    handed, sweep = dict(flatten(again.get("handed_in", {}))), dict(flatten(again.get("sweep", {})))
    columns = ["handed in, every prompt"] + (["handed in, sweep's prompts", "sweep, same prompts"] if again else [])
    rows = [[MEASURES.get(k, k), fmt(v)] + ([fmt(handed.get(k)), fmt(sweep.get(k))] if again else [])
            for k, v in scores]
    width = [max(len(r[i]) for r in rows + [["measure"] + columns]) for i in range(len(columns) + 1)]
    text = "\n".join(([title] if title else []) + ["  ".join(c.ljust(w) for c, w in zip(r, width))
                                                   for r in [["measure"] + columns] + rows])
    th = f'style="{_CELL};border-bottom:1px solid #999"'
    head = "<tr>" + "".join(f"<th {th}>{html.escape(c)}</th>" for c in ["measure"] + columns) + "</tr>"
    body = "".join("<tr>" + f'<td style="{_CELL};text-align:left">{html.escape(r[0])}</td>'
                   + "".join(f'<td style="{_CELL}">{html.escape(c)}</td>' for c in r[1:]) + "</tr>" for r in rows)
    caption = f'<caption style="text-align:left;font-weight:bold">{html.escape(title)}</caption>' if title else ""
    return Table(f'<table class="monster-scores" {_TABLE}>{caption}<thead>{head}</thead>{body}</table>', text)


def _plus_minus(cell, key: str) -> str:
    value = cell.value(key)
    if value is None:
        return "–"
    sd = cell.sd.get(key)
    return fmt(value) + (f" ± {fmt(sd)}" if sd is not None else "")


def screened_table_html(cells: list, kind: str, open_: bool = False) -> Table:
    """Every cell the staged selection screened (helpers.sweep_view), one row each, in an expandable <details>:
    the setting fields that vary, the prompts it was judged on, the last stage it reached and the rule's
    quantities ± 1 bootstrap sd; finalists marked ●, the choice ★ (highlighted). Rows: furthest stage first,
    then by the rule's first quantity."""
    from .sweep_view import quantities, varying_fields

    if not cells:
        return Table("<p>(no staged sweep records)</p>", "(no staged sweep records)")
    fields = varying_fields(cells) or ["guidance"]
    quantity = quantities(kind, cells[0].scores)
    first_key, _, higher = quantity[0]
    order = sorted(cells, key=lambda c: (-c.stage, -(c.value(first_key) or 0) if higher else (c.value(first_key)
                                                                                              or 0)))
    header = [""] + [column_name(f) for f in fields] + ["prompts", "stage"] + [column_name(k) for k, _, _ in quantity]
    rows = [["★" if c.chosen else "●" if c.finalist else "", *[fmt(c.setting.get(f)) for f in fields],
             str(c.prompts), str(c.stage + 1), *[_plus_minus(c, k) for k, _, _ in quantity]] for c in order]
    th = f'style="{_CELL};border-bottom:1px solid #999"'
    head = "<tr>" + "".join(f"<th {th}>{html.escape(h)}</th>" for h in header) + "</tr>"
    body = []
    for c, r in zip(order, rows):
        style = f' style="background:{CHOSEN_BACKGROUND};font-weight:bold"' if c.chosen else ""
        body.append(f'<tr class="monster-screened"{style}>'
                    + "".join(f'<td style="{_CELL}">{html.escape(x)}</td>' for x in r) + "</tr>")
    summary = (f"every setting screened ({len(cells)}): prompts judged, stage reached, the rule's quantities "
               "± 1 bootstrap sd (● finalist, ★ the choice)")
    table = (f'<details class="monster-screened"{" open" if open_ else ""}><summary>{html.escape(summary)}</summary>'
             f'<table class="monster-screened" {_TABLE}><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'
             "</details>")
    width = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    text = "\n".join([summary] + ["  ".join(x.rjust(w) for x, w in zip(r, width)) for r in [header] + rows])
    return Table(table, text)
