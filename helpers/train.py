"""Train the U-Net from the latent cache, on one CPU or many GPUs, with exact resume: the loop, read top to bottom.

The same `train(cfg)` runs inside a notebook (one process) and under
    accelerate launch --multi_gpu --num_processes 8 -m helpers.train --run-name <name>
Each concern the loop touches has a room of its own, called once per block:
- the step's data and loss: helpers.step (every random draw seeded by (seed, step, micro-step, process), so resume
  is exact by construction and no RNG state needs saving);
- memory: helpers.fit (before step 1); the time budget: helpers.budget (planned before step 1, corrected once at
  the end of warm-up); precision: helpers.precision;
- disk: helpers.disk_guard (never starts what cannot fit; stops with a checkpoint before the disk is full);
- the saved state (checkpoints, snapshots, post-hoc EMA stores, the resume): helpers.run_state.CheckpointIO;
  post-hoc EMA profiles: helpers.phema; log and loss checks: helpers.trainlog; previews: helpers.previews; the session's clock: helpers.session.
Losses stay on the device and are checked every `log_every` steps (and before any write), so a NaN is caught,
named by step, and never checkpointed, without a GPU sync on every step.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass, field

import torch

from .progress import progress_bar

from .cache import load_cache
from .checkpoint import CheckpointsDamagedError
from .config import RunConfig
from .length import resolve_length, warmup_steps_for
from .values import as_bool, count_argument
from .diffusion import EMA
from .disk import NotEnoughDiskError
from .disk_guard import DiskGuard, any_process
from .budget import DoesNotFitBudgetError, Replan, plan_run, record_session, retarget_schedule
from .fit import DoesNotFitError
from .model import noise_scheduler, save_model, training_objective
from .checkpoint import snapshot_at
from .phema import PowerEMA, stores_phema
from .precision import LossScaleWatch, decide
from .previews import Previewer
from .resume import IncompatibleResumeError
from .runlock import run_lock
from .run_state import CheckpointIO, ema_copy
from .session import SessionClock
from .step import (DeviceCache, adamw, data_rows, loss_function, split_backward, step_generator, train_rows,
                   unet_for_cache)
from .trainlog import TrainLog, check_losses


# ---------------------------------------------------------------- the parts of a training run


def make_accelerator(cfg: RunConfig):
    """Accelerate's Accelerator with the precision helpers.precision decides for this card (printed by the loop)."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if cuda:  # TF32 matmuls: free speed for the fp32 parts on Ampere and newer
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = decide(cfg.mixed_precision, "cuda" if cuda else "cpu", use="train")
    # cpu=True on a machine without GPUs lets torchrun / `accelerate launch --multi_gpu` run gloo processes
    accelerator = Accelerator(mixed_precision=precision.mode, gradient_accumulation_steps=cfg.grad_accum,
                              log_with=None, cpu=not cuda)
    accelerator.precision_reason = precision.reason
    return accelerator


def make_optimizer(cfg: RunConfig, unet, device):
    """AdamW and its warm-up + decay schedule (stepped by us once per optimizer step)."""
    from diffusers.optimization import get_scheduler

    optimizer = adamw(unet, device, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_schedule = get_scheduler(cfg.lr_schedule, optimizer=optimizer,
                                num_warmup_steps=warmup_steps_for(cfg, cfg.max_steps), num_training_steps=cfg.max_steps)
    return optimizer, lr_schedule


@dataclass
class TrainResult:
    first_step: int  # the first step this session trained (1-based)
    last_step: int  # the last step it trained: the run is finished when last_step == max_steps
    resumed_from: str | None
    checkpoint: str | None  # the newest checkpoint written or resumed from
    model_dir: str | None  # set when the run reached max_steps and saved model/
    images_per_s: float
    previews: list[str]
    snapshots: list[str]
    stopped_for: str = ""  # why this session ended before `end`: "session_hours" (resume to go on), or ""
    skipped_steps: int = 0  # fp16: optimizer steps the loss scaler skipped (overflowing gradients)


@dataclass
class Run:
    """Everything the loop works with, made by `set_up`."""

    cfg: RunConfig
    io: CheckpointIO  # the run's saved state: checkpoints, snapshots, post-hoc EMA stores, the resume
    length: str  # one line: how many steps and where they come from
    rows: torch.Tensor
    data: DeviceCache
    unet: torch.nn.Module
    ddp_unet: torch.nn.Module  # the U-Net as Accelerate wraps it (DDP on GPUs)
    loss_of: object
    ema: EMA
    phema: PowerEMA | None
    optimizer: object
    lr_schedule: object
    images_per_step: int = 0
    cache: object = field(default=None, repr=False)
    objective: object = field(default=None, repr=False)  # helpers.diffusion.Objective: draws t, computes the loss
    replan: Replan | None = field(default=None, repr=False)  # the time budget's one correction, at warm-up's end


def train(cfg: RunConfig, *, resume: bool = True, progress: bool = True, max_steps: int | None = None,
          stop_at: int | None = None) -> TrainResult:
    """Train to cfg.max_steps (or `max_steps`), resuming from the last checkpoint; `stop_at` pauses early
    (with a checkpoint), as does `session_hours` of training in this session; the next call continues.

    The run folder is locked for the whole session (helpers.runlock). A resume refuses settings that change
    the model's shapes and applies the others, a new lr included (helpers.resume); checkpoints that all fail
    to load are an error, never a silent start from step 0. A `max_steps` given here replaces cfg.max_epochs
    (helpers.length.apply_length_rule). A run whose writes do not fit on the disk is refused before step 1, and
    one that meets a filling disk stops after a resumable checkpoint (NotEnoughDiskError, helpers.disk_guard)."""
    cfg, resume = cfg.replace(max_steps=max_steps), as_bool(resume, "resume")
    if stop_at is not None and (isinstance(stop_at, bool) or not isinstance(stop_at, int) or stop_at < 1):
        raise ValueError(f"stop_at={stop_at!r} should be a whole number >= 1 (the step to pause after), or None")
    began = time.perf_counter()  # the time budget's clock: set-up counts
    accelerator = make_accelerator(cfg)
    with run_lock(cfg.run_dir, "training") if accelerator.is_main_process else contextlib.nullcontext():
        return _train(cfg, accelerator, resume, progress, stop_at, began)


def _train(cfg: RunConfig, accelerator, resume: bool, progress: bool, stop_at: int | None,
           began: float) -> TrainResult:
    # ---- set-up: the planned config (fit, time budget), the data, the model, the optimizer, the saved state
    run = set_up(cfg, accelerator, resume, began)
    cfg, main, io = run.cfg, accelerator.is_main_process, run.io
    # ---- resume: the last checkpoint's weights, optimizer, LR, data position, post-hoc EMA; cut-off writes repaired
    start, position = io.load_latest()
    end = min(cfg.max_steps, stop_at or cfg.max_steps)
    guard, clock = DiskGuard(cfg, run.unet, accelerator), SessionClock(cfg.checkpoint_minutes, cfg.session_hours)
    scale = LossScaleWatch(accelerator)  # fp16's loss scaler: skipped steps, a collapsing scale
    disk = guard.at_start(start)
    if main:
        print(describe_start(run, accelerator, start, end, disk, clock))
    log = LoopLog(cfg, accelerator, start, run.images_per_step, progress)
    previewer = Previewer(cfg, run.cache, accelerator.device) if main and cfg.preview_every > 0 else None
    result = TrainResult(start + 1, start, io.checkpoint, io.checkpoint, None, 0.0, [], [])
    done = start
    while done < end:  # `end` moves once if the time budget's correction changes the plan
        # ---- the step
        lr = run.lr_schedule.get_last_lr()[0]
        loss, position = train_step(run, accelerator, done, position)
        scale.after_step()
        done, stop = done + 1, ""
        due = due_at(cfg, done, end, run.phema, previewer)
        # ---- the log, every log_every steps and before any write: losses checked, the clock read
        if log.add(done, loss, lr) or due.checkpoint or due.snapshot or due.preview:
            result.images_per_s = log.flush(position / len(run.rows), scale, io.checkpoint)
            stop = stop_reason(accelerator, clock, scale, done) if done < end else ""
            if run.replan and run.replan.due(done, log.busy):  # the time budget, corrected from these steps
                cfg, end = replan(run, accelerator, done, stop_at, log)
            due.checkpoint = due.checkpoint or bool(stop) or any_process(accelerator, main and clock.checkpoint_due())
        # ---- the writes the step is due for, each complete or absent, the disk checked first
        write_step(run, accelerator, done, position, due, guard, previewer, result)
        if due.checkpoint:
            clock.checkpointed()
            if done < end and not stop:
                guard.after_checkpoint(done, end, io.checkpoint)
        log.timing()
        result.last_step, result.skipped_steps = done, scale.skipped
        if stop:
            result.stopped_for = stop
            if stop != "session_hours":
                raise FloatingPointError(stop)
            break
    return finish(run, accelerator, result, log, began)


class LoopLog:
    """The loop's log: losses kept on the device until a flush checks them (no GPU sync per step), train.csv and
    TensorBoard rows, the progress bar, and the seconds of timed training (writes and flushes' waits excluded)."""

    def __init__(self, cfg: RunConfig, accelerator, start: int, images_per_step: int, progress: bool):
        main = accelerator.is_main_process
        self.cfg, self.accelerator, self.start, self.images_per_step = cfg, accelerator, start, images_per_step
        self.log = TrainLog(cfg, start, active=main)
        self.bar = progress_bar(total=cfg.max_steps, initial=start, desc="train", unit="step",
                                disable=not (progress and main))
        self.pending, self.busy, self.t0 = [], 0.0, time.perf_counter()  # (step, loss on device, lr)

    def add(self, done: int, loss, lr: float) -> bool:
        """Keep step `done`'s loss; True when log_every steps are waiting."""
        self.pending.append((done, loss, lr))
        self.bar.update(1)
        return len(self.pending) >= self.cfg.log_every

    def flush(self, epoch: float, scale: LossScaleWatch, checkpoint: str | None) -> float:
        """Check and write the waiting losses; the session's images/s so far."""
        done, _, lr = self.pending[-1]
        self.busy += time.perf_counter() - self.t0  # the check syncs the device, so the time is real
        images_per_s = (done - self.start) * self.images_per_step / max(self.busy, 1e-9)
        logged = check_losses(self.accelerator, self.pending, checkpoint, self.cfg.lr)
        self.log.write(logged, images_per_s, epoch=epoch, skipped=scale.skipped, loss_scale=scale.scale)
        self.bar.set_postfix(loss=f"{logged[-1]['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}",
                             refresh=False)  # shown at the next tick: headless copies get one line per interval
        self.pending = []
        return images_per_s

    def timing(self) -> None:
        """After a flush and the writes that follow it, the timed training starts again."""
        if not self.pending:
            self.t0 = time.perf_counter()

    def close(self) -> None:
        self.bar.close()
        self.log.close()


def finish(run: Run, accelerator, result: TrainResult, log: LoopLog, began: float) -> TrainResult:
    """The session's end: the log closed, its training time recorded for the time budget, model/ at max_steps."""
    cfg, main = run.cfg, accelerator.is_main_process
    log.close()
    result.checkpoint, result.snapshots = run.io.checkpoint, run.io.snapshots
    if main and cfg.time_budget_hours > 0:
        record_session(cfg, result.first_step, result.last_step, time.perf_counter() - began)
    if main and result.stopped_for:
        print(f"Stopped after step {result.last_step} of {cfg.max_steps} (session_hours={cfg.session_hours:g}) with "
              f"checkpoint {result.checkpoint}: run the same command again to resume")
    if result.last_step == cfg.max_steps and main:
        result.model_dir = str(save_model(cfg, accelerator.unwrap_model(run.ddp_unet), ema_copy(run.unet, run.ema),
                                          noise_scheduler(cfg)))
    accelerator.wait_for_everyone()
    return result


def set_up(cfg: RunConfig, accelerator, resume: bool, began: float) -> Run:
    """The run as planned: the resume checked, config saved, fit and time budget applied, model and optimizer made."""
    device = accelerator.device
    io = CheckpointIO.open(cfg, accelerator, resume)
    cache = load_cache(cfg)
    rows, data = train_rows(cfg, cache), DeviceCache.from_cache(cache, device)
    fitted, budgeted = plan_run(cfg, cache, data, rows, accelerator, io.saved_config, began)
    if fitted is not cfg:
        io.planned(fitted)
    cfg, length = resolve_length(fitted, len(rows), accelerator.num_processes)  # max_epochs -> steps
    unet = unet_for_cache(cfg, cache).to(device).train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema = EMA(unet, cfg.ema_halflife_images, cfg.ema_rampup)
    phema = PowerEMA(unet, cfg.phema_ema_lengths) if cfg.phema_ema_lengths else None  # post-hoc EMA profiles
    objective = training_objective(cfg, device)
    optimizer, lr_schedule = make_optimizer(cfg, unet, device)
    ddp_unet, optimizer = accelerator.prepare(unet, optimizer)
    forward = torch.compile(ddp_unet) if cfg.compile else ddp_unet
    images_per_step = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    io.cfg = cfg
    io.attach(unet, ema, phema, optimizer, lr_schedule, images_per_step)
    replan = Replan(*budgeted, cfg, len(rows), accelerator.num_processes, began) if budgeted else None
    return Run(cfg, io, length, rows, data, unet, ddp_unet, loss_function(objective, forward), ema, phema, optimizer,
               lr_schedule, images_per_step, cache, objective, replan)


def replan(run: Run, accelerator, done: int, stop_at: int | None, log: LoopLog) -> tuple[RunConfig, int]:
    """The time budget's correction at the end of warm-up: the plan made again from the run's own speed (the same on
    every process), config.json, budget.json and the LR schedule's total set to it. (cfg, this session's end)."""
    plan, changes = run.replan.plan(run.cfg, done, run.images_per_step)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        plan, changes = broadcast_object_list([(plan, changes)])[0]
    before = run.cfg.max_steps
    run.cfg = run.cfg.replace(**changes)
    run.io.planned(run.cfg)
    run.lr_schedule = retarget_schedule(run.cfg, run.optimizer, done)
    run.io.parts = run.io.parts[:4] + (run.lr_schedule,)
    log.bar.total = run.cfg.max_steps
    if accelerator.is_main_process:
        run.replan.report(run.cfg, plan, before, done)
    return run.cfg, min(run.cfg.max_steps, stop_at or run.cfg.max_steps)


def describe_start(run: Run, accelerator, start: int, end: int, disk: str, clock: SessionClock) -> str:
    cfg, found = run.cfg, run.io.found
    mirrored = " (and their mirror images)" if cfg.hflip else ""
    return ((f"Resuming from checkpoint {found[0]} (step {start}). " if found else "")
            + f"Training {len(run.rows)} images{mirrored} from step {start} to {end} of {cfg.max_steps}; "
            f"{run.images_per_step} images/step on {accelerator.num_processes} process(es), {accelerator.device}, "
            f"{accelerator.precision_reason}\nLength: {run.length}\n{disk}"
            + (f"\nSession: {clock.describe()}" if clock.describe() else ""))


def train_step(run: Run, accelerator, step: int, position: int) -> tuple[torch.Tensor, int]:
    """One optimizer step of grad_accum micro-steps, EMAs updated: (its mean loss, on the device; the data position)."""
    cfg, losses = run.cfg, []
    micro_batch, processes, rank = cfg.batch_size, accelerator.num_processes, accelerator.process_index
    for micro in range(cfg.grad_accum):
        gen = step_generator(cfg.seed, step, micro, rank, device=accelerator.device)
        batch_rows = data_rows(run.rows, cfg.seed, position + rank * micro_batch, micro_batch)
        position += micro_batch * processes
        batch = run.data.batch(batch_rows, gen, cfg.caption_dropout, cfg.offset_noise, run.objective, cfg.hflip)
        with accelerator.accumulate(run.ddp_unet), accelerator.autocast():
            loss = split_backward(run.loss_of, batch, cfg.micro_splits, accelerator.backward,
                                  lambda: accelerator.no_sync(run.ddp_unet))
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.ddp_unet.parameters(), cfg.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
    run.lr_schedule.step()
    run.ema.update(run.unet, run.images_per_step)
    if run.phema is not None:
        run.phema.update(run.unet, run.images_per_step)
    return torch.stack(losses).mean(), position


@dataclass
class Due:
    """What step `done` writes."""

    checkpoint: bool
    snapshot: bool
    phema: bool
    preview: bool


def due_at(cfg: RunConfig, done: int, end: int, phema, previewer) -> Due:
    return Due(checkpoint=done % max(cfg.checkpoint_every, 1) == 0 or done == end,
               snapshot=snapshot_at(done, cfg.max_steps, cfg.snapshot_every),
               phema=phema is not None and stores_phema(cfg, done),
               preview=previewer is not None and (done % cfg.preview_every == 0 or done == cfg.max_steps))


def stop_reason(accelerator, clock: SessionClock, scale: LossScaleWatch, done: int) -> str:
    """Why the session stops after step `done` with a checkpoint ("" = it goes on), the same on every process."""
    problem = scale.problem(done)
    if any_process(accelerator, problem is not None):
        return problem or "fp16 loss scale collapsed on another process"
    return "session_hours" if any_process(accelerator, accelerator.is_main_process and clock.session_over()) else ""


def write_step(run: Run, accelerator, done: int, position: int, due: Due, guard: DiskGuard, previewer,
               result: TrainResult) -> None:
    """The checkpoint, snapshot, post-hoc EMA store and preview step `done` is due for, the disk checked first."""
    if due.checkpoint or due.snapshot or due.phema:
        guard.before_writes(done, due.checkpoint, due.snapshot, run.io.checkpoint)
    run.io.save(done, position, due.checkpoint, due.snapshot, due.phema)
    if due.preview:
        result.previews.append(str(previewer.save(ema_copy(run.unet, run.ema), done)))
    if due.checkpoint or due.snapshot or due.preview:
        accelerator.wait_for_everyone()


# ---------------------------------------------------------------- command line (accelerate launch)


def main(argv: list[str] | None = None) -> TrainResult:
    from .command import add_run_arguments, ends_in_one_line, existing_run

    parser = argparse.ArgumentParser(prog="python -m helpers.train",
                                     description="Train a run's U-Net from its latent cache (see notebooks/03).")
    add_run_arguments(parser)
    parser.add_argument("--max-steps", type=int, default=None, help="override the run's max_steps")
    parser.add_argument("--stop-at", type=count_argument(1), default=None,
                        help="pause at this step (with a checkpoint)")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch, ignoring checkpoints")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    with ends_in_one_line("helpers.train", CheckpointsDamagedError, IncompatibleResumeError, NotEnoughDiskError,
                          DoesNotFitError, DoesNotFitBudgetError):  # the user's move, not a bug: one line, exit 1
        cfg = existing_run(args).replace(max_steps=args.max_steps)  # the user's --max-steps wins (config.py)
        result = train(cfg, resume=not args.no_resume, progress=not args.no_progress, stop_at=args.stop_at)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
