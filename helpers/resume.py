"""What a resumed run may change, and what it may not.

Every checkpoint stores the config it was trained with (`config.json` in its folder). On resume the
current config is compared with it:
- settings that change the model's shapes or what it learns to predict (SHAPE_FIELDS) are refused:
  the old weights cannot be loaded into, or do not mean the same thing for, the new model;
- every other difference is allowed, takes effect from the resumed step and is printed. A new `lr`
  is the new peak of the same schedule: the learning rate continues at the current point of the
  warm-up/decay curve, scaled to the new peak (`retarget_optimizer`), so "lower lr, then resume"
  after a divergence really lowers it. A new max_steps or warmup_steps reshapes the curve the same way.
"""
from __future__ import annotations

import json

from .checkpoint import checkpoint_step
from .config import renamed

# field -> why it cannot change under a trained checkpoint
SHAPE_FIELDS = {
    "resolution": "the latent size, so every weight's shape and the cache",
    "unet_preset": "the U-Net's layers and widths",
    "text_encoder": "the caption embeddings the U-Net attends to",
    "max_tokens": "the caption embeddings the U-Net attends to",
    "autoencoder": "the latent space the U-Net denoises",
    "autoencoder_subfolder": "the latent space the U-Net denoises",
    "prediction_type": "what the U-Net's output means",
    "beta_schedule": "the noise levels the U-Net was trained on",
    "num_train_timesteps": "the timesteps the U-Net was trained on",
    "seed": "the data order and noise streams a resume continues",
}
# where the run is, not what it does
IGNORED_FIELDS = ("run_name", "outputs_dir")


class IncompatibleResumeError(ValueError):
    """The current config changes a setting the checkpoint's weights depend on."""


def config_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """{field: (checkpoint value, current value)} for every field that differs (new fields count as changed)."""
    return {k: (saved.get(k), v) for k, v in current.items()
            if k not in IGNORED_FIELDS and (k not in saved or saved[k] != v)}


def check_resume(checkpoint, saved: dict | None, cfg, verbose: bool = True) -> dict[str, tuple]:
    """Refuse a resume that changes a SHAPE_FIELDS setting; return (and, if verbose, print) the allowed changes.

    `saved`: the checkpoint's config (helpers.checkpoint.checkpoint_config), None for old checkpoints; a field
    renamed since it was written is compared under its current name (helpers.config.RENAMED)."""
    if saved is None:
        if verbose:
            print(f"{checkpoint}: written before checkpoints stored their config; cannot tell what changed since")
        return {}
    saved = renamed(saved)
    current = json.loads(cfg.to_json())
    changes = config_changes(saved, current)
    refused = {k: v for k, v in changes.items() if k in SHAPE_FIELDS and k in saved}
    if refused:
        lines = [f"{k}: {old!r} -> {new!r} changes {SHAPE_FIELDS[k]}" for k, (old, new) in refused.items()]
        raise IncompatibleResumeError(
            f"Cannot resume {checkpoint} with a changed {', '.join(refused)}:\n  " + "\n  ".join(lines) +
            "\nSet it back, start a new run (another run_name), or train with resume=False "
            "(the old checkpoints are moved aside)")
    allowed = {k: v for k, v in changes.items() if k not in SHAPE_FIELDS}
    if allowed and verbose:
        shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in allowed.items())
        print(f"Resuming with changed settings (they take effect from step {checkpoint_step(checkpoint)}): {shown}")
    return allowed


def retarget_optimizer(optimizer, lr_scheduler, lr: float, weight_decay: float | None = None) -> list[float]:
    """After loading optimizer + LR-scheduler state: make `lr` the schedule's peak from the current step on.

    The schedule's position (last_epoch) is kept; its multiplier now scales the new peak. With an
    unchanged lr this reproduces exactly the value the loaded state held. Returns the new current lrs."""
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
    lr_scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    # LambdaLR (every diffusers schedule) computes base_lr * lambda(step); its state never holds the lambdas
    lrs = [base * fn(lr_scheduler.last_epoch) for base, fn in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas)]
    for group, value in zip(optimizer.param_groups, lrs):
        group["lr"] = value
    lr_scheduler._last_lr = list(lrs)
    return lrs
