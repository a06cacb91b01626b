"""Train the U-Net from the latent cache, on one CPU or many GPUs, with exact resume.

The same `train(cfg)` runs inside a notebook (one process) and under
    accelerate launch --num_processes 8 -m helpers.train --run outputs/runs/<name>
Design choices, and why:
- The whole cache lives on the device and is indexed there: no DataLoader, no VAE in the loop.
- Every random choice of a micro-step (flip, latent sample, caption, dropout, noise, timestep) comes
  from a generator seeded by (seed, step, micro-step, process): resume is exact by construction and
  processes draw different data. Data order is a seeded permutation per epoch.
- EMA is diffusers' `EMAModel` with warm-up (decay = 1 - (1 + step) ** -ema_power, capped at
  ema_max_decay): after 500 steps it averages over roughly the last 100, so short runs benefit too,
  while long runs approach the usual 0.9999. It starts from our own freshly initialised U-Net.
- Losses stay on the device and are checked every `log_every` steps (and before any checkpoint), so
  a NaN is caught, named by step, and never checkpointed, without a GPU sync on every step.
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .cache import LatentCache, load_cache, read_split
from .checkpoint import checkpoint_name, latest_checkpoint, save_checkpoint
from .config import RunConfig, load_config, resolve_path, save_config
from .model import noise_scheduler, new_unet, save_model


# ---------------------------------------------------------------- randomness and data order


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


# ---------------------------------------------------------------- one batch and its loss


def make_batch(cache: dict, rows: torch.Tensor, gen: torch.Generator, cfg: RunConfig):
    """(clean latents, caption embeddings, noise, timesteps) for `rows`, every draw from `gen`."""
    dev, b = cache["mean"].device, len(rows)
    rows = rows.to(dev)
    flip = torch.randint(0, 2, (b,), generator=gen, device=dev)
    mean, std = cache["mean"][rows, flip].float(), cache["std"][rows, flip].float()
    latents = mean + std * torch.randn(mean.shape, generator=gen, device=dev)
    counts = cache["caption_counts"][rows]
    pick = (torch.rand(b, generator=gen, device=dev) * counts).long().clamp(max=counts - 1)
    caption = cache["caption_ids"][rows, pick]
    dropped = torch.rand(b, generator=gen, device=dev) < cfg.caption_dropout
    context = cache["embeddings"][torch.where(dropped, 0, caption)].float()  # row 0 = ""
    noise = torch.randn(latents.shape, generator=gen, device=dev)
    offset = torch.randn(b, latents.shape[1], 1, 1, generator=gen, device=dev)
    noise = noise + cfg.offset_noise * offset  # offset noise lets the model shift whole-image brightness
    timesteps = torch.randint(0, cfg.num_train_timesteps, (b,), generator=gen, device=dev)
    return latents, context, noise, timesteps


def diffusion_loss(unet, scheduler, latents, context, noise, timesteps, prediction_type: str = "epsilon",
                   min_snr_gamma: float = 0.0) -> torch.Tensor:
    """MSE to the epsilon or v target, optionally min-SNR-γ weighted (Hang et al. 2023)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states=context).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps)
        weight = snr.clamp(max=min_snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
        loss = loss * torch.where(snr > 0, weight, torch.ones_like(weight))
    return loss.mean()


# ---------------------------------------------------------------- the trainer


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


def device_cache(cache: LatentCache, device) -> dict:
    ids = cache.caption_ids
    return dict(mean=cache.mean.to(device), std=cache.std.to(device), caption_ids=ids.clamp(min=0).to(device),
                caption_counts=(ids >= 0).sum(1).clamp(min=1).to(device), embeddings=cache.embeddings.to(device))


class Trainer:
    """Model, optimizer, schedule, EMA and data of one run; `step()` does one optimizer step."""

    def __init__(self, cfg: RunConfig, accelerator):
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.cfg, self.acc = cfg, accelerator
        cache = load_cache(cfg)
        self.host_cache, self.rows = cache, train_rows(cfg, cache)
        self.cache = device_cache(cache, accelerator.device)
        self.unet = build_unet_for_cache(cfg, cache).to(accelerator.device).train()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.noise_scheduler = noise_scheduler(cfg)
        self.ema = EMAModel(self.unet.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0,
                            power=cfg.ema_power, foreach=accelerator.device.type == "cuda",
                            model_cls=type(self.unet), model_config=self.unet.config)
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      fused=accelerator.device.type == "cuda")
        # Stepped by us once per optimizer step (accelerate would step a prepared one per process).
        self.lr_scheduler = get_scheduler(cfg.lr_schedule, optimizer=optimizer, num_warmup_steps=cfg.warmup_steps,
                                          num_training_steps=cfg.max_steps)
        self.model, self.optimizer = accelerator.prepare(self.unet, optimizer)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.position = 0  # items of the data stream consumed so far, all processes together

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step (grad_accum micro-batches); returns the mean loss, still on the device."""
        cfg, acc = self.cfg, self.acc
        b, p = cfg.batch_size, acc.num_processes
        losses = []
        for micro in range(cfg.grad_accum):
            rows = data_rows(self.rows, cfg.seed, self.position + acc.process_index * b, b)
            self.position += b * p
            gen = step_generator(cfg.seed, step, micro, acc.process_index, device=acc.device)
            with acc.accumulate(self.model):
                with acc.autocast():
                    loss = diffusion_loss(self.forward, self.noise_scheduler, *make_batch(self.cache, rows, gen, cfg),
                                          cfg.prediction_type, cfg.min_snr_gamma)
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
        self.lr_scheduler.step()
        self.ema.step(self.unet.parameters())
        return torch.stack(losses).mean()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def ema_unet(self):
        """A copy of the U-Net holding the EMA weights (for previews and saving)."""
        ema_unet = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.ema.copy_to(ema_unet.parameters())
        return ema_unet

    def params_finite(self) -> bool:
        return bool(torch.stack([p.detach().isfinite().all() for p in self.unet.parameters()]).all())

    # -------- checkpoints

    def state(self, step: int) -> dict:
        scaler = self.acc.scaler.state_dict() if self.acc.scaler is not None else {}
        return dict(step=step, data_position=self.position, optimizer=self.optimizer.state_dict(),
                    lr_scheduler=self.lr_scheduler.state_dict(), scaler=scaler,
                    ema_optimization_step=self.ema.optimization_step, rng=rng_states())

    def save(self, step: int) -> Path:
        names = [n for n, _ in self.unet.named_parameters()]
        ema = dict(zip(names, self.ema.shadow_params))
        return save_checkpoint(self.cfg.run_dir / "checkpoints", step, self.unet.state_dict(), ema,
                               self.state(step), self.cfg.keep_checkpoints)

    def load(self, ckpt: dict) -> int:
        self.unet.load_state_dict(ckpt["unet"])
        names = [n for n, _ in self.unet.named_parameters()]
        for shadow, name in zip(self.ema.shadow_params, names):
            shadow.copy_(ckpt["ema"][name])
        state = ckpt["state"]
        self.ema.optimization_step = state["ema_optimization_step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.acc.scaler is not None and state["scaler"]:
            self.acc.scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        self.position = state["data_position"]
        return state["step"]


def build_unet_for_cache(cfg: RunConfig, cache: LatentCache):
    """new_unet(cfg, ...) with channels, size and context width read from the cache (no frozen parts needed)."""
    from types import SimpleNamespace

    channels, size = cache.mean.shape[2], cache.mean.shape[-1]
    text = SimpleNamespace(hidden_size=cache.embeddings.shape[-1])
    autoencoder = SimpleNamespace(latent_channels=channels, downsample=cfg.resolution // size)
    return new_unet(cfg, text, autoencoder)


def rng_states() -> dict:
    np_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                python=random.getstate(), numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                 *np_state[2:]])


def set_rng_states(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(s["python"])
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))


# ---------------------------------------------------------------- logs and previews


class TrainLog:
    """train.csv + TensorBoard under <run_dir>/logs (main process only); rows past `start` are dropped on resume."""

    FIELDS = ("step", "loss", "lr", "images_per_s", "epoch")

    def __init__(self, cfg: RunConfig, start: int, active: bool):
        self.active, self.path = active, cfg.run_dir / "logs" / "train.csv"
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_log_rows(self.path) if int(r["step"]) <= start] if start else []
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        self.tb = SummaryWriter(str(cfg.run_dir / "logs" / "tensorboard"), purge_step=start + 1 if start else None)

    def write(self, rows: list[dict]) -> None:
        if not self.active:
            return
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
    rows = read_log_rows(cfg.run_dir / "logs" / "train.csv")
    return {k: [float(r[k]) for r in rows] for k in TrainLog.FIELDS}


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


def save_preview(cfg: RunConfig, ema_unet, scheduler_config: dict, prompts: list[str], step: int,
                 frozen=None) -> Path:
    """Sample the fixed prompts with fixed seeds from the EMA U-Net; write previews/step-NNNNNN.png."""
    from .images import image_grid, tensor_to_pil
    from .model import TextToImage, load_frozen_parts
    from .sample import sample_images

    text_encoder, autoencoder = frozen or load_frozen_parts(cfg, next(ema_unet.parameters()).device)
    model = TextToImage(cfg, ema_unet, text_encoder, autoencoder, scheduler_config)
    images = sample_images(model, prompts, list(range(len(prompts))), guidance=cfg.guidance, steps=cfg.sample_steps,
                           scheduler=cfg.scheduler, batch_size=cfg.sample_batch_size,
                           guidance_rescale=cfg.guidance_rescale)
    grid = image_grid([tensor_to_pil(x) for x in images], cols=min(len(prompts), 4), cell=max(64, cfg.resolution))
    out = cfg.run_dir / "previews" / f"{checkpoint_name(step)}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    (out.parent / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False, indent=1), encoding="utf-8")
    return out


# ---------------------------------------------------------------- the loop


def train(cfg: RunConfig, *, resume: bool = True, progress: bool = True, max_steps: int | None = None,
          stop_at: int | None = None) -> dict:
    """Train to cfg.max_steps (or `max_steps`), resuming from the last checkpoint; `stop_at` pauses early
    (with a checkpoint) without changing the LR schedule. Returns this session's history."""
    cfg = cfg.replace(max_steps=max_steps)
    acc = make_accelerator(cfg)
    main = acc.is_main_process
    if main:
        save_config(cfg)
        if not resume:
            _retire_checkpoints(cfg)
    acc.wait_for_everyone()
    trainer = Trainer(cfg, acc)
    start, resumed_from = 0, None
    found = latest_checkpoint(cfg.run_dir / "checkpoints") if resume else None
    if found:
        resumed_from, start = str(found[0]), trainer.load(found[1])
        if main:
            print(f"Resuming from checkpoint {found[0]} (step {start})")
    end = min(cfg.max_steps, stop_at or cfg.max_steps)
    history = dict(step=[], loss=[], lr=[], images_per_s=0.0, resumed_from=resumed_from, checkpoint=resumed_from,
                   previews=[], model_dir=None, log=str(cfg.run_dir / "logs" / "train.csv"),
                   images_per_step=cfg.batch_size * cfg.grad_accum * acc.num_processes)
    if main:
        print(f"Training {len(trainer.rows)} images ({len(trainer.rows) * 2} with flips) from step {start} to {end} "
              f"of {cfg.max_steps}; {history['images_per_step']} images/step on {acc.num_processes} "
              f"process(es), {acc.device}, mixed precision {acc.mixed_precision}")
    log = TrainLog(cfg, start, main)
    try:
        _loop(trainer, start, end, history, log, progress and main)
    finally:
        log.close()
    if end == cfg.max_steps:
        ema_unet = trainer.ema_unet()
        if main:
            history["model_dir"] = str(save_model(cfg, acc.unwrap_model(trainer.model), ema_unet,
                                                  trainer.noise_scheduler))
    acc.wait_for_everyone()
    return history


def _loop(trainer: Trainer, start: int, end: int, history: dict, log: TrainLog, progress: bool) -> None:
    cfg = trainer.cfg
    prompts = preview_prompts(cfg, trainer.host_cache) if cfg.preview_every > 0 else []
    pending, busy = [], 0.0  # (step, loss on device, lr); seconds spent on timed training steps
    bar = tqdm(total=cfg.max_steps, initial=start, desc="train", disable=not progress, unit="step")
    t0 = time.perf_counter()
    for step in range(start, end):
        lr = trainer.lr
        pending.append((step + 1, trainer.step(step), lr))
        done = step + 1
        checkpoint = done % max(cfg.checkpoint_every, 1) == 0 or done == end
        preview = bool(prompts) and (done % cfg.preview_every == 0 or done == cfg.max_steps)
        if len(pending) >= cfg.log_every or checkpoint or preview:
            busy += time.perf_counter() - t0  # flush syncs the device, so the time is real
            _flush(trainer, pending, history, log, bar, busy)
            pending = []
        if checkpoint:
            _checkpoint(trainer, done, history)
        if preview:
            _preview(trainer, done, prompts, history)
        bar.update(1)
        if pending == []:
            t0 = time.perf_counter()
    bar.close()


def _flush(trainer: Trainer, pending: list, history: dict, log: TrainLog, bar, busy: float) -> None:
    """Bring the pending losses to the host (mean over processes), stop on NaN/inf, log them."""
    losses = trainer.acc.reduce(torch.stack([l for _, l, _ in pending]), reduction="mean").cpu()
    steps = [s for s, _, _ in pending]
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise FloatingPointError(
            f"Training loss became {losses[i].item()} at step {steps[i]}: stopped. The last good checkpoint is "
            f"{history['checkpoint'] or 'none (no checkpoint was written yet)'}; lower lr (now {trainer.cfg.lr}) "
            f"or max_grad_norm, or try mixed_precision='no', then resume.")
    history["step"] += steps
    history["loss"] += losses.tolist()
    history["lr"] += [lr for _, _, lr in pending]
    images = len(history["step"]) * history["images_per_step"]
    history["images_per_s"] = images / max(busy, 1e-9)
    epoch = trainer.position / len(trainer.rows)
    log.write([dict(step=s, loss=float(l), lr=lr, images_per_s=round(history["images_per_s"], 2),
                    epoch=round(epoch, 4)) for (s, _, lr), l in zip(pending, losses)])
    bar.set_postfix(loss=f"{losses[-1].item():.4f}", lr=f"{pending[-1][2]:.2e}",
                    img_s=f"{history['images_per_s']:.0f}")


def _checkpoint(trainer: Trainer, step: int, history: dict) -> None:
    if not trainer.params_finite():
        raise FloatingPointError(f"U-Net weights are not finite after step {step}: not checkpointing. The last "
                                 f"good checkpoint is {history['checkpoint'] or 'none'}; lower lr and resume.")
    trainer.acc.wait_for_everyone()
    if trainer.acc.is_main_process:
        history["checkpoint"] = str(trainer.save(step))
    trainer.acc.wait_for_everyone()


def _preview(trainer: Trainer, step: int, prompts: list[str], history: dict) -> None:
    if trainer.acc.is_main_process:
        if not hasattr(trainer, "frozen"):
            from .model import load_frozen_parts

            trainer.frozen = load_frozen_parts(trainer.cfg, trainer.acc.device)
        path = save_preview(trainer.cfg, trainer.ema_unet(), dict(trainer.noise_scheduler.config), prompts, step,
                            trainer.frozen)
        history["previews"].append(str(path))
    trainer.acc.wait_for_everyone()


def _retire_checkpoints(cfg: RunConfig) -> None:
    """resume=False: move old checkpoints aside, so they cannot be mistaken for this run's."""
    root = cfg.run_dir / "checkpoints"
    if root.exists():
        old = cfg.run_dir / "checkpoints.old"
        shutil.rmtree(old, ignore_errors=True)
        root.rename(old)
        print(f"resume=False: moved the previous checkpoints to {old}")


# ---------------------------------------------------------------- command line (accelerate launch)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Train a run's U-Net from its latent cache (see notebooks/03).")
    parser.add_argument("--run", required=True, help="run folder, or run name under <outputs-dir>/runs")
    parser.add_argument("--outputs-dir", default="outputs")
    parser.add_argument("--max-steps", type=int, default=None, help="override the run's max_steps")
    parser.add_argument("--stop-at", type=int, default=None, help="pause at this step (with a checkpoint)")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch, ignoring checkpoints")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    run = Path(args.run)
    folder = run if (run / "config.json").exists() else resolve_path(args.outputs_dir) / "runs" / args.run
    cfg = load_config(folder)
    history = train(cfg, resume=not args.no_resume, progress=not args.no_progress, max_steps=args.max_steps,
                    stop_at=args.stop_at)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
