"""What to submit: candidate settings and the rule that picks the winner.

A `helpers.setting.Setting` is everything that decides the test-set images besides the prompts. This module builds
the candidate settings (`sweep_axes`, `sweep_settings`) and applies the judge's stated rule (`choose`); the weights
each setting samples with, how they are loaded and identified, are helpers.weights'. The selection itself is
`helpers.staged.staged_sweep` (successive halving over seeded test prompts, judged by helpers.judges: the course's
scorer for hw6, the probe for the demo; with no stages it is the full sweep, every cell on every prompt); it keeps
per-cell records in `<run>/selection/staged/` and appends the finalists' rows to `<run>/selection/cells.jsonl`
(`read_cells`, `append_cell`; a cell is only reused while its weights are the same: `cell_key`). 04_sample writes
the choice to metrics.json and the test set of exactly that choice (helpers.submission.write_test_set).
"""
from __future__ import annotations

import difflib
import itertools
import json
from pathlib import Path

from .config import RunConfig
from .files import json_safe, read_json
from .setting import FINAL, FIRST_SNAPSHOT, NO_GUIDE, Setting
from .weights import rebuildable_lengths, snapshot_step


# ---------------------------------------------------------------- which settings


def read_metrics_selection(cfg: RunConfig) -> dict:
    """metrics.json's "selection" (the sweep's table and choice), {} before any; ValueError naming a bad file."""
    path = cfg.layout.metrics
    metrics = read_json(path) if path.exists() else {}
    selection = metrics.get("selection", {}) if isinstance(metrics, dict) else None
    if not isinstance(selection, dict):
        raise ValueError(f"{path}: expected an object with a 'selection' object, not {type(selection).__name__}")
    return selection


def chosen_setting(cfg: RunConfig) -> tuple[Setting, str]:
    """(setting, where it comes from): the selection's choice in metrics.json if there is one, else the config's."""
    choice = read_metrics_selection(cfg).get("choice")
    if choice:
        where = f"{cfg.layout.metrics}: selection.choice.setting"
        setting = Setting.from_dict(choice.get("setting") if isinstance(choice, dict) else choice, where=where)
        return setting, f"the selection sweep's choice in {cfg.layout.shown(cfg.layout.metrics)}"
    return Setting.from_config(cfg), "the run config (no selection in metrics.json yet)"


def sweep_settings(base: Setting, **axes) -> list[Setting]:
    """Every combination of the `axes` (field name -> list of values) on top of `base`, snapshot-major, then by
    EMA length and guide (so each set of weights is loaded once), in the order given.

    Autoguidance cells that cannot differ are left out: no guide is only tried at guide_weight 1 and a guide only
    at weights != 1 (both spellings of 'off' sample the same images), and a guide only for snapshots trained
    longer than it (a guide is a worse version of the network; an equal one changes nothing)."""
    order = {"snapshot": 0, "ema_length": 1, "guide": 2}
    names = sorted(axes, key=lambda n: order.get(n, 3))
    settings = [base.replace(**dict(zip(names, values))) for values in itertools.product(*(axes[n] for n in names))]
    settings = [s if s.autoguided else s.replace(guide=NO_GUIDE, guide_weight=1.0) for s in settings]
    kept = [s for s in dict.fromkeys(settings) if not s.autoguided or _trained_longer(s.snapshot, s.guide)]
    for guide in dict.fromkeys(s.guide for s in settings if s.autoguided):
        if not any(s.guide == guide for s in kept):  # asked for, and not one cell: say so rather than vanish
            snapshots = ", ".join(dict.fromkeys(s.snapshot for s in settings if s.guide == guide))
            print(f"guide {guide!r} is left out of the sweep: no snapshot swept ({snapshots}) is trained longer "
                  "than it, and a guide must be an earlier, worse version of the model it guides")
    return kept


def _trained_longer(snapshot: str, guide: str) -> bool:
    """Whether `snapshot` comes later in training than `guide` (FINAL is the last; other names are not ordered)."""
    if guide == FINAL:
        return False
    if snapshot == FINAL:
        return True
    try:
        return snapshot_step(snapshot) > snapshot_step(guide)
    except ValueError:
        return snapshot != guide


def sweep_axes(cfg: RunConfig, *, snapshots=None, guidances=None, steps_list=None, intervals=None,
               ema_lengths=None, guides=None, guide_weights=None) -> dict:
    """The sweep's axes from notebook parameters (None: the run config's), every value checked: ValueError with
    one line naming each bad parameter (and a close match for snapshot names). An empty list is an error."""
    default_snapshots = spread(cfg.layout.snapshot_names(), cfg.sweep_snapshots) or cfg.layout.candidates()[-1:]
    given = {"snapshot": (snapshots, "snapshots", default_snapshots or [FINAL]),
             "guidance": (guidances, "guidances", cfg.guidance_sweep),
             "steps": (steps_list, "steps_list", cfg.sweep_steps),
             "guidance_interval": (intervals, "intervals", cfg.sweep_intervals),
             "ema_length": (ema_lengths, "ema_lengths", cfg.sweep_ema_lengths),
             "guide": (guides, "guides", cfg.sweep_guides),
             "guide_weight": (guide_weights, "guide_weights", cfg.sweep_guide_weights)}
    axes, problems = {}, []
    for field, (values, name, default) in given.items():
        try:
            axes[field] = axis_values(field, default if values is None else values, name, cfg)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("Bad sweep parameter(s): " + "; ".join(problems))
    kept, dropped = rebuildable_lengths(cfg, axes["snapshot"], axes["ema_length"])
    if not kept:
        raise ValueError(f"ema_lengths: none of {axes['ema_length']} can be rebuilt for every snapshot swept: "
                         + "; ".join(dropped.values()))
    for length, reason in dropped.items():
        print(f"Sweep: EMA length {length:g} left out, not every snapshot can rebuild it ({reason})")
    axes["ema_length"] = kept
    return axes


def axis_values(field: str, values, name: str, cfg: RunConfig | None = None) -> list:
    """`values` of one Setting field (a notebook parameter `name`) checked as the sampler needs them: ValueError
    naming the parameter and every bad value. Snapshot names are checked against the run's when `cfg` is given."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{name}={values!r} should be a non-empty list, e.g. {name}={_example(field)}")
    if field == "guidance_interval":
        values = [tuple(v) if isinstance(v, (list, tuple)) else v for v in values]
    if field == "guide" and cfg is not None and FIRST_SNAPSHOT in values:
        first = cfg.layout.snapshot_names()[:1]
        if not first:
            raise ValueError(f"{name}: {FIRST_SNAPSHOT!r} (the earliest snapshot) but run {cfg.run_name!r} has none")
        values = [first[0] if v == FIRST_SNAPSHOT else v for v in values]
    problems = [p for v in values for p in Setting().replace(**{field: v}).problems()]
    if field in ("snapshot", "guide") and cfg is not None and not cfg.pipeline and not problems:
        known = cfg.layout.candidates()
        for v in values:
            if v not in known and not (field == "guide" and v == NO_GUIDE):
                close = difflib.get_close_matches(str(v), known, 1, cutoff=0.5)
                problems.append(f"{v!r} is not a snapshot of run {cfg.run_name!r} ({', '.join(known) or 'none'})"
                                + (f"; did you mean {close[0]!r}?" if close else ""))
    if problems:
        raise ValueError(f"{name}: " + "; ".join(problems))
    return list(values)


def _example(field: str) -> str:
    return {"snapshot": "['step-000900']", "guidance": "[1, 2, 3]", "steps": "[10, 20]",
            "guidance_interval": "[[], [0.3, 5.0]]", "ema_length": "[0, 0.05, 0.1]", "guide": "['', 'step-000300']",
            "guide_weight": "[1.5, 2]"}[field]


# ---------------------------------------------------------------- the sweep's cells and choice


def choose(rows: list[dict], judge) -> dict:
    """The best row by the judge's rule (its `rank` key: smaller is better); ties go to the earlier setting."""
    if not rows:
        raise ValueError("empty selection sweep: nothing to choose from")
    return min(rows, key=judge.rank)


CELL_FIELDS = ("setting", "weights", "context")


def cell_key(row: dict) -> str:
    """What makes a cell the same cell (its CELL_FIELDS: setting, weights id and sweep context), as one string: a
    row of cells.jsonl is written once per key, and helpers.staged names a cell's records file by its hash."""
    return json.dumps([row[k] for k in CELL_FIELDS], sort_keys=True)


def read_cells(path: Path) -> list[dict]:
    """The rows in `path` (selection/cells.jsonl: the sweep's judged finalists). A line that is cut (an
    interrupted write) or damaged by hand is reported with its number and left out; it is never a traceback."""
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = None if isinstance(row, dict) else f"a {type(row).__name__}, not a cell object"
        except json.JSONDecodeError as e:
            row, problem = None, f"not JSON ({e.msg}; an interrupted write?)"
        if problem is None:
            missing = [k for k in CELL_FIELDS if k not in row]
            problem = f"no {', '.join(missing)}" if missing else _setting_problem(row["setting"])
        if problem:
            print(f"{path}, line {n}: {problem}; left out (a sweep that finishes that cell writes its row again)")
            continue
        rows.append(row)
    return rows


def _setting_problem(setting) -> str | None:
    try:
        Setting.from_dict(setting)
    except ValueError as e:
        return str(e)
    return None


def append_cell(path: Path, row: dict) -> None:
    """Add one finished cell; a cut last line (no newline at the end) is closed first, so the new cell stays whole."""

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab+") as f:
        f.seek(0, 2)
        if f.tell() > 0:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(json_safe(row), ensure_ascii=False) + "\n").encode("utf-8"))
        f.flush()


# ---------------------------------------------------------------- looking at it


def sweep_table(rows: list[dict], columns: list[str], choice: dict | None = None) -> str:
    """A plain-text table: one line per setting (snapshot, guidance, steps and every other setting field that
    varies), the judge's `columns` (dotted keys), the choice marked with *."""
    varying = [k for k in rows[0]["setting"] if k not in ("snapshot", "guidance", "steps")
               and len({json.dumps(r["setting"][k]) for r in rows}) > 1] if rows else []
    header = ["", "snapshot", "guidance", "steps"] + varying + columns
    body = [["*" if r is choice else "", r["setting"]["snapshot"], f"{r['setting']['guidance']:g}",
             str(r["setting"]["steps"])] + [_fmt(r["setting"][k]) for k in varying]
            + [_fmt(lookup(r, c)) for c in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def lookup(row: dict, key: str):
    """row["a"]["b"] for key "a.b"."""
    for part in key.split("."):
        row = row[part]
    return row


def _fmt(v) -> str:
    if isinstance(v, list):
        return "every step" if not v else f"({v[0]:g}, {v[1]:g}]"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def spread(names: list[str], count: int) -> list[str]:
    """At most `count` of `names`, evenly spread, the last always included (count 0 = all)."""
    if not count or len(names) <= count:
        return list(names)
    if count == 1:
        return names[-1:]
    step = (len(names) - 1) / (count - 1)
    return [names[round(i * step)] for i in range(count)]
