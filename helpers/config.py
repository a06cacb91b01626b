"""The run config: one typed field per setting, each with its check, and the named profiles on top of it.

A run's folder (helpers.run_folder) keeps one as config.json; the length rule of its pairs of fields is
helpers.length's. Unknown fields and bad values are errors that say what is wrong.

`python -m helpers.config --profile hw6` prints what a profile changes from the defaults, and why.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .checks import (
    at_least,
    ema_length_list,
    ema_length_or_zero,
    finite_at_least,
    folder_name,
    fraction,
    guidance_list,
    guide_list,
    interval_list,
    not_empty,
    one_of,
    samplers,
    share,
    sigma_interval,
    sigma_rel_list,
    stage_list,
    step_list,
    unet_presets,
)
from .length import apply_length_rule
from .values import as_bool

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(p: str | Path) -> Path:
    """A config path (relative to the project root, as every path of a RunConfig is) made absolute."""
    p = Path(p)
    return p if p.is_absolute() else PROJECT_ROOT / p


# ---------------------------------------------------------------- what each field may hold

# diffusers.optimization.SchedulerType's values (a test keeps them in step; importing diffusers here costs 5 s)
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                "piecewise_constant")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")  # helpers.precision.MODES (a test keeps them in step)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


def _checked(default, check=None):
    """A field with its check declared beside it: check(value) -> what is wrong, or None. A list default is copied
    for each config; a field without a check only has its type checked."""
    metadata = {"check": check} if check else {}
    if isinstance(default, list):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Everything that decides what a run does, grouped by stage in the order the notebooks use it.

    One flat namespace (papermill's `-p name=value`); paths are relative to the project root. The defaults are the
    demo's (but for its objective) and the test profile `tiny`'s; what each profile changes, and why:
    `python -m helpers.config --profile NAME`, README "Where the hw6 defaults come from" and docs/design.md."""

    # ---- the run
    # a key of PROFILES: demo | hw6 | sd-baseline | tiny
    profile: str = _checked("demo", one_of(lambda: sorted(PROFILES)))
    run_name: str = _checked("demo", folder_name)  # the folder <outputs_dir>/runs/<run_name>
    outputs_dir: str = _checked("outputs", not_empty)  # runs and caches (<outputs_dir>/cache) live here
    # every random draw of the run (split, init, data stream, sampling seeds) follows from it
    seed: int = _checked(0, at_least(0))

    # ---- data (01_data)
    data_dir: str = "data/demo"  # train_info.json, train/, test.json in the course's format ...
    manifest: str = ""  # ... or a JSONL manifest of {"image", "caption"} rows instead
    resolution: int = _checked(16, at_least(1))  # images are resized to this square size before encoding
    val_fraction: float = _checked(0.1, fraction())  # share of monsters (groups) held out for validation
    # share of captions replaced by "" so one model learns CFG's unconditional score
    caption_dropout: float = _checked(0.1, fraction())
    max_images: int = _checked(0, at_least(0))  # 0 = all; >0 keeps the first N training images (quick trials)
    crop_to_content: bool = False  # crop sprites to their non-white box before padding (helpers.images)
    hflip: bool = False  # random mirroring; off: sprites face one way, and a mirrored attack reads as another action

    # ---- frozen parts (01_data)
    text_encoder: str = _checked("minilm", not_empty)  # minilm | tiny | a CLIP id or path | any HF text-encoder id
    max_tokens: int = _checked(32, at_least(1))  # captions are padded/truncated to this many tokens (CLIP: 77)
    autoencoder: str = _checked("identity", not_empty)  # identity (pixel space) | tiny | an AutoencoderKL id or path
    autoencoder_subfolder: str = ""  # e.g. "vae" for CompVis/stable-diffusion-v1-4

    # ---- model (02_unet_arch)
    # tiny | demo | hw6-base | hw6-large | hw6-recipe (helpers.unet.PRESETS)
    unet_preset: str = _checked("demo", one_of(unet_presets))

    # ---- diffusion (03_train_cfg)
    num_train_timesteps: int = _checked(1000, at_least(1))
    # cosine: tiny's (the demo's flow_prediction uses no betas); hw6 trains the recipe's linear betas, sd-baseline
    # samples SD's scaled_linear
    # linear | scaled_linear | squaredcos_cap_v2 | sigmoid
    beta_schedule: str = _checked("squaredcos_cap_v2", one_of(lambda: BETA_SCHEDULES))
    # The default is for the cosine schedule above, as the tiny test runs and their samplers use it: v, since on that
    # schedule an epsilon model's first step divides its error by sqrt(alpha_bar(T)) ~ 5e-5. The demo trains
    # flow_prediction instead (it beat v at equal training), hw6 the recipe's epsilon on linear betas.
    # epsilon | v_prediction | flow_prediction (rectified flow)
    prediction_type: str = _checked("v_prediction", one_of(lambda: ("epsilon", "v_prediction", "flow_prediction")))
    # Min-SNR loss weighting (Hang et al. 2023) of v / epsilon; 0 = off (demo's flow, hw6's recipe)
    min_snr_gamma: float = _checked(5.0, finite_at_least(0.0))
    # flow_prediction's draw of t: uniform | logit_normal (SD3's best)
    timestep_density: str = _checked("logit_normal", one_of(lambda: ("uniform", "logit_normal")))
    # logit_normal: t = sigmoid(N(logit_mean, logit_std)); > 0 trains noisier t more
    logit_mean: float = _checked(0.0, finite_at_least(-math.inf))
    logit_std: float = _checked(1.0, finite_at_least(0.0, above=True))
    immiscible_noise: bool = False  # pair each batch's images with noise by least total distance (Li et al. 2024)
    # per-channel offset added to the noise: lets the model shift whole-image brightness
    offset_noise: float = _checked(0.0, finite_at_least(0.0))

    # ---- training (03_train_cfg)
    max_steps: int = _checked(900, at_least(1))  # demo: ~7 min on 2 CPU cores (README)
    # >0: this many passes over the training images instead of max_steps (setting max_steps -> 0)
    max_epochs: int = _checked(0, at_least(0))
    batch_size: int = _checked(64, at_least(1))
    grad_accum: int = _checked(1, at_least(1))
    lr: float = _checked(1e-3, finite_at_least(0.0, above=True))
    lr_schedule: str = _checked("cosine", one_of(lambda: LR_SCHEDULES))  # any name diffusers' get_scheduler knows
    warmup_steps: int = _checked(50, at_least(0))
    # >0: this share of the steps instead of warmup_steps (setting warmup_steps -> 0)
    warmup_fraction: float = _checked(0.0, fraction())
    weight_decay: float = _checked(0.01, finite_at_least(0.0))
    max_grad_norm: float = _checked(1.0, finite_at_least(0.0))

    # ---- fit, precision and time (02/03: helpers.fit, helpers.precision, helpers.session)
    # auto (helpers.precision: by the card and, on a CPU, the use) | no | bf16 | fp16
    mixed_precision: str = _checked("auto", one_of(lambda: MIXED_PRECISION))
    compile: bool = False
    gradient_checkpointing: bool = False
    # forward + backward each batch in this many chunks: same step, less activation memory
    micro_splits: int = _checked(1, at_least(1))
    auto_fit: bool = True  # CUDA: raise micro_splits / turn on checkpointing if the step does not fit (never on CPU)
    # >0: plan max_steps so training, selection and the test set end within this
    time_budget_hours: float = _checked(0.0, finite_at_least(0.0))
    # >0: stop with a checkpoint after this long in one session (Colab/Kaggle: 11.5)
    session_hours: float = _checked(0.0, finite_at_least(0.0))
    # >0: a checkpoint at least this often by the wall clock, besides checkpoint_every
    checkpoint_minutes: float = _checked(0.0, finite_at_least(0.0))

    # ---- checkpoints, snapshots and EMA (03_train_cfg)
    checkpoint_every: int = _checked(200, at_least(1))
    # resumable checkpoints (weights + optimizer) kept; older ones are pruned (0 = all)
    keep_checkpoints: int = _checked(2, at_least(0))
    # EMA U-Net kept every N steps and at max_steps: the selection's candidates, never pruned
    snapshot_every: int = _checked(300, at_least(0))
    # EMA half-life in training images (helpers.diffusion.EMA)
    ema_halflife_images: float = _checked(10_000.0, finite_at_least(0.0, above=True))
    # the half-life ramps up as min(half-life, ema_rampup * images seen); 0 = none
    ema_rampup: float = _checked(0.125, finite_at_least(0.0))
    # the EMA lengths (sigma_rel) of the post-hoc EMA profiles tracked; [] = off
    phema_ema_lengths: list = _checked([0.05, 0.10], sigma_rel_list)
    # store them every N steps (0 = at each snapshot: hw6, tiny); always at snapshots and max_steps
    phema_every: int = _checked(100, at_least(0))
    log_every: int = _checked(10, at_least(1))
    preview_every: int = _checked(200, at_least(0))  # 0 turns previews off

    # ---- sampling (04_sample)
    # helpers.schedulers.SCHEDULERS (Karras sigmas suit SD's schedule, not cosine)
    scheduler: str = _checked("dpm++2m", one_of(samplers))
    sample_steps: int = _checked(20, at_least(1))
    # 0 is unconditional, 1 is plain conditional: unusual but legal
    guidance: float = _checked(3.0, finite_at_least(0.0))
    guidance_rescale: float = _checked(0.0, fraction(top_included=True))
    # guide only where sigma in (lo, hi]; [] = all (hw6 and sd-baseline: the interval was measured on the demo only)
    guidance_interval: list = _checked([0.3, 5.0], sigma_interval)
    guide: str = ""  # autoguidance: a snapshot name ("first", "step-000300") to steer away from; "" = none
    guide_weight: float = _checked(1.0, finite_at_least(0.0))  # autoguidance weight (1 = off)
    # the EMA length (sigma_rel) of a post-hoc EMA rebuild of the snapshot (0 = its stored half-life EMA)
    ema_length: float = _checked(0.0, ema_length_or_zero)
    sample_batch_size: int = _checked(64, at_least(1))
    use_ema: bool = True
    output_size: int = _checked(256, at_least(1))  # the course wants 256x256 PNGs

    # ---- selection (04_sample): every snapshot x guidance_sweep x sweep_steps x ... on sweep_prompts prompts
    guidance_sweep: list = _checked([1.0, 2.0, 3.0], guidance_list)
    sweep_steps: list = _checked([10, 20], step_list)
    sweep_intervals: list = _checked([[0.3, 5.0]], interval_list)  # e.g. [[], [0.3, 5.0]]: try both
    sweep_prompts: int = _checked(0, at_least(0))  # a fixed seeded subset of the test prompts (0 = all)
    # at most this many snapshots, spread evenly, the last always included (0 = all)
    sweep_snapshots: int = _checked(3, at_least(0))
    # post-hoc EMA lengths (0 = the half-life EMA); the demo adds 0.05, hw6 0.025 and 0.07
    sweep_ema_lengths: list = _checked([0.0], ema_length_list)
    sweep_guides: list = _checked([""], guide_list)  # guides ("" = none), tried at weights != 1
    sweep_guide_weights: list = _checked([1.0], guidance_list)
    sweep_stage_prompts: list = _checked([24, 80], stage_list)  # staged: screening sizes ([] = full sweep)
    # the best share of cells that moves on to the next stage (helpers.staged)
    sweep_keep: float = _checked(0.33, share)
    # > 0: 04 drops cells (older snapshots, costlier cells first) to fit; says which
    select_budget_hours: float = _checked(0.0, finite_at_least(0.0))

    # ---- evaluation (05_eval)
    clip_model: str = _checked("openai/clip-vit-base-patch32", not_empty)
    eval_max_images: int = _checked(0, at_least(0))  # 0 = the whole validation split / test set

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
        """Check every field's type, then its declared check; one error lists every problem by field."""
        problems = []
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default) if f.default is not dataclasses.MISSING else list
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                problems.append(f"{f.name}={value!r} should be a {kind.__name__}")
        typed = {p.split("=")[0] for p in problems}
        for f in fields(self):
            problem = None if f.name in typed else field_problem(f.name, getattr(self, f.name))
            if problem:
                problems.append(f"{f.name}={getattr(self, f.name)!r} {problem}")
        problems += [] if problems else pair_problems(self)
        if problems:
            raise ValueError("Bad run config:\n  " + "\n  ".join(problems))
        return self

    def replace(self, **overrides) -> "RunConfig":
        """A copy with `overrides` applied; None values mean 'keep' (papermill's unset parameters).

        The values given here are the user's: for the pairs of helpers.length.LENGTH_PAIRS the one set here wins
        (see apply_length_rule). Profiles and internal resolution use `dataclasses.replace`, not this."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        check_fields(overrides)
        overrides = {k: as_bool(v, k) if isinstance(getattr(self, k), bool) else v for k, v in overrides.items()}
        overrides = apply_length_rule(self, overrides)
        return dataclasses.replace(self, **overrides).validate()

    def profile_value(self, name: str):
        """What this config's profile sets `name` to (the default where the profile leaves it)."""
        return PROFILES.get(self.profile, {}).get(name, field_default(name))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)


def _field(name: str) -> dataclasses.Field:
    return next(f for f in fields(RunConfig) if f.name == name)


def field_default(name: str):
    f = _field(name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def field_problem(name: str, value) -> str | None:
    """What is wrong with `value` for field `name` by the check declared with it (None: nothing it checks)."""
    check = _field(name).metadata.get("check")
    return check(value) if check else None


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


# Fields renamed since: a config.json or checkpoint config written before the rename still loads (`renamed`).
RENAMED = {"phema_sigma_rels": "phema_ema_lengths"}
# Names people bring from diffusers' example scripts (and the old names above), mapped to ours for the error message.
ALIASES = {"learning_rate": "lr", "train_batch_size": "batch_size", "num_train_steps": "max_steps",
           "max_train_steps": "max_steps", "guidance_scale": "guidance", "num_inference_steps": "sample_steps",
           "gradient_accumulation_steps": "grad_accum", "snr_gamma": "min_snr_gamma", **RENAMED}


def renamed(values: dict) -> dict:
    """Stored config values (a run's config.json, a checkpoint's) with each RENAMED field under its current name;
    where both names are stored the current one wins."""
    if not isinstance(values, dict):  # not a config: left for the caller to refuse
        return values
    return {RENAMED.get(k, k): v for k, v in values.items() if RENAMED.get(k) not in values}


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


def _why(reason: str, **values) -> dict:
    """Profile values declared with the reason they are set: {field: (value, reason)}."""
    return {name: (value, reason) for name, value in values.items()}


_RECIPE = "the best public course result's recipe (README \"Where the hw6 defaults come from\")"
_SD = "Stable Diffusion v1.4's own part or setting: the baseline samples the pretrained pipeline as it was trained"
_TINY = "the test suite's run: a few seconds on a CPU"

# Each profile is a set of overrides on the defaults above, each declared once with why it is set.
_PROFILE_VALUES: dict[str, dict] = {
    "demo": {
        # measured (benchmarks/RESULTS.md, 240 prompts, 3 seed sets): accuracy unchanged; autoguidance by an early
        # snapshot raised the FD, so the demo sweeps EMA lengths only
        **_why("post-hoc EMA 0.05 lowered the demo's probe FD by 2.3 +- 0.2 (benchmarks/RESULTS.md)",
               sweep_ema_lengths=[0.0, 0.05]),
        **_why("rectified flow with logit-normal(0, 1) t beat v-prediction at equal training (3 seeds, "
               "benchmarks/RESULTS.md \"Training objectives on the demo\")", prediction_type="flow_prediction"),
        **_why("Min-SNR weights epsilon / v losses; flow's timestep_density does the weighting", min_snr_gamma=0.0),
    },
    # The best public course result (FID 59.70, CLIP-I 0.8276, CLIP-T 0.3008); README "Where the hw6 defaults
    # come from" says which values are that recipe's and which are ours.
    "hw6": {
        **_why("the course's data", data_dir="data/hw6"),
        **_why(_RECIPE, resolution=256, crop_to_content=True, unet_preset="hw6-recipe", caption_dropout=0.05,
               lr=2e-4, lr_schedule="cosine", warmup_fraction=0.05, batch_size=64, max_epochs=60, max_grad_norm=1.0),
        **_why("the recipe's text encoder, CLIP ViT-B/32 (77 tokens)", text_encoder="openai/clip-vit-base-patch32",
               max_tokens=77),
        **_why("the recipe trains in SD v1.4's VAE latents (4x32x32 at 256 px)",
               autoencoder="CompVis/stable-diffusion-v1-4", autoencoder_subfolder="vae"),
        # diffusers' DDPMScheduler default: linear betas 1e-4 ... 0.02 over 1,000 steps
        **_why("the recipe: epsilon on diffusers' DDPM default, linear betas over 1,000 steps, no Min-SNR",
               prediction_type="epsilon", beta_schedule="linear", num_train_timesteps=1000, min_snr_gamma=0.0),
        **_why("the recipe's EMA: 0.998 per step at 64 images (ln 0.5 / ln 0.998 = 346 steps)",
               ema_halflife_images=22_150),
        # used when you set max_steps / warmup_steps (which turns max_epochs / warmup_fraction off)
        **_why("fallbacks, used only when you set them (which turns max_epochs / warmup_fraction off)",
               max_steps=40_000, warmup_steps=2_000),
        **_why("a long run: fewer checkpoints, previews and log lines", checkpoint_every=2000, preview_every=1000,
               log_every=50),
        **_why("2,000 steps are about an hour on a T4: an ended session loses at most 30 min", checkpoint_minutes=30),
        **_why("each EMA snapshot of hw6-recipe is 1.2 GB (fp32) and snapshots are never pruned", snapshot_every=4000),
        # 2 x 0.59 GB (fp16) per snapshot, ~12 GB over 60 epochs; every 2000 steps would halve the reconstruction's
        # profile error at sigma_rel 0.025 (8.6 % -> 3.4 %) for twice that
        **_why("post-hoc EMA stores only with the snapshots: 2 x 0.59 GB each, ~12 GB over 60 epochs", phema_every=0),
        **_why("the recipe's sampler: DPM-Solver++ 2M, 15 steps, guidance 3", scheduler="dpm++2m", sample_steps=15,
               guidance=3.0, sample_batch_size=64),
        **_why("around the recipe's best guidance (2 -> FID 63.4, 3 -> 59.7, 4 -> 60.6)",
               guidance_sweep=[1.0, 2.0, 3.0, 4.0, 5.0]),
        # FID of 2,048-d Inception features is biased at small N in a way that favours low-diversity (high-guidance)
        # settings, so every one of the 1,063 prompts is scored
        **_why("the leaderboard's terms: FID on all 1,063 prompts, steps around the recipe's 15", sweep_prompts=0,
               sweep_steps=[10, 15, 20]),
        **_why("the recipe guides every step; the demo's interval is untried here", guidance_interval=[],
               sweep_intervals=[[]]),
        # EDM2-S's best lengths are 0.025 with CFG and 0.070 with autoguidance; the guide is the first snapshot
        # (~1/9 of training; the paper's default is ~1/16)
        **_why("EDM2's best EMA lengths (untried on hw6)", sweep_ema_lengths=[0.0, 0.025, 0.07]),
        **_why("autoguidance by the first snapshot at weight 2 (EDM2; untried on hw6)", sweep_guides=["", "first"],
               sweep_guide_weights=[2.0]),
        # 225 cells x 48 prompts, the best 45 x 192, the best 9 x all 1,063: with the test set 15 % of training's FLOP
        # (20 % if the costliest cells move on); the full sweep is 136 % (helpers.selection_cost)
        **_why("staged selection: with the test set 15 % of training's FLOP, against 136 % for the full sweep",
               sweep_stage_prompts=[48, 192], sweep_keep=0.2),
    },
    "sd-baseline": {
        **_why("the course's data", data_dir="data/hw6"),
        **_why(_SD, resolution=256, text_encoder="CompVis/stable-diffusion-v1-4", max_tokens=77,
               autoencoder="CompVis/stable-diffusion-v1-4", autoencoder_subfolder="vae",
               beta_schedule="scaled_linear", prediction_type="epsilon", pipeline="CompVis/stable-diffusion-v1-4"),
        **_why("SD's usual sampling: guidance 7.5, 25 steps, Karras sigmas (which suit its schedule)", guidance=7.5,
               scheduler="dpm++2m-karras", sample_steps=25),
        **_why("guide every step, as SD's pipeline does", guidance_interval=[], sweep_intervals=[[]]),
    },
    "tiny": {
        **_why("generated test data at 16 px in pixel space", data_dir="data/tiny", resolution=16,
               autoencoder="identity"),
        **_why("a random 2-layer text encoder: no download", text_encoder="tiny", max_tokens=16),
        **_why(_TINY, unet_preset="tiny", max_steps=4, batch_size=8, warmup_steps=1, log_every=1, sample_steps=3,
               sample_batch_size=8, guidance_sweep=[1.0, 3.0], output_size=32, sweep_steps=[2, 3], sweep_prompts=0),
        **_why("every writer runs within 4 steps: checkpoints, snapshots, previews, post-hoc EMA stores",
               checkpoint_every=2, preview_every=4, snapshot_every=2, sweep_snapshots=2, phema_every=0),
    },
}
PROFILES: dict[str, dict] = {p: {k: v for k, (v, _) in values.items()} for p, values in _PROFILE_VALUES.items()}
REASONS: dict[str, dict] = {p: {k: why for k, (_, why) in values.items()} for p, values in _PROFILE_VALUES.items()}


def profile_config(profile: str, **overrides) -> RunConfig:
    """The profile's config with the user's `overrides` on top (which win over the profile's, LENGTH_PAIRS too)."""
    if profile not in PROFILES:
        raise ValueError(f"Unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    # the profile sets both fields of a pair (hw6: max_epochs and its fallback max_steps): not the user's rule
    base = dataclasses.replace(RunConfig(profile=profile, run_name=profile), **PROFILES[profile]).validate()
    return base.replace(**overrides)


def profile_changes(profile: str) -> list[str]:
    """One line per field the profile sets to other than the default, in field order: name, default -> value, why."""
    sets = PROFILES[profile]
    return [f"{f.name}: {field_default(f.name)!r} -> {sets[f.name]!r}  ({REASONS[profile][f.name]})"
            for f in fields(RunConfig) if f.name in sets and sets[f.name] != field_default(f.name)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.config",
                                     description="What a profile changes from RunConfig's defaults, and why.")
    parser.add_argument("--profile", required=True, choices=sorted(PROFILES))
    args = parser.parse_args(argv)
    print("\n".join(profile_changes(args.profile)))


if __name__ == "__main__":
    main()
