"""Issue 30: one choose-and-write behind 04 and the command line; the hand-in is what was chosen; commands that fit
the launchers, refuse a missing run without creating it, and end in one line; parameters stay as typed."""
import json
import os
import subprocess
import sys

import pytest
from judges_for_tests import BrightJudge
from test_handin import GOOD, HOLDER, digest, fresh, model, prompts, run  # noqa: F401  (fixtures)

from helpers.choose import check_is_the_choice, choose_and_write
from helpers.config import PROJECT_ROOT
from helpers.judges import JudgeSet
from helpers.results import check_record, read_manifest
from helpers.selection import sweep_settings
from helpers.setting import Setting


def judged(run, prompts):
    return JudgeSet(BrightJudge(), prompts, [run.seed + i for i in range(len(prompts))], "every test prompt")


def settings(run):
    return sweep_settings(Setting(scheduler="ddim", steps=2), snapshot=["step-000002", "step-000004"],
                          guidance=[1.0, 3.0])


def metrics(run) -> dict:
    return json.loads(run.layout.metrics.read_text()) if run.layout.metrics.exists() else {}


def clear_choice(run):
    run.layout.metrics.unlink(missing_ok=True)
    for path in run.layout.selection.glob("*"):
        if path.is_file():
            path.unlink()


# ---------------------------------------------------------------- one function: sweep, choice, test set


def test_choose_and_write_records_the_choice_then_writes_exactly_its_set(fresh, model, prompts):
    clear_choice(fresh)
    outcome = choose_and_write(fresh, model, prompts, judged(fresh, prompts), settings=settings(fresh), progress=False)
    record = metrics(fresh)
    assert record["selection"]["choice"]["setting"] == outcome.setting.to_dict() == record["test_set"]["setting"]
    assert outcome.written["written"] == len(prompts) and not (fresh.run_dir / "results.lock").exists()
    manifest = check_record(fresh.layout.results, fresh.layout.test_set_record)
    check_is_the_choice(fresh, manifest)  # what 05 checks before it scores or packs
    # a choose-only run that picks another setting leaves the written set stale: 05 refuses it
    record["selection"]["choice"] = {**record["selection"]["choice"],
                                     "setting": outcome.setting.replace(guidance=9.0).to_dict()}
    fresh.layout.metrics.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"the selection sweep now chooses .*guidance 9.*follows an earlier choice"):
        check_is_the_choice(fresh, manifest)
    record["selection"]["choice"]["setting"] = outcome.setting.to_dict()
    fresh.layout.metrics.write_text(json.dumps(record))
    # select=False keeps the choice: nothing sampled again
    again = choose_and_write(fresh, model, prompts, select=False, progress=False)
    assert again.setting == outcome.setting and again.written["written"] == 0


def test_a_dry_run_prints_the_plan_and_writes_nothing(fresh, model, prompts, capsys, monkeypatch):
    clear_choice(fresh)
    before = sorted(p.relative_to(fresh.run_dir) for p in fresh.run_dir.rglob("*"))
    import helpers.staged as staged

    monkeypatch.setattr(staged, "staged_sweep", lambda *a, **k: pytest.fail("a dry run sampled"))
    outcome = choose_and_write(fresh, model, prompts, judged(fresh, prompts), settings=settings(fresh), dry_run=True)
    assert outcome.written is None and "nothing was sampled, chosen or written" in capsys.readouterr().out
    assert sorted(p.relative_to(fresh.run_dir) for p in fresh.run_dir.rglob("*")) == before


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=5000), r"steps=5000 is more than the 1000 timesteps"),
    (dict(snapshot="step-000009"), r"'step-000009' is not a snapshot of run 't'"),
    (dict(colour=3), r"override\(s\) colour: not setting fields"),
])
def test_a_test_set_override_the_run_cannot_use_is_refused_before_the_sweep(fresh, model, prompts, monkeypatch,
                                                                            overrides, message):
    import helpers.staged as staged

    monkeypatch.setattr(staged, "staged_sweep", lambda *a, **k: pytest.fail("swept before refusing"))
    with pytest.raises(ValueError, match=message):
        choose_and_write(fresh, model, prompts, judged(fresh, prompts), settings=settings(fresh), overrides=overrides)


def test_an_interrupted_test_set_leaves_one_story_and_05_refuses_the_earlier_set(fresh, model, prompts,
                                                                                monkeypatch):
    import helpers.submission as submission

    clear_choice(fresh)
    choose_and_write(fresh, model, prompts, select=False, overrides=GOOD.to_dict(), progress=False)
    earlier = read_manifest(fresh.layout.results)
    real = submission.sample_images
    calls = []

    def killed_after_a_batch(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the student pressed stop, or the session ended
        return real(*a, **k)

    monkeypatch.setattr(submission, "sample_images", killed_after_a_batch)
    with pytest.raises(KeyboardInterrupt):
        choose_and_write(fresh, model, prompts, select=False, overrides=GOOD.replace(guidance=2.0).to_dict())
    monkeypatch.setattr(submission, "sample_images", real)
    # metrics.json says what the run hands in (guidance 2); results/ and its record still hold guidance 1
    assert metrics(fresh)["test_set"]["setting"]["guidance"] == 2.0
    manifest = check_record(fresh.layout.results, fresh.layout.test_set_record)
    assert manifest == earlier and not (fresh.run_dir / "results.lock").exists()
    with pytest.raises(ValueError, match=r"runs/t/results holds step-000004, guidance 1.* but the run's current "
                                         r"choice is step-000004, guidance 2.*not finished. Run 04_sample again"):
        check_is_the_choice(fresh, manifest)
    choose_and_write(fresh, model, prompts, select=False, progress=False)  # the same choice, finished
    check_is_the_choice(fresh, check_record(fresh.layout.results, fresh.layout.test_set_record))


def test_handing_in_again_keeps_a_zip_that_already_holds_exactly_this(fresh, model, prompts, tmp_path):
    from helpers.handin import hand_in
    from helpers.results import results_manifest
    from helpers.weights import setting_weights_id

    choose_and_write(fresh, model, prompts, select=False, overrides=GOOD.to_dict(), progress=False)
    want = results_manifest(GOOD, setting_weights_id(fresh, GOOD), prompts, seed=fresh.seed, size=fresh.output_size)
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.4\n%%EOF\n")
    first = hand_in(fresh, GOOD, prompts, want, student_id="2024_001", report=report)
    packed = fresh.layout.hand_in("2024_001")
    stamp = packed.stat().st_mtime_ns
    again = hand_in(fresh, GOOD, prompts, want, student_id="2024_001", report=report)
    assert first.startswith("wrote runs/t/hw6_2024_001.zip") and "already holds exactly this test set" in again
    assert packed.stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="overwrite_zip=True"):  # asked for fp16 weights: not what is packed
        hand_in(fresh, GOOD, prompts, want, student_id="2024_001", report=report, fp16=True)
    report.write_bytes(b"%PDF-1.4\n% another report\n%%EOF\n")  # a new report: packing again would change it
    with pytest.raises(FileExistsError, match="overwrite_zip=True"):
        hand_in(fresh, GOOD, prompts, want, student_id="2024_001", report=report)
    packed.unlink()


# ---------------------------------------------------------------- the command line


def command(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("program", ["helpers.choose", "helpers.replay", "helpers.train"])
def test_a_command_on_a_missing_run_is_one_line_and_creates_nothing(program, tmp_path):
    done = command(program, "--run-name", "nosuch", "--outputs-dir", str(tmp_path))
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"{program}: run 'nosuch' does not exist") and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_choose_while_another_writer_holds_the_results_is_refused_in_one_line(fresh):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(fresh.run_dir)], cwd=PROJECT_ROOT, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        done = command("helpers.choose", "--run-name", str(fresh.run_dir), "--no-select")
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 1 and f"locked by pid {holder.pid}" in done.stderr and "Traceback" not in done.stderr
    assert "helpers.choose: 1 process" in done.stdout and not fresh.layout.results.exists()


def test_choose_refuses_an_out_of_range_probe_length_before_anything_runs(capsys):
    from helpers.choose import main

    with pytest.raises(SystemExit) as stop:
        main(["--run-name", "nosuch", "--probe-steps", "-1"])
    assert stop.value.code == 2 and "should be a whole number >= 1" in capsys.readouterr().err


def test_the_process_count_says_when_accelerate_started_only_one(monkeypatch):
    from helpers.choose import processes_line

    assert processes_line(2) == "helpers.choose: 2 processes"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert "only with --multi_gpu" in processes_line(1)


# ---------------------------------------------------------------- parameters as typed, the hand-in's inputs


@pytest.mark.parametrize("typed, value", [("student_id=2024_001", "2024_001"), ("student_id=0x1F", "0x1F"),
                                          ("snapshot=1e3", "1e3"), ("report='my report.pdf'", "my report.pdf"),
                                          ("max_steps=300", 300), ("guidances=[1, 2]", [1, 2]),
                                          ("student_id=None", None)])
def test_text_parameters_stay_as_typed(typed, value):
    from helpers.runs import parse_parameter

    assert parse_parameter(typed)[1] == value


def test_a_student_id_that_arrived_as_a_number_or_too_long_is_refused():
    from helpers.handin import check_student_id

    with pytest.raises(ValueError, match=r"student_id=2024001 arrived as a number.*-r student_id 2024_001"):
        check_student_id(2024001)
    with pytest.raises(ValueError, match=r"longer than the 255 bytes"):
        check_student_id("x" * 300)
    assert check_student_id("2024_001") == "2024_001"


def test_the_report_is_found_from_the_command_folder_and_must_be_a_pdf(tmp_path, monkeypatch):
    from helpers.handin import check_report
    from helpers.runs import with_report_resolved

    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4\n%%EOF\n")
    (tmp_path / "fake.pdf").write_text("hello\n")
    monkeypatch.chdir(tmp_path)
    assert with_report_resolved({"report": "report.pdf"})["report"] == str(tmp_path / "report.pdf")
    with pytest.raises(ValueError, match=r"report='fake.pdf': not a PDF \(a PDF file starts with %PDF-\)"):
        check_report("fake.pdf")
    with pytest.raises(ValueError, match=r"report='nope.pdf': file not found"):
        check_report("nope.pdf")


@pytest.mark.slow
def test_runs_on_a_missing_or_unfinished_run_says_what_to_run_and_creates_nothing(tmp_path, fresh):
    done = command("helpers.runs", "--profile", "tiny", "--run-name", "nosuch", "--outputs-dir", str(tmp_path),
                   "--only", "04_sample")
    assert done.returncode == 1 and "run 'nosuch' does not exist" in done.stderr and list(tmp_path.iterdir()) == []
    unfinished = tmp_path / "runs" / "half"
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text(fresh.layout.config.read_text())
    done = command("helpers.runs", "--profile", "tiny", "--run-name", "half", "--outputs-dir", str(tmp_path),
                   "--only", "04_sample", "05_eval")
    assert done.returncode == 1 and "has not finished training" in done.stderr and "run 03_train_cfg" in done.stderr
    assert sorted(p.name for p in unfinished.iterdir()) == ["config.json", "notebooks"]


def test_replay_on_a_run_without_a_full_sweep_or_with_cut_records_ends_in_one_line(fresh, capsys):
    from helpers.replay import load_full_sweep, main

    with pytest.raises(SystemExit) as stop:
        main(["--run-name", str(fresh.run_dir), "--records", str(fresh.run_dir / "nothing-here")])
    assert stop.value.code == 1 and "no sweep records there" in capsys.readouterr().err
    records = fresh.run_dir / "cut-records"
    records.mkdir(exist_ok=True)
    (records / "0123.npz").write_bytes(b"PK\x03\x04 cut off")  # an interrupted write
    with pytest.raises(FileNotFoundError, match="no cell judged on every prompt"):
        load_full_sweep(records)
    assert "0123.npz: unreadable" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["--run-name", str(fresh.run_dir), "--records", str(records), "--alpha", "2"])
    assert stop.value.code == 2 and "not between 0 and 1" in capsys.readouterr().err


@pytest.mark.slow
def test_kernels_started_by_the_runner_log_only_critical_lines(tmp_path):
    """jupyter_client interrupts each kernel it shuts down; the kernel's "KeyboardInterrupt caught" log line must not
    reach the runner's stderr after a notebook that succeeded: the runner's kernels log critical lines only."""
    import nbformat
    import papermill

    from helpers.runs import kernel_config

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys\nprint(sys.argv)")])
    nbformat.write(nb, tmp_path / "argv.ipynb")
    papermill.execute_notebook(str(tmp_path / "argv.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
                               progress_bar=False, log_output=False, config=kernel_config())
    printed = json.loads((tmp_path / "out.ipynb").read_text())["cells"][0]["outputs"][0]["text"]
    assert "--IPKernelApp.log_level=CRITICAL" in "".join(printed)
