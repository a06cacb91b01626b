"""Staged selection against the full sweep on one trained run, on the same machine in one run.

    python benchmarks/bench_selection.py --run demo                       # after `make demo` (or 01-03 of it)
    python benchmarks/bench_selection.py --run sel --outputs-dir /tmp/o --prompts 48 --stages 8,16 --orders 50
                                                                          # a quick look at a short run

1. The staged sweep of 04_sample (the run config's stages and keep share, or --stages/--keep), timed.
2. The full sweep over the same cells on every judged prompt (demo: all 240), timed: the ground truth.
   Both sample into fresh folders under <run>/selection/bench-<time>/, so nothing earlier is reused.
3. The replay of the staged procedure over --orders random prompt orders on the full sweep's records
   (helpers.replay), for the config's plan and every --plan given: how often it picks the full sweep's winner or a
   setting within its full-N noise (paired bootstrap over prompts), and its cost in images.
Prints a markdown block for benchmarks/RESULTS.md: the time ratio staged / full and the replay table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from helpers.replay import parse_plan

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--outputs-dir", default="outputs")
    p.add_argument("--stages", default=None, help="screening stage sizes, e.g. 24,80 (default: the run config's)")
    p.add_argument("--keep", type=float, default=None, help="share kept per stage (default: the run config's)")
    p.add_argument("--plan", action="append", type=parse_plan, default=[],
                   help="more plans to replay, e.g. 16,48:0.25 (repeatable)")
    p.add_argument("--orders", type=int, default=200)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--prompts", type=int, default=None,
                   help="judge this many test prompts (a seeded subset) instead of the config's sweep_prompts (0 = all)")
    p.add_argument("--snapshots", default=None, help="sweep these snapshots, e.g. step-000030,step-000060")
    p.add_argument("--ema-lengths", default=None, help="sweep these EMA lengths, e.g. 0 (default: the config's)")
    p.add_argument("--probe-steps", type=int, default=400)
    p.add_argument("--torch-threads", type=int, default=None)
    args = p.parse_args(argv)

    import torch

    from helpers.judges import judge_for_run
    from helpers.replay import load_full_sweep, replay_table
    from helpers.run_folder import open_run
    from helpers.selection import choose, sweep_axes, sweep_settings
    from helpers.setting import Setting
    from helpers.staged import staged_sweep
    from helpers.weights import load_for_setting

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cfg = open_run(args.run, None, args.outputs_dir)
    stages = cfg.sweep_stage_prompts if args.stages is None else [int(x) for x in args.stages.split(",") if x]
    keep = cfg.sweep_keep if args.keep is None else args.keep
    axes = sweep_axes(cfg, snapshots=args.snapshots.split(",") if args.snapshots else None,
                      ema_lengths=[float(x) for x in args.ema_lengths.split(",")] if args.ema_lengths else None)
    base = Setting.from_config(cfg, snapshot=axes["snapshot"][-1])
    settings = sweep_settings(base, **axes)
    model, _ = load_for_setting(cfg, base)
    count = cfg.sweep_prompts if args.prompts is None else args.prompts
    judged, skipped = judge_for_run(cfg, count, probe_steps=args.probe_steps)
    if judged is None:
        raise SystemExit(f"no judge for run {cfg.run_name}: {skipped}")
    bench = cfg.layout.selection / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    common = dict(batch_size=cfg.sample_batch_size, keep=keep, budget_hours=0)

    t0 = time.perf_counter()
    staged_rows, _ = staged_sweep(model, cfg, judged.judge, settings, judged.texts, judged.seeds,
                                  stage_prompts=stages, folder=bench / "staged", **common)
    staged_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    full_rows, _ = staged_sweep(model, cfg, judged.judge, settings, judged.texts, judged.seeds, stage_prompts=[],
                                folder=bench / "full", **common)
    full_s = time.perf_counter() - t0

    staged_pick, full_pick = choose(staged_rows, judged.judge), choose(full_rows, judged.judge)
    sweep = load_full_sweep(bench / "full")
    table, _ = replay_table(sweep, [(stages, keep)] + args.plan, orders=args.orders, bootstrap=args.bootstrap)
    device = str(model.device) + (f", {torch.get_num_threads()} threads" if model.device.type == "cpu" else "")
    print(f"\n### Staged selection vs the full sweep ({cfg.run_name}, {cfg.profile}; {device})\n")
    print(f"{len(settings)} cells on {judged.note}; staged: stages {stages} + all, keep {keep:g}\n")
    print(f"- staged sweep: {staged_s:.0f} s, picked {Setting.from_dict(staged_pick['setting']).label()}")
    print(f"- full sweep: {full_s:.0f} s, picked {Setting.from_dict(full_pick['setting']).label()}")
    print(f"- time ratio staged / full: {staged_s / full_s:.2f} (same cells, same machine, this run)\n")
    print(table)
    print(f"\nrecords: {bench} (the full sweep's can be replayed again: python -m helpers.replay --run {cfg.run_name} "
          f"--outputs-dir {args.outputs_dir} --records {bench / 'full'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
