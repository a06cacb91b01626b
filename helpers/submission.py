"""The course deliverable: one 256×256 RGB PNG per `test.json` entry, checked, and packed as a zip.

Generation is resumable: images already on disk are skipped (and counted), every batch is written as
soon as it is decoded, and each PNG is written to a temporary name first, so an interrupted run never
leaves a half-written file that would later be mistaken for a finished one.
"""
from __future__ import annotations

import os
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .config import PROJECT_ROOT
from .data import Prompt
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


def generate_test_set(model, prompts: list[Prompt], out_dir, *, guidance: float, steps: int, scheduler: str,
                      batch_size: int, seed: int = 0, size: int = 256, guidance_rescale: float = 0.0) -> dict:
    """Write `<out_dir>/<image_name>` for every prompt not yet there. Prompt i gets seed `seed + i`."""
    check_prompt_names(prompts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [(i, p) for i, p in enumerate(prompts) if not (out_dir / p.image_name).exists()]
    skipped = len(prompts) - len(todo)
    if skipped:
        print(f"Skipping {skipped} of {len(prompts)} images already in {out_dir} (delete them to regenerate)")
    start = time.perf_counter()
    for b in tqdm(range(0, len(todo), batch_size), desc="test set", unit="batch", disable=not todo):
        batch = todo[b:b + batch_size]
        images = sample_images(model, [p.text for _, p in batch], [seed + i for i, _ in batch], guidance=guidance,
                               steps=steps, scheduler=scheduler, batch_size=batch_size,
                               guidance_rescale=guidance_rescale)
        bad = [p.image_name for (_, p), x in zip(batch, images) if not torch.isfinite(x).all()]
        if bad:
            raise FloatingPointError(f"Sampling produced NaN/inf for {len(bad)} image(s), e.g. {bad[:3]}; nothing "
                                     "of this batch was written (a diverged checkpoint, or try use_ema/guidance)")
        for (_, p), im in zip(batch, to_output_pils(images, size)):
            _save_png_atomically(im, out_dir / p.image_name)
    seconds = time.perf_counter() - start
    return dict(written=len(todo), skipped=skipped, seconds=round(seconds, 2),
                images_per_s=round(len(todo) / seconds, 2) if todo and seconds > 0 else None)


def _save_png_atomically(im: Image.Image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    im.save(tmp, format="PNG")
    os.replace(tmp, path)


def validate_results(results_dir, prompts: list[Prompt], size: int = 256) -> list[str]:
    """Every problem with a results folder (empty list = ready to hand in)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return [f"{results_dir}: results folder not found"]
    expected = {p.image_name for p in prompts}
    present = {f.name for f in results_dir.iterdir() if f.is_file()}
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


def pack_submission(run_dir, out_zip, code_dirs=("helpers", "notebooks"), model_dir=None, results_dir=None,
                    overwrite: bool = False) -> Path:
    """Zip the course layout: `code/<each code dir>`, `model/` (the run's trained model), `results/` (PNGs)."""
    run_dir, out_zip = Path(run_dir), Path(out_zip)
    model_dir = Path(model_dir) if model_dir else run_dir / "model"
    results_dir = Path(results_dir) if results_dir else run_dir / "results"
    if out_zip.exists() and not overwrite:
        raise FileExistsError(f"{out_zip} already exists; to replace it run 04_sample with overwrite_zip=True "
                              "(from Python: pack_submission(..., overwrite=True))")
    sources = {"model": model_dir, "results": results_dir}
    sources.update({f"code/{Path(d).name}": _project_path(d) for d in code_dirs})
    missing = [f"{arc}/ <- {src}" for arc, src in sources.items() if not src.is_dir()]
    if missing:
        raise FileNotFoundError("Cannot pack the submission, folder(s) not found:\n  " + "\n  ".join(missing))
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_zip.with_name(out_zip.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc, src in sources.items():
            files = [f for f in sorted(src.rglob("*")) if f.is_file() and not _is_clutter(f)]
            for f in tqdm(files, desc=f"zip {arc}", disable=len(files) < 200):
                # weights and PNGs are already compressed: storing them is as small and much faster
                method = zipfile.ZIP_STORED if f.suffix in (".safetensors", ".png", ".bin") else zipfile.ZIP_DEFLATED
                zf.write(f, f"{arc}/{f.relative_to(src).as_posix()}", compress_type=method)
    os.replace(tmp, out_zip)
    return out_zip


def _project_path(d) -> Path:
    d = Path(d)
    return d if d.is_absolute() else PROJECT_ROOT / d


def _is_clutter(f: Path) -> bool:
    return any(part in ("__pycache__", ".ipynb_checkpoints") for part in f.parts) or f.suffix in (".pyc", ".tmp")
