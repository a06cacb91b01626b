"""Fit a training run to a device's memory and to the hours it has, without changing the recipe.

- `measure_step`: a few real training steps (the run's loss, AdamW, EMA, autocast) on a batch drawn from the
  cache: peak memory and images/s. On CUDA the peak is `torch.cuda.max_memory_allocated`. On a CPU no allocator
  keeps a peak, so the figure is computed from the tensors themselves: weights, gradients, AdamW state and EMA as
  allocated, plus the tensors autograd saves for backward in the largest micro-batch (the activations, and the bf16
  copies of the weights under autocast), all counted at once: an upper bound. The process's RSS high-water mark
  would not do: at small batches it is set by the optimizer state, not by the step.
- `plan_fit`: if the configured step does not fit, the smallest micro-batch split and the smallest split with
  gradient checkpointing that fit, each measured; the faster wins. Splitting keeps the images per optimizer step
  and the data stream (helpers.step.split_backward), so results and exact resume do not change.
- `plan_budget`: the steps that end within `time_budget_hours` at the measured speed, with checkpoints,
  snapshots and previews (estimated) included, and the snapshot interval for that length.
- `fit_run`: both, before step 1 of `helpers.train.train` (auto_fit acts on CUDA only; a resume keeps the
  time plan); `measure_run` + `describe`: what notebooks 02 and 03 print before training.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from time import perf_counter

import torch

from .config import RunConfig
from .length import total_steps
from .diffusion import EMA
from .model import training_objective
from .precision import decide
from .step import DeviceCache, data_rows, loss_function, split_backward, step_generator, train_rows, unet_for_cache

FIT_SHARE = 0.95  # a step "fits" when its peak plus one more copy of the weights stays under this share of memory
DISK_BYTES_PER_S = 100e6  # assumed write speed for checkpoint/snapshot cost (Colab/Kaggle local disks: 100-200 MB/s)
BUDGET_MARGIN = 0.05  # share of the time budget kept free for measurement noise
PREVIEW_PROMPTS = 8  # helpers.train.Previewer's grid


class DoesNotFitError(RuntimeError):
    """The configured run fits neither the device's memory in any split nor the time budget: the user's move."""


@dataclass
class StepCost:
    """What one training step costs on a device, measured."""

    batch_size: int
    micro_splits: int
    gradient_checkpointing: bool
    peak_bytes: int
    device_bytes: int
    images_per_s: float
    param_bytes: int  # the U-Net's weights (an EMA copy of this size is made for previews and snapshots)
    device: str
    memory_source: str  # how peak_bytes was measured

    def fits(self) -> bool:
        return self.peak_bytes + self.param_bytes <= FIT_SHARE * self.device_bytes

    def setting(self) -> str:
        return f"micro_splits {self.micro_splits}" + (", gradient checkpointing" if self.gradient_checkpointing else "")


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def on_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def device_memory(device) -> tuple[int, str]:
    """(bytes, name) of the device's memory: what this process may use of the GPU's, or the machine's RAM."""
    if on_cuda(device):
        props = torch.cuda.get_device_properties(device)
        fraction = torch.cuda.get_per_process_memory_fraction(device)  # set_per_process_memory_fraction's cap
        return int(props.total_memory * fraction), props.name + (f" capped to {fraction:.0%}" if fraction < 1 else "")
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), f"CPU ({torch.get_num_threads()} threads)"


def draw_batch(cfg: RunConfig, data: DeviceCache, rows: torch.Tensor) -> tuple:
    """A batch of the configured size from the cache, from a generator of its own (the training stream is untouched)."""
    gen = step_generator(cfg.seed, "fit", device=data.mean.device)
    return data.batch(data_rows(rows, cfg.seed, 0, cfg.batch_size), gen, cfg.caption_dropout, cfg.offset_noise,
                      training_objective(cfg, data.mean.device), cfg.hflip)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def saved_for_backward(exclude: set[int], found: list[int]):
    """Appends to `found` the bytes of every distinct storage autograd saves for backward (minus `exclude`)."""
    seen = set(exclude)

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            found.append(storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def measure_step(cfg: RunConfig, unet, batch: tuple, micro_splits: int = 1, gradient_checkpointing: bool = False,
                 steps: int = 3, warmup: int = 1) -> StepCost:
    """Peak memory and images/s of `warmup + steps` real training steps of `unet` on `batch` (it trains `unet`).

    torch.cuda.OutOfMemoryError propagates (after freeing what the attempt allocated)."""
    device = next(unet.parameters()).device
    unet.enable_gradient_checkpointing() if gradient_checkpointing else unet.disable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-12, fused=on_cuda(device))  # tiny lr: weights barely move
    ema = EMA(unet, cfg.ema_halflife_images, cfg.ema_rampup)
    params = set(p.untyped_storage().data_ptr() for p in unet.parameters())
    saved: list[int] = []

    run_loss = loss_function(training_objective(cfg, device), unet)
    precision = decide(cfg.mixed_precision, device, use="train")

    def loss_of(*chunk):
        hooks = saved_for_backward(params, saved) if not saved and not on_cuda(device) else contextlib.nullcontext()
        with hooks, precision.autocast(device):
            return run_loss(*chunk)

    def step():
        split_backward(loss_of, batch, micro_splits)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(unet, len(batch[0]))

    try:
        if on_cuda(device):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            step()
        sync = (lambda: torch.cuda.synchronize(device)) if on_cuda(device) else (lambda: None)
        sync()
        start = perf_counter()
        for _ in range(steps):
            step()
        sync()
        seconds = max(perf_counter() - start, 1e-9) / steps
        if on_cuda(device):
            peak, source = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
        else:
            states = tensor_bytes(unet.parameters()) * 2 + tensor_bytes(ema.weights)  # weights + gradients + EMA
            states += tensor_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
            peak = states + sum(saved)  # all at once: an upper bound (activations are freed as gradients appear)
            source = "computed upper bound: weights, gradients, AdamW, EMA + tensors saved for backward"
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer, ema
        free_memory(device)
    total, name = device_memory(device)
    return StepCost(len(batch[0]), micro_splits, gradient_checkpointing, peak, total, len(batch[0]) / seconds,
                    tensor_bytes(unet.parameters()), name, source)


def free_memory(device) -> None:
    gc.collect()
    if on_cuda(device):
        torch.cuda.empty_cache()


def plan_fit(batch_size: int, try_step, micro_splits: int = 1, gradient_checkpointing: bool = False):
    """(the cost of the setting to train with, [(setting, what happened)]): the configured one if it fits, else
    the faster of the smallest split without and the smallest with checkpointing that fit.

    `try_step(micro_splits, gradient_checkpointing)` measures one setting (a StepCost) or raises
    torch.cuda.OutOfMemoryError; DoesNotFitError when nothing fits."""
    tried = []

    def attempt(splits, checkpointing):
        try:
            cost = try_step(splits, checkpointing)
        except torch.cuda.OutOfMemoryError:
            cost = None
        if cost is None:  # outside the except: its traceback no longer holds the attempt's tensors
            tried.append((splits, checkpointing, "out of memory"))
            free_memory("cuda" if torch.cuda.is_available() else "cpu")
            return None
        tried.append((splits, checkpointing, f"{gib(cost.peak_bytes)}, {cost.images_per_s:.1f} images/s"
                      + ("" if cost.fits() else " (too close to the device's memory)")))
        return cost if cost.fits() else None

    configured = attempt(micro_splits, gradient_checkpointing)
    if configured:
        return configured, tried
    candidates = []
    for checkpointing, splits in ((gradient_checkpointing, 2 * micro_splits), (True, micro_splits)):
        if checkpointing == gradient_checkpointing and splits == micro_splits:
            continue  # checkpointing was on already: only splitting is left
        while splits <= batch_size:
            cost = attempt(splits, checkpointing)
            if cost:
                candidates.append(cost)
                break
            splits *= 2
    if not candidates:
        raise DoesNotFitError(f"batch_size={batch_size} does not fit this device even in micro-batches of 1 image with "
                           f"gradient checkpointing: lower batch_size (raise grad_accum to keep the images per step) "
                           f"or choose a smaller unet_preset")
    return max(candidates, key=lambda c: c.images_per_s), tried


@dataclass
class BudgetPlan:
    steps: int
    configured_steps: int
    epochs: float
    seconds: float  # the planned run's estimated wall time, overheads included
    overhead_s: float  # of which checkpoints, snapshots, previews and the final save (estimated)
    end: datetime
    snapshot_every: int
    images_per_s: float
    after_training_s: float = 0.0  # reserved for what follows training: choosing a setting and the test set
    after_training: str = ""  # how that reserve was estimated, one line


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
                now: datetime | None = None, after_training=None) -> BudgetPlan:
    """The longest run (at most the configured one) whose steps and saves, and then the selection and the test set,
    end within cfg.time_budget_hours.

    `images_per_s`: the measured speed of the whole run (all processes). `after_training(images_per_s,
    n_snapshots)`: (seconds, one line) that selection and the test set will take, reserved before training is planned
    (None: nothing). The snapshot interval is set so the planned run keeps the configured run's number of snapshots;
    the LR schedule follows max_steps by itself."""
    configured = total_steps(cfg, num_train_images, processes)
    images_per_step = cfg.batch_size * cfg.grad_accum * processes
    cost = save_seconds(cfg, param_bytes, images_per_s, processes)
    snapshots = max(1, configured // cfg.snapshot_every) if cfg.snapshot_every > 0 else 0
    per_step = (images_per_step / images_per_s + cost["checkpoint"] / cfg.checkpoint_every
                + (cost["preview"] / cfg.preview_every if cfg.preview_every > 0 else 0.0))
    once = (cost["final"] + cost["checkpoint"] + snapshots * cost["snapshot"]  # the last step's saves, all snapshots
            + (cost["preview"] if cfg.preview_every > 0 else 0.0))
    after_s, after = after_training(images_per_s, snapshots + 1) if after_training else (0.0, "")
    budget = cfg.time_budget_hours * 3600 * (1 - BUDGET_MARGIN) - after_s
    fitting = math.floor((budget - once) / per_step)
    if fitting < 1:
        need = (once + per_step + after_s) / 3600 / (1 - BUDGET_MARGIN)
        raise DoesNotFitError(f"time_budget_hours={cfg.time_budget_hours} is too short for one step and the saves on "
                              f"this device (measured {images_per_s:.3g} images/s)"
                              + (f" after reserving {duration(after_s)} for selection and the test set" if after_s
                                 else "") + f": at least {need:.3g} hours are needed")
    steps = min(configured, fitting)
    snapshot_every = max(1, -(-steps // snapshots)) if snapshots and steps < configured else cfg.snapshot_every
    seconds = steps * per_step + once
    now = now or datetime.now().astimezone()
    return BudgetPlan(steps, configured, steps * images_per_step / num_train_images, seconds,
                      seconds - steps * images_per_step / images_per_s, now + timedelta(seconds=seconds),
                      snapshot_every, images_per_s, after_s, after)


def describe_budget(cfg: RunConfig, plan: BudgetPlan) -> str:
    length = ("the configured run fits" if plan.steps == plan.configured_steps
              else f"shortened from the configured {plan.configured_steps:,} steps")
    after = (f"\n  then {plan.after_training} (at the training speed; reserved before planning the steps): the whole "
             f"job ends about {plan.end + timedelta(seconds=plan.after_training_s):%Y-%m-%d %H:%M %Z}"
             if plan.after_training else "")
    return (f"time budget {cfg.time_budget_hours:g} h at the measured {plan.images_per_s:.1f} images/s: "
            f"training {plan.steps:,} steps ({length}), {plan.epochs:.2f} epochs, snapshots every "
            f"{plan.snapshot_every:,} steps; estimated {duration(plan.seconds)} incl. {duration(plan.overhead_s)} of "
            f"checkpoints/snapshots/previews, ending about {plan.end:%Y-%m-%d %H:%M %Z}{after}. Stored in config.json; "
            f"a resume keeps this plan")


def probe_step(cfg: RunConfig, cache, data: DeviceCache, rows: torch.Tensor, device, steps: int = 3):
    """try_step for plan_fit: each attempt measures a fresh U-Net (the run's own is built after, untouched)."""
    batch = draw_batch(cfg, data, rows)

    def try_step(splits: int, checkpointing: bool) -> StepCost:
        unet = unet_for_cache(cfg, cache).to(device)
        try:
            return measure_step(cfg, unet, batch, splits, checkpointing, steps=steps)
        finally:
            del unet
            free_memory(device)
    return try_step


def auto_fit_applies(cfg: RunConfig, device) -> bool:
    """auto_fit acts on CUDA only: a CPU run is never changed by it."""
    return cfg.auto_fit and on_cuda(device)


PLAN_FIELDS = ("max_steps", "max_epochs", "snapshot_every")  # what a time budget sets


def keep_plan(cfg: RunConfig, resumed: dict, verbose: bool) -> RunConfig:
    """A resume of a budgeted run trains the plan its first session stored (in the checkpoint's config)."""
    if not resumed.get("time_budget_hours"):
        if verbose:
            print(f"time_budget_hours={cfg.time_budget_hours:g} is ignored: this run started without a budget, and a "
                  f"resume does not re-plan (max_steps stays {cfg.max_steps:,}; resume=False plans a new run)")
        return cfg
    plan = {k: resumed[k] for k in PLAN_FIELDS if k in resumed}
    if verbose:
        print(f"time budget: resuming the plan made before step 1 ({plan.get('max_steps', cfg.max_steps):,} steps); "
              f"to change the length, set time_budget_hours=0 and max_steps")
    return cfg.replace(**plan) if any(getattr(cfg, k) != v for k, v in plan.items()) else cfg


def fit_run(cfg: RunConfig, cache, data: DeviceCache, rows: torch.Tensor, accelerator,
            resumed: dict | None = None, after_training=None) -> RunConfig:
    """cfg with auto_fit's micro_splits/gradient_checkpointing (CUDA) and the time budget's plan, printed; cfg
    itself when nothing applies (a CPU run without a budget measures nothing).

    `resumed`: the config stored in the checkpoint a resume starts from (None: a new run, which plans its budget);
    `after_training(cfg, cache)`: plan_budget's reserve for selection and the test set, made for this run."""
    device, main = accelerator.device, accelerator.is_main_process
    if cfg.time_budget_hours > 0 and resumed is not None:
        cfg = keep_plan(cfg, resumed, main)
    fit, budget = auto_fit_applies(cfg, device), cfg.time_budget_hours > 0 and resumed is None
    if not (fit or budget):
        return cfg
    try_step = probe_step(cfg, cache, data, rows, device)
    if fit:
        cost, tried = plan_fit(cfg.batch_size, try_step, cfg.micro_splits, cfg.gradient_checkpointing)
    else:
        cost, tried = try_step(cfg.micro_splits, cfg.gradient_checkpointing), []
    changes = dict(micro_splits=cost.micro_splits, gradient_checkpointing=cost.gradient_checkpointing)
    plan = None
    if budget:
        plan = plan_budget(cfg, cost.images_per_s * accelerator.num_processes, len(rows), cost.param_bytes,
                           accelerator.num_processes, after_training=after_training and after_training(cfg, cache))
        changes.update(max_steps=plan.steps, max_epochs=0, snapshot_every=plan.snapshot_every)
    if accelerator.num_processes > 1:  # every process trains the main process's plan
        from accelerate.utils import broadcast_object_list

        changes = broadcast_object_list([changes])[0]
    if main:
        print(describe_cost(cost))
        if len(tried) > 1:
            print(f"auto_fit: batch {cfg.batch_size} as configured does not fit {cost.device}; tried "
                  + describe_tried(tried) + f". Training with {cost.setting()} (the fastest that fits): the same "
                  f"{cfg.batch_size} images per step and data stream. Set auto_fit=False to turn this off.")
        if plan:
            print(describe_budget(cfg, plan))
    return cfg.replace(**changes) if any(getattr(cfg, k) != v for k, v in changes.items()) else cfg


def describe_tried(tried: list) -> str:
    return "; ".join(f"micro_splits {s}{' + checkpointing' if c else ''}: {what}" for s, c, what in tried)


def describe_cost(cost: StepCost) -> str:
    share = cost.peak_bytes / cost.device_bytes
    return (f"one training step at batch {cost.batch_size} ({cost.setting()}) on {cost.device}: peak memory "
            f"{gib(cost.peak_bytes)} of {gib(cost.device_bytes)} ({share:.0%}), {cost.images_per_s:.1f} images/s\n"
            f"  (memory: {cost.memory_source})")


@dataclass
class RunEstimate:
    cost: StepCost  # the configured step, or auto_fit's choice where it does not fit (CUDA)
    tried: list  # plan_fit's attempts ([] when the configured step was measured alone)
    steps: int
    images_per_step: int
    num_train_images: int

    @property
    def seconds(self) -> float:
        return self.steps * self.images_per_step / self.cost.images_per_s

    def describe(self) -> str:
        lines = [describe_cost(self.cost)]
        if len(self.tried) > 1:
            lines.append(f"the configured step does not fit; auto_fit will train with {self.cost.setting()} "
                         f"({describe_tried(self.tried)})")
        lines.append(f"the configured run: {self.steps:,} steps x {self.images_per_step} images "
                     f"({self.steps * self.images_per_step / self.num_train_images:.1f} epochs of "
                     f"{self.num_train_images:,} images) ≈ {duration(self.seconds)} of training steps at this speed "
                     f"(checkpoints, snapshots and previews come on top)")
        return "\n".join(lines)


def measure_run(cfg: RunConfig, device=None, steps: int = 3) -> RunEstimate:
    """Notebooks 02/03: measure the configured step on `device` (auto_fit's choice on CUDA when it does not fit),
    and estimate the configured run's wall time from it. Needs the run's cache and split (01_data)."""
    from .cache import load_cache
    from .model import default_device

    device = torch.device(device or default_device())
    cache = load_cache(cfg)
    rows, data = train_rows(cfg, cache), DeviceCache.from_cache(cache, device)
    try_step = probe_step(cfg, cache, data, rows, device, steps)
    if auto_fit_applies(cfg, device):
        cost, tried = plan_fit(cfg.batch_size, try_step, cfg.micro_splits, cfg.gradient_checkpointing)
    else:
        cost, tried = try_step(cfg.micro_splits, cfg.gradient_checkpointing), []
    del data
    free_memory(device)
    return RunEstimate(cost, tried, total_steps(cfg, len(rows)), cfg.batch_size * cfg.grad_accum, len(rows))
