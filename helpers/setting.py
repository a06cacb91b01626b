"""A `Setting`: everything besides the prompt and the seed that decides a sampled image.

It is the one sampling spec: `sample_images`, the training previews, the panel, the selection sweep and the
test set all take one, and `results/manifest.json` records one. Which weights (`snapshot`), how hard to guide
(`guidance`, `guidance_rescale`), where to guide (`guidance_interval`) and how to step (`steps`, `scheduler`);
which length of weight average (`ema_length`, post-hoc EMA) and which worse network to steer away from (`guide`,
`guide_weight`, autoguidance).
Any value the sampler can use is legal here; the panel's slider ranges are the panel's business.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

MAX_SIGMA_REL = math.sqrt(1 / 12)  # the widest power-function EMA (helpers.phema): a plain running mean

FINAL = "model"  # the snapshot name of <run>/model/unet_ema: the EMA U-Net at the end of training
EVERY_STEP = ()  # the guidance_interval that guides at every step
NO_GUIDE = ""  # the guide of a setting without autoguidance
FIRST_SNAPSHOT = "first"  # in a sweep's guides: the run's earliest snapshot, whatever snapshot_every named it


@dataclass(frozen=True)
class Setting:
    snapshot: str = FINAL  # a folder under <run>/snapshots/ ("step-000900"), or FINAL
    guidance: float = 3.0  # classifier-free guidance weight: 1 = the plain conditional model
    steps: int = 20
    scheduler: str = "dpm++2m"  # a key of helpers.schedulers.SCHEDULERS
    guidance_interval: tuple = EVERY_STEP  # (sigma_lo, sigma_hi): guide only where sigma is in (lo, hi]
    guidance_rescale: float = 0.0  # Lin et al. 2023: pull the guided prediction's std back towards the conditional
    # autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"): steer away from the
    # U-Net of snapshot `guide` ("" = none) with weight guide_weight (1 = off); helpers.sample states the formula
    guide: str = NO_GUIDE
    guide_weight: float = 1.0
    # the EMA length (EDM2's sigma_rel) of a post-hoc EMA of the snapshot reconstructed from the stored profiles
    # (helpers.phema),
    # 0 = the snapshot's own half-life EMA
    ema_length: float = 0.0

    def __post_init__(self):
        # one spelling per value, so that equal settings give equal records (3 and 3.0, [] and ())
        for name in ("guidance", "guidance_rescale", "guide_weight", "ema_length"):
            if _number(getattr(self, name)):
                object.__setattr__(self, name, float(getattr(self, name)))
        if isinstance(self.steps, float) and self.steps.is_integer():
            object.__setattr__(self, "steps", int(self.steps))
        interval = self.guidance_interval
        if isinstance(interval, (list, tuple)):
            object.__setattr__(self, "guidance_interval", tuple(float(s) if _number(s) else s for s in interval))

    def label(self) -> str:
        """One line naming every field, e.g. for a caption or a log."""
        lo_hi = self.guidance_interval
        where = f"guided for σ∈({lo_hi[0]:g}, {lo_hi[1]:g}]" if lo_hi else "guided every step"
        rescale = f", rescale {self.guidance_rescale:g}" if self.guidance_rescale else ""
        ema = f" (EMA length {self.ema_length:g})" if self.ema_length else ""
        guide = f", autoguided by {self.guide} × {self.guide_weight:g}" if self.autoguided else ""
        return (f"{self.snapshot}{ema}, guidance {self.guidance:g}{rescale}{guide}, {self.steps} {self.scheduler} "
                f"steps, {where}")

    @property
    def autoguided(self) -> bool:
        """Whether sampling calls a guide network: a guide is named and its weight is not 1."""
        return bool(self.guide) and self.guide_weight != 1.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "guidance_interval": list(self.guidance_interval)}

    @classmethod
    def from_dict(cls, d, where: str = "setting") -> "Setting":
        """A Setting from its dict (a manifest, a sweep record); ValueError naming `where` and the bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object with the setting's fields, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, 1)
            raise ValueError(f"{where}: unknown field {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        try:
            setting = cls(**{**d, "guidance_interval": d.get("guidance_interval") or ()})
        except TypeError as e:
            raise ValueError(f"{where}: {e}") from None
        problems = setting.problems()
        if problems:
            raise ValueError(f"{where}: {'; '.join(problems)}")
        return setting

    @classmethod
    def from_config(cls, cfg, snapshot: str = FINAL) -> "Setting":
        """The run config's sampling fields: what is used before any selection."""
        return cls(snapshot, float(cfg.guidance), int(cfg.sample_steps), cfg.scheduler,
                   tuple(float(s) for s in cfg.guidance_interval), float(cfg.guidance_rescale), cfg.guide,
                   float(cfg.guide_weight), float(cfg.ema_length))

    def replace(self, **overrides) -> "Setting":
        """A copy with `overrides` applied; None keeps the current value (papermill's unset parameters)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def problems(self) -> list[str]:
        """Every value the sampler cannot use, one message each (empty: fine)."""
        from .schedulers import SCHEDULERS

        problems = []
        if not isinstance(self.snapshot, str) or not self.snapshot.strip():
            problems.append(f"snapshot={self.snapshot!r} should be a snapshot name such as 'step-000900' or {FINAL!r}")
        for name in ("snapshot", "guide"):  # names a user passes never lead outside the run
            value = getattr(self, name)
            if isinstance(value, str) and ("/" in value or "\\" in value or ".." in value):
                problems.append(f"{name}={value!r} should be a snapshot name of this run such as 'step-000900' or "
                                f"{FINAL!r}, without path separators or '..'")
        if not _number(self.guidance) or self.guidance < 0:
            problems.append(f"guidance={self.guidance!r} should be a finite number >= 0")
        if not _number(self.guidance_rescale) or not 0 <= self.guidance_rescale <= 1:
            problems.append(f"guidance_rescale={self.guidance_rescale!r} should be in [0, 1]")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            problems.append(f"steps={self.steps!r} should be a whole number >= 1")
        if self.scheduler not in SCHEDULERS:
            close = difflib.get_close_matches(str(self.scheduler), list(SCHEDULERS), 1)
            problems.append(f"scheduler={self.scheduler!r} is not one of {', '.join(SCHEDULERS)}"
                            + (f" (did you mean {close[0]!r}?)" if close else ""))
        if not isinstance(self.guide, str):
            problems.append(f"guide={self.guide!r} should be a snapshot name such as 'step-000300', or '' for none")
        if not _number(self.guide_weight) or self.guide_weight < 0:
            problems.append(f"guide_weight={self.guide_weight!r} should be a finite number >= 0 (1 = no autoguidance)")
        if not _number(self.ema_length) or not (self.ema_length == 0 or 0 < self.ema_length < MAX_SIGMA_REL):
            problems.append(f"ema_length={self.ema_length!r} should be 0 (the snapshot's half-life EMA) or a "
                            f"post-hoc EMA length sigma_rel in (0, {MAX_SIGMA_REL:.4f})")
        interval = self.guidance_interval
        if not isinstance(interval, tuple) or interval and not (
                len(interval) == 2 and all(map(_number, interval)) and 0 <= interval[0] < interval[1]):
            shown = list(interval) if isinstance(interval, tuple) else interval
            problems.append(f"guidance_interval={shown!r} should be [] (every step) or "
                            "[sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi")
        return problems

    def checked(self) -> "Setting":
        problems = self.problems()
        if problems:
            raise ValueError("Bad sampling setting: " + "; ".join(problems))
        return self


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
