"""The guidance panel in a real JupyterLab, clicked by a real browser (Playwright driving Debian's chromium).

A tiny run goes through all five notebooks (on a few demo monsters), JupyterLab serves a copy of 04_sample cut after
the cell tagged `panel` and pointed at that run; the browser runs it, checks that it opens at the sweep's choice
(EMA length included) and that Reset restores it (the seed too, and clears a red line), compares guidance values
(the boxes stay as typed; no caption phrase wraps, file browser open, at 1400 and 1200 px), types bad values,
cancels and interrupts (a disabled Cancel loses its colour). The executed 04 and 05 are opened as a reader would at
1400 px: no frozen 0 % progress line, no table row wrapped. Screenshots go to $BROWSER_SCREENSHOTS (default: a
folder under /tmp named in the output).
Needs `chromium` (apt-get install -y chromium; .ci/run installs it) and the `playwright` package: no browser
download (never `playwright install`). BROWSER_RUN_DIR=<a finished tiny run of all five notebooks> reuses that run.
"""
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from helpers.config import PROJECT_ROOT
from helpers.panel_controls import setting_words, short_prompt
from helpers.runs import run_pipeline
from helpers.setting import Setting

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run installs it where apt can)",
                allow_module_level=True)
from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402 - a requirement; only the browser may be absent

TIMEOUT_MS = 180_000  # two shared cores can be slow to start a kernel and load torch
expect.set_options(timeout=TIMEOUT_MS)  # expect() has its own timeout (5 s), not the page's


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny trained run (two EMA snapshots) and the notebooks JupyterLab serves."""
    root = tmp_path_factory.mktemp("browser")
    (root / "data").mkdir()
    if os.environ.get("BROWSER_RUN_DIR"):  # a finished tiny run of all five notebooks, reused: no 6-minute pipeline
        run_dir = Path(os.environ["BROWSER_RUN_DIR"])
    else:
        run_dir = run_pipeline("ui", "tiny", str(root / "outputs"),
                               parameters=dict(data_dir=str(root / "data"), demo_monsters=8, demo_test_monsters=2,
                                               demo_frames=1))
    lab = root / "lab"
    lab.mkdir()
    shutil.copy(PROJECT_ROOT / "notebooks" / "04_sample.ipynb", lab / "04_committed.ipynb")
    for name in ("04_sample", "05_eval"):  # as the run left them: executed, with outputs
        shutil.copy(run_dir / "notebooks" / f"{name}.ipynb", lab / f"{name[:2]}_executed.ipynb")
    (lab / "04_panel.ipynb").write_text(json.dumps(panel_notebook(run_dir, run_dir.parent.parent)))
    (lab / "choice.json").write_text(json.dumps(json.loads((run_dir / "metrics.json").read_text())
                                                ["selection"]["choice"]["setting"]))
    stages = json.loads((run_dir / "selection" / "stages.json").read_text())["stages"]
    (lab / "screened.json").write_text(json.dumps(len(stages[0]["cells"])))  # what the selection screened
    return lab


def panel_notebook(run_dir: Path, outputs_dir: Path) -> dict:
    """04_sample up to its `panel` cell, its parameters pointing at the tiny run."""
    nb = json.loads((PROJECT_ROOT / "notebooks" / "04_sample.ipynb").read_text())
    tagged = [i for i, c in enumerate(nb["cells"]) if "panel" in c["metadata"].get("tags", [])]
    assert tagged, "04_sample.ipynb has no cell tagged 'panel'"
    nb["cells"] = nb["cells"][:tagged[0] + 1]
    params = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    source = "".join(params["source"])
    source = re.sub(r"^run_name = .*$", f"run_name = {run_dir.name!r}", source, flags=re.M)
    params["source"] = re.sub(r"^outputs_dir = .*$", f"outputs_dir = {str(outputs_dir)!r}", source, flags=re.M)
    return nb


@pytest.fixture(scope="module")
def lab_url(workdir):
    """JupyterLab on a free loopback port with a random token; settings and workspaces kept in the tmp folder."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    settings = workdir.parent / "settings"
    shutil.rmtree(settings, ignore_errors=True)
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false"}')  # no "get notified about news?" toast over the screenshots
    (settings / "@jupyterlab" / "notebook-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        '{"windowingMode": "none"}')  # every cell in the page, not only those scrolled into view
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(workdir.parent / "jcfg"),
           "JUPYTER_RUNTIME_DIR": str(workdir.parent / "jrt"),
           "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={workdir}",
               "--LabApp.expose_app_in_browser=True", f"--LabApp.workspaces_dir={workdir.parent / 'ws'}",
               f"--LabApp.user_settings_dir={settings}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers run as root
        command.append("--allow-root")
    log = open(workdir.parent / "lab.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_server(server, f"http://127.0.0.1:{port}/api/status?token={token}", workdir.parent / "lab.log")
        yield f"http://127.0.0.1:{port}", token, workdir
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def wait_for_server(server, url: str, log: Path, timeout: float = 120):
    began = time.time()
    while time.time() - began < timeout:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots():
    folder = Path(os.environ.get("BROWSER_SCREENSHOTS") or tempfile.mkdtemp(prefix="monster-browser-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {folder}")
    return folder


def open_notebook(browser, lab_url, name: str):
    url, token, _ = lab_url
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    page.set_default_timeout(TIMEOUT_MS)
    workspace = re.sub(r"\W", "", name)  # a fresh workspace: no tabs restored from an earlier page
    page.goto(f"{url}/lab/workspaces/{workspace}/tree/{name}?token={token}&reset")
    page.wait_for_function("() => document.querySelector("
                           "'.jp-Notebook-ExecutionIndicator[data-status=\"idle\"]') !== null")
    time.sleep(3)  # commands issued before the session settles can raise a "Select Kernel" dialog
    if page.locator(".jp-Dialog").count():
        page.get_by_role("button", name="Select", exact=True).click()
    return page


def run_all(page):
    """Run every cell (not awaited: the command's promise settles only when all cells have run). Asked again when
    no cell has started after a while: a command issued while the kernel session settles can be lost."""
    for _ in range(4):
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        try:
            page.wait_for_function("() => [...document.querySelectorAll('.jp-InputPrompt')]"
                                   ".some(p => /\\[[*0-9]/.test(p.textContent))", timeout=20_000)
            return
        except PlaywrightTimeout:
            time.sleep(2)
    pytest.fail("JupyterLab did not start running the notebook's cells")


def box(page, label: str):
    """The text input of the panel control whose label is `label`."""
    return page.locator(".widget-text", has=page.locator("label", has_text=re.compile(f"^{re.escape(label)}$"))) \
        .locator("input")


def test_the_panel_compares_settings_reports_bad_values_and_cancels(browser, lab_url, shots):
    choice = Setting.from_dict(json.loads((lab_url[2] / "choice.json").read_text()))
    page = open_notebook(browser, lab_url, "04_panel.ipynb")
    try:
        check_panel(page, shots, choice)
    finally:
        page.screenshot(path=shots / "last.png")  # what the browser showed when the test ended
        page.close()
        shut_down_kernels(lab_url)


def dropdown(page, label: str):
    """The <select> of the panel dropdown whose label is `label`."""
    return page.locator(".widget-dropdown", has=page.locator("label", has_text=re.compile(f"^{re.escape(label)}$"))) \
        .locator("select")


def shown_setting(page) -> dict:
    """What the panel's setting controls show: box texts, and the selected option's text of each list."""
    fields = {name: box(page, name).input_value() for name in ("guidance", "steps", "rescale")}
    for name in ("snapshot", "EMA length", "scheduler", "autoguide by"):
        fields[name] = dropdown(page, name).evaluate("s => s.options[s.selectedIndex].text").replace("\xa0", " ")
    return fields


def run_until_visible(page, target, attempts: int = 3):
    """Run all cells until `target` shows. Run again when the kernel went idle without it: a kernel that is still
    settling as the page opens can drop the queued cells after the first one (seen on two loaded cores)."""
    for _ in range(attempts):
        run_all(page)
        began = time.time()
        while time.time() - began < TIMEOUT_MS / 1000:
            if target.count() and target.first.is_visible():
                return
            time.sleep(2)
            idle = page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').count()
            if idle and time.time() - began > 15 and not target.count():
                break
    pytest.fail(f"the panel did not appear after {attempts} runs of every cell")


def check_panel(page, shots, choice: Setting):
    generate = page.get_by_role("button", name="Generate", exact=True)
    run_until_visible(page, generate)
    expect(generate).to_be_visible()
    panel = page.locator(".jp-Cell", has=generate)
    panel.scroll_into_view_if_needed()
    panel.screenshot(path=shots / "1-panel.png")

    # it opens at the sweep's choice, every field of it, the EMA length included
    opened = shown_setting(page)
    assert opened["guidance"] == f"{choice.guidance:g}" and opened["steps"] == str(choice.steps), opened
    assert opened["snapshot"].startswith(choice.snapshot) and opened["snapshot"].endswith("← chosen"), opened
    assert opened["EMA length"] == setting_words(choice, "ema_length") and opened["scheduler"] == choice.scheduler
    expect(page.get_by_text(re.compile(r"^chosen by 04's sweep \(runs/\w+/metrics\.json\)$"))).to_be_visible()
    expect(page.get_by_text(re.compile(r"^Generate: 1 row × 4 seeds"))).to_be_visible()  # said before the click
    opened_seed = box(page, "seed").input_value()
    assert opened_seed == "0"  # the first test prompt's handed-in seed: the tiny run's seed + 0
    sigmas = page.get_by_text(re.compile(r"^\(this schedule's noise σ runs from")).inner_text().replace("\xa0", " ")
    assert re.fullmatch(r"\(this schedule's noise σ runs from (about )?[\d.]+ to (about )?[\d,]+\)", sigmas), sigmas

    width = box(page, "prompt").evaluate("e => e.getBoundingClientRect().width")
    long_prompt = ("this is a really cute little creature and it is a red round monster with two eyes and horns and "
                   "a long tail")
    box(page, "prompt").fill(long_prompt)
    expect(page.get_by_text("tokens: the text encoder keeps 16")).to_be_visible()
    assert box(page, "prompt").evaluate("e => e.getBoundingClientRect().width") == width  # a long prompt: same box

    open_file_browser(page)  # where the issue saw "seeds 0…" / "3": less room for the captions
    page.get_by_role("button", name="Compare guidance 1, 2, 3, 5").click()
    captions = page.locator(".monster-rows .monster-caption")  # the last click's rows, not the history strip
    expect(captions).to_have_count(4)
    check_phrases_never_wrap(page, panel, shots)
    texts = captions.all_inner_texts()
    assert page.locator(".monster-rows th").all_inner_texts() == [
        "guidance 1 (no guidance)", "guidance 2", "guidance 3", "guidance 5"]  # each row labelled with its value
    assert all(t.startswith(short_prompt(long_prompt) + " · ") and t.endswith("seeds 0…3") for t in texts), texts
    assert short_prompt(long_prompt) == "“this is a really cute little creature and it is…”"
    assert "guided" not in texts[0]  # guidance 1 never guides
    assert box(page, "guidance").input_value() == opened["guidance"]  # Compare leaves the box as typed
    assert page.locator(".monster-rows img").first.evaluate("img => img.naturalWidth") == 4 * 96
    panel.screenshot(path=shots / "2-compare.png")

    box(page, "guidance").fill("7")
    box(page, "steps").fill("3")
    dropdown(page, "scheduler").select_option("euler")
    page.get_by_role("button", name="reset to chosen").click()
    expect(box(page, "guidance")).to_have_value(opened["guidance"])
    for _ in range(60):  # each control's new value reaches the page in its own message
        if shown_setting(page) == opened:
            break
        time.sleep(0.5)
    assert shown_setting(page) == opened  # Reset restores every field

    box(page, "seed").fill("5")  # a seed change and a failed click, then Reset: the handed-in picture again
    box(page, "guidance").fill("-2")
    generate.click()
    expect(page.get_by_text("Cannot sample: guidance=-2.0")).to_be_visible()
    stale = page.locator('[title="stale"]')  # the dimmed rows
    expect(stale).to_have_count(1)
    page.get_by_role("button", name="reset to chosen").click()
    expect(box(page, "seed")).to_have_value(opened_seed)
    expect(box(page, "guidance")).to_have_value(opened["guidance"])
    expect(page.get_by_text("Cannot sample")).to_have_count(0)  # every box is valid again: no red line
    expect(stale).to_have_count(0)
    panel.screenshot(path=shots / "2b-after-reset.png")

    box(page, "steps").fill("0")
    generate.click()
    expect(page.get_by_text("Cannot sample: steps=0 should be a whole number >= 1")).to_be_visible()
    expect(generate).to_be_enabled()
    panel.screenshot(path=shots / "3-bad-value.png")

    box(page, "steps").fill("2")
    box(page, "guidance").fill("2")
    dropdown(page, "snapshot").select_option(label=next(
        t for t in dropdown(page, "snapshot").locator("option").all_inner_texts() if t.startswith("step-000002")))
    generate.click()
    expect(page.get_by_text("Cannot sample")).to_have_count(0)
    expect(captions).to_have_count(1)
    caption = captions.first.inner_text()
    assert caption.endswith("seeds 0…3") and ("step-000002" in caption) == (choice.snapshot != "step-000002")
    expect(page.locator(".monster-history .monster-caption")).to_have_count(4)  # the compare rows, kept below

    cancel = page.get_by_role("button", name="Cancel", exact=True)
    for stop in ("Cancel", "Kernel → Interrupt"):
        box(page, "steps").fill("1000")  # the most the schedule allows; seconds on a CPU
        generate.click()
        expect(page.get_by_text("sampling…")).to_be_visible()
        expect(cancel).to_be_enabled()
        live = cancel.evaluate("e => getComputedStyle(e).backgroundColor")
        time.sleep(1)
        if stop == "Cancel":
            cancel.click()
        else:
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:interrupt-kernel'); }")
        expect(page.get_by_text(re.compile(r"^cancelled after \d+ steps"))).to_be_visible(timeout=30_000)
        expect(generate).to_be_enabled()
        expect(cancel).to_be_disabled()
        expect(cancel).not_to_have_class(re.compile("mod-warning"))  # a disabled Cancel is not orange
        assert cancel.evaluate("e => getComputedStyle(e).backgroundColor") != live
        for text in (page.get_by_text(re.compile(r"^cancelled after")),
                     page.get_by_role("button", name="Compare guidance 1, 2, 3, 5")):
            assert text.evaluate("e => e.scrollWidth <= e.clientWidth"), "a label is cut"
    panel.screenshot(path=shots / "4-cancelled.png")


def open_file_browser(page):
    page.evaluate("() => window.jupyterapp.commands.execute('filebrowser:activate')")
    expect(page.locator(".jp-FileBrowser")).to_be_visible()


PHRASE_LINES = """els => els.map(e => { const r = document.createRange(); r.selectNodeContents(e);
    return new Set([...r.getClientRects()].filter(b => b.width > 0).map(b => Math.round(b.top))).size; })"""


def check_phrases_never_wrap(page, panel, shots):
    """Every caption phrase is on one line (its text's boxes share a top) at 1400 and 1200 px, and in a caption
    squeezed to the width of its widest phrase, which must then break, between phrases."""
    phrases = page.locator(".monster-caption .monster-phrase")
    for width in (1400, 1200):
        page.set_viewport_size({"width": width, "height": 2400})
        time.sleep(1)
        lines = phrases.evaluate_all(PHRASE_LINES)
        assert lines and max(lines) == 1, f"a caption phrase wraps at {width} px: {lines}"
        panel.screenshot(path=shots / f"2-compare-{width}.png")
    squeezed = page.locator(".monster-rows .monster-caption").first
    squeezed.evaluate("""e => { const widths = [...e.querySelectorAll('.monster-phrase')]
        .map(p => p.getBoundingClientRect().width);
        e.style.width = Math.max(...widths) + 2 + 'px'; }""")  # room for its widest phrase only
    try:
        assert max(squeezed.locator(".monster-phrase").evaluate_all(PHRASE_LINES)) == 1
        tops = squeezed.locator(".monster-phrase").evaluate_all("es => es.map(e => e.getBoundingClientRect().top)")
        assert len(set(tops)) > 1  # it does break: between phrases
        squeezed.screenshot(path=shots / "2-caption-squeezed.png")
    finally:
        squeezed.evaluate("e => { e.style.width = ''; }")
        page.set_viewport_size({"width": 1400, "height": 2400})


def test_the_committed_notebook_opens_unmodified(browser, lab_url):
    page = open_notebook(browser, lab_url, "04_committed.ipynb")
    time.sleep(2)  # the kernel's info arrives after "idle"; a metadata change would mark the tab now
    assert page.locator(".jp-mod-dirty").count() == 0, "JupyterLab marked the committed notebook modified"
    page.close()
    shut_down_kernels(lab_url)


def shut_down_kernels(lab_url):
    """End every kernel the server runs (a closed page leaves its kernel running)."""
    url, token, _ = lab_url
    headers = {"Authorization": f"token {token}"}
    with urllib.request.urlopen(urllib.request.Request(f"{url}/api/sessions", headers=headers)) as r:
        sessions = json.load(r)
    for session in sessions:
        urllib.request.urlopen(urllib.request.Request(f"{url}/api/sessions/{session['id']}", method="DELETE",
                                                      headers=headers))


@pytest.mark.parametrize("name", ["04_executed.ipynb", "05_executed.ipynb"])
def test_the_executed_notebooks_read_cleanly_at_a_laptop_width(browser, lab_url, shots, name):
    """No frozen 0 % progress line (a library's bar, or ours stopped), no table row wrapped, at 1400 px."""
    page = open_notebook(browser, lab_url, name)
    try:
        outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
        lines = [line.strip() for text in outputs for line in text.splitlines()]
        assert not [line for line in lines if line.startswith("Loading weights")]
        bars = {}
        for line in lines:
            bar = re.match(r"^(.+?):\s+(\d+)%\|", line)
            if bar:
                bars.setdefault(bar.group(1), []).append(int(bar.group(2)))
        assert bars or not name.startswith("04"), "no progress lines found"  # 04 samples; 05 may reuse all
        frozen = [desc for desc, percents in bars.items() if max(percents) == 0]
        assert not frozen, f"progress stuck at 0 %: {frozen}"
        assert not [d for d, p in bars.items() if any(a == b for a, b in zip(p, p[1:]))], bars  # none twice
        rows = page.locator("table.monster-sweep tr, table.monster-scores tr")
        assert rows.count() > 0
        heights = rows.evaluate_all("rows => rows.map(r => r.getBoundingClientRect().height)")
        assert max(heights) < 1.9 * min(heights), f"a table row wraps: row heights {sorted(set(heights))}"
        widths = page.locator("table.monster-sweep").evaluate_all(
            "ts => ts.map(t => [t.getBoundingClientRect().width, t.closest('.jp-OutputArea-output').clientWidth])")
        assert all(w <= room for w, room in widths), widths
        table = page.locator(".jp-Cell", has=page.locator("table.monster-sweep"))
        if table.count():
            table.first.scroll_into_view_if_needed()
            table.first.screenshot(path=shots / f"{name[:2]}-sweep-table.png")
        plot = page.locator(".jp-Cell", has=page.locator("table.monster-sweep")).locator("img")
        if name.startswith("05") and plot.count():
            plot.first.screenshot(path=shots / "05-sweep-plot.png")
        if name.startswith("05"):  # the plot holds as many settings as the selection screened (its caption says so)
            screened = json.loads((lab_url[2] / "screened.json").read_text())
            assert f"{screened} settings screened" in "\n".join(outputs)
            assert page.locator("details.monster-screened tr.monster-screened").count() == screened
    finally:
        page.close()
        shut_down_kernels(lab_url)
