"""What to submit: candidate settings, the weights each samples with, and the rule that picks the winner.

A `helpers.setting.Setting` is everything that decides the test-set images besides the prompts. This module
loads the weights a setting samples with and identifies them (`setting_weights_id`: a cell is only reused while
they are the same), builds the candidate settings (`sweep_axes`, `sweep_settings`), and applies the judge's stated
rule (`choose`). The selection itself is `helpers.staged.staged_sweep` (successive halving over seeded test
prompts, judged by helpers.judges: the course's scorer for hw6, the probe for the demo; with no stages it is the
full sweep, every cell on every prompt); it keeps per-cell records in `<run>/selection/staged/` and appends the
finalists' rows to `<run>/selection/cells.jsonl` (`read_cells`, `append_cell`). 04_sample writes the choice to
metrics.json and the test set of exactly that choice (helpers.submission.write_test_set).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
from pathlib import Path

from .config import RunConfig
from .progress import say_once
from .files import json_safe, read_json, safetensors_problem
from .layout import WEIGHTS_FILE
from .setting import FINAL, FIRST_SNAPSHOT, NO_GUIDE, Setting


# ---------------------------------------------------------------- snapshots and their weights


def unet_folder(cfg: RunConfig, snapshot: str) -> Path:
    """The U-Net folder of `snapshot`; FileNotFoundError naming the run's snapshots (and a close match)."""
    folder = cfg.layout.unet_dir(snapshot)
    if not (folder / WEIGHTS_FILE).exists():
        known = cfg.layout.candidates()
        close = difflib.get_close_matches(snapshot, known, 1, cutoff=0.5)
        raise FileNotFoundError(f"snapshot {snapshot!r}: no U-Net weights in {folder} (run {cfg.run_name!r} has "
                                f"{', '.join(known) or 'none yet: train it first with 03_train_cfg'})"
                                + (f"; did you mean {close[0]!r}?" if close else ""))
    damaged = safetensors_problem(folder / WEIGHTS_FILE)
    if damaged:
        raise ValueError(f"snapshot {snapshot!r}: {folder / WEIGHTS_FILE}: {damaged} (an interrupted copy or write?)")
    return folder


def weights_sha256(folder: Path) -> str:
    """16 hex digits of the U-Net's safetensors: what makes 'the same snapshot' after retraining checkable."""
    return file_sha256(folder / WEIGHTS_FILE)[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def weights_id(cfg: RunConfig, snapshot: str) -> str:
    """What identifies the weights a snapshot samples with: its hash, or the pretrained pipeline's id."""
    if cfg.pipeline:  # the run samples a pretrained pipeline: no snapshots of its own
        return f"pretrained:{cfg.pipeline}"
    return weights_sha256(unet_folder(cfg, snapshot))


def snapshot_step(snapshot: str) -> int | None:
    """The training step of a snapshot name ("step-000900" -> 900); None for FINAL (the end of training)."""
    if snapshot == FINAL:
        return None
    name, _, step = snapshot.rpartition("-")
    if name != "step" or not step.isdigit():
        raise ValueError(f"snapshot {snapshot!r} is not a training step's name such as 'step-000900' or {FINAL!r}")
    return int(step)


def setting_unet(cfg: RunConfig, snapshot: str, ema_length: float = 0.0, device="cpu"):
    """The U-Net of `snapshot` with its stored half-life EMA (ema_length 0), or with the post-hoc EMA of length
    `ema_length` reconstructed at the snapshot's step from the profiles stored in <run>/phema (helpers.phema),
    refused when that fit is too far off (helpers.phema.MAX_PROFILE_ERROR)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_folder(cfg, snapshot))
    if ema_length:
        rebuild = ema_rebuild(cfg, snapshot, ema_length)
        missing, unexpected = unet.load_state_dict(rebuild.weights(), strict=False)
        params = {name for name, _ in unet.named_parameters()}
        if unexpected or params & set(missing):
            raise ValueError(f"{cfg.layout.phema}: the stored post-hoc EMA profiles do not fit the U-Net of "
                             f"{snapshot!r} (missing {sorted(params & set(missing))[:3]}, unexpected {unexpected[:3]})")
        say_once(f"{snapshot}: {rebuild.line()}")
    return unet.to(device).eval().requires_grad_(False)


def ema_rebuild(cfg: RunConfig, snapshot: str, ema_length: float, stored=None):
    """How `snapshot`'s EMA of length `ema_length` is rebuilt (helpers.phema.Rebuild), at the snapshot's own step;
    ValueError (one line) when it cannot be rebuilt faithfully. `stored`: the run's stored profiles, if read."""
    from .phema import plan_rebuild, stored_profiles

    stored = stored_profiles(cfg.layout.phema) if stored is None else stored
    try:
        return plan_rebuild(stored, ema_length, trained_step(cfg, snapshot))
    except ValueError as e:
        raise ValueError(f"snapshot {snapshot!r}: {e}") from None


def trained_step(cfg: RunConfig, snapshot: str) -> int:
    """The training step whose EMA `snapshot` holds. FINAL (model/unet_ema) holds the last step's, which is also
    written as that step's snapshot: the snapshot with the same weights file tells which step it is."""
    step = snapshot_step(snapshot)
    if step is not None:
        return step
    final = unet_folder(cfg, FINAL) / WEIGHTS_FILE
    for name in reversed(cfg.layout.snapshot_names()):
        same = cfg.layout.unet_dir(name) / WEIGHTS_FILE
        if same.stat().st_size == final.stat().st_size and _cached_sha256(same) == _cached_sha256(final):
            return snapshot_step(name)
    raise ValueError(f"{final.parent}: no snapshot of run {cfg.run_name!r} holds its weights, so the training step "
                     f"of {FINAL!r} is unknown; name the snapshot of the last step instead")


def rebuildable_lengths(cfg: RunConfig, snapshots: list[str], lengths: list[float]) -> tuple[list[float], dict]:
    """(the EMA lengths every one of `snapshots` can rebuild, {length dropped: why}). 0 (the half-life EMA stored
    with each snapshot) always stays; so does every length while a snapshot has no weights (loading it says so)."""
    from .phema import stored_profiles

    wanted = [v for v in lengths if v]
    if not wanted or cfg.pipeline or not all(s in cfg.layout.candidates() for s in snapshots):
        return list(lengths), {}
    stored, dropped = stored_profiles(cfg.layout.phema), {}
    for length in wanted:
        for snapshot in snapshots:
            try:
                ema_rebuild(cfg, snapshot, length, stored)
            except ValueError as e:
                dropped[length] = str(e)
                break
    return [v for v in lengths if v not in dropped], dropped


def with_setting(model, cfg: RunConfig, setting: Setting):
    """`model` with what `setting` samples: the U-Net of (snapshot, ema_length) and, when autoguided, the guide's
    U-Net (its stored half-life EMA); the frozen parts are shared, not reloaded."""
    if cfg.pipeline:
        return model
    guide = setting_unet(cfg, setting.guide, 0.0, model.device) if setting.autoguided else None
    return dataclasses.replace(model, unet=setting_unet(cfg, setting.snapshot, setting.ema_length, model.device),
                               ema_length=setting.ema_length, guide=setting.guide if guide is not None else "",
                               guide_weight=setting.guide_weight if guide is not None else 1.0, guide_unet=guide)


def setting_unet_folder(cfg: RunConfig, setting: Setting) -> Path:
    """A diffusers folder holding the U-Net `setting` samples with (e.g. for the hand-in's model/): the snapshot's
    own folder, or, with an EMA length, the rebuilt U-Net written (again, atomically) to
    <run>/phema/rebuilt/<snapshot>-sigma<ema_length>/. The guide, if any, is the snapshot folder of setting.guide."""
    import shutil

    if not setting.ema_length or cfg.pipeline:
        return unet_folder(cfg, setting.snapshot)
    out = cfg.layout.phema / "rebuilt" / f"{setting.snapshot}-sigma{setting.ema_length:.3f}"
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    setting_unet(cfg, setting.snapshot, setting.ema_length).save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def setting_weights_id(cfg: RunConfig, setting: Setting) -> str:
    """What identifies every weight `setting` samples with: the snapshot's hash, plus the hashes of the stored
    post-hoc EMA profiles it is rebuilt from (ema_length) and of the guide (when autoguided)."""
    ids = [weights_id(cfg, setting.snapshot)]
    if setting.ema_length and not cfg.pipeline:
        files = [p.path for p in ema_rebuild(cfg, setting.snapshot, setting.ema_length).used]
        ids.append(f"ema{setting.ema_length:g}:" + hashlib.sha256("".join(_cached_sha256(f) for f in files)
                                                                 .encode()).hexdigest()[:16])
    if setting.autoguided:
        ids.append("guide:" + weights_id(cfg, setting.guide))
    return "+".join(ids)


_SHA256: dict[tuple, str] = {}  # (path, size, mtime) -> hash: a sweep asks for the same profiles many times


def _cached_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = file_sha256(path)
    return _SHA256[key]


class TrainingNotFinishedError(RuntimeError):
    """The run has no model/ yet: its training stopped (session_hours) or never started."""


def require_trained(cfg: RunConfig) -> None:
    """TrainingNotFinishedError saying where training stands and what to run, unless the run finished training."""
    if cfg.pipeline or cfg.layout.trained():
        return
    step = cfg.layout.last_checkpoint_step()
    where = (f"its last checkpoint is step {step:,}" if step is not None else "it has no checkpoint yet")
    raise TrainingNotFinishedError(
        f"run {cfg.run_name!r} has not finished training ({where}; {cfg.layout.shown(cfg.layout.model)} is written "
        "at the end): run 03_train_cfg again (helpers.runs with the same command resumes it), then choose and write")


def load_for_setting(cfg: RunConfig, setting: Setting):
    """(model that samples `setting`, its weights id): the run's trained U-Net (with the setting's EMA length and
    guide), or its pretrained pipeline. TrainingNotFinishedError before training has finished."""
    require_trained(cfg)
    if cfg.pipeline:
        from .baseline import load_pipeline

        return load_pipeline(cfg, cfg.pipeline), weights_id(cfg, setting.snapshot)
    from .model import load_model

    model = load_model(cfg, unet_dir=unet_folder(cfg, setting.snapshot))
    if setting.ema_length or setting.autoguided:
        model = with_setting(model, cfg, setting)
    return model, setting_weights_id(cfg, setting)


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


def weights_key(s: Setting) -> tuple:
    """The U-Nets a setting samples with: snapshot, EMA length, and the guide while it is active (a cache of loaded
    models keeps one per key)."""
    return s.snapshot, s.ema_length, s.guide if s.autoguided else NO_GUIDE


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
