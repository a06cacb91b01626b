"""How good are the generated images? FID/KID/IS, CLIP-T, CLIP-I, the guidance sweep and `metrics.json`.

Everything is measured on images the model never trained on: the validation split made in 01_data
(one generated image per held-out key against its real first frame) and, for the demo, the test set
(held-out attribute combinations). Metrics whose weights cannot be had are *skipped with a reason*,
never fatal: each function returns its values plus `"skipped": {metric: reason}`.

- FID / KID / IS: torchmetrics' Inception (needs torch-fidelity + torchvision and a ~100 MB download).
- CLIP-T: torchmetrics' `CLIPScore` between image and prompt (100 × cosine, as torchmetrics reports it).
- CLIP-I: mean cosine similarity of CLIP image embeddings, generated vs the real image of the same key.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import key_of_image, load_prompts, load_records
from .files import atomic_write_json, read_json
from .hub import WeightsUnavailableError, load_pretrained
from .images import load_image_tensor

INCEPTION_NEEDS = ("needs torch-fidelity + torchvision (pip install torch-fidelity torchvision) and the Inception "
                   "weights pt_inception-2015-12-05 (~100 MB, downloaded from github on first use)")
INCEPTION_METRICS = ("fid", "kid", "inception_score")
CLIP_METRICS = ("clip_t", "clip_i")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [0, 255], what Inception and the CLIP processor expect."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ---------------------------------------------------------------- what we evaluate on


@dataclass
class EvalSet:
    """Prompts to sample (one seed each) and the real image each generated one is compared with."""

    keys: list[str]
    prompts: list[str]
    seeds: list[int]
    real: torch.Tensor  # [N, 3, R, R] in [-1, 1]
    attributes: list[dict] = field(default_factory=list)  # demo only: what each prompt asks for
    paths: list = field(default_factory=list)  # the real images' files

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
    real = torch.stack([load_image_tensor(first[k][1].path, cfg.resolution, cfg.crop_to_content) for k in
                        tqdm(keys, desc="validation images", leave=False)])
    return EvalSet(keys, prompts, [seed + i for i in range(len(keys))], real, paths=[first[k][1].path for k in keys])


def demo_test_set(cfg, max_images: int | None = None, seed: int | None = None) -> EvalSet:
    """The demo's test prompts (held-out attribute combinations), their attributes and test_reference/ images."""
    from .demo_data import load_attributes

    seed = cfg.seed if seed is None else seed
    prompts = load_prompts(cfg.data_path / "test.json")
    prompts = [prompts[i] for i in _cap(len(prompts), cfg.eval_max_images if max_images is None else max_images,
                                         seed)]
    attrs = load_attributes(cfg.data_path)
    ref = cfg.data_path / "test_reference"
    real = torch.stack([load_image_tensor(ref / p.image_name, cfg.resolution, cfg.crop_to_content) for p in prompts])
    return EvalSet([p.key for p in prompts], [p.text for p in prompts], [seed + i for i in range(len(prompts))],
                   real, [attrs[p.key] for p in prompts])


# ---------------------------------------------------------------- FID, KID, Inception Score


def inception_unavailable() -> str | None:
    """Why the Inception metrics cannot run here, or None if torch-fidelity is importable."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as e:
        return f"{INCEPTION_NEEDS} [{type(e).__name__}: {e}]"
    return None


def _feed(metric, images: torch.Tensor, device, batch_size: int, **kwargs) -> None:
    for i in range(0, len(images), batch_size):
        metric.update(to_uint8(images[i:i + batch_size]).to(device), **kwargs)


def fid_kid_is(real: torch.Tensor, fake: torch.Tensor, *, device=None, batch_size: int = 64) -> dict:
    """{"fid", "kid_mean", "kid_std", "inception_score_mean", "inception_score_std", "skipped": {...}}.

    real/fake: [N, 3, H, W] in [-1, 1] (Inception resizes to 299 itself). Each metric that cannot
    load its network is listed under "skipped" with the reason instead.
    """
    reason = inception_unavailable()
    if reason:
        return {"skipped": {name: reason for name in INCEPTION_METRICS}}
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    subset = min(1000, len(real), len(fake))
    jobs = {"fid": lambda: FrechetInceptionDistance(feature=2048),
            "kid": lambda: KernelInceptionDistance(subset_size=subset),
            "inception_score": lambda: InceptionScore()}
    out, skipped = {}, {}
    for name, make in jobs.items():
        try:
            metric = make().to(device)
            if name == "inception_score":
                _feed(metric, fake, device, batch_size)
            else:
                _feed(metric, real, device, batch_size, real=True)
                _feed(metric, fake, device, batch_size, real=False)
            value = metric.compute()
        except Exception as e:  # a failed download surfaces as URLError, OSError, RuntimeError...
            skipped[name] = f"{INCEPTION_NEEDS} [{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]"
            continue
        if isinstance(value, tuple):
            out[f"{name}_mean"], out[f"{name}_std"] = float(value[0]), float(value[1])
        else:
            out[name] = float(value)
    out["skipped"] = skipped
    return out


# ---------------------------------------------------------------- CLIP-T and CLIP-I


def load_clip(model_id: str, device=None):
    """(CLIPModel, CLIPProcessor) for `model_id`, or WeightsUnavailableError saying what to download."""
    from transformers import CLIPModel, CLIPProcessor

    model = load_pretrained(CLIPModel.from_pretrained, model_id, "CLIP model (for CLIP-T / CLIP-I)")
    processor = load_pretrained(CLIPProcessor.from_pretrained, model_id, "CLIP processor (for CLIP-T / CLIP-I)")
    return model.to(device or "cpu").eval().requires_grad_(False), processor


class _FeatureTensors(nn.Module):
    """CLIP with `get_*_features` returning tensors: transformers 5 returns model outputs, which
    torchmetrics 1.9's CLIPScore cannot normalise (AttributeError: ... has no attribute 'norm')."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_scores(images: torch.Tensor, prompts: list[str], real_images: torch.Tensor | None = None,
                model_id: str = "openai/clip-vit-base-patch32", *, clip=None, device=None,
                batch_size: int = 64) -> dict:
    """{"clip_t": CLIPScore (0–100), "clip_i": mean cosine (−1–1), "skipped": {...}}.

    `clip` = (model, processor) skips loading `model_id` (tests pass a tiny random CLIP). CLIP-I needs
    `real_images`, the real picture of each prompt's key, in the same order as `images`.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    wanted = CLIP_METRICS if real_images is not None else ("clip_t",)
    try:
        model, processor = clip or load_clip(model_id, device)
    except WeightsUnavailableError as e:
        return {"skipped": {name: str(e) for name in wanted}}
    if len(images) != len(prompts) or (real_images is not None and len(real_images) != len(images)):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts"
                         + (f", {len(real_images)} real images" if real_images is not None else ""))
    wrapped = _FeatureTensors(model)
    device = next(model.parameters()).device
    clip_t, clip_i = CLIPScore(lambda: (wrapped, processor)), CLIPScore(lambda: (wrapped, processor))
    with torch.no_grad():
        for i in tqdm(range(0, len(images), batch_size), desc="CLIP scores", leave=False):
            fake = to_uint8(images[i:i + batch_size]).to(device)
            clip_t.update(fake, list(prompts[i:i + batch_size]))
            if real_images is not None:
                clip_i.update(fake, to_uint8(real_images[i:i + batch_size]).to(device))
    out = {"clip_t": float(clip_t.compute())}
    if real_images is not None:
        out["clip_i"] = float(clip_i.compute()) / 100  # CLIPScore is 100 × the mean cosine
    out["skipped"] = {}
    return out


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


def json_safe(obj):
    """Tensors and numpy scalars to numbers, NaN/inf to None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
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
    old = read_json(path) if path.exists() else {}
    return atomic_write_json(path, json_safe(_merge(old, metrics)), indent=2)


def reference_evaluator(eval_set: EvalSet, clip=None, model_id: str = "openai/clip-vit-base-patch32"):
    """evaluate(images) -> FID/KID/IS + CLIP-T/CLIP-I against `eval_set` (skips merged), for guidance_sweep."""
    def evaluate(images: torch.Tensor) -> dict:
        out = fid_kid_is(eval_set.real, images)
        skipped = out.pop("skipped")
        scores = clip_scores(images, eval_set.prompts, eval_set.real, model_id, clip=clip)
        skipped.update(scores.pop("skipped"))
        return {**out, **scores, "skipped": skipped}
    return evaluate
