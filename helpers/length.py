"""How long a run trains: two ways to say one length, which one counts, and the steps they come to.

`max_steps` / `max_epochs` and `warmup_steps` / `warmup_fraction` are pairs of LENGTH_PAIRS; `cfg` is a
helpers.config.RunConfig (not imported: RunConfig.replace applies the rule, so this module sits below it)."""
from __future__ import annotations

import dataclasses

# (a count, the share that replaces it while > 0): two ways to say one length. The share wins when both are in
# a config; so a count the user sets turns the share off, and setting both at once is an error.
LENGTH_PAIRS = (("max_steps", "max_epochs"), ("warmup_steps", "warmup_fraction"))


def apply_length_rule(cfg, overrides: dict) -> dict:
    """`overrides` with the share of a pair set to 0 where the user set its count: the value set wins.

    Both fields of a pair set (the share non-zero) is a ValueError naming both."""
    overrides = dict(overrides)
    for count, share in LENGTH_PAIRS:
        if count not in overrides:
            continue
        if share in overrides and _is_number(overrides[share]) and overrides[share] != 0:
            raise ValueError(f"{count}={overrides[count]!r} and {share}={overrides[share]!r} both set the "
                             f"{_LENGTH_WORDS[count]}: set only one ({share}=0 makes {count} count)")
        if share not in overrides and getattr(cfg, share) > 0:
            overrides[share] = type(getattr(cfg, share))(0)
            print(f"{count}={overrides[count]!r} is set, so it replaces {share}={getattr(cfg, share)!r} "
                  f"({share} -> 0): the value you set wins")
    return overrides


_LENGTH_WORDS = {"max_steps": "training length", "warmup_steps": "learning-rate warm-up"}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def total_steps(cfg, num_train_images: int, num_processes: int = 1) -> int:
    """Optimizer steps of the run: cfg.max_steps, or cfg.max_epochs passes over `num_train_images`.

    An epoch is one pass over the training images, as the training stream's seeded permutation is:
    a flip is drawn at random per use, so flipped copies do not make an epoch longer. The last,
    partial step is counted (ceil), so every image is seen max_epochs times.
    """
    if cfg.max_epochs < 0:
        raise ValueError(f"max_epochs={cfg.max_epochs!r} must be 0 (use max_steps) or a number of epochs")
    if cfg.max_epochs == 0:
        return cfg.max_steps
    if num_train_images < 1:
        raise ValueError(f"max_epochs={cfg.max_epochs} needs training images, got num_train_images={num_train_images}")
    images_per_step = cfg.batch_size * cfg.grad_accum * num_processes
    return -(-cfg.max_epochs * num_train_images // images_per_step)


def warmup_steps_for(cfg, steps: int) -> int:
    """Learning-rate warm-up steps of a `steps`-step run: cfg.warmup_fraction of it, or cfg.warmup_steps."""
    if not 0.0 <= cfg.warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction={cfg.warmup_fraction!r} must be in [0, 1) (0 = use warmup_steps)")
    return round(cfg.warmup_fraction * steps) if cfg.warmup_fraction > 0 else cfg.warmup_steps


def resolve_length(cfg, num_train_images: int, num_processes: int = 1) -> tuple[object, str]:
    """(cfg with max_steps and warmup_steps as step counts, max_epochs and warmup_fraction 0; one line saying
    how many steps and where they came from). Not the user's rule: the config stays as the user set it elsewhere."""
    steps = total_steps(cfg, num_train_images, num_processes)
    if cfg.max_epochs > 0:
        per_step = cfg.batch_size * cfg.grad_accum * num_processes
        epochs = f"{cfg.max_epochs} epoch{'s' if cfg.max_epochs > 1 else ''}"
        length = (f"{steps:,} steps = {epochs} × {num_train_images:,} images / {per_step} per step, rounded up "
                  f"(max_epochs {_origin(cfg, 'max_epochs')})")
    else:
        length = f"max_steps {steps:,} ({_origin(cfg, 'max_steps')})"
    warmup = warmup_steps_for(cfg, steps)
    if cfg.warmup_fraction > 0:
        length += (f"; warm-up {warmup:,} steps = {cfg.warmup_fraction * 100:g} % of them "
                   f"(warmup_fraction {_origin(cfg, 'warmup_fraction')})")
    else:
        length += f"; warm-up {warmup:,} steps ({_origin(cfg, 'warmup_steps')})"
    return dataclasses.replace(cfg, max_steps=steps, max_epochs=0, warmup_steps=warmup, warmup_fraction=0.0), length


def _origin(cfg, name: str) -> str:
    """'set by you', 'of the <profile> profile' when the value is the profile's own, or the time budget's plan."""
    if name == "max_steps" and cfg.time_budget_hours > 0:  # helpers.fit planned it (never longer than configured)
        return f"planned for time_budget_hours={cfg.time_budget_hours:g}"
    return f"of the {cfg.profile} profile" if getattr(cfg, name) == cfg.profile_value(name) else "set by you"
