"""Files that are whole or absent, and JSON that says where it is broken.

Every file the project writes goes through `atomic_write`: it is written beside its final name and renamed
over it, so a crash never leaves half of one that a later run would take for finished.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(temporary path), then rename the temporary file to `path` (creating its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj, indent: int = 1) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_save_tensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def atomic_save_image(image, path: str | Path) -> Path:
    """A PIL image as PNG (whatever the file name says)."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def read_json(path: str | Path):
    """json.load with messages that name the file (and the line and column of a syntax error)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


# errno -> (what happened, what to do): the second half of a command's one-line message
_OS_ERRORS = {
    errno.EACCES: ("permission denied", "make it writable for you (chmod u+w) or choose another folder"),
    errno.EPERM: ("operation not permitted", "check its permissions and attributes (ls -ld, lsattr -d) or choose "
                                             "another folder"),
    errno.EROFS: ("read-only file system", "choose a folder on a writable disk"),
    errno.EISDIR: ("is a folder, not a file", "give the path of a file (or remove the folder)"),
    errno.ENOTDIR: ("a part of this path is a file, not a folder", "check the path"),
    errno.ENOSPC: ("no space left on the disk", "free space or choose a folder on another disk, then run again"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose a folder on another disk, then run again"),
    errno.ENOENT: ("not found", "check the path"),
}
_TEMP_NAME = re.compile(r"\.(.+)\.\d+\.tmp")  # atomic_write's temporary file: name the file it stands for


def os_error_line(prog: str, e: OSError) -> str:
    """`prog: <path>: <what> — <what to do>` for an OSError; its own message when it names no path."""
    if e.filename is None:
        return f"{prog}: {' '.join(str(e).split())}"
    path = Path(os.fsdecode(e.filename))
    if _TEMP_NAME.fullmatch(path.name):
        path = path.with_name(_TEMP_NAME.fullmatch(path.name).group(1))
    elif path.name.startswith((".tmp-", ".old-")):  # a checkpoint's or snapshot's temporary folder
        path = path.parent
    what, todo = _OS_ERRORS.get(e.errno, (e.strerror or type(e).__name__, "check the path and try again"))
    return f"{prog}: {path}: {what} — {todo}"


@contextlib.contextmanager
def os_errors_end_in_one_line(prog: str, status: int = 1):
    """For a command's main(): an OSError (permission, read-only, is-a-folder, disk full) inside the block ends the
    program with os_error_line on stderr and exit `status`, not a traceback. Writers here leave no partial file."""
    try:
        yield
    except OSError as e:
        print(os_error_line(prog, e), file=sys.stderr)
        raise SystemExit(status) from None


def check_can_write(path: str | Path) -> None:
    """Raise the OSError that writing the file `path` would meet, now: it is a folder, or the folder it goes in
    (its nearest existing one) is not writable. Leaves nothing behind."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    probe = folder / f".{path.name}.{os.getpid()}.probe"
    try:
        probe.touch()
        probe.unlink()
    except FileNotFoundError:  # the folder is there, yet a file in it is "not found": /proc, /sys
        raise OSError(f"{folder}: takes no new files (a virtual file system such as /proc?) — choose another "
                      "folder") from None
    except OSError as e:
        raise type(e)(e.errno, e.strerror, str(folder)) from None


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


def safetensors_problem(path: str | Path) -> str | None:
    """Why a .safetensors file is not whole (None: it is as long as its header says): a truncated copy or an
    interrupted write would otherwise reach the loader's bare "Unable to load weights"."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or 8 + length > size:
            return f"truncated: {size} bytes, too short for its own header"
        try:
            header = json.loads(f.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "not a safetensors file (its header cannot be read)"
    if 8 + length + end > size:
        return f"truncated: {size:,} bytes where its header promises {8 + length + end:,}"
    return None
