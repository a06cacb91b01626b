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
from helpers.results import check_results, read_manifest, results_manifest, results_problems
from helpers.setting import Setting
from helpers.handin import pack_submission, zipped_results_match
from helpers.submission import generate_test_set, write_test_set
from helpers.text import load_text_encoder
from helpers.unet import build_unet

SETTING = Setting("model", 3.0, 2, "ddim")
ARGS = dict(batch_size=2)


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
    stats = generate_test_set(model, prompts, out, SETTING, **ARGS)
    assert stats["written"] == 5 and stats["skipped"] == 0
    assert check_results(out, prompts, require_manifest=False) == 5
    first = np.asarray(Image.open(out / "3_main.png")).astype(int)
    (out / "3_main.png").unlink()
    stats = generate_test_set(model, prompts, out, SETTING, **ARGS)
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
    good = lambda: Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))  # noqa: E731
    good().save(out / "0_main.png")
    good().resize((128, 128)).save(out / "1_main.png")
    good().convert("L").save(out / "2_main.png")
    Image.new("RGB", (256, 256), (0, 0, 0)).save(out / "3_main.png")  # what a NaN sample turns into
    good().save(out / "extra.png")
    problems = results_problems(out, prompts)
    assert problems == [f"{out / 'manifest.json'}: missing (images of unknown origin)",
                        "5 files, test.json names 5 images", "missing: 4_main.png",
                        "unexpected file: extra.png (not in test.json; move it out of the folder)",
                        "1_main.png: size 128×128, expected 256×256", "2_main.png: mode L, expected RGB",
                        "3_main.png: blank: every pixel is about (0, 0, 0) (a NaN or collapsed sample)"]
    with pytest.raises(ValueError, match="7 problem\\(s\\): .*manifest.json: missing.*; 5 files.*; missing: 4_main.png "
                                         "\\(and 4 more\\)\n(.|\n)*blank"):
        check_results(out, prompts)
    assert results_problems(tmp_path / "nowhere", prompts) == [f"{tmp_path / 'nowhere'}: results folder not found"]
    (tmp_path / "afile").write_text("x")
    assert results_problems(tmp_path / "afile", prompts) == [f"{tmp_path / 'afile'}: is a file, not a results folder"]


def test_nan_samples_are_refused_before_anything_is_written(model, prompts, tmp_path, monkeypatch):
    monkeypatch.setattr(submission, "sample_images", lambda m, p, s, st, **kw: torch.full((len(p), 3, 16, 16), float("nan")))
    with pytest.raises(FloatingPointError, match="NaN/inf for 2 image"):
        generate_test_set(model, prompts, tmp_path / "results", SETTING, **ARGS)
    assert not list((tmp_path / "results").iterdir())


def test_hand_made_bad_prompts_are_refused_before_sampling(model, tmp_path, monkeypatch):
    monkeypatch.setattr(submission, "sample_images", lambda *a, **k: pytest.fail("sampled despite bad names"))
    bad = [Prompt("a", "x.png", "t"), Prompt("b", "x.png", "t"), Prompt("c", "../y.png", "t"), Prompt("d", "z.jpg", "t")]
    with pytest.raises(ValueError, match="3 problem(.|\n)*'\\.\\./y\\.png'(.|\n)*'z\\.jpg'(.|\n)*'x\\.png' is used 2 times"):
        generate_test_set(model, bad, tmp_path / "results", SETTING, **ARGS)


KW = dict(seed=0, size=32, batch_size=2)


def test_write_test_set_resumes_the_same_setting_and_keeps_every_other_one(model, prompts, tmp_path, capsys):
    out = tmp_path / "results"
    write_test_set(model, prompts, out, SETTING, "w1", **KW)
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["guidance"] == 3.0 and manifest["weights_sha256"] == "w1"
    assert sorted(manifest["images"]) == [p.image_name for p in prompts]
    (out / "4_main.png").unlink()  # an interrupted run: the same setting resumes
    assert write_test_set(model, prompts, out, SETTING, "w1", **KW)["written"] == 1
    assert not (tmp_path / "results.history").exists()
    (out / "notes.txt").write_text("my notes")  # the user's own file: never moved or deleted
    first = (out / "0_main.png").read_bytes()
    settings = [Setting("model", g, 2, "ddim") for g in (1.0, 2.0, 4.0)]
    for n, s in enumerate(settings, 1):  # three more settings: every earlier set stays on disk, numbered
        assert write_test_set(model, prompts, out, s, "w1", **KW)["written"] == 5
        assert "guidance: " in capsys.readouterr().out
        assert read_manifest(tmp_path / "results.history" / str(n))["guidance"] == ([3.0] + [1.0, 2.0])[n - 1]
    assert (tmp_path / "results.history" / "1" / "0_main.png").read_bytes() == first
    assert sorted(p.name for p in (tmp_path / "results.history").iterdir()) == ["1", "2", "3"]
    assert all(len(list((tmp_path / "results.history" / k).glob("*.png"))) == 5 for k in "123")
    assert (out / "notes.txt").read_text() == "my notes"
    assert "unexpected file: notes.txt" in " ".join(results_problems(out, prompts, 32))
    (out / "notes.txt").unlink()
    assert check_results(out, prompts, 32, want=results_manifest(settings[-1], "w1", prompts, seed=0, size=32)) == 5
    with pytest.raises(ValueError, match="manifest.json: guidance: 4.0 -> 3.0"):
        check_results(out, prompts, 32, want=results_manifest(SETTING, "w1", prompts, seed=0, size=32))


def test_results_without_a_manifest_are_never_mixed_with_new_ones(model, prompts, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(out / "0_main.png")  # images of unknown origin
    write_test_set(model, prompts, out, SETTING, "w1", seed=0, size=32, batch_size=5)
    assert "no manifest.json (images of unknown origin)" in capsys.readouterr().out
    assert np.asarray(Image.open(out / "0_main.png")).std() > 0
    assert (tmp_path / "results.history" / "1" / "0_main.png").exists()


def test_a_swapped_image_is_found_and_written_again_not_blessed(model, prompts, tmp_path, capsys):
    out = tmp_path / "results"
    write_test_set(model, prompts, out, SETTING, "w1", **KW)
    good = (out / "1_main.png").read_bytes()
    (out / "1_main.png").write_bytes((out / "2_main.png").read_bytes())
    with pytest.raises(ValueError, match="1_main.png: differs from the image manifest.json recorded"):
        check_results(out, prompts, 32)
    assert write_test_set(model, prompts, out, SETTING, "w1", **KW)["written"] == 1
    assert "1 image(s) differ from what manifest.json recorded (e.g. 1_main.png)" in capsys.readouterr().out
    assert (out / "1_main.png").read_bytes() == good and check_results(out, prompts, 32) == 5
    assert (tmp_path / "results.history" / "1" / "1_main.png").read_bytes() == (out / "2_main.png").read_bytes()


@pytest.mark.parametrize("where", ["results", "results.history"])
def test_a_file_where_a_results_folder_belongs_is_one_clear_error(model, prompts, tmp_path, where):
    out = tmp_path / "results"
    if where == "results.history":
        write_test_set(model, prompts, out, SETTING, "w1", **KW)
    (tmp_path / where).write_text("not a folder") if where != "results" else out.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=f"{where}: is a file"):
        write_test_set(model, prompts, out, Setting("model", 1.0, 2, "ddim"), "w1", **KW)


def test_a_manifest_that_is_not_an_object_is_named(prompts, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "manifest.json").write_text("[]")
    assert results_problems(out, prompts) == [f"{out / 'manifest.json'}: expected a JSON object describing the "
                                              "results, got a list"]


def make_packable_run(tmp_path, model, prompts):
    run = tmp_path / "run"
    (run / "snapshots" / "step-000004").mkdir(parents=True)
    (run / "snapshots" / "step-000004" / "config.json").write_text("{}")
    (run / "model" / "scheduler").mkdir(parents=True)
    (run / "model" / "scheduler" / "scheduler_config.json").write_text("{}")
    write_test_set(model, prompts, run / "results", SETTING, "w1", **KW)
    return run


def test_pack_submission_has_the_course_layout_the_very_bytes_and_refuses_to_overwrite(model, prompts, tmp_path,
                                                                                        capsys):
    from helpers.handin import check_zip_layout

    run = make_packable_run(tmp_path, model, prompts)
    unet = run / "snapshots" / "step-000004"
    code = tmp_path / "helpers_copy"
    (code / "__pycache__").mkdir(parents=True)
    (code / "a.py").write_text("x = 1\n")
    (code / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    (tmp_path / "requirements.txt").write_text("torch\n")
    want = results_manifest(SETTING, "w1", prompts, seed=0, size=32)
    requirements = str(tmp_path / "requirements.txt")
    pack = lambda zip_path, **kw: pack_submission(run, zip_path, unet, prompts, size=32, want=want,  # noqa: E731
                                                  code_dirs=(str(code),), code_files=(requirements,),
                                                  student_id="b12345678", **kw)
    zip_path = pack(tmp_path / "hw6_b12345678.zip")
    top = "hw6_b12345678/"
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == sorted(top + n for n in [
            "code/helpers_copy/a.py", "code/requirements.txt", "model/scheduler/scheduler_config.json",
            "model/unet_ema/config.json", "results/manifest.json"] + [f"results/{p.image_name}" for p in prompts])
    out = capsys.readouterr().out
    assert "Packing hw6_b12345678.zip, about " in out and "results " in out
    assert "No report given: the course expects hw6_b12345678/report.pdf" in out
    assert zipped_results_match(zip_path, run / "results") == 5
    assert check_zip_layout(zip_path, "b12345678")
    with pytest.raises(ValueError, match=r"top folder hw6_b12345678, expected hw6_other/ \(student_id 'other'\)"):
        check_zip_layout(zip_path, "other")
    with pytest.raises(FileExistsError, match=r"hw6_b12345678.zip already exists.*overwrite_zip=True.*overwrite=True"):
        pack(zip_path)
    report = tmp_path / "my report.pdf"
    report.write_bytes(b"%PDF-1.4 stand-in")
    assert pack(zip_path, overwrite=True, report=report) == zip_path
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.read(top + "report.pdf") == report.read_bytes()
    assert "No report given" not in capsys.readouterr().out


@pytest.mark.parametrize("student_id, report, message", [
    ("../x", None, r"student_id='\.\./x' should be your student id"),
    ("b1 2", None, r"student_id='b1 2' should be your student id"),
    ("b1", "missing.pdf", r"report='missing.pdf': file not found"),
    ("b1", "notes.txt", r"report='.*notes.txt': the course asks for report.pdf"),
])
def test_a_bad_student_id_or_report_is_refused_naming_the_parameter(model, prompts, tmp_path, student_id, report,
                                                                     message):
    run = make_packable_run(tmp_path, model, prompts)
    if report == "notes.txt":
        report = tmp_path / "notes.txt"
        report.write_text("x")
    with pytest.raises(ValueError, match=message):
        pack_submission(run, tmp_path / "s.zip", run / "snapshots" / "step-000004", prompts, size=32,
                        student_id=student_id, report=report)
    assert not (tmp_path / "s.zip").exists()


def test_a_folder_at_the_zips_path_is_refused_in_one_line_even_with_overwrite(model, prompts, tmp_path):
    run = make_packable_run(tmp_path, model, prompts)
    (tmp_path / "hw6_b1.zip").mkdir()
    for overwrite in (False, True):
        with pytest.raises(IsADirectoryError, match=r"hw6_b1.zip: is a folder, not a zip; move it away"):
            pack_submission(run, tmp_path / "hw6_b1.zip", run / "snapshots" / "step-000004", prompts, size=32,
                            student_id="b1", overwrite=overwrite)
    assert (tmp_path / "hw6_b1.zip").is_dir() and not list((tmp_path / "hw6_b1.zip").iterdir())


@pytest.mark.parametrize("damage, message", [
    ("swap", "1_main.png: differs from the image manifest.json recorded"),
    ("stray", "unexpected file: 9_main.png"),
    ("remove", "missing: 3_main.png"),
    ("small", "2_main.png: size 16×16, expected 32×32"),
    ("text", "unexpected file: readme.txt"),
])
def test_validation_scoring_and_packing_refuse_a_damaged_folder_naming_the_file(model, prompts, tmp_path, damage,
                                                                                message):
    from helpers.score import score_results

    run = make_packable_run(tmp_path, model, prompts)
    results = run / "results"
    if damage == "swap":
        (results / "1_main.png").write_bytes((results / "0_main.png").read_bytes())
    elif damage == "stray":
        (results / "9_main.png").write_bytes((results / "0_main.png").read_bytes())
    elif damage == "remove":
        (results / "3_main.png").unlink()
    elif damage == "small":
        Image.open(results / "2_main.png").resize((16, 16)).save(results / "2_main.png")
    else:
        (results / "readme.txt").write_text("")
    with pytest.raises(ValueError, match=message):
        check_results(results, prompts, 32)
    with pytest.raises(ValueError, match=message):
        pack_submission(run, tmp_path / "s.zip", run / "snapshots" / "step-000004", prompts, size=32)
    assert not (tmp_path / "s.zip").exists()
    test_json = tmp_path / "test.json"
    test_json.write_text(json.dumps({p.key: {"image_name": p.image_name, "given_description": p.text,
                                             "action_description": "", "text_prompt": p.text} for p in prompts}))
    if damage != "text":  # the course's program counts PNGs only; the hand-in holds nothing else
        with pytest.raises(ValueError, match=message):
            score_results(results, test_json, size=32)


def test_a_truncated_png_is_refused_by_the_scorer_even_without_metrics(model, prompts, tmp_path):
    from helpers.score import score_results

    run = make_packable_run(tmp_path, model, prompts)
    data = (run / "results" / "0_main.png").read_bytes()
    (run / "results" / "0_main.png").write_bytes(data[: len(data) // 2])
    test_json = tmp_path / "test.json"
    test_json.write_text(json.dumps({p.key: {"image_name": p.image_name, "given_description": p.text,
                                             "action_description": "", "text_prompt": p.text} for p in prompts}))
    with pytest.raises(ValueError, match="0_main.png: cannot be decoded"):
        score_results(run / "results", test_json, size=32)


def test_pack_submission_default_code_dirs_are_the_project_helpers_and_notebooks(model, prompts, tmp_path):
    run = make_packable_run(tmp_path, model, prompts)
    with zipfile.ZipFile(pack_submission(run, tmp_path / "s.zip", run / "snapshots" / "step-000004", prompts,
                                         size=32)) as zf:
        names = zf.namelist()
    assert "code/helpers/submission.py" in names and any(n.startswith("code/notebooks/") for n in names)
    # enough to set the code up again from the zip alone
    assert {"code/requirements.txt", "code/README.md", "code/Makefile", "code/pyproject.toml"} <= set(names)


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


def test_reading_the_pngs_back_undoes_the_enlargement_up_to_uint8_rounding(model, prompts, tmp_path):
    """The handed-in 32 px PNGs of 16 px samples, read back to 16 px: the same images up to half a uint8 level,
    where a bilinear (antialiased) shrink blurs each pixel with its neighbours."""
    from helpers.results import read_results
    from helpers.sample import sample_images

    write_test_set(model, prompts, tmp_path / "results", SETTING, "w1", **KW)
    samples = sample_images(model, [p.text for p in prompts], range(len(prompts)), SETTING).clamp(-1, 1)
    back = read_results(tmp_path / "results", prompts, 16)
    assert back.shape == samples.shape and (back - samples).abs().max() <= 1 / 255 + 1e-4
    blurred = torch.nn.functional.interpolate(read_results(tmp_path / "results", prompts), size=16, mode="bilinear",
                                              antialias=True)
    assert (blurred - samples).abs().max() > 0.05  # what reading them back used to do
