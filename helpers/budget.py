"""The whole job's time budget (`time_budget_hours`): one plan for training, choosing a setting and the test set.

- Before step 1 (helpers.fit measures a step), `plan_budget` reserves what 04 will take (`after_training`: its
  imports, the judge's set-up, loading each candidate's weights, the staged sweep, the grids and the test set, each
  sampling counted in U-Net forwards of the batch sizes 04 will use, timed in the *sampling* precision on this
  device) and fits training's steps and saves into the rest. The budget's clock starts with `train()`: the set-up
  before the plan counts.
- At the end of warm-up, `Replan` makes the plan again, once, from the run's own steps: a step measured before step 1
  runs slower than the run's (a CPU speeds up over its first tens of steps), and until warm-up ends the learning rate
  does not depend on the total. The warm-up keeps its length; the cosine decay follows the new total.
- `budget.json` in the run folder keeps the plan, its correction and each session's training seconds. 04 gives the
  staged sweep what the whole budget leaves after training as it went and the rest of 04 (`sweep_budget_hours`).
"""
from __future__ import annotations

import functools
import io
import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from time import perf_counter

import torch

from .config import RunConfig
from .files import atomic_write_json
from .fit import StepCost, duration, fit_run, free_memory
from .length import total_steps, warmup_steps_for
from .step import unet_for_cache

DISK_BYTES_PER_S = 100e6  # assumed write speed for checkpoint/snapshot cost (Colab/Kaggle local disks: 100-200 MB/s)
BUDGET_MARGIN = 0.05  # share of the time budget kept free for measurement noise
PREVIEW_PROMPTS = 8  # helpers.previews.Previewer's grid
GRID_PROMPTS, GRID_GUIDANCES, GRID_STEPS = 4, (1.0, 3.0, 7.5), (10, 25)  # notebook 04's grid defaults
PLAN_FIELDS = ("max_steps", "max_epochs", "snapshot_every", "warmup_steps", "warmup_fraction")  # what a plan sets




@dataclass
class BudgetPlan:
    steps: int
    configured_steps: int
    epochs: float
    seconds: float  # training's estimated wall time from train()'s start: set-up, steps and saves
    overhead_s: float  # of which checkpoints, snapshots, previews and the final save (estimated)
    end: datetime
    snapshot_every: int
    images_per_s: float
    after_training_s: float = 0.0  # reserved for what follows training: choosing a setting and the test set
    after_training: str = ""  # how that reserve was estimated, one line
    parts: dict | None = None  # the reserve's parts, seconds each (sweep, test_set, judge, loads, grids)


def save_seconds(cfg: RunConfig, param_bytes: int, images_per_s: float, processes: int = 1) -> dict:
    """Estimated seconds of one checkpoint, snapshot, preview grid and final save (what training does besides steps).

    Writes at DISK_BYTES_PER_S: a checkpoint holds weights, EMA and AdamW's two moments (4x the weights), a
    snapshot the EMA (1x), the final model/ both U-Nets (2x). A preview samples PREVIEW_PROMPTS prompts with CFG
    (2 forwards per step) on the main process, a forward costing about a third of a training step."""
    forwards_per_s = 3 * images_per_s / processes
    return dict(checkpoint=4 * param_bytes / DISK_BYTES_PER_S, snapshot=param_bytes / DISK_BYTES_PER_S,
                preview=2 * PREVIEW_PROMPTS * cfg.sample_steps / forwards_per_s,
                final=2 * param_bytes / DISK_BYTES_PER_S)


def plan_budget(cfg: RunConfig, images_per_s: float, num_train_images: int, param_bytes: int, processes: int = 1,
                now: datetime | None = None, after_training=None, done: int = 0, spent_s: float = 0.0) -> BudgetPlan:
    """The longest run (at most the configured one) whose steps and saves, and then the selection and the test set,
    end within cfg.time_budget_hours.

    `images_per_s`: the measured speed of the whole run (all processes). `after_training(n_snapshots)`: (seconds, one
    line, parts) that selection and the test set will take, reserved before training is planned (None: nothing).
    `done` steps were trained in `spent_s` seconds since train() started (the set-up included). The snapshot interval
    keeps the configured run's number of snapshots; the LR schedule follows max_steps."""
    configured = total_steps(cfg, num_train_images, processes)
    images_per_step = cfg.batch_size * cfg.grad_accum * processes
    cost = save_seconds(cfg, param_bytes, images_per_s, processes)
    snapshots = max(1, configured // cfg.snapshot_every) if cfg.snapshot_every > 0 else 0
    per_step = (images_per_step / images_per_s + cost["checkpoint"] / cfg.checkpoint_every
                + (cost["preview"] / cfg.preview_every if cfg.preview_every > 0 else 0.0))
    once = (cost["final"] + cost["checkpoint"] + snapshots * cost["snapshot"]  # the last step's saves, all snapshots
            + (cost["preview"] if cfg.preview_every > 0 else 0.0))
    after_s, after, parts = after_training(snapshots + 1) if after_training else (0.0, "", None)
    budget = cfg.time_budget_hours * 3600 * (1 - BUDGET_MARGIN) - after_s - spent_s
    fitting = done + math.floor((budget - once) / per_step)
    if done == 0 and fitting < 1:  # before step 1 the user can still choose; mid-run the run ends with its saves
        need = (spent_s + once + per_step + after_s) / 3600 / (1 - BUDGET_MARGIN)
        raise DoesNotFitBudgetError(
            f"time_budget_hours={cfg.time_budget_hours} is too short for one step and the saves on this device "
            f"(measured {images_per_s:.3g} images/s)" + (f" after reserving {duration(after_s)} for selection and the "
                                                         f"test set" if after_s else "")
            + f": at least {need:.3g} hours are needed")
    steps = max(done + 1, min(configured, fitting))  # a correction past the budget: one more step, then the end
    snapshot_every = max(1, -(-steps // snapshots)) if snapshots and steps < configured else cfg.snapshot_every
    seconds = spent_s + (steps - done) * per_step + once
    now = now or datetime.now().astimezone()
    return BudgetPlan(steps, configured, steps * images_per_step / num_train_images, seconds,
                      (steps - done) * (per_step - images_per_step / images_per_s) + once,
                      now + timedelta(seconds=seconds - spent_s), snapshot_every, images_per_s, after_s, after, parts)


class DoesNotFitBudgetError(RuntimeError):
    """The time budget cannot hold one step (one line for the user: a shorter run or more hours)."""


def describe_budget(cfg: RunConfig, plan: BudgetPlan) -> str:
    length = ("the configured run fits" if plan.steps == plan.configured_steps
              else f"shortened from the configured {plan.configured_steps:,} steps")
    after = (f"\n  then {plan.after_training}: the whole job ends about "
             f"{plan.end + timedelta(seconds=plan.after_training_s):%Y-%m-%d %H:%M %Z}" if plan.after_training else "")
    return (f"time budget {cfg.time_budget_hours:g} h at {plan.images_per_s:.1f} images/s: "
            f"training {plan.steps:,} steps ({length}), {plan.epochs:.2f} epochs, snapshots every "
            f"{plan.snapshot_every:,} steps; estimated {duration(plan.seconds)} incl. {duration(plan.overhead_s)} of "
            f"checkpoints/snapshots/previews, ending about {plan.end:%Y-%m-%d %H:%M %Z}{after}")


def keep_plan(cfg: RunConfig, resumed: dict, verbose: bool) -> RunConfig:
    """A resume of a budgeted run trains the plan its first session stored (in the checkpoint's config)."""
    if not resumed.get("time_budget_hours"):
        if verbose:
            print(f"time_budget_hours={cfg.time_budget_hours:g} is ignored: this run started without a budget, and a "
                  f"resume does not re-plan (max_steps stays {cfg.max_steps:,}; resume=False plans a new run)")
        return cfg
    plan = {k: resumed[k] for k in PLAN_FIELDS if k in resumed}
    if verbose:
        print(f"time budget: resuming the plan made in the first session ({plan.get('max_steps', cfg.max_steps):,} "
              f"steps); to change the length, set time_budget_hours=0 and max_steps")
    return cfg.replace(**plan) if any(getattr(cfg, k) != v for k, v in plan.items()) else cfg


def plan_changes(cfg: RunConfig, plan: BudgetPlan, done: int = 0) -> dict:
    """The config fields a plan sets. The warm-up is pinned in steps, so a correction at its end leaves it whole."""
    return dict(max_steps=plan.steps, max_epochs=0, snapshot_every=plan.snapshot_every,
                warmup_steps=warmup_steps_for(cfg, cfg.max_steps if done else plan.steps), warmup_fraction=0.0)


def elapsed(began: float | None) -> float:
    """Seconds since `began` (perf_counter() when train() started; None: 0)."""
    return perf_counter() - began if began is not None else 0.0


def plan_run(cfg: RunConfig, cache, data, rows, accelerator, resumed: dict | None, began: float):
    """Before step 1: (the config to train, what Replan needs or None). auto_fit (helpers.fit), then the time budget:
    a new budgeted run is planned from its measured step and 04's measured reserve (printed, recorded in budget.json);
    a resume keeps the plan stored in its checkpoint's config (`resumed`)."""
    main = accelerator.is_main_process
    if cfg.time_budget_hours > 0 and resumed is not None:
        cfg = keep_plan(cfg, resumed, main)
    budgeted = cfg.time_budget_hours > 0 and resumed is None
    cfg, cost = fit_run(cfg, cache, data, rows, accelerator, measure=budgeted)
    if not budgeted:
        return cfg, None
    plan, reserve = plan_the_hours(cfg, cache, cost, len(rows), accelerator, began)
    changes = plan_changes(cfg, plan)
    if accelerator.num_processes > 1:  # every process trains the main process's plan
        from accelerate.utils import broadcast_object_list

        plan, changes = broadcast_object_list([(plan, changes)])[0]
    if main:
        print(describe_budget(cfg, plan) + "\n  The plan is corrected once at the end of warm-up, from the run's own "
              "steps; it is kept in config.json and budget.json, and a resume keeps it")
        write_record(cfg, **plan_record(cfg, plan, first_plan=plan_record(cfg, plan)))
    return cfg.replace(**changes), (cfg, reserve, cost.param_bytes)


def plan_the_hours(cfg: RunConfig, cache, cost: StepCost, n_images: int, accelerator, began: float | None):
    """(the plan, its reserve for 04): 04's work measured on a fresh U-Net, then the steps that fit the rest."""
    device = accelerator.device
    unet = unet_for_cache(cfg, cache).to(device).eval()
    try:
        reserve = after_training(cfg, cache, unet, device)
    finally:
        del unet
        free_memory(device)
    plan = plan_budget(cfg, cost.images_per_s * accelerator.num_processes, n_images, cost.param_bytes,
                       accelerator.num_processes, after_training=reserve, spent_s=elapsed(began))
    return plan, reserve


# ---------------------------------------------------------------- what 04 will take


def forward_seconds(cfg: RunConfig, unet, cache, device, rows: set[int], repeats: int = 3) -> dict[int, float]:
    """Seconds of one U-Net forward of each row count in `rows` (a batch of prompts, 2 rows each on a guided step) in
    the sampling precision on `device`: the median of `repeats` timed forwards after one that picks the kernels.
    Timed at exactly the sizes 04 will sample (a forward of 24 rows costs more than 24/128 of one of 128)."""
    from .precision import decide

    precision = decide(cfg.mixed_precision, device, use="sample")
    c, size = cache.mean.shape[2], cache.mean.shape[-1]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = {}
    with torch.no_grad(), precision.autocast(device):
        for n in sorted(rows):
            x = torch.randn(n, c, size, size, device=device)
            text = cache.embeddings[:1].to(device, torch.float32).expand(n, *cache.embeddings.shape[1:]).contiguous()
            t = torch.full((n,), 500, device=device)
            times = []
            for _ in range(repeats + 1):
                start = perf_counter()
                unet(x, t, encoder_hidden_states=text)
                sync()
                times.append(perf_counter() - start)
            seconds[n] = sorted(times[1:])[repeats // 2]
    return seconds


def batches(prompts: int, batch: int) -> list[int]:
    """The batch sizes helpers.sample.sample_images draws `prompts` images in."""
    return [batch] * (prompts // batch) + ([prompts % batch] if prompts % batch else [])


def sampling_seconds(guided: int, total: int, autoguided: bool, prompts: int, batch: int,
                     forward: dict[int, float]) -> float:
    """Seconds to sample `prompts` images of a setting that guides `guided` of its `total` steps, in batches of
    `batch`: one forward per step, of twice the batch on a guided (CFG) step, plus the guide's on every step when
    `autoguided` (forward: seconds by rows, from forward_seconds)."""
    return sum(guided * forward[2 * n] + (total - guided + (total if autoguided else 0)) * forward[n]
               for n in batches(prompts, batch))


def png_seconds(size: int) -> float:
    """Seconds to encode one `size`² RGB PNG of a smooth picture (the test set writes one per prompt)."""
    from PIL import Image

    ramp = torch.linspace(0, 255, size).to(torch.uint8)
    picture = Image.fromarray(torch.stack([ramp.expand(size, size), ramp[:, None].expand(size, size),
                                           (ramp.flip(0)).expand(size, size)], -1).numpy())
    start = perf_counter()
    picture.save(io.BytesIO(), format="PNG")
    return perf_counter() - start


def start_seconds(cfg: RunConfig, device) -> float:
    """Starting 04: its imports (`import_seconds`) and loading the frozen parts it samples with (text encoder,
    autoencoder), timed here, once, then let go."""
    from .hub import WeightsUnavailableError
    from .model import load_frozen_parts

    start = perf_counter()
    try:
        parts = load_frozen_parts(cfg, device)
    except WeightsUnavailableError:  # not here (a cache made elsewhere): 04 will say so; training goes on
        return import_seconds(cfg)
    seconds = perf_counter() - start
    del parts
    return seconds + import_seconds(cfg)


IMPORTS_04 = ("import torch, diffusers, transformers, matplotlib.pyplot; from diffusers import UNet2DConditionModel; "
              "import helpers.choose, helpers.judges, helpers.grids")


def import_seconds(cfg: RunConfig) -> float:
    """Seconds a fresh Python takes to import what 04 works with (torch, diffusers' U-Net, transformers: 5-10 s on
    2 CPU cores), timed once per environment in a child process and kept in <outputs_dir>/cache/import_seconds.json;
    0 where it cannot be timed."""
    import subprocess
    import sys
    from pathlib import Path

    import diffusers

    key = f"{sys.executable} torch {torch.__version__} diffusers {diffusers.__version__}"
    path = cfg.cache_dir / "import_seconds.json"
    try:
        known = json.loads(path.read_text())
        if known.get("environment") == key:
            return float(known["seconds"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    code = f"import time; t = time.perf_counter(); {IMPORTS_04}; print(time.perf_counter() - t)"
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, timeout=300, check=True)
        seconds = float(done.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"environment": key, "seconds": seconds})
    return seconds


def judge_seconds(cfg: RunConfig) -> float:
    """The demo judge's set-up: training its probe (helpers.probe, cached per dataset and settings); 0 where the
    data has no attributes (the course judge loads pretrained weights: seconds, not counted)."""
    if not (cfg.data_path / "attributes.json").exists():
        return 0.0
    from .probe import probe_seconds

    return probe_seconds(cfg.data_path, resolution=cfg.resolution, cache_dir=cfg.cache_dir, seed=cfg.seed,
                         crop_to_content=cfg.crop_to_content)


def after_training(cfg: RunConfig, cache, unet, device):
    """plan_budget's reserve for a run of `cfg` on `cache`: n_snapshots -> (seconds, one line, parts) that 04 will
    take: the staged sweep (each stage's cells at the sweep's average cost), the test set, the grids at 04's defaults,
    starting (imports, the frozen parts) and loading each candidate's weights, and the demo's probe. Every sampling
    cost is counted in U-Net forwards of the batch sizes 04 will use, timed here (`forward_seconds`)."""
    from .data import load_prompts
    from .sample import guided_steps
    from .schedulers import schedulers_for
    from .selection_cost import sd_vae_decode_gflop, selection_cost, unet_gflop
    from .setting import Setting
    from .staged import train_scheduler_config

    test_json = cfg.data_path / "test.json"
    if not test_json.exists():
        return lambda n_snapshots: (0.0, f"nothing reserved: no {test_json} to choose for", {})
    n_test, batch = len(load_prompts(test_json)), cfg.sample_batch_size
    c, size = cache.mean.shape[2], cache.mean.shape[-1]  # [N, 2 (mirrored), C, h, w]
    schedule, base = train_scheduler_config(cfg), Setting.from_config(cfg)
    stages = selection_cost(cfg, 1, n_test).plan.sizes  # the stage sizes do not depend on the snapshots
    new = [n - (stages[k - 1] if k else 0) for k, n in enumerate(stages)]
    rows = {r for n in [*new, n_test, GRID_PROMPTS] for b in batches(n, batch) for r in (b, 2 * b)}
    forward = forward_seconds(cfg, unet, cache, device, rows)
    gflop = unet_gflop(cfg, c, size, cache.embeddings.shape[-1])
    decode = (sd_vae_decode_gflop(size) / gflop if cfg.autoencoder != "identity" else 0.0)  # in U-Net evaluations
    decode_s = decode * forward[max(forward)] / max(forward)  # per image, at the largest batch's speed
    per_png, probe, start = png_seconds(cfg.output_size), judge_seconds(cfg), start_seconds(cfg, device)
    param_bytes = sum(p.numel() * 4 for p in unet.parameters())
    steps = functools.lru_cache(maxsize=None)(lambda s: (*guided_steps(schedule, s), s.autoguided))

    def sample_s(setting, prompts: int) -> float:
        return sampling_seconds(*steps(setting), prompts, batch, forward)

    grid_settings = [base.replace(guidance=g, steps=s) for g in GRID_GUIDANCES for s in GRID_STEPS]
    grids = sum(sample_s(s, GRID_PROMPTS) for s in grid_settings + [base.replace(scheduler=name)
                                                                     for name in schedulers_for(schedule)])
    test_set = sample_s(base, n_test) + n_test * (decode_s + per_png)

    def reserve(n_snapshots: int) -> tuple[float, str, dict]:
        cost = selection_cost(cfg, n_snapshots, n_test)
        plan = cost.plan
        # which cells move on is not known before: each stage at the average cell
        per_cell = [sum(sample_s(s, n) for s in plan.settings) / len(plan.settings) for n in new]
        sweep = sum(count * (seconds + n * decode_s) for count, seconds, n in zip(plan.counts, per_cell, new))
        weights = len({(s.snapshot, s.ema_length) for s in plan.settings}) + 1  # + the test set's, reloaded
        parts = dict(sweep=sweep, test_set=test_set, grids=grids,
                     loads=weights * 3 * param_bytes / DISK_BYTES_PER_S + start, judge=probe)
        total = sum(parts.values())
        return total, (f"04 ≈ {duration(total)}: selection {duration(parts['sweep'])} ({len(plan.settings)} "
                       f"cells staged over {plan.sizes} prompts, {cost.selection_images:,} images), test set "
                       f"{duration(parts['test_set'])} ({cost.test_images:,} images), grids, start, loads and judge "
                       f"{duration(parts['grids'] + parts['loads'] + parts['judge'])}"), parts
    return reserve


# ---------------------------------------------------------------- the record, the correction, 04's share


def write_record(cfg: RunConfig, **fields) -> dict:
    """Merge `fields` into the run's budget.json (the plan, its correction, sessions): the main process only."""
    path = cfg.layout.budget
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(fields)
    atomic_write_json(path, record)
    return record


def read_record(cfg: RunConfig) -> dict:
    path = cfg.layout.budget
    return json.loads(path.read_text()) if path.exists() else {}


def plan_record(cfg: RunConfig, plan: BudgetPlan, **more) -> dict:
    fields = asdict(plan)
    fields["end"] = plan.end.isoformat()
    return dict(time_budget_hours=cfg.time_budget_hours, **fields, **more)


class Replan:
    """Corrects a budgeted new run's plan once, at the end of warm-up, from the speed of its own timed steps (the
    later half of warm-up: its first steps are the slowest)."""

    def __init__(self, given: RunConfig, reserve, param_bytes: int, planned: RunConfig, num_train_images: int,
                 processes: int, began: float):
        self.given, self.reserve, self.param_bytes = given, reserve, param_bytes  # the config as the user set it
        self.num_train_images, self.processes, self.began = num_train_images, processes, began
        self.at, self.marks = warmup_steps_for(planned, planned.max_steps), []

    def due(self, done: int, busy: float) -> bool:
        """Note a log flush (`done` steps in `busy` timed seconds); True once, at the first flush past warm-up."""
        self.marks.append((done, busy))
        if self.at is None or done < max(self.at, 2):
            return False
        self.at = None
        return True

    def speed(self, images_per_step: int) -> float:
        """images/s over the later half of the steps so far (from the first log flush at or past the middle)."""
        done, busy = self.marks[-1]
        half = [m for m in self.marks[:-1] if m[0] >= done / 2] or [(0, 0.0)]
        return (done - half[0][0]) * images_per_step / max(busy - half[0][1], 1e-9)

    def plan(self, cfg: RunConfig, done: int, images_per_step: int) -> tuple[BudgetPlan, dict]:
        """The plan made again at step `done` of `cfg` (the planned config) from the run's speed and elapsed time."""
        plan = plan_budget(self.given, self.speed(images_per_step), self.num_train_images, self.param_bytes,
                           self.processes, after_training=self.reserve, done=done, spent_s=elapsed(self.began))
        return plan, plan_changes(cfg, plan, done)

    def report(self, cfg: RunConfig, plan: BudgetPlan, before: int, done: int) -> None:
        """Say what the correction changed, and record it in budget.json."""
        change = "unchanged" if plan.steps == before else f"{before:,} -> {plan.steps:,} steps"
        print(f"time budget corrected at step {done} (end of warm-up) from the run's own speed, "
              f"{plan.images_per_s:.1f} images/s: {change}. " + describe_budget(cfg, plan))
        write_record(cfg, **plan_record(cfg, plan, corrected_at=done))


def retarget_schedule(cfg: RunConfig, optimizer, done: int):
    """A new LR schedule for cfg's (corrected) total, at step `done`, the optimizer's lrs set to it."""
    from diffusers.optimization import get_scheduler

    schedule = get_scheduler(cfg.lr_schedule, optimizer=optimizer, num_warmup_steps=warmup_steps_for(cfg, cfg.max_steps),
                             num_training_steps=cfg.max_steps)
    schedule.last_epoch = done
    lrs = [base * fn(done) for base, fn in zip(schedule.base_lrs, schedule.lr_lambdas)]
    for group, value in zip(optimizer.param_groups, lrs):
        group["lr"] = value
    schedule._last_lr = list(lrs)
    return schedule


def record_session(cfg: RunConfig, first: int, last: int, seconds: float) -> None:
    """Add this session's training wall time to budget.json (a budgeted run only)."""
    record = read_record(cfg)
    if record:
        sessions = record.get("sessions", []) + [dict(steps=[first, last], seconds=round(seconds, 2))]
        write_record(cfg, sessions=sessions)


def sweep_budget_hours(cfg: RunConfig) -> tuple[float, str]:
    """(hours for 04's staged sweep, why): select_budget_hours when set; else, for a budgeted run, what the whole
    job's budget leaves for it after training as it went and the rest of 04 as planned (0: no limit)."""
    if cfg.select_budget_hours > 0:
        return cfg.select_budget_hours, f"select_budget_hours={cfg.select_budget_hours:g}"
    record = read_record(cfg)
    if not record.get("parts"):
        return 0.0, ""
    trained = sum(s["seconds"] for s in record.get("sessions", []))
    rest = record["after_training_s"] - record["parts"]["sweep"]
    left = max(record["time_budget_hours"] * 3600 * (1 - BUDGET_MARGIN) - trained - rest, 1.0)
    fits = "it fits" if left >= record["parts"]["sweep"] else "cells are dropped to fit"
    return left / 3600, (f"time_budget_hours={record['time_budget_hours']:g}: training took {duration(trained)} "
                         f"(planned {duration(record['seconds'])}), so the sweep may take {duration(left)} of the "
                         f"{duration(record['parts']['sweep'])} planned: {fits}")
