"""The test set writer, the results validator, the submission zip, and bad test.json files."""
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import helpers.submission as submission
from helpers.autoencoder import load_autoencoder
from helpers.config import profile_config
from helpers.data import Prompt, load_prompts
from helpers.model import TextToImage, noise_scheduler
from helpers.selection import Setting
from helpers.submission import (check_manifest, check_results, generate_test_set, pack_submission, read_manifest,
                                results_manifest, validate_results, write_test_set)
from helpers.text import load_text_encoder
from helpers.unet import build_unet

ARGS = dict(guidance=3.0, steps=2, scheduler="ddim", batch_size=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = profile_config("tiny", outputs_dir=str(tmp_path_factory.mktemp("run")))
    unet = build_unet("tiny", 3, 32, 16).eval()
    return TextToImage(cfg, unet, load_text_encoder("tiny", 16), load_autoencoder("identity"),
                       dict(noise_scheduler(cfg).config))


@pytest.fixture
def prompts():
    return [Prompt(f"{i}_main", f"{i}_main.png", f"a monster number {i}") for i in range(5)]


def test_generate_writes_every_image_then_skips_them_and_regenerates_the_same(model, prompts, tmp_path, capsys):
    out = tmp_path / "results"
    stats = generate_test_set(model, prompts, out, **ARGS)
    assert stats["written"] == 5 and stats["skipped"] == 0
    assert check_results(out, prompts) == 5
    first = np.asarray(Image.open(out / "3_main.png")).astype(int)
    (out / "3_main.png").unlink()
    stats = generate_test_set(model, prompts, out, **ARGS)
    assert stats["written"] == 1 and stats["skipped"] == 4
    assert "Skipping 4 of 5 images already in" in capsys.readouterr().out
    # seed = seed + index, whatever the batch: identical up to float rounding (batched matmuls round differently
    # on some CPUs, so a pixel may land one level off), while another seed changes the picture everywhere
    again = np.asarray(Image.open(out / "3_main.png")).astype(int)
    assert np.abs(again - first).max() <= 1
    other = np.asarray(Image.open(out / "2_main.png")).astype(int)
    assert np.abs(other - first).mean() > 10
    assert not list(out.glob("*.tmp"))


def test_validator_lists_every_problem(prompts, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    rng = np.random.default_rng(0)
    good = lambda: Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))
    good().save(out / "0_main.png")
    good().resize((128, 128)).save(out / "1_main.png")
    good().convert("L").save(out / "2_main.png")
    Image.new("RGB", (256, 256), (0, 0, 0)).save(out / "3_main.png")  # what a NaN sample turns into
    good().save(out / "extra.png")
    problems = validate_results(out, prompts)
    assert problems == ["missing: 4_main.png", "unexpected file: extra.png", "1_main.png: size 128×128, expected 256×256",
                        "2_main.png: mode L, expected RGB",
                        "3_main.png: blank: every pixel is about (0, 0, 0) (a NaN or collapsed sample)"]
    with pytest.raises(ValueError, match="5 problem\\(s\\)(.|\n)*missing: 4_main.png(.|\n)*blank"):
        check_results(out, prompts)
    assert validate_results(tmp_path / "nowhere", prompts) == [f"{tmp_path / 'nowhere'}: results folder not found"]


def test_nan_samples_are_refused_before_anything_is_written(model, prompts, tmp_path, monkeypatch):
    monkeypatch.setattr(submission, "sample_images", lambda m, p, s, **kw: torch.full((len(p), 3, 16, 16), float("nan")))
    with pytest.raises(FloatingPointError, match="NaN/inf for 2 image"):
        generate_test_set(model, prompts, tmp_path / "results", **ARGS)
    assert not list((tmp_path / "results").iterdir())


def test_hand_made_bad_prompts_are_refused_before_sampling(model, tmp_path, monkeypatch):
    monkeypatch.setattr(submission, "sample_images", lambda *a, **k: pytest.fail("sampled despite bad names"))
    bad = [Prompt("a", "x.png", "t"), Prompt("b", "x.png", "t"), Prompt("c", "../y.png", "t"), Prompt("d", "z.jpg", "t")]
    with pytest.raises(ValueError, match="3 problem(.|\n)*'\\.\\./y\\.png'(.|\n)*'z\\.jpg'(.|\n)*'x\\.png' is used 2 times"):
        generate_test_set(model, bad, tmp_path / "results", **ARGS)


def make_packable_run(tmp_path):
    run = tmp_path / "run"
    (run / "snapshots" / "step-000004").mkdir(parents=True)
    (run / "snapshots" / "step-000004" / "config.json").write_text("{}")
    (run / "model" / "scheduler").mkdir(parents=True)
    (run / "model" / "scheduler" / "scheduler_config.json").write_text("{}")
    (run / "results").mkdir()
    Image.new("RGB", (256, 256)).save(run / "results" / "0_main.png")
    return run


def test_pack_submission_has_the_course_layout_and_refuses_to_overwrite(tmp_path):
    run = make_packable_run(tmp_path)
    unet = run / "snapshots" / "step-000004"
    code = tmp_path / "helpers_copy"
    (code / "__pycache__").mkdir(parents=True)
    (code / "a.py").write_text("x = 1\n")
    (code / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    zip_path = pack_submission(run, tmp_path / "submission.zip", unet, code_dirs=(str(code),))
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == ["code/helpers_copy/a.py", "model/scheduler/scheduler_config.json",
                                         "model/unet_ema/config.json", "results/0_main.png"]
    with pytest.raises(FileExistsError, match=r"submission.zip already exists.*overwrite_zip=True.*overwrite=True"):
        pack_submission(run, zip_path, unet, code_dirs=(str(code),))
    assert pack_submission(run, zip_path, unet, code_dirs=(str(code),), overwrite=True) == zip_path
    with pytest.raises(FileNotFoundError, match="results/ <- .*nothing"):
        pack_submission(run, tmp_path / "other.zip", unet, code_dirs=(str(code),), results_dir=tmp_path / "nothing")


def test_pack_submission_default_code_dirs_are_the_project_helpers_and_notebooks(tmp_path):
    run = make_packable_run(tmp_path)
    with zipfile.ZipFile(pack_submission(run, tmp_path / "s.zip", run / "snapshots" / "step-000004")) as zf:
        names = zf.namelist()
    assert "code/helpers/submission.py" in names and any(n.startswith("code/notebooks/") for n in names)


SETTING = Setting("model", 3.0, 2, "ddim")


def test_write_test_set_resumes_the_same_setting_and_regenerates_another(model, prompts, tmp_path, capsys):
    out = tmp_path / "results"
    kw = dict(seed=0, size=32, batch_size=2)
    write_test_set(model, prompts, out, SETTING, "w1", **kw)
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["guidance"] == 3.0 and manifest["weights_sha256"] == "w1"
    (out / "4_main.png").unlink()  # an interrupted run: the same setting resumes
    assert write_test_set(model, prompts, out, SETTING, "w1", **kw)["written"] == 1
    assert not (tmp_path / "results.previous").exists()
    first = np.asarray(Image.open(out / "0_main.png")).astype(int)
    other = Setting("model", 1.0, 2, "ddim")  # 05 chose another guidance: everything is regenerated
    assert write_test_set(model, prompts, out, other, "w1", **kw)["written"] == 5
    said = capsys.readouterr().out
    assert "Regenerating the test set" in said and "guidance: 3.0 -> 1.0" in said and "Moved them to" in said
    assert np.abs(np.asarray(Image.open(out / "0_main.png")).astype(int) - first).max() > 0
    assert read_manifest(tmp_path / "results.previous")["guidance"] == 3.0  # the old set is kept, aside
    write_test_set(model, prompts, out, other, "w2", **kw)  # more training: new weights, new images
    assert read_manifest(out)["weights_sha256"] == "w2" and read_manifest(tmp_path / "results.previous")["weights_sha256"] == "w1"
    check_manifest(out, results_manifest(other, "w2", prompts, seed=0, size=32))
    with pytest.raises(ValueError, match="does not match the chosen setting: guidance: 1.0 -> 3.0"):
        check_manifest(out, results_manifest(SETTING, "w2", prompts, seed=0, size=32))


def test_results_without_a_manifest_are_never_mixed_with_new_ones(model, prompts, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(out / "0_main.png")  # images of unknown origin
    write_test_set(model, prompts, out, SETTING, "w1", seed=0, size=32, batch_size=5)
    assert "no manifest.json (images of unknown origin)" in capsys.readouterr().out
    assert np.asarray(Image.open(out / "0_main.png")).std() > 0 and (tmp_path / "results.previous" / "0_main.png").exists()


# ---------------------------------------------------------------- bad test.json: refused before any sampling


def write_test_json(tmp_path, entries) -> str:
    path = tmp_path / "test.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return str(path)


def entry(name, text="a red monster"):
    return {"image_name": name, "given_description": text, "action_description": "", "text_prompt": text}


def test_test_json_with_a_missing_image_name(tmp_path):
    bad = {"0_main": entry("0_main.png"), "1_main": {"given_description": "x", "text_prompt": "x"}}
    with pytest.raises(ValueError, match="test.json: 1 problem(.|\n)*'1_main': missing image_name"):
        load_prompts(write_test_json(tmp_path, bad))


def test_test_json_with_duplicate_names(tmp_path):
    bad = {"0_main": entry("0_main.png"), "1_main": entry("0_main.png")}
    with pytest.raises(ValueError, match="image_name '0_main.png' is used 2 times"):
        load_prompts(write_test_json(tmp_path, bad))


def test_test_json_with_a_name_that_is_not_a_png(tmp_path):
    with pytest.raises(ValueError, match="'0_main': image_name '0_main.jpg' is not a .png"):
        load_prompts(write_test_json(tmp_path, {"0_main": entry("0_main.jpg")}))


@pytest.mark.parametrize("name", ["../0_main.png", "sub/0_main.png", "/tmp/0_main.png", "..\\0_main.png"])
def test_test_json_with_a_path_outside_the_results_folder(tmp_path, name):
    with pytest.raises(ValueError, match="would be written outside the results folder"):
        load_prompts(write_test_json(tmp_path, {"0_main": entry(name)}))


def test_a_good_test_json_keeps_its_order(tmp_path):
    prompts = load_prompts(write_test_json(tmp_path, {"1_main": entry("1_main.png", "b"), "0_main": entry("0_main.png", "a")}))
    assert [(p.image_name, p.text) for p in prompts] == [("1_main.png", "b"), ("0_main.png", "a")]
