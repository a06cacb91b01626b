"""The course's hand-in layout: `hw6_<student_id>.zip` holding `hw6_<student_id>/{code,model,results}` and
`report.pdf`, checked when read back; its size told before packing; an fp16 copy of the U-Net on request.

The course: "hw6_{student_id}/ code/ model/ (U-Net weights, or cloud link if too large) results/ report.pdf —
Follow the official format to avoid penalties." `code/` holds what sets the code up again from the zip alone.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

from .layout import WEIGHTS_FILE, RunLayout

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
