"""Progress bars that read well where they are looked at: a live widget in JupyterLab, text lines elsewhere.

A notebook executed headless (papermill / nbclient) has no browser to move a widget bar, so the saved copy
would show every bar frozen at 0 %. There, and wherever `MONSTER_PROGRESS=text`, a bar prints one plain text
line every `TEXT_INTERVAL_S` seconds (and at the end) instead: the executed notebook then reads like a log.
"""
from __future__ import annotations

import os
import sys

TEXT_INTERVAL_S = 10.0


def headless() -> bool:
    """True unless a frontend that can show widgets is driving this kernel.

    nbclient (papermill's executor) asks every cell to run with allow_stdin=False, as it cannot answer
    input(); JupyterLab and classic Notebook ask with True. Outside a kernel tqdm decides by itself.
    """
    forced = os.environ.get("MONSTER_PROGRESS", "").lower()
    if forced in ("text", "widget"):
        return forced == "text"
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    kernel = getattr(get_ipython(), "kernel", None)
    return kernel is not None and not getattr(kernel, "_allow_stdin", True)


class _LineWriter:
    """A file for tqdm that turns each carriage-return redraw into its own line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, **kwargs):
    """tqdm.auto.tqdm(iterable, **kwargs) in a live notebook or a terminal; text lines when headless."""
    if headless():
        from tqdm.std import tqdm

        kwargs.setdefault("mininterval", TEXT_INTERVAL_S)
        kwargs.setdefault("maxinterval", TEXT_INTERVAL_S * 6)
        return tqdm(iterable, file=_LineWriter(sys.stdout), ascii=True, ncols=100, dynamic_ncols=False,
                    **{**kwargs, "leave": True})
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)
