"""Per-step cost of immiscible noise pairing (helpers.diffusion.immiscible_pairing) on the demo's training step.

    python benchmarks/bench_immiscible.py --steps 10     # demo U-Net, batch 64, CPU: ratio with / without pairing

Alternates steps with and without the pairing on one U-Net (so host load hits both alike) and also times the
pairing alone; prints the median step time of each and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.config import profile_config  # noqa: E402
from helpers.diffusion import immiscible_pairing  # noqa: E402
from helpers.model import training_objective  # noqa: E402
from helpers.step import DeviceCache, step_generator  # noqa: E402
from helpers.unet import build_unet  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    p.add_argument("--profile", default="demo")
    args = p.parse_args(argv)
    cfg = profile_config(args.profile)
    n, b, size, tokens, hidden = 512, cfg.batch_size, cfg.resolution, 16, 384
    unet = build_unet(cfg.unet_preset, 3, hidden, size)
    cache = DeviceCache(torch.randn(n, 2, 3, size, size).half(), torch.zeros(n, 2, 3, size, size).half(),
                        torch.randint(1, 50, (n, 1)), torch.ones(n, dtype=torch.long),
                        torch.randn(50, tokens, hidden).half())
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    objectives = {False: training_objective(cfg), True: training_objective(cfg.replace(immiscible_noise=True))}
    times = {False: [], True: []}
    for i in range(2 * args.steps + 2):
        immiscible = bool(i % 2)
        rows = torch.randint(0, n, (b,), generator=step_generator(0, "rows", i))
        t0 = time.perf_counter()
        x0, context, eps, t = cache.batch(rows, step_generator(0, i), cfg.caption_dropout, cfg.offset_noise,
                                          objectives[immiscible], cfg.hflip)
        objectives[immiscible].loss(unet, x0, context, eps, t).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # the first of each kind warms up
            times[immiscible].append(time.perf_counter() - t0)
    x0, eps = torch.randn(b, 3, size, size), torch.randn(b, 3, size, size)
    pairing = []
    for _ in range(20):
        t0 = time.perf_counter()
        immiscible_pairing(x0, eps)
        pairing.append(time.perf_counter() - t0)
    plain, paired, alone = (statistics.median(x) for x in (times[False], times[True], pairing))
    print(f"{args.profile} batch {b}, {size} px, torch threads {torch.get_num_threads()}: step {plain * 1e3:.0f} ms "
          f"plain, {paired * 1e3:.0f} ms with immiscible pairing (ratio {paired / plain:.3f}); the pairing alone "
          f"{alone * 1e3:.2f} ms = {alone / plain * 100:.2f} % of a plain step")


if __name__ == "__main__":
    main()
