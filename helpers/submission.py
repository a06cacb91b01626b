"""The course deliverable: one 256×256 RGB PNG per `test.json` entry, written once for the chosen setting, and
the zip that hands it in.

`write_test_set` compares the folder's manifest (helpers.results) with the setting it is asked for: the same
setting resumes (images already on disk are kept and counted), another one moves the images the project wrote
(and their manifest) to `results.history/<n>/`, saying where and how much disk they use, and starts over, so
one folder never mixes images of different models or settings and no earlier set is ever deleted. Every batch
is written as soon as it is decoded, each PNG to a temporary name first; the manifest records every PNG's
SHA-256 once the set is complete. `pack_submission` zips exactly the bytes it verified against that manifest.
"""
from __future__ import annotations

import os
import subprocess
import time
import zipfile
from collections import Counter
from pathlib import Path

import torch
from .progress import progress_bar

from .config import PROJECT_ROOT, resolve_path
from .data import Prompt
from .files import atomic_save_image, atomic_write, atomic_write_json
from .layout import RunLayout
from .results import MANIFEST, check_results, manifest_differences, read_manifest, results_manifest, sha256_bytes
from .sample import sample_images, to_output_pils
from .shards import Shards


def check_prompt_names(prompts: list[Prompt]) -> None:
    """The names must make a valid results folder; `load_prompts` checks this too, this guards hand-made lists."""
    problems = [f"{p.key!r}: image_name {p.image_name!r} is not a plain .png file name" for p in prompts
                if not p.image_name.lower().endswith(".png") or Path(p.image_name).name != p.image_name
                or "\\" in p.image_name]
    problems += [f"image_name {n!r} is used {c} times" for n, c in Counter(p.image_name for p in prompts).items()
                 if c > 1]
    if problems:
        raise ValueError(f"{len(problems)} problem(s) with the prompts:\n  " + "\n  ".join(problems))


def write_test_set(model, prompts: list[Prompt], results_dir, setting, weights: str, *, seed: int, size: int,
                   batch_size: int) -> dict:
    """The test set of exactly `setting` in `results_dir`, with a manifest of every image's hash: resumed if the
    folder holds that setting already; else what the project wrote there is moved to results.history/<n>/."""
    results_dir = Path(results_dir)
    if results_dir.exists() and not results_dir.is_dir():
        raise NotADirectoryError(f"{results_dir}: is a file, not a results folder; move it away and run again")
    want = results_manifest(setting, weights, prompts, seed=seed, size=size)
    shards = Shards.current()
    if shards.is_main:  # under accelerate launch: one process tidies the folder, all of them sample
        _prepare_results(results_dir, prompts, want)
        print(f"Test set: {setting.label()}, seed {seed}, {size}px, {len(prompts)} prompts -> {results_dir}"
              + (f" ({shards.world} processes)" if shards.world > 1 else ""))
    shards.barrier()
    stats = generate_test_set(model, prompts, results_dir, setting, batch_size=batch_size, seed=seed, size=size)
    if shards.is_main:
        images = {p.image_name: sha256_bytes((results_dir / p.image_name).read_bytes()) for p in prompts}
        atomic_write_json(results_dir / MANIFEST, {**want, "complete": True, "commit": project_commit(),
                                                   "images": images})
    shards.barrier()
    return stats


def _prepare_results(results_dir: Path, prompts: list[Prompt], want: dict) -> None:
    """Move aside images of another setting (or altered since written); mark the manifest incomplete."""
    have = read_manifest(results_dir)
    ours = [p.image_name for p in prompts if (results_dir / p.image_name).exists()]
    changed = manifest_differences(have, want)
    if (ours or have) and changed:
        kept = keep_aside(results_dir, ours + ([MANIFEST] if have is not None else []))
        print(f"Regenerating the test set: {results_dir} held {len(ours)} images of another setting "
              f"({'; '.join(changed)}). Moved them to {kept} ({_megabytes(kept)}; earlier sets stay in "
              f"{kept.parent}, nothing is deleted).")
    elif have is not None:
        recorded = have.get("images") or {}
        altered = [n for n, d in recorded.items() if n in ours and sha256_bytes((results_dir / n).read_bytes()) != d]
        if altered:
            kept = keep_aside(results_dir, altered)
            print(f"{len(altered)} image(s) differ from what manifest.json recorded (e.g. {altered[0]}): moved them "
                  f"to {kept} and writing them again")
    atomic_write_json(results_dir / MANIFEST, {**want, "complete": False, "commit": project_commit()})


def keep_aside(results_dir: Path, names: list[str]) -> Path:
    """Move `names` (files the project wrote) from `results_dir` to a new results.history/<n>/; other files stay."""
    history = results_dir.with_name(results_dir.name + ".history")
    if history.exists() and not history.is_dir():
        raise NotADirectoryError(f"{history}: is a file; the earlier test set cannot be kept there: move it away")
    n = 1 + max((int(p.name) for p in history.glob("*") if p.name.isdigit()), default=0)
    target = history / str(n)
    target.mkdir(parents=True)
    for name in names:
        os.replace(results_dir / name, target / name)
    return target


def _megabytes(folder: Path) -> str:
    return f"{sum(f.stat().st_size for f in folder.iterdir()) / 1e6:.1f} MB"


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


def generate_test_set(model, prompts: list[Prompt], out_dir, setting, *, batch_size: int, seed: int = 0,
                      size: int = 256) -> dict:
    """Write `<out_dir>/<image_name>` for every prompt not yet there. Prompt i gets seed `seed + i`."""
    check_prompt_names(prompts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = Shards.current()
    todo = [(i, p) for i, p in enumerate(prompts) if not (out_dir / p.image_name).exists()]
    shards.barrier()  # every process has seen the same folder before any writes to it
    skipped = len(prompts) - len(todo)
    todo = [todo[i] for i in shards.share(len(todo))]  # each process writes its own share of the PNGs
    if skipped and shards.is_main:
        print(f"Skipping {skipped} of {len(prompts)} images already in {out_dir} (written earlier with the same setting)")
    start = time.perf_counter()
    for b in progress_bar(range(0, len(todo), batch_size), desc="test set", unit="batch", disable=not todo):
        batch = todo[b:b + batch_size]
        images = sample_images(model, [p.text for _, p in batch], [seed + i for i, _ in batch], setting,
                               batch_size=batch_size)
        bad = [p.image_name for (_, p), x in zip(batch, images) if not torch.isfinite(x).all()]
        if bad:
            raise FloatingPointError(f"Sampling produced NaN/inf for {len(bad)} image(s), e.g. {bad[:3]}; nothing "
                                     "of this batch was written (a diverged snapshot: choose another one)")
        for (_, p), im in zip(batch, to_output_pils(images, size)):
            atomic_save_image(im, out_dir / p.image_name)
    seconds = time.perf_counter() - start
    shards.barrier()
    return dict(written=len(todo), skipped=skipped, seconds=round(seconds, 2),
                images_per_s=round(len(todo) / seconds, 2) if todo and seconds > 0 else None)


def pack_submission(run_dir, out_zip, unet_dir, prompts: list[Prompt], *, size: int, want: dict | None = None,
                    results_dir=None, guide_dir=None, code_dirs=("helpers", "notebooks"),
                    overwrite: bool = False) -> Path:
    """Zip the course layout: `code/<each code dir>`, `model/` (the chosen U-Net as unet_ema/, an autoguided
    setting's guide U-Net as guide/, the scheduler config), `results/` (the PNGs and their manifest). The results folder must pass `results_problems` (against
    `want`, the chosen setting's manifest, when given), and the PNG bytes zipped are the very bytes whose
    hashes were checked against the manifest."""
    layout, out_zip = RunLayout(run_dir), Path(out_zip)
    results_dir = Path(results_dir) if results_dir else layout.results
    if out_zip.exists() and not overwrite:
        raise FileExistsError(f"{out_zip} already exists; to replace it run 05_eval with overwrite_zip=True "
                              "(from Python: pack_submission(..., overwrite=True))")
    check_results(results_dir, prompts, size, want=want)
    sources = {"model/unet_ema": Path(unet_dir), "model/scheduler": layout.model / "scheduler",
               **({"model/guide": Path(guide_dir)} if guide_dir else {})}
    sources.update({f"code/{Path(d).name}": resolve_path(d) for d in code_dirs})
    missing = [f"{arc}/ <- {src}" for arc, src in sources.items() if not src.is_dir()]
    if missing:
        raise FileNotFoundError("Cannot pack the submission, folder(s) not found:\n  " + "\n  ".join(missing))
    recorded = read_manifest(results_dir)["images"]
    return atomic_write(out_zip, lambda tmp: _write_zip(tmp, sources, results_dir, recorded))


def _write_zip(path: Path, sources: dict[str, Path], results_dir: Path, recorded: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, digest in progress_bar(sorted(recorded.items()), desc="zip results", disable=len(recorded) < 200):
            data = (results_dir / name).read_bytes()
            if sha256_bytes(data) != digest:  # changed since it was checked a moment ago
                raise ValueError(f"{results_dir / name}: changed while packing; nothing was written")
            zf.writestr(f"results/{name}", data, compress_type=zipfile.ZIP_STORED)  # PNGs are compressed already
        zf.write(results_dir / MANIFEST, f"results/{MANIFEST}")
        for arc, src in sources.items():
            files = [f for f in sorted(src.rglob("*")) if f.is_file() and not _is_clutter(f)]
            for f in progress_bar(files, desc=f"zip {arc}", disable=len(files) < 200):
                # weights are already compressed: storing them is as small and much faster
                method = zipfile.ZIP_STORED if f.suffix in (".safetensors", ".png", ".bin") else zipfile.ZIP_DEFLATED
                zf.write(f, f"{arc}/{f.relative_to(src).as_posix()}", compress_type=method)


def _is_clutter(f: Path) -> bool:
    return any(part in ("__pycache__", ".ipynb_checkpoints") for part in f.parts) or f.suffix in (".pyc", ".tmp")


def zipped_results_match(zip_path, results_dir) -> int:
    """How many result PNGs `zip_path` holds, each checked byte for byte against `results_dir`; ValueError naming
    the first that differs or is missing on either side."""
    results_dir = Path(results_dir)
    with zipfile.ZipFile(zip_path) as zf:
        zipped = {Path(n).name: zf.read(n) for n in zf.namelist() if n.startswith("results/") and n.endswith(".png")}
    on_disk = {f.name for f in results_dir.glob("*.png")}
    if set(zipped) != on_disk:
        odd = sorted(set(zipped) ^ on_disk)[:3]
        raise ValueError(f"{zip_path}: its results/ and {results_dir} hold different PNGs (e.g. {', '.join(odd)})")
    for name, data in zipped.items():
        if data != (results_dir / name).read_bytes():
            raise ValueError(f"{zip_path}: results/{name} differs from {results_dir / name}")
    return len(zipped)
