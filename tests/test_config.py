import json

import pytest

from helpers.config import PROFILES, profile_config
from helpers.run_folder import load_config, open_run


def test_profiles_resolve_and_validate():
    for name in PROFILES:
        cfg = profile_config(name)
        assert cfg.profile == name
    hw6 = profile_config("hw6")
    assert (hw6.text_encoder, hw6.autoencoder, hw6.autoencoder_subfolder, hw6.resolution) == (
        "openai/clip-vit-base-patch32", "CompVis/stable-diffusion-v1-4", "vae", 256)


def test_unknown_field_is_named_with_a_suggestion():
    with pytest.raises(ValueError, match=r"'learning_rate'.*did you mean 'lr'"):
        profile_config("demo", learning_rate=1e-3)


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "batch_size=0 must be at least 1"),
    ("caption_dropout", 1.5, "caption_dropout=1.5 must be in"),
    ("max_steps", "ten", "max_steps='ten' should be a int"),
    ("prediction_type", "x0", "prediction_type='x0'"),
])
def test_bad_values_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        profile_config("demo", **{field: value})


def test_unknown_profile():
    with pytest.raises(ValueError, match="Unknown profile 'nope'"):
        profile_config("nope")


def test_open_run_saves_then_applies_overrides(tmp_path):
    cfg = open_run("r1", "tiny", outputs_dir=str(tmp_path), max_steps=7)
    saved = json.loads((tmp_path / "runs" / "r1" / "config.json").read_text())
    assert saved["max_steps"] == 7 and saved["profile"] == "tiny"
    again = open_run("r1", None, outputs_dir=str(tmp_path), max_steps=None, lr=0.5)
    assert (again.max_steps, again.lr) == (7, 0.5)
    assert load_config(cfg.run_dir).lr == 0.5
    with pytest.raises(ValueError, match="was made with profile 'tiny'"):
        open_run("r1", "demo", outputs_dir=str(tmp_path))


def test_a_config_json_written_before_a_field_was_renamed_still_loads(tmp_path, capsys):
    from helpers.resume import check_resume

    cfg = open_run("old", "tiny", outputs_dir=str(tmp_path), create=True)
    stored = json.loads(cfg.to_json())
    stored["phema_sigma_rels"] = stored.pop("phema_ema_lengths")[:1]  # as a run of before the rename wrote it
    cfg.layout.config.write_text(json.dumps(stored))
    loaded = load_config(cfg.run_dir)
    assert loaded.phema_ema_lengths == cfg.phema_ema_lengths[:1] and "phema_sigma_rels" not in loaded.to_json()
    assert open_run("old", None, outputs_dir=str(tmp_path)).phema_ema_lengths == cfg.phema_ema_lengths[:1]
    assert "phema_ema_lengths" in json.loads(cfg.layout.config.read_text())  # saved back under the new name
    # a checkpoint's config of before the rename: the same lengths are no change, other ones are the field's
    assert check_resume("step-000002", stored, loaded) == {}
    changed = check_resume("step-000002", stored, loaded.replace(phema_ema_lengths=[0.1]))
    assert changed == {"phema_ema_lengths": (cfg.phema_ema_lengths[:1], [0.1])}
    with pytest.raises(ValueError, match=r"'phema_sigma_rels' \(did you mean 'phema_ema_lengths'\?\)"):
        profile_config("tiny", phema_sigma_rels=[0.05])  # a new value is set under the new name


def test_malformed_config_json_names_line_and_column(tmp_path):
    (tmp_path / "config.json").write_text('{"lr": 1e-3,\n  "batch_size": }')
    with pytest.raises(ValueError, match=r"config.json: malformed JSON at line 2, column"):
        load_config(tmp_path)


def test_micro_splits_above_the_batch_size_is_refused_not_clamped(tmp_path):
    with pytest.raises(ValueError, match=r"micro_splits=16 is more than batch_size=8: each chunk of a batch holds at "
                                         r"least one image, so at most 8 splits"):
        profile_config("tiny", micro_splits=16)
    assert profile_config("tiny", micro_splits=8).micro_splits == 8
    cfg = open_run("r", "tiny", outputs_dir=str(tmp_path), micro_splits=4)
    with pytest.raises(ValueError, match="micro_splits=4 is more than batch_size=2"):
        open_run("r", None, outputs_dir=str(tmp_path), batch_size=2)  # a later change that breaks the pair
    assert load_config(cfg.run_dir).batch_size == 8  # refused before config.json was saved


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_train_stop_at_below_1_is_refused_before_anything_runs(tmp_path, capsys, value):
    from helpers.train import main

    cfg = open_run("r", "tiny", outputs_dir=str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        main(["--run-name", str(cfg.run_dir), "--stop-at", value, "--no-progress"])
    assert stop.value.code == 2
    assert f"argument --stop-at: '{value}' should be a whole number >= 1" in capsys.readouterr().err
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["config.json"]  # nothing trained


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_train_stop_at_below_1_from_python_is_refused_too(tmp_path, value):
    from helpers.train import train

    cfg = open_run("r", "tiny", outputs_dir=str(tmp_path))
    with pytest.raises(ValueError, match=f"stop_at={value!r} should be a whole number >= 1"):
        train(cfg, progress=False, stop_at=value)
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["config.json"]  # nothing trained


def _show_profile(name):
    import subprocess
    import sys

    from helpers.config import PROJECT_ROOT

    return subprocess.run([sys.executable, "-m", "helpers.config", "--profile", name], capture_output=True, text=True,
                          cwd=PROJECT_ROOT)


def test_python_m_helpers_config_says_what_a_profile_changes_and_why():
    demo = _show_profile("demo")
    assert demo.returncode == 0, demo.stderr
    lines = demo.stdout.splitlines()
    assert lines[0].startswith("prediction_type: 'v_prediction' -> 'flow_prediction'  (rectified flow")
    assert any(line.startswith("min_snr_gamma: 5.0 -> 0.0  (") for line in lines)
    assert len(lines) == 3  # sweep_ema_lengths, prediction_type, min_snr_gamma
    hw6 = _show_profile("hw6").stdout.splitlines()
    assert "max_epochs: 0 -> 60  (the best public course result's recipe" in "\n".join(hw6)
    assert any(line.startswith("ema_halflife_images: 10000.0 -> 22150  (") for line in hw6)
    assert not any(line.startswith(("batch_size:", "num_train_timesteps:")) for line in hw6)  # the defaults' values


def test_python_m_helpers_config_refuses_an_unknown_profile_in_one_line():
    run = _show_profile("nope")
    assert run.returncode == 2 and "invalid choice: 'nope'" in run.stderr.splitlines()[-1]
