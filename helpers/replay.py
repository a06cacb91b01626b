"""Does staged selection pick what the full sweep picks? Replay it on a finished full sweep's records.

A full sweep (every cell on every judged prompt: `staged_sweep(..., stage_prompts=[])`, or benchmarks/
bench_selection.py) leaves each cell's per-prompt judge records in <run>/selection/staged/. From them the staged
procedure can be run again over any order of the prompts without sampling: screen every cell on the first n1
prompts of the order, keep the best share, ..., judge the finalists on all prompts by the leaderboard's rule.

The truth is the full sweep's winner. Settings the full sweep cannot tell from it count as right too: a cell is
within the full-N noise if, over bootstrap resamples of the prompts (the same resample for every cell), it ranks
at or ahead of the winner in at least `alpha` of them.

    python -m helpers.replay --run-name demo [--outputs-dir outputs] [--orders 200] [--bootstrap 200]
                             [--plan 24,80:0.33 --plan 16,48:0.25 ...]
"""
from __future__ import annotations

import argparse
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .estimators import screen_score, scores_from
from .staged import cells_per_stage, context_id, halving, stage_sizes


@dataclass
class FullSweep:
    kind: str
    reference: dict
    settings: list[dict]
    records: list[dict]  # per cell: arrays over all n prompts
    n: int

    def rows(self, index=None) -> list[dict]:
        return [{"setting": s, **scores_from(self.kind, self.reference, r, index)}
                for s, r in zip(self.settings, self.records)]

    def winner(self, index=None) -> int:
        from .judges import RANKS

        rows = self.rows(index)
        return min(range(len(rows)), key=lambda i: RANKS[self.kind](rows[i]))


def load_full_sweep(folder: Path) -> FullSweep:
    """The cells of `folder` (selection/staged) that hold every judged prompt, for the one context with most such."""
    folder = Path(folder)
    by_context: dict[str, list] = {}
    for path in sorted(folder.glob("*.npz")):
        if path.name.startswith("reference-"):
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                if "meta" not in z.files or "sampled" not in z.files or not z["sampled"].all():
                    continue
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k].astype(np.float64) if z[k].dtype == np.float32 else z[k]
                          for k in z.files if k not in ("meta", "sampled")}
            context, setting = meta["context"], meta["setting"]
        except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as e:
            print(f"{path}: unreadable ({type(e).__name__}: {' '.join(str(e).split())}); left out of the replay")
            continue
        by_context.setdefault(context_id(context), []).append((setting, arrays))
    if not by_context:
        raise FileNotFoundError(f"{folder}: no cell judged on every prompt: run a full sweep first "
                                "(benchmarks/bench_selection.py, or staged_sweep(..., stage_prompts=[]))")
    key, cells = max(by_context.items(), key=lambda kv: len(kv[1]))
    ref_path = folder / f"reference-{key}.npz"
    if not ref_path.exists():
        raise FileNotFoundError(f"{ref_path}: the judge's reference of these cells is missing")
    with np.load(ref_path, allow_pickle=False) as z:
        kind = json.loads(str(z["meta"]))["kind"]
        reference = {k: z[k] for k in z.files if k != "meta"}
    if len(cells) < 2:
        raise ValueError(f"{folder}: only {len(cells)} cell judged on every prompt; replay needs at least 2")
    return FullSweep(kind, reference, [c[0] for c in cells], [c[1] for c in cells],
                     len(next(iter(cells[0][1].values()))))


def within_noise(sweep: FullSweep, bootstrap: int, alpha: float, seed: int = 0) -> tuple[int, set[int]]:
    """(the full sweep's winner, the cells within its full-N noise), by a paired bootstrap over prompts."""
    from .judges import RANKS

    winner = sweep.winner()
    rng = np.random.default_rng(seed)
    ahead = np.zeros(len(sweep.settings))
    for _ in range(bootstrap):
        index = rng.integers(0, sweep.n, sweep.n)
        rows = sweep.rows(index)
        w = RANKS[sweep.kind](rows[winner])
        ahead += [RANKS[sweep.kind](r) <= w for r in rows]
    return winner, {i for i, a in enumerate(ahead) if a >= alpha * bootstrap} | {winner}


def replay(sweep: FullSweep, sizes: list[int], keep: float, orders: int, seed: int = 0) -> list[int]:
    """The staged procedure's pick (a cell index) in each of `orders` random prompt orders."""
    from .judges import RANKS

    sizes = stage_sizes(sizes, sweep.n)
    full = sweep.rows()
    rng = np.random.default_rng(seed)
    picks = []
    for _ in range(orders):
        order = rng.permutation(sweep.n)
        stages = halving(len(sweep.settings), sizes, keep,
                         lambda c, n: screen_score(sweep.kind, sweep.reference, sweep.records[c], order[:n]))
        picks.append(min(stages[-1], key=lambda c: RANKS[sweep.kind](full[c])))
    return picks


def plan_images(n_cells: int, n: int, sizes: list[int], keep: float) -> int:
    sizes = stage_sizes(sizes, n)
    counts = cells_per_stage(n_cells, len(sizes), keep)
    return sum(c * (m - (sizes[k - 1] if k else 0)) for k, (c, m) in enumerate(zip(counts, sizes)))


def replay_table(sweep: FullSweep, plans: list[tuple[list[int], float]], *, orders: int = 200, bootstrap: int = 200,
                 alpha: float = 0.05, seed: int = 0) -> tuple[str, list[dict]]:
    """A markdown table: per plan, how often it picks the winner / a cell within the noise, and its images."""
    winner, near = within_noise(sweep, bootstrap, alpha, seed)
    full_images = len(sweep.settings) * sweep.n
    lines = [f"full sweep: {len(sweep.settings)} cells x {sweep.n} prompts = {full_images:,} images; winner: "
             f"{_label(sweep.settings[winner])}; {len(near) - 1} other cell(s) within its full-N noise "
             f"(ahead or level in >= {alpha:.0%} of {bootstrap} paired bootstrap resamples of the prompts)", "",
             "| stages (prompts) | keep | images | share of full | picks the winner | winner or within noise |",
             "|---|---|---|---|---|---|"]
    results = []
    for sizes, keep in plans:
        picks = replay(sweep, sizes, keep, orders, seed)
        images = plan_images(len(sweep.settings), sweep.n, sizes, keep)
        exact = sum(p == winner for p in picks) / orders
        ok = sum(p in near for p in picks) / orders
        results.append({"sizes": stage_sizes(sizes, sweep.n), "keep": keep, "images": images, "exact": exact,
                        "within_noise": ok})
        lines.append(f"| {' / '.join(map(str, stage_sizes(sizes, sweep.n)))} | {keep:g} | {images:,} | "
                     f"{images / full_images:.0%} | {exact:.1%} | {ok:.1%} |")
    lines.append(f"\n({orders} random prompt orders per plan)")
    return "\n".join(lines), results


def _label(setting: dict) -> str:
    from .setting import Setting

    return Setting.from_dict(setting).label()


def parse_plan(text: str) -> tuple[list[int], float]:
    """"24,80:0.33" -> ([24, 80], 0.33); ":0.5" or "" before the colon = no screening stage."""
    sizes, _, keep = text.partition(":")
    try:
        return [int(x) for x in sizes.split(",") if x.strip()], float(keep or 0.33)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--plan {text!r}: expected stage sizes and a keep share, e.g. 24,80:0.33")


def main(argv=None) -> int:
    from .command import add_run_arguments, ends_in_one_line, existing_run
    from .values import count_argument

    p = argparse.ArgumentParser(prog="python -m helpers.replay", description=__doc__.split("\n\n")[0])
    add_run_arguments(p)
    p.add_argument("--records", default=None,
                   help="folder of the full sweep's records (default <run>/selection/staged)")
    p.add_argument("--plan", action="append", type=parse_plan, default=None,
                   help="stage sizes:keep, e.g. 24,80:0.33 (repeat; default: the run config's)")
    p.add_argument("--orders", type=count_argument(1), default=200, help="prompt orders replayed (default 200)")
    p.add_argument("--bootstrap", type=count_argument(1), default=200, help="resamples for the noise (default 200)")
    p.add_argument("--alpha", type=share, default=0.05, help="within-noise share, in (0, 1) (default 0.05)")
    args = p.parse_args(argv)
    with ends_in_one_line("helpers.replay"):
        cfg = existing_run(args)
        records = Path(args.records) if args.records else cfg.layout.selection / "staged"
        if not records.is_dir():
            raise FileNotFoundError(f"{records}: no sweep records there: run a full sweep first "
                                    "(benchmarks/bench_selection.py, or staged_sweep(..., stage_prompts=[]))")
        sweep = load_full_sweep(records)
        plans = args.plan or [(cfg.sweep_stage_prompts, cfg.sweep_keep)]
        print(replay_table(sweep, plans, orders=args.orders, bootstrap=args.bootstrap, alpha=args.alpha)[0])
    return 0


def share(text: str) -> float:
    """argparse type: a float strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
