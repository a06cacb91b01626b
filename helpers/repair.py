"""A resume makes good what its checkpoints promised.

Training writes, after the checkpoint of a step, that step's EMA snapshot and post-hoc EMA store (and model/ at
max_steps). A write cut off there (a full disk, a kill) is not redone by retraining: the resume starts after the
checkpoint. So before training goes on, `repair_run`
- removes the `.tmp-` folders that cut-off writes of snapshots, stores and checkpoints left (the run lock keeps
  every other writer out while training);
- rewrites each snapshot and store that the checkpoint's config promised for a step at or before the checkpoint
  and that is missing, from a kept checkpoint of that very step (its EMA weights, its post-hoc EMA state: exactly
  what the cut-off write held);
- names in one line the missing ones whose step has no checkpoint left (older steps: their state is gone).
model/ needs no repair here: a resume at max_steps writes it again from the checkpoint's state (helpers.train).
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from .checkpoint import (checkpoint_config, checkpoint_name, checkpoint_step, list_checkpoints, load_checkpoint,
                         save_snapshot, snapshot_at)
from .config import RunConfig, renamed
from .disk import NotEnoughDiskError, WriteSizes, gb, room_for
from .layout import WEIGHTS_FILE
from .phema import FILE_PREFIX, key, store_state, stores_at


def repair_run(cfg: RunConfig, found: tuple[Path, dict] | None, unet, write: bool = True) -> dict:
    """Clean stale temp folders and rewrite what checkpoint `found` (path, contents) promised; returns
    {"removed": [...], "rewritten": [...], "unrecoverable": [...]} (each printed as one line).

    `unet`: the U-Net being trained (a template for the snapshot's module). `write` False (processes other than the
    main one): nothing is done."""
    report = {"removed": [], "rewritten": [], "unrecoverable": []}
    if not write:
        return report
    report["removed"] = remove_stale_temps(cfg)
    if found is not None:
        promised = promised_config(cfg, found[0])
        missing = missing_writes(cfg, promised, checkpoint_step(found[0]))
        kept = {checkpoint_step(p): p for p in list_checkpoints(cfg.layout.checkpoints)}
        fixable = [(kind, step) for kind, step in missing if step in kept]
        report["unrecoverable"] = [f"{kind} {checkpoint_name(step)}" for kind, step in missing if step not in kept]
        if fixable:
            check_room_for(cfg, unet, promised, fixable)
        for kind, step in fixable:
            ckpt = found[1] if kept[step] == found[0] else load_checkpoint(kept[step])
            if rewrite(cfg, promised, kind, step, ckpt, unet):
                report["rewritten"].append(f"{kind} {checkpoint_name(step)}")
            else:
                report["unrecoverable"].append(f"{kind} {checkpoint_name(step)}")
    print_report(cfg, report)
    return report


SNAPSHOT, STORE = "snapshot", "post-hoc EMA store"


def promised_config(cfg: RunConfig, checkpoint: Path) -> RunConfig:
    """What decided the writes up to `checkpoint`: its stored config's snapshot_every and post-hoc EMA settings (a
    resume may have changed them since), with this session's max_steps (a stored one may be a max_epochs rule)."""
    saved = renamed(checkpoint_config(checkpoint) or {})  # a checkpoint written before a field was renamed
    fields = ("snapshot_every", "phema_every", "phema_ema_lengths")
    return cfg.replace(**{k: saved[k] for k in fields if k in saved})


def missing_writes(cfg: RunConfig, promised: RunConfig, upto: int) -> list[tuple[str, int]]:
    """(kind, step) of every snapshot and post-hoc EMA store `promised` for steps 1..upto that is not on disk."""
    layout, missing = cfg.layout, []
    every, max_steps = promised.snapshot_every, cfg.max_steps
    for step in range(1, upto + 1):
        if snapshot_at(step, max_steps, every) and not (layout.unet_dir(checkpoint_name(step)) / WEIGHTS_FILE).exists():
            missing.append((SNAPSHOT, step))
        if promised.phema_ema_lengths and stores_at(step, max_steps, every, promised.phema_every):
            folder = layout.phema / checkpoint_name(step)
            if not all((folder / f"{FILE_PREFIX}{key(s)}.safetensors").exists() for s in promised.phema_ema_lengths):
                missing.append((STORE, step))
    return missing


def rewrite(cfg: RunConfig, promised: RunConfig, kind: str, step: int, ckpt: dict, unet) -> bool:
    """Write the snapshot or store of `step` from `ckpt`, the checkpoint of that step; False if it lacks the state."""
    if kind == SNAPSHOT:
        save_snapshot(cfg.layout.snapshots, ema_unet(unet, ckpt["ema"]), step)
        return True
    phema = ckpt["state"].get("phema")
    if phema is None:  # trained with post-hoc EMA off at that time
        return False
    store_state(cfg.layout.phema, step, phema, promised.phema_ema_lengths)
    return True


@torch.no_grad()
def ema_unet(unet, ema_state: dict):
    """A copy of `unet` holding the EMA weights `ema_state` (a checkpoint's unet_ema): what a snapshot saves."""
    model = copy.deepcopy(unet).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        p.copy_(ema_state[name])
    return model


def check_room_for(cfg: RunConfig, unet, promised: RunConfig, writes: list[tuple[str, int]]) -> None:
    sizes = WriteSizes.of(unet, len(promised.phema_ema_lengths))
    need = sum(sizes.snapshot if kind == SNAPSHOT else sizes.phema for kind, _ in writes)
    fits, free = room_for(cfg.run_dir, need)
    if not fits:
        raise NotEnoughDiskError(
            f"Resuming {cfg.run_dir}: rewriting {', '.join(f'{k} {checkpoint_name(s)}' for k, s in writes)} (cut "
            f"off earlier) needs {gb(need)}, and the disk has {gb(free)} free; free space, then resume again")


def remove_stale_temps(cfg: RunConfig) -> list[str]:
    """Remove the `.tmp-` folders of cut-off snapshot, store and checkpoint writes; their names, relative to the run."""
    layout, removed = cfg.layout, []
    for root in (layout.snapshots, layout.phema, layout.checkpoints):
        for tmp in sorted(root.glob(".tmp-*")) if root.is_dir() else []:
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
            removed.append(str(tmp.relative_to(layout.root)))
    return removed


def print_report(cfg: RunConfig, report: dict) -> None:
    if report["removed"]:
        print(f"Removed what interrupted writes left unfinished: {', '.join(report['removed'])}")
    if report["rewritten"]:
        print(f"Rewrote from the checkpoint of the same step what an interrupted write left missing: "
              f"{', '.join(report['rewritten'])}")
    if report["unrecoverable"]:
        print(f"Missing from {cfg.run_dir} and not recoverable (no checkpoint of that step is left): "
              f"{', '.join(report['unrecoverable'])}; 04's sweep cannot use them")
