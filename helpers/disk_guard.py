"""The disk guard of a training run: it never starts what cannot fit, and stops before a write the disk cannot hold.

Before step 1 the run's writes are estimated against the free disk (helpers.disk); around every checkpoint the guard
checks again, so a run stops with a resumable checkpoint before the disk is full, never in the middle of a write.
Every decision is made on the main process and taken by all processes together.
"""
from __future__ import annotations

import torch

from .checkpoint import list_checkpoints
from .disk import (RESERVE_BYTES, NotEnoughDiskError, DiskPlan, WriteSizes, check_room, gb, room_for, snapshot_count,
                   store_count)
from .phema import stores_phema

RESUME_HINT = ("Free space (or set a larger snapshot_every or a smaller keep_checkpoints), then resume: "
               "python -m helpers.train --run-name {run} (or run 03_train_cfg again)")


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is True on any: a stop that all processes must take together."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum") > 0)


class DiskGuard:
    """The three checks of a run's disk: at the start, before a step's writes, and after a checkpoint."""

    def __init__(self, cfg, unet, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.sizes = WriteSizes.of(unet, len(cfg.phema_ema_lengths))

    def at_start(self, start: int) -> str:
        """The estimate of what steps start+1..max_steps write, as one line; NotEnoughDiskError if it cannot fit."""
        cfg, problem, line = self.cfg, None, ""
        if self.accelerator.is_main_process:
            plan = DiskPlan(start, cfg.max_steps, cfg.snapshot_every, cfg.checkpoint_every, cfg.keep_checkpoints,
                        len(list_checkpoints(cfg.layout.checkpoints)), cfg.phema_every)
            try:
                line = check_room(plan, self.sizes, cfg.run_dir, cfg.layout.shown(cfg.run_dir))
            except NotEnoughDiskError as e:
                problem = str(e)
        if any_process(self.accelerator, problem is not None):
            raise NotEnoughDiskError(problem or "not enough disk (the main process says how much)")
        return line

    def before_writes(self, done: int, checkpoint: bool, snapshot: bool, last_checkpoint: str | None) -> None:
        """Before step `done` writes its checkpoint, snapshot (and model/, post-hoc EMA profiles): stop, writing
        nothing, unless they fit."""
        cfg, sizes = self.cfg, self.sizes
        need = (checkpoint * sizes.checkpoint + snapshot * sizes.snapshot
                + (sizes.model if done == cfg.max_steps else 0) + stores_phema(cfg, done) * sizes.phema)
        self._stop_unless_room(need, lambda free, need: (
            f"Stopped at step {done}, before writing its checkpoint or snapshot: the disk holding {cfg.run_dir} has "
            f"{gb(free)} free and they need {gb(need)} (and {gb(RESERVE_BYTES)} stays free). Nothing of step {done} "
            f"was written; the last checkpoint is {last_checkpoint or 'none'}. " + RESUME_HINT.format(run=cfg.run_dir)))

    def after_checkpoint(self, done: int, end: int, checkpoint: str | None) -> None:
        """After the checkpoint of step `done`: stop now unless everything up to the next checkpoint fits."""
        cfg, sizes = self.cfg, self.sizes
        upto = min(end, (done // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
        need = (snapshot_count(done, upto, cfg.max_steps, cfg.snapshot_every) * sizes.snapshot + sizes.checkpoint
                + (sizes.model if upto == cfg.max_steps else 0)
                + store_count(done, upto, cfg.max_steps, cfg.snapshot_every, cfg.phema_every) * sizes.phema)
        self._stop_unless_room(need, lambda free, need: (
            f"Stopped after step {done} with a resumable checkpoint {checkpoint}: the disk holding {cfg.run_dir} has "
            f"{gb(free)} free, and steps {done + 1}-{upto} would write {gb(need)} (and {gb(RESERVE_BYTES)} stays "
            f"free). " + RESUME_HINT.format(run=cfg.run_dir)))

    def _stop_unless_room(self, need: int, message) -> None:
        """NotEnoughDiskError(message(free, need)) on every process unless `need` bytes fit (decided on the main one)."""
        fits, free = room_for(self.cfg.run_dir, need) if self.accelerator.is_main_process else (True, 0)
        if any_process(self.accelerator, not fits):
            raise NotEnoughDiskError(message(free, need))
