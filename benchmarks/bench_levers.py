"""Recipe levers measured on the demo: same data, same seeds, one change at a time against the demo defaults.

    python benchmarks/bench_levers.py --outputs-dir outputs/levers                 # every lever, 900 steps each
    python benchmarks/bench_levers.py --levers baseline,dropout-0.05 --max-steps 300 # a subset, shorter
    python benchmarks/bench_levers.py --size tiny                                    # CI smoke (seconds)
    python benchmarks/bench_levers.py --setting-levers fixed-ema,phema-0.10,autoguide-early-w2 --seeds 3
                                                  # post-hoc EMA / autoguidance: one model, >= 3 seeds x 240 prompts
    python benchmarks/bench_levers.py --objectives v,epsilon,flow,flow-mean-0.5 --seeds 3 --guidances 2
                                                  # training objectives: a run per objective and training seed
    python benchmarks/bench_levers.py --cpu-precision --seeds 3 --max-steps 600 --guidances 2 --steps 10
                                                  # fp32 against bf16 sampling, paired on each training seed
    python benchmarks/bench_levers.py --cpu-precision --run-dirs outputs/levers-600/runs/lever-flow-600-seed0,...
                                                  # the same on runs trained before

Each lever trains a run of the demo profile from scratch with one setting changed (the latent cache and the
probe are shared, keyed by what made them), samples every demo test prompt (attribute combinations never seen
in training) at each guidance scale with the same seeds, and scores them with the demo probe: accuracy per
attribute and the probe Fréchet distance. Sampling-only levers (where guidance applies) reuse the baseline's model.
Prints a markdown table (the best guidance per lever, by the probe rule of helpers.judges) and writes all rows
to <outputs-dir>/levers.json.

`--setting-levers` measures choices of the sampling setting instead (helpers.setting.Setting overrides on the demo's
chosen setting: the final U-Net, guidance `--guidances`, `--steps`, the config's interval): post-hoc EMA lengths and
autoguidance by an early snapshot. They share one model, trained with snapshots and post-hoc EMA profiles every 1/16 of
its steps (the first snapshot is the early guide). Each is sampled with `--seeds` sets of
per-prompt seeds on every test prompt and the table gives mean and spread (sample standard deviation over the seed
sets) of the probe's eyes accuracy, mean accuracy over colour, shape, action, and probe Fréchet distance, so that a
difference can be told from sampling noise. Rows go to <outputs-dir>/setting_levers.json.

`--objectives` compares training objectives (OBJECTIVES): each trains `--seeds` runs (run seed 0, 1, ...: training
stream and validation split), all the same number of steps: the U-Net and its cost per step are the same whatever
it predicts, so equal steps are equal training time (the table shows the measured seconds). Every run samples all
test prompts with the test set's seeds at the demo's setting (final EMA U-Net, `--guidances`, `--steps`, the config's
interval and scheduler); its images are scored as the handed-in PNGs read back (256 px nearest-neighbour, reduced to
the model's resolution) by one probe (run seed 0's). The table gives mean ± sd over training seeds of eyes, the
mean of colour, shape and action, probe FD, and each one's paired difference to "v" (the demo before flow) on the same
seed, plus images/s of sampling. Rows go to <outputs-dir>/objectives.json.

`--cpu-precision` measures what bf16 sampling (helpers.precision: "auto" on a CPU with AMX or AVX512-BF16) costs in
quality: each trained model (the demo's objective, "flow", trained for each of `--seeds` training seeds as
`--objectives flow` names it, so those runs are reused; or the runs of `--run-dirs`) samples all test prompts at one
fixed setting (final EMA U-Net, the first of `--guidances`, `--steps`) twice, with the same seeds: fp32 and bf16
autocast. Both are scored the same way, as handed in, by one probe (run seed 0's): accuracy per attribute and probe FD.
The table pairs them per training seed (bf16 − fp32) and gives mean ± sd of the paired differences. Rows go to
<outputs-dir>/cpu_precision/, one file each, and <outputs-dir>/cpu_precision.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.run_folder import open_run  # noqa: E402

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


# setting lever -> Setting overrides (post-hoc EMA lengths, autoguidance by an early snapshot). "early" is the run's
# first snapshot, which the setting-lever run keeps at ~1/16 of its training (the paper's default guide)
SETTING_LEVERS: dict[str, dict] = {
    "fixed-ema": {},  # today: the half-life EMA of the final U-Net
    "phema-0.025": {"ema_length": 0.025}, "phema-0.05": {"ema_length": 0.05},
    "phema-0.10": {"ema_length": 0.10}, "phema-0.15": {"ema_length": 0.15},
    "phema-0.20": {"ema_length": 0.20},
    "autoguide-early-w1.25": {"guide": "early", "guide_weight": 1.25},
    "autoguide-early-w1.5": {"guide": "early", "guide_weight": 1.5},
    "autoguide-quarter-w1.5": {"guide": "quarter", "guide_weight": 1.5},  # the snapshot at ~1/4 of training
    "autoguide-early-w2": {"guide": "early", "guide_weight": 2.0},
}


# training objective -> config overrides (helpers.diffusion). "v" is the demo's before issue 25: v_prediction,
# min-SNR 5, cosine; "epsilon" the hw6 recipe's: epsilon on linear betas, no min-SNR; flow: rectified flow, SD3's
# logit-normal t (the demo's now)
FLOW = {"prediction_type": "flow_prediction", "min_snr_gamma": 0.0, "timestep_density": "logit_normal"}
OBJECTIVES: dict[str, dict] = {
    "v": {"prediction_type": "v_prediction", "min_snr_gamma": 5.0, "beta_schedule": "squaredcos_cap_v2"},
    "epsilon": {"prediction_type": "epsilon", "beta_schedule": "linear", "min_snr_gamma": 0.0},
    "flow": {**FLOW, "logit_mean": 0.0, "logit_std": 1.0},
    "flow-mean-0.5": {**FLOW, "logit_mean": -0.5, "logit_std": 1.0},  # more weight on low noise: small images
    "flow-mean+0.5": {**FLOW, "logit_mean": 0.5, "logit_std": 1.0},
    "flow-uniform": {**FLOW, "timestep_density": "uniform"},
    "flow-immiscible": {**FLOW, "logit_mean": 0.0, "logit_std": 1.0, "immiscible_noise": True},
}


def as_handed_in(images, size: int):
    """`images` as the PNGs of `size` px that would be handed in, read back to their resolution (helpers.results)."""
    import torch
    from PIL import Image

    from helpers.images import pil_to_tensor
    from helpers.sample import to_output_pils

    resolution = images.shape[-1]
    return torch.stack([pil_to_tensor(im.reduce(size // resolution) if size % resolution == 0 else
                                      im.resize((resolution, resolution), Image.Resampling.BOX))
                        for im in to_output_pils(images, size)])


def objective_spec(spec: str, max_steps: int) -> tuple[str, int]:
    """("flow", 600) of "flow" (trained `max_steps`) or "flow@600": an objective and its training length."""
    name, _, steps = spec.partition("@")
    return name, int(steps) if steps else max_steps


def measure_objectives(objectives: list[str], outputs_dir: Path, data_dir: str, max_steps: int, guidances,
                       steps: int, seeds: list[int], size: str) -> list:
    """Rows {objective, seed, guidance, train_s, images_per_s, scores} of each objective and training seed.

    Each row is also its own file in <outputs_dir>/objectives/, so that processes measuring other seeds into the
    same folder (one torch thread each: more images/s than one process on two threads) add up to one table."""
    import dataclasses

    from helpers.judges import judge_for_run
    from helpers.model import load_model
    from helpers.sample import sample_images
    from helpers.setting import Setting

    judged, row_dir = None, outputs_dir / "objectives"
    row_dir.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for spec in objectives:
            objective, train_steps = objective_spec(spec, max_steps)
            cfg, train_s = trained_run(f"{objective}-{train_steps}-seed{seed}", outputs_dir, data_dir, train_steps,
                                       size, {**OBJECTIVES[objective], "seed": seed})
            if judged is None:  # one probe for every run: differences between runs are the runs'
                judged, _ = judge_for_run(dataclasses.replace(cfg, seed=0), 0,
                                          probe_steps=50 if size == "tiny" else 400)
            model = load_model(cfg)
            for g in guidances:
                setting = Setting.from_config(cfg).replace(guidance=g, steps=steps)
                t0 = time.perf_counter()
                images = sample_images(model, judged.texts, judged.seeds, setting, batch_size=cfg.sample_batch_size)
                sample_s = time.perf_counter() - t0
                row = {"objective": spec, "seed": seed, "guidance": g, "steps": steps, "max_steps": train_steps,
                       "setting": setting.to_dict(), "train_s": round(train_s, 1),
                       "images_per_s": round(len(images) / sample_s, 1),
                       **judged.judge.evaluate(as_handed_in(images, cfg.output_size))}
                (row_dir / f"{objective}-{train_steps}-seed{seed}-g{g:g}.json").write_text(json.dumps(row, indent=1))
                rows = objective_rows(outputs_dir)
                (outputs_dir / "objectives.json").write_text(json.dumps(rows, indent=1))  # kept if stopped
    return objective_rows(outputs_dir)


def objective_rows(outputs_dir: Path) -> list:
    """Every row measured into `outputs_dir`, by this process or another."""
    return [json.loads(p.read_text()) for p in sorted((outputs_dir / "objectives").glob("*.json"))]


def print_objective_table(rows: list, baseline: str = "v") -> None:
    import statistics

    def ms(values, digits, sign=""):
        spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else " (1 seed)"
        return f"{statistics.mean(values):{sign}.{digits}f}{spread}"

    def scores(r):
        return {"eyes": r["accuracy"]["eyes"], "csa": r["mean_accuracy"], "fd": r["frechet_distance"]}

    base = {(r["seed"], r["guidance"]): scores(r) for r in rows if r["objective"] == baseline}
    print(f"| objective | training steps | guidance | seeds | eyes | Δ eyes vs {baseline} | mean (c, s, a) | probe FD | "
          f"Δ FD vs {baseline} | images/s | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in dict.fromkeys((r["objective"], r["guidance"]) for r in rows):
        mine = [r for r in rows if (r["objective"], r["guidance"]) == key]
        paired = [(scores(r), base[r["seed"], r["guidance"]]) for r in mine if (r["seed"], r["guidance"]) in base]
        delta = lambda k, digits: ms([a[k] - b[k] for a, b in paired], digits, "+") if paired else "–"  # noqa: E731
        print(f"| {key[0]} | {mine[0]['max_steps']} | {key[1]:g} | {len(mine)} | {ms([scores(r)['eyes'] for r in mine], 3)} | "
              f"{delta('eyes', 3)} | {ms([scores(r)['csa'] for r in mine], 3)} | "
              f"{ms([scores(r)['fd'] for r in mine], 1)} | {delta('fd', 1)} | "
              f"{statistics.mean(r['images_per_s'] for r in mine):.0f} | "
              f"{statistics.mean(r['train_s'] for r in mine):.0f} |")


CPU_PRECISIONS = {"fp32": "no", "bf16": "bf16"}  # row label -> mixed_precision: explicit, whatever "auto" picks here


def precision_runs(run_dirs: list[str], outputs_dir: Path, data_dir: str, max_steps: int, seeds: list[int],
                   size: str) -> list:
    """The configs to pair: the runs in `run_dirs` as they are, else a demo-objective run per training seed (trained
    here unless `--objectives flow` trained it into `outputs_dir` already)."""
    from helpers.run_folder import load_config

    if run_dirs:
        return [load_config(d) for d in run_dirs]
    return [trained_run(f"flow-{max_steps}-seed{seed}", outputs_dir, data_dir, max_steps, size,
                        {**OBJECTIVES["flow"], "seed": seed})[0] for seed in seeds]


def measure_cpu_precision(cfgs: list, outputs_dir: Path, guidance: float, steps: int, size: str) -> list:
    """Rows {run, seed, precision, images_per_s, scores} of each run sampled in fp32 and in bf16, same prompts and
    seeds, scored by one probe (run seed 0's config: differences are the precision's, not the judge's)."""
    import dataclasses

    from helpers.judges import judge_for_run
    from helpers.model import load_model
    from helpers.precision import decide
    from helpers.sample import sample_images
    from helpers.setting import Setting

    judged, row_dir = None, outputs_dir / "cpu_precision"
    row_dir.mkdir(parents=True, exist_ok=True)
    for cfg in cfgs:
        if judged is None:
            judged, _ = judge_for_run(dataclasses.replace(cfg, seed=0), 0, probe_steps=50 if size == "tiny" else 400)
        model = load_model(cfg)
        setting = Setting.from_config(cfg).replace(guidance=guidance, steps=steps)
        for label, mode in CPU_PRECISIONS.items():
            as_set = dataclasses.replace(model, cfg=dataclasses.replace(cfg, mixed_precision=mode))
            t0 = time.perf_counter()
            images = sample_images(as_set, judged.texts, judged.seeds, setting, batch_size=cfg.sample_batch_size)
            row = {"run": cfg.run_name, "seed": cfg.seed, "precision": label, "device": str(model.device),
                   "auto_here": decide("auto", model.device, use="sample").reason,  # what "auto" samples in here
                   "setting": setting.to_dict(), "images_per_s": round(len(images) / (time.perf_counter() - t0), 1),
                   **judged.judge.evaluate(as_handed_in(images, cfg.output_size))}
            (row_dir / f"{cfg.run_name}-{label}.json").write_text(json.dumps(row, indent=1))
    rows = [json.loads(p.read_text()) for p in sorted(row_dir.glob("*.json"))]
    (outputs_dir / "cpu_precision.json").write_text(json.dumps(rows, indent=1))
    return rows


PRECISION_COLUMNS = ("color", "shape", "eyes", "extra", "action")


def precision_scores(row: dict) -> list[float]:
    """The table's columns of a row: accuracy per attribute, mean of colour, shape, action, probe FD, images/s."""
    return [row["accuracy"][a] for a in PRECISION_COLUMNS] + [row["mean_accuracy"], row["frechet_distance"],
                                                              row["images_per_s"]]


def _cell(value: float, i: int, sign: str = "") -> str:
    return f"{value:{sign}.{3 if i < 6 else 1}f}"  # accuracies to 0.001; FD and images/s to 0.1


def print_cpu_precision_table(rows: list) -> None:
    """Per run: fp32, bf16 and their difference; then mean ± sd over runs of each and of the difference."""
    import statistics

    def ms(column, i, sign):
        spread = f" ± {_cell(statistics.stdev(column), i)}" if len(column) > 1 else " (1 run)"
        return _cell(statistics.mean(column), i, sign) + spread

    print("| seed | run | precision | colour | shape | eyes | extra | action | mean (c, s, a) | probe FD | images/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    by_run = {(r["run"], r["precision"]): r for r in rows}
    paired = {"fp32": [], "bf16": [], "Δ bf16 − fp32": []}
    for run in dict.fromkeys(r["run"] for r in rows):
        if (run, "fp32") not in by_run or (run, "bf16") not in by_run:
            continue  # half measured (stopped): nothing to pair
        fp32, bf16 = (precision_scores(by_run[run, k]) for k in ("fp32", "bf16"))
        for label, values in zip(paired, (fp32, bf16, [b - a for a, b in zip(fp32, bf16)])):
            paired[label].append(values)
            sign = "+" if label.startswith("Δ") else ""
            print(f"| {by_run[run, 'fp32']['seed']} | {run} | {label} | "
                  + " | ".join(_cell(v, i, sign) for i, v in enumerate(values)) + " |")
    for label, table in paired.items():
        sign = "+" if label.startswith("Δ") else ""
        if table:
            print(f"| all | {len(table)} runs | {label} | "
                  + " | ".join(ms(list(column), i, sign) for i, column in enumerate(zip(*table))) + " |")


def measure_settings(levers: list[str], outputs_dir: Path, data_dir: str, max_steps: int, guidances, steps: int,
                     n_seeds: int, size: str) -> list:
    """Rows {lever, guidance, seed_set, setting, scores} of each setting lever on one model, `n_seeds` seed sets."""
    from helpers.judges import judge_for_run
    from helpers.model import load_model
    from helpers.sample import sample_images
    from helpers.weights import with_setting
    from helpers.setting import FINAL, Setting

    # snapshots (and post-hoc EMA profiles) every 1/16 of training: the first is the early guide
    cfg, train_s = trained_run(f"settings-{max_steps}", outputs_dir, data_dir, max_steps, size,
                               {"snapshot_every": max(1, max_steps // 16), "phema_every": 0})
    names = cfg.layout.snapshot_names()
    named = {"early": names[0], "quarter": names[min(len(names) - 1, 3)]}  # snapshots every 1/16: the 4th is 1/4
    judged, _ = judge_for_run(cfg, 0, probe_steps=50 if size == "tiny" else 400)
    base_model, rows = load_model(cfg), []
    for lever in levers:
        for g in guidances:
            overrides = {k: named.get(v, v) if k == "guide" else v for k, v in SETTING_LEVERS[lever].items()}
            setting = Setting.from_config(cfg, FINAL).replace(guidance=g, steps=steps, **overrides)
            model = with_setting(base_model, cfg, setting)
            for k in range(n_seeds):
                t0 = time.perf_counter()
                seeds = [s + 100_000 * k for s in judged.seeds]  # seed set 0 is the test set's own seeds
                images = sample_images(model, judged.texts, seeds, setting, batch_size=cfg.sample_batch_size)
                rows.append({"lever": lever, "guidance": g, "seed_set": k, "setting": setting.to_dict(),
                             "train_s": round(train_s, 1), "sample_s": round(time.perf_counter() - t0, 1),
                             **judged.judge.evaluate(images)})
                (outputs_dir / "setting_levers.json").write_text(json.dumps(rows, indent=1))  # kept if stopped
    return rows


def trained_run(name: str, outputs_dir: Path, data_dir: str, max_steps: int, size: str, overrides: dict):
    """(config, seconds) of the run `lever-<name>`: data, split, cache and training made once, reused after."""
    from helpers.cache import build_cache, write_split
    from helpers.data import load_records
    from helpers.demo_data import ensure_dataset
    from helpers.train import train

    profile = "tiny" if size == "tiny" else "demo"
    cfg = open_run(f"lever-{name}", profile, str(outputs_dir), data_dir=data_dir, max_steps=max_steps,
                   preview_every=0, **{"snapshot_every": 0, **overrides})
    ensure_dataset(cfg, **({"num_monsters": 8, "num_test_monsters": 2, "frames_per_action": 1}
                           if size == "tiny" else {}))
    t0 = time.perf_counter()
    if not cfg.layout.unet_dir("model").exists():
        records, _ = load_records(cfg.data_path)
        write_split(cfg, records)
        build_cache(cfg, records, progress=False)
        train(cfg, progress=False)
    return cfg, time.perf_counter() - t0


def print_setting_table(rows: list) -> None:
    import statistics

    def ms(values, digits):
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"

    print("| lever | guidance | seed sets | eyes | mean (c, s, a) | colour | shape | action | probe FD | s per set |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in dict.fromkeys((r["lever"], r["guidance"]) for r in rows):
        mine = [r for r in rows if (r["lever"], r["guidance"]) == key]
        acc = lambda name: [r["accuracy"][name] for r in mine]  # noqa: E731
        print(f"| {key[0]} | {key[1]:g} | {len(mine)} | {ms(acc('eyes'), 3)} | "
              f"{ms([r['mean_accuracy'] for r in mine], 3)} | {ms(acc('color'), 3)} | {ms(acc('shape'), 3)} | "
              f"{ms(acc('action'), 3)} | {ms([r['frechet_distance'] for r in mine], 1)} | "
              f"{statistics.mean(r['sample_s'] for r in mine):.0f} |")


def measure(lever: str, outputs_dir: Path, data_dir: str, max_steps: int, guidances, steps: int, size: str) -> list:
    from helpers.judges import judge_for_run
    from helpers.model import load_model
    from helpers.sample import sample_images
    from helpers.setting import Setting

    overrides, sampling = LEVERS[lever]
    trained_as = "baseline" if not overrides else lever  # sampling-only levers reuse the baseline model
    cfg, train_s = trained_run(trained_as, outputs_dir, data_dir, max_steps, size, overrides)
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
    ap.add_argument("--setting-levers", default="", help=f"comma-separated, of {', '.join(SETTING_LEVERS)}")
    ap.add_argument("--seeds", type=int, default=3,
                    help="seed sets per setting lever; training seeds per objective or --cpu-precision")
    ap.add_argument("--objectives", default="",
                    help=f"comma-separated, of {', '.join(OBJECTIVES)}; name@N trains N steps instead of --max-steps")
    ap.add_argument("--seed-list", default="", help="training seeds to measure instead of 0 .. --seeds - 1, e.g. 2,3")
    ap.add_argument("--cpu-precision", action="store_true",
                    help="pair fp32 and bf16 sampling on each training seed's model (or --run-dirs')")
    ap.add_argument("--run-dirs", default="", help="with --cpu-precision: comma-separated trained run folders")
    args = ap.parse_args(argv)
    outputs_dir = Path(args.outputs_dir).resolve()
    guidances = [float(g) for g in args.guidances.split(",")]
    seeds = [int(k) for k in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    if args.cpu_precision:
        cfgs = precision_runs([d for d in args.run_dirs.split(",") if d], outputs_dir, args.data_dir, args.max_steps,
                              seeds, args.size)
        rows = measure_cpu_precision(cfgs, outputs_dir, guidances[0], args.steps, args.size)
        print_cpu_precision_table(rows)
        return rows
    if args.objectives:
        objectives = args.objectives.split(",")
        unknown = [x for x in objectives if objective_spec(x, 0)[0] not in OBJECTIVES]
        if unknown:
            ap.error(f"--objectives: unknown {', '.join(unknown)} (known: {', '.join(OBJECTIVES)})")
        outputs_dir.mkdir(parents=True, exist_ok=True)
        rows = measure_objectives(objectives, outputs_dir, args.data_dir, args.max_steps, guidances, args.steps,
                                  seeds, args.size)
        print_objective_table(rows)
        return rows
    if args.setting_levers:
        levers = args.setting_levers.split(",")
        unknown = [x for x in levers if x not in SETTING_LEVERS]
        if unknown:
            ap.error(f"--setting-levers: unknown {', '.join(unknown)} (known: {', '.join(SETTING_LEVERS)})")
        rows = measure_settings(levers, outputs_dir, args.data_dir, args.max_steps, guidances, args.steps,
                                args.seeds, args.size)
        (outputs_dir / "setting_levers.json").write_text(json.dumps(rows, indent=1))
        print_setting_table(rows)
        return rows
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
