"""Training checkpoints that are either complete or invisible.

`<run_dir>/checkpoints/step-000200/` holds
    unet.safetensors, unet_ema.safetensors   weights (safetensors: no code runs when loading)
    state.pt                                 optimizer, LR scheduler, grad scaler, EMA counters, RNG
                                             states, step and data position (torch.load weights_only)
    config.json                              the run config it was trained with (see helpers.resume)
    done.json                                written last; lists the files above
`<run_dir>/snapshots/step-000300/` holds the EMA U-Net as a diffusers folder (`save_snapshot`): 04's candidates,
never pruned. Everything is written into a hidden temp folder first and renamed into place, so a killed process
leaves at most a `.tmp-*` folder, which is ignored and cleaned up (`no_partial_write`). Only the last K checkpoints
are kept.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .disk import room_for
from .files import read_json

FILES = ("unet.safetensors", "unet_ema.safetensors", "state.pt")
_NAME = re.compile(r"step-(\d{6,})")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def snapshot_at(step: int, max_steps: int, snapshot_every: int) -> bool:
    """Whether training step `step` keeps an EMA snapshot: every snapshot_every steps (0: none besides) and at
    max_steps. The one definition training, the post-hoc EMA stores and the repair share."""
    return step == max_steps or (snapshot_every > 0 and step % snapshot_every == 0)


class CheckpointsDamagedError(RuntimeError):
    """Checkpoints exist but none of them loads: training must not quietly start over."""


def save_checkpoint(root: str | Path, step: int, unet_state: dict, ema_state: dict, state: dict,
                    keep: int = 2, config: str | None = None) -> Path:
    """Write one checkpoint atomically (temp folder, fsync, rename) and prune all but the last `keep`.

    `config`: the run's config.json text, stored so a resume can tell what settings changed since."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous_cpu(unet_state), str(tmp / "unet.safetensors"))
    save_file(_contiguous_cpu(ema_state), str(tmp / "unet_ema.safetensors"))
    torch.save(state, tmp / "state.pt")
    if config is not None:
        (tmp / "config.json").write_text(config, encoding="utf-8")
    files = list(FILES) + (["config.json"] if config is not None else [])
    (tmp / "done.json").write_text(json.dumps({"step": step, "files": files}))
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():  # re-running from an earlier checkpoint: move the old one aside first
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(root)
    prune_checkpoints(root, keep)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temp folders and ones without done.json are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name) and (p / "done.json").exists()]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def prune_checkpoints(root: str | Path, keep: int) -> None:
    root = Path(root)
    for p in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-*"):  # left by a killed writer (ours was renamed away already)
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | Path) -> dict:
    """{"unet", "ema", "state"} of one checkpoint; a clear error if a file is missing or damaged."""
    path = Path(path)
    try:
        return dict(unet=load_file(str(path / "unet.safetensors")), ema=load_file(str(path / "unet_ema.safetensors")),
                    state=torch.load(path / "state.pt", map_location="cpu", weights_only=True))
    except Exception as e:
        raise ValueError(f"{path}: damaged checkpoint ({type(e).__name__}: {e})") from None


def latest_checkpoint(root: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, with its contents; damaged ones are reported and skipped.

    None when there is no checkpoint; CheckpointsDamagedError when there are some and none loads
    (starting over is the user's decision: resume=False moves them aside)."""
    damaged = []
    for path in reversed(list_checkpoints(root)):
        try:
            return path, load_checkpoint(path)
        except ValueError as e:
            print(f"Skipping {e}")
            damaged.append(path.name)
    if damaged:
        raise CheckpointsDamagedError(
            f"{root}: every checkpoint is damaged ({', '.join(damaged)}); nothing was changed. To start this run "
            f"over, train with resume=False (--no-resume), which moves them aside; or restore them from a backup")
    return None


def checkpoint_config(path: str | Path) -> dict | None:
    """The run config stored in a checkpoint (None for checkpoints written before configs were stored)."""
    file = Path(path) / "config.json"
    if not file.exists():
        return None
    try:
        values = read_json(file)
    except ValueError as e:
        raise ValueError(f"damaged checkpoint config: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{file}: damaged checkpoint config (expected an object)")
    return values


def checkpoint_step(path: str | Path) -> int:
    return int(_NAME.fullmatch(Path(path).name).group(1))


def _contiguous_cpu(tensors: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _fsync(path: Path) -> None:
    """Flush to disk so a power cut (not just a kill) cannot leave a renamed but empty file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def save_snapshot(root: Path, ema_unet, step: int) -> Path:
    """`<root>/step-NNNNNN/`: the EMA U-Net as a diffusers folder (safetensors + config), written atomically."""
    final, tmp = root / checkpoint_name(step), root / f".tmp-{checkpoint_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    ema_unet.save_pretrained(tmp, safe_serialization=True)
    if final.exists():
        print(f"Replacing snapshot {final} (this run trained step {step} again)")
        shutil.rmtree(final)
    tmp.rename(final)
    return final
