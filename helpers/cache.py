"""Encode every training image and caption once, so training never runs the frozen parts again.

The course's reference loop runs the VAE encoder on every step, which costs about 3x the U-Net step
(docs/design.md#measured-figures). Here each image is encoded once, together with its horizontal flip, and the latent
distribution's mean and std are stored (training samples `mean + std * noise`, so the VAE's noise is
kept). Caption embeddings are stored once per unique caption, with the empty caption "" at row 0
(the unconditional prompt that caption dropout switches to).

Layout of `<outputs>/cache/latents-<hash12>/` (the hash covers everything that produced it):
    shard-00000.safetensors ...  mean, std [n, 2, C, h, w] fp16 (index 1 = flipped), valid [n] uint8
    captions.safetensors         embeddings [M, L, D] fp16
    index.json                   written last: records, captions, shards, skipped images
Shards are written atomically, so an interrupted build resumes from the shards that are finished.
The run folder gets `cache.json` (where its cache is) and `split.json` (train/val monsters).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from .progress import progress_bar

from .config import RunConfig
from .data import ImageRecord, split_by_group
from .files import atomic_save_tensors, atomic_write_json, read_json
from .images import BadImageError, load_image_tensor

CACHE_VERSION = 1  # bump when the layout or the encoding changes
SHARD_SIZE = 4096


@dataclass
class LatentCache:
    mean: torch.Tensor  # [N, 2, C, h, w] fp16, index 1 = horizontally flipped image
    std: torch.Tensor  # [N, 2, C, h, w] fp16 (zeros in pixel space)
    caption_ids: torch.Tensor  # [N, K] int64 rows of `embeddings`, padded with -1
    embeddings: torch.Tensor  # [M, L, D] fp16, row 0 = the empty caption ""
    captions: list[str]
    keys: list[str]
    groups: list[str]
    paths: list[str]
    valid: torch.Tensor  # [N] bool: False for images that could not be decoded
    dir: Path

    def __len__(self) -> int:
        return len(self.keys)


# ---------------------------------------------------------------- where a cache lives


def cache_hash(cfg: RunConfig, records: list[ImageRecord]) -> str:
    """12 hex digits over the image files (path, size, mtime), captions, image preparation and the frozen parts."""
    h = hashlib.sha256()
    # the crop is only named when on, so caches built before the option existed keep their hash
    crop = ["crop_to_content"] if cfg.crop_to_content else []
    h.update(json.dumps([CACHE_VERSION, cfg.autoencoder, cfg.autoencoder_subfolder, cfg.text_encoder,
                         cfg.max_tokens, cfg.resolution, *crop]).encode())
    for r in records:
        try:
            st = os.stat(r.path)
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = [-1, -1]  # a missing file is reported when encoding, not here
        h.update(json.dumps([str(r.path), *stamp, list(r.captions)], ensure_ascii=False).encode())
    return h.hexdigest()[:12]


def cache_path(cfg: RunConfig, records: list[ImageRecord], kind: str = "latents") -> Path:
    return cfg.cache_dir / f"{kind}-{cache_hash(cfg, records)}"


def unique_captions(records: list[ImageRecord]) -> tuple[list[str], list[list[int]]]:
    """All distinct captions with "" first, and each record's caption rows."""
    captions, row = [""], {"": 0}
    ids = []
    for r in records:
        for c in r.captions:
            if c not in row:
                row[c] = len(captions)
                captions.append(c)
        ids.append([row[c] for c in r.captions])
    return captions, ids


# ---------------------------------------------------------------- building


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes one record; a bad file becomes a zero image plus its error message (never dropped)."""

    def __init__(self, records: list[ImageRecord], size: int, crop: bool):
        self.records, self.size, self.crop = records, size, crop

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        try:
            return load_image_tensor(self.records[i].path, self.size, self.crop), ""
        except BadImageError as e:
            return torch.zeros(3, self.size, self.size), str(e)


def build_cache(cfg: RunConfig, records: list[ImageRecord], *, device=None, batch_size: int = 64,
                progress: bool = True, frozen=None) -> Path:
    """Encode `records` (and their flips) and all their captions; reuse or resume what exists.

    `frozen`: the (text_encoder, autoencoder) pair if the caller has already loaded it."""
    from .model import load_frozen_parts

    out = cache_path(cfg, records)
    if _is_complete(out):
        print(f"Reusing the latent cache {out} (images, captions and frozen parts unchanged)")
        _write_pointer(cfg, out)
        return out
    if not records:
        raise ValueError(f"No training images to cache (data_dir={cfg.data_dir!r})")
    out.mkdir(parents=True, exist_ok=True)
    text_encoder, autoencoder = frozen or load_frozen_parts(cfg, device)
    shards, skipped = [], []
    starts = range(0, len(records), SHARD_SIZE)
    for n, start in enumerate(progress_bar(starts, desc="cache shards", disable=not progress or len(starts) < 2)):
        chunk = records[start:start + SHARD_SIZE]
        name = f"shard-{n:05d}.safetensors"
        bad = _finished_shard(out / name, len(chunk))
        if bad is None:
            bad = _encode_shard(_ImageFiles(chunk, cfg.resolution, cfg.crop_to_content), autoencoder, out / name,
                                batch_size, progress)
        else:
            print(f"Resuming the cache build: {name} is already finished")
        shards.append(dict(file=name, start=start, count=len(chunk)))
        skipped += bad
    captions, ids = unique_captions(records)
    embeddings = text_encoder.encode(captions, progress=progress).to(torch.float16).cpu()
    atomic_save_tensors({"embeddings": embeddings.contiguous()}, out / "captions.safetensors")
    _report_skipped(skipped)
    index = dict(version=CACHE_VERSION, hash=out.name.split("-")[-1], resolution=cfg.resolution,
                 crop_to_content=cfg.crop_to_content,
                 autoencoder=cfg.autoencoder, text_encoder=cfg.text_encoder, max_tokens=cfg.max_tokens,
                 num_images=len(records), shards=shards, captions=captions,
                 skipped=dict(count=len(skipped), files=skipped),
                 records=[dict(key=r.key, group=r.group, path=str(r.path), caption_ids=i)
                          for r, i in zip(records, ids)])
    atomic_write_json(out / "index.json", index)
    _write_pointer(cfg, out)
    return out


@torch.no_grad()
def _encode_shard(files: _ImageFiles, autoencoder, path: Path, batch_size: int, progress: bool) -> list[str]:
    """Encode one shard's images and flips; write it atomically; return the files that failed."""
    workers = 0 if len(files) < 1024 else min(4, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(files, batch_size=batch_size, num_workers=workers)
    means, stds, valid, bad = [], [], [], []
    for images, errors in progress_bar(loader, desc=f"encode {path.stem}", disable=not progress, leave=False):
        pair = torch.cat([images, images.flip(-1)])
        mean, std = autoencoder.encode(pair)
        b = len(images)
        means.append(torch.stack([mean[:b], mean[b:]], 1).to(torch.float16).cpu())
        stds.append(torch.stack([std[:b], std[b:]], 1).to(torch.float16).cpu())
        valid += [not e for e in errors]
        bad += [e for e in errors if e]
    tensors = dict(mean=torch.cat(means).contiguous(), std=torch.cat(stds).contiguous(),
                   valid=torch.tensor(valid, dtype=torch.uint8))
    atomic_save_tensors(tensors, path, metadata={"bad": json.dumps(bad, ensure_ascii=False)})
    return bad


def _finished_shard(path: Path, count: int) -> list[str] | None:
    """The failed files of an already written shard of `count` images, or None to (re)encode it."""
    try:
        with safe_open(str(path), "pt") as f:
            if f.get_slice("valid").get_shape() != [count]:
                return None
            return json.loads((f.metadata() or {}).get("bad", "[]"))
    except Exception:  # missing or damaged: encode again
        return None


def _report_skipped(skipped: list[str]) -> None:
    if skipped:
        shown = "\n  ".join(skipped[:10]) + (f"\n  … (+{len(skipped) - 10} more)" if len(skipped) > 10 else "")
        print(f"{len(skipped)} image(s) could not be decoded and are left out of training "
              f"(listed in the cache's index.json):\n  {shown}")


def _is_complete(out: Path) -> bool:
    index = out / "index.json"
    if not index.exists():
        return False
    try:
        shards = read_json(index)["shards"]
    except (ValueError, KeyError):
        return False
    return (out / "captions.safetensors").exists() and all((out / s["file"]).exists() for s in shards)


def _write_pointer(cfg: RunConfig, out: Path) -> None:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.layout.cache_pointer, {"cache_dir": str(out)}, indent=2)


# ---------------------------------------------------------------- reading


def load_cache(cfg: RunConfig, records: list[ImageRecord] | None = None) -> LatentCache:
    """The cache for `records`, or (without records) the one the run's 01_data notebook built."""
    if records is not None:
        out = cache_path(cfg, records)
    else:
        pointer = cfg.layout.cache_pointer
        if not pointer.exists():
            raise FileNotFoundError(f"{pointer}: no latent cache for run {cfg.run_name!r}; "
                                    f"run notebooks/01_data.ipynb first")
        out = Path(read_json(pointer)["cache_dir"])
    if not _is_complete(out):
        raise FileNotFoundError(f"{out}: the latent cache is missing or incomplete; run notebooks/01_data.ipynb first")
    index = read_json(out / "index.json")
    parts = [load_file(str(out / s["file"])) for s in index["shards"]]
    recs = index["records"]
    width = max(len(r["caption_ids"]) for r in recs)
    ids = torch.full((len(recs), width), -1, dtype=torch.int64)
    for i, r in enumerate(recs):
        ids[i, :len(r["caption_ids"])] = torch.tensor(r["caption_ids"])
    return LatentCache(
        mean=torch.cat([p["mean"] for p in parts]), std=torch.cat([p["std"] for p in parts]), caption_ids=ids,
        embeddings=load_file(str(out / "captions.safetensors"))["embeddings"], captions=index["captions"],
        keys=[r["key"] for r in recs], groups=[r["group"] for r in recs], paths=[r["path"] for r in recs],
        valid=torch.cat([p["valid"] for p in parts]).bool(), dir=out)


# ---------------------------------------------------------------- the train/validation split


def write_split(cfg: RunConfig, records: list[ImageRecord]) -> dict:
    """Split monsters (groups) into train and validation; `<run_dir>/split.json` is shared by 01, 03, 05."""
    train_idx, val_idx = split_by_group(records, cfg.val_fraction, cfg.seed)
    split = {"train": sorted({records[i].group for i in train_idx}),
             "val": sorted({records[i].group for i in val_idx})}
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.layout.split, split)
    return split


def read_split(cfg: RunConfig) -> dict:
    path = cfg.layout.split
    if not path.exists():
        raise FileNotFoundError(f"{path}: no train/validation split for run {cfg.run_name!r}; "
                                f"run notebooks/01_data.ipynb first")
    split = read_json(path)
    if not isinstance(split, dict) or not {"train", "val"} <= set(split):
        raise ValueError(f"{path}: expected {{\"train\": [groups], \"val\": [groups]}}")
    return split
