"""The whole staged selection at a glance: every screened cell with its scores, its prompt count and a bootstrap sd.

The staged sweep (helpers.staged) judges every cell on a few prompts, the best share on more, the finalists on
all; each cell's per-prompt judge records stay in `<run>/selection/staged/<cell>.npz` and `selection/stages.json`
says which cells reached which stage. From those, `screened_cells` scores every cell on the prompts it was judged
on (`helpers.estimators.scores_from`, the judge's own quantities) with ±1 sd from a seeded bootstrap over those
prompts (the cell's own judged prompts, resampled with replacement; the probe's real pictures are resampled with
them). A cell judged on 24 prompts and a finalist judged on all of them sit on the same axes, the first with the
wider error bars.

The quantities are the judge's rule's: the probe's (mean accuracy over colour, shape and action; ties: Fréchet
distance), the course's (FID; ties: CLIP-T; CLIP-T alone where FID cannot be computed here).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .estimators import PROBE_ATTRIBUTES, scores_from
from .probe import GATED
from .staged import context_id, prompt_order

BOOTSTRAP = 200  # resamples per cell
FID_BOOTSTRAP = 50  # ... for FID on more than FID_FAST_MAX prompts (an eigendecomposition of n x n per resample)
FID_FAST_MAX = 400
# (key, label) of the rule's first quantity and its tie-break, by judge kind; "higher is better" where True
RULE_QUANTITIES = {"probe": (("mean_accuracy", "mean accuracy (colour, shape, action)", True),
                             ("frechet_distance", "probe Fréchet distance", False)),
                   "course": (("fid", "FID", False), ("clip_t", "CLIP-T", True))}


@dataclass
class ScreenedCell:
    setting: dict
    prompts: int  # judged prompts behind the scores
    stage: int  # the last stage it reached (0 = the first screen)
    scores: dict  # the judge's scores on those prompts (scores_from)
    sd: dict = field(default_factory=dict)  # {quantity: bootstrap sd} for the plotted quantities
    finalist: bool = False
    chosen: bool = False

    def value(self, key: str):
        from .selection import lookup

        try:
            return lookup(self.scores, key)
        except (KeyError, TypeError):
            return None


def quantities(kind: str, scores: dict | None = None) -> list[tuple[str, str, bool]]:
    """The rule's quantities of a judge kind (first the one it ranks by, then the tie-break) that `scores` has."""
    found = [q for q in RULE_QUANTITIES[kind] if scores is None or q[0] in scores]
    return found or list(RULE_QUANTITIES[kind][1:])


def read_stages(path: Path) -> dict | None:
    from .files import read_json

    try:
        summary = read_json(path)
        return summary if summary.get("stages") else None
    except (OSError, ValueError, AttributeError):
        return None


def load_records(folder: Path, context: dict) -> tuple[str, dict, dict]:
    """(judge kind, reference arrays, {setting json: (sampled mask, arrays)}) of the cells of one sweep context;
    of several files for one setting (other weights, an earlier training), the newest."""
    folder, key = Path(folder), context_id(context)
    with np.load(folder / f"reference-{key}.npz", allow_pickle=False) as z:
        kind = json.loads(str(z["meta"]))["kind"]
        reference = {k: z[k] for k in z.files if k != "meta"}
    cells = {}
    for path in sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime):
        if path.name.startswith("reference-"):
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("context") != context:
                    continue
                sampled = z["sampled"].astype(bool)
                arrays = {k: z[k].astype(np.float64) if z[k].dtype == np.float32 else z[k]
                          for k in z.files if k not in ("meta", "sampled")}
        except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile):
            continue  # an unreadable cell is left out (the sweep samples it again when it runs next)
        cells[json.dumps(meta["setting"], sort_keys=True)] = (sampled, arrays)
    return kind, reference, cells


def screened_cells(summary: dict, folder: Path, finalists: list[dict] = (), choice: dict | None = None, *,
                   seed: int | None = None, bootstrap: int = BOOTSTRAP, bootstrap_seed: int = 0) -> list[ScreenedCell]:
    """Every cell the sweep of `summary` (stages.json) screened, in its order, scored on the prompts of the last
    stage it reached (`seed`: the run's seed, which fixes the prompt order; None: every prompt it has records of),
    with the bootstrap sd of the rule's quantities. `finalists` (metrics.json's selection table) and `choice` mark
    the cells; a cell without records is left out."""
    kind, reference, records = load_records(folder, summary["context"])
    last = {}
    for k, stage in enumerate(summary["stages"]):
        for s in stage["cells"]:
            last[json.dumps(s, sort_keys=True)] = k
    final = {json.dumps(r["setting"], sort_keys=True) for r in finalists}
    chosen = json.dumps(choice["setting"], sort_keys=True) if choice else None
    cells = []
    with _one_blas_thread():
        for k, s in enumerate(summary["stages"][0]["cells"]):
            cell = _screened(k, s, records, last, summary, seed, kind, reference, bootstrap, bootstrap_seed, final,
                             chosen)
            if cell is not None:
                cells.append(cell)
    return cells


def _one_blas_thread():
    """Small matrices, many of them: one BLAS thread is faster, and far faster on cores that other jobs keep busy
    (a 2-thread OpenBLAS on 2 busy cores: 20x slower here)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # not installed: BLAS as it is
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _screened(k, s, records, last, summary, seed, kind, reference, bootstrap, bootstrap_seed, final, chosen):
    """One screened cell, or None where its records are missing or hold fewer than 2 prompts."""
    key = json.dumps(s, sort_keys=True)
    if key not in records:
        return None
    sampled, arrays = records[key]
    positions = np.flatnonzero(sampled)
    if seed is not None:
        wanted = prompt_order(len(sampled), seed)[:summary["stages"][last[key]]["prompts"]]
        if sampled[wanted].all():
            positions = np.asarray(sorted(wanted))
    if len(positions) < 2:
        return None
    scores = scores_from(kind, reference, arrays, positions)
    rng = np.random.default_rng([bootstrap_seed, k])
    return ScreenedCell(s, len(positions), last[key], scores,
                        bootstrap_sd(kind, reference, arrays, positions, bootstrap, rng), key in final, key == chosen)


def bootstrap_sd(kind: str, reference: dict, arrays: dict, positions, resamples: int, rng) -> dict:
    """{quantity: sd over `resamples` resamples (with replacement) of `positions`} for the rule's quantities."""
    positions = np.asarray(positions)
    keys = [q[0] for q in quantities(kind)]
    values = {k: [] for k in keys}
    fast = kind == "course" and "inception" in arrays and "mu" in reference
    if fast:  # FID of a resample from n x n Gram matrices: exact, and no d x d square root per resample
        feats = np.asarray(arrays["inception"], np.float64)[positions]
        gram, sgram = feats @ feats.T, feats @ reference["sigma"] @ feats.T
        trace_ref = float(np.trace(reference["sigma"]))
    count = resamples if not fast or len(positions) <= FID_FAST_MAX else min(resamples, FID_BOOTSTRAP)
    for _ in range(count):
        pick = rng.integers(0, len(positions), len(positions))
        if kind == "course":
            if fast:
                values["fid"].append(_fid_of_resample(feats, gram, sgram, reference["mu"], trace_ref, pick))
            if "clip_t" in arrays:
                values["clip_t"].append(float(np.asarray(arrays["clip_t"])[positions[pick]].mean()))
        else:  # the probe: the same quantities as scores_from, the Fréchet distance without a d x d sqrtm
            rows = positions[pick]
            hits = np.asarray(arrays["correct"], np.float64)[rows]
            values["mean_accuracy"].append(float(np.mean([hits[:, PROBE_ATTRIBUTES.index(a)].mean()
                                                          for a in GATED])))
            values["frechet_distance"].append(max(frechet_of_rows(np.asarray(arrays["features"])[rows],
                                                                  np.asarray(reference["real_features"])[rows]), 0.0))
    return {k: float(np.std(v, ddof=1)) for k, v in values.items() if len(v) > 1}


def frechet_of_rows(x1: np.ndarray, x2: np.ndarray) -> float:
    """The Fréchet distance between the Gaussians of two [n, d] samples (helpers.score's formula, covariances with
    n - 1): tr sqrt(C1 C2) is the nuclear norm of the centred cross-Gram X1 X2^T / (n - 1) (n <= d), or from the
    d x d matrices' symmetric square roots (n > d); no general sqrtm."""
    x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    n, d = x1.shape
    m1, m2 = x1.mean(0), x2.mean(0)
    c1, c2 = x1 - m1, x2 - m2
    if n <= d:
        cross = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum()
    else:
        w, v = np.linalg.eigh(c2.T @ c2)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ (c1.T @ c1) @ root), 0, None)).sum()
    return float((m1 - m2) @ (m1 - m2) + ((c1 * c1).sum() + (c2 * c2).sum() - 2 * cross) / (n - 1))


def _fid_of_resample(feats, gram, sgram, mu, trace_ref: float, pick) -> float:
    """|m - mu|^2 + tr C + tr S - 2 tr sqrt(C S) for the resample `pick` of rows of `feats`: the nonzero
    eigenvalues of C S are those of Xc S Xc^T / (n - 1), the double-centred `sgram` on the resample."""
    n = len(pick)

    def centred(g):
        g = g[np.ix_(pick, pick)]
        return g - g.mean(0, keepdims=True) - g.mean(1, keepdims=True) + g.mean()

    m = feats[pick].mean(0)
    eig = np.linalg.eigvalsh(centred(sgram) / (n - 1))
    return float((m - mu) @ (m - mu) + np.trace(centred(gram)) / (n - 1) + trace_ref
                 - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def run_cells(cfg, selection: dict, bootstrap: int = BOOTSTRAP) -> list[ScreenedCell]:
    """`screened_cells` of a run: its stages.json, its records, its metrics.json selection (finalists, choice);
    [] where the run has no staged sweep on record (an older run, or records removed)."""
    summary = read_stages(cfg.layout.selection / "stages.json")
    if summary is None:
        return []
    try:
        return screened_cells(summary, cfg.layout.selection / "staged", selection.get("table", []),
                              selection.get("choice"), seed=cfg.seed, bootstrap=bootstrap)
    except (OSError, ValueError, KeyError):
        return []


def varying_fields(cells: list[ScreenedCell]) -> list[str]:
    """The setting fields whose value differs between cells, in the setting's order."""
    if not cells:
        return []
    return [k for k in cells[0].setting
            if len({json.dumps(c.setting.get(k), sort_keys=True) for c in cells}) > 1]


def along(cells: list[ScreenedCell], choice: dict, axis: str) -> list[ScreenedCell]:
    """The cells that differ from the choice's setting in `axis` alone (the choice included)."""
    return [c for c in cells if all(c.setting.get(k) == v for k, v in choice.items() if k != axis)]


def caption(cells: list[ScreenedCell], rule: str, bootstrap: int = BOOTSTRAP) -> str:
    """Two lines under 05's plot: how many settings were screened (the number the plot holds), and the rule."""
    finalists = sum(c.finalist for c in cells)
    counts = sorted({c.prompts for c in cells})
    return (f"{len(cells)} settings screened ({' / '.join(map(str, counts))} prompts), {finalists} finalist(s) "
            f"judged on every prompt; ±1 sd from {bootstrap} bootstrap resamples of each cell's own prompts\n"
            f"rule: {rule}")
