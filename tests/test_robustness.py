"""Issue 11, tried as a hostile user would: one test per reproduced fault, each a clear message or correct behaviour.

Helpers that are new with the fixes are imported inside the tests, so on a tree without them every test fails
for its own reason rather than the whole module failing to import.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.checkpoint import list_checkpoints
from helpers.config import PROJECT_ROOT, profile_config
from helpers.run_folder import load_config, open_run
from helpers.data import load_course_data, load_prompts
from helpers.files import read_json
from helpers.images import BadImageError, load_image_tensor, load_rgb
from helpers.train import train
from helpers.trainlog import read_log
from test_train import make_run


def tree_digest(*folders: Path) -> dict[str, str]:
    """Every file under `folders` -> sha256 of its bytes: equal digests mean nothing was lost or rewritten."""
    out = {}
    for folder in folders:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------- 1. every checkpoint damaged


def test_case1_all_checkpoints_damaged_is_an_error_and_nothing_is_touched(tmp_path, course_dir):
    cfg = make_run(tmp_path, course_dir, max_steps=2, checkpoint_every=1, keep_checkpoints=2, snapshot_every=0)
    train(cfg, progress=False)
    root = cfg.run_dir / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-000001", "step-000002"]
    for ckpt in list_checkpoints(root):
        (ckpt / "state.pt").write_bytes(b"not a torch file")
    before = tree_digest(root, cfg.run_dir / "logs", cfg.run_dir / "model")
    with pytest.raises(RuntimeError, match=r"every checkpoint is damaged \(step-000002, step-000001\).*resume=False"):
        train(cfg, progress=False, max_steps=4)
    assert tree_digest(root, cfg.run_dir / "logs", cfg.run_dir / "model") == before


# ---------------------------------------------------------------- 2. a new lr on resume


def test_case2_lower_lr_on_resume_takes_effect(tmp_path, course_dir):
    import torch
    from diffusers.optimization import get_scheduler

    from helpers.checkpoint import load_checkpoint

    cfg = make_run(tmp_path, course_dir, max_steps=4, checkpoint_every=2, lr=1e-2, warmup_steps=1, snapshot_every=0)
    train(cfg, progress=False, stop_at=2)
    train(cfg.replace(lr=1e-3), progress=False)  # "lower lr ... then resume"
    # the same warm-up + cosine curve, at the new peak from the resumed step on
    shape = get_scheduler("cosine", torch.optim.SGD([torch.zeros(1)], lr=1.0), num_warmup_steps=1,
                          num_training_steps=4).lr_lambdas[0]
    expected = [1e-2 * shape(0), 1e-2 * shape(1), 1e-3 * shape(2), 1e-3 * shape(3)]
    assert read_log(cfg)["lr"] == pytest.approx(expected, rel=1e-6)
    state = load_checkpoint(cfg.run_dir / "checkpoints" / "step-000004")["state"]
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(1e-3)
    assert state["lr_scheduler"]["base_lrs"] == pytest.approx([1e-3])


def test_case2_unchanged_lr_resume_reproduces_the_saved_lr_exactly():
    import torch
    from diffusers.optimization import get_scheduler

    from helpers.resume import retarget_optimizer

    def parts(lr):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=lr)
        return opt, get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=10)

    opt, sched = parts(3e-4)
    for _ in range(5):
        opt.step(), sched.step()
    again, again_sched = parts(3e-4)
    again.load_state_dict(opt.state_dict()), again_sched.load_state_dict(sched.state_dict())
    assert retarget_optimizer(again, again_sched, 3e-4) == sched.get_last_lr()  # bit-identical: exact resume holds
    assert retarget_optimizer(again, again_sched, 3e-5)[0] == pytest.approx(sched.get_last_lr()[0] / 10)


# ---------------------------------------------------------------- 3. image modes


def test_case3_16_bit_greyscale_png_is_scaled_not_white(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.array([[10000, 50000], [0, 65535]], np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"  # a real 16-bit PNG
    rgb = np.asarray(load_rgb(path))
    assert rgb[..., 0].tolist() == [[39, 195], [0, 255]] and (rgb[..., 0] == rgb[..., 2]).all()
    x = load_image_tensor(path, 2)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0 and len(x.unique()) == 4


@pytest.mark.parametrize("mode", Image.MODES)
def test_case3_every_pil_mode_converts_correctly_or_is_rejected_by_name(mode):
    from helpers.images import to_rgb

    grey = 100  # every mode gets a mid-grey picture of its kind; the RGB result must be that grey
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        im = Image.new("I", (2, 2), grey * 257).convert(mode) if mode != "I" else Image.new("I", (2, 2), grey * 257)
    elif mode == "F":
        im = Image.new("F", (2, 2), grey / 255)
    elif mode == "1":
        im, grey = Image.new("1", (2, 2), 1), 255
    elif mode in ("La", "RGBa", "PA", "LA", "RGBA"):
        im = Image.new("RGBA", (2, 2), (grey, grey, grey, 255)).convert(mode)
    else:
        im = Image.new("RGB", (2, 2), (grey,) * 3).convert(mode)
    if mode == "LAB":
        with pytest.raises(BadImageError, match=r"sprite.png: image mode LAB .*save it as RGB"):
            to_rgb(im, "sprite.png")
        return
    out = to_rgb(im, "sprite.png")
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out, np.int16) - grey).max() <= 2, (mode, np.asarray(out)[0, 0])


def test_case3_float_images_outside_0_1_are_rejected_by_name():
    from helpers.images import to_rgb

    with pytest.raises(BadImageError, match=r"f.tif: float image \(mode F\) with values in \[0, 300\]"):
        to_rgb(Image.fromarray(np.array([[0.0, 300.0]], np.float32)), "f.tif")


# ---------------------------------------------------------------- 4. one writer per run


HOLDER = """
import sys, time
from helpers.runlock import run_lock
with run_lock(sys.argv[1], "training"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_case4_second_writer_is_refused_with_pid_and_host_then_a_dead_holder_is_taken_over(tmp_path, capsys):
    from helpers.runlock import RunLockedError, run_lock

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=PROJECT_ROOT, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"locked by pid {holder.pid} on host {socket.gethostname()} "
                                                 r"\(training since \d{4}-"):
            with run_lock(tmp_path, "training"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path, "training") as lock:  # the holder died without releasing: a stale lock
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over a stale lock of pid {holder.pid}" in capsys.readouterr().out
    assert not (tmp_path / "run.lock").exists()


@pytest.mark.slow
def test_case4_a_second_trainer_process_is_refused_and_writes_nothing(tmp_path, course_dir):
    from helpers.runlock import run_lock

    cfg = make_run(tmp_path, course_dir, max_steps=2)
    before = tree_digest(cfg.run_dir)
    with run_lock(cfg.run_dir, "training"):  # this process is "the first trainer"
        second = subprocess.run([sys.executable, "-m", "helpers.train", "--run-name", str(cfg.run_dir), "--no-progress"],
                                cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)})
        after = tree_digest(cfg.run_dir)
    assert second.returncode != 0
    assert f"is locked by pid {os.getpid()} on host {socket.gethostname()} (training since" in second.stderr
    assert {k: v for k, v in after.items() if not k.endswith("run.lock")} == before  # no checkpoint, log or config


# ---------------------------------------------------------------- 5. a copied run writes into itself


def test_case5_a_copied_run_is_used_where_it_is(tmp_path, capsys):
    original = open_run("r", "tiny", outputs_dir=str(tmp_path / "a"), max_steps=3)
    copy_dir = tmp_path / "b" / "runs" / "r"
    shutil.copytree(original.run_dir, copy_dir)
    original_bytes = (original.run_dir / "config.json").read_bytes()
    cfg = open_run("r", None, outputs_dir=str(tmp_path / "b"), lr=0.5)
    assert cfg.run_dir.resolve() == copy_dir.resolve()
    assert "copied or moved run" in capsys.readouterr().out
    assert (original.run_dir / "config.json").read_bytes() == original_bytes
    assert json.loads((copy_dir / "config.json").read_text())["lr"] == 0.5
    assert load_config(copy_dir).run_dir.resolve() == copy_dir.resolve()  # the training CLI's --run <folder>
    renamed = tmp_path / "b" / "runs" / "r2"
    copy_dir.rename(renamed)
    assert load_config(renamed).run_name == "r2"


# ---------------------------------------------------------------- 6. parameters


@pytest.mark.parametrize("field, value, message", [
    ("checkpoint_every", -5, "checkpoint_every=-5 must be at least 1"),
    ("lr_schedule", "cosin", "lr_schedule='cosin' is not one of .* \\(did you mean 'cosine'\\?\\)"),
    ("unet_preset", "tinyy", "unet_preset='tinyy' is not one of .* \\(did you mean 'tiny'\\?\\)"),
    ("scheduler", "dpm++2", "scheduler='dpm\\+\\+2' is not one of"),
    ("output_size", 0, "output_size=0 must be at least 1"),
    ("lr", float("nan"), "lr=nan must be a finite number"),
    ("lr", 0.0, "lr=0.0 must be greater than 0.0"),
    ("guidance", -1, "guidance=-1.0 must be at least 0.0"),
    ("guidance_sweep", [1.0, float("inf")], "guidance_sweep=.* finite numbers"),
    ("ema_halflife_images", 0, "ema_halflife_images=0.0 must be greater than 0.0"),
    ("beta_schedule", "cosine", "beta_schedule='cosine' is not one of"),
    ("run_name", "../elsewhere", "run_name='../elsewhere' must be a plain folder name"),
    ("max_epochs", -1, "max_epochs=-1 must be at least 0"),
    ("sweep_steps", [0], "sweep_steps=\\[0\\] must be a non-empty list of step counts"),
    ("sweep_intervals", [[2.0, 1.0]], "sweep_intervals=.* must be a non-empty list of \\[\\] or"),
    ("phema_ema_lengths", [0.05, 0.3], "phema_ema_lengths=.* must be a list of distinct EMA lengths sigma_rel in"),
    ("phema_ema_lengths", [0.05, 0.05], "phema_ema_lengths=.* must be a list of distinct EMA lengths"),
    ("phema_every", -1, "phema_every=-1 must be at least 0"),
    ("ema_length", 0.5, "ema_length=0.5 must be 0 \\(the stored half-life EMA\\) or a post-hoc EMA length"),
    ("sweep_ema_lengths", [0.0, -0.1], "sweep_ema_lengths=.* must be a non-empty list of EMA lengths, each 0"),
    ("guide_weight", float("inf"), "guide_weight=inf must be a finite number"),
    ("sweep_guides", [], "sweep_guides=\\[\\] must be a non-empty list of snapshot names"),
])
def test_case6_every_value_is_checked_where_it_enters(field, value, message):
    with pytest.raises(ValueError, match=message):
        profile_config("tiny", **{field: value})


def test_case6_lr_schedule_names_match_diffusers():
    from diffusers.optimization import SchedulerType

    from helpers.config import LR_SCHEDULES

    assert set(LR_SCHEDULES) == {s.value for s in SchedulerType}


def test_case6_a_typo_is_refused_before_config_json_is_saved(tmp_path):
    cfg = open_run("r", "tiny", outputs_dir=str(tmp_path))
    saved = (cfg.run_dir / "config.json").read_bytes()
    for typo in (dict(scheduler="ddim2"), dict(unet_preset="tinyy"), dict(lr_schedule="cosin")):
        with pytest.raises(ValueError, match="is not one of"):
            open_run("r", None, outputs_dir=str(tmp_path), **typo)
    assert (cfg.run_dir / "config.json").read_bytes() == saved


def test_case6_runner_refuses_unknown_keys_with_exit_2(tmp_path, capsys):
    from helpers.runs import main

    with pytest.raises(SystemExit) as stop:
        main(["--profile", "tiny", "--run-name", "x", "--outputs-dir", str(tmp_path), "-p", "max_step=10"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'max_step'" in err and "did you mean 'max_steps'?" in err
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing was written
    with pytest.raises(SystemExit) as stop:
        main(["--profile", "tiny", "--outputs-dir", str(tmp_path), "-p", "lr=nan"])
    assert stop.value.code == 2 and "lr=" in capsys.readouterr().err


def test_case6_each_notebook_gets_only_its_parameters_and_bools_are_bools(tmp_path, monkeypatch):
    import papermill

    from helpers.runs import NOTEBOOKS, notebook_parameters, run_pipeline

    calls = {}
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda src, out, parameters, **kw: calls.setdefault(Path(src).stem, parameters))
    monkeypatch.setattr("helpers.layout.RunLayout.trained", lambda self: True)  # no notebook runs: as if trained
    run_pipeline("r", "tiny", str(tmp_path), dict(resume="false", make_zip="True", max_steps=3, warmup_steps=2,
                                                  data_dir=str(tmp_path / "d")))
    for name in NOTEBOOKS:  # papermill warns "Passed unknown parameter" for anything else
        assert set(calls[name]) <= set(notebook_parameters(name)), name
    assert calls["03_train_cfg"]["resume"] is False and calls["05_eval"]["make_zip"] is True
    assert "data_dir" in calls["01_data"] and "data_dir" not in calls["03_train_cfg"]
    assert load_config(tmp_path / "runs" / "r").warmup_steps == 2  # no notebook declares it: saved up front


def test_case6_resume_false_as_a_string_starts_over(tmp_path, course_dir):
    from helpers.values import as_bool

    assert [as_bool(v, "resume") for v in ("false", "False", "no", "0", 0, "true", "YES", True)] == [
        False, False, False, False, False, True, True, True]
    with pytest.raises(ValueError, match="resume='maybe' should be True or False"):
        as_bool("maybe", "resume")
    cfg = make_run(tmp_path, course_dir, max_steps=1, snapshot_every=0)
    train(cfg, progress=False)
    result = train(cfg, progress=False, resume="false")
    assert result.resumed_from is None and (cfg.run_dir / "checkpoints.old" / "step-000001").is_dir()


def test_case6_changing_a_shape_setting_on_a_trained_run_is_refused(tmp_path, course_dir):
    cfg = make_run(tmp_path, course_dir, max_steps=2, checkpoint_every=1, snapshot_every=0)
    train(cfg, progress=False, stop_at=1)
    before = tree_digest(cfg.run_dir / "checkpoints") | tree_digest(cfg.run_dir / "config.json")
    with pytest.raises(ValueError, match=r"(?s)unet_preset: 'tiny' -> 'demo' changes the U-Net.*resume=False"):
        train(cfg.replace(unet_preset="demo"), progress=False)
    with pytest.raises(ValueError, match=r"prediction_type: 'v_prediction' -> 'epsilon'"):
        train(cfg.replace(prediction_type="epsilon"), progress=False)
    assert tree_digest(cfg.run_dir / "checkpoints") | tree_digest(cfg.run_dir / "config.json") == before


# ---------------------------------------------------------------- 7. bad data, named


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def _edit_info(course_dir: Path, key: str, **fields) -> None:
    info = read_json(course_dir / "train_info.json")
    info[key].update(fields)
    _write(course_dir / "train_info.json", info)


def empty_dataset(tmp, course):
    _write(tmp / "e" / "train_info.json", {})
    (tmp / "e" / "train").mkdir()
    return lambda: _records(tmp / "e"), r"e/train: no usable training images"


def empty_train_folder(tmp, course):
    for f in (course / "train").iterdir():
        f.unlink()
    return lambda: _records(course), r"train: no usable training images.*keys in train_info.json with no images"


def manifest_all_missing(tmp, course):
    m = _write(tmp / "m.jsonl", '{"image": "gone.png", "caption": "x"}\n{"image": "gone2.png", "caption": "y"}\n')
    return lambda: _records(course, m), r"m.jsonl: no usable training images.*missing: 2"


def action_description_list(tmp, course):
    _edit_info(course, "0_main", action_description=["The monster is idle."])
    return lambda: _report_of(course), r"action_description is a list, not text \(in train_info.json\): 1 \(0_main\)"


def given_description_dict(tmp, course):
    _edit_info(course, "0_main", given_description={"A monster.": 1})
    return lambda: _report_of(course), r"malformed given_description \(in train_info.json\): 1 \(0_main\)"


def caption_int(tmp, course):
    return _manifest_caption(tmp, 7)


def caption_null(tmp, course):
    return _manifest_caption(tmp, None)


def caption_list_of_int(tmp, course):
    return _manifest_caption(tmp, [1, 2])


def caption_dict(tmp, course):
    return _manifest_caption(tmp, {"en": "x"})


def coco_unknown_image_id(tmp, course):
    from helpers.data import coco_to_manifest

    c = _write(tmp / "cap.json", {"images": [{"id": 1, "file_name": "a.png"}],
                                  "annotations": [{"image_id": 9, "caption": "x"}]})
    return lambda: coco_to_manifest(c, tmp, tmp / "o.jsonl"), r"cap.json: annotations\[0\] has image_id 9"


def coco_without_annotations(tmp, course):
    from helpers.data import coco_to_manifest

    c = _write(tmp / "cap.json", {"images": []})
    return lambda: coco_to_manifest(c, tmp, tmp / "o.jsonl"), r"cap.json: expected a COCO captions file.*'annotations'"


def flickr_empty_csv(tmp, course):
    from helpers.data import flickr_to_manifest

    c = _write(tmp / "results.csv", "")
    return lambda: flickr_to_manifest(c, tmp, tmp / "o.jsonl"), r"results.csv: empty"


def prompts_empty_object(tmp, course):
    t = _write(tmp / "test.json", {})
    return lambda: load_prompts(t), r"test.json: no prompts"


def prompts_list_description(tmp, course):
    t = _write(tmp / "test.json", {"0_main": {"image_name": "0_main.png", "given_description": ["a", "b"]}})
    return lambda: load_prompts(t), r"test.json: 1 problem.*'0_main': given_description is a list, not text"


def demo_data_dir_typo(tmp, course):
    from helpers.demo_data import ensure_dataset

    cfg = profile_config("demo", data_dir=str(tmp / "data" / "dmeo"))
    return lambda: ensure_dataset(cfg, num_monsters=8), r"data_dir='.*dmeo'.*misspelt\?"


def coco_overwrites_manifest(tmp, course):
    from helpers.data import coco_to_manifest

    c = _write(tmp / "cap.json", {"images": [{"id": 1, "file_name": "a.png"}],
                                  "annotations": [{"image_id": 1, "caption": "x"}]})
    _write(tmp / "o.jsonl", "precious\n")
    return lambda: coco_to_manifest(c, tmp, tmp / "o.jsonl"), r"o.jsonl already exists; pass overwrite=True"


def flickr_overwrites_manifest(tmp, course):
    from helpers.data import flickr_to_manifest

    c = _write(tmp / "results.csv", "image,caption\na.png,x\n")
    _write(tmp / "o.jsonl", "precious\n")
    return lambda: flickr_to_manifest(c, tmp, tmp / "o.jsonl"), r"o.jsonl already exists; pass overwrite=True"


def truncated_png_in_preview(tmp, course):
    from helpers.images import try_load_rgb

    png = next((course / "train").iterdir())
    png.write_bytes(png.read_bytes()[:60])
    return lambda: _raise_problem(try_load_rgb(png)), rf"{png.name}: cannot decode image"


def zip_exists(tmp, course):
    from helpers.handin import pack_submission

    _write(tmp / "run" / "submission.zip", "old")
    return (lambda: pack_submission(tmp / "run", tmp / "run" / "submission.zip", tmp / "run" / "model" / "unet_ema",
                                    [], size=256),
            r"submission.zip already exists; to replace it run 05_eval with overwrite_zip=True")


def _records(data_dir, manifest=""):
    from helpers.data import load_records

    return load_records(data_dir, manifest)


def _report_of(course):
    records, report = load_course_data(course)
    assert "0_main" not in {r.key for r in records}  # never trained on a malformed entry
    raise ValueError(report.summary())


def _manifest_caption(tmp, caption):
    from helpers.data import load_manifest

    m = _write(tmp / "m.jsonl", json.dumps({"image": "a.png", "caption": caption}) + "\n")
    return lambda: load_manifest(m), r"m.jsonl: line 1: 'caption' must be text or a list of texts"


def _raise_problem(loaded):
    image, problem = loaded
    assert image is None
    raise ValueError(problem)


DATA_CASES = [empty_dataset, empty_train_folder, manifest_all_missing, action_description_list, given_description_dict,
              caption_int, caption_null, caption_list_of_int, caption_dict, coco_unknown_image_id,
              coco_without_annotations, flickr_empty_csv, prompts_empty_object, prompts_list_description,
              demo_data_dir_typo, coco_overwrites_manifest, flickr_overwrites_manifest, truncated_png_in_preview,
              zip_exists]


@pytest.mark.parametrize("case", DATA_CASES, ids=[c.__name__ for c in DATA_CASES])
def test_case7_bad_data_is_named_in_one_message(tmp_path, course_dir, case):
    action, message = case(tmp_path, course_dir)
    setup = tree_digest(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError, FileExistsError)) as error:
        action()
    assert error.match("(?s)" + message)
    assert not isinstance(error.value, (KeyError, TypeError, AttributeError, IndexError))  # not a bare traceback
    assert tree_digest(tmp_path) == setup, "a refused input must not change any file"
    assert not (tmp_path / "data").exists()  # the demo generator did not write into a misspelt data_dir


@pytest.mark.slow
def test_case7_notebook_01_previews_past_a_truncated_png_and_stops_before_plots_on_an_empty_set(tmp_path, course_dir):
    import papermill

    def run_01(name, data_dir):
        out = tmp_path / f"{name}.ipynb"
        try:
            papermill.execute_notebook(str(PROJECT_ROOT / "notebooks" / "01_data.ipynb"), str(out), kernel_name="python3",
                                       parameters=dict(run_name=name, outputs_dir=str(tmp_path), profile="tiny",
                                                       data_dir=str(data_dir)),
                                       cwd=str(PROJECT_ROOT / "notebooks"), progress_bar=False)
            return None
        except papermill.PapermillExecutionError as e:
            return e

    bad = course_dir / "train" / "0_main_0.png"
    bad.write_bytes(bad.read_bytes()[:60])
    assert run_01("truncated", course_dir) is None
    index = json.loads(Path(json.loads((tmp_path / "runs" / "truncated" / "cache.json").read_text())["cache_dir"],
                            "index.json").read_text())
    assert index["skipped"]["count"] == 1 and "0_main_0.png" in index["skipped"]["files"][0]
    empty = tmp_path / "empty"
    _write(empty / "train_info.json", {})
    (empty / "train").mkdir()
    error = run_01("empty", empty)
    assert error is not None and error.ename == "EmptyDatasetError" and "no usable training images" in error.evalue
    assert "load_records" in error.source  # the loading cell, before any plot


@pytest.mark.parametrize("param, message", [
    ("guidances=[-1]", "guidances: guidance=-1.0 should be a finite number >= 0"),
    ("steps_list=[0]", "steps_list: steps=0 should be a whole number >= 1"),
    ("intervals=[0.3,5]", "intervals: guidance_interval=0.3 should be"),
    ("snapshots=step-000900", "snapshots='step-000900' should be a non-empty list"),
    ("guidances=abc", "guidances='abc' should be a non-empty list"),
    ("guidances=[]", "guidances=[] should be a non-empty list"),
    ("sweep_prompts=-3", "sweep_prompts=-3 must be at least 0"),
    ("probe_steps=0", "probe_steps=0 should be a whole number >= 1"),
    ("steps=0", "steps: steps=0 should be a whole number >= 1"),
])
def test_notebook_parameter_values_are_checked_before_anything_runs(tmp_path, capsys, param, message):
    from helpers.runs import main

    with pytest.raises(SystemExit) as e:
        main(["--profile", "tiny", "--run-name", "x", "--outputs-dir", str(tmp_path), "-p", param])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before the run folder was made
