"""Training throughput: our cached-latent step vs the course's reference loop, side by side in one run.

    python benchmarks/bench_train.py --device cuda --size full --batch 64 --steps 30   # one H100
    python benchmarks/bench_train.py --device cpu --size tiny --batch 8 --steps 5      # CI smoke

`full` uses the real architectures with random weights (nothing to download): the hw6-base U-Net,
the CLIP ViT-B/32 text tower (`CLIPTextConfig()` defaults, hidden 512, 77 tokens) and the SD VAE
config at 256x256 (latents 4x32x32). `tiny` shrinks all three so that a CPU finishes in seconds.

- ours: latents (mean, std of both flips) and caption embeddings already cached on the device,
  one step = helpers.train.DeviceCache.batch + helpers.diffusion.diffusion_loss, bf16 autocast on CUDA, fused AdamW, grad
  clipping and the EMA update (so ours does strictly more than the reference besides the encoders).
- reference: images on the device; every step runs the VAE encoder and the text encoder, then the
  U-Net under fp16 autocast with a GradScaler, plain AdamW, no EMA.
MFU = U-Net training FLOPs (3x the forward, counted by torch's FLOP counter) x images/s / peak.
On CPU both loops run in fp32 and MFU is printed as n/a.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.config import profile_config  # noqa: E402
from helpers.model import noise_scheduler  # noqa: E402
from helpers.diffusion import EMA, diffusion_loss  # noqa: E402
from helpers.step import DeviceCache, step_generator  # noqa: E402
from helpers.unet import build_unet, count_params, forward_gflops  # noqa: E402


def build_parts(size: str, device):
    """(U-Net, text encoder, VAE, resolution, tokens), random weights, real or shrunken architectures."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    if size == "full":
        text = CLIPTextModel(CLIPTextConfig())
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            sample_size=256)
        resolution, tokens, preset = 256, 77, "hw6-base"
    else:
        text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, max_position_embeddings=77,
                                            pad_token_id=1, bos_token_id=0, eos_token_id=2))
        vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                            layers_per_block=1, sample_size=32)
        resolution, tokens, preset = 32, 16, "tiny"
    latent = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    unet = build_unet(preset, 4, text.config.hidden_size, latent)
    frozen = [m.to(device).eval().requires_grad_(False) for m in (text, vae)]
    return unet.to(device), *frozen, resolution, tokens, latent


def timed(step, steps: int, warmup: int, device) -> float:
    """Seconds per step after `warmup` untimed steps; resets and reads peak memory on CUDA."""
    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def our_step_fn(unet, cfg, batch: int, latent: int, tokens: int, hidden: int, device):
    n, captions = 4 * batch, 2 * batch
    cache = DeviceCache(mean=torch.randn(n, 2, 4, latent, latent, device=device, dtype=torch.float16),
                        std=torch.rand(n, 2, 4, latent, latent, device=device, dtype=torch.float16) * 0.1,
                        caption_ids=torch.randint(1, captions, (n, 3), device=device),
                        caption_counts=torch.full((n,), 3, device=device),
                        embeddings=torch.randn(captions, tokens, hidden, device=device, dtype=torch.float16))
    alphas_cumprod = noise_scheduler(cfg).alphas_cumprod.to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=device.type == "cuda")
    ema = EMA(unet, cfg.ema_halflife_images, cfg.ema_rampup)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step(i):
        rows = torch.randint(0, n, (batch,), generator=step_generator(0, "rows", i))
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            x0, context, eps, t = cache.batch(rows, step_generator(0, i, device=device), cfg.caption_dropout,
                                              cfg.offset_noise, cfg.num_train_timesteps, cfg.hflip)
            loss = diffusion_loss(unet, x0, context, eps, t, alphas_cumprod, cfg.prediction_type, cfg.min_snr_gamma)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(unet, batch)
    return step


def reference_step_fn(unet, text, vae, batch: int, resolution: int, tokens: int, device):
    """The course's loop: encode images and captions on every step, fp16 autocast + GradScaler."""
    from diffusers import DDPMScheduler

    images = torch.rand(4 * batch, 3, resolution, resolution, device=device) * 2 - 1
    ids = torch.randint(0, text.config.vocab_size, (4 * batch, tokens), device=device)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)

    def step(i):
        rows = torch.randint(0, len(images), (batch,), device=device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            with torch.no_grad():
                latents = vae.encode(images[rows]).latent_dist.sample() * 0.18215
                context = text(ids[rows])[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (batch,), device=device)
            pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step


def encoder_gflops(text, vae, resolution: int, tokens: int, device) -> float:
    """Forward GFLOP per image of the VAE encoder + text encoder (what the reference adds per step)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encode(torch.zeros(1, 3, resolution, resolution, device=device))
        text(torch.zeros(1, tokens, dtype=torch.long, device=device))
    return counter.get_total_flops() / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--size", choices=["tiny", "full"], default="full")
    p.add_argument("--peak-flops", type=float, default=989e12, help="peak dense FLOP/s (H100 SXM bf16: 989e12)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    unet, text, vae, resolution, tokens, latent = build_parts(args.size, device)
    unet_gflop = forward_gflops(unet, latent, tokens)
    enc_gflop = encoder_gflops(text, vae, resolution, tokens, device)
    cfg = profile_config("hw6" if args.size == "full" else "tiny")
    rows = []
    for name, make in (("ours (cached latents)", lambda: our_step_fn(unet, cfg, args.batch, latent, tokens,
                                                                     text.config.hidden_size, device)),
                       ("reference (encode every step)", lambda: reference_step_fn(unet, text, vae, args.batch,
                                                                                   resolution, tokens, device))):
        unet.train()
        seconds = timed(make(), args.steps, args.warmup, device)
        ips = args.batch / seconds
        mfu = f"{3 * unet_gflop * 1e9 * ips / args.peak_flops:.1%}" if device.type == "cuda" else "n/a"
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.type == "cuda" else "n/a"
        rows.append((name, ips, mfu, mem))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{datetime.date.today()} · {device_name} · size {args.size} ({resolution}px, latents 4x{latent}x{latent}, "
          f"U-Net {count_params(unet) / 1e6:.1f} M params, {unet_gflop:.2f} GFLOP fwd/img; encoders "
          f"{enc_gflop:.2f} GFLOP/img) · batch {args.batch} · {args.steps} timed steps\n")
    print("| loop | images/s | MFU (U-Net train FLOPs) | peak GPU memory (GiB) |\n|---|---|---|---|")
    for name, ips, mfu, mem in rows:
        print(f"| {name} | {ips:.3g} | {mfu} | {mem} |")
    print(f"\nspeed-up of ours over the reference: {rows[0][1] / rows[1][1]:.2f}x")
    return rows


if __name__ == "__main__":
    main()
