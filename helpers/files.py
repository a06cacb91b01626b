"""Writing files so that a crash never leaves half of one: write beside it, then rename over it."""
from __future__ import annotations

import os
from pathlib import Path


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def atomic_save_tensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _temp_beside(path)
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path
