"""Progress bars that read well where they are looked at: a live widget in JupyterLab, text lines elsewhere.

A notebook executed headless (papermill / nbclient) has no browser to move a widget bar, so the saved copy would
show every bar frozen at 0 %. There, and wherever `MONSTER_PROGRESS=text`, a bar prints plain text lines instead:
its final state when it closes (done, or where it stopped), and before that one line per `TEXT_QUIET_S` of a long
job, so a bar of seconds leaves one line and an hour's training a few dozen; never a "0%" start line. A line is never
cut at a width, and a line that would only repeat the one before (tqdm redraws the last state on close) is not
printed again. Libraries' own bars
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


TEXT_QUIET_S = 120.0  # a line at most this often while a bar runs: a long job still shows it is alive


def _now() -> float:
    import time

    return time.monotonic()


class _LineWriter:
    """A file for tqdm that turns its carriage-return redraws into lines: one per TEXT_QUIET_S while the bar runs,
    the last state when it closes (`finish`), never a bar's start (0 of n) and never the same state twice."""

    def __init__(self, stream):
        self.stream, self.last, self.pending, self.last_time = stream, None, None, _now()

    def write(self, text: str) -> None:
        import re

        text = text.replace("\r", "").strip()
        state = text.split("[", 1)[0]  # description, percentage and count: what a repeated line does not change
        if not text or state == self.last:
            return
        found = re.search(r"\| *(\d+)/(\d+) *$", state)  # the count, not tqdm's rounded "100%" at 99.5 %
        done = found is not None and int(found.group(1)) >= int(found.group(2)) > 0
        if done or (found and int(found.group(1)) > 0 and _now() - self.last_time >= TEXT_QUIET_S):
            self._emit(text, state)
        else:
            self.pending = (text, state)

    def _emit(self, text: str, state: str) -> None:
        self.stream.write(text + "\n")
        self.last, self.pending, self.last_time = state, None, _now()

    def finish(self) -> None:
        """The bar closed: its last state, if not printed yet (a bar stopped early says where)."""
        if self.pending and self.pending[1] != self.last:
            self._emit(*self.pending)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, **kwargs):
    """tqdm.auto.tqdm(iterable, **kwargs) in a live notebook or a terminal; text lines when headless."""
    if headless():
        from tqdm.std import tqdm

        class TextBar(tqdm):
            def close(self):
                super().close()
                lines.finish()

        kwargs.setdefault("mininterval", TEXT_INTERVAL_S)
        kwargs.setdefault("maxinterval", TEXT_INTERVAL_S * 6)
        # no ncols: tqdm would cut a long description or postfix at that width; without a terminal its bar is
        # 10 characters wide and the line as long as its text
        lines = _LineWriter(sys.stdout)
        return TextBar(iterable, file=lines, ascii=True, dynamic_ncols=False, **{**kwargs, "leave": True})
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


_said: set[str] = set()
_watching = False


def say_once(line: str) -> None:
    """print(line), unless the running notebook cell (or, outside a notebook, this process) printed it already: a
    rebuild or a decision that many sweep cells repeat is said once where the student reads it."""
    global _watching
    if not _watching:
        _watching = True
        try:
            from IPython import get_ipython

            shell = get_ipython()
            if shell is not None:
                shell.events.register("pre_run_cell", lambda *_: _said.clear())
        except ImportError:
            pass
    if line not in _said:
        _said.add(line)
        print(line)
