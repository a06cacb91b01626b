"""What a training run writes to resume and to choose from: checkpoints' training state and EMA snapshots.

Every write goes to a hidden `.tmp-` folder renamed into place (helpers.checkpoint), so it is complete or absent;
`no_partial_write` cleans up after a failed one. Snapshots are never pruned: they are 04_sample's candidates.
"""
from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path

from .checkpoint import checkpoint_name
from .disk import room_for


@contextlib.contextmanager
def no_partial_write(root: Path, step: int):
    """A checkpoint or snapshot write that fails leaves no temporary folder behind; a failure on a full disk
    (safetensors and torch.save do not raise OSError for it) becomes OSError ENOSPC naming the folder."""
    try:
        yield
    except BaseException as e:
        for tmp in root.glob(f".tmp-{checkpoint_name(step)}*"):  # ours: the run lock keeps other writers out
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, OSError) and root.exists() and not room_for(root, 0)[0]:
            raise OSError(errno.ENOSPC, f"No space left on device ({type(e).__name__})", str(root)) from e
        raise


def training_state(step: int, position: int, optimizer, lr_schedule, accelerator, phema=None) -> dict:
    """Everything besides the weights that resuming needs (state.pt of a checkpoint), with the post-hoc EMA
    profiles in fp32 (exact resume)."""
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else {}
    return dict(step=step, data_position=position, optimizer=optimizer.state_dict(),
                lr_scheduler=lr_schedule.state_dict(), scaler=scaler,
                **({"phema": phema.state_dict()} if phema is not None else {}))


def load_training_state(ckpt: dict, unet, ema: EMA, optimizer, lr_schedule, accelerator) -> tuple[int, int]:
    """Restore a checkpoint into the training parts; returns (step, data position)."""
    unet.load_state_dict(ckpt["unet"])
    ema.load_state_dict(ckpt["ema"])
    state = ckpt["state"]
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler is not None and state["scaler"]:
        accelerator.scaler.load_state_dict(state["scaler"])
    return state["step"], state["data_position"]


def save_snapshot(cfg: RunConfig, ema_unet, step: int) -> Path:
    """`snapshots/step-NNNNNN/`: the EMA U-Net as a diffusers folder (safetensors + config), written atomically."""
    root = cfg.layout.snapshots
    final, tmp = root / checkpoint_name(step), root / f".tmp-{checkpoint_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    ema_unet.save_pretrained(tmp, safe_serialization=True)
    if final.exists():
        print(f"Replacing snapshot {final} (this run trained step {step} again)")
        shutil.rmtree(final)
    tmp.rename(final)
    return final


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
