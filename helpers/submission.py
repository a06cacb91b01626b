"""The course deliverable: one 256×256 RGB PNG per `test.json` entry, checked, and packed as a zip.

`results/manifest.json` records what made the images: the snapshot (name and weights hash), guidance,
steps, scheduler, guidance interval, seed, image size, the prompts file and the project commit.
`write_test_set` compares it with the setting it is asked for: the same setting resumes (images already
on disk are skipped and counted), another one moves the old folder aside to `results.previous/`, saying
so, and starts over, so one folder never mixes images of different models or settings. Every batch is
written as soon as it is decoded, each PNG to a temporary name first, so an interrupted run never leaves
a half-written file that would later be mistaken for a finished one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from .progress import progress_bar

from .config import PROJECT_ROOT, resolve_path
from .data import Prompt
from .files import atomic_save_image, atomic_write, atomic_write_json, read_json
from .sample import sample_images, to_output_pils


def check_prompt_names(prompts: list[Prompt]) -> None:
    """The names must make a valid results folder; `load_prompts` checks this too, this guards hand-made lists."""
    problems = [f"{p.key!r}: image_name {p.image_name!r} is not a plain .png file name" for p in prompts
                if not p.image_name.lower().endswith(".png") or Path(p.image_name).name != p.image_name
                or "\\" in p.image_name]
    problems += [f"image_name {n!r} is used {c} times" for n, c in Counter(p.image_name for p in prompts).items()
                 if c > 1]
    if problems:
        raise ValueError(f"{len(problems)} problem(s) with the prompts:\n  " + "\n  ".join(problems))


MANIFEST = "manifest.json"


def results_manifest(setting, weights: str, prompts: list[Prompt], *, seed: int, size: int) -> dict:
    """What decides the images of a results folder (a helpers.selection.Setting plus seed, size, prompts)."""
    names = hashlib.sha256(json.dumps([[p.image_name, p.text] for p in prompts]).encode()).hexdigest()[:16]
    return {**setting.to_dict(), "weights_sha256": weights, "seed": seed, "size": size, "prompts": len(prompts),
            "prompts_sha256": names}


def manifest_differences(have: dict | None, want: dict) -> list[str]:
    """Human-readable differences between two manifests ('complete' and 'commit' do not count)."""
    if have is None:
        return ["no manifest.json (images of unknown origin)"]
    return [f"{k}: {have.get(k)!r} -> {v!r}" for k, v in want.items() if have.get(k) != v]


def read_manifest(results_dir) -> dict | None:
    path = Path(results_dir) / MANIFEST
    return read_json(path) if path.exists() else None


def write_test_set(model, prompts: list[Prompt], results_dir, setting, weights: str, *, seed: int, size: int,
                   batch_size: int) -> dict:
    """The test set of exactly `setting` in `results_dir`: resumed if the folder holds that setting already,
    else the old folder is moved to results.previous/ (saying why) and the set is written anew."""
    results_dir = Path(results_dir)
    want = results_manifest(setting, weights, prompts, seed=seed, size=size)
    have = read_manifest(results_dir)
    pngs = list(results_dir.glob("*.png")) if results_dir.is_dir() else []
    changed = manifest_differences(have, want)
    if pngs and changed:
        previous = results_dir.with_name(results_dir.name + ".previous")
        replaced = previous.exists()
        if replaced:
            shutil.rmtree(previous)
        os.replace(results_dir, previous)
        print(f"Regenerating the test set: {results_dir} held {len(pngs)} images of another setting "
              f"({'; '.join(changed)}). Moved them to {previous}" + (" (replacing the set kept there before)."
                                                                     if replaced else "."))
    atomic_write_json(results_dir / MANIFEST, {**want, "complete": False, "commit": project_commit()})
    print(f"Test set: {setting.label()}, seed {seed}, {size}px, {len(prompts)} prompts -> {results_dir}")
    stats = generate_test_set(model, prompts, results_dir, guidance=setting.guidance, steps=setting.steps,
                              scheduler=setting.scheduler, batch_size=batch_size, seed=seed, size=size,
                              guidance_interval=setting.guidance_interval or None)
    atomic_write_json(results_dir / MANIFEST, {**want, "complete": True, "commit": project_commit()})
    return stats


def check_manifest(results_dir, want: dict) -> None:
    """Refuse a results folder that is incomplete or was made with another setting than `want`."""
    have = read_manifest(results_dir)
    changed = manifest_differences(have, want)
    if changed or not have.get("complete"):
        reasons = changed or ["the test set was not finished (complete: false)"]
        raise ValueError(f"{Path(results_dir) / MANIFEST} does not match the chosen setting: {'; '.join(reasons)}. "
                         "Run 04_sample (or write_test_set) with the chosen setting first.")


def project_commit() -> str:
    """The project's git commit (with '+changes' if the tree differs), or 'unknown' outside a checkout."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=PROJECT_ROOT, capture_output=True, text=True,  # noqa: E731
                                        timeout=10)
        commit = run("rev-parse", "HEAD").stdout.strip()
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return (commit + ("+changes" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def generate_test_set(model, prompts: list[Prompt], out_dir, *, guidance: float, steps: int, scheduler: str,
                      batch_size: int, seed: int = 0, size: int = 256, guidance_rescale: float = 0.0,
                      guidance_interval=None) -> dict:
    """Write `<out_dir>/<image_name>` for every prompt not yet there. Prompt i gets seed `seed + i`."""
    check_prompt_names(prompts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [(i, p) for i, p in enumerate(prompts) if not (out_dir / p.image_name).exists()]
    skipped = len(prompts) - len(todo)
    if skipped:
        print(f"Skipping {skipped} of {len(prompts)} images already in {out_dir} (written earlier with the same setting)")
    start = time.perf_counter()
    for b in progress_bar(range(0, len(todo), batch_size), desc="test set", unit="batch", disable=not todo):
        batch = todo[b:b + batch_size]
        images = sample_images(model, [p.text for _, p in batch], [seed + i for i, _ in batch], guidance=guidance,
                               steps=steps, scheduler=scheduler, batch_size=batch_size,
                               guidance_rescale=guidance_rescale, guidance_interval=guidance_interval)
        bad = [p.image_name for (_, p), x in zip(batch, images) if not torch.isfinite(x).all()]
        if bad:
            raise FloatingPointError(f"Sampling produced NaN/inf for {len(bad)} image(s), e.g. {bad[:3]}; nothing "
                                     "of this batch was written (a diverged checkpoint, or try use_ema/guidance)")
        for (_, p), im in zip(batch, to_output_pils(images, size)):
            atomic_save_image(im, out_dir / p.image_name)
    seconds = time.perf_counter() - start
    return dict(written=len(todo), skipped=skipped, seconds=round(seconds, 2),
                images_per_s=round(len(todo) / seconds, 2) if todo and seconds > 0 else None)


def validate_results(results_dir, prompts: list[Prompt], size: int = 256) -> list[str]:
    """Every problem with a results folder (empty list = ready to hand in)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return [f"{results_dir}: results folder not found"]
    expected = {p.image_name for p in prompts}
    present = {f.name for f in results_dir.iterdir() if f.is_file() and f.name != MANIFEST}
    problems = [f"missing: {n}" for n in sorted(expected - present)]
    problems += [f"unexpected file: {n}" for n in sorted(present - expected)]
    for name in sorted(expected & present):
        problems += [f"{name}: {msg}" for msg in _image_problems(results_dir / name, size)]
    return problems


def _image_problems(path: Path, size: int) -> list[str]:
    try:
        with Image.open(path) as im:
            im.load()
            fmt, mode, dims = im.format, im.mode, im.size
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return [f"cannot be decoded ({e})"]
    problems = []
    if fmt != "PNG":
        problems.append(f"is {fmt}, not PNG")
    if dims != (size, size):
        problems.append(f"size {dims[0]}×{dims[1]}, expected {size}×{size}")
    if mode != "RGB":
        problems.append(f"mode {mode}, expected RGB")
    # NaN samples become all-black in tensor_to_pil; a diverged or empty sample is (near) one colour.
    if int(arr.max()) - int(arr.min()) <= 2:
        problems.append(f"blank: every pixel is about {tuple(int(v) for v in arr.reshape(-1, 3)[0])} "
                        "(a NaN or collapsed sample)")
    return problems


def check_results(results_dir, prompts: list[Prompt], size: int = 256) -> int:
    """Raise ValueError listing every problem; return the number of valid images otherwise."""
    problems = validate_results(results_dir, prompts, size)
    if problems:
        shown = problems[:50] + ([f"… and {len(problems) - 50} more"] if len(problems) > 50 else [])
        raise ValueError(f"{results_dir}: {len(problems)} problem(s):\n  " + "\n  ".join(shown))
    return len(prompts)


def pack_submission(run_dir, out_zip, unet_dir, results_dir=None, expected_manifest: dict | None = None,
                    code_dirs=("helpers", "notebooks"), overwrite: bool = False) -> Path:
    """Zip the course layout: `code/<each code dir>`, `model/` (the chosen U-Net as unet_ema/, the scheduler
    config), `results/` (the PNGs and their manifest, checked against `expected_manifest` first)."""
    run_dir, out_zip = Path(run_dir), Path(out_zip)
    results_dir = Path(results_dir) if results_dir else run_dir / "results"
    if expected_manifest is not None:
        check_manifest(results_dir, expected_manifest)
    if out_zip.exists() and not overwrite:
        raise FileExistsError(f"{out_zip} already exists; to replace it run 04_sample with overwrite_zip=True "
                              "(from Python: pack_submission(..., overwrite=True))")
    sources = {"model/unet_ema": Path(unet_dir), "model/scheduler": run_dir / "model" / "scheduler",
               "results": results_dir}
    sources.update({f"code/{Path(d).name}": resolve_path(d) for d in code_dirs})
    missing = [f"{arc}/ <- {src}" for arc, src in sources.items() if not src.is_dir()]
    if missing:
        raise FileNotFoundError("Cannot pack the submission, folder(s) not found:\n  " + "\n  ".join(missing))
    return atomic_write(out_zip, lambda tmp: _write_zip(tmp, sources))


def _write_zip(path: Path, sources: dict[str, Path]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc, src in sources.items():
            files = [f for f in sorted(src.rglob("*")) if f.is_file() and not _is_clutter(f)]
            for f in progress_bar(files, desc=f"zip {arc}", disable=len(files) < 200):
                # weights and PNGs are already compressed: storing them is as small and much faster
                method = zipfile.ZIP_STORED if f.suffix in (".safetensors", ".png", ".bin") else zipfile.ZIP_DEFLATED
                zf.write(f, f"{arc}/{f.relative_to(src).as_posix()}", compress_type=method)


def _is_clutter(f: Path) -> bool:
    return any(part in ("__pycache__", ".ipynb_checkpoints") for part in f.parts) or f.suffix in (".pyc", ".tmp")


def read_results(results_dir, prompts: list[Prompt]) -> torch.Tensor:
    """The PNGs of `prompts` as they will be handed in, [N, 3, S, S] in [-1, 1] (for judging them)."""
    from .images import pil_to_tensor

    images = []
    for p in prompts:
        with Image.open(Path(results_dir) / p.image_name) as im:
            images.append(pil_to_tensor(im.convert("RGB")))
    return torch.stack(images)
