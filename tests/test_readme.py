"""The README's commands, run as a student types them (issue 30).

Every fenced block of README.md has a marker comment above it: `<!-- ci: NAME -->`, which one of the tests below runs
through bash, or `<!-- ci: not run (why) -->`. A block is run as written, with only these swapped (each swap must
find its text, so a README edit that moves a command fails here instead of silently running something else):
- the tiny profile for hw6/demo, a small demo dataset made once for `data_dir`, a temporary folder for the outputs;
- the run's length where a block sets one (`max_steps` 1200 or 2000 is a few steps on the tiny profile);
- `<your id>` -> 2024_001, `.venv/bin/` -> the environment running the tests, and `make env` lines dropped (CI ran
  its own). The commands run in a folder holding `report.pdf`, as a student's project would.
The Colab loop runs on a simulated session clock (helpers.session), so where a session stops does not depend on the
host: each training step is half a session.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers.config import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!-- ci: (.+?) -->\n$")
BIN = Path(sys.executable).parent
PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
RUNNERS = {"papermill", "runs-all", "score", "time-budget", "colab", "kaggle", "several-gpus", "slurm"}


def readme_blocks() -> list[tuple[str, str]]:
    """[(marker, block text)] of every fenced block, in order; the marker is "" where there is none."""
    text = README.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        marker = MARKER.search(text[:m.start()])
        found.append((marker.group(1) if marker else "", m.group(2)))
    return found


def block(name: str) -> str:
    matches = [b for marker, b in readme_blocks() if marker.split(" ", 1)[0] == name]
    assert len(matches) == 1, f"README.md: {len(matches)} blocks marked <!-- ci: {name} -->"
    return matches[0]


def test_every_readme_block_is_run_by_ci_or_says_why_not():
    problems = []
    for marker, text in readme_blocks():
        name = marker.split(" ", 1)[0]
        if not marker:
            problems.append(f"no <!-- ci: ... --> marker above:\n{text}")
        elif marker.startswith("not run") and not re.fullmatch(r"not run \(.{10,}\)", marker):
            problems.append(f"'{marker}': say why in parentheses")
        elif not marker.startswith("not run") and name not in RUNNERS:
            problems.append(f"'{marker}': no test runs a block of that name (tests/test_readme.py RUNNERS)")
    used = {m.split(" ", 1)[0] for m, _ in readme_blocks()}
    problems += [f"RUNNERS names {n!r}, but no README block is marked so" for n in sorted(RUNNERS - used)]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- running a block as written


def swapped(text: str, *swaps: tuple[str, str]) -> str:
    """`text` with each (regex, replacement) applied; a swap that finds nothing is an error naming it."""
    for pattern, replacement in swaps:
        text, n = re.subn(pattern, replacement, text, flags=re.M)
        assert n, f"the README block no longer contains {pattern!r}:\n{text}"
    return text


def common(text: str) -> str:
    """The swaps every block gets: its environment and `make env` line, the profile, the student id."""
    text = text.replace(".venv/bin/", f"{BIN}/")
    text = re.sub(r"^make env .*\n", "", text, flags=re.M)
    text = re.sub(r"--profile (hw6|demo)\b", "--profile tiny", text)
    return text.replace("<your id>", "2024_001")


def run(script: str, cwd: Path, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
                                                "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **env})
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small demo dataset in the course's format, shared read-only by every block (the swapped `data_dir`)."""
    from helpers.demo_data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("readme") / "data", resolution=16, seed=0, num_monsters=8,
                             num_test_monsters=2, frames_per_action=1)


@pytest.fixture
def student(tmp_path) -> Path:
    """The folder a student types the commands in: it holds their report.pdf."""
    (tmp_path / "report.pdf").write_bytes(PDF)
    return tmp_path


def zipped_pngs(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {Path(n).name: zf.read(n) for n in zf.namelist() if "/results/" in n and n.endswith(".png")}


def assert_handed_in(run_dir: Path, student_id: str = "2024_001") -> None:
    """hw6_<id>.zip holds exactly results/ (byte for byte), which is the run's current choice, and the report."""
    from helpers.results import check_record

    handed = run_dir / f"hw6_{student_id}.zip"
    on_disk = {p.name: p.read_bytes() for p in (run_dir / "results").glob("*.png")}
    assert on_disk and zipped_pngs(handed) == on_disk
    with zipfile.ZipFile(handed) as zf:
        assert zf.read(f"hw6_{student_id}/report.pdf") == PDF
    manifest = check_record(run_dir / "results", run_dir / "selection" / "test_set.json")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {k: manifest[k] for k in metrics["test_set"]["setting"]} == metrics["test_set"]["setting"]
    assert metrics["selection"]["choice"]["setting"] == metrics["test_set"]["setting"]


# ---------------------------------------------------------------- the blocks


@pytest.mark.slow
def test_colab_loop_trains_over_three_sessions_then_hands_in(data, student, tmp_path):
    out = tmp_path / "drive"
    script = swapped(common(block("colab")), (r"--outputs-dir /content/drive/MyDrive/md-outputs",
                                              f"--outputs-dir {out} -p data_dir={data} -p max_steps=6 -p output_size=256"))
    session = dict(HELPERS_SIMULATED_CLOCK_TICK=str(11 * 3600 / 2 + 1))  # a session ends after 2 training steps
    said = [run(script, student, **session) for _ in range(3)]
    assert [s.returncode for s in said] == [0, 0, 0], said[-1].stderr[-2000:]
    for s, step in zip(said[:2], (2, 4)):
        assert f"stopped at step {step}" in s.stdout and "--- 04_sample" not in s.stdout
    assert "all 5 notebooks ran" in said[2].stdout
    run_dir = out / "runs" / "hw6"
    assert_handed_in(run_dir)
    # score the handed-in folder as the README's scorer block says (no Inception or CLIP here: both say skipped)
    stats = student / "public_data" / "score"
    stats.mkdir(parents=True)
    import numpy as np

    np.save(stats / "test_mu.npy", np.zeros(2048))
    np.save(stats / "test_sigma.npy", np.eye(2048))
    score = swapped(block("score"), (r"outputs/runs/hw6-base/results", str(run_dir / "results")),
                    (r"data/hw6/test\.json", str(data / "test.json")), (r"data/hw6/score", str(tmp_path / "score")))
    scored = run(common(score), student)
    assert scored.returncode == 0 and "SKIPPED" in scored.stdout + scored.stderr, scored.stderr[-2000:]


@pytest.mark.slow
def test_kaggle_two_processes_train_choose_and_hand_in_what_was_chosen(data, student, tmp_path):
    out = tmp_path / "kaggle"
    script = swapped(common(block("kaggle")), (r"^OUT=/kaggle/working/outputs", f"OUT={out}"),
                     (r"-p data_dir=/kaggle/input/<dataset>", f"-p data_dir={data}"))
    done = run(script, student)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "helpers.choose: 2 processes" in done.stdout
    assert_handed_in(out / "runs" / "hw6")


@pytest.mark.slow
@pytest.mark.parametrize("name, length", [("runs-all", "max_steps=2000"), ("time-budget", None)])
def test_a_whole_pipeline_block(name, length, data, student, tmp_path):
    text = common(block(name))
    swaps = [(r"(--run-name [\w-]+)", rf"\1 --outputs-dir {tmp_path} -p data_dir={data}")]
    if length:
        swaps.append((re.escape(length), "max_steps=6"))
    done = run(swapped(text, *swaps), student)
    assert done.returncode == 0 and "all 5 notebooks ran" in done.stdout, done.stderr[-3000:]


@pytest.mark.slow
def test_several_processes_slurm_and_papermill_blocks(data, student, tmp_path):
    """Training with 4 and 2 gloo processes, torchrun's choose-and-write, SLURM's accelerate line on one node of 2
    processes, then one notebook at a time with papermill, all on two runs that 01 and 02 made."""
    from helpers.runs import run_pipeline

    for name in ("hw6-base", "demo"):
        run_pipeline(name, "tiny", str(tmp_path), {"data_dir": str(data)}, notebooks=["01_data", "02_unet_arch"])
    outputs = (r"(--run-name [\w-]+)", rf"\1 --outputs-dir {tmp_path}")
    several = run(swapped(common(block("several-gpus")), outputs), student)
    assert several.returncode == 0, several.stderr[-3000:]
    assert "helpers.choose: 2 processes" in several.stdout
    slurm = swapped(common(block("slurm")), (r"^export MASTER_ADDR=.*$", "export MASTER_ADDR=127.0.0.1"),
                    (r"^srun ", ""), outputs)
    done = run(slurm, student, SLURM_NNODES="1", SLURM_NODEID="0", SLURM_GPUS_PER_NODE="2")
    assert done.returncode == 0, done.stderr[-3000:]
    # one notebook at a time, from notebooks/ as the README says: train longer, choose again, hand in
    papermill = swapped(block("papermill"), (r"\.\./outputs/runs/demo/", f"{tmp_path}/runs/demo/"),
                        (r"-p run_name demo", f"-p run_name demo -p outputs_dir {tmp_path}"),
                        (r"-p max_steps 1200", "-p max_steps 12"))
    done = run(common(papermill), PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "demo"
    on_disk = {p.name: p.read_bytes() for p in (run_dir / "results").glob("*.png")}
    assert zipped_pngs(run_dir / "hw6_2024_001.zip") == on_disk  # -r kept the id as typed, not hw6_2024001.zip
