"""Progress bars in executed notebooks: text lines when headless, tqdm's own bar otherwise."""
import types

import pytest

import helpers.progress
from helpers.progress import headless, progress_bar


def test_forced_text_mode_prints_one_line_per_update(monkeypatch, capsys):
    monkeypatch.setenv("MONSTER_PROGRESS", "text")
    for _ in progress_bar(range(3), desc="work", mininterval=0, miniters=1):
        pass
    lines = capsys.readouterr().out.splitlines()
    assert "\r" not in "".join(lines) and lines[-1].startswith("work: 100%") and "3/3" in lines[-1]
    assert len(lines) == 1  # a bar of a moment: its end, no "0%" start line


@pytest.mark.parametrize("allow_stdin, expected", [(False, True), (True, False)])
def test_a_kernel_driven_by_nbclient_counts_as_headless(monkeypatch, allow_stdin, expected):
    """nbclient (papermill) runs every cell with allow_stdin=False; JupyterLab with True."""
    monkeypatch.delenv("MONSTER_PROGRESS", raising=False)
    shell = types.SimpleNamespace(kernel=types.SimpleNamespace(_allow_stdin=allow_stdin))
    monkeypatch.setattr("IPython.get_ipython", lambda: shell)
    assert headless() is expected
    monkeypatch.setenv("MONSTER_PROGRESS", "widget")
    assert headless() is False


def test_outside_a_kernel_tqdm_decides(monkeypatch):
    monkeypatch.delenv("MONSTER_PROGRESS", raising=False)
    monkeypatch.setattr("IPython.get_ipython", lambda: None)
    assert headless() is False
    bar = progress_bar(range(2), disable=True)
    assert type(bar).__module__.startswith("tqdm")
    assert not isinstance(getattr(bar, "fp", None), helpers.progress._LineWriter)


def test_text_lines_are_never_cut_or_repeated(monkeypatch, capsys):
    monkeypatch.setenv("MONSTER_PROGRESS", "text")
    bar = progress_bar(range(10), desc="a long description " * 6, mininterval=0, miniters=1)
    for i in bar:
        bar.set_postfix_str("a long postfix that would not fit a hundred characters " * 2, refresh=False)
        if i == 4:
            break
    bar.close()  # tqdm redraws the last state (40 %) once more on close: not a second line
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and " 4/10 [" in lines[0]  # where it stopped, once
    assert lines[0].endswith("would not fit a hundred characters ]")  # never cut


def test_library_bars_are_switched_off():
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.enable_progress_bar()
    diffusers.utils.logging.enable_progress_bar()
    helpers.progress.quiet_library_bars()
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert not diffusers.utils.logging.is_progress_bar_enabled()


def test_a_long_bar_prints_a_line_per_quiet_interval_and_its_end(monkeypatch, capsys):
    clock = iter(range(0, 10**6, 1))  # one second per reading
    monkeypatch.setattr(helpers.progress, "_now", lambda: float(next(clock)))
    monkeypatch.setenv("MONSTER_PROGRESS", "text")
    for _ in progress_bar(range(1000), desc="train", mininterval=0, miniters=1):
        pass
    lines = capsys.readouterr().out.splitlines()
    counts = [int(line.split("/1000")[0].split()[-1]) for line in lines]
    assert counts[0] > 0 and counts[-1] == 1000 and "100%" in lines[-1]  # no start line, the end
    assert 3 <= len(lines) <= 10  # about one per TEXT_QUIET_S (120 readings), not one per update
