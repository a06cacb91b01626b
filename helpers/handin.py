"""The course's hand-in: `hw6_<student_id>.zip` holding `hw6_<student_id>/{code,model,results}` and `report.pdf`,
packed from a verified results/ (`hand_in`, under the results lock), checked when read back; its size told before
packing; an fp16 copy of the U-Net on request. `pack_submission` zips exactly the bytes it verified against the
results manifest, and `already_packed` leaves a zip that holds exactly this hand-in as it is.

The course: "hw6_{student_id}/ code/ model/ (U-Net weights, or cloud link if too large) results/ report.pdf —
Follow the official format to avoid penalties." `code/` holds what sets the code up again from the zip alone.
"""
from __future__ import annotations

import contextlib
import json
import re
import zipfile
import zlib
from pathlib import Path

from .config import resolve_path
from .data import Prompt
from .files import atomic_write
from .layout import WEIGHTS_FILE, RunLayout
from .progress import progress_bar
from .results import MANIFEST, check_results, read_manifest, sha256_bytes

CODE_DIRS = ("helpers", "notebooks")
CODE_FILES = ("requirements.txt", "requirements-cpu.lock", "requirements-cuda.lock", "requirements-cuda.in", "README.md",
              "Makefile", "pyproject.toml")  # make env (or pip install -r …, then -e .)
REPORT = "report.pdf"
PLACEHOLDER_ID = "STUDENT_ID"  # a zip packed without a student_id: named so, and said so, never handed in silently
_ID = re.compile(r"[A-Za-z0-9_-]+")
NAME_MAX = 255  # bytes in one file name on ext4, xfs, btrfs, NTFS and APFS


def check_student_id(student_id) -> str:
    """The id as it names the zip and its top folder; ValueError naming the parameter otherwise. Only text: a number
    is what a launcher made of what was typed (2024_001 -> 2024001, 0x1F -> 31), so it is refused, never guessed."""
    if isinstance(student_id, (int, float)) and not isinstance(student_id, bool):
        raise ValueError(f"student_id={student_id!r} arrived as a number, which may not be what you typed (2024_001 "
                         "reads as 2024001): pass it as text (papermill: -r student_id 2024_001; helpers.runs keeps "
                         "-p student_id=2024_001 as typed)")
    if not isinstance(student_id, str) or not _ID.fullmatch(student_id):
        raise ValueError(f"student_id={student_id!r} should be your student id: letters, digits, '_' or '-' only "
                         "(it names hw6_<student_id>.zip and its top folder)")
    if len(RunLayout(Path()).hand_in(student_id).name.encode()) > NAME_MAX:  # the zip's name, wherever the run is
        raise ValueError(f"student_id={student_id[:20]}... is {len(student_id)} characters: hw6_<student_id>.zip would "
                         f"be longer than the {NAME_MAX} bytes a file name may have")
    return student_id


def top_folder(student_id: str) -> str:
    return f"hw6_{student_id}"


def check_report(report, base: Path | None = None) -> Path | None:
    """The report's absolute path if one is given (a PDF file that exists; relative to `base`, default the working
    folder); ValueError naming the parameter otherwise. A PDF starts with "%PDF-": a renamed text file is refused."""
    if report is None or report == "":
        return None
    path = Path(base or Path.cwd()) / Path(report).expanduser()
    if not path.is_file():
        raise ValueError(f"report={str(report)!r}: " + ("is a folder, not a PDF file" if path.is_dir() else
                                                       f"file not found (looked for {path})"))
    if path.suffix.lower() != ".pdf":
        raise ValueError(f"report={str(report)!r}: the course asks for report.pdf, a PDF file")
    with open(path, "rb") as f:
        if f.read(5) != b"%PDF-":
            raise ValueError(f"report={str(report)!r}: not a PDF (a PDF file starts with %PDF-): export your report "
                             "as PDF")
    return path.resolve()


def folder_megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6


def size_line(parts: dict[str, float]) -> str:
    """'about 12.3 MB: model 10.0 MB, results 2.0 MB, code 0.3 MB' (uncompressed; PNGs and weights barely shrink)."""
    return f"about {_mb(sum(parts.values()))}: " + ", ".join(f"{k} {_mb(v)}" for k, v in parts.items())


def _mb(megabytes: float) -> str:
    return f"{megabytes:,.1f} MB" if megabytes >= 1 else f"{megabytes * 1000:,.0f} kB"


def fp16_copy(unet_dir, out_dir) -> Path:
    """A copy of a diffusers U-Net folder whose safetensors holds its floating-point tensors in float16 (half the
    size); from_pretrained loads it into a float32 model as usual. Written to `out_dir` (replaced)."""
    import shutil

    from safetensors.torch import load_file, save_file

    unet_dir, out_dir = Path(unet_dir), Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in unet_dir.iterdir():
        if f.is_file() and f.name != WEIGHTS_FILE:
            shutil.copy2(f, tmp / f.name)
    tensors = load_file(str(unet_dir / WEIGHTS_FILE))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE),
              metadata={"format": "pt", "converted": "float16 copy of the float32 U-Net (helpers.handin)"})
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def check_zip_layout(zip_path, student_id: str) -> list[str]:
    """The zip's names, if they are the course's layout for `student_id`: one top folder hw6_<student_id>/ holding
    code/, model/ and results/ (and report.pdf if any); else ValueError naming what differs."""
    top = top_folder(student_id)
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
    tops = sorted({n.split("/", 1)[0] for n in names})
    if tops != [top]:
        raise ValueError(f"{zip_path}: top folder {', '.join(tops) or 'none'}, expected {top}/ (student_id "
                         f"{student_id!r}): the course refuses another layout")
    parts = {n.split("/")[1] for n in names if n.count("/") >= 1}
    missing = [p for p in ("code", "model", "results") if p not in parts]
    stray = sorted(parts - {"code", "model", "results", REPORT})
    if missing or stray:
        raise ValueError(f"{zip_path}: {top}/ " + "; ".join(
            ([f"lacks {', '.join(m + '/' for m in missing)}"] if missing else [])
            + ([f"holds {', '.join(stray)} besides code/, model/, results/, {REPORT}"] if stray else [])))
    return names


# ---------------------------------------------------------------- packing the zip


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
    from .runlock import RESULTS_LOCK, run_lock
    from .weights import setting_unet_folder, unet_folder

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
