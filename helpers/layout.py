"""Where everything of a run lives: the one place that names the files and folders under `outputs/runs/<run>/`.

    config.json  split.json  cache.json  data_report.json  run.lock      01_data, 03_train_cfg
    checkpoints/step-N/  checkpoints.old[-N]/                            resumable training state
    snapshots/step-N/    model/{unet,unet_ema,scheduler}/                EMA U-Nets to choose from; the final model
    phema/step-N/                                                        post-hoc EMA profiles (helpers.phema)
    previews/  logs/train.csv  logs/tensorboard/  budget.json            what training looked like; its time plan
    selection/cells.jsonl  selection/test_set.json  results.lock        04_sample's sweep; its record of results/
    results/ (+ manifest.json)  results.partial/  results.history/<n>/  the test set; a new one being written; earlier
    metrics.json  score.json  hw6_<student_id>.zip  notebooks/  *.png   choice and scores; the hand-in; plots
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .setting import FINAL

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # what diffusers' save_pretrained writes for a U-Net


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.json")
    split = property(lambda self: self.root / "split.json")
    cache_pointer = property(lambda self: self.root / "cache.json")
    data_report = property(lambda self: self.root / "data_report.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    snapshots = property(lambda self: self.root / "snapshots")
    phema = property(lambda self: self.root / "phema")
    model = property(lambda self: self.root / "model")
    previews = property(lambda self: self.root / "previews")
    logs = property(lambda self: self.root / "logs")
    notebooks = property(lambda self: self.root / "notebooks")
    selection = property(lambda self: self.root / "selection")
    cells = property(lambda self: self.root / "selection" / "cells.jsonl")
    test_set_record = property(lambda self: self.root / "selection" / "test_set.json")  # the manifest 04 wrote
    metrics = property(lambda self: self.root / "metrics.json")
    results = property(lambda self: self.root / "results")
    results_partial = property(lambda self: self.root / "results.partial")  # a new test set being written
    results_history = property(lambda self: self.root / "results.history")  # earlier test sets, numbered
    score = property(lambda self: self.root / "score.json")
    budget = property(lambda self: self.root / "budget.json")  # the time plan, its correction, sessions (helpers.budget)

    def shown(self, path) -> str:
        """A path as printed to the student: relative to the outputs folder ("runs/demo/results") when it is in
        the run, which reads the same on every machine; any other path as it is."""
        path = Path(path)
        try:
            inside = path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)
        return f"runs/{self.root.name}" + ("" if inside == "." else f"/{inside}")

    def hand_in(self, student_id: str) -> Path:
        """The course's zip, hw6_<student_id>.zip."""
        return self.root / f"hw6_{student_id}.zip"

    def plot(self, name: str) -> Path:
        """A figure a notebook saves, e.g. plot("eval_grid") -> <run>/eval_grid.png."""
        return self.root / f"{name}.png"

    def unet_dir(self, snapshot: str) -> Path:
        """The diffusers folder of a snapshot's EMA U-Net (FINAL: model/unet_ema)."""
        return self.model / "unet_ema" if snapshot == FINAL else self.snapshots / snapshot

    def snapshot_names(self) -> list[str]:
        """The run's finished EMA snapshots, oldest first (a half-written one has no weights file yet)."""
        return sorted(p.name for p in self.snapshots.glob("step-*") if (p / WEIGHTS_FILE).exists())

    def trained(self) -> bool:
        """Whether training finished: model/ holds the final EMA U-Net and the scheduler (written at max_steps)."""
        return (self.unet_dir(FINAL) / WEIGHTS_FILE).exists() and (self.model / "scheduler").is_dir()

    def last_checkpoint_step(self) -> int | None:
        """The step of the newest finished checkpoint (by its folder name), None before the first."""
        steps = [int(p.name[5:]) for p in self.checkpoints.glob("step-*") if p.name[5:].isdigit()
                 and (p / "done.json").exists()]
        return max(steps, default=None)

    def candidates(self) -> list[str]:
        """Every snapshot a setting can name: the snapshots, then FINAL if the run finished."""
        return self.snapshot_names() + ([FINAL] if (self.unet_dir(FINAL) / WEIGHTS_FILE).exists() else [])
