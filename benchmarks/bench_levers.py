"""Recipe levers measured on the demo: same data, same seeds, one change at a time against the demo defaults.

    python benchmarks/bench_levers.py --outputs-dir outputs/levers                 # every lever, 900 steps each
    python benchmarks/bench_levers.py --levers baseline,dropout-0.05 --max-steps 300 # a subset, shorter
    python benchmarks/bench_levers.py --size tiny                                    # CI smoke (seconds)

Each lever trains a run of the demo profile from scratch with one setting changed (the latent cache and the
probe are shared, keyed by what made them), samples every demo test prompt (attribute combinations never seen
in training) at each guidance scale with the same seeds, and scores them with the demo probe: accuracy per
attribute and the probe Fréchet distance. Sampling-only levers (where guidance applies) reuse the baseline's model.
Prints a markdown table (the best guidance per lever, by the probe rule of helpers.judges) and writes all rows
to <outputs-dir>/levers.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.config import open_run  # noqa: E402

# lever -> (config overrides for training, sampling overrides)
LEVERS: dict[str, tuple[dict, dict]] = {
    "baseline": ({}, {}),
    "hflip": ({"hflip": True}, {}),
    "dropout-0.05": ({"caption_dropout": 0.05}, {}),
    "min-snr-off": ({"min_snr_gamma": 0.0}, {}),
    "epsilon": ({"prediction_type": "epsilon"}, {}),
    "ema-halflife-2.5k": ({"ema_halflife_images": 2_500.0, "ema_rampup": 0.0}, {}),
    "crop-to-content": ({"crop_to_content": True}, {}),
    "guide-every-step": ({}, {"guidance_interval": ()}),
}


def measure(lever: str, outputs_dir: Path, data_dir: str, max_steps: int, guidances, steps: int, size: str) -> list:
    from helpers.cache import build_cache, write_split
    from helpers.data import load_records
    from helpers.demo_data import ensure_dataset
    from helpers.judges import judge_for_run
    from helpers.model import load_model
    from helpers.sample import sample_images
    from helpers.setting import Setting
    from helpers.train import train

    overrides, sampling = LEVERS[lever]
    trained_as = "baseline" if not overrides else lever  # sampling-only levers reuse the baseline model
    profile = "tiny" if size == "tiny" else "demo"
    cfg = open_run(f"lever-{trained_as}", profile, str(outputs_dir), data_dir=data_dir, max_steps=max_steps,
                   preview_every=0, snapshot_every=0, **overrides)
    ensure_dataset(cfg, **({"num_monsters": 8, "num_test_monsters": 2, "frames_per_action": 1}
                           if size == "tiny" else {}))
    t0 = time.perf_counter()
    if not cfg.layout.unet_dir("model").exists():
        records, _ = load_records(cfg.data_path)
        write_split(cfg, records)
        build_cache(cfg, records, progress=False)
        train(cfg, progress=False)
    train_s = time.perf_counter() - t0
    judged, _ = judge_for_run(cfg, 0, probe_steps=50 if size == "tiny" else 400)
    model = load_model(cfg)
    rows = []
    for g in guidances:
        t0 = time.perf_counter()
        setting = Setting.from_config(cfg).replace(guidance=g, steps=steps, **sampling)
        images = sample_images(model, judged.texts, judged.seeds, setting, batch_size=cfg.sample_batch_size)
        rows.append({"lever": lever, "guidance": g, "steps": steps, "train_s": round(train_s, 1),
                     "sample_s": round(time.perf_counter() - t0, 1), **judged.judge.evaluate(images)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outputs-dir", default="outputs/levers")
    ap.add_argument("--data-dir", default="data/demo")
    ap.add_argument("--levers", default=",".join(LEVERS))
    ap.add_argument("--max-steps", type=int, default=900)
    ap.add_argument("--guidances", default="1,2,3")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", choices=["demo", "tiny"], default="demo")
    args = ap.parse_args(argv)
    outputs_dir = Path(args.outputs_dir).resolve()
    guidances = [float(g) for g in args.guidances.split(",")]
    rows = []
    for lever in args.levers.split(","):
        rows += measure(lever, outputs_dir, args.data_dir, args.max_steps, guidances, args.steps, args.size)
        (outputs_dir / "levers.json").write_text(json.dumps(rows, indent=1))
    print("| lever | best guidance | colour | shape | eyes | extra | action | mean (c, s, a) | probe FD | "
          "mean at g=1 | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for lever in dict.fromkeys(r["lever"] for r in rows):
        mine = [r for r in rows if r["lever"] == lever]
        best = min(mine, key=lambda r: (-r["mean_accuracy"], r["frechet_distance"], r["guidance"]))
        plain = next((r for r in mine if r["guidance"] == 1.0), None)
        a = best["accuracy"]
        print(f"| {lever} | {best['guidance']:g} | {a['color']:.3f} | {a['shape']:.3f} | {a['eyes']:.3f} | "
              f"{a['extra']:.3f} | {a['action']:.3f} | {best['mean_accuracy']:.3f} | {best['frechet_distance']:.1f} | "
              f"{plain['mean_accuracy'] if plain else float('nan'):.3f} | {best['train_s']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
