"""Shared fixtures: small course-format datasets rendered in tmp folders (no network, no GPU)."""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COURSE_EXCERPTS = Path(__file__).resolve().parent / "fixtures" / "hw6"  # real excerpts of the course json


def sprite(path: Path, seed: int, size: int = 16, mode: str = "RGBA") -> Path:
    """A random blob on a transparent background, like a course sprite."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((size, size, 4), np.uint8)
    lo, hi = size // 4, 3 * size // 4
    arr[lo:hi, lo:hi, :3] = rng.integers(0, 255, 3)
    arr[lo:hi, lo:hi, 3] = 255
    im = Image.fromarray(arr, "RGBA")
    path.parent.mkdir(parents=True, exist_ok=True)
    (im if mode == "RGBA" else im.convert(mode)).save(path)
    return path


def write_course_dataset(root: Path, monsters: int = 6, actions=("main", "attack1"), frames: int = 2,
                         size: int = 16) -> Path:
    """train_info.json + train/ + test.json in the course schema, `monsters` monsters."""
    phrases = {"main": "", "attack1": "The monster is attacking.", "hit": "The monster is being hit.",
               "skill1": "The monster is using a skill."}
    info, test = {}, {}
    for m in range(monsters):
        for a in actions:
            key = f"{m}_{a}"
            info[key] = {"original_name": f"怪物{m}", "num_frames": frames, "action_description": phrases[a],
                         "given_description": [f"A monster number {m}.", f"Monster {m} sprite.", f"Creature {m}."]}
            for f in range(frames):
                sprite(root / "train" / f"{key}_{f}.png", seed=zlib.crc32(f"{key}_{f}".encode()), size=size)
            test[key] = {"image_name": f"{key}.png", "given_description": f"A monster number {m}.",
                         "action_description": phrases[a],
                         "text_prompt": f"A monster number {m}. {phrases[a]}".strip()}
    (root / "train_info.json").write_text(json.dumps(info, ensure_ascii=False), encoding="utf-8")
    (root / "test.json").write_text(json.dumps(test, ensure_ascii=False), encoding="utf-8")
    return root


@pytest.fixture
def course_dir(tmp_path) -> Path:
    return write_course_dataset(tmp_path / "course")


@pytest.fixture
def hw6_excerpt(tmp_path) -> Path:
    """The real course json excerpts with stand-in images under the real file names."""
    root = tmp_path / "hw6"
    root.mkdir()
    (root / "train_info.json").write_bytes((COURSE_EXCERPTS / "train_info.excerpt.json").read_bytes())
    (root / "test.json").write_bytes((COURSE_EXCERPTS / "test.excerpt.json").read_bytes())
    for i, name in enumerate((COURSE_EXCERPTS / "train_files.txt").read_text().split()):
        sprite(root / "train" / name, seed=i, size=24)
    return root



# One thread per test process (and in the kernels and processes tests start): the models here are tiny, and
# on two cores shared by two xdist workers, oversubscribed OpenMP threads spin-wait and run many times slower.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


LONGEST_FIRST = ("test_readme.py", "test_notebooks.py", "test_browser.py")  # whole pipelines: a minute or more each


def pytest_collection_modifyitems(items):
    """The longest tests first: with `-n 2 --maxschedchunk 2` (make test) each worker takes the next test when it is
    free, so the short ones fill in around the pipelines instead of one worker finishing a pipeline alone at the end."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


@pytest.fixture(autouse=True)
def _said_nothing_yet():
    """helpers.progress.say_once prints a line once per notebook cell; each test is a cell of its own."""
    import helpers.progress

    helpers.progress._said.clear()
