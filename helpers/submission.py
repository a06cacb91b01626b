"""The course deliverable: one 256×256 RGB PNG per `test.json` entry, written once for the chosen setting (the zip
that hands it in is helpers.handin's).

`write_test_set` compares the folder's manifest (helpers.results) with the setting it is asked for: the same
setting resumes (images already on disk are kept and counted), another one moves the images the project wrote
(and their manifest) to `results.history/<n>/`, saying where and how much disk they use, and starts over, so
one folder never mixes images of different models or settings and no earlier set is ever deleted. Every batch
is written as soon as it is decoded, each PNG to a temporary name first; the manifest records every PNG's
SHA-256 once the set is complete.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import torch
from .progress import progress_bar

from .config import PROJECT_ROOT
from .data import Prompt
from .files import atomic_save_image, atomic_write_json, check_can_write, read_json
from .layout import RunLayout
from .results import (MANIFEST, check_results, manifest_differences, read_manifest, record_differences,
                      results_manifest, sha256_bytes)
from .sample import check_honoured, sample_images, to_output_pils
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
                   batch_size: int, record=None) -> dict:
    """The test set of exactly `setting` in `results_dir`, with a manifest of every image's hash: resumed if the
    folder holds that setting already; else written beside it in results.partial/ and swapped in only once
    complete and valid (what the project wrote there before goes to results.history/<n>/). `record`: a file that
    keeps a copy of the final manifest (the run's own record, which 05_eval checks the folder's manifest against)."""
    results_dir = Path(results_dir)
    partial = RunLayout(results_dir.parent).results_partial
    for folder in (results_dir, partial, _history(results_dir)):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{folder}: is a file where the test set needs a folder; move it away, run again")
    check_prompt_names(prompts)
    setting.checked()
    check_honoured(setting, model.scheduler_config)  # before anything is moved: a bad value fails, the old set stays
    _check_writable((results_dir, partial))
    want = results_manifest(setting, weights, prompts, seed=seed, size=size)
    shards = Shards.current()
    # under accelerate launch: one process tidies the folders, every process samples its share, one finishes
    target, changed = shards.broadcast(_prepare_target(results_dir, partial, prompts, want, record)
                                       if shards.is_main else None)
    if shards.is_main:
        print(f"Test set: {setting.label()}, seed {seed}, {size}px, {len(prompts)} prompts -> {shown(target)}"
              + (f" ({shards.world} processes)" if shards.world > 1 else ""))
    stats = generate_test_set(model, prompts, target, setting, batch_size=batch_size, seed=seed, size=size)
    if shards.is_main:
        images = {p.image_name: sha256_bytes((target / p.image_name).read_bytes()) for p in prompts}
        manifest = {**want, "complete": True, "commit": project_commit(), "images": images}
        atomic_write_json(target / MANIFEST, manifest)
        check_results(target, prompts, size, want=want)
        if target == partial:
            _swap_in(partial, results_dir, prompts, changed)
        if record is not None:
            atomic_write_json(record, {**manifest, "results": str(results_dir)})
    shards.barrier()
    return stats


def _prepare_target(results_dir: Path, partial: Path, prompts: list[Prompt], want: dict,
                    record) -> tuple[Path, list[str]]:
    """(the folder to write the set in, how the current one differs): results_dir, or `partial` beside it when
    results_dir holds another setting; images altered since written are moved aside; the manifest says incomplete."""
    have, changed = _trusted_manifest(results_dir, want, record)
    ours = [p.image_name for p in prompts if (results_dir / p.image_name).exists()]
    target = partial if (ours or have) and changed else results_dir
    if target is partial:
        print(f"{shown(results_dir)} holds {len(ours)} images of another setting ({'; '.join(changed)}): writing the "
              f"new set beside it in {shown(partial)}; the earlier one stays in place until the new one is complete and valid")
        _keep_other_partial(partial, prompts, want, _history(results_dir))
    elif have is not None:
        recorded = have.get("images") or {}
        altered = [n for n, d in recorded.items() if n in ours and sha256_bytes((results_dir / n).read_bytes()) != d]
        if altered:
            kept = keep_aside(results_dir, altered)
            print(f"{len(altered)} image(s) differ from what manifest.json recorded (e.g. {altered[0]}): moved them "
                  f"to {shown(kept)} and writing them again")
    target.mkdir(parents=True, exist_ok=True)
    atomic_write_json(target / MANIFEST, {**want, "complete": False, "commit": project_commit()})
    return target, changed


def _trusted_manifest(results_dir: Path, want: dict, record) -> tuple[dict | None, list[str]]:
    """(the folder's manifest, how it differs from `want`); a manifest that disagrees with the run's record is
    not trusted: its images count as of another setting, so they are kept aside, never blessed."""
    have = read_manifest(results_dir) if results_dir.is_dir() else None
    changed = manifest_differences(have, want)
    if have is not None and record is not None and Path(record).exists():
        edited = record_differences(have, read_json(record), Path(record))
        if edited:
            changed = [f"manifest.json disagrees with the run's record: {edited[0]}"] + changed
    return have, changed


def _keep_other_partial(partial: Path, prompts: list[Prompt], want: dict, history: Path) -> None:
    """An interrupted new set of another setting in `partial`: moved to results.history/<n>/, never mixed."""
    if not partial.is_dir():
        return
    have = read_manifest(partial)
    theirs = [p.image_name for p in prompts if (partial / p.image_name).exists()]
    if (theirs or have) and manifest_differences(have, want):
        kept = keep_aside(partial, theirs + ([MANIFEST] if have is not None else []), history)
        print(f"{shown(partial)} held an unfinished set of another setting: moved its {len(theirs)} images to "
              f"{shown(kept)}")


def _swap_in(partial: Path, results_dir: Path, prompts: list[Prompt], changed: list[str]) -> None:
    """Move the earlier set's files to results.history/<n>/, then the complete new set from `partial` into
    `results_dir` (the manifest last: a crash in between leaves images without one, which count as unknown)."""
    names = [p.image_name for p in prompts]
    old = [n for n in names + [MANIFEST] if (results_dir / n).exists()]
    if old:
        kept = keep_aside(results_dir, old)
        print(f"Swapped in the new test set; the earlier one ({len(old) - 1 if MANIFEST in old else len(old)} "
              f"images; {'; '.join(changed)}) is in {shown(kept)} ({_megabytes(kept)}; nothing is deleted)")
    results_dir.mkdir(parents=True, exist_ok=True)
    for name in names + [MANIFEST]:
        os.replace(partial / name, results_dir / name)
    with contextlib.suppress(OSError):  # only if empty: a user's file in it stays
        partial.rmdir()


def shown(path: Path) -> str:
    """A path in a run as runs/<run>/..., the same on every machine (the test set lives in <run>/results...)."""
    path = Path(path)
    for root in (path.parent, path.parent.parent):
        if (root / "config.json").exists():
            return RunLayout(root).shown(path)
    return str(path)


def _check_writable(folders: tuple[Path, ...]) -> None:
    """A folder the set must change (or be created in) that refuses writes, as one line naming it, before anything
    is sampled or moved (a set is swapped in by moving files out of and into results/)."""
    for folder in folders:
        try:
            check_can_write(folder / MANIFEST)
        except OSError as e:
            where = e.filename or folder
            raise type(e)(f"{where}: cannot write there ({e.strerror or e}); make it writable (chmod u+w, or "
                          "chattr -i) and run again: nothing was sampled or moved") from None


def keep_aside(results_dir: Path, names: list[str], history: Path | None = None) -> Path:
    """Move `names` (files the project wrote) from `results_dir` to a new <history>/<n>/ (default: results.history
    beside it); other files stay."""
    history = history or _history(results_dir)
    if history.exists() and not history.is_dir():
        raise NotADirectoryError(f"{history}: is a file; the earlier test set cannot be kept there: move it away")
    n = 1 + max((int(p.name) for p in history.glob("*") if p.name.isdigit()), default=0)
    target = history / str(n)
    target.mkdir(parents=True)
    for name in names:
        os.replace(results_dir / name, target / name)
    return target


def _history(results_dir: Path) -> Path:
    """Where a run's earlier test sets go: `results_dir` is a run's results/ (helpers.layout.RunLayout.results)."""
    return RunLayout(results_dir.parent).results_history


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
        print(f"Skipping {skipped} of {len(prompts)} images already in {shown(out_dir)} (written earlier with the same "
              "setting)")
    start = time.perf_counter()
    for b in progress_bar(range(0, len(todo), batch_size), desc="test set", unit="batch", disable=not todo):
        batch = todo[b:b + batch_size]
        images = sample_images(model, [p.text for _, p in batch], [seed + i for i, _ in batch], setting,
                               batch_size=batch_size)
        bad = [p.image_name for (_, p), x in zip(batch, images) if not torch.isfinite(x).all()]
        if bad:
            raise FloatingPointError(f"Sampling produced NaN/inf for {len(bad)} image(s), e.g. {bad[:3]}, at "
                                     f"{_fields(setting)}; nothing of this batch was written (one of these values, "
                                     "or a diverged snapshot: choose others)")
        for (_, p), im in zip(batch, to_output_pils(images, size)):
            atomic_save_image(im, out_dir / p.image_name)
    seconds = time.perf_counter() - start
    shards.barrier()
    return dict(written=len(todo), skipped=skipped, seconds=round(seconds, 2),
                images_per_s=round(len(todo) / seconds, 2) if todo and seconds > 0 else None)


def _fields(setting) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in setting.to_dict().items())


