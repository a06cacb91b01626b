"""The procedural demo dataset: course format, determinism, held-out pairs, visible actions, reuse."""
from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
from PIL import Image

from helpers.demo_data import (ACTIONS, COLOR_RGB, COLORS, EXTRAS, EYES, KEY_SUFFIX, SHAPES, describe,
                               held_out_pairs, load_attributes, make_demo_dataset, plan_monsters, render_monster)

SMALL = dict(num_monsters=12, num_test_monsters=4, frames_per_action=2)
JSONS = ("train_info.json", "test.json", "attributes.json", "demo_meta.json")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", **SMALL)


def on_white(im: Image.Image) -> np.ndarray:
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(bg, im.convert("RGBA")).convert("RGB"), dtype=float)


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"))


def train_pairs(data_dir) -> set[tuple[str, str]]:
    attrs, info = load_attributes(data_dir), json.loads((data_dir / "train_info.json").read_text("utf-8"))
    return {(attrs[k]["color"], attrs[k]["shape"]) for k in info}


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_identical_files(demo, tmp_path):
    again = make_demo_dataset(tmp_path / "again", **SMALL)
    for name in JSONS:
        assert (demo / name).read_bytes() == (again / name).read_bytes(), name
    names = sorted(p.name for p in (demo / "train").iterdir())
    assert names == sorted(p.name for p in (again / "train").iterdir())
    for name in names[:: max(1, len(names) // 6)]:
        assert np.array_equal(pixels(demo / "train" / name), pixels(again / "train" / name)), name
    ref = sorted((demo / "test_reference").iterdir())[0].name
    assert np.array_equal(pixels(demo / "test_reference" / ref), pixels(again / "test_reference" / ref))


def test_other_seed_gives_other_dataset(demo, tmp_path):
    other = make_demo_dataset(tmp_path / "other", **SMALL, seed=1)
    assert (demo / "attributes.json").read_bytes() != (other / "attributes.json").read_bytes()
    name = "{}_main_0.png".format
    differs = [not np.array_equal(pixels(demo / "train" / name(i)), pixels(other / "train" / name(i)))
               for i in range(SMALL["num_monsters"])]
    assert sum(differs) >= SMALL["num_monsters"] // 2


# ---------------------------------------------------------------- the course format


def test_train_files_match_train_info(demo):
    info = json.loads((demo / "train_info.json").read_text(encoding="utf-8"))
    assert len(info) == SMALL["num_monsters"] * len(ACTIONS)
    found = {}
    for p in (demo / "train").iterdir():
        m = re.fullmatch(r"(.+)_(\d+)\.png", p.name)
        assert m, p.name
        key, frame = m.group(1), int(m.group(2))
        assert key in info and 0 <= frame < info[key]["num_frames"], p.name
        found.setdefault(key, []).append(frame)
    assert set(found) == set(info), "every train key has at least one image"
    for key, entry in info.items():
        assert re.fullmatch(r"\d+_(main|stand|move|attack1|hit1|die1)", key)
        assert set(entry) == {"original_name", "given_description", "action_description", "num_frames"}
        descriptions = entry["given_description"]
        assert len(descriptions) == 3 and all(isinstance(d, str) and d for d in descriptions)
        assert entry["action_description"] in ACTIONS.values()
        assert (entry["action_description"] == "") == key.endswith("_main")
    assert any(ord(ch) > 127 for e in info.values() for ch in e["original_name"]), "names are Chinese, as in the course"


def test_test_json_and_references(demo):
    tests = json.loads((demo / "test.json").read_text(encoding="utf-8"))
    assert len(tests) == SMALL["num_test_monsters"] * len(ACTIONS)
    for key, entry in tests.items():
        assert set(entry) == {"image_name", "given_description", "action_description", "text_prompt"}
        assert entry["image_name"] == f"{key}.png"
        desc, action = entry["given_description"], entry["action_description"]
        assert entry["text_prompt"] == (f"{desc} {action}" if action else desc)
        assert (demo / "test_reference" / entry["image_name"]).exists()
    train_ids = {k.split("_")[0] for k in json.loads((demo / "train_info.json").read_text("utf-8"))}
    assert not train_ids & {k.split("_")[0] for k in tests}, "test monsters have their own ids"


def test_attributes_cover_every_key(demo):
    attrs = load_attributes(demo)
    keys = {k for name in ("train_info.json", "test.json") for k in json.loads((demo / name).read_text("utf-8"))}
    assert set(attrs) == keys
    for key, a in attrs.items():
        assert a["color"] in COLORS and a["shape"] in SHAPES and a["eyes"] in EYES and a["extra"] in EXTRAS
        assert key.endswith("_" + KEY_SUFFIX[a["action"]])


def test_load_attributes_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="attributes.json"):
        load_attributes(tmp_path)


@pytest.mark.parametrize("resolution", [16, 64])
def test_images_are_rgba_at_the_resolution(tmp_path, resolution):
    out = make_demo_dataset(tmp_path / "d", num_monsters=8, num_test_monsters=1, frames_per_action=1,
                            resolution=resolution)
    for p in list((out / "train").iterdir())[:10] + list((out / "test_reference").iterdir()):
        with Image.open(p) as im:
            assert im.mode == "RGBA" and im.size == (resolution, resolution), p.name
            alpha = np.asarray(im)[..., 3]
        assert alpha[0, 0] == 0 and alpha.max() > 128, "a transparent background around the monster"


def test_captions():
    assert describe("red", "round", 2, "horns") == [
        "A red round monster with two eyes and horns.",
        "Round red creature with horns and two eyes.",
        "A monster with a red, round body, two eyes and horns."]
    assert describe("orange", "triangle", 1, "none")[0] == "An orange triangular monster with one eye."
    assert all("none" not in d for d in describe("blue", "diamond", 3, "none"))


# ---------------------------------------------------------------- held-out combinations


def test_held_out_pairs_cover_every_colour_and_shape():
    for seed in range(5):
        held = held_out_pairs(seed)
        assert {c for c, _ in held} == set(COLORS) and {s for _, s in held} == set(SHAPES)


def test_test_pairs_never_occur_in_train(demo):
    attrs, tests = load_attributes(demo), json.loads((demo / "test.json").read_text("utf-8"))
    seen = train_pairs(demo)
    test_pairs = {(attrs[k]["color"], attrs[k]["shape"]) for k in tests}
    assert test_pairs and not test_pairs & seen
    for c, s in test_pairs:  # the parts are known from train, only the combination is new
        assert any(c == tc for tc, _ in seen) and any(s == ts for _, ts in seen)


@pytest.mark.parametrize("num_monsters", [8, 13, 300])
def test_train_shows_every_colour_and_shape(num_monsters):
    train, test = plan_monsters(num_monsters, 8, seed=3)
    assert {m.color for m in train} == set(COLORS) and {m.shape for m in train} == set(SHAPES)
    assert not {(m.color, m.shape) for m in train} & {(m.color, m.shape) for m in test}
    if num_monsters >= 24:
        assert len({(m.color, m.shape) for m in train}) == 24, "every train pair is used"


def test_too_few_monsters_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="num_monsters"):
        make_demo_dataset(tmp_path / "d", num_monsters=5)


# ---------------------------------------------------------------- visible actions


def test_every_action_looks_different(demo):
    for mid in range(4):
        ims = {a: on_white(Image.open(demo / "train" / f"{mid}_{KEY_SUFFIX[a]}_0.png")) for a in ACTIONS}
        for a, b in itertools.combinations(ACTIONS, 2):
            diff = np.abs(ims[a] - ims[b]).mean()
            assert diff > 8, f"monster {mid}: {a} and {b} differ by only {diff:.1f}/255 per pixel"


def test_upright_actions_keep_the_body_colour():
    palette = np.array([COLOR_RGB[c] for c in COLORS], dtype=float)
    for m in plan_monsters(24, 1, seed=0)[0]:
        for action in ("main", "stand", "move", "attack"):
            rgba = np.asarray(render_monster(m, action, resolution=16), dtype=float)
            median = np.median(rgba[rgba[..., 3] == 255][:, :3], axis=0)
            nearest = COLORS[int(np.argmin(((palette - median) ** 2).sum(1)))]
            assert nearest == m.color, (m, action, median)


def test_frames_differ_slightly(demo):
    a, b = (on_white(Image.open(demo / "train" / f"0_move_{f}.png")) for f in (0, 1))
    assert 0 < np.abs(a - b).mean() < 40


# ---------------------------------------------------------------- reuse and overwrite


def test_same_arguments_reuse_the_dataset(tmp_path, capsys):
    out = make_demo_dataset(tmp_path / "d", **SMALL)
    stamp = (out / "train_info.json").stat().st_mtime_ns
    capsys.readouterr()
    make_demo_dataset(out, **SMALL)
    assert "Reusing" in capsys.readouterr().out
    assert (out / "train_info.json").stat().st_mtime_ns == stamp


def test_other_arguments_need_overwrite(tmp_path, capsys):
    out = make_demo_dataset(tmp_path / "d", **SMALL)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_demo_dataset(out, **{**SMALL, "seed": 5})
    capsys.readouterr()
    make_demo_dataset(out, **{**SMALL, "seed": 5, "frames_per_action": 1}, overwrite=True)
    assert "overwriting" in capsys.readouterr().out
    assert json.loads((out / "demo_meta.json").read_text("utf-8"))["args"]["seed"] == 5
    assert not list((out / "train").glob("*_1.png")), "files of the old dataset are gone"


def test_a_foreign_dataset_is_never_touched(tmp_path):
    (tmp_path / "train_info.json").write_text("{}", encoding="utf-8")
    with pytest.raises(FileExistsError, match="not a demo dataset"):
        make_demo_dataset(tmp_path, **SMALL, overwrite=True)
    assert (tmp_path / "train_info.json").read_text(encoding="utf-8") == "{}"


def test_an_interrupted_dataset_is_rebuilt(tmp_path):
    out = make_demo_dataset(tmp_path / "d", **SMALL)
    meta = json.loads((out / "demo_meta.json").read_text("utf-8"))
    (out / "demo_meta.json").write_text(json.dumps({**meta, "complete": False}), encoding="utf-8")
    (out / "test.json").unlink()
    make_demo_dataset(out, **SMALL)
    assert (out / "test.json").exists() and json.loads((out / "demo_meta.json").read_text("utf-8"))["complete"]


def test_render_monster_takes_an_attributes_entry(demo):
    attrs = next(iter(load_attributes(demo).values()))
    im = render_monster(attrs, attrs["action"], resolution=24)
    assert im.mode == "RGBA" and im.size == (24, 24)
    with pytest.raises(ValueError, match="Unknown action"):
        render_monster(attrs, "dance")
