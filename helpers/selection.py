"""What to submit: every EMA snapshot × guidance × sampling steps, scored on the test prompts, and the winner.

A `Setting` is everything that decides the test-set images besides the prompts: which snapshot of the
U-Net, guidance, steps, scheduler and guidance interval. `selection_sweep` samples a fixed, seeded subset
of the test prompts at every setting (same seeds everywhere, so only the setting differs) and scores it with
a judge (helpers.judges: the course's scorer for hw6, the probe for the demo). Each finished cell is
appended to `<run>/selection/cells.jsonl` at once, so an interrupted sweep resumes where it stopped, and a
cell is only reused while its snapshot's weights, prompts and judge are the same. `choose` applies the
judge's stated rule; the table and the choice go to metrics.json, and 04_sample / 05_eval write the test set
of exactly that choice (helpers.submission.write_test_set).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .progress import progress_bar

from .config import RunConfig
from .files import read_json
from .sample import sample_images

FINAL = "model"  # the setting's snapshot name for <run>/model/unet_ema, the EMA U-Net at max_steps


@dataclass(frozen=True)
class Setting:
    snapshot: str  # a folder name under <run>/snapshots/ ("step-000900"), or FINAL
    guidance: float
    steps: int
    scheduler: str
    guidance_interval: tuple = ()  # (sigma_lo, sigma_hi), () = guide every step

    def label(self) -> str:
        interval = f", guided in σ∈({self.guidance_interval[0]:g}, {self.guidance_interval[1]:g}]" \
            if self.guidance_interval else ""
        return f"{self.snapshot}, guidance {self.guidance:g}, {self.steps} {self.scheduler} steps{interval}"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "guidance_interval": list(self.guidance_interval)}

    def replace(self, **overrides) -> "Setting":
        """A copy with `overrides` applied; None values keep the current one (notebook parameters)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "guidance_interval" in overrides:
            overrides["guidance_interval"] = tuple(overrides["guidance_interval"])
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, d: dict) -> "Setting":
        return cls(str(d["snapshot"]), float(d["guidance"]), int(d["steps"]), str(d["scheduler"]),
                   tuple(float(x) for x in d.get("guidance_interval") or ()))


# ---------------------------------------------------------------- snapshots and their weights


def snapshot_names(cfg: RunConfig) -> list[str]:
    """The run's EMA snapshots, oldest first."""
    root = cfg.run_dir / "snapshots"
    return sorted(p.name for p in root.glob("step-*") if (p / "diffusion_pytorch_model.safetensors").exists())


def unet_folder(cfg: RunConfig, snapshot: str) -> Path:
    folder = cfg.run_dir / "model" / "unet_ema" if snapshot == FINAL else cfg.run_dir / "snapshots" / snapshot
    if not (folder / "diffusion_pytorch_model.safetensors").exists():
        raise FileNotFoundError(f"{folder}: no U-Net weights for snapshot {snapshot!r} of run {cfg.run_name!r} "
                                f"(snapshots: {', '.join(snapshot_names(cfg)) or 'none'}); train it first (03_train_cfg)")
    return folder


def weights_sha256(folder: Path) -> str:
    """16 hex digits of the U-Net's safetensors: what makes 'the same snapshot' after retraining checkable."""
    h = hashlib.sha256()
    with open(folder / "diffusion_pytorch_model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:16]


def weights_id(cfg: RunConfig, snapshot: str) -> str:
    """What identifies the weights a snapshot samples with: its hash, or the pretrained id for sd-baseline."""
    if cfg.profile == "sd-baseline":  # one pretrained pipeline, no snapshots of ours
        return f"pretrained:{cfg.sd_model}"
    return weights_sha256(unet_folder(cfg, snapshot))


def with_snapshot(model, cfg: RunConfig, snapshot: str):
    """`model` (a TextToImage) with the U-Net of `snapshot`; the frozen parts are shared, not reloaded."""
    from diffusers import UNet2DConditionModel

    if cfg.profile == "sd-baseline":
        return model
    unet = UNet2DConditionModel.from_pretrained(unet_folder(cfg, snapshot)).to(model.device)
    return dataclasses.replace(model, unet=unet.eval().requires_grad_(False))


def load_for_setting(cfg: RunConfig, setting: Setting):
    """(model that samples `setting`, its weights id). The sd-baseline profile's model is the pretrained pipeline."""
    if cfg.profile == "sd-baseline":
        from .baseline import load_sd_baseline

        return load_sd_baseline(cfg), weights_id(cfg, setting.snapshot)
    from .model import load_model

    return load_model(cfg, unet_dir=unet_folder(cfg, setting.snapshot)), weights_id(cfg, setting.snapshot)


# ---------------------------------------------------------------- which setting


def default_setting(cfg: RunConfig) -> Setting:
    """The config's sampling settings on the final EMA U-Net: what is used before any selection."""
    return Setting(FINAL, float(cfg.guidance), int(cfg.sample_steps), cfg.scheduler, tuple(cfg.guidance_interval))


def chosen_setting(cfg: RunConfig) -> tuple[Setting, str]:
    """(setting, where it comes from): 05_eval's choice in metrics.json if there is one, else the config's."""
    path = cfg.run_dir / "metrics.json"
    choice = read_json(path).get("selection", {}).get("choice") if path.exists() else None
    if choice:
        return Setting.from_dict(choice["setting"]), f"the selection sweep's choice in {path}"
    return default_setting(cfg), "the run config (no selection in metrics.json yet: run 05_eval to choose)"


def sweep_settings(snapshots, guidances, steps_list, scheduler: str, intervals=((),)) -> list[Setting]:
    return [Setting(s, float(g), int(n), scheduler, tuple(i))
            for s, g, n, i in itertools.product(snapshots, guidances, steps_list, intervals)]


def prompt_subset(n: int, count: int, seed: int) -> list[int]:
    """A fixed, seeded choice of `count` of n prompt indices (all if count is 0 or ≥ n), in order."""
    if not count or count >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), count))


# ---------------------------------------------------------------- the sweep


def selection_sweep(model, cfg: RunConfig, judge, settings: list[Setting], prompts: list[str], seeds: list[int], *,
                    batch_size: int, progress: bool = True) -> list[dict]:
    """One row {"setting", "weights", **judge.evaluate(images)} per setting, reusing finished cells on disk."""
    cells = cfg.run_dir / "selection" / "cells.jsonl"
    context = {"prompts": hashlib.sha256(json.dumps([prompts, seeds]).encode()).hexdigest()[:16],
               "judge": judge.key}
    done = {_cell_key(r["setting"], r["weights"], r["context"]): r for r in _read_cells(cells)}
    hashes = {s: weights_id(cfg, s) for s in sorted({s.snapshot for s in settings})}
    todo = [s for s in settings if _cell_key(s.to_dict(), hashes[s.snapshot], context) not in done]
    if len(todo) < len(settings):
        print(f"Reusing {len(settings) - len(todo)} of {len(settings)} sweep cells already in {cells}")
    current, snapshot_model = None, None
    bar = progress_bar(todo, desc="selection sweep", unit="cell", disable=not progress)
    for s in bar:
        bar.set_postfix_str(s.label())
        if s.snapshot != current:
            current, snapshot_model = s.snapshot, with_snapshot(model, cfg, s.snapshot)
        images = sample_images(snapshot_model, prompts, seeds, guidance=s.guidance, steps=s.steps,
                               scheduler=s.scheduler, batch_size=batch_size,
                               guidance_interval=s.guidance_interval or None)
        row = {"setting": s.to_dict(), "weights": hashes[s.snapshot], "context": context, **judge.evaluate(images)}
        _append_cell(cells, row)
        done[_cell_key(row["setting"], row["weights"], context)] = row
    return [done[_cell_key(s.to_dict(), hashes[s.snapshot], context)] for s in settings]


def choose(rows: list[dict], judge) -> dict:
    """The best row by the judge's rule (its `rank` key: smaller is better); ties go to the earlier setting."""
    if not rows:
        raise ValueError("empty selection sweep: nothing to choose from")
    return min(rows, key=judge.rank)


def _cell_key(setting: dict, weights: str, context: dict) -> str:
    return json.dumps([setting, weights, context], sort_keys=True)


def _read_cells(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{path}, line {n}: an unfinished cell (interrupted while writing); it is sampled again")
    return rows


def _append_cell(path: Path, row: dict) -> None:
    from .metrics import json_safe

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(json_safe(row), ensure_ascii=False) + "\n")
        f.flush()


# ---------------------------------------------------------------- looking at it


def sweep_table(rows: list[dict], columns: list[str], choice: dict | None = None) -> str:
    """A plain-text table: one line per setting, the judge's `columns` (dotted keys), the choice marked."""
    header = ["", "snapshot", "guidance", "steps"] + columns
    body = [["*" if r is choice else "", r["setting"]["snapshot"], f"{r['setting']['guidance']:g}",
             str(r["setting"]["steps"])] + [_fmt(lookup(r, c)) for c in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def sweep_plot(rows: list[dict], judge, choice: dict | None = None):
    """matplotlib Figure: fidelity (x) against prompt adherence (y), one line per snapshot and step count."""
    import matplotlib.pyplot as plt

    (x_key, x_label), (y_key, y_label) = judge.plot_axes
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {}
    for r in rows:
        groups.setdefault((r["setting"]["snapshot"], r["setting"]["steps"]), []).append(r)
    for (snapshot, steps), group in groups.items():
        group = sorted(group, key=lambda r: r["setting"]["guidance"])
        ax.plot([lookup(r, x_key) for r in group], [lookup(r, y_key) for r in group], "o-",
                label=f"{snapshot}, {steps} steps", alpha=0.8)
        for r in group:
            ax.annotate(f"{r['setting']['guidance']:g}", (lookup(r, x_key), lookup(r, y_key)), fontsize=7,
                        textcoords="offset points", xytext=(4, 3))
    if choice is not None:
        ax.plot([lookup(choice, x_key)], [lookup(choice, y_key)], "*", color="black", markersize=16,
                label="chosen")
    ax.set(xlabel=x_label, ylabel=y_label, title="selection sweep (labels: guidance)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def lookup(row: dict, key: str):
    """row["a"]["b"] for key "a.b"."""
    for part in key.split("."):
        row = row[part]
    return row


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def spread(names: list[str], count: int) -> list[str]:
    """At most `count` of `names`, evenly spread, the last always included (count 0 = all)."""
    if not count or len(names) <= count:
        return list(names)
    if count == 1:
        return names[-1:]
    step = (len(names) - 1) / (count - 1)
    return [names[round(i * step)] for i in range(count)]
