"""Progress bars that read well where they are looked at: a live widget in JupyterLab, text lines elsewhere.

A notebook executed headless (papermill / nbclient) has no browser to move a widget bar, so the saved copy would
show every bar frozen at 0 %. There, and wherever `MONSTER_PROGRESS=text`, a bar prints one plain text line every
`TEXT_INTERVAL_S` seconds, at most one per tenth of the bar (and at the end) instead: the executed notebook then
reads like a log of a dozen lines per bar, however long the job. A line is never cut at a width, and a line that
would only repeat the one before (tqdm redraws the last state on close) is not printed again. Libraries' own bars
(transformers' "Loading weights", diffusers' loaders) are switched off by `quiet_library_bars`: they would show as a
frozen 0 % line in an executed notebook.
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


TEXT_STEP_PERCENT = 10  # a text line when the bar moved this much since the last one...
TEXT_QUIET_S = 120.0  # ...or this long after it: a long job stays a dozen lines and still shows it is alive


class _LineWriter:
    """A file for tqdm that turns each carriage-return redraw into its own line: at most one per
    TEXT_STEP_PERCENT of progress (or per TEXT_QUIET_S), never the same state twice."""

    def __init__(self, stream, clock=None):
        import time

        self.stream, self.last, self.clock = stream, None, clock or time.monotonic
        self.last_percent, self.last_time = None, 0.0

    def write(self, text: str) -> None:
        import re

        text = text.replace("\r", "").strip()
        state = text.split("[", 1)[0]  # description, percentage and count: what a repeated line does not change
        if not text or state == self.last:
            return
        found = re.search(r"\| *(\d+)/(\d+) *$", state)  # the count, not tqdm's rounded "100%" at 99.5 %
        percent = 100 * int(found.group(1)) / int(found.group(2)) if found and int(found.group(2)) else None
        now = self.clock()
        if percent is not None and self.last_percent is not None and percent < 100 and \
                0 <= percent - self.last_percent < TEXT_STEP_PERCENT and now - self.last_time < TEXT_QUIET_S:
            return
        self.stream.write(text + "\n")
        self.last, self.last_percent, self.last_time = state, percent, now

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
