"""Fit a training run to a device's memory without changing the recipe, and measure its step.

- `measure_step`: a few real training steps (the run's loss, AdamW, EMA, autocast) on a batch drawn from the
  cache: peak memory and images/s. On CUDA the peak is `torch.cuda.max_memory_allocated`. On a CPU no allocator
  keeps a peak, so the figure is computed from the tensors themselves: weights, gradients, AdamW state and EMA as
  allocated, plus the tensors autograd saves for backward in the largest micro-batch (the activations, and the bf16
  copies of the weights under autocast), all counted at once: an upper bound. The process's RSS high-water mark
  would not do: at small batches it is set by the optimizer state, not by the step.
- `plan_fit`: if the configured step does not fit, the smallest micro-batch split and the smallest split with
  gradient checkpointing that fit, each measured; the faster wins. Splitting keeps the images per optimizer step
  and the data stream (helpers.step.split_backward), so results and exact resume do not change.
- `fit_run`: plan_fit before step 1 of `helpers.train.train` (auto_fit acts on CUDA only), and the step measured
  for helpers.budget's time plan; `measure_run` + `describe`: what notebooks 02 and 03 print before training.
"""
from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from time import perf_counter

import torch

from .config import RunConfig
from .length import total_steps
from .diffusion import EMA
from .model import training_objective
from .precision import decide
from .step import (DeviceCache, adamw, data_rows, loss_function, split_backward, step_generator, train_rows,
                   unet_for_cache)

FIT_SHARE = 0.95  # a step "fits" when its peak plus one more copy of the weights stays under this share of memory


class DoesNotFitError(RuntimeError):
    """The configured step fits the device's memory in no split: the user's move (a smaller batch or preset)."""


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
    optimizer = adamw(unet, device, lr=1e-12)  # tiny lr: weights barely move
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


def fit_run(cfg: RunConfig, cache, data: DeviceCache, rows: torch.Tensor, accelerator,
            measure: bool = False) -> tuple[RunConfig, StepCost | None]:
    """(cfg with auto_fit's micro_splits/gradient_checkpointing (CUDA), printed; the measured step, or None when
    nothing was measured: a CPU run measures only when `measure`, which the time budget asks for)."""
    device, main = accelerator.device, accelerator.is_main_process
    fit = auto_fit_applies(cfg, device)
    if not (fit or measure):
        return cfg, None
    try_step = probe_step(cfg, cache, data, rows, device)
    if fit:
        cost, tried = plan_fit(cfg.batch_size, try_step, cfg.micro_splits, cfg.gradient_checkpointing)
    else:
        cost, tried = try_step(cfg.micro_splits, cfg.gradient_checkpointing), []
    changes = dict(micro_splits=cost.micro_splits, gradient_checkpointing=cost.gradient_checkpointing)
    if accelerator.num_processes > 1:  # every process trains the main process's choice
        from accelerate.utils import broadcast_object_list

        changes = broadcast_object_list([changes])[0]
    if main:
        print(describe_cost(cost))
        if len(tried) > 1:
            print(f"auto_fit: batch {cfg.batch_size} as configured does not fit {cost.device}; tried "
                  + describe_tried(tried) + f". Training with {cost.setting()} (the fastest that fits): the same "
                  f"{cfg.batch_size} images per step and data stream. Set auto_fit=False to turn this off.")
    return (cfg.replace(**changes) if any(getattr(cfg, k) != v for k, v in changes.items()) else cfg), cost


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
