"""Train the U-Net from the latent cache, on one CPU or many GPUs, with exact resume.

The same `train(cfg)` runs inside a notebook (one process) and under
    accelerate launch --num_processes 8 -m helpers.train --run outputs/runs/<name>
Design choices, and why:
- The whole cache lives on the device and is indexed there: no DataLoader, no VAE in the loop.
- Every random choice of a micro-step (flip, latent sample, caption, dropout, noise, timestep) comes
  from a generator seeded by (seed, step, micro-step, process): resume is exact by construction and
  processes draw different data. Data order is a seeded permutation per epoch. Nothing else is random,
  so no global RNG state needs saving.
- Losses stay on the device and are checked every `log_every` steps (and before any checkpoint), so
  a NaN is caught, named by step, and never checkpointed, without a GPU sync on every step.
- Besides the resumable checkpoints (the last few), the EMA U-Net is kept every `snapshot_every` steps and at
  max_steps in `snapshots/`: never pruned, the candidates that 04_sample's selection sweep chooses from.
- Before step 1 the run's writes are estimated against the free disk, and checked again around every checkpoint
  (helpers.disk): a run stops with a resumable checkpoint before the disk is full, never in the middle of a write.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import errno
import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from .progress import progress_bar

from .cache import LatentCache, load_cache, read_split
from .checkpoint import (CheckpointsDamagedError, checkpoint_config, checkpoint_name, latest_checkpoint,
                         list_checkpoints, save_checkpoint)
from .config import (RunConfig, as_bool, count_argument, load_config, resolve_length, resolve_path, save_config,
                     warmup_steps_for)
from .disk import (RESERVE_BYTES, NotEnoughDiskError, Plan, WriteSizes, check_room, gb, room_for, snapshot_count,
                   store_count)
from .diffusion import EMA, diffusion_loss
from .files import atomic_save_image, atomic_write_json, os_errors_end_in_one_line
from .model import noise_scheduler, save_model
from .phema import PowerEMA, stores_at
from .repair import repair_run
from .resume import IncompatibleResumeError, check_resume, retarget_optimizer
from .runlock import RunLockedError, run_lock
from .unet import build_unet


# ---------------------------------------------------------------- randomness and data


def step_generator(seed: int, *parts, device="cpu") -> torch.Generator:
    """A generator whose seed is a hash of (seed, *parts): the same step always draws the same numbers."""
    digest = hashlib.blake2b("/".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return g


def data_rows(rows: torch.Tensor, seed: int, start: int, count: int) -> torch.Tensor:
    """Items start..start+count of the endless stream 'one seeded permutation of `rows` per epoch'."""
    n = len(rows)
    positions = torch.arange(start, start + count)
    out = torch.empty(count, dtype=torch.int64)
    for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=step_generator(seed, "epoch", epoch))
        sel = positions // n == epoch
        out[sel] = rows[perm[positions[sel] % n]]
    return out


def train_rows(cfg: RunConfig, cache: LatentCache) -> torch.Tensor:
    """Cache rows of the training monsters (split.json), decodable images only, max_images applied."""
    train_groups = set(read_split(cfg)["train"])
    rows = [i for i, g in enumerate(cache.groups) if g in train_groups and bool(cache.valid[i])]
    if cfg.max_images > 0:
        rows = rows[:cfg.max_images]
    if not rows:
        raise ValueError(f"No training images: the cache {cache.dir} has none of the train groups in "
                         f"{cfg.run_dir / 'split.json'}")
    return torch.tensor(rows, dtype=torch.int64)


@dataclass
class DeviceCache:
    """The latent cache on the training device, shaped for drawing batches."""

    mean: torch.Tensor  # [N, 2, C, h, w] fp16, index 1 = flipped
    std: torch.Tensor  # [N, 2, C, h, w] fp16
    caption_ids: torch.Tensor  # [N, K] rows of `embeddings` (padding clamped to 0, never picked)
    caption_counts: torch.Tensor  # [N] how many captions each image has (at least 1)
    embeddings: torch.Tensor  # [M, L, D] fp16, row 0 = ""

    @classmethod
    def from_cache(cls, cache: LatentCache, device) -> "DeviceCache":
        ids = cache.caption_ids
        return cls(cache.mean.to(device), cache.std.to(device), ids.clamp(min=0).to(device),
                   (ids >= 0).sum(1).clamp(min=1).to(device), cache.embeddings.to(device))

    def batch(self, rows: torch.Tensor, gen: torch.Generator, caption_dropout: float, offset_noise: float,
              num_train_timesteps: int, hflip: bool = False):
        """(x0, caption embeddings, eps, t) for `rows`, every draw from `gen`; `hflip`: mirrored at random."""
        dev, b = self.mean.device, len(rows)
        rows = rows.to(dev)
        flip = torch.randint(0, 2, (b,), generator=gen, device=dev) * hflip  # drawn either way: same stream after
        mean, std = self.mean[rows, flip].float(), self.std[rows, flip].float()
        x0 = mean + std * torch.randn(mean.shape, generator=gen, device=dev)  # a sample of the VAE's posterior
        counts = self.caption_counts[rows]
        pick = (torch.rand(b, generator=gen, device=dev) * counts).long().clamp(max=counts - 1)
        caption = self.caption_ids[rows, pick]
        dropped = torch.rand(b, generator=gen, device=dev) < caption_dropout  # -> "" (row 0): learns the CFG prior
        context = self.embeddings[torch.where(dropped, 0, caption)].float()
        eps = torch.randn(x0.shape, generator=gen, device=dev)
        offset = torch.randn(b, x0.shape[1], 1, 1, generator=gen, device=dev)
        eps = eps + offset_noise * offset  # offset noise lets the model shift whole-image brightness
        t = torch.randint(0, num_train_timesteps, (b,), generator=gen, device=dev)
        return x0, context, eps, t


# ---------------------------------------------------------------- the parts of a training run


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator

    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    if torch.cuda.is_available():  # TF32 matmuls: free speed for the fp32 parts on Ampere and newer
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # cpu=True on a machine without GPUs lets torchrun / `accelerate launch --multi_gpu` run gloo processes
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum, log_with=None,
                       cpu=not torch.cuda.is_available())


def unet_for_cache(cfg: RunConfig, cache: LatentCache):
    """A fresh U-Net whose input channels, size and context width are those of the cached latents and captions."""
    return build_unet(cfg.unet_preset, in_channels=cache.mean.shape[2], cross_attention_dim=cache.embeddings.shape[-1],
                      sample_size=cache.mean.shape[-1], seed=cfg.seed)


def make_optimizer(cfg: RunConfig, unet, device):
    """AdamW and its warm-up + decay schedule (stepped by us once per optimizer step)."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    lr_schedule = get_scheduler(cfg.lr_schedule, optimizer=optimizer,
                                num_warmup_steps=warmup_steps_for(cfg, cfg.max_steps), num_training_steps=cfg.max_steps)
    return optimizer, lr_schedule


def split_backward(loss_of, batch: tuple, micro_splits: int, backward=torch.Tensor.backward,
                   no_sync=contextlib.nullcontext) -> torch.Tensor:
    """Forward + backward of `batch` (tensors sharing dim 0) in `micro_splits` chunks; returns its mean loss (detached).

    The batch is drawn whole before it is split, so the data stream is the same for any split. Each chunk's loss
    is weighted by its share of the batch, so the summed gradients are those of the whole batch's mean loss (up
    to float rounding); under DDP, gradients are synchronised only in the last chunk's backward."""
    chunks = list(zip(*(x.tensor_split(min(micro_splits, len(batch[0]))) for x in batch)))
    if len(chunks) == 1:  # unsplit: exactly the step as it always was
        loss = loss_of(*batch)
        backward(loss)
        return loss.detach().float()
    total = 0.0
    for i, chunk in enumerate(chunks):
        share = len(chunk[0]) / len(batch[0])
        with no_sync() if i < len(chunks) - 1 else contextlib.nullcontext():
            loss = loss_of(*chunk)
            backward(loss * share)
        total = total + loss.detach().float() * share
    return total


def ema_copy(unet, ema: EMA):
    """A copy of the U-Net holding the EMA weights, for previews, snapshots and the saved model."""
    return ema.copy_to(copy.deepcopy(unet).eval().requires_grad_(False))


def weights_finite(unet) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in unet.parameters()]).all())


# ---------------------------------------------------------------- disk room (helpers.disk)

RESUME_HINT = ("Free space (or set a larger snapshot_every or a smaller keep_checkpoints), then resume: "
               "python -m helpers.train --run {run} (or run 03_train_cfg again)")


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is True on any: a stop that all processes must take together."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum") > 0)


def check_disk_at_start(cfg: RunConfig, sizes: WriteSizes, start: int, accelerator) -> str:
    """The estimate of what steps start+1..max_steps write, as one line; NotEnoughDiskError if it cannot fit."""
    problem, line = None, ""
    if accelerator.is_main_process:
        plan = Plan(start, cfg.max_steps, cfg.snapshot_every, cfg.checkpoint_every, cfg.keep_checkpoints,
                    len(list_checkpoints(cfg.layout.checkpoints)), cfg.phema_every)
        try:
            line = check_room(plan, sizes, cfg.run_dir)
        except NotEnoughDiskError as e:
            problem = str(e)
    if any_process(accelerator, problem is not None):
        raise NotEnoughDiskError(problem or "not enough disk (the main process says how much)")
    return line


def stores_phema(cfg: RunConfig, done: int) -> bool:
    return bool(cfg.phema_sigma_rels) and stores_at(done, cfg.max_steps, cfg.snapshot_every, cfg.phema_every)


def stop_unless_room_now(cfg: RunConfig, sizes: WriteSizes, accelerator, done: int, checkpoint: bool,
                         snapshot: bool, last_checkpoint: str | None) -> None:
    """Before step `done` writes its checkpoint, snapshot (and model/, post-hoc EMA profiles): stop, writing nothing,
    unless they fit."""
    need = (checkpoint * sizes.checkpoint + snapshot * sizes.snapshot + (sizes.model if done == cfg.max_steps else 0)
            + stores_phema(cfg, done) * sizes.phema)
    stop_unless_room(cfg, accelerator, need, lambda free, need: (
        f"Stopped at step {done}, before writing its checkpoint or snapshot: the disk holding {cfg.run_dir} has "
        f"{gb(free)} free and they need {gb(need)} (and {gb(RESERVE_BYTES)} stays free). Nothing of step {done} "
        f"was written; the last checkpoint is {last_checkpoint or 'none'}. " + RESUME_HINT.format(run=cfg.run_dir)))


def stop_unless_room(cfg: RunConfig, accelerator, need: int, message) -> None:
    """NotEnoughDiskError(message(free, need)) on every process unless `need` bytes fit (decided on the main one)."""
    fits, free = room_for(cfg.run_dir, need) if accelerator.is_main_process else (True, 0)
    if any_process(accelerator, not fits):
        raise NotEnoughDiskError(message(free, need))


def stop_unless_room_ahead(cfg: RunConfig, sizes: WriteSizes, accelerator, done: int, end: int,
                           checkpoint: str | None) -> None:
    """After the checkpoint of step `done`: stop now unless everything up to the next checkpoint fits."""
    upto = min(end, (done // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
    need = (snapshot_count(done, upto, cfg.max_steps, cfg.snapshot_every) * sizes.snapshot + sizes.checkpoint
            + (sizes.model if upto == cfg.max_steps else 0)
            + store_count(done, upto, cfg.max_steps, cfg.snapshot_every, cfg.phema_every) * sizes.phema)
    stop_unless_room(cfg, accelerator, need, lambda free, need: (
        f"Stopped after step {done} with a resumable checkpoint {checkpoint}: the disk holding {cfg.run_dir} has "
        f"{gb(free)} free, and steps {done + 1}-{upto} would write {gb(need)} (and {gb(RESERVE_BYTES)} stays free). "
        + RESUME_HINT.format(run=cfg.run_dir)))


@contextlib.contextmanager
def no_partial_write(root: Path, step: int):
    """A checkpoint or snapshot write that fails leaves no temporary folder behind; a failure on a full disk
    (safetensors and torch.save do not raise OSError for it) becomes OSError ENOSPC naming the folder."""
    try:
        yield
    except BaseException as e:
        for tmp in root.glob(f".tmp-{checkpoint_name(step)}*"):  # ours: the run lock keeps other writers out
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, OSError) and root.exists() and not room_for(root, 0)[0]:
            raise OSError(errno.ENOSPC, f"No space left on device ({type(e).__name__})", str(root)) from e
        raise


# ---------------------------------------------------------------- the loop


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


def train(cfg: RunConfig, *, resume: bool = True, progress: bool = True, max_steps: int | None = None,
          stop_at: int | None = None) -> TrainResult:
    """Train to cfg.max_steps (or `max_steps`), resuming from the last checkpoint; `stop_at` pauses early
    (with a checkpoint) without changing the LR schedule. The losses are in logs/train.csv (read_log).

    The run folder is locked for the whole session (helpers.runlock). A resume refuses settings that change
    the model's shapes and applies the others, a new lr included (helpers.resume); checkpoints that all fail
    to load are an error, never a silent start from step 0. A `max_steps` given here replaces cfg.max_epochs
    (helpers.config.apply_length_rule). A run whose writes do not fit on the disk is refused before step 1, and
    one that meets a filling disk stops after a resumable checkpoint (NotEnoughDiskError, helpers.disk)."""
    cfg, resume = cfg.replace(max_steps=max_steps), as_bool(resume, "resume")
    accelerator = make_accelerator(cfg)
    with run_lock(cfg.run_dir, "training") if accelerator.is_main_process else contextlib.nullcontext():
        return _train(cfg, accelerator, resume, progress, stop_at)


def _train(cfg: RunConfig, accelerator, resume: bool, progress: bool, stop_at: int | None) -> TrainResult:
    from .fit import fit_run  # helpers.fit builds on this module

    device, main = accelerator.device, accelerator.is_main_process
    given_config = cfg.to_json()  # stored in checkpoints as the user set it (before max_epochs -> max_steps)
    found = latest_checkpoint(cfg.layout.checkpoints) if resume else None
    if found:  # before anything is written: a refused resume leaves the run as it was
        check_resume(found[0], checkpoint_config(found[0]), cfg, verbose=main)
    if main:
        save_config(cfg)
        if not resume:
            retire_checkpoints(cfg)
    accelerator.wait_for_everyone()

    cache = load_cache(cfg)
    rows, data = train_rows(cfg, cache), DeviceCache.from_cache(cache, device)
    fitted = fit_run(cfg, cache, data, rows, accelerator, checkpoint_config(found[0]) if found else None)
    if fitted is not cfg:  # the plan is the run's config from now on: config.json, checkpoints, resumes
        cfg, given_config = fitted, fitted.to_json()
        if main:
            save_config(cfg)
    cfg, length = resolve_length(cfg, len(rows), accelerator.num_processes)  # max_epochs -> steps, not the user's rule
    unet = unet_for_cache(cfg, cache).to(device).train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema = EMA(unet, cfg.ema_halflife_images, cfg.ema_rampup)
    phema = PowerEMA(unet, cfg.phema_sigma_rels) if cfg.phema_sigma_rels else None  # post-hoc EMA profiles
    alphas_cumprod = noise_scheduler(cfg).alphas_cumprod.to(device)
    optimizer, lr_schedule = make_optimizer(cfg, unet, device)
    ddp_unet, optimizer = accelerator.prepare(unet, optimizer)  # the U-Net as accelerate wraps it (DDP on GPUs)
    forward = torch.compile(ddp_unet) if cfg.compile else ddp_unet
    micro_batch, processes, rank = cfg.batch_size, accelerator.num_processes, accelerator.process_index
    images_per_step = micro_batch * cfg.grad_accum * processes

    start, position, resumed_from = 0, 0, None
    if found:
        resumed_from = str(found[0])
        start, position = load_training_state(found[1], unet, ema, optimizer, lr_schedule, accelerator)
        resume_phema(phema, unet, found[1]["state"], start * images_per_step, verbose=main)
        retarget_optimizer(optimizer, lr_schedule, cfg.lr, cfg.weight_decay)  # this config's lr, not the saved one
    repair_run(cfg, found, unet, save_snapshot, write=main)  # what writes cut off at or before the checkpoint left
    end = min(cfg.max_steps, stop_at or cfg.max_steps)
    sizes = WriteSizes.of(unet, len(cfg.phema_sigma_rels))
    disk = check_disk_at_start(cfg, sizes, start, accelerator)
    if main:
        mirrored = " (and their mirror images)" if cfg.hflip else ""
        print((f"Resuming from checkpoint {resumed_from} (step {start}). " if found else "")
              + f"Training {len(rows)} images{mirrored} from step {start} to {end} of "
              f"{cfg.max_steps}; {images_per_step} images/step on {processes} process(es), {device}, "
              f"mixed precision {accelerator.mixed_precision}\nLength: {length}\n{disk}")

    log = TrainLog(cfg, start, active=main)
    previewer = Previewer(cfg, cache, device) if main and cfg.preview_every > 0 else None
    result = TrainResult(start + 1, start, resumed_from, resumed_from, None, 0.0, [], [])
    pending, busy, t0 = [], 0.0, time.perf_counter()  # (step, loss on device, lr); seconds of timed training
    bar = progress_bar(total=cfg.max_steps, initial=start, desc="train", unit="step", disable=not (progress and main))
    for step in range(start, end):
        lr, losses = lr_schedule.get_last_lr()[0], []
        for micro in range(cfg.grad_accum):
            gen = step_generator(cfg.seed, step, micro, rank, device=device)
            batch_rows = data_rows(rows, cfg.seed, position + rank * micro_batch, micro_batch)
            position += micro_batch * processes
            x0, context, eps, t = data.batch(batch_rows, gen, cfg.caption_dropout, cfg.offset_noise,
                                             cfg.num_train_timesteps, cfg.hflip)
            with accelerator.accumulate(ddp_unet), accelerator.autocast():
                loss = split_backward(lambda *chunk: diffusion_loss(forward, *chunk, alphas_cumprod,
                                                                    cfg.prediction_type, cfg.min_snr_gamma),
                                      (x0, context, eps, t), cfg.micro_splits, accelerator.backward,
                                      lambda: accelerator.no_sync(ddp_unet))
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(ddp_unet.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
        lr_schedule.step()
        ema.update(unet, images_per_step)
        if phema is not None:
            phema.update(unet, images_per_step)
        done = step + 1
        pending.append((done, torch.stack(losses).mean(), lr))

        checkpoint = done % max(cfg.checkpoint_every, 1) == 0 or done == end
        snapshot = done == cfg.max_steps or (cfg.snapshot_every > 0 and done % cfg.snapshot_every == 0)
        phema_store = phema is not None and stores_phema(cfg, done)
        preview = previewer is not None and (done % cfg.preview_every == 0 or done == cfg.max_steps)
        if len(pending) >= cfg.log_every or checkpoint or snapshot or preview:
            busy += time.perf_counter() - t0  # the flush syncs the device, so the time is real
            result.images_per_s = (done - start) * images_per_step / max(busy, 1e-9)
            logged = check_losses(accelerator, pending, result.checkpoint, cfg.lr)
            log.write(logged, result.images_per_s, epoch=position / len(rows))
            bar.set_postfix(loss=f"{logged[-1]['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{result.images_per_s:.0f}",
                            refresh=False)  # shown at the next tick: headless copies get one line per interval
            pending = []
        if checkpoint or snapshot or phema_store:
            stop_unless_room_now(cfg, sizes, accelerator, done, checkpoint, snapshot, result.checkpoint)
        if checkpoint:
            if not weights_finite(unet):
                raise FloatingPointError(f"U-Net weights are not finite after step {done}: not checkpointing. The "
                                         f"last good checkpoint is {result.checkpoint or 'none'}; lower lr and resume.")
            if main:
                state = training_state(done, position, optimizer, lr_schedule, accelerator, phema)
                with no_partial_write(cfg.layout.checkpoints, done):
                    result.checkpoint = str(save_checkpoint(cfg.layout.checkpoints, done, unet.state_dict(),
                                                            ema.state_dict(), state, cfg.keep_checkpoints,
                                                            config=given_config))
        if snapshot and main:
            with no_partial_write(cfg.layout.snapshots, done):
                result.snapshots.append(str(save_snapshot(cfg, ema_copy(unet, ema), done)))
        if phema_store and main:
            with no_partial_write(cfg.layout.phema, done):
                phema.store(cfg.layout.phema, done)
        if preview:
            result.previews.append(str(previewer.save(ema_copy(unet, ema), done)))
        if checkpoint or snapshot or preview:
            accelerator.wait_for_everyone()
        if checkpoint and done < end:
            stop_unless_room_ahead(cfg, sizes, accelerator, done, end, result.checkpoint)
        if not pending:
            t0 = time.perf_counter()
        result.last_step = done
        bar.update(1)
    bar.close()
    log.close()

    if end == cfg.max_steps and main:
        result.model_dir = str(save_model(cfg, accelerator.unwrap_model(ddp_unet), ema_copy(unet, ema),
                                          noise_scheduler(cfg)))
    accelerator.wait_for_everyone()
    return result


def check_losses(accelerator, pending: list, last_checkpoint: str | None, lr: float) -> list[dict]:
    """The pending losses on the host (mean over processes) as log rows; FloatingPointError at the first NaN/inf."""
    losses = accelerator.reduce(torch.stack([loss for _, loss, _ in pending]), reduction="mean").cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise FloatingPointError(
            f"Training loss became {losses[i].item()} at step {pending[i][0]}: stopped. The last good checkpoint is "
            f"{last_checkpoint or 'none (no checkpoint was written yet)'}; lower lr (now {lr}) or max_grad_norm, or "
            f"try mixed_precision='no', then resume.")
    return [dict(step=s, loss=float(loss), lr=lr) for (s, _, lr), loss in zip(pending, losses)]


# ---------------------------------------------------------------- checkpoints and snapshots


def training_state(step: int, position: int, optimizer, lr_schedule, accelerator, phema=None) -> dict:
    """Everything besides the weights that resuming needs (state.pt of a checkpoint), with the post-hoc EMA
    profiles in fp32 (exact resume)."""
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else {}
    return dict(step=step, data_position=position, optimizer=optimizer.state_dict(),
                lr_scheduler=lr_schedule.state_dict(), scaler=scaler,
                **({"phema": phema.state_dict()} if phema is not None else {}))


def resume_phema(phema, unet, state: dict, images_seen: int, verbose: bool) -> None:
    """Restore the post-hoc EMA profiles from a checkpoint's state. A checkpoint without the lengths asked for
    (written with phema off, or other phema_sigma_rels) restarts them from the resumed weights, as if the weights
    had been these since step 0, and says so."""
    if phema is None:
        return
    try:
        if state.get("phema") is None:
            raise ValueError("the checkpoint has none")
        phema.load_state_dict(state["phema"])
    except ValueError as e:
        phema.restart(unet, images_seen)
        if verbose:
            print(f"Post-hoc EMA profiles {phema.sigma_rels} start at this step ({e}): they count the steps before "
                  f"it as if the weights had been the resumed ones")


def load_training_state(ckpt: dict, unet, ema: EMA, optimizer, lr_schedule, accelerator) -> tuple[int, int]:
    """Restore a checkpoint into the training parts; returns (step, data position)."""
    unet.load_state_dict(ckpt["unet"])
    ema.load_state_dict(ckpt["ema"])
    state = ckpt["state"]
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler is not None and state["scaler"]:
        accelerator.scaler.load_state_dict(state["scaler"])
    return state["step"], state["data_position"]


def save_snapshot(cfg: RunConfig, ema_unet, step: int) -> Path:
    """`snapshots/step-NNNNNN/`: the EMA U-Net as a diffusers folder (safetensors + config), written atomically."""
    root = cfg.layout.snapshots
    final, tmp = root / checkpoint_name(step), root / f".tmp-{checkpoint_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    ema_unet.save_pretrained(tmp, safe_serialization=True)
    if final.exists():
        print(f"Replacing snapshot {final} (this run trained step {step} again)")
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def retire_checkpoints(cfg: RunConfig) -> None:
    """resume=False: move old checkpoints aside, so they cannot be mistaken for this run's."""
    root = cfg.layout.checkpoints
    if root.exists():
        old, n = root.with_name("checkpoints.old"), 1
        while old.exists():  # never delete what an earlier resume=False moved aside
            n += 1
            old = root.with_name(f"checkpoints.old-{n}")
        root.rename(old)
        print(f"resume=False: moved the previous checkpoints to {old}")


# ---------------------------------------------------------------- logs and previews


class TrainLog:
    """train.csv + TensorBoard under <run_dir>/logs (main process only); rows past `start` are dropped on resume."""

    FIELDS = ("step", "loss", "lr", "images_per_s", "epoch")

    def __init__(self, cfg: RunConfig, start: int, active: bool):
        self.active, self.path = active, cfg.layout.logs / "train.csv"
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_log_rows(self.path) if int(r["step"]) <= start] if start else []
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        self.tb = SummaryWriter(str(cfg.layout.logs / "tensorboard"), purge_step=start + 1 if start else None)

    def write(self, rows: list[dict], images_per_s: float, epoch: float) -> None:
        if not self.active:
            return
        rows = [dict(r, images_per_s=round(images_per_s, 2), epoch=round(epoch, 4)) for r in rows]
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerows(rows)
        for r in rows:
            for name in ("loss", "lr", "images_per_s"):
                self.tb.add_scalar(f"train/{name}", r[name], r["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.active:
            self.tb.close()


def read_log_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def read_log(cfg: RunConfig) -> dict[str, list[float]]:
    """The run's whole training log as columns: {"step": [...], "loss": [...], ...}."""
    rows = read_log_rows(cfg.layout.logs / "train.csv")
    return {k: [float(r[k]) for r in rows] for k in TrainLog.FIELDS}


class Previewer:
    """Samples fixed prompts with fixed seeds from the EMA U-Net into previews/step-NNNNNN.png."""

    def __init__(self, cfg: RunConfig, cache: LatentCache, device, n: int = 8):
        from .model import load_frozen_parts

        self.cfg, self.prompts = cfg, preview_prompts(cfg, cache, n)
        self.text_encoder, self.autoencoder = load_frozen_parts(cfg, device)
        self.scheduler_config = dict(noise_scheduler(cfg).config)

    def save(self, ema_unet, step: int) -> Path:
        from .images import image_grid, tensor_to_pil
        from .model import TextToImage
        from .sample import sample_images
        from .setting import Setting

        cfg = self.cfg
        model = TextToImage(cfg, ema_unet, self.text_encoder, self.autoencoder, self.scheduler_config)
        setting = Setting.from_config(cfg).replace(ema_length=0.0, guide="")  # the half-life EMA, no guide
        images = sample_images(model, self.prompts, list(range(len(self.prompts))), setting,
                               batch_size=cfg.sample_batch_size)
        grid = image_grid([tensor_to_pil(x) for x in images], cols=min(len(self.prompts), 4),
                          cell=max(64, cfg.resolution))
        out = cfg.layout.previews / f"{checkpoint_name(step)}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_image(grid, out)
        atomic_write_json(out.parent / "prompts.json", self.prompts)
        return out


def preview_prompts(cfg: RunConfig, cache: LatentCache, n: int = 8) -> list[str]:
    """The first `n` distinct captions of validation monsters, then of training ones: fixed for a run."""
    val = set(read_split(cfg)["val"])
    order = [i for i, g in enumerate(cache.groups) if g in val] + [i for i, g in enumerate(cache.groups) if g not in val]
    prompts = []
    for i in order:
        caption = cache.captions[int(cache.caption_ids[i, 0])]
        if caption not in prompts:
            prompts.append(caption)
        if len(prompts) == n:
            break
    return prompts


# ---------------------------------------------------------------- command line (accelerate launch)


def main(argv: list[str] | None = None) -> TrainResult:
    parser = argparse.ArgumentParser(description="Train a run's U-Net from its latent cache (see notebooks/03).")
    parser.add_argument("--run", required=True, help="run folder, or run name under <outputs-dir>/runs")
    parser.add_argument("--outputs-dir", default="outputs")
    parser.add_argument("--max-steps", type=int, default=None, help="override the run's max_steps")
    parser.add_argument("--stop-at", type=count_argument(1), default=None,
                        help="pause at this step (with a checkpoint)")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch, ignoring checkpoints")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    run = Path(args.run)
    folder = run if (run / "config.json").exists() else resolve_path(args.outputs_dir) / "runs" / args.run
    from .fit import DoesNotFitError  # helpers.fit builds on this module

    with os_errors_end_in_one_line("helpers.train"):  # a read-only or full disk: one line, not a traceback
        try:
            cfg = load_config(folder).replace(max_steps=args.max_steps)  # the user's --max-steps wins (config.py)
        except ValueError as e:
            parser.exit(2, f"helpers.train: {' '.join(str(e).split())}\n")
        try:
            result = train(cfg, resume=not args.no_resume, progress=not args.no_progress, stop_at=args.stop_at)
        except (RunLockedError, CheckpointsDamagedError, IncompatibleResumeError, NotEnoughDiskError,
                DoesNotFitError) as e:
            parser.exit(1, f"helpers.train: {e}\n")  # the user's move, not a bug
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
