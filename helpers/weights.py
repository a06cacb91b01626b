"""The weights a setting samples with: where they are, what identifies them, how they are loaded, and the cache of
loaded U-Nets.

A setting (helpers.setting.Setting) samples with the U-Net of its snapshot (`unet_folder`), maybe with a post-hoc
EMA of another length rebuilt from the profiles stored in <run>/phema (`ema_rebuild`, helpers.phema), and maybe
steered away from a guide snapshot's U-Net. `setting_weights_id` names all of them by their hashes (a sweep cell
and a test set are reused only while those are the same); `load_for_setting` / `with_setting` load them, and
`LoadedWeights` keeps the loaded ones, so the sweep, the test set and the panel load each set of weights once.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
from pathlib import Path

from .config import RunConfig
from .files import safetensors_problem
from .layout import WEIGHTS_FILE
from .progress import say_once
from .setting import FINAL, NO_GUIDE, Setting


# ---------------------------------------------------------------- snapshots and their weights


def unet_folder(cfg: RunConfig, snapshot: str) -> Path:
    """The U-Net folder of `snapshot`; FileNotFoundError naming the run's snapshots (and a close match)."""
    folder = cfg.layout.unet_dir(snapshot)
    if not (folder / WEIGHTS_FILE).exists():
        known = cfg.layout.candidates()
        close = difflib.get_close_matches(snapshot, known, 1, cutoff=0.5)
        raise FileNotFoundError(f"snapshot {snapshot!r}: no U-Net weights in {folder} (run {cfg.run_name!r} has "
                                f"{', '.join(known) or 'none yet: train it first with 03_train_cfg'})"
                                + (f"; did you mean {close[0]!r}?" if close else ""))
    damaged = safetensors_problem(folder / WEIGHTS_FILE)
    if damaged:
        raise ValueError(f"snapshot {snapshot!r}: {folder / WEIGHTS_FILE}: {damaged} (an interrupted copy or write?)")
    return folder


def weights_sha256(folder: Path) -> str:
    """16 hex digits of the U-Net's safetensors: what makes 'the same snapshot' after retraining checkable."""
    return file_sha256(folder / WEIGHTS_FILE)[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def weights_id(cfg: RunConfig, snapshot: str) -> str:
    """What identifies the weights a snapshot samples with: its hash, or the pretrained pipeline's id."""
    if cfg.pipeline:  # the run samples a pretrained pipeline: no snapshots of its own
        return f"pretrained:{cfg.pipeline}"
    return weights_sha256(unet_folder(cfg, snapshot))


def snapshot_step(snapshot: str) -> int | None:
    """The training step of a snapshot name ("step-000900" -> 900); None for FINAL (the end of training)."""
    if snapshot == FINAL:
        return None
    name, _, step = snapshot.rpartition("-")
    if name != "step" or not step.isdigit():
        raise ValueError(f"snapshot {snapshot!r} is not a training step's name such as 'step-000900' or {FINAL!r}")
    return int(step)


def setting_unet(cfg: RunConfig, snapshot: str, ema_length: float = 0.0, device="cpu"):
    """The U-Net of `snapshot` with its stored half-life EMA (ema_length 0), or with the post-hoc EMA of length
    `ema_length` reconstructed at the snapshot's step from the profiles stored in <run>/phema (helpers.phema),
    refused when that fit is too far off (helpers.phema.MAX_PROFILE_ERROR)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_folder(cfg, snapshot))
    if ema_length:
        rebuild = ema_rebuild(cfg, snapshot, ema_length)
        missing, unexpected = unet.load_state_dict(rebuild.weights(), strict=False)
        params = {name for name, _ in unet.named_parameters()}
        if unexpected or params & set(missing):
            raise ValueError(f"{cfg.layout.phema}: the stored post-hoc EMA profiles do not fit the U-Net of "
                             f"{snapshot!r} (missing {sorted(params & set(missing))[:3]}, unexpected {unexpected[:3]})")
        say_once(f"{snapshot}: {rebuild.line()}")
    return unet.to(device).eval().requires_grad_(False)


def ema_rebuild(cfg: RunConfig, snapshot: str, ema_length: float, stored=None):
    """How `snapshot`'s EMA of length `ema_length` is rebuilt (helpers.phema.Rebuild), at the snapshot's own step;
    ValueError (one line) when it cannot be rebuilt faithfully. `stored`: the run's stored profiles, if read."""
    from .phema import plan_rebuild, stored_profiles

    stored = stored_profiles(cfg.layout.phema) if stored is None else stored
    try:
        return plan_rebuild(stored, ema_length, trained_step(cfg, snapshot))
    except ValueError as e:
        raise ValueError(f"snapshot {snapshot!r}: {e}") from None


def trained_step(cfg: RunConfig, snapshot: str) -> int:
    """The training step whose EMA `snapshot` holds. FINAL (model/unet_ema) holds the last step's, which is also
    written as that step's snapshot: the snapshot with the same weights file tells which step it is."""
    step = snapshot_step(snapshot)
    if step is not None:
        return step
    final = unet_folder(cfg, FINAL) / WEIGHTS_FILE
    for name in reversed(cfg.layout.snapshot_names()):
        same = cfg.layout.unet_dir(name) / WEIGHTS_FILE
        if same.stat().st_size == final.stat().st_size and _cached_sha256(same) == _cached_sha256(final):
            return snapshot_step(name)
    raise ValueError(f"{final.parent}: no snapshot of run {cfg.run_name!r} holds its weights, so the training step "
                     f"of {FINAL!r} is unknown; name the snapshot of the last step instead")


def rebuildable_lengths(cfg: RunConfig, snapshots: list[str], lengths: list[float]) -> tuple[list[float], dict]:
    """(the EMA lengths every one of `snapshots` can rebuild, {length dropped: why}). 0 (the half-life EMA stored
    with each snapshot) always stays; so does every length while a snapshot has no weights (loading it says so)."""
    from .phema import stored_profiles

    wanted = [v for v in lengths if v]
    if not wanted or cfg.pipeline or not all(s in cfg.layout.candidates() for s in snapshots):
        return list(lengths), {}
    stored, dropped = stored_profiles(cfg.layout.phema), {}
    for length in wanted:
        for snapshot in snapshots:
            try:
                ema_rebuild(cfg, snapshot, length, stored)
            except ValueError as e:
                dropped[length] = str(e)
                break
    return [v for v in lengths if v not in dropped], dropped


def with_setting(model, cfg: RunConfig, setting: Setting):
    """`model` with what `setting` samples: the U-Net of (snapshot, ema_length) and, when autoguided, the guide's
    U-Net (its stored half-life EMA); the frozen parts are shared, not reloaded."""
    if cfg.pipeline:
        return model
    guide = setting_unet(cfg, setting.guide, 0.0, model.device) if setting.autoguided else None
    return dataclasses.replace(model, unet=setting_unet(cfg, setting.snapshot, setting.ema_length, model.device),
                               ema_length=setting.ema_length, guide=setting.guide if guide is not None else "",
                               guide_weight=setting.guide_weight if guide is not None else 1.0, guide_unet=guide)


def setting_unet_folder(cfg: RunConfig, setting: Setting) -> Path:
    """A diffusers folder holding the U-Net `setting` samples with (e.g. for the hand-in's model/): the snapshot's
    own folder, or, with an EMA length, the rebuilt U-Net written (again, atomically) to
    <run>/phema/rebuilt/<snapshot>-sigma<ema_length>/. The guide, if any, is the snapshot folder of setting.guide."""
    import shutil

    if not setting.ema_length or cfg.pipeline:
        return unet_folder(cfg, setting.snapshot)
    out = cfg.layout.phema / "rebuilt" / f"{setting.snapshot}-sigma{setting.ema_length:.3f}"
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    setting_unet(cfg, setting.snapshot, setting.ema_length).save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def setting_weights_id(cfg: RunConfig, setting: Setting) -> str:
    """What identifies every weight `setting` samples with: the snapshot's hash, plus the hashes of the stored
    post-hoc EMA profiles it is rebuilt from (ema_length) and of the guide (when autoguided)."""
    ids = [weights_id(cfg, setting.snapshot)]
    if setting.ema_length and not cfg.pipeline:
        files = [p.path for p in ema_rebuild(cfg, setting.snapshot, setting.ema_length).used]
        ids.append(f"ema{setting.ema_length:g}:" + hashlib.sha256("".join(_cached_sha256(f) for f in files)
                                                                 .encode()).hexdigest()[:16])
    if setting.autoguided:
        ids.append("guide:" + weights_id(cfg, setting.guide))
    return "+".join(ids)


_SHA256: dict[tuple, str] = {}  # (path, size, mtime) -> hash: a sweep asks for the same profiles many times


def _cached_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = file_sha256(path)
    return _SHA256[key]


class TrainingNotFinishedError(RuntimeError):
    """The run has no model/ yet: its training stopped (session_hours) or never started."""


def require_trained(cfg: RunConfig) -> None:
    """TrainingNotFinishedError saying where training stands and what to run, unless the run finished training."""
    if cfg.pipeline or cfg.layout.trained():
        return
    step = cfg.layout.last_checkpoint_step()
    where = (f"its last checkpoint is step {step:,}" if step is not None else "it has no checkpoint yet")
    raise TrainingNotFinishedError(
        f"run {cfg.run_name!r} has not finished training ({where}; {cfg.layout.shown(cfg.layout.model)} is written "
        "at the end): run 03_train_cfg again (helpers.runs with the same command resumes it), then choose and write")


def load_for_setting(cfg: RunConfig, setting: Setting):
    """(model that samples `setting`, its weights id): the run's trained U-Net (with the setting's EMA length and
    guide), or its pretrained pipeline. TrainingNotFinishedError before training has finished."""
    require_trained(cfg)
    if cfg.pipeline:
        from .baseline import load_pipeline

        return load_pipeline(cfg, cfg.pipeline), weights_id(cfg, setting.snapshot)
    from .model import load_model

    model = load_model(cfg, unet_dir=unet_folder(cfg, setting.snapshot))
    if setting.ema_length or setting.autoguided:
        model = with_setting(model, cfg, setting)
    return model, setting_weights_id(cfg, setting)


# ---------------------------------------------------------------- the loaded ones


def weights_key(s: Setting) -> tuple:
    """The U-Nets a setting samples with: snapshot, EMA length, and the guide while it is active (a cache of loaded
    models keeps one per key)."""
    return s.snapshot, s.ema_length, s.guide if s.autoguided else NO_GUIDE


class LoadedWeights:
    """The one cache of loaded U-Nets: models built on `model` by `with_setting` (its frozen parts shared), one per
    `weights_key`, for the selection sweep (helpers.staged), the test set written after it (helpers.choose) and the
    panel. It keeps the `keep` loaded last (the oldest goes first, before the next is loaded) besides `model`
    itself, which stands for `holds` (the setting it was loaded for) when that is given, and is never dropped."""

    def __init__(self, model, cfg: RunConfig, keep: int = 1, holds: Setting | None = None):
        self.model, self.cfg, self.keep = model, cfg, keep
        self.models = {weights_key(holds): model} if holds is not None else {}  # weights_key -> model

    def __contains__(self, s: Setting) -> bool:
        return weights_key(s) in self.models

    def for_setting(self, s: Setting):
        """The model that samples `s`: cached, or loaded now (with_setting)."""
        key = weights_key(s)
        if key not in self.models:
            loaded = [k for k, m in self.models.items() if m is not self.model]
            for k in loaded[:max(0, len(loaded) - self.keep + 1)]:
                del self.models[k]
            self.models[key] = with_setting(self.model, self.cfg, s)
        return self.models[key]
