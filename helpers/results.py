"""A results folder — one PNG per `test.json` entry and the `manifest.json` that proves them — checked and read back.

The manifest records the setting that made the images (helpers.setting.Setting), the weights' hash, seed, size,
the prompts' hash, the project commit, and the SHA-256 of every PNG. Validating, scoring and packing all go
through `results_problems`: names and count against test.json, every image decodable, PNG, RGB, the right
size, not blank, and byte-identical to what the manifest recorded, so a swapped, edited, stray or missing
image is named before anything is scored or zipped.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MANIFEST = "manifest.json"
NOT_COMPARED = ("complete", "commit", "images")  # manifest entries that record, rather than decide, the images


def results_manifest(setting, weights: str, prompts, *, seed: int, size: int) -> dict:
    """What decides the images of a results folder: the setting, its weights, seed, size and the prompts."""
    names = hashlib.sha256(json.dumps([[p.image_name, p.text] for p in prompts]).encode()).hexdigest()[:16]
    return {**setting.to_dict(), "weights_sha256": weights, "seed": seed, "size": size, "prompts": len(prompts),
            "prompts_sha256": names}


def read_manifest(results_dir) -> dict | None:
    """The folder's manifest, None if it has none; ValueError naming the file if it is not a JSON object."""
    from .files import read_json

    path = Path(results_dir) / MANIFEST
    if not path.exists():
        return None
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object describing the results, got a {type(manifest).__name__}")
    return manifest


def manifest_setting(manifest: dict, where: str = MANIFEST):
    """The Setting a manifest records (ValueError naming `where` and the bad field)."""
    import dataclasses

    from .setting import Setting

    names = [f.name for f in dataclasses.fields(Setting)]
    return Setting.from_dict({k: manifest[k] for k in names if k in manifest}, where=where)


def manifest_differences(have: dict | None, want: dict) -> list[str]:
    """Human-readable differences between two manifests (entries in NOT_COMPARED do not count)."""
    if have is None:
        return ["no manifest.json (images of unknown origin)"]
    return [f"{k}: {have.get(k)!r} -> {v!r}" for k, v in want.items() if k not in NOT_COMPARED and have.get(k) != v]


def record_differences(manifest: dict, record, where: Path) -> list[str]:
    """How a folder's manifest differs from the run's record of the set (04_sample's copy of the manifest it wrote),
    one message per field, first the setting's fields: an edited manifest names the field it changed."""
    if not isinstance(record, dict):
        return [f"{where}: expected a JSON object, got a {type(record).__name__}"]
    keys = list(dict.fromkeys([k for k in record if k != "results"] + list(manifest)))
    return [f"{k} is {manifest.get(k)!r} in manifest.json but {record.get(k)!r} in {where}"
            if k != "images" else _images_difference(manifest.get(k), record.get(k), where)
            for k in keys if manifest.get(k) != record.get(k)]


def _images_difference(have, recorded, where: Path) -> str:
    have, recorded = have if isinstance(have, dict) else {}, recorded if isinstance(recorded, dict) else {}
    odd = sorted(n for n in set(have) | set(recorded) if have.get(n) != recorded.get(n))
    return f"images: the hash of {odd[0] if odd else '?'} in manifest.json is not the one recorded in {where}"


def check_record(results_dir, record_path) -> dict:
    """The folder's manifest, if it is the one 04_sample recorded when it wrote the set; else ValueError, one line
    naming the first field that differs (or the missing record)."""
    results_dir, record_path = Path(results_dir), Path(record_path)
    manifest = read_manifest(results_dir)
    if manifest is None:
        raise FileNotFoundError(f"{results_dir}: no test set with a manifest.json yet: run 04_sample first")
    if not record_path.exists():
        raise FileNotFoundError(f"{record_path}: no record of the test set 04_sample wrote (a set written by hand or "
                                "by an older version): run 04_sample again (select=False keeps the choice; images "
                                "already there are only checked)")
    from .files import read_json

    differences = record_differences(manifest, read_json(record_path), record_path)
    if differences:
        raise ValueError(f"{results_dir / MANIFEST}: {differences[0]}: the manifest was edited or the set replaced "
                         "after 04_sample wrote it; run 04_sample again")
    return manifest


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def results_problems(results_dir, prompts, size: int | None = 256, *, want: dict | None = None,
                     require_manifest: bool = True) -> list[str]:
    """Every problem with a results folder, first the folder's, then each image's (empty list: ready).

    `want`: the manifest the folder must match (the chosen setting). `require_manifest=False` (the scorer, for
    a folder made elsewhere) accepts a folder without one and checks only what the course's program refuses
    (names, count, size, decodable); a manifest that is there is always checked, hashes included."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return [f"{results_dir}: " + ("is a file, not a results folder" if results_dir.exists()
                                      else "results folder not found")]
    try:
        manifest = read_manifest(results_dir)
    except ValueError as e:
        return [str(e)]
    problems = []
    if manifest is None and (require_manifest or want is not None):
        problems.append(f"{results_dir / MANIFEST}: missing (images of unknown origin)")
    elif manifest is not None:
        problems += [f"{results_dir / MANIFEST}: {d}" for d in (manifest_differences(manifest, want) if want else [])]
        if not manifest.get("complete"):
            problems.append(f"{results_dir / MANIFEST}: the test set was not finished (complete: false)")
    digests = (manifest or {}).get("images") or {}
    expected = {p.image_name for p in prompts}
    # the course's program counts PNGs; the hand-in must hold nothing else
    present = {f.name for f in results_dir.iterdir() if f.name != MANIFEST
               and (require_manifest or f.suffix.lower() == ".png")}
    if len(present & expected) != len(expected) or present - expected:
        problems.append(f"{len(present)} {'files' if require_manifest else 'PNGs'}, test.json names {len(expected)} "
                        "images")
    problems += [f"missing: {n}" for n in sorted(expected - present)]
    problems += [f"unexpected file: {n} (not in test.json; move it out of the folder)"
                 for n in sorted(present - expected)]
    for name in sorted(expected & present):
        problems += [f"{name}: {msg}" for msg in image_problems(results_dir / name, size, digests.get(name),
                                                                 manifest is not None, require_manifest)]
    return problems


def image_problems(path: Path, size: int | None, digest: str | None, check_digest: bool = True,
                   deliverable: bool = True) -> list[str]:
    """What is wrong with one result image (empty: nothing). `deliverable`: also PNG, RGB and not blank."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt, mode, dims = im.format, im.mode, im.size
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return [f"cannot be decoded ({str(e).splitlines()[0] if str(e) else type(e).__name__})"]
    problems = []
    if size and dims != (size, size):
        problems.append(f"size {dims[0]}×{dims[1]}, expected {size}×{size}")
    if deliverable and fmt != "PNG":
        problems.append(f"is {fmt}, not PNG")
    if deliverable and mode != "RGB":
        problems.append(f"mode {mode}, expected RGB")
    # NaN samples become all-black in tensor_to_pil; a diverged or empty sample is (near) one colour.
    if deliverable and int(arr.max()) - int(arr.min()) <= 2:
        problems.append(f"blank: every pixel is about {tuple(int(v) for v in arr.reshape(-1, 3)[0])} "
                        "(a NaN or collapsed sample)")
    if check_digest and digest is None:
        problems.append("not recorded in manifest.json (added after the test set was written?)")
    elif check_digest and sha256_bytes(data) != digest:
        problems.append("differs from the image manifest.json recorded (replaced or edited after it was written)")
    return problems


def check_results(results_dir, prompts, size: int | None = 256, *, want: dict | None = None,
                  require_manifest: bool = True) -> int:
    """The number of images if the folder is ready; else ValueError whose first line names the first problems."""
    problems = results_problems(results_dir, prompts, size, want=want, require_manifest=require_manifest)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        listed = "\n  ".join(problems[:50]) + (f"\n  … and {len(problems) - 50} more" if len(problems) > 50 else "")
        raise ValueError(f"{results_dir}: {len(problems)} problem(s): {'; '.join(problems[:3])}{more}\n  {listed}")
    return len(prompts)


def read_results(results_dir, prompts, resolution: int | None = None) -> torch.Tensor:
    """The PNGs of `prompts` as handed in, [N, 3, R, R] in [-1, 1], brought back to `resolution`.

    The PNGs were enlarged from the model's resolution with nearest-neighbour when the factor is whole
    (helpers.sample.to_output_pils), so averaging each factor×factor block (PIL's reduce, a box filter) is its
    exact inverse: a round trip changes a pixel by no more than uint8 rounding. Any other size is box-resized."""
    from .images import pil_to_tensor

    images = []
    for p in prompts:
        with Image.open(Path(results_dir) / p.image_name) as im:
            im = im.convert("RGB")
            if resolution and im.size != (resolution, resolution):
                factor = im.size[0] // resolution
                whole = im.size[0] == im.size[1] == factor * resolution
                im = im.reduce(factor) if whole else im.resize((resolution, resolution), Image.Resampling.BOX)
            images.append(pil_to_tensor(im))
    return torch.stack(images)
