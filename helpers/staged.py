"""Staged selection: successive halving over prompts, so that choosing a setting costs a fraction of training.

The judged prompts (04's `sweep_prompts`; 0 = every test prompt) are put in one fixed seeded order. Stage 1 samples
every cell on the first `sweep_stage_prompts[0]` of them; the best `sweep_keep` share (by the screening estimator of
helpers.estimators, unbiased at any N, so it does not favour low-diversity settings) moves on to the next size, and
the finalists are judged on every prompt by the judge's own leaderboard rule (`helpers.selection.choose`).

A prompt keeps its seed (cfg.seed + its index in test.json), so a stage's images are exactly those the next stage
and the test set would make: each cell's per-prompt judge records are kept in `<run>/selection/staged/<cell>.npz`
and a later stage samples only the prompts a cell lacks. An interrupted sweep resumes from those files; the
finalists' rows are appended to `selection/cells.jsonl` (once each), and `selection/stages.json`
records the plan and who moved on at each stage.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import RunConfig
from .estimators import screen_score, scores_from
from .setting import Setting

# ---------------------------------------------------------------- the plan (pure)


def stage_sizes(stage_prompts: list[int], n_prompts: int) -> list[int]:
    """Prompts per stage: the screening sizes below `n_prompts`, then all `n_prompts` (the final stage)."""
    return [n for n in sorted(set(stage_prompts)) if n < n_prompts] + [n_prompts]


def cells_per_stage(n_cells: int, n_stages: int, keep: float) -> list[int]:
    """How many cells each stage judges: all of them first, then ceil(keep x the previous), at least 1."""
    counts = [n_cells]
    for _ in range(n_stages - 1):
        counts.append(max(1, math.ceil(keep * counts[-1] - 1e-9)))
    return counts


def prompt_order(n: int, seed: int) -> list[int]:
    """A fixed seeded order of the judged prompts' positions; stage k uses its first sizes[k]."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def best(scores: list[float], count: int) -> list[int]:
    """Positions of the `count` smallest scores (ties: the earlier), in their original order."""
    ranked = sorted(range(len(scores)), key=lambda i: (scores[i], i))[:count]
    return sorted(ranked)


def halving(n_cells: int, sizes: list[int], keep: float, screen) -> list[list[int]]:
    """Which cells each stage judges, given `screen(cell, n_prompts) -> score` (smaller is better) on the first
    n_prompts of the order: all cells first, then the best ceil(keep x previous) of the previous stage's."""
    counts = cells_per_stage(n_cells, len(sizes), keep)
    stages = [list(range(n_cells))]
    for k in range(1, len(sizes)):
        alive = stages[-1]
        scores = [screen(c, sizes[k - 1]) for c in alive]
        stages.append([alive[i] for i in best(scores, counts[k])])
    return stages


# ---------------------------------------------------------------- what it costs


def unet_evals(setting: Setting, guided: int, total: int) -> int:
    """U-Net evaluations per image: one per step, two on guided (CFG) steps, plus the guide's one per step."""
    return total + guided + (total if setting.autoguided else 0)


def evals_of(setting: Setting, scheduler_config: dict) -> int:
    from .sample import guided_steps

    return unet_evals(setting, *guided_steps(scheduler_config, setting))


def train_scheduler_config(cfg: RunConfig) -> dict:
    """The training noise schedule's config, from the run config alone (what helpers.model saves)."""
    from .model import noise_scheduler

    return dict(noise_scheduler(cfg).config)


@dataclass
class StagePlan:
    """The staged plan of one sweep and its cost; `images[k]` / `evals[k]`: new images / U-Net evaluations of
    stage k (prompts a cell already had in an earlier stage are not sampled again)."""

    settings: list[Setting]
    sizes: list[int]
    counts: list[int]
    evals_per_image: list[int]  # per setting
    dropped: list[Setting] = field(default_factory=list)

    @property
    def images(self) -> list[int]:
        return [c * (n - (self.sizes[k - 1] if k else 0)) for k, (c, n) in enumerate(zip(self.counts, self.sizes))]

    def evals(self) -> list[float]:
        """Per stage: exact for the first (every cell); later ones at the sweep's average per image (which cells
        move on is not known before)."""
        mean = sum(self.evals_per_image) / max(len(self.evals_per_image), 1)
        return [sum(self.evals_per_image) * self.sizes[0] if k == 0 and self.counts[0] == len(self.evals_per_image)
                else mean * i for k, i in enumerate(self.images)]

    @property
    def full_images(self) -> int:
        return len(self.settings) * self.sizes[-1]

    def full_evals(self) -> float:
        return sum(self.evals_per_image) * self.sizes[-1]

    def table(self, seconds_per_eval: float | None = None) -> str:
        """The plan as text: cells and images per stage, estimated time, and the full sweep it replaces."""
        lines = [f"{'stage':>5}  {'cells':>5}  {'prompts':>7}  {'new images':>10}  {'U-Net evals':>11}"
                 + ("  est. time" if seconds_per_eval else "")]
        for k, (c, n, i, e) in enumerate(zip(self.counts, self.sizes, self.images, self.evals())):
            lines.append(f"{k + 1:>5}  {c:>5}  {n:>7}  {i:>10,}  {e:>11.3g}"
                         + (f"  {_duration(e * seconds_per_eval)}" if seconds_per_eval else ""))
        total, full = sum(self.evals()), self.full_evals()
        lines.append(f"staged: {sum(self.images):,} images, {total:.3g} U-Net evaluations"
                     + (f", about {_duration(total * seconds_per_eval)}" if seconds_per_eval else "")
                     + f"; the full sweep it replaces: {len(self.settings)} cells x {self.sizes[-1]} prompts = "
                     f"{self.full_images:,} images, {full:.3g} evaluations"
                     + (f", about {_duration(full * seconds_per_eval)}" if seconds_per_eval else "")
                     + f" ({total / full:.0%} of it)")
        return "\n".join(lines)


def make_plan(settings: list[Setting], n_prompts: int, cfg: RunConfig, scheduler_config: dict) -> StagePlan:
    sizes = stage_sizes(cfg.sweep_stage_prompts, n_prompts)
    return StagePlan(list(settings), sizes, cells_per_stage(len(settings), len(sizes), cfg.sweep_keep),
                [evals_of(s, scheduler_config) for s in settings])


def trim_to_budget(plan: StagePlan, seconds_per_eval: float, budget_hours: float, snapshot_order: list[str],
                   keep: float) -> StagePlan:
    """The plan with cells dropped until its estimate fits `budget_hours` (0 = no budget): the oldest snapshot's
    cells first, the costliest (most U-Net evaluations) of those first; one cell always stays."""
    if not budget_hours:
        return plan
    rank = {name: i for i, name in enumerate(snapshot_order)}
    settings, evals, dropped = list(plan.settings), list(plan.evals_per_image), list(plan.dropped)
    while len(settings) > 1:
        current = StagePlan(settings, plan.sizes, cells_per_stage(len(settings), len(plan.sizes), keep), evals, dropped)
        if sum(current.evals()) * seconds_per_eval <= budget_hours * 3600:
            return current
        drop = min(range(len(settings)), key=lambda i: (rank.get(settings[i].snapshot, -1), -evals[i], -i))
        dropped.append(settings.pop(drop))
        evals.pop(drop)
    return StagePlan(settings, plan.sizes, cells_per_stage(1, len(plan.sizes), keep), evals, dropped)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min" if seconds >= 90 \
        else f"{seconds:.0f} s"


# ---------------------------------------------------------------- per-cell records on disk


class CellRecords:
    """One cell's per-prompt judge records for the judged prompts it has sampled so far (`<folder>/<id>.npz`).
    Arrays hold one row per judged prompt; `sampled` marks the rows that are real (the rest are zeros and
    compress to nothing). float64 features that are float32 values (what the networks computed) are stored as
    float32."""

    def __init__(self, folder: Path, cell_id: str, n_prompts: int, meta: dict | None = None):
        self.path, self.n, self.meta = folder / f"{cell_id}.npz", n_prompts, meta or {}
        self.arrays: dict[str, np.ndarray] = {}
        self.sampled = np.zeros(n_prompts, bool)
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        import zipfile
        import zlib

        try:
            with np.load(self.path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # a cut or damaged file
            print(f"{self.path}: unreadable ({type(e).__name__}: {e}); this cell's prompts are sampled again")
            return
        sampled = arrays.pop("sampled", None)
        self.meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else self.meta
        if sampled is None or len(sampled) != self.n or any(len(v) != self.n for v in arrays.values()):
            print(f"{self.path}: not {self.n} judged prompts; this cell's prompts are sampled again")
            return
        self.sampled = sampled.astype(bool)
        self.arrays = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in arrays.items()}

    def missing(self, positions) -> list[int]:
        return [int(p) for p in positions if not self.sampled[p]]

    def add(self, positions: list[int], records: dict) -> None:
        for k, v in records.items():
            v = np.asarray(v)
            if k not in self.arrays:
                self.arrays[k] = np.zeros((self.n, *v.shape[1:]), v.dtype)
            self.arrays[k][positions] = v
        self.sampled[positions] = True

    def save(self) -> None:
        from .files import atomic_write

        stored = {k: _compact(v) for k, v in self.arrays.items()}
        # np.savez appends ".npz" to a name without it: write through an open file instead
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: _savez(tmp, sampled=self.sampled, meta=np.array(json.dumps(self.meta)),
                                                   **stored))


def _compact(v: np.ndarray) -> np.ndarray:
    """float32 where that loses nothing (network features are float32 made float64), else as it is."""
    if v.dtype == np.float64:
        small = v.astype(np.float32)
        if np.array_equal(small, v):
            return small
    return v


def _savez(path: Path, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def context_id(context: dict) -> str:
    return hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16]


def save_reference(folder: Path, context: dict, kind: str, reference: dict) -> None:
    from .files import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    meta = np.array(json.dumps({"kind": kind, "context": context}))
    atomic_write(folder / f"reference-{context_id(context)}.npz", lambda tmp: _savez(tmp, meta=meta, **reference))


def cell_id(setting: Setting, weights: str, context: dict) -> str:
    """The name of a cell's records file: the hash of its key (helpers.selection.cell_key)."""
    from .selection import cell_key

    key = cell_key({"setting": setting.to_dict(), "weights": weights, "context": context})
    return hashlib.sha256(key.encode()).hexdigest()[:20]


# ---------------------------------------------------------------- the sweep


def staged_sweep(model, cfg: RunConfig, judge, settings: list[Setting], prompts: list[str], seeds: list[int], *,
                 batch_size: int, stage_prompts: list[int] | None = None, keep: float | None = None,
                 budget_hours: float | None = None, progress: bool = True, folder=None,
                 loaded=None) -> tuple[list[dict], dict]:
    """(rows of the finalists judged on every prompt, the stage record written to selection/stages.json).

    `judge` needs `per_prompt(images, positions)`, `reference`, `kind` and `key` (helpers.judges). Every process of
    an `accelerate launch` calls this: each samples its share of every cell's missing prompts (helpers.shards) and
    the main process writes the records. `folder`: where the per-cell records go (default selection/staged).
    `loaded`: the cache of loaded U-Nets to use (helpers.weights.LoadedWeights on `model`; default a new one)."""
    from .files import atomic_write_json
    from .selection import append_cell, cell_key, read_cells
    from .shards import Shards
    from .weights import LoadedWeights, setting_weights_id

    shards = Shards.current()
    stage_prompts = cfg.sweep_stage_prompts if stage_prompts is None else stage_prompts
    keep = cfg.sweep_keep if keep is None else keep
    budget_hours = cfg.select_budget_hours if budget_hours is None else budget_hours
    n = len(prompts)
    context = {"prompts": hashlib.sha256(json.dumps([prompts, seeds]).encode()).hexdigest()[:16], "judge": judge.key}
    folder = Path(folder) if folder else cfg.layout.selection / "staged"
    weights = {s: setting_weights_id(cfg, s) for s in settings}
    records = {s: CellRecords(folder, cell_id(s, weights[s], context), n,
                              {"setting": s.to_dict(), "weights": weights[s], "context": context}) for s in settings}
    if shards.is_main:  # what replay needs to judge the records again (helpers.replay)
        save_reference(folder, context, judge.kind, judge.reference)
    order = prompt_order(n, cfg.seed)
    plan = make_plan(settings, n, cfg.replace(sweep_stage_prompts=stage_prompts, sweep_keep=keep),
                     model.scheduler_config)
    loaded = loaded if loaded is not None else LoadedWeights(model, cfg)

    # the cost, measured on the first-stage images of the first cell that lacks them (which the sweep needs anyway),
    # or read back from the interrupted sweep's stages.json
    per_eval = _measure(loaded, plan, records, order, prompts, seeds, judge, batch_size, shards, model.device)
    if per_eval is None:
        per_eval = _earlier_measurement(cfg.layout.selection / "stages.json", context)
    per_eval = shards.broadcast(per_eval)  # every process must drop the same cells
    if per_eval:
        plan = trim_to_budget(plan, per_eval, budget_hours, cfg.layout.snapshot_names(), keep)
        if plan.dropped and shards.is_main:
            print(f"the sweep's budget, {budget_hours:.3g} h: dropped {len(plan.dropped)} cell(s) to fit: "
                  + "; ".join(s.label() for s in plan.dropped[:8]) + (" ..." if len(plan.dropped) > 8 else ""))
    if shards.is_main:
        print(plan.table(per_eval))

    kind, reference = judge.kind, judge.reference
    alive = list(plan.settings)
    summary = {"plan": {"sizes": plan.sizes, "counts": plan.counts, "keep": keep, "images": plan.images,
                        "screen": judge.kind, "dropped": [s.to_dict() for s in plan.dropped],
                        "seconds_per_eval": per_eval},
               "context": context, "stages": []}
    from .progress import progress_bar

    for k, size in enumerate(plan.sizes):
        if k:
            scores = {s: screen_score(kind, reference, records[s].arrays, order[:plan.sizes[k - 1]]) for s in alive}
            chosen = best([scores[s] for s in alive], plan.counts[k])
            summary["stages"][-1]["screen"] = [[s.to_dict(), scores[s]] for s in alive]
            alive = [alive[i] for i in chosen]
        bar = progress_bar(alive, desc=f"stage {k + 1}/{len(plan.sizes)} ({size} prompts)", unit="cell",
                           disable=not progress or not shards.is_main)
        for s in bar:
            _fill(loaded, s, records[s], order[:size], prompts, seeds, judge, batch_size, shards)
        summary["stages"].append({"prompts": size, "cells": [s.to_dict() for s in alive]})
        if shards.is_main:
            atomic_write_json(cfg.layout.selection / "stages.json", summary)

    done = {cell_key(r) for r in read_cells(cfg.layout.cells)}
    rows = []
    for s in alive:
        row = {"setting": s.to_dict(), "weights": weights[s], "context": context,
               **scores_from(kind, reference, records[s].arrays)}
        if shards.is_main and cell_key(row) not in done:
            append_cell(cfg.layout.cells, row)
        rows.append(row)
    shards.barrier()
    return rows, summary


def _measure(loaded, plan: StagePlan, records: dict, order, prompts, seeds, judge, batch_size, shards, device):
    """Seconds per U-Net evaluation per image, timed on the first cell that still lacks its stage-1 images."""
    for s, evals in zip(plan.settings, plan.evals_per_image):
        if records[s].missing(order[:plan.sizes[0]]):
            t0 = time.perf_counter()
            fresh = _fill(loaded, s, records[s], order[:plan.sizes[0]], prompts, seeds, judge, batch_size, shards)
            seconds = time.perf_counter() - t0
            if shards.is_main:
                print(f"measured: {seconds / fresh:.3g} s per image at {evals} U-Net evaluations per image "
                      f"({s.label()}) on {device} x {shards.world} process(es): {seconds / fresh / evals:.3g} s "
                      "per evaluation (weights loading and judging included)")
            return seconds / fresh / evals
    return None


def _earlier_measurement(path: Path, context: dict) -> float | None:
    from .files import read_json

    try:
        earlier = read_json(path)
        if earlier.get("context") == context and earlier["plan"].get("seconds_per_eval"):
            print(f"stage 1 was sampled earlier; its measurement: {earlier['plan']['seconds_per_eval']:.3g} s per "
                  f"evaluation ({path})")
            return float(earlier["plan"]["seconds_per_eval"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _fill(loaded, s: Setting, records: CellRecords, positions, prompts, seeds, judge, batch_size,
          shards) -> int:
    """Sample and judge the prompts at `positions` the cell lacks; returns how many were new."""
    todo = records.missing(positions)
    if not todo:
        return 0
    images = shards.sample(loaded.for_setting(s), [prompts[p] for p in todo], [seeds[p] for p in todo], s,
                           batch_size=batch_size)
    if shards.is_main:
        records.add(todo, judge.per_prompt(images, todo))
        records.save()
    shards.barrier()
    if not shards.is_main:
        records.__init__(records.path.parent, records.path.stem, records.n)  # what the main process wrote
    return len(todo)
