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

import contextlib
import json
import os
import re
import subprocess
import time
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import torch
from .progress import progress_bar

from .config import PROJECT_ROOT, resolve_path
from .data import Prompt
from .files import atomic_save_image, atomic_write, atomic_write_json, check_can_write, read_json
from .handin import (CODE_DIRS, CODE_FILES, REPORT, check_report, check_student_id, folder_megabytes, fp16_copy,
                     size_line, top_folder)
from .layout import WEIGHTS_FILE, RunLayout
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


def pack_submission(run_dir, out_zip, unet_dir, prompts: list[Prompt], *, size: int, want: dict | None = None,
                    results_dir=None, guide_dir=None, code_dirs=CODE_DIRS, code_files=CODE_FILES,
                    student_id: str | None = None, report=None, fp16: bool = False, overwrite: bool = False) -> Path:
    """Zip the course layout under `hw6_<student_id>/` (at the root without a student_id): `code/` (each code dir
    and file), `model/` (the chosen U-Net as unet_ema/, in float16 with `fp16`, an autoguided setting's guide U-Net
    as guide/, the scheduler config), `results/` (the PNGs and their manifest), `report.pdf` when given. The
    results folder must pass `results_problems` (against `want`, the chosen setting's manifest, when given), and
    the PNG bytes zipped are the very bytes whose hashes were checked against the manifest."""
    layout, out_zip = RunLayout(run_dir), Path(out_zip)
    results_dir = Path(results_dir) if results_dir else layout.results
    top = f"{top_folder(check_student_id(student_id))}/" if student_id is not None else ""
    report = check_report(report)
    if out_zip.is_dir():  # overwrite would not help: a folder is never replaced by a file here
        raise IsADirectoryError(f"{out_zip}: is a folder, not a zip; move it away (nothing was written)")
    if out_zip.exists() and not overwrite:
        raise FileExistsError(f"{out_zip} already exists; to replace it run 05_eval with overwrite_zip=True "
                              "(from Python: pack_submission(..., overwrite=True))")
    check_results(results_dir, prompts, size, want=want)
    sources = {"model/unet_ema": Path(unet_dir), "model/scheduler": layout.model / "scheduler",
               **({"model/guide": Path(guide_dir)} if guide_dir else {})}
    sources.update({f"code/{Path(d).name}": resolve_path(d) for d in code_dirs})
    files = {f"code/{Path(f).name}": resolve_path(f) for f in code_files}
    missing = [f"{arc}/ <- {src}" for arc, src in sources.items() if not src.is_dir()]
    missing += [f"{arc} <- {src}" for arc, src in files.items() if not src.is_file()]
    if missing:
        raise FileNotFoundError("Cannot pack the submission, not found:\n  " + "\n  ".join(missing))
    if report is not None:
        files[REPORT] = report
    print(f"Packing {out_zip.name}, {_sizes(sources, files, results_dir, fp16)}")
    if report is None and top:
        print(f"No report given: the course expects {top}{REPORT}; pack again with report=<path to your PDF>")
    recorded = read_manifest(results_dir)["images"]
    with contextlib.ExitStack() as stack:
        if fp16:
            half = stack.enter_context(_scratch(out_zip.with_name(f".fp16-{out_zip.stem}")))
            sources["model/unet_ema"] = fp16_copy(unet_dir, half / "unet_ema")
        return atomic_write(out_zip, lambda tmp: _write_zip(tmp, sources, files, results_dir, recorded, top, fp16))


def _sizes(sources: dict[str, Path], files: dict[str, Path], results_dir: Path, fp16: bool) -> str:
    parts = {"model": sum(folder_megabytes(src) for arc, src in sources.items() if arc.startswith("model/")),
             "results": folder_megabytes(results_dir),
             "code": sum(folder_megabytes(src) for arc, src in sources.items() if arc.startswith("code/"))
             + sum(f.stat().st_size for f in files.values()) / 1e6}
    unet = (sources["model/unet_ema"] / WEIGHTS_FILE)
    unet_mb = unet.stat().st_size / 1e6 if unet.exists() else 0.0
    if fp16:
        parts["model"] -= unet_mb / 2
    note = (f" (the U-Net in float16: {unet_mb / 2:.1f} MB instead of {unet_mb:.1f} MB)" if fp16 else
            f" (fp16=True would halve the U-Net's {unet_mb:.1f} MB)" if unet_mb > 50 else "")
    return size_line(parts) + note


@contextlib.contextmanager
def _scratch(folder: Path):
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_zip(path: Path, sources: dict[str, Path], files: dict[str, Path], results_dir: Path,
               recorded: dict[str, str], top: str = "", fp16: bool = False) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.comment = json.dumps({"fp16_model": fp16}).encode()  # how it was packed (already_packed reads it)
        for name, digest in progress_bar(sorted(recorded.items()), desc="zip results", disable=len(recorded) < 200):
            data = (results_dir / name).read_bytes()
            if sha256_bytes(data) != digest:  # changed since it was checked a moment ago
                raise ValueError(f"{results_dir / name}: changed while packing; nothing was written")
            zf.writestr(f"{top}results/{name}", data, compress_type=zipfile.ZIP_STORED)  # PNGs are compressed already
        zf.write(results_dir / MANIFEST, f"{top}results/{MANIFEST}")
        for arc, src in sources.items():
            found = [f for f in sorted(src.rglob("*")) if f.is_file() and not _is_clutter(f)]
            for f in progress_bar(found, desc=f"zip {arc}", disable=len(found) < 200):
                # weights are already compressed: storing them is as small and much faster
                method = zipfile.ZIP_STORED if f.suffix in (".safetensors", ".png", ".bin") else zipfile.ZIP_DEFLATED
                zf.write(f, f"{top}{arc}/{f.relative_to(src).as_posix()}", compress_type=method)
        for arc, f in files.items():
            zf.write(f, f"{top}{arc}", compress_type=zipfile.ZIP_STORED if arc == REPORT else zipfile.ZIP_DEFLATED)


def _is_clutter(f: Path) -> bool:
    return any(part in ("__pycache__", ".ipynb_checkpoints") for part in f.parts) or f.suffix in (".pyc", ".tmp")


def zipped_results_match(zip_path, results_dir) -> int:
    """How many result PNGs `zip_path` holds, each checked byte for byte against `results_dir`; ValueError naming
    the first that differs or is missing on either side."""
    results_dir = Path(results_dir)
    with zipfile.ZipFile(zip_path) as zf:  # results/ at the root, or under the hw6_<student_id>/ top folder
        zipped = {Path(n).name: zf.read(n) for n in zf.namelist()
                  if re.fullmatch(r"([^/]+/)?results/[^/]+\.png", n)}
    on_disk = {f.name for f in results_dir.glob("*.png")}
    if set(zipped) != on_disk:
        odd = sorted(set(zipped) ^ on_disk)[:3]
        raise ValueError(f"{zip_path}: its results/ and {results_dir} hold different PNGs (e.g. {', '.join(odd)})")
    for name, data in zipped.items():
        if data != (results_dir / name).read_bytes():
            raise ValueError(f"{zip_path}: results/{name} differs from {results_dir / name}")
    return len(zipped)


def already_packed(zip_path, results_dir, student_id: str, report=None, fp16: bool = False) -> bool:
    """Whether `zip_path` already hands in exactly what packing now would: the course's layout for `student_id`,
    every result PNG and the manifest byte-identical to `results_dir` (so the same setting and weights), the U-Net
    packed the same way (fp16 or not), every code file as it is now (CRC) and the same report (or none)."""
    from .handin import check_zip_layout

    zip_path, results_dir = Path(zip_path), Path(results_dir)
    if not zip_path.is_file():
        return False
    top = f"{top_folder(student_id)}/"
    try:
        names = check_zip_layout(zip_path, student_id)
        zipped_results_match(zip_path, results_dir)
        with zipfile.ZipFile(zip_path) as zf:
            packed_as = json.loads(zf.comment or b"{}")
            same_manifest = zf.read(f"{top}results/{MANIFEST}") == (results_dir / MANIFEST).read_bytes()
            zipped_report = zf.read(top + REPORT) if top + REPORT in names else None
            code = {i.filename[len(top):]: i.CRC for i in zf.infolist() if i.filename.startswith(f"{top}code/")}
    except (ValueError, KeyError, OSError, zipfile.BadZipFile):
        return False
    return (same_manifest and packed_as.get("fp16_model") == fp16 and code == _code_crcs()
            and zipped_report == (Path(report).read_bytes() if report else None))


def _code_crcs(code_dirs=CODE_DIRS, code_files=CODE_FILES) -> dict[str, int]:
    """{arcname: CRC-32} of the code/ that pack_submission would zip now."""
    found = {f"code/{Path(f).name}": resolve_path(f) for f in code_files}
    for d in code_dirs:
        root = resolve_path(d)
        found.update({f"code/{root.name}/{f.relative_to(root).as_posix()}": f for f in sorted(root.rglob("*"))
                      if f.is_file() and not _is_clutter(f)})
    return {arc: zlib.crc32(f.read_bytes()) for arc, f in found.items() if f.is_file()}


def hand_in(cfg, setting, prompts: list[Prompt], want: dict, *, student_id: str | None, report=None,
            fp16: bool = False, overwrite: bool = False) -> str:
    """Pack the run's hw6_<student_id>.zip of `setting` (whose results/ was verified against `want`) under the
    results lock, read it back, and say so in one line; a zip that already holds exactly this is left as it is."""
    from .handin import PLACEHOLDER_ID, check_zip_layout
    from .runlock import RESULTS_LOCK, run_lock
    from .selection import setting_unet_folder, unet_folder

    if cfg.pipeline:
        raise ValueError(f"run {cfg.run_name!r} samples the pretrained {cfg.pipeline}: for comparison only, the course "
                         "does not accept it, so there is no submission to pack")
    handin_id, out_zip, shown = student_id or PLACEHOLDER_ID, cfg.layout.hand_in(student_id or PLACEHOLDER_ID), \
        cfg.layout.shown
    if student_id is None:
        print(f"student_id not set: packing hw6_{PLACEHOLDER_ID}.zip; the course wants hw6_<your id>.zip: run again "
              "with student_id=<your id>")
    with run_lock(cfg.run_dir, "05_eval: hand-in zip", RESULTS_LOCK):  # results/ cannot change while it is packed
        if not overwrite and already_packed(out_zip, cfg.layout.results, handin_id, report, fp16):
            return (f"{shown(out_zip)} already holds exactly this test set ({setting.label()}) and report: nothing "
                    "to pack again (overwrite_zip=True repacks it)")
        zip_path = pack_submission(cfg.run_dir, out_zip, setting_unet_folder(cfg, setting), prompts,
                                   size=cfg.output_size, want=want, overwrite=overwrite,
                                   guide_dir=unet_folder(cfg, setting.guide) if setting.autoguided else None,
                                   student_id=handin_id, report=report, fp16=fp16)
        check_zip_layout(zip_path, handin_id)
        count = zipped_results_match(zip_path, cfg.layout.results)
    return (f"wrote {shown(zip_path)} ({zip_path.stat().st_size / 1e6:.1f} MB), layout hw6_{handin_id}/code, model, "
            f"results{', report.pdf' if report else ''}: {count} PNGs byte-identical to {shown(cfg.layout.results)}; "
            f"manifest: {setting.label()}")

