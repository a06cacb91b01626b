"""What generated images are evaluated on, the guidance sweep and `metrics.json`.

Everything is measured on images the model never trained on: the validation split made in 01_data
(one generated image per held-out key against its real first frame) and, for the demo, the test set
(held-out attribute combinations). The leaderboard's FID / CLIP-T / CLIP-I are in `helpers.score`.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .data import key_of_image, load_prompts, load_records
from .files import atomic_write_text
from .images import load_image_tensor


# ---------------------------------------------------------------- what we evaluate on


@dataclass
class EvalSet:
    """Prompts to sample (one seed each) and the real image each generated one is compared with."""

    keys: list[str]
    prompts: list[str]
    seeds: list[int]
    real: torch.Tensor  # [N, 3, R, R] in [-1, 1]
    attributes: list[dict] = field(default_factory=list)  # demo only: what each prompt asks for

    def __len__(self) -> int:
        return len(self.keys)


def _cap(n: int, max_images: int, seed: int) -> list[int]:
    """Indices of at most `max_images` of n items (0 = all), spread by a seeded draw, in order."""
    if not max_images or max_images >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_images))


def validation_set(cfg, max_images: int | None = None, seed: int | None = None) -> EvalSet:
    """One prompt per validation key (a seeded pick among its captions) and its real first frame."""
    from .cache import read_split

    seed = cfg.seed if seed is None else seed
    val_groups = set(read_split(cfg)["val"])
    records, _ = load_records(cfg.data_path, cfg.manifest)
    first = {}
    for r in records:
        if r.group in val_groups:
            frame = int((key_of_image(r.path.name) or ("", "0"))[1])
            if r.key not in first or frame < first[r.key][0]:
                first[r.key] = (frame, r)
    if not first:
        raise ValueError(f"{cfg.run_dir / 'split.json'}: no validation images in {cfg.data_path} "
                         f"(val groups: {sorted(val_groups)[:5]}…)")
    keys = sorted(first)
    keys = [keys[i] for i in _cap(len(keys), cfg.eval_max_images if max_images is None else max_images, seed)]
    rng = random.Random(seed)
    prompts = [rng.choice(first[k][1].captions) for k in keys]
    real = torch.stack([load_image_tensor(first[k][1].path, cfg.resolution) for k in
                        tqdm(keys, desc="validation images", leave=False)])
    return EvalSet(keys, prompts, [seed + i for i in range(len(keys))], real)


def demo_test_set(cfg, max_images: int | None = None, seed: int | None = None) -> EvalSet:
    """The demo's test prompts (held-out attribute combinations), their attributes and test_reference/ images."""
    from .demo_data import load_attributes

    seed = cfg.seed if seed is None else seed
    prompts = load_prompts(cfg.data_path / "test.json")
    prompts = [prompts[i] for i in _cap(len(prompts), cfg.eval_max_images if max_images is None else max_images,
                                         seed)]
    attrs = load_attributes(cfg.data_path)
    ref = cfg.data_path / "test_reference"
    real = torch.stack([load_image_tensor(ref / p.image_name, cfg.resolution) for p in prompts])
    return EvalSet([p.key for p in prompts], [p.text for p in prompts], [seed + i for i in range(len(prompts))],
                   real, [attrs[p.key] for p in prompts])


# ---------------------------------------------------------------- the guidance sweep


def guidance_sweep(model, prompts: list[str], seeds: list[int], guidances, *, steps: int, scheduler: str,
                   batch_size: int, evaluate: Callable[[torch.Tensor], dict], sample: Callable | None = None,
                   images_out: dict | None = None, progress: bool = True) -> list[dict]:
    """Sample `prompts` (same seeds) at each guidance scale; one row {"guidance": g, **evaluate(images)} each.

    `sample` defaults to helpers.sample.sample_images; `images_out`, if given, receives {g: images}.
    """
    if sample is None:
        from .sample import sample_images as sample
    rows = []
    for g in tqdm(list(guidances), desc="guidance sweep", disable=not progress):
        images = sample(model, prompts, seeds, guidance=float(g), steps=steps, scheduler=scheduler,
                        batch_size=batch_size)
        if images_out is not None:
            images_out[float(g)] = images
        rows.append({"guidance": float(g), **evaluate(images)})
    return rows


def lookup(row: dict, key: str):
    """row["a"]["b"] for key "a.b"."""
    for part in key.split("."):
        row = row[part]
    return row


def best_guidance(sweep: list[dict], key: str, *, higher_is_better: bool = True, tie_break: str | None = None,
                  tie_break_higher_is_better: bool = False, tolerance: float = 1e-9) -> float:
    """The guidance of the best row by `key` (dotted for nested values); ties go to the better `tie_break`,
    then to the smaller guidance (less guidance = more diverse images)."""
    if not sweep:
        raise ValueError("empty guidance sweep")
    sign = 1 if higher_is_better else -1
    top = max(sign * lookup(r, key) for r in sweep)
    tied = [r for r in sweep if sign * lookup(r, key) >= top - tolerance]
    if tie_break and len(tied) > 1:
        tsign = 1 if tie_break_higher_is_better else -1
        best_tb = max(tsign * lookup(r, tie_break) for r in tied)
        tied = [r for r in tied if tsign * lookup(r, tie_break) >= best_tb - tolerance]
    return float(min(r["guidance"] for r in tied))


def sweep_table(sweep: list[dict], columns: list[str]) -> str:
    """A plain-text table (one row per guidance) of dotted `columns`, e.g. "accuracy.color"."""
    header = ["guidance"] + columns
    rows = [[f"{r['guidance']:g}"] + [_fmt(lookup(r, c)) for c in columns] for r in sweep]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------- metrics.json


def _json_safe(obj):
    """Tensors and numpy scalars to numbers, NaN/inf to None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _merge(old: dict, new: dict) -> dict:
    out = dict(old)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_metrics(run_dir, metrics: dict) -> Path:
    """Merge `metrics` into `<run_dir>/metrics.json` (nested dicts merge, other values replace); atomic."""
    path = Path(run_dir) / "metrics.json"
    old = {}
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}; "
                             f"fix or delete it") from None
    return atomic_write_text(path, json.dumps(_json_safe(_merge(old, metrics)), indent=2, ensure_ascii=False))

