"""CPU speed levers for the demo, in one run against today's fp32 path: bf16 autocast, channels-last, torch.compile.

    python benchmarks/bench_cpu.py                      # training steps and sampling, every variant
    python benchmarks/bench_cpu.py --steps 3 --size tiny  # CI smoke

Training: one demo-preset U-Net step (forward, backward, AdamW) on a batch of 64 16×16 images with 32 caption
tokens of width 384, as `make demo` trains. Sampling: one CFG denoising step (batch 2 × 64). Each variant starts
from the same weights and data; the fp32 eager row is the reference (ratio 1.00). `torch.compile` time is
reported separately and excluded from the step time. Run it on an idle machine: other jobs skew every ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.config import profile_config  # noqa: E402
from helpers.model import training_objective  # noqa: E402
from helpers.unet import build_unet  # noqa: E402

VARIANTS = {"fp32": {}, "bf16 autocast": {"bf16": True}, "channels-last": {"channels_last": True},
            "torch.compile": {"compile": True}}


def make_inputs(size: str):
    preset, res, batch, tokens, width = ("tiny", 16, 8, 16, 32) if size == "tiny" else ("demo", 16, 64, 32, 384)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 3, res, res, generator=g)
    return preset, dict(x0=x0, eps=torch.randn(x0.shape, generator=g), context=torch.randn(batch, tokens, width,
                        generator=g)), width


def run_variant(name: str, size: str, steps: int, warmup: int) -> dict:
    opts = VARIANTS[name]
    preset, inputs, width = make_inputs(size)
    unet = build_unet(preset, 3, width, 16, seed=0)
    if opts.get("channels_last"):
        unet = unet.to(memory_format=torch.channels_last)
        inputs["x0"] = inputs["x0"].contiguous(memory_format=torch.channels_last)
    forward = unet
    compile_s = 0.0
    if opts.get("compile"):
        forward = torch.compile(unet)
    objective = training_objective(profile_config("demo"))  # the demo's loss and its draw of t
    t = objective.draw_t(len(inputs["x0"]), torch.Generator().manual_seed(1), "cpu")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if opts.get("bf16") else contextlib.nullcontext()
    batch = len(inputs["x0"])

    def train_step():
        with autocast:
            loss = objective.loss(forward, inputs["x0"], inputs["context"], inputs["eps"], t)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample_step():
        x = torch.cat([inputs["x0"]] * 2)
        with autocast:
            forward(x, torch.full((len(x),), 500), encoder_hidden_states=torch.cat([inputs["context"]] * 2))

    out = {}
    for label, fn, images in (("train", train_step, batch), ("sample", sample_step, batch)):
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        compile_s += time.perf_counter() - t0 if opts.get("compile") else 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        out[f"{label}_images_per_s"] = images * steps / (time.perf_counter() - t0)
    out["compile_s"] = compile_s
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["demo", "tiny"], default="demo")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    rows = {name: run_variant(name, args.size, args.steps, args.warmup) for name in args.variants.split(",")}
    ref = rows.get("fp32")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, size {args.size}, {args.steps} steps")
    print(f"{'variant':15} {'train img/s':>12} {'ratio':>6} {'sample img/s':>13} {'ratio':>6} {'compile s':>10}")
    for name, r in rows.items():
        tr = r["train_images_per_s"] / ref["train_images_per_s"] if ref else float("nan")
        sr = r["sample_images_per_s"] / ref["sample_images_per_s"] if ref else float("nan")
        print(f"{name:15} {r['train_images_per_s']:12.1f} {tr:6.2f} {r['sample_images_per_s']:13.1f} {sr:6.2f} "
              f"{r['compile_s']:10.1f}")
    return rows


if __name__ == "__main__":
    main()
