import json

import numpy as np
import pytest
from PIL import Image

from helpers.data import (coco_to_manifest, compose_caption, count_long_captions, flickr_to_manifest,
                          load_course_data, load_manifest, load_prompts, split_by_group)
from helpers.files import read_json
from helpers.images import BadImageError, load_image_tensor, load_rgb, square_resize
from helpers.text import load_text_encoder


# ---------------------------------------------------------------- the real course schema


def test_excerpt_keys_captions_and_frame_gaps(hw6_excerpt):
    records, report = load_course_data(hw6_excerpt)
    keys = {r.key for r in records}
    assert keys == {"0_main", "0_attack1", "0_die1"}  # the excerpt's keys that have images
    attack = [r for r in records if r.key == "0_attack1"]
    assert len(attack) == 7 and all(r.group == "0" for r in attack)
    assert attack[0].captions[0] == ("A red tree monster with a skull face and twisted branches. "
                                     "The monster is attacking.")
    main = next(r for r in records if r.key == "0_main")
    assert main.captions[0] == "A red tree monster with a skull face and twisted branches."  # empty action
    # images whose key has no caption entry (gaps in frame numbers included) are reported, not dropped silently
    orphans = report.problems["images whose key has no entry in train_info.json"]
    assert "100_main_6.png" in orphans and "0_hit1_0.png" in orphans and len(orphans) == 12
    assert set(report.problems["keys in train_info.json with no images"]) == {
        "1_attack2", "1_hit1", "2_stand", "3_move", "4_skill1"}
    assert report.counts["entries"] == 8


def test_excerpt_utf8_names_and_test_prompts_with_quotes(hw6_excerpt):
    info = read_json(hw6_excerpt / "train_info.json")
    assert info["0_main"]["original_name"] == "东部绯红之树"
    prompts = load_prompts(hw6_excerpt / "test.json")
    assert len(prompts) == 41
    quoted = next(p for p in prompts if p.image_name == "16_main.png")
    assert quoted.text == 'Pixel monster with helmet, headlamp, and "安全第一" sign.'


def test_own_fixture_keys_like_109_hit_and_4_skill1(tmp_path):
    from conftest import write_course_dataset
    root = write_course_dataset(tmp_path / "d", monsters=2, actions=("hit", "skill1"), frames=1)
    (root / "train" / "0_hit_0.png").rename(root / "train" / "109_hit_0.png")
    info = read_json(root / "train_info.json")
    info["109_hit"] = info.pop("0_hit")
    (root / "train_info.json").write_text(json.dumps(info))
    records, report = load_course_data(root)
    assert {(r.key, r.group) for r in records} == {("109_hit", "109"), ("1_hit", "1"), ("0_skill1", "0"),
                                                  ("1_skill1", "1")}
    assert next(r for r in records if r.key == "0_skill1").captions[0].endswith("The monster is using a skill.")
    assert not report.problems


def test_compose_caption():
    assert compose_caption("A cat.", "The monster is moving.") == "A cat. The monster is moving."
    assert compose_caption("A cat. ", "") == "A cat."


# ---------------------------------------------------------------- bad input gets named


def test_malformed_json_names_file_line_and_column(course_dir):
    (course_dir / "train_info.json").write_text('{\n  "0_main": {"given_description": ["x"],}\n}')
    with pytest.raises(ValueError, match=r"train_info.json: malformed JSON at line 2, column \d+"):
        load_course_data(course_dir)


def test_missing_files_are_named(course_dir):
    (course_dir / "train_info.json").unlink()
    with pytest.raises(FileNotFoundError, match="train_info.json: file not found"):
        load_course_data(course_dir)


def test_entries_without_descriptions_are_reported(course_dir):
    info = read_json(course_dir / "train_info.json")
    info["0_main"]["given_description"] = []
    (course_dir / "train_info.json").write_text(json.dumps(info))
    records, report = load_course_data(course_dir)
    assert "0_main" not in {r.key for r in records}
    assert report.problems["entries without a usable given_description (in train_info.json)"] == ["0_main"]
    assert "without a usable given_description (in train_info.json): 1" in report.summary()
    assert len(report.problems["images skipped because their entry has no usable given_description"]) == 2


def test_corrupt_and_missing_images_name_the_file(tmp_path):
    bad = tmp_path / "7_main_0.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(BadImageError, match=r"7_main_0.png: cannot decode image"):
        load_rgb(bad)
    with pytest.raises(BadImageError, match=r"nothere.png: file not found"):
        load_rgb(tmp_path / "nothere.png")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "RGB"])
def test_every_mode_becomes_rgb_on_white(tmp_path, mode):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[2:6, 2:6] = (200, 10, 10, 255)  # an opaque red square on a transparent background
    im = Image.fromarray(arr, "RGBA")
    im = im.convert("P") if mode == "P" else im.convert(mode)
    if mode == "P":  # a palette image with a transparent index, as many sprite sheets are
        im = Image.fromarray(arr, "RGBA").convert("RGBA").quantize(colors=4)
        im.info["transparency"] = im.getpixel((0, 0))
    im.save(tmp_path / "x.png", transparency=im.info.get("transparency")) if mode == "P" else im.save(tmp_path / "x.png")
    out = load_rgb(tmp_path / "x.png")
    assert out.mode == "RGB"
    corner = out.getpixel((0, 0))
    if mode in ("RGBA", "LA", "P"):
        assert corner == (255, 255, 255)  # transparency composited onto white, not black


def test_non_square_images_are_padded_not_stretched():
    im = Image.new("RGB", (20, 10), (0, 0, 0))
    out = square_resize(im, 10)
    assert out.size == (10, 10)
    assert min(out.getpixel((5, 0))) > 240 and max(out.getpixel((5, 5))) < 15


def test_load_image_tensor_range_and_shape(course_dir):
    x = load_image_tensor(next((course_dir / "train").iterdir()), 8)
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1


def test_captions_over_the_token_limit_are_counted():
    encoder = load_text_encoder("tiny", max_tokens=8)
    long_caption = "a very long caption " * 10
    n_long, lengths = count_long_captions(["short one", long_caption, long_caption], encoder, 8)
    assert n_long == 2 and lengths[0] < 8 < lengths[1]


# ---------------------------------------------------------------- test.json is checked before sampling


@pytest.mark.parametrize("entry, message", [
    ({"given_description": "x"}, "missing image_name"),
    ({"image_name": "a.jpg", "text_prompt": "x"}, "is not a .png"),
    ({"image_name": "../a.png", "text_prompt": "x"}, "outside the results folder"),
])
def test_bad_test_json(tmp_path, entry, message):
    (tmp_path / "test.json").write_text(json.dumps({"0_main": entry}))
    with pytest.raises(ValueError, match=message):
        load_prompts(tmp_path / "test.json")


def test_duplicate_image_names_rejected(tmp_path):
    entries = {k: {"image_name": "same.png", "text_prompt": "x"} for k in ("0_main", "1_main")}
    (tmp_path / "test.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="'same.png' is used 2 times"):
        load_prompts(tmp_path / "test.json")


# ---------------------------------------------------------------- the split


def test_split_keeps_every_monster_on_one_side(course_dir):
    records, _ = load_course_data(course_dir)
    train, val = split_by_group(records, 0.34, seed=3)
    train_groups, val_groups = {records[i].group for i in train}, {records[i].group for i in val}
    assert train_groups and val_groups and not train_groups & val_groups
    assert len(train) + len(val) == len(records)
    assert split_by_group(records, 0.34, seed=3) == (train, val)
    assert split_by_group(records, 0.34, seed=4) != (train, val)


# ---------------------------------------------------------------- any captioned images


def test_coco_and_flickr_converters_feed_the_same_loader(tmp_path):
    from conftest import sprite
    images = tmp_path / "images"
    for name in ("a.jpg.png", "b.png"):
        sprite(images / name, seed=1)
    coco = {"images": [{"id": 1, "file_name": "a.jpg.png"}, {"id": 2, "file_name": "b.png"}],
            "annotations": [{"image_id": 1, "caption": "A cat. "}, {"image_id": 1, "caption": "A kitten."},
                            {"image_id": 2, "caption": "A dog."}]}
    (tmp_path / "captions_train.json").write_text(json.dumps(coco))
    records, report = load_manifest(coco_to_manifest(tmp_path / "captions_train.json", images, tmp_path / "m.jsonl"))
    assert sorted((r.path.name, r.captions) for r in records) == [("a.jpg.png", ("A cat.", "A kitten.")),
                                                                  ("b.png", ("A dog.",))]
    assert report.counts == {"rows": 3, "images": 2}
    (tmp_path / "results.csv").write_text("image_name| comment_number| comment\nb.png| 0| A dog runs.\n"
                                          "missing.png| 0| Nobody.\n")
    records, report = load_manifest(flickr_to_manifest(tmp_path / "results.csv", images, tmp_path / "f.jsonl"))
    assert [(r.path.name, r.captions) for r in records] == [("b.png", ("A dog runs.",))]
    assert len(report.problems["images listed in the manifest but missing"]) == 1


def test_manifest_errors_name_the_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png"}\n')
    with pytest.raises(ValueError, match="line 2 needs the fields 'image' and 'caption'"):
        load_manifest(tmp_path / "m.jsonl")
