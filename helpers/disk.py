"""What a training run will write, and whether the disk that holds its folder has room for it.

EMA snapshots are never pruned (an `hw6-recipe` snapshot is 1.2 GB in fp32) and a checkpoint also holds AdamW's
two moments, so a long run can fill a disk hours after it started; a disk that fills up mid-write is the classic
way to lose a night of training. So `train()` checks before step 1 (`check_room`: refused with the numbers and
the settings that would fit) and again around every checkpoint and snapshot (`room_for`), and stops with a
resumable checkpoint while there is still room for it. Sizes come from the U-Net being trained, not constants.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

RESERVE_BYTES = 256 * 2**20  # left free: logs, previews, config files, and whatever else shares the disk
PER_TENSOR_BYTES = 1024  # file headers and torch.save's per-record overhead, an upper bound per tensor
SAFETENSORS_HEADER_BYTES = 256  # a safetensors header entry (name, dtype, shape, offsets) per tensor, an upper bound


class NotEnoughDiskError(RuntimeError):
    """The run's writes do not fit on its disk; the message gives the numbers and what to do."""


# Folders whose owner caps what they may hold below what the filesystem reports: Kaggle keeps 20 GB of /kaggle/working
QUOTAS = {Path("/kaggle/working"): 20 * 10**9}


def free_bytes(path: str | Path) -> int:
    """Bytes an ordinary user may still write on the filesystem holding `path`, within a known quota of the folder
    it lies in (QUOTAS); tests replace this."""
    free = shutil.disk_usage(path).free
    for root, quota in QUOTAS.items():
        if Path(path).resolve().is_relative_to(root):
            free = min(free, max(0, quota - folder_bytes(root)))
    return free


def folder_bytes(root: Path) -> int:
    """What the files under `root` hold (a quota counts them, not the filesystem's free space)."""
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())


@dataclass(frozen=True)
class WriteSizes:
    """Bytes of one snapshot, one checkpoint and model/, from the U-Net that is trained."""

    snapshot: int  # the EMA U-Net as saved (its own dtype: fp32 today) + config
    checkpoint: int  # unet + unet_ema (fp32) + AdamW's exp_avg and exp_avg_sq + post-hoc EMA profiles (fp32) + state
    model: int  # model/unet + model/unet_ema
    phema: int = 0  # one store of the post-hoc EMA profiles (fp16, helpers.phema) in phema/step-N/

    @classmethod
    def of(cls, unet, profiles: int = 0) -> "WriteSizes":
        """From the U-Net trained, with `profiles` post-hoc EMA profiles tracked (phema_ema_lengths)."""
        state = unet.state_dict()
        weights = sum(t.numel() * t.element_size() for t in state.values())
        ema = sum(p.numel() * 4 for p in unet.parameters())  # helpers.diffusion.EMA keeps fp32 copies
        moments = 2 * sum(p.numel() * p.element_size() for p in unet.parameters() if p.requires_grad)
        overhead, params = PER_TENSOR_BYTES * len(state), sum(1 for _ in unet.parameters())
        return cls(snapshot=weights + overhead,
                   checkpoint=weights + (1 + profiles) * ema + moments + (4 + profiles) * overhead,
                   model=2 * (weights + overhead), phema=profiles * (ema // 2 + SAFETENSORS_HEADER_BYTES * params))


def snapshot_count(start: int, end: int, max_steps: int, every: int) -> int:
    """Snapshots written by steps start+1..end: every `every` steps (0: none) and always at max_steps."""
    regular = end // every - start // every if every > 0 else 0
    final = end == max_steps > start and (every == 0 or max_steps % every != 0)
    return regular + int(final)


def store_count(start: int, end: int, max_steps: int, snapshot_every: int, phema_every: int) -> int:
    """Post-hoc EMA stores written by steps start+1..end: with every snapshot and every `phema_every` steps
    (helpers.phema.stores_at), each step once."""
    def multiples(every: int) -> int:
        return end // every - start // every if every > 0 else 0

    both = math.lcm(snapshot_every, phema_every) if snapshot_every > 0 and phema_every > 0 else 0
    regular = multiples(snapshot_every) + multiples(phema_every) - multiples(both)
    final = end == max_steps > start and not any(every > 0 and max_steps % every == 0
                                                  for every in (snapshot_every, phema_every))
    return regular + int(final)


def checkpoint_count(start: int, end: int, every: int) -> int:
    """Checkpoints written by steps start+1..end: every `every` steps and at the session's last step."""
    return end // every - start // every + int(end % every != 0 and end > start)


@dataclass(frozen=True)
class DiskPlan:
    """The settings that decide how much a run writes from step `start` to `max_steps`."""

    start: int
    max_steps: int
    snapshot_every: int
    checkpoint_every: int
    keep_checkpoints: int  # 0 keeps them all
    existing_checkpoints: int = 0  # already on disk (a resume): pruned as new ones come
    phema_every: int = 0  # post-hoc EMA profiles stored with each snapshot and every N steps besides (0: no others)

    def snapshots(self) -> int:
        return snapshot_count(self.start, self.max_steps, self.max_steps, self.snapshot_every)

    def phema_stores(self) -> int:
        return store_count(self.start, self.max_steps, self.max_steps, self.snapshot_every, self.phema_every)

    def new_checkpoints(self) -> int:
        """How many more checkpoints are on disk at the peak (a new one is written before the oldest is pruned)."""
        written = checkpoint_count(self.start, self.max_steps, self.checkpoint_every)
        if self.keep_checkpoints == 0:
            return written
        peak = min(self.existing_checkpoints + written, self.keep_checkpoints + 1)
        return max(0, peak - self.existing_checkpoints)

    def bytes(self, sizes: WriteSizes) -> int:
        final = sizes.model if self.max_steps > self.start else 0
        return (self.snapshots() * sizes.snapshot + self.new_checkpoints() * sizes.checkpoint + final
                + self.phema_stores() * sizes.phema)

    def describe(self, sizes: WriteSizes) -> str:
        phema = f", {self.phema_stores()} post-hoc EMA store(s) × {gb(sizes.phema)}" if sizes.phema else ""
        return (f"about {gb(self.bytes(sizes))}: {self.snapshots()} EMA snapshot(s) × {gb(sizes.snapshot)}, "
                f"{self.new_checkpoints()} more checkpoint(s) × {gb(sizes.checkpoint)} at the peak "
                f"(keep_checkpoints={self.keep_checkpoints}), model/ {gb(sizes.model)}{phema}")


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_room(plan: DiskPlan, sizes: WriteSizes, folder: Path, shown: str | None = None) -> str:
    """One line with the estimate and the free space; NotEnoughDiskError (with settings that fit) if it cannot fit.
    `shown`: the folder as the line names it (a run as runs/<name>, the same on every machine)."""
    free, need = free_bytes(folder), plan.bytes(sizes) + RESERVE_BYTES
    line = (f"Disk: steps {plan.start + 1}-{plan.max_steps} will write {plan.describe(sizes)}; "
            f"{gb(free)} free where {shown or folder} is")
    if need <= free:
        return line
    raise NotEnoughDiskError(
        f"Not enough disk to train {folder}: steps {plan.start + 1}-{plan.max_steps} would write "
        f"{plan.describe(sizes)}, and {gb(RESERVE_BYTES)} stays free, but the disk has {gb(free)}. "
        f"{settings_that_fit(plan, sizes, free - RESERVE_BYTES)}")


def settings_that_fit(plan: DiskPlan, sizes: WriteSizes, room: int) -> str:
    """A sentence naming snapshot_every / keep_checkpoints values whose writes fit in `room` bytes."""
    options = []
    every = _snapshot_every_that_fits(plan, sizes, room)
    if every is not None:
        options.append(f"snapshot_every={every}")
    keep = next((k for k in range(plan.keep_checkpoints - 1, 0, -1) if _with(plan, keep_checkpoints=k).bytes(sizes)
                 <= room), None)
    if keep is not None:
        options.append(f"keep_checkpoints={keep}")
    lean = _with(plan, snapshot_every=0, keep_checkpoints=1)
    if not options and lean.bytes(sizes) <= room:
        options.append("snapshot_every=0 with keep_checkpoints=1")
    if not options:
        return (f"Even the final snapshot with one checkpoint needs {gb(lean.bytes(sizes))}: free space, or move "
                f"outputs_dir to a larger disk.")
    return f"Settings that fit: {' or '.join(options)}; or free space, or move outputs_dir to a larger disk."


def _with(plan: DiskPlan, **changes) -> DiskPlan:
    return DiskPlan(**{**plan.__dict__, **changes})


def _snapshot_every_that_fits(plan: DiskPlan, sizes: WriteSizes, room: int) -> int | None:
    """The smallest snapshot_every above the current one whose snapshots fit (0 = only the final one)."""
    if _with(plan, snapshot_every=0).bytes(sizes) > room:
        return None
    for every in range(max(plan.snapshot_every + 1, 1), plan.max_steps):
        if _with(plan, snapshot_every=every).bytes(sizes) <= room:
            return every
    return 0


def room_for(folder: Path, nbytes: int) -> tuple[bool, int]:
    """(whether `nbytes` more fit on `folder`'s disk with RESERVE_BYTES left free, the free bytes now)."""
    free = free_bytes(folder)
    return nbytes + RESERVE_BYTES <= free, free
