"""Captioned image sets: the course format, a generic JSONL manifest, and what is wrong with them.

Both formats become one list of `ImageRecord`s. Problems are never dropped silently: every loader
returns a `DataReport` that counts and lists what was skipped and why, and can be written to disk.
"""
from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .files import atomic_write_json, atomic_write_text, read_json


@dataclass(frozen=True)
class ImageRecord:
    path: Path  # the image file
    key: str  # its caption entry, e.g. "0_attack1" (course) or the image stem (manifest)
    group: str  # what a split keeps on one side: the monster id (course) or the image itself
    captions: tuple[str, ...]  # every caption it may be trained with (one is drawn per step)
    action: str = ""  # the action phrase, "" when none


@dataclass(frozen=True)
class Prompt:
    key: str
    image_name: str  # file name the generated image must have
    text: str


@dataclass
class DataReport:
    """Everything the loaders skipped or flagged, by kind, with the files concerned."""

    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, item: str) -> None:
        self.problems[kind].append(item)

    def summary(self) -> str:
        lines = [f"{k}: {v}" for k, v in self.counts.items()]
        for kind, items in self.problems.items():
            shown = ", ".join(items[:5]) + (f", … (+{len(items) - 5} more)" if len(items) > 5 else "")
            lines.append(f"{kind}: {len(items)} ({shown})")
        return "\n".join(lines) if lines else "no problems"

    def write(self, path: str | Path) -> Path:
        return atomic_write_json(path, {"counts": self.counts, "problems": dict(self.problems)})


# ---------------------------------------------------------------- the course format


def compose_caption(description: str, action: str) -> str:
    """The course's caption: a description, then the action phrase when there is one."""
    return f"{description.strip()} {action.strip()}".strip()


def key_of_image(name: str) -> tuple[str, str] | None:
    """'100_main_3.png' -> ('100_main', '3'): the key is everything before the last underscore."""
    m = re.fullmatch(r"(.+)_(\d+)\.png", name)
    return (m.group(1), m.group(2)) if m else None


def load_course_data(data_dir: str | Path) -> tuple[list[ImageRecord], DataReport]:
    """Index `train_info.json` + `train/*.png` (no decoding here; that happens once, when caching)."""
    data_dir = Path(data_dir)
    info_path, train_dir = data_dir / "train_info.json", data_dir / "train"
    info = read_json(info_path)
    if not isinstance(info, dict):
        raise ValueError(f"{info_path}: expected an object of {{key: entry}}, got {type(info).__name__}")
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{train_dir}: folder of training images not found")
    report = DataReport()
    captions, unusable = {}, {}  # key -> captions; key -> the field that makes its entry unusable
    for key, entry in info.items():
        captions[key], unusable[key] = _entry_captions(info_path, key, entry, report)
    records, seen_keys = [], set()
    for path in sorted(train_dir.iterdir()):
        parsed = key_of_image(path.name)
        if parsed is None:
            report.add("files not named <key>_<frame>.png", path.name)
        elif parsed[0] not in captions:
            report.add("images whose key has no entry in train_info.json", path.name)
        elif not captions[parsed[0]]:
            report.add(f"images skipped because their entry has no usable {unusable[parsed[0]]}", path.name)
        else:
            key = parsed[0]
            seen_keys.add(key)
            records.append(ImageRecord(path, key, key.split("_")[0], captions[key],
                                       info[key].get("action_description") or ""))
    for key in info:
        if key not in seen_keys and captions[key]:
            report.add("keys in train_info.json with no images", key)
    report.counts.update(entries=len(info), images=len(records), monsters=len({r.group for r in records}))
    return records, report


def _entry_captions(path: Path, key: str, entry, report: DataReport) -> tuple[tuple[str, ...], str]:
    """The entry's captions and "" , or () and the field that makes it unusable (reported by key)."""
    descriptions = entry.get("given_description") if isinstance(entry, dict) else None
    if isinstance(descriptions, str):
        descriptions = [descriptions]
    if not isinstance(descriptions, list) or not descriptions or not all(isinstance(d, str) and d.strip()
                                                                          for d in descriptions):
        kind = "without a usable" if not descriptions or isinstance(descriptions, list) else "with a malformed"
        report.add(f"entries {kind} given_description (in {path.name})", key)
        return (), "given_description"
    action = entry.get("action_description")
    if action is not None and not isinstance(action, str):
        report.add(f"entries whose action_description is a {type(action).__name__}, not text (in {path.name})", key)
        return (), "action_description"
    return tuple(compose_caption(d, action or "") for d in descriptions), ""


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read a course-format `test.json`, refusing anything that would write a bad results folder."""
    path = Path(path)
    entries = read_json(path)
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: expected an object of {{key: entry}}, got {type(entries).__name__}")
    if not entries:
        raise ValueError(f"{path}: no prompts (the file holds an empty object)")
    prompts, problems, names = [], [], Counter()
    for key, entry in entries.items():
        if not isinstance(entry, dict):
            problems.append(f"{key!r}: expected an object with image_name and text_prompt, got {type(entry).__name__}")
            continue
        name = entry.get("image_name")
        if not isinstance(name, str) or not name:
            problems.append(f"{key!r}: missing image_name")
            continue
        wrong = [f for f in ("text_prompt", "given_description", "action_description")
                 if entry.get(f) is not None and not isinstance(entry[f], str)]
        if wrong:
            problems += [f"{key!r}: {f} is a {type(entry[f]).__name__}, not text" for f in wrong]
            continue
        if not name.lower().endswith(".png"):
            problems.append(f"{key!r}: image_name {name!r} is not a .png")
        if Path(name).name != name or name in (".", "..") or "\\" in name:
            problems.append(f"{key!r}: image_name {name!r} would be written outside the results folder")
        names[name] += 1
        text = entry.get("text_prompt") or compose_caption(entry.get("given_description") or "",
                                                            entry.get("action_description") or "")
        prompts.append(Prompt(key, name, text))
    problems += [f"image_name {n!r} is used {c} times" for n, c in names.items() if c > 1]
    if problems:
        raise ValueError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return prompts


# ---------------------------------------------------------------- any captioned images


def load_manifest(path: str | Path) -> tuple[list[ImageRecord], DataReport]:
    """A JSONL file of {"image": path relative to the file, "caption": str or [str], "group"?: str}."""
    path = Path(path)
    report, by_image = DataReport(), defaultdict(list)
    groups = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, caption = row["image"], row["caption"]
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: malformed JSON at line {lineno}, column {e.colno}: {e.msg}") from None
            except (KeyError, TypeError):
                raise ValueError(f"{path}: line {lineno} needs the fields 'image' and 'caption'") from None
            if not isinstance(image, str) or not image.strip():
                raise ValueError(f"{path}: line {lineno}: 'image' must be a file path, got {image!r}")
            captions = [caption] if isinstance(caption, str) else caption
            if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip()
                                                                          for c in captions):
                raise ValueError(f"{path}: line {lineno}: 'caption' must be text or a list of texts, got {caption!r}")
            by_image[image] += captions
            groups[image] = str(row.get("group", image))
    records = []
    for image, caps in by_image.items():
        file = path.parent / image
        if not file.exists():
            report.add("images listed in the manifest but missing", str(file))
            continue
        records.append(ImageRecord(file, Path(image).stem, groups[image], tuple(caps)))
    report.counts.update(rows=sum(len(c) for c in by_image.values()), images=len(records))
    return records, report


def write_manifest(rows: list[dict], path: str | Path, overwrite: bool = False) -> Path:
    """Write rows as JSONL (atomically); an existing manifest is replaced only with overwrite=True."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if path.exists():
        print(f"Replacing the manifest {path} (overwrite=True)")
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def coco_to_manifest(captions_json: str | Path, image_dir: str | Path, out: str | Path,
                     overwrite: bool = False) -> Path:
    """COCO `captions_*.json` (images + annotations) → manifest with one row per caption."""
    coco = read_json(captions_json)
    out = Path(out)
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list) or not isinstance(
            coco.get("annotations"), list):
        raise ValueError(f"{captions_json}: expected a COCO captions file, an object with the lists 'images' and "
                         f"'annotations'")
    files = {}
    for i, im in enumerate(coco["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise ValueError(f"{captions_json}: images[{i}] needs 'id' and 'file_name', got {im!r}")
        files[im["id"]] = im["file_name"]
    rows = []
    for i, a in enumerate(coco["annotations"]):
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str) or not a["caption"].strip():
            raise ValueError(f"{captions_json}: annotations[{i}] needs 'image_id' and a text 'caption', got {a!r}")
        if a.get("image_id") not in files:
            raise ValueError(f"{captions_json}: annotations[{i}] has image_id {a.get('image_id')!r}, "
                             f"which no entry of 'images' has")
        rows.append({"image": _relative(Path(image_dir) / files[a["image_id"]], out.parent),
                     "caption": a["caption"].strip()})
    return write_manifest(rows, out, overwrite)


def flickr_to_manifest(captions_csv: str | Path, image_dir: str | Path, out: str | Path,
                       overwrite: bool = False) -> Path:
    """Flickr8k/30k-style CSV with `image,caption` columns (or the `image_name| comment` variant)."""
    captions_csv, out = Path(captions_csv), Path(out)
    lines = captions_csv.read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"{captions_csv}: empty; expected a header line such as 'image,caption'")
    delimiter = "|" if lines[0].count("|") else ","
    rows = []
    reader = csv.DictReader(lines, delimiter=delimiter, skipinitialspace=True)
    for row in reader:
        row = {k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str)}
        image = row.get("image") or row.get("image_name") or row.get("filename")
        caption = row.get("caption") or row.get("comment")
        if not image or not caption:
            raise ValueError(f"{captions_csv}: line {reader.line_num}: needs columns image (or image_name) and "
                             f"caption (or comment), both filled; got {row}")
        rows.append({"image": _relative(Path(image_dir) / image, out.parent), "caption": caption})
    if not rows:
        raise ValueError(f"{captions_csv}: a header line but no caption rows")
    return write_manifest(rows, out, overwrite)


def _relative(path: Path, start: Path) -> str:
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path.resolve())


# ---------------------------------------------------------------- shared by both


class EmptyDatasetError(ValueError):
    """A dataset that leaves no image to train on; the message says where and why."""


def load_records(data_dir: str | Path, manifest: str | Path = "") -> tuple[list[ImageRecord], DataReport]:
    """The records of a manifest or a course-format folder; an error when none is usable."""
    records, report = load_manifest(manifest) if manifest else load_course_data(data_dir)
    if not records:
        source = manifest or Path(data_dir) / "train"
        raise EmptyDatasetError(f"{source}: no usable training images. " + report.summary().replace("\n", "; "))
    return records, report


def split_by_group(records: list[ImageRecord], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of train and validation records; every group (monster) lands wholly on one side."""
    groups = sorted({r.group for r in records}, key=_natural)
    random.Random(seed).shuffle(groups)
    n_val = round(len(groups) * val_fraction) if val_fraction > 0 else 0
    if val_fraction > 0 and len(groups) > 1:
        n_val = min(max(n_val, 1), len(groups) - 1)
    val_groups = set(groups[:n_val])
    train = [i for i, r in enumerate(records) if r.group not in val_groups]
    val = [i for i, r in enumerate(records) if r.group in val_groups]
    return train, val


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def count_long_captions(captions, text_encoder, max_tokens: int) -> tuple[int, list[int]]:
    """How many captions `text_encoder` (helpers.text) would cut at `max_tokens`, and every caption's token length."""
    lengths = text_encoder.token_lengths(list(captions))
    return sum(n > max_tokens for n in lengths), lengths


def seeded_subset(n: int, count: int, seed: int) -> list[int]:
    """A fixed, seeded choice of `count` of n indices (all if count is 0 or >= n), in order."""
    if not count or count >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), count))
