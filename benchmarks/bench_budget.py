"""The time budget's estimates against what happened: 03's training and 04's choosing and writing, per preset.

    python benchmarks/bench_budget.py --presets tiny,demo --hours 1 --outputs-dir outputs/bench-budget

Each preset runs notebooks 01-04 headless (helpers.runs) into a fresh run with `time_budget_hours`. The plan that
03 prints before step 1 is read back from the run's budget.json (`first_plan`), as is its correction at the end of
warm-up and the reserve for 04, part by part. Actual times: 03's training is train()'s wall time (budget.json's
sessions: from train() starting, set-up included, to the final model), 04's is the notebook's wall time as
helpers.runs measures it (kernel start and imports included). Prints a markdown table; rows go to
<outputs-dir>/budget.json. Run it on idle cores: the estimates are made from timings.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_preset(preset: str, outputs_dir: Path, hours: float, extra: dict) -> dict:
    from helpers.run_folder import load_config
    from helpers.runs import run_pipeline

    name = f"budget-{preset}"
    run_dir = outputs_dir / "runs" / name
    if run_dir.exists():  # a fresh plan each time: the earlier run is moved aside, never deleted
        shutil.move(str(run_dir), str(run_dir.with_name(f"{name}.old-{int(time.time())}")))
    seconds = {}
    for notebook in ("01_data", "02_unet_arch", "03_train_cfg", "04_sample"):
        start = time.perf_counter()
        run_pipeline(name, preset, str(outputs_dir), {"time_budget_hours": hours, **extra}, notebooks=[notebook])
        seconds[notebook] = time.perf_counter() - start
    cfg = load_config(run_dir)
    record = json.loads(cfg.layout.budget.read_text())
    trained = sum(s["seconds"] for s in record["sessions"])
    return {"preset": preset, "hours": hours, "steps": record["steps"], "first_steps": record["first_plan"]["steps"],
            "train_first": record["first_plan"]["seconds"], "train_corrected": record["seconds"],
            "train_actual": trained, "notebook_03": seconds["03_train_cfg"],
            "after_predicted": record["after_training_s"], "parts": record["parts"],
            "after_actual": seconds["04_sample"], "images_per_s": record["images_per_s"],
            "first_images_per_s": record["first_plan"]["images_per_s"]}


def ratio(predicted: float, actual: float) -> str:
    return f"{predicted:.0f} s / {actual:.0f} s = {predicted / actual:.2f}"


def print_table(rows: list[dict]) -> None:
    print("| preset | 03 plan before step 1 (images/s) | 03 plan after warm-up (images/s) | 03 predicted / actual "
          "| 04 predicted / actual | 04 parts (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in r["parts"].items())
        print(f"| {r['preset']} | {r['first_steps']} steps, {r['train_first']:.0f} s ({r['first_images_per_s']:.1f}) "
              f"| {r['steps']} steps, {r['train_corrected']:.0f} s ({r['images_per_s']:.1f}) "
              f"| {ratio(r['train_corrected'], r['train_actual'])} | {ratio(r['after_predicted'], r['after_actual'])} "
              f"| {parts} |")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="tiny,demo")
    ap.add_argument("--hours", type=float, default=1.0, help="time_budget_hours of every run")
    ap.add_argument("--outputs-dir", default="outputs/bench-budget")
    ap.add_argument("-p", "--param", action="append", default=[], help="key=value for every run (helpers.runs -p)")
    args = ap.parse_args(argv)
    from helpers.runs import parse_parameter

    extra = dict(parse_parameter(p) for p in args.param)
    outputs_dir = Path(args.outputs_dir)
    rows = [run_preset(p, outputs_dir, args.hours, extra) for p in args.presets.split(",")]
    (outputs_dir / "budget.json").write_text(json.dumps(rows, indent=1))
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
