"""One typed run config, a few named profiles, and the run folder it lives in.

A run is a folder `outputs/runs/<run_name>/` holding `config.json`. The first notebook that opens a
run creates it from a profile; later notebooks read it back and apply their own papermill
parameters on top. Unknown fields and bad values are errors that say what is wrong.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .files import atomic_write_text, read_json

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunConfig:
    """Everything that decides what a run does, grouped by stage in the order the notebooks use it.

    One flat namespace (papermill's `-p name=value`); paths are relative to the project root. Why each default is
    what it is: README "Configuration" and docs/design.md."""

    # ---- the run
    profile: str = "demo"  # a key of PROFILES: demo | hw6 | sd-baseline | tiny
    run_name: str = "demo"  # the folder <outputs_dir>/runs/<run_name>
    outputs_dir: str = "outputs"  # runs and caches (<outputs_dir>/cache) live here
    seed: int = 0  # every random draw of the run (split, init, data stream, sampling seeds) follows from it

    # ---- data (01_data)
    data_dir: str = "data/demo"  # train_info.json, train/, test.json in the course's format ...
    manifest: str = ""  # ... or a JSONL manifest of {"image", "caption"} rows instead
    resolution: int = 16  # images are resized to this square size before encoding
    val_fraction: float = 0.1  # share of monsters (groups) held out for validation
    caption_dropout: float = 0.1  # share of captions replaced by "" so one model learns CFG's unconditional score
    max_images: int = 0  # 0 = all; >0 keeps the first N training images (quick trials)
    crop_to_content: bool = False  # crop sprites to their non-white box before padding (helpers.images)
    hflip: bool = False  # random mirroring; off: sprites face one way, and a mirrored attack reads as another action

    # ---- frozen parts (01_data)
    text_encoder: str = "minilm"  # minilm | tiny | a CLIP id or path | any HF text-encoder id
    max_tokens: int = 32  # captions are padded/truncated to this many tokens (CLIP: 77)
    autoencoder: str = "identity"  # identity (pixel space) | tiny | an AutoencoderKL id or path
    autoencoder_subfolder: str = ""  # e.g. "vae" for CompVis/stable-diffusion-v1-4

    # ---- model (02_unet_arch)
    unet_preset: str = "demo"  # tiny | demo | hw6-base | hw6-large | hw6-recipe (helpers.unet.PRESETS)

    # ---- diffusion (03_train_cfg)
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # linear | scaled_linear | squaredcos_cap_v2 | sigmoid
    # v: on the cosine schedule an epsilon model's first step divides its error by sqrt(alpha_bar(T)) ~ 5e-5
    prediction_type: str = "v_prediction"  # epsilon | v_prediction | flow_prediction (rectified flow)
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023); 0 = off; epsilon / v only (flow: 0)
    timestep_density: str = "logit_normal"  # flow_prediction's draw of t: uniform | logit_normal (SD3's best)
    logit_mean: float = 0.0  # logit_normal: t = sigmoid(N(logit_mean, logit_std)); > 0 trains noisier t more
    logit_std: float = 1.0
    immiscible_noise: bool = False  # pair each batch's images with noise by least total distance (Li et al. 2024)
    offset_noise: float = 0.0  # per-channel offset added to the noise: lets the model shift whole-image brightness

    # ---- training (03_train_cfg)
    max_steps: int = 900  # demo: ~7 min on 2 CPU cores (README)
    max_epochs: int = 0  # >0: this many passes over the training images instead of max_steps (setting max_steps -> 0)
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # any name diffusers' get_scheduler knows
    warmup_steps: int = 50
    warmup_fraction: float = 0.0  # >0: this share of the steps instead of warmup_steps (setting warmup_steps -> 0)
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0

    # ---- fit, precision and time (02/03: helpers.fit, helpers.precision, helpers.session)
    mixed_precision: str = "auto"  # auto (helpers.precision: by the card and, on a CPU, the use) | no | bf16 | fp16
    compile: bool = False
    gradient_checkpointing: bool = False
    micro_splits: int = 1  # forward + backward each batch in this many chunks: same step, less activation memory
    auto_fit: bool = True  # CUDA: raise micro_splits / turn on checkpointing if the step does not fit (never on CPU)
    time_budget_hours: float = 0.0  # >0: plan max_steps so training, selection and the test set end within this
    session_hours: float = 0.0  # >0: stop with a checkpoint after this long in one session (Colab/Kaggle: 11.5)
    checkpoint_minutes: float = 0.0  # >0: a checkpoint at least this often by the wall clock, besides checkpoint_every

    # ---- checkpoints, snapshots and EMA (03_train_cfg)
    checkpoint_every: int = 200
    keep_checkpoints: int = 2  # resumable checkpoints (weights + optimizer) kept; older ones are pruned (0 = all)
    snapshot_every: int = 300  # EMA U-Net kept every N steps and at max_steps: the selection's candidates, never pruned
    ema_halflife_images: float = 10_000.0  # EMA half-life in training images (helpers.diffusion.EMA)
    ema_rampup: float = 0.125  # the half-life ramps up as min(half-life, ema_rampup * images seen)
    phema_sigma_rels: list = field(default_factory=lambda: [0.05, 0.10])  # post-hoc EMA profiles tracked; [] = off
    phema_every: int = 100  # store them every N steps (0 = at each snapshot); always at snapshots and max_steps
    log_every: int = 10
    preview_every: int = 200  # 0 turns previews off

    # ---- sampling (04_sample)
    scheduler: str = "dpm++2m"  # helpers.schedulers.SCHEDULERS (Karras sigmas suit SD's schedule, not cosine)
    sample_steps: int = 20
    guidance: float = 3.0
    guidance_rescale: float = 0.0
    guidance_interval: list = field(default_factory=lambda: [0.3, 5.0])  # guide only where sigma in (lo, hi]; [] = all
    guide: str = ""  # autoguidance: a snapshot name ("first", "step-000300") to steer away from; "" = none
    guide_weight: float = 1.0  # autoguidance weight (1 = off)
    ema_length: float = 0.0  # sigma_rel of a post-hoc EMA rebuild of the snapshot (0 = its stored half-life EMA)
    sample_batch_size: int = 64
    use_ema: bool = True
    output_size: int = 256  # the course wants 256x256 PNGs

    # ---- selection (04_sample): every snapshot x guidance_sweep x sweep_steps x ... on sweep_prompts prompts
    guidance_sweep: list = field(default_factory=lambda: [1.0, 2.0, 3.0])
    sweep_steps: list = field(default_factory=lambda: [10, 20])
    sweep_intervals: list = field(default_factory=lambda: [[0.3, 5.0]])  # e.g. [[], [0.3, 5.0]]: try both
    sweep_prompts: int = 0  # a fixed seeded subset of the test prompts (0 = all)
    sweep_snapshots: int = 3  # at most this many snapshots, spread evenly, the last always included (0 = all)
    sweep_ema_lengths: list = field(default_factory=lambda: [0.0])  # post-hoc EMA lengths (0 = the half-life EMA)
    sweep_guides: list = field(default_factory=lambda: [""])  # guides ("" = none), tried at weights != 1
    sweep_guide_weights: list = field(default_factory=lambda: [1.0])
    sweep_stage_prompts: list = field(default_factory=lambda: [24, 80])  # staged: screening sizes ([] = full sweep)
    sweep_keep: float = 0.33  # the best share of cells that moves on to the next stage (helpers.staged)
    select_budget_hours: float = 0.0  # > 0: 04 drops cells (older snapshots, costlier cells first) to fit; says which

    # ---- evaluation (05_eval)
    clip_model: str = "openai/clip-vit-base-patch32"
    eval_max_images: int = 0  # 0 = the whole validation split / test set

    # ---- a pretrained baseline (sd-baseline)
    sd_model: str = "CompVis/stable-diffusion-v1-4"  # the pretrained pipeline 04_sample can compare with
    pipeline: str = ""  # a pretrained SD pipeline this run samples instead of a U-Net it trains ("" = train one)

    @property
    def run_dir(self) -> Path:
        return resolve_path(self.outputs_dir) / "runs" / self.run_name

    @property
    def layout(self):
        """Every path under the run folder (helpers.layout.RunLayout)."""
        from .layout import RunLayout

        return RunLayout(self.run_dir)

    @property
    def cache_dir(self) -> Path:
        return resolve_path(self.outputs_dir) / "cache"

    @property
    def data_path(self) -> Path:
        return resolve_path(self.data_dir)

    def validate(self) -> "RunConfig":
        """Check every field's type, then its range or choices; one error lists every problem by field."""
        problems = []
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default) if f.default is not dataclasses.MISSING else list
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                problems.append(f"{f.name}={value!r} should be a {kind.__name__}")
        typed = {p.split("=")[0] for p in problems}
        for name, check in FIELD_CHECKS.items():
            if hasattr(self, name) and name not in typed:
                problem = check(getattr(self, name))
                if problem:
                    problems.append(f"{name}={getattr(self, name)!r} {problem}")
        problems += [] if problems else pair_problems(self)
        if problems:
            raise ValueError("Bad run config:\n  " + "\n  ".join(problems))
        return self

    def replace(self, **overrides) -> "RunConfig":
        """A copy with `overrides` applied; None values mean 'keep' (papermill's unset parameters).

        The values given here are the user's: for the pairs of LENGTH_PAIRS the one set here wins (see
        apply_length_rule). Profiles and internal resolution use `dataclasses.replace`, not this."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        check_fields(overrides)
        overrides = {k: as_bool(v, k) if isinstance(getattr(self, k), bool) else v for k, v in overrides.items()}
        overrides = apply_length_rule(self, overrides)
        return dataclasses.replace(self, **overrides).validate()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)


# ---------------------------------------------------------------- what each field may hold

# diffusers.optimization.SchedulerType's values (a test keeps them in step; importing diffusers here costs 5 s)
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                "piecewise_constant")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")  # helpers.precision.MODES (a test keeps them in step)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


def _at_least(low):
    return lambda v: None if v >= low else f"must be at least {low}"


def _finite_at_least(low, above: bool = False):
    def check(v):
        if not math.isfinite(v):
            return "must be a finite number"
        if v < low or (above and v == low):
            return f"must be {'greater than' if above else 'at least'} {low}"
    return check


def _fraction(top_included: bool = False):
    def check(v):
        if not math.isfinite(v) or not (0.0 <= v <= 1.0 if top_included else 0.0 <= v < 1.0):
            return f"must be in [0, 1{']' if top_included else ')'}"
    return check


def _one_of(choices):
    def check(v):
        if v not in choices():
            close = difflib.get_close_matches(str(v), list(choices()), 1)
            return (f"is not one of {', '.join(choices())}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return check


def _not_empty(v):
    return None if v.strip() else "must not be empty"


def _run_name(v):
    if not v.strip() or v in (".", "..") or "/" in v or "\\" in v:
        return "must be a plain folder name (not empty, no '/', '\\' or '..')"


def _guidance_list(v):
    if not v or not all(isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g) and g >= 0
                        for g in v):
        return "must be a non-empty list of finite numbers >= 0"


def _sigma_interval(v):
    if v and not (len(v) == 2 and all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                                      for s in v) and 0 <= v[0] < v[1]):
        return "must be [] or [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi"


def _interval_list(v):
    if not v or not all(isinstance(i, list) and not _sigma_interval(i) for i in v):
        return "must be a non-empty list of [] or [sigma_lo, sigma_hi] items with 0 <= sigma_lo < sigma_hi"


def _sigma_rel_list(v):
    from .setting import MAX_SIGMA_REL

    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < MAX_SIGMA_REL for s in v) \
            or len(set(v)) != len(v):
        return f"must be a list of distinct EMA lengths sigma_rel in (0, {MAX_SIGMA_REL:.4f}) ([] = off)"


def _ema_length(v):
    from .setting import MAX_SIGMA_REL

    if not (v == 0 or 0 < v < MAX_SIGMA_REL):
        return f"must be 0 (the stored half-life EMA) or a post-hoc EMA length sigma_rel in (0, {MAX_SIGMA_REL:.4f})"


def _ema_length_list(v):
    if not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and not _ema_length(x) for x in v):
        return "must be a non-empty list of EMA lengths, each " + _ema_length(-1)[len("must be "):]


def _guide_list(v):
    if not v or not all(isinstance(g, str) for g in v):
        return 'must be a non-empty list of snapshot names ("" = no guide)'


def _step_list(v):
    if not v or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in v):
        return "must be a non-empty list of step counts >= 1"


def _share(v):
    if not (math.isfinite(v) and 0 < v <= 1):
        return "must be a share in (0, 1]: the part of the cells that moves on to the next stage"


def _stage_list(v):
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in v) or v != sorted(set(v)):
        return "must be a list of increasing prompt counts >= 2 ([] = the full sweep)"


def _unet_presets():
    from .unet import PRESETS  # imported here: helpers.unet imports torch

    return list(PRESETS)


def _samplers():
    from .schedulers import SCHEDULERS

    return list(SCHEDULERS)


# Checked by RunConfig.validate after the types; a field without an entry only has its type checked.
FIELD_CHECKS = {
    "profile": _one_of(lambda: sorted(PROFILES)),
    "run_name": _run_name,
    "outputs_dir": _not_empty,
    "seed": _at_least(0),
    "resolution": _at_least(1),
    "val_fraction": _fraction(),
    "caption_dropout": _fraction(),
    "max_images": _at_least(0),
    "max_epochs": _at_least(0),  # 0 = train max_steps
    "warmup_fraction": _fraction(),
    "text_encoder": _not_empty,
    "max_tokens": _at_least(1),
    "autoencoder": _not_empty,
    "unet_preset": _one_of(_unet_presets),
    "max_steps": _at_least(1),
    "batch_size": _at_least(1),
    "grad_accum": _at_least(1),
    "micro_splits": _at_least(1),
    "time_budget_hours": _finite_at_least(0.0),  # 0 = no budget
    "session_hours": _finite_at_least(0.0),  # 0 = no session limit
    "checkpoint_minutes": _finite_at_least(0.0),  # 0 = by steps only
    "lr": _finite_at_least(0.0, above=True),
    "lr_schedule": _one_of(lambda: LR_SCHEDULES),
    "warmup_steps": _at_least(0),
    "weight_decay": _finite_at_least(0.0),
    "max_grad_norm": _finite_at_least(0.0),
    "prediction_type": _one_of(lambda: ("epsilon", "v_prediction", "flow_prediction")),
    "min_snr_gamma": _finite_at_least(0.0),
    "timestep_density": _one_of(lambda: ("uniform", "logit_normal")),
    "logit_mean": _finite_at_least(-math.inf),
    "logit_std": _finite_at_least(0.0, above=True),
    "offset_noise": _finite_at_least(0.0),
    "ema_halflife_images": _finite_at_least(0.0, above=True),
    "ema_rampup": _finite_at_least(0.0),  # 0 = no ramp-up
    "phema_sigma_rels": _sigma_rel_list,
    "phema_every": _at_least(0),  # 0 = at each snapshot
    "mixed_precision": _one_of(lambda: MIXED_PRECISION),
    "checkpoint_every": _at_least(1),
    "keep_checkpoints": _at_least(0),  # 0 keeps them all
    "snapshot_every": _at_least(0),
    "log_every": _at_least(1),
    "preview_every": _at_least(0),  # 0 turns previews off
    "num_train_timesteps": _at_least(1),
    "beta_schedule": _one_of(lambda: BETA_SCHEDULES),
    "scheduler": _one_of(_samplers),
    "sample_steps": _at_least(1),
    "guidance": _finite_at_least(0.0),  # 0 is unconditional, 1 is plain conditional: unusual but legal
    "guidance_rescale": _fraction(top_included=True),
    "guidance_interval": _sigma_interval,
    "guide_weight": _finite_at_least(0.0),
    "ema_length": _ema_length,
    "sample_batch_size": _at_least(1),
    "output_size": _at_least(1),
    "guidance_sweep": _guidance_list,
    "clip_model": _not_empty,
    "eval_max_images": _at_least(0),
    "sweep_steps": _step_list,
    "sweep_intervals": _interval_list,
    "sweep_prompts": _at_least(0),
    "sweep_snapshots": _at_least(0),
    "sweep_ema_lengths": _ema_length_list,
    "sweep_guides": _guide_list,
    "sweep_guide_weights": _guidance_list,
    "sweep_stage_prompts": _stage_list,
    "sweep_keep": _share,
    "select_budget_hours": _finite_at_least(0.0),
}


def flow_problems(cfg: "RunConfig") -> list[str]:
    """What a flow-matching run cannot combine with."""
    if cfg.prediction_type != "flow_prediction":
        return []
    from .schedulers import FLOW_SCHEDULERS

    problems = []
    if cfg.min_snr_gamma:
        problems.append(f"min_snr_gamma={cfg.min_snr_gamma!r} weights epsilon / v_prediction losses: set 0 with "
                        "prediction_type='flow_prediction' (its timestep_density does the weighting)")
    if cfg.scheduler not in FLOW_SCHEDULERS:
        problems.append(f"scheduler={cfg.scheduler!r} cannot sample prediction_type='flow_prediction'; "
                        f"choose one of {', '.join(FLOW_SCHEDULERS)}")
    return problems


def pair_problems(cfg: "RunConfig") -> list[str]:
    """Values each valid alone that do not fit together."""
    problems = []
    if cfg.micro_splits > cfg.batch_size:
        problems.append(f"micro_splits={cfg.micro_splits} is more than batch_size={cfg.batch_size}: each chunk of a "
                        f"batch holds at least one image, so at most {cfg.batch_size} splits (batch_size is per "
                        f"process and micro-batch; grad_accum adds micro-batches)")
    return problems + flow_problems(cfg)


def as_bool(value, name: str) -> bool:
    """A notebook parameter meant as a bool: True/False, 0/1, or the strings true/false/yes/no/on/off/1/0.

    papermill and `-p key=value` hand over `resume=false` as the string "false", which Python counts as true."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ValueError(f"{name}={value!r} should be True or False")


def as_count(value, name: str, minimum: int = 0) -> int:
    """A notebook parameter meant as a whole number >= minimum (papermill may hand over "3" or 3.0)."""
    try:
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number != int(number):
            raise ValueError
    except (ValueError, OverflowError):
        raise ValueError(f"{name}={value!r} should be a whole number >= {minimum}") from None
    if number < minimum:
        raise ValueError(f"{name}={value!r} should be a whole number >= {minimum}")
    return int(number)


def count_argument(minimum: int):
    """An argparse `type` for a whole number >= minimum, whose refusal argparse prints as the message itself."""
    import argparse

    def count(value: str) -> int:
        try:
            return as_count(value, "", minimum)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} should be a whole number >= {minimum}") from None
    return count


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


# Names people bring from diffusers' example scripts, mapped to ours for the error message.
ALIASES = {"learning_rate": "lr", "train_batch_size": "batch_size", "num_train_steps": "max_steps",
           "max_train_steps": "max_steps", "guidance_scale": "guidance", "num_inference_steps": "sample_steps",
           "gradient_accumulation_steps": "grad_accum", "snr_gamma": "min_snr_gamma"}


def check_fields(names) -> None:
    known = [f.name for f in fields(RunConfig)]
    unknown = [n for n in names if n not in known]
    if unknown:
        def hint(n):
            close = [ALIASES[n]] if n in ALIASES else difflib.get_close_matches(n, known, 1)
            return f"{n!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        hints = [hint(n) for n in unknown]
        raise ValueError(f"Unknown config field(s): {', '.join(hints)}. Known fields: {', '.join(known)}")


# Each profile is a set of overrides on the defaults above (which are the demo's, but for its objective).
PROFILES: dict[str, dict] = {
    # measured (benchmarks/RESULTS.md): post-hoc EMA 0.05 lowers the demo's probe FD by 2.3 +- 0.2 (240 prompts, 3 seed
    # sets), accuracy unchanged; autoguidance by an early snapshot raised it, so the demo sweeps EMA lengths only.
    # Rectified flow with SD3's logit-normal(0, 1) t beat v-prediction at equal training (3 seeds, "Training
    # objectives on the demo"); the defaults above keep v, which the tiny test runs and their samplers use
    "demo": dict(sweep_ema_lengths=[0.0, 0.05], prediction_type="flow_prediction", min_snr_gamma=0.0),
    # The best public course result (FID 59.70, CLIP-I 0.8276, CLIP-T 0.3008); README "Where the hw6 defaults
    # come from" says which values are that recipe's and which are ours.
    "hw6": dict(
        data_dir="data/hw6", resolution=256, text_encoder="openai/clip-vit-base-patch32", max_tokens=77,
        autoencoder="CompVis/stable-diffusion-v1-4", autoencoder_subfolder="vae", crop_to_content=True,
        unet_preset="hw6-recipe",
        # diffusers' DDPMScheduler default: linear betas 1e-4 ... 0.02 over 1,000 steps
        prediction_type="epsilon", beta_schedule="linear", num_train_timesteps=1000, min_snr_gamma=0.0,
        caption_dropout=0.05, lr=2e-4, lr_schedule="cosine", warmup_fraction=0.05, batch_size=64,
        max_epochs=60, max_grad_norm=1.0,
        ema_halflife_images=22_150,  # 0.998 per step at 64 images: ln 0.5 / ln 0.998 = 346 steps
        # used when you set max_steps / warmup_steps (which turns max_epochs / warmup_fraction off)
        max_steps=40_000, warmup_steps=2_000,
        checkpoint_every=2000, preview_every=1000, log_every=50,
        checkpoint_minutes=30,  # 2,000 steps are about an hour on a T4: an ended session loses at most 30 min
        snapshot_every=4000,  # each EMA snapshot of hw6-recipe is 1.2 GB (fp32) and snapshots are never pruned
        # post-hoc EMA profiles at each snapshot: 2 x 0.59 GB (fp16) per snapshot, ~12 GB over 60 epochs; every
        # 2000 steps would halve the reconstruction's profile error at sigma_rel 0.025 (8.6 % -> 3.4 %) for twice that
        phema_every=0,
        scheduler="dpm++2m", sample_steps=15, guidance=3.0, sample_batch_size=64,
        guidance_sweep=[1.0, 2.0, 3.0, 4.0, 5.0],  # the recipe: 2 -> FID 63.4, 3 -> 59.7, 4 -> 60.6
        # the leaderboard's terms: FID of 2,048-d Inception features is biased at small N in a way that favours
        # low-diversity (high-guidance) settings, so every one of the 1,063 prompts is scored; 15 = the recipe's
        sweep_prompts=0, sweep_steps=[10, 15, 20],
        guidance_interval=[], sweep_intervals=[[]],  # the recipe guides every step; the demo's interval is untried here
        # post-hoc EMA lengths and autoguidance, untried on hw6 (README): EDM2-S's best lengths are 0.025 with CFG and
        # 0.070 with autoguidance; the guide is the first snapshot (~1/9 of training; the paper's default is ~1/16)
        sweep_ema_lengths=[0.0, 0.025, 0.07], sweep_guides=["", "first"], sweep_guide_weights=[2.0],
        # staged: 225 cells x 48 prompts, the best 45 x 192, the best 9 x all 1,063: with the test set 15 % of
        # training's FLOP (20 % if the costliest cells move on); the full sweep is 136 % (helpers.selection_cost)
        sweep_stage_prompts=[48, 192], sweep_keep=0.2,
    ),
    "sd-baseline": dict(
        data_dir="data/hw6", resolution=256, text_encoder="CompVis/stable-diffusion-v1-4", max_tokens=77,
        autoencoder="CompVis/stable-diffusion-v1-4", autoencoder_subfolder="vae", guidance=7.5,
        scheduler="dpm++2m-karras", sample_steps=25, beta_schedule="scaled_linear", prediction_type="epsilon",
        guidance_interval=[], sweep_intervals=[[]], pipeline="CompVis/stable-diffusion-v1-4",
    ),
    "tiny": dict(
        data_dir="data/tiny", resolution=16, text_encoder="tiny", max_tokens=16, autoencoder="identity",
        unet_preset="tiny", max_steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2, preview_every=4,
        log_every=1, sample_steps=3, sample_batch_size=8, guidance_sweep=[1.0, 3.0], output_size=32,
        snapshot_every=2, sweep_steps=[2, 3], sweep_prompts=0, sweep_snapshots=2, phema_every=0,
    ),
}


def profile_config(profile: str, **overrides) -> RunConfig:
    """The profile's config with the user's `overrides` on top (which win over the profile's, LENGTH_PAIRS too)."""
    if profile not in PROFILES:
        raise ValueError(f"Unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    # the profile sets both fields of a pair (hw6: max_epochs and its fallback max_steps): not the user's rule
    base = dataclasses.replace(RunConfig(profile=profile, run_name=profile), **PROFILES[profile]).validate()
    return base.replace(**overrides)


# (a count, the share that replaces it while > 0): two ways to say one length. The share wins when both are in
# a config; so a count the user sets turns the share off, and setting both at once is an error.
LENGTH_PAIRS = (("max_steps", "max_epochs"), ("warmup_steps", "warmup_fraction"))


def apply_length_rule(cfg: RunConfig, overrides: dict) -> dict:
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


def total_steps(cfg: RunConfig, num_train_images: int, num_processes: int = 1) -> int:
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


def warmup_steps_for(cfg: RunConfig, steps: int) -> int:
    """Learning-rate warm-up steps of a `steps`-step run: cfg.warmup_fraction of it, or cfg.warmup_steps."""
    if not 0.0 <= cfg.warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction={cfg.warmup_fraction!r} must be in [0, 1) (0 = use warmup_steps)")
    return round(cfg.warmup_fraction * steps) if cfg.warmup_fraction > 0 else cfg.warmup_steps


def resolve_length(cfg: RunConfig, num_train_images: int, num_processes: int = 1) -> tuple[RunConfig, str]:
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


def _origin(cfg: RunConfig, name: str) -> str:
    """'set by you', 'of the <profile> profile' when the value is the profile's own, or the time budget's plan."""
    if name == "max_steps" and cfg.time_budget_hours > 0:  # helpers.fit planned it (never longer than configured)
        return f"planned for time_budget_hours={cfg.time_budget_hours:g}"
    default = next(f.default for f in fields(RunConfig) if f.name == name)
    profile_value = PROFILES.get(cfg.profile, {}).get(name, default)
    return f"of the {cfg.profile} profile" if getattr(cfg, name) == profile_value else "set by you"


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"No run config at {path}: run notebooks/01_data.ipynb for this run first")
    values = read_json(path)
    check_fields(values)
    return _where_it_is(RunConfig(**values).validate(), path.parent)


def _where_it_is(cfg: RunConfig, folder: Path) -> RunConfig:
    """A run folder's location wins over the outputs_dir and run_name its config.json remembers.

    A copied or moved run must write into itself, never into the folder it was copied from."""
    if cfg.run_dir.resolve() == folder.resolve():
        return cfg
    if folder.parent.name != "runs":
        raise ValueError(f"{folder}: this run's config.json says it lives in {cfg.run_dir}; a run folder must sit "
                         f"at <outputs_dir>/runs/<run_name>, so move it there (or open it under its outputs_dir)")
    outputs_dir = folder.parent.parent
    print(f"{folder}: config.json remembers outputs_dir={cfg.outputs_dir!r}, run_name={cfg.run_name!r} "
          f"(a copied or moved run); using the folder where it is: outputs_dir={str(outputs_dir)!r}")
    return dataclasses.replace(cfg, outputs_dir=str(outputs_dir), run_name=folder.name)


def save_config(cfg: RunConfig) -> Path:
    return atomic_write_text(cfg.layout.config, cfg.to_json())


def open_run(run_name: str, profile: str | None = None, outputs_dir: str = "outputs", create: bool = True,
             **overrides) -> RunConfig:
    """The config of run `run_name`: read from its folder if it exists, else made from `profile` (with `create`;
    without it a missing run is a FileNotFoundError naming it, and nothing is created).

    Notebook parameters left as None keep the stored value. The result is saved back, so the run
    folder always holds the config that was actually used.
    """
    bad_name = _run_name(run_name) if isinstance(run_name, str) else "must be a string"
    if bad_name:  # before the name is joined to a path
        raise ValueError(f"run_name={run_name!r} {bad_name}")
    path = resolve_path(outputs_dir) / "runs" / run_name / "config.json"
    if not path.exists() and not create:
        runs = sorted(p.parent.name for p in path.parent.parent.glob("*/config.json"))
        raise FileNotFoundError(f"run {run_name!r} does not exist: {path.parent} has no config.json (runs here: "
                                f"{', '.join(runs) or 'none'}); start it with 01_data, or pass profile= to make it")
    if path.exists():
        cfg = load_config(path)
        if profile is not None and profile != cfg.profile:
            raise ValueError(f"Run {run_name!r} was made with profile {cfg.profile!r}, not {profile!r}: "
                             f"pick another run_name or delete {path.parent}")
        changed = {k: v for k, v in overrides.items() if v is not None and getattr(cfg, k, object()) != v}
        cfg = cfg.replace(**overrides)
        if changed:
            print(f"Run {run_name}: updating config.json with {changed}")
    else:
        cfg = profile_config(profile or "demo", run_name=run_name, outputs_dir=str(outputs_dir), **overrides)
    save_config(cfg)
    return cfg


def resolve_path(p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else PROJECT_ROOT / p
