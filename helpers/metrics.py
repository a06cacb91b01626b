"""The validation set (what CLIP-I is measured on locally) and `metrics.json`.

The validation split made in 01_data holds monsters the model never trained on: one generated image per
held-out key is compared with that key's real first frame. The leaderboard's FID / CLIP-T / CLIP-I are
computed by `helpers.score`; which setting wins is decided in `helpers.selection` and `helpers.judges`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from .progress import progress_bar

from .data import key_of_image, load_records, seeded_subset
from .files import atomic_write_json, json_safe, read_json
from .images import load_image_tensor


# ---------------------------------------------------------------- what we evaluate on


@dataclass
class EvalSet:
    """Prompts to sample (one seed each) and the real image each generated one is compared with."""

    keys: list[str]
    prompts: list[str]
    seeds: list[int]
    real: torch.Tensor  # [N, 3, R, R] in [-1, 1]
    paths: list = field(default_factory=list)  # the real images' files

    def __len__(self) -> int:
        return len(self.keys)


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
        raise ValueError(f"{cfg.layout.split}: no validation images in {cfg.data_path} "
                         f"(val groups: {sorted(val_groups)[:5]}…)")
    keys = sorted(first)
    keys = [keys[i] for i in seeded_subset(len(keys), cfg.eval_max_images if max_images is None else max_images, seed)]
    rng = random.Random(seed)
    prompts = [rng.choice(first[k][1].captions) for k in keys]
    real = torch.stack([load_image_tensor(first[k][1].path, cfg.resolution, cfg.crop_to_content) for k in
                        progress_bar(keys, desc="validation images", leave=False)])
    return EvalSet(keys, prompts, [seed + i for i in range(len(keys))], real, paths=[first[k][1].path for k in keys])


# ---------------------------------------------------------------- metrics.json


def _merge(old: dict, new: dict) -> dict:
    out = dict(old)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_metrics(run_dir, metrics: dict) -> Path:
    """Merge `metrics` into `<run_dir>/metrics.json` (nested dicts merge, other values replace); atomic."""
    from .layout import RunLayout

    path = RunLayout(run_dir).metrics
    old = read_json(path) if path.exists() else {}
    return atomic_write_json(path, json_safe(_merge(old, metrics)), indent=2)

