"""Progress bars that read well where they are looked at: a live widget in JupyterLab, text lines elsewhere.

A notebook executed headless (papermill / nbclient) has no browser to move a widget bar, so the saved copy
would show every bar frozen at 0 %. There, and wherever `MONSTER_PROGRESS=text`, a bar prints one plain text
line every `TEXT_INTERVAL_S` seconds (and at the end) instead: the executed notebook then reads like a log. A line
is never cut at a width, and a line that would only repeat the one before (tqdm redraws the last state on close)
is not printed again. Libraries' own bars (transformers' "Loading weights", diffusers' loaders) are switched off by
`quiet_library_bars`: they would show as a frozen 0 % line in an executed notebook.
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
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        state = text.split("[", 1)[0]  # description, percentage and count: what a repeated line does not change
        if text and state != self.last:
            self.stream.write(text + "\n")
            self.last = state

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, **kwargs):
    """tqdm.auto.tqdm(iterable, **kwargs) in a live notebook or a terminal; text lines when headless."""
    if headless():
        from tqdm.std import tqdm

        kwargs.setdefault("mininterval", TEXT_INTERVAL_S)
        kwargs.setdefault("maxinterval", TEXT_INTERVAL_S * 6)
        # no ncols: tqdm would cut a long description or postfix at that width; without a terminal its bar is
        # 10 characters wide and the line as long as its text
        return tqdm(iterable, file=_LineWriter(sys.stdout), ascii=True, dynamic_ncols=False,
                    **{**kwargs, "leave": True})
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def quiet_library_bars() -> None:
    """Switch off transformers' and diffusers' own progress bars (each weight load would leave a frozen
    "Loading weights 0%" line in an executed notebook; our own bars say what is slow)."""
    for module in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            __import__(module, fromlist=["disable_progress_bar"]).disable_progress_bar()
        except ImportError:
            pass
