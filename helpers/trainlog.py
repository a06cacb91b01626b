"""The training log: train.csv + TensorBoard under <run>/logs, and the check that the losses are finite."""
from __future__ import annotations

import csv
from pathlib import Path

import torch


class TrainLog:
    """train.csv + TensorBoard under <run_dir>/logs (main process only); rows past `start` are dropped on resume."""

    FIELDS = ("step", "loss", "lr", "images_per_s", "epoch")

    def __init__(self, cfg: RunConfig, start: int, active: bool):
        self.active, self.path = active, cfg.layout.logs / "train.csv"
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_log_rows(self.path) if int(r["step"]) <= start] if start else []
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        self.tb = SummaryWriter(str(cfg.layout.logs / "tensorboard"), purge_step=start + 1 if start else None)

    def write(self, rows: list[dict], images_per_s: float, epoch: float, skipped: int = 0,
              loss_scale: float | None = None) -> None:
        """Append `rows`; fp16 runs also log the loss scale and the steps it skipped (TensorBoard)."""
        if not self.active:
            return
        rows = [dict(r, images_per_s=round(images_per_s, 2), epoch=round(epoch, 4)) for r in rows]
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerows(rows)
        for r in rows:
            for name in ("loss", "lr", "images_per_s"):
                self.tb.add_scalar(f"train/{name}", r[name], r["step"])
        if loss_scale is not None:
            self.tb.add_scalar("train/loss_scale", loss_scale, rows[-1]["step"])
            self.tb.add_scalar("train/skipped_steps", skipped, rows[-1]["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.active:
            self.tb.close()


def read_log_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def read_log(cfg: RunConfig) -> dict[str, list[float]]:
    """The run's whole training log as columns: {"step": [...], "loss": [...], ...}."""
    rows = read_log_rows(cfg.layout.logs / "train.csv")
    return {k: [float(r[k]) for r in rows] for k in TrainLog.FIELDS}


def check_losses(accelerator, pending: list, last_checkpoint: str | None, lr: float) -> list[dict]:
    """The pending losses on the host (mean over processes) as log rows; FloatingPointError at the first NaN/inf."""
    losses = accelerator.reduce(torch.stack([loss for _, loss, _ in pending]), reduction="mean").cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise FloatingPointError(
            f"Training loss became {losses[i].item()} at step {pending[i][0]}: stopped. The last good checkpoint is "
            f"{last_checkpoint or 'none (no checkpoint was written yet)'}; lower lr (now {lr}) or max_grad_norm, or "
            f"try mixed_precision='no', then resume.")
    return [dict(step=s, loss=float(loss), lr=lr) for (s, _, lr), loss in zip(pending, losses)]
