"""Procedural monster sprites, written in exactly the course's dataset format (docs/design.md#the-demo-dataset).

Every monster has known attributes (body colour, body shape, number of eyes, an extra) and is drawn
in six actions, each with a bold cue that survives 16×16 pixels. Some (colour, shape) pairs are held
out: only `test.json` uses them, so a model is asked for combinations it has never seen. The
attributes of every key go to `attributes.json`, so evaluation can check whether a generated image
shows what its prompt asked for, and `test_reference/` holds the generator's own picture of each
test prompt. Only numpy and PIL: no torch.

    make_demo_dataset("data/demo")  # ~7,200 16×16 images in a few seconds
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from .progress import progress_bar

from .data import compose_caption
from .files import atomic_save_image, atomic_write_json, read_json

COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "brown")
SHAPES = ("round", "square", "triangle", "diamond")
EYES = (1, 2, 3)
EXTRAS = ("horns", "wings", "antenna", "none")
ACTIONS = {  # action name -> the course's phrase ("" for the main portrait)
    "main": "",
    "stand": "The monster is standing still.",
    "move": "The monster is moving.",
    "attack": "The monster is attacking.",
    "hit": "The monster is being hit.",
    "die": "The monster is dying.",
}
# Saturated and dark enough to stay far from the white background after compositing.
COLOR_RGB = {
    "red": (220, 30, 30), "orange": (245, 130, 0), "yellow": (235, 200, 0), "green": (30, 165, 45),
    "cyan": (0, 185, 205), "blue": (35, 60, 215), "purple": (140, 45, 190), "brown": (120, 70, 25),
}
KEY_SUFFIX = {"main": "main", "stand": "stand", "move": "move", "attack": "attack1", "hit": "hit1", "die": "die1"}

VERSION = 1  # bump when drawing or captions change, so an old dataset is not silently reused
_FILES = ("train_info.json", "test.json", "attributes.json", "train", "test_reference")

# ---------------------------------------------------------------- captions and names

_EYE_WORDS = {1: "one eye", 2: "two eyes", 3: "three eyes"}
_SHAPE_WORDS = {"round": "round", "square": "square", "triangle": "triangular", "diamond": "diamond-shaped"}
_EXTRA_WORDS = {"horns": "horns", "wings": "wings", "antenna": "antennae", "none": ""}
_ZH = {  # made-up names in the style of the course's Chinese `original_name`s
    "color": dict(zip(COLORS, "赤橙黄绿青蓝紫褐")), "shape": dict(zip(SHAPES, "圆方锥菱")),
    "extra": {"horns": "角", "wings": "翼", "antenna": "须", "none": ""}, "end": "魔兽怪灵妖",
}


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(color: str, shape: str, eyes: int, extra: str) -> list[str]:
    """Three paraphrases of one monster; an extra of "none" is simply not mentioned."""
    s, e, x = _SHAPE_WORDS[shape], _EYE_WORDS[eyes], _EXTRA_WORDS[extra]
    if x:
        return [f"{_a(color).capitalize()} {color} {s} monster with {e} and {x}.",
                f"{s.capitalize()} {color} creature with {x} and {e}.",
                f"A monster with {_a(color)} {color}, {s} body, {e} and {x}."]
    return [f"{_a(color).capitalize()} {color} {s} monster with {e}.",
            f"{s.capitalize()} {color} creature with {e}.",
            f"A monster with {_a(color)} {color}, {s} body and {e}."]


# ---------------------------------------------------------------- which monsters exist


@dataclass(frozen=True)
class Monster:
    id: int
    color: str
    shape: str
    eyes: int
    extra: str
    name: str
    size: float = 1.0  # per-monster variation, so monsters of equal attributes still differ a little
    rgb: tuple | None = None  # None = the plain colour of COLOR_RGB

    def attributes(self, action: str) -> dict:
        return {"color": self.color, "shape": self.shape, "eyes": self.eyes, "extra": self.extra, "action": action}


def held_out_pairs(seed: int) -> list[tuple[str, str]]:
    """8 (colour, shape) pairs: each colour once and each shape twice, so all stay seen in train."""
    rng = np.random.default_rng([seed, 1])
    shapes = rng.permutation([0, 0, 1, 1, 2, 2, 3, 3])
    return [(c, SHAPES[s]) for c, s in zip(COLORS, shapes)]


def _train_pairs(seed: int, n: int) -> list[tuple[str, str]]:
    """Train pairs in rounds of 8 that each use every colour once and every shape twice.

    So any 8 consecutive monsters already cover every colour and shape, and 24 cover all train pairs.
    """
    held = dict(held_out_pairs(seed))
    rng = np.random.default_rng([seed, 2])
    pairs = []
    while len(pairs) < n:
        shift = 1 + (len(pairs) // 8) % 3  # shifting the held-out shape by 1..3 never lands on it
        for c in rng.permutation(COLORS):
            pairs.append((str(c), SHAPES[(SHAPES.index(held[str(c)]) + shift) % 4]))
    return pairs[:n]


def _make_monster(mid: int, color: str, shape: str, rng: np.random.Generator) -> Monster:
    eyes, extra = int(rng.choice(EYES)), str(rng.choice(EXTRAS))
    name = _ZH["color"][color] + _ZH["extra"][extra] + _ZH["shape"][shape] + str(rng.choice(list(_ZH["end"])))
    rgb = tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in COLOR_RGB[color])
    return Monster(mid, color, shape, eyes, extra, name, float(rng.uniform(0.92, 1.04)), rgb)


def plan_monsters(num_monsters: int, num_test_monsters: int, seed: int) -> tuple[list[Monster], list[Monster]]:
    """Train monsters (ids 0..n-1, never a held-out pair) and test monsters (the next ids, only held-out pairs)."""
    rng = np.random.default_rng([seed, 3])
    train = [_make_monster(i, c, s, rng) for i, (c, s) in enumerate(_train_pairs(seed, num_monsters))]
    held = held_out_pairs(seed)
    order = np.random.default_rng([seed, 4]).permutation(len(held))
    test = [_make_monster(num_monsters + j, *held[order[j % len(held)]], rng) for j in range(num_test_monsters)]
    return train, test


# ---------------------------------------------------------------- drawing


def _circle(n: int = 48) -> np.ndarray:
    a = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([np.cos(a), np.sin(a)], 1)


# Body outlines in body units: the body spans about [-1, 1]², y points down as in PIL.
_BODY = {
    "round": _circle(),
    "square": np.array([[-0.88, -0.88], [0.88, -0.88], [0.88, 0.88], [-0.88, 0.88]]),
    "triangle": np.array([[0.0, -1.15], [1.2, 0.95], [-1.2, 0.95]]),
    "diamond": np.array([[0.0, -1.2], [1.2, 0.0], [0.0, 1.2], [-1.2, 0.0]]),
}
_EYE_ROW = {"round": -0.15, "square": -0.2, "triangle": 0.32, "diamond": 0.0}  # where the body is widest enough
_EYE_XS = {1: [0.0], 2: [-0.38, 0.38], 3: [-0.56, 0.0, 0.56]}


@dataclass(frozen=True)
class _Pose:
    """Body units -> canvas pixels: squash (sx, sy), rotate by `angle` degrees clockwise, move to (cx, cy)."""
    cx: float
    cy: float
    r: float  # pixels per body unit
    sx: float = 1.0
    sy: float = 1.0
    angle: float = 0.0

    def __call__(self, pts) -> list[tuple[float, float]]:
        p = np.asarray(pts, dtype=float).reshape(-1, 2) * (self.sx, self.sy)
        c, s = math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))
        x, y = p[:, 0] * c - p[:, 1] * s, p[:, 0] * s + p[:, 1] * c
        return list(zip(self.cx + self.r * x, self.cy + self.r * y))

    def w(self, units: float) -> int:
        return max(1, round(units * self.r))


def _shade(rgb, k: float) -> tuple:
    return tuple(int(v * k) for v in rgb)


def _tint(rgb, k: float) -> tuple:
    """Blend toward white by k: a flash that keeps the hue readable."""
    return tuple(int(v + (255 - v) * k) for v in rgb)


def _ellipse(d: ImageDraw.ImageDraw, pose: _Pose, x: float, y: float, rx: float, ry: float, fill) -> None:
    d.polygon(pose(_circle(24) * (rx, ry) + (x, y)), fill=fill)


def _pose_for(action: str, t: float, s: int, size: float, jx: float, jy: float) -> tuple[_Pose, float, float]:
    """Where and how the body sits for an action at phase t in [0, 1); also its fade and flash tint."""
    r, bob = 0.3 * s * size, 0.015 * math.sin(2 * math.pi * t)  # body ~60 % of the frame; a gentle bob

    def at(fx: float, fy: float) -> tuple[float, float]:  # fractions of the canvas -> pixels, jittered
        return s * (fx + jx), s * (fy + jy)

    if action == "stand":
        return _Pose(*at(0.5, 0.45 + bob), r), 1.0, 0.0
    if action == "move":  # shoved sideways and squashed, as in a hop
        return _Pose(*at(0.6 + 0.03 * math.sin(2 * math.pi * t), 0.6), r, 1.1, 0.78), 1.0, 0.0
    if action == "attack":  # leaning forward into the swing
        return _Pose(*at(0.42, 0.55), r, angle=18 + 8 * t), 1.0, 0.0
    if action == "hit":  # knocked back, flashing
        return _Pose(*at(0.44, 0.54), r, angle=-12 - 4 * t), 1.0, 0.45
    if action == "die":  # lying flat on its side, fading out
        return _Pose(*at(0.5, 0.64), r, 0.78, 1.0, angle=90 - 8 * t), 0.55, 0.0
    return _Pose(*at(0.5, 0.54 + bob), r), 1.0, 0.0  # main: the upright portrait


def _draw_backdrop(d: ImageDraw.ImageDraw, pose: _Pose, action: str, dark, size: int) -> None:
    """Cues behind the body: a shadow and legs for standing, speed lines for moving."""
    if action == "stand":
        _ellipse(d, pose, 0, 1.52, 1.0, 0.16, (150, 150, 150, 255))
        for x in (-0.42, 0.42):
            d.line(pose([(x, 0.5), (x * 1.1, 1.45)]), fill=dark, width=pose.w(0.24))
    elif action == "move":
        for y in (-0.45, 0.0, 0.45):
            yy = pose.cy + y * pose.r * pose.sy
            d.line([(0.02 * size, yy), (0.2 * size, yy)], fill=(90, 90, 90, 255), width=pose.w(0.14))


def _draw_extra(d: ImageDraw.ImageDraw, pose: _Pose, extra: str, dark, light) -> None:
    """Drawn before the body, so the body hides where they attach."""
    for s in (-1, 1):
        if extra == "horns":
            d.polygon(pose([(s * 0.3, -0.45), (s * 0.75, -0.45), (s * 0.85, -1.42)]), fill=dark)
        elif extra == "antenna":
            d.line(pose([(s * 0.2, -0.5), (s * 0.55, -1.28)]), fill=dark, width=pose.w(0.14))
            _ellipse(d, pose, s * 0.55, -1.28, 0.18, 0.18, dark)
        elif extra == "wings":
            wing = [(s * 0.4, -0.35), (s * 1.45, -0.95), (s * 1.3, -0.2), (s * 1.45, 0.35), (s * 0.4, 0.35)]
            d.polygon(pose(wing), fill=light, outline=dark, width=pose.w(0.08))


def _draw_face(d: ImageDraw.ImageDraw, pose: _Pose, m: Monster, action: str) -> None:
    y = _EYE_ROW[m.shape]
    for x in _EYE_XS[m.eyes]:
        if action == "die":  # crossed-out eyes
            for a, b in (((-0.2, -0.2), (0.2, 0.2)), ((-0.2, 0.2), (0.2, -0.2))):
                d.line(pose([(x + a[0], y + a[1]), (x + b[0], y + b[1])]), fill=(20, 20, 20, 255), width=pose.w(0.12))
        else:
            _ellipse(d, pose, x, y, 0.23, 0.23, (255, 255, 255, 255))
            _ellipse(d, pose, x + 0.03, y, 0.12, 0.12, (10, 10, 10, 255))
    if action == "attack":  # open, roaring mouth
        _ellipse(d, pose, 0, y + 0.42, 0.3, 0.18, (70, 0, 0, 255))


def _draw_overlay(d: ImageDraw.ImageDraw, pose: _Pose, action: str, t: float) -> None:
    """Cues in front of the body: the weapon of an attack, the impact marks of a hit."""
    ink = (25, 25, 25, 255)
    if action == "attack":
        a = math.radians(25 * t)  # the blade sweeps forward over the frames
        grip, tip = (0.95, 0.3), (0.95 + 1.45 * math.sin(a), 0.3 - 1.45 * math.cos(a))
        d.line(pose([grip, tip]), fill=ink, width=pose.w(0.22))
        d.line(pose([(0.7, 0.0), (1.2, 0.0)]), fill=ink, width=pose.w(0.16))  # cross-guard
    elif action == "hit":
        k = 1.0 + 0.1 * t
        for deg in (-60, -30, 0, 30, 60):  # impact lines fanning out on the side the blow came from
            c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
            p0, p1 = [(pose.cx + pose.r * rr * c, pose.cy + pose.r * rr * s) for rr in (1.2 * k, 1.55 * k)]
            d.line([p0, p1], fill=ink, width=pose.w(0.16))


def _as_monster(m) -> Monster:
    if isinstance(m, Monster):
        return m
    return Monster(int(m.get("id", 0)), m["color"], m["shape"], int(m["eyes"]), m["extra"], m.get("name", ""))


def render_monster(monster, action: str = "main", *, resolution: int = 16, frame: int = 0,
                   num_frames: int = 1, seed: int = 0) -> Image.Image:
    """One RGBA sprite on a transparent background.

    `monster` is a `Monster` or any mapping with color/shape/eyes/extra (e.g. an attributes.json
    entry). Drawn at 4× (2× above 64 px) and box-filtered down, so every size is anti-aliased.
    """
    if action not in ACTIONS:
        raise ValueError(f"Unknown action {action!r}; choose one of {list(ACTIONS)}")
    m = _as_monster(monster)
    s = resolution * (4 if resolution <= 64 else 2)
    t = frame / max(num_frames, 1)
    rng = np.random.default_rng([seed, m.id, list(ACTIONS).index(action), frame])
    jx, jy = rng.uniform(-0.02, 0.02, 2) if frame else (0.0, 0.0)  # frame 0 is the canonical pose
    pose, fade, flash = _pose_for(action, t, s, m.size, jx, jy)
    rgb = _tint(m.rgb or COLOR_RGB[m.color], flash)
    dark, light = _shade(m.rgb or COLOR_RGB[m.color], 0.45) + (255,), _tint(rgb, 0.45) + (255,)

    im = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    _draw_backdrop(d, pose, action, dark, s)
    _draw_extra(d, pose, m.extra, dark, light)
    d.polygon(pose(_BODY[m.shape]), fill=rgb + (255,), outline=dark, width=pose.w(0.08))
    if fade < 1.0:  # before the face, so a dying monster's crossed-out eyes stay dark
        im.putalpha(im.getchannel("A").point(lambda a: int(a * fade)))
    _draw_face(d, pose, m, action)
    _draw_overlay(d, pose, action, t)
    return im.resize((resolution, resolution), Image.Resampling.BOX)


# ---------------------------------------------------------------- the dataset on disk


def _reuse_or_clear(out: Path, meta: dict, overwrite: bool) -> bool:
    """True if `out` already holds this exact dataset. Clears an older one of ours only when allowed;
    never deletes a dataset that this module did not write."""
    meta_path = out / "demo_meta.json"
    if not meta_path.exists():
        foreign = [n for n in _FILES if (out / n).exists()]
        if foreign:
            raise FileExistsError(f"{out} holds {', '.join(foreign)} but no demo_meta.json: not a demo dataset, "
                                  f"so it is left alone. Pick another folder or remove it yourself.")
        return False
    old = read_json(meta_path)
    same = {k: old.get(k) for k in ("version", "args")} == {k: meta[k] for k in ("version", "args")}
    if same and old.get("complete"):
        return True
    if old.get("complete") and not overwrite:
        raise FileExistsError(f"{out} holds a different demo dataset ({old.get('args')}, version "
                              f"{old.get('version')}); pass overwrite=True to replace it, or pick another folder.")
    what = f"overwriting the demo dataset made with {old.get('args')}" if old.get("complete") else \
        "replacing an incomplete demo dataset (an interrupted run)"
    print(f"{out}: {what}")
    for name in _FILES:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return False


def _monster_entries(m: Monster, frames: int) -> tuple[dict, dict]:
    """train_info.json and attributes.json entries for every action of one train monster."""
    descriptions = describe(m.color, m.shape, m.eyes, m.extra)
    info, attrs = {}, {}
    for action, phrase in ACTIONS.items():
        key = f"{m.id}_{KEY_SUFFIX[action]}"
        info[key] = {"original_name": m.name, "given_description": descriptions,
                     "action_description": phrase, "num_frames": frames}
        attrs[key] = m.attributes(action)
    return info, attrs


def _test_entries(m: Monster) -> tuple[dict, dict]:
    """One test.json entry per action; like the course's test set, each uses one of the paraphrases."""
    descriptions = describe(m.color, m.shape, m.eyes, m.extra)
    entries, attrs = {}, {}
    for i, (action, phrase) in enumerate(ACTIONS.items()):
        key, desc = f"{m.id}_{KEY_SUFFIX[action]}", descriptions[(m.id + i) % 3]
        entries[key] = {"image_name": f"{key}.png", "given_description": desc,
                        "action_description": phrase, "text_prompt": compose_caption(desc, phrase)}
        attrs[key] = m.attributes(action)
    return entries, attrs


def _render_monster_files(m: Monster, folder: Path, frames: int, resolution: int, seed: int, test: bool) -> int:
    for action in ACTIONS:
        key = f"{m.id}_{KEY_SUFFIX[action]}"
        for f in range(1 if test else frames):
            im = render_monster(m, action, resolution=resolution, frame=f, num_frames=frames, seed=seed)
            atomic_save_image(im, folder / (f"{key}.png" if test else f"{key}_{f}.png"))
    return len(ACTIONS) * (1 if test else frames)


def make_demo_dataset(out_dir, *, num_monsters: int = 300, resolution: int = 16, frames_per_action: int = 4,
                      num_test_monsters: int = 40, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the demo dataset to `out_dir` in the course format and return its path.

    Writes train_info.json, train/<key>_<frame>.png (RGBA, transparent background), test.json,
    attributes.json (every train and test key), test_reference/<image_name> (frame 0 of each test
    prompt) and demo_meta.json. Deterministic for its arguments; an existing dataset made with the
    same arguments is reused, a different one is an error unless `overwrite`.
    """
    if num_monsters < 8 or num_test_monsters < 1 or frames_per_action < 1 or resolution < 8:
        raise ValueError("need num_monsters >= 8 (so train shows every colour and shape), num_test_monsters >= 1, "
                         f"frames_per_action >= 1 and resolution >= 8; got {num_monsters}, {num_test_monsters}, "
                         f"{frames_per_action}, {resolution}")
    out = Path(out_dir)
    args = dict(num_monsters=num_monsters, resolution=resolution, frames_per_action=frames_per_action,
                num_test_monsters=num_test_monsters, seed=seed)
    meta = {"generator": "helpers.demo_data", "version": VERSION, "args": args,
            "held_out_pairs": [list(p) for p in held_out_pairs(seed)], "complete": False}
    out.mkdir(parents=True, exist_ok=True)
    if _reuse_or_clear(out, meta, overwrite):
        print(f"Reusing the demo dataset in {out} ({args})")
        return out

    start = time.perf_counter()
    atomic_write_json(out / "demo_meta.json", meta)  # first, so an interrupted run is known to be ours
    (out / "train").mkdir()
    (out / "test_reference").mkdir()
    train, test = plan_monsters(num_monsters, num_test_monsters, seed)
    info, tests, attrs, images = {}, {}, {}, 0
    for m in progress_bar(train + test, desc="demo monsters", leave=False):
        is_test = m.id >= num_monsters
        entries, a = _test_entries(m) if is_test else _monster_entries(m, frames_per_action)
        (tests if is_test else info).update(entries)
        attrs.update(a)
        folder = out / ("test_reference" if is_test else "train")
        rendered = _render_monster_files(m, folder, frames_per_action, resolution, seed, is_test)
        images += 0 if is_test else rendered
    atomic_write_json(out / "train_info.json", info)
    atomic_write_json(out / "test.json", tests)
    atomic_write_json(out / "attributes.json", attrs)
    atomic_write_json(out / "demo_meta.json", {**meta, "complete": True})
    print(f"Demo dataset in {out}: {num_monsters} monsters, {images} images at {resolution}x{resolution}, "
          f"{len(tests)} test prompts ({num_test_monsters} held-out monsters), {time.perf_counter() - start:.1f} s")
    return out


def load_attributes(data_dir) -> dict:
    """{key: {"color", "shape", "eyes", "extra", "action"}} for every train and test key of a demo dataset."""
    path = Path(data_dir) / "attributes.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; attributes exist only for demo datasets (make_demo_dataset)")
    return read_json(path)


def ensure_dataset(cfg, **demo_args) -> Path:
    """The run's data folder, generating the demo dataset there when the demo/tiny profile needs it.

    The demo is written only into the profile's own data_dir, into a folder that exists and is empty,
    or over an unfinished demo: a misspelt data_dir is an error, not thousands of fake monsters."""
    from .config import PROFILES, RunConfig, resolve_path

    data = cfg.data_path
    if cfg.manifest or (data / "train_info.json").exists():
        return data
    if cfg.profile not in ("demo", "tiny"):
        raise FileNotFoundError(f"No dataset at {data}: copy the course's train_info.json, train/ and test.json "
                                "there (see data/README.md), or set data_dir")
    default = resolve_path(PROFILES[cfg.profile].get("data_dir", RunConfig.data_dir))
    empty = data.is_dir() and not any(data.iterdir())
    if data.resolve() != default.resolve() and not empty and not (data / "demo_meta.json").exists():
        raise FileNotFoundError(
            f"data_dir={cfg.data_dir!r}: {data} holds no dataset (no train_info.json) and is not the {cfg.profile} "
            f"profile's data_dir ({default}): misspelt? To generate the demo dataset there, create it as an "
            "empty folder first")
    return make_demo_dataset(data, resolution=cfg.resolution, seed=cfg.seed, **demo_args)
