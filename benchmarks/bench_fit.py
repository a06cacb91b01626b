"""Fitting a training step to a GPU's memory: peak memory, images/s and MFU of the configured step, then the
automatic fit (helpers.fit.plan_fit) under a memory cap, e.g. a 16 GB card simulated on a bigger one.

    python benchmarks/bench_fit.py --device cuda --preset hw6-recipe --batch 64 --steps 10 --cap-gb 16   # one GPU
    python benchmarks/bench_fit.py --device cpu --preset hw6-recipe --batch 1,4 --steps 1 --warmup 0 \\
        --mixed-precision bf16 --no-fit                                          # the issue's CPU memory figures
    python benchmarks/bench_fit.py --device cpu --preset tiny --batch 8 --steps 1 --simulate-oom   # CI smoke

Random-initialised U-Net of the preset at the course's shapes (4x32x32 latents, 77 tokens of width 512; `tiny`:
4x16x16, 16 tokens of width 32) and a random latent cache on the device; each measurement is helpers.fit.measure_step:
the run's loss (hw6: epsilon, linear betas), fused AdamW on CUDA, grad clipping, the EMA, autocast as configured.
Memory: torch.cuda.max_memory_allocated on CUDA; on a CPU the figure helpers.fit computes from the tensors (weights,
gradients, AdamW, EMA, tensors saved for backward), with the process's RSS high-water mark printed beside it.
MFU = 3 x forward FLOPs (torch's counter, attention products included) x images/s / --peak-flops.
"""
from __future__ import annotations

import argparse
import datetime
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import fit  # noqa: E402
from helpers.config import profile_config  # noqa: E402
from helpers.step import DeviceCache, unet_for_cache  # noqa: E402
from helpers.unet import count_params, forward_gflops  # noqa: E402

SHAPES = {"tiny": (16, 16, 32)}  # preset -> (latent size, tokens, text width); every other preset: the course's
COURSE_SHAPE = (32, 77, 512)


def random_cache(n: int, latent: int, tokens: int, hidden: int, device) -> DeviceCache:
    """A stand-in for the latent cache on the device (what training indexes): random latents and captions."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(n, 2, 4, latent, latent, generator=g).half()
    return DeviceCache(mean.to(device), (torch.rand(mean.shape, generator=g) * 0.1).half().to(device),
                       torch.randint(1, 2 * n, (n, 3), generator=g).to(device), torch.full((n,), 3).to(device),
                       torch.randn(2 * n, tokens, hidden, generator=g).half().to(device))


def row(preset, batch, cost, gflop, peak_flops, device, label: str = "") -> str:
    mfu = f"{3 * gflop * 1e9 * cost.images_per_s / peak_flops:.1%}" if device.type == "cuda" else "n/a"
    return (f"| {preset} | {batch} | {cost.setting()}{label} | {cost.peak_bytes / 2**30:.2f} | "
            f"{cost.device_bytes / 2**30:.1f} | {cost.images_per_s:.3g} | {mfu} | {cost.memory_source} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="hw6-recipe")
    p.add_argument("--batch", default="64", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mixed-precision", default="auto", help="the run's mixed_precision (auto: bf16 on CUDA)")
    p.add_argument("--cap-gb", type=float, default=16.0, help="CUDA: cap this process to this many GB, then fit")
    p.add_argument("--no-fit", action="store_true", help="only measure the configured step")
    p.add_argument("--simulate-oom", action="store_true", help="the fit's first attempt raises OutOfMemoryError")
    p.add_argument("--peak-flops", type=float, default=989e12, help="peak dense FLOP/s (H100/H200 bf16: 989e12)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    latent, tokens, hidden = SHAPES.get(args.preset, COURSE_SHAPE)
    batches = [int(b) for b in args.batch.split(",")]
    data = random_cache(max(4 * max(batches), 64), latent, tokens, hidden, device)
    rows = torch.arange(len(data.mean))
    profile = "tiny" if args.preset == "tiny" else "hw6"
    header = ("| preset | batch | setting | peak memory (GiB) | device (GiB) | images/s | MFU | memory measured as |\n"
              "|---|---|---|---|---|---|---|---|")
    lines = []
    for batch in batches:
        cfg = profile_config(profile, unet_preset=args.preset, batch_size=batch, mixed_precision=args.mixed_precision)
        try_step = fit.probe_step(cfg, data, data, rows, device, steps=args.steps)
        unet = unet_for_cache(cfg, data).to(device)
        gflop, params = forward_gflops(unet, latent, tokens), count_params(unet)
        try:
            cost = fit.measure_step(cfg, unet, fit.draw_batch(cfg, data, rows), steps=args.steps, warmup=args.warmup)
            lines.append(row(args.preset, batch, cost, gflop, args.peak_flops, device))
        except torch.cuda.OutOfMemoryError:
            lines.append(f"| {args.preset} | {batch} | micro_splits 1 | out of memory | | | | |")
        del unet
        fit.free_memory(device)
        if args.no_fit:
            continue
        if device.type == "cuda" and args.cap_gb:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 1e9 / total), device)
        attempts = []

        def capped_step(splits, checkpointing):
            attempts.append((splits, checkpointing))
            if args.simulate_oom and len(attempts) == 1:
                raise torch.cuda.OutOfMemoryError("simulated by --simulate-oom")
            return try_step(splits, checkpointing)

        chosen, tried = fit.plan_fit(batch, capped_step)
        print(f"auto_fit at batch {batch} on {chosen.device}: tried {fit.describe_tried(tried)} -> {chosen.setting()}")
        lines.append(row(args.preset, batch, chosen, gflop, args.peak_flops, device, " (auto_fit)"))
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{datetime.date.today()} · {name} · {args.preset}: {params / 1e6:.1f} M params, {gflop:.2f} GFLOP "
          f"fwd/img at {latent}x{latent}, {tokens} tokens x {hidden} · mixed_precision {args.mixed_precision} · "
          f"{args.steps} timed steps after {args.warmup}\n")
    print(header + "\n" + "\n".join(lines))
    if device.type == "cpu":
        print(f"\nprocess RSS high-water mark (ru_maxrss, whole process incl. libraries): "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return lines


if __name__ == "__main__":
    main()
