"""Issue 24: nothing handed in that its run does not back, in the course's layout.

One writer of a run's selection and test set; 05 checks the manifest against 04's own record; names that stay
inside the run; bad values refused before the earlier set is touched, a new set swapped in only when whole;
one-line errors from the runner and the scorer; fp16 weights and their measured effect on the PNGs."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers.config import PROJECT_ROOT
from helpers.run_folder import open_run
from helpers.data import load_prompts
from helpers.results import check_record, read_manifest
from helpers.choose import named_overrides
from helpers.setting import Setting

GOOD = Setting("step-000004", 1.0, 2, "ddim")


def write_run_test_set(cfg, model, prompts, setting):
    """(stats, weights id) of the run's test set of `setting`, written as 04 writes it (no sweep, every field set)."""
    from helpers.choose import choose_and_write
    from helpers.weights import setting_weights_id

    outcome = choose_and_write(cfg, model, prompts, select=False, overrides=setting.to_dict())
    return outcome.written, setting_weights_id(cfg, outcome.setting)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import write_course_dataset
    from test_train import make_run

    from helpers.train import train

    root = tmp_path_factory.mktemp("handin")
    cfg = make_run(root, write_course_dataset(root / "course", monsters=3, actions=("main",)), max_steps=4,
                   snapshot_every=2, checkpoint_every=4, output_size=32, sample_batch_size=2)
    train(cfg, progress=False)  # snapshots step-000002 and step-000004, model/
    return cfg


@pytest.fixture(scope="module")
def model(run):
    from helpers.model import load_model

    return load_model(run)


@pytest.fixture(scope="module")
def prompts(run):
    return load_prompts(run.data_path / "test.json")


@pytest.fixture
def fresh(run):
    """The run without any test set, record or lock (each test starts from there)."""
    for path in (run.layout.results, run.layout.results.with_name("results.partial"), run.layout.results_history):
        shutil.rmtree(path, ignore_errors=True)
    run.layout.test_set_record.unlink(missing_ok=True)
    return run


def digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------- 1. one writer of the selection and the test set

HOLDER = """
import sys, time
from helpers.runlock import RESULTS_LOCK, run_lock
with run_lock(sys.argv[1], "04_sample: test set", RESULTS_LOCK):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_process_is_refused_naming_the_holder_and_writes_nothing(fresh, model, prompts):
    from helpers.runlock import RunLockedError
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(fresh.run_dir)], cwd=PROJECT_ROOT, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"locked by pid {holder.pid} .*\(04_sample: test set since"):
            write_run_test_set(fresh, model, prompts, GOOD)
        assert not fresh.layout.results.exists() and not fresh.layout.test_set_record.exists()
    finally:
        holder.kill()
        holder.wait()
    write_run_test_set(fresh, model, prompts, GOOD)  # the holder died: its stale lock is taken over
    assert read_manifest(fresh.layout.results)["complete"] and not (fresh.run_dir / "results.lock").exists()


# ---------------------------------------------------------------- 2. the hand-in is backed by the run's record


def test_an_edited_manifest_is_refused_naming_the_field_and_never_blessed(fresh, model, prompts, capsys):
    write_run_test_set(fresh, model, prompts, GOOD)
    results, record = fresh.layout.results, fresh.layout.test_set_record
    assert check_record(results, record)["guidance"] == 1.0
    manifest = read_manifest(results)
    (results / "manifest.json").write_text(json.dumps({**manifest, "guidance": 7.5}))
    with pytest.raises(ValueError, match=r"json: guidance is 7.5 in manifest.json but 1.0 in .*test_set.json"):
        check_record(results, record)
    # asking 04 for guidance 7.5 now regenerates: the edited manifest does not make the 1.0 images count as 7.5
    stats, _ = write_run_test_set(fresh, model, prompts, GOOD.replace(guidance=7.5))
    assert stats["written"] == len(prompts) and "disagrees with the run's record: guidance" in capsys.readouterr().out
    assert read_manifest(fresh.layout.results_history / "1")["guidance"] == 7.5  # the edited one, kept aside
    assert check_record(results, record)["guidance"] == 7.5
    manifest = read_manifest(results)
    first = sorted(manifest["images"])[0]
    (results / "manifest.json").write_text(json.dumps({**manifest, "images": {**manifest["images"], first: "0" * 64}}))
    with pytest.raises(ValueError, match=rf"images: the hash of {first} in manifest.json is not the one recorded"):
        check_record(results, record)
    record.unlink()
    with pytest.raises(FileNotFoundError, match="test_set.json: no record of the test set 04_sample wrote"):
        check_record(results, record)


# ---------------------------------------------------------------- 3. names stay inside the run


@pytest.mark.parametrize("field", ["snapshot", "guide"])
@pytest.mark.parametrize("name", ["../../other/snapshots/step-000004", "step-000004/../../x", "..", "a\\b"])
def test_snapshot_and_guide_names_that_leave_the_run_are_refused_naming_the_parameter(run, field, name):
    from helpers.runs import route_parameters
    with pytest.raises(ValueError, match=rf"{field}=.* should be a snapshot name of this run .*without path sep"):
        named_overrides(run, {field: name})
    with pytest.raises(ValueError, match=rf"{field}: {field}=.*without path separators"):
        route_parameters({field: name}, ["04_sample"])  # -p: refused before any notebook runs


def test_first_and_model_are_names_of_this_run_and_others_are_named(run):
    given = named_overrides(run, dict(snapshot="model", guide="first", guide_weight=2.0, guidance=None))
    assert given == {"snapshot": "model", "guide": "step-000002", "guide_weight": 2.0}
    with pytest.raises(ValueError, match=r"'step-000009' is not a snapshot of run 't'.*did you mean"):
        named_overrides(run, dict(snapshot="step-000009"))


# ---------------------------------------------------------------- 6. check before moving anything


@pytest.mark.parametrize("bad, message", [
    (dict(steps=1001), r"steps=1001 is more than the 1000 timesteps the model was trained with"),
    (dict(guide_weight=1e308, guide="step-000002"), r"guide_weight=1e\+308 is above 10000"),
    (dict(guidance=1e300), r"guidance=1e\+300 is above 10000"),
    (dict(guide="step-000004", guide_weight=2.0), r"guide='step-000004' is the snapshot itself"),
])
def test_values_the_model_cannot_honour_are_refused_before_the_earlier_set_is_touched(fresh, model, prompts, bad,
                                                                                      message):
    write_run_test_set(fresh, model, prompts, GOOD)
    before = digest(fresh.layout.results)
    with pytest.raises(ValueError, match=message):
        write_run_test_set(fresh, model, prompts, GOOD.replace(**bad))
    assert digest(fresh.layout.results) == before and not fresh.layout.results_history.exists()
    assert not fresh.layout.results.with_name("results.partial").exists()


def test_a_failure_mid_set_leaves_the_old_set_in_place_and_names_the_settings_fields(fresh, model, prompts,
                                                                                   monkeypatch, capsys):
    import torch

    import helpers.submission as submission

    write_run_test_set(fresh, model, prompts, GOOD)
    before = digest(fresh.layout.results)
    real, calls = submission.sample_images, []

    def nan_on_second_batch(*a, **k):
        calls.append(1)
        images = real(*a, **k)
        return images if len(calls) == 1 else torch.full_like(images, float("nan"))

    monkeypatch.setattr(submission, "sample_images", nan_on_second_batch)
    other = GOOD.replace(guidance=2.0)
    with pytest.raises(FloatingPointError, match=r"NaN/inf .* at snapshot='step-000004', guidance=2\.0, steps=2, "
                                                 r"scheduler='ddim'.*guide_weight=1\.0, ema_length=0\.0"):
        write_run_test_set(fresh, model, prompts, other)
    assert digest(fresh.layout.results) == before and check_record(fresh.layout.results, fresh.layout.test_set_record)
    partial = fresh.layout.results.with_name("results.partial")
    assert len(list(partial.glob("*.png"))) == 2  # the first batch, kept for the resume
    monkeypatch.setattr(submission, "sample_images", real)
    capsys.readouterr()
    stats, _ = write_run_test_set(fresh, model, prompts, other)  # resumes beside, then swaps in
    assert stats == {**stats, "written": len(prompts) - 2, "skipped": 2}
    assert "Swapped in the new test set" in capsys.readouterr().out and not partial.exists()
    assert digest(fresh.layout.results_history / "1") == before
    assert check_record(fresh.layout.results, fresh.layout.test_set_record)["guidance"] == 2.0


def test_a_read_only_results_folder_is_one_line_before_anything_moves(fresh, model, prompts):
    from test_commands import read_only

    write_run_test_set(fresh, model, prompts, GOOD)
    before = digest(fresh.layout.results)
    with read_only(fresh.layout.results), pytest.raises(PermissionError) as e:
        write_run_test_set(fresh, model, prompts, GOOD.replace(guidance=2.0))
    assert str(e.value).startswith(f"{fresh.layout.results}: cannot write there") and "\n" not in str(e.value)
    assert digest(fresh.layout.results) == before and not fresh.layout.results_history.exists()


# ---------------------------------------------------------------- 8. a missing run, truncated weights, the panel


def test_a_run_that_does_not_exist_is_named_and_not_created(tmp_path):
    open_run("other", "tiny", outputs_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"run 'nope' does not exist: .*nope has no config.json "
                                                r"\(runs here: other\)"):
        open_run("nope", None, outputs_dir=str(tmp_path), create=False)
    assert not (tmp_path / "runs" / "nope").exists()
    with pytest.raises(ValueError, match=r"run_name='\.\./evil' must be a plain folder name"):
        open_run("../evil", "tiny", outputs_dir=str(tmp_path))


@pytest.mark.parametrize("role", ["snapshot", "guide"])
def test_a_truncated_weights_file_is_named_as_truncated(run, tmp_path, role):
    from helpers.layout import WEIGHTS_FILE
    from helpers.weights import setting_unet

    cfg = open_run("cut", "tiny", outputs_dir=str(tmp_path))
    shutil.copytree(run.layout.snapshots, cfg.layout.snapshots)
    weights = cfg.layout.snapshots / "step-000002" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=rf"snapshot 'step-000002': .*{WEIGHTS_FILE}: truncated: [\d,]+ bytes where "
                                         r"its header promises [\d,]+"):
        setting_unet(cfg, "step-000002")  # what loads a snapshot and a guide alike
    weights.write_bytes(b"\x05")
    with pytest.raises(ValueError, match="truncated: 1 bytes, too short for its own header"):
        setting_unet(cfg, "step-000002")


def test_the_panel_refuses_steps_above_the_training_timesteps():
    from helpers.panel_controls import BadSetting, read_rows

    values = dict(snapshots=["model"], guidance="3", steps="20, 1001", seed="0", sigma_lo="", sigma_hi="",
                  scheduler="ddim", everywhere=True)
    with pytest.raises(BadSetting, match="steps=1001 is more than the 1000 timesteps"):
        read_rows(values, 1, {"num_train_timesteps": 1000})
    assert len(read_rows({**values, "steps": "20"}, 1, {"num_train_timesteps": 1000})[0]) == 1


# ---------------------------------------------------------------- 8. the scorer's --out


@pytest.mark.parametrize("where, message", [
    ("results/8_main.png", "is an image file name"),
    ("results/score.json", "is inside the results folder"),
])
def test_score_out_never_writes_inside_the_results_or_onto_an_image(tmp_path, capsys, where, message):
    from helpers.score import main

    results = tmp_path / "results"
    results.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(results / "8_main.png")
    before = digest(results)
    argv = ["--results", str(results), "--test-json", str(tmp_path / "t.json"), "--out", str(tmp_path / where)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"helpers.score: --out {tmp_path / where}: {message}") and "\n" not in err
    assert digest(results) == before


def test_score_out_in_proc_names_the_folder_that_takes_no_files(tmp_path, capsys):
    from helpers.score import main

    with pytest.raises(SystemExit) as stop:
        main(["--results", str(tmp_path), "--test-json", str(tmp_path / "t.json"), "--out", "/proc/x.json"])
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip() == ("helpers.score: /proc: takes no new files (a virtual file system such "
                                               "as /proc?) — choose another folder")


# ---------------------------------------------------------------- 7. one line for every failure under helpers.runs


@pytest.mark.parametrize("argv, status, message", [
    (["--profile", "nope"], 2, "helpers.runs: Unknown profile 'nope'; choose one of"),
    (["--profile", "tiny", "--run-name", "../evil"], 1, "helpers.runs: run_name='../evil' must be a plain folder"),
    (["--profile", "demo", "--run-name", "r"], 1, "helpers.runs: Run 'r' was made with profile 'tiny', not 'demo'"),
    (["--profile", "tiny", "--run-name", "r", "-p", "snapshot=../x/step-000004"], 2,
     "helpers.runs: snapshot: snapshot='../x/step-000004' should be a snapshot name of this run"),
    (["--profile", "tiny", "--run-name", "r", "-p", "student_id=a/b"], 2,
     "helpers.runs: student_id='a/b' should be your student id"),
])
def test_runner_failures_are_one_line_with_a_nonzero_status(tmp_path, capsys, argv, status, message):
    from helpers.runs import main

    open_run("r", "tiny", outputs_dir=str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        main(argv + ["--outputs-dir", str(tmp_path), "--only", "04_sample", "05_eval"])  # refused before either runs
    assert stop.value.code == status
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]


def test_runner_only_needs_at_least_one_name(capsys):
    from helpers.runs import main

    with pytest.raises(SystemExit) as stop:
        main(["--only"])
    assert stop.value.code == 2 and "--only: expected at least one argument" in capsys.readouterr().err


def test_a_notebooks_exception_is_one_line_naming_the_notebook_and_the_executed_copy(tmp_path, capfd):
    from helpers.runs import main

    cfg = open_run("r", "tiny", outputs_dir=str(tmp_path), data_dir=str(tmp_path / "no-data"))
    for folder in ("unet_ema", "scheduler"):  # as if trained, so that 05 itself runs and fails
        (cfg.layout.model / folder).mkdir(parents=True)
    (cfg.layout.model / "unet_ema" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as stop:  # 05 on a run without a test set
        main(["--profile", "tiny", "--run-name", "r", "--outputs-dir", str(tmp_path), "--only", "05_eval"])
    assert stop.value.code == 1
    last = capfd.readouterr().err.strip().splitlines()[-1]
    executed = tmp_path / "runs" / "r" / "notebooks" / "05_eval.ipynb"
    assert last.startswith("helpers.runs: 05_eval failed: FileNotFoundError: ") and "Traceback" not in last
    assert last.endswith(f"(full traceback in {executed})") and executed.exists()


# ---------------------------------------------------------------- 9. the fp16 copy of the U-Net, measured


def test_the_fp16_copy_is_half_the_size_and_its_pngs_are_within_the_stated_difference(run, model, prompts, tmp_path):
    """The hand-in's fp16 U-Net, loaded as from_pretrained loads it, regenerates the test PNGs within 2 uint8
    levels of the fp32 ones (measured: see the report; tiny model, 2 DDIM steps)."""
    from helpers.handin import fp16_copy
    from helpers.layout import WEIGHTS_FILE
    from helpers.model import load_model
    from helpers.submission import generate_test_set

    unet = run.layout.unet_dir(GOOD.snapshot)
    half = fp16_copy(unet, tmp_path / "unet_fp16")
    ratio = (half / WEIGHTS_FILE).stat().st_size / (unet / WEIGHTS_FILE).stat().st_size
    assert 0.45 < ratio < 0.55
    generate_test_set(load_model(run, unet_dir=unet), prompts, tmp_path / "fp32", GOOD, batch_size=2, seed=run.seed,
                      size=32)
    from_half = load_model(run, unet_dir=half)
    assert next(from_half.unet.parameters()).dtype == next(model.unet.parameters()).dtype  # computed alike
    generate_test_set(from_half, prompts, tmp_path / "fp16", GOOD, batch_size=2, seed=run.seed, size=32)
    diffs = [np.abs(np.asarray(Image.open(tmp_path / "fp16" / p.image_name), dtype=int)
                    - np.asarray(Image.open(tmp_path / "fp32" / p.image_name), dtype=int)).max() for p in prompts]
    print(f"fp16 vs fp32 PNGs: max difference {max(diffs)} uint8 levels over {len(prompts)} images")
    assert max(diffs) <= 2


def test_an_unfinished_set_of_another_setting_beside_results_is_kept_in_results_history(fresh, model, prompts,
                                                                                        monkeypatch, capsys):
    import torch

    import helpers.submission as submission

    write_run_test_set(fresh, model, prompts, GOOD)
    real = submission.sample_images
    partial = fresh.layout.results.with_name("results.partial")

    def nan_once_a_batch_is_written(*a, **k):
        images = real(*a, **k)
        return torch.full_like(images, float("nan")) if list(partial.glob("*.png")) else images

    monkeypatch.setattr(submission, "sample_images", nan_once_a_batch_is_written)
    with pytest.raises(FloatingPointError):  # guidance 2.0: one batch written beside results/, then it stops
        write_run_test_set(fresh, model, prompts, GOOD.replace(guidance=2.0))
    monkeypatch.setattr(submission, "sample_images", real)
    write_run_test_set(fresh, model, prompts, GOOD.replace(guidance=3.0))
    out = capsys.readouterr().out
    assert "held an unfinished set of another setting: moved its 2 images to" in out
    history = fresh.layout.results_history
    assert read_manifest(history / "1")["guidance"] == 2.0 and len(list((history / "1").glob("*.png"))) == 2
    assert read_manifest(history / "2")["guidance"] == 1.0 and read_manifest(fresh.layout.results)["guidance"] == 3.0
    assert not fresh.run_dir.joinpath("results.partial.history").exists()
