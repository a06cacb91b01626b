"""One owner of a training run's saved state, as EDM2's CheckpointIO: what training writes to resume and to choose
from, and how it comes back.

    io = CheckpointIO.open(cfg, accelerator, resume)     # the newest checkpoint that loads, the resume checked
    io.attach(unet, ema, phema, optimizer, lr_schedule)   # the parts it saves and restores
    step, position = io.load_latest()                     # the resume, in one call
    io.save(done, position, due)                          # what step `done` is due for, each complete or absent

A resume restores the weights, EMA, post-hoc EMA profiles, optimizer, LR schedule, loss scaler and data position,
makes this config's lr the schedule's peak (helpers.resume), and makes good the snapshots and post-hoc EMA stores
that cut-off writes owed (helpers.repair). Files and their atomic writes: helpers.checkpoint; the profiles:
helpers.phema. Snapshots and stores are never pruned: they are 04's candidates.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from .checkpoint import (checkpoint_config, latest_checkpoint, no_partial_write, save_checkpoint, save_snapshot)
from .config import RunConfig
from .phema import resume_phema
from .repair import repair_run
from .resume import check_resume, retarget_optimizer
from .run_folder import save_config


def ema_copy(unet, ema):
    """A copy of the U-Net holding the EMA weights, for previews, snapshots and the saved model."""
    return ema.copy_to(copy.deepcopy(unet).eval().requires_grad_(False))


def weights_finite(unet) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in unet.parameters()]).all())


class CheckpointIO:
    def __init__(self, cfg: RunConfig, accelerator, found: tuple[Path, dict] | None):
        self.cfg, self.accelerator, self.found = cfg, accelerator, found
        self.main = accelerator.is_main_process
        self.given_config = cfg.to_json()  # stored in checkpoints as the user set it (before max_epochs -> steps)
        self.checkpoint = str(found[0]) if found else None  # the newest written or resumed from
        self.snapshots: list[str] = []
        self.parts = None

    @classmethod
    def open(cls, cfg: RunConfig, accelerator, resume: bool) -> "CheckpointIO":
        """Before anything is written: the newest checkpoint that loads, checked against `cfg` (a refused resume
        leaves the run as it was); then config.json written, and with resume=False the old checkpoints moved aside."""
        found = latest_checkpoint(cfg.layout.checkpoints) if resume else None
        if found:
            check_resume(found[0], checkpoint_config(found[0]), cfg, verbose=accelerator.is_main_process)
        if accelerator.is_main_process:
            save_config(cfg)
            if not resume:
                retire_checkpoints(cfg)
        accelerator.wait_for_everyone()
        return cls(cfg, accelerator, found)

    @property
    def saved_config(self) -> dict | None:
        """The config the checkpoint resumed from was trained with (None: a new run)."""
        return checkpoint_config(self.found[0]) if self.found else None

    def planned(self, cfg: RunConfig) -> None:
        """`cfg` (fit, time budget) is the run's config from now on: config.json, checkpoints, resumes."""
        self.cfg, self.given_config = cfg, cfg.to_json()
        if self.main:
            save_config(cfg)

    def attach(self, unet, ema, phema, optimizer, lr_schedule, images_per_step: int) -> None:
        self.parts = (unet, ema, phema, optimizer, lr_schedule)
        self.images_per_step = images_per_step

    def load_latest(self) -> tuple[int, int]:
        """(step, data position) of the checkpoint resumed from, its state in the attached parts, this config's lr,
        and what cut-off writes owed repaired; (0, 0) for a new run (stale temp folders still cleaned)."""
        unet, ema, phema, optimizer, lr_schedule = self.parts
        start, position = 0, 0
        if self.found:
            ckpt, scaler = self.found[1], self.accelerator.scaler
            unet.load_state_dict(ckpt["unet"])
            ema.load_state_dict(ckpt["ema"])
            state = ckpt["state"]
            optimizer.load_state_dict(state["optimizer"])
            lr_schedule.load_state_dict(state["lr_scheduler"])
            if scaler is not None and state["scaler"]:
                scaler.load_state_dict(state["scaler"])
            start, position = state["step"], state["data_position"]
            resume_phema(phema, unet, state, start * self.images_per_step, verbose=self.main)
            retarget_optimizer(optimizer, lr_schedule, self.cfg.lr, self.cfg.weight_decay)  # this config's lr
        repair_run(self.cfg, self.found, unet, write=self.main)
        return start, position

    def training_state(self, step: int, position: int) -> dict:
        """Everything besides the weights that resuming needs (state.pt), the post-hoc EMA profiles in fp32."""
        _, _, phema, optimizer, lr_schedule = self.parts
        scaler = self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else {}
        return dict(step=step, data_position=position, optimizer=optimizer.state_dict(),
                    lr_scheduler=lr_schedule.state_dict(), scaler=scaler,
                    **({"phema": phema.state_dict()} if phema is not None else {}))

    def save(self, done: int, position: int, checkpoint: bool, snapshot: bool, phema_store: bool) -> None:
        """The checkpoint, EMA snapshot and post-hoc EMA store step `done` is due for (the main process writes)."""
        unet, ema, phema, _, _ = self.parts
        layout = self.cfg.layout
        if checkpoint and not weights_finite(unet):
            raise FloatingPointError(f"U-Net weights are not finite after step {done}: not checkpointing. The last "
                                     f"good checkpoint is {self.checkpoint or 'none'}; lower lr and resume.")
        if checkpoint and self.main:
            state = self.training_state(done, position)
            with no_partial_write(layout.checkpoints, done):
                self.checkpoint = str(save_checkpoint(layout.checkpoints, done, unet.state_dict(), ema.state_dict(),
                                                      state, self.cfg.keep_checkpoints, config=self.given_config))
        if snapshot and self.main:
            with no_partial_write(layout.snapshots, done):
                self.snapshots.append(str(save_snapshot(layout.snapshots, ema_copy(unet, ema), done)))
        if phema_store and self.main:
            with no_partial_write(layout.phema, done):
                phema.store(layout.phema, done)


def retire_checkpoints(cfg: RunConfig) -> None:
    """resume=False: move old checkpoints aside, so they cannot be mistaken for this run's."""
    root = cfg.layout.checkpoints
    if root.exists():
        old, n = root.with_name("checkpoints.old"), 1
        while old.exists():  # never delete what an earlier resume=False moved aside
            n += 1
            old = root.with_name(f"checkpoints.old-{n}")
        root.rename(old)
        print(f"resume=False: moved the previous checkpoints to {old}")
