"""The latent cache: contents, reuse vs rebuild, resuming an interrupted build, bad images, the split."""
from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import cache as cache_mod
from helpers.cache import build_cache, cache_path, load_cache, read_split, write_split
from helpers.data import load_records
from helpers.run_folder import open_run


@pytest.fixture
def run(tmp_path, course_dir):
    """A tiny-profile run over 6 monsters x 2 actions x 2 frames of 16 px sprites, and its records."""
    cfg = open_run("t", "tiny", outputs_dir=str(tmp_path), data_dir=str(course_dir))
    records, _ = load_records(cfg.data_path)
    return cfg, records


def test_cache_holds_images_flips_and_captions(run, capsys):
    cfg, records = run
    out = build_cache(cfg, records, progress=False)
    c = load_cache(cfg)  # found through the run's cache.json pointer
    assert c.dir == out and out.name.startswith("latents-") and len(out.name) == len("latents-") + 12
    assert c.mean.shape == (24, 2, 3, 16, 16) and c.mean.dtype == torch.float16
    assert torch.equal(c.mean[:, 1], c.mean[:, 0].flip(-1))  # index 1 is the horizontal flip
    assert float(c.std.abs().max()) == 0.0  # pixel space has no latent noise
    assert c.keys == [r.key for r in records] and c.groups == [r.group for r in records]
    assert c.captions[0] == "" and c.embeddings.shape == (len(c.captions), cfg.max_tokens, 32)
    for i, r in enumerate(records):  # each record's ids point at its own captions
        assert [c.captions[j] for j in c.caption_ids[i] if j >= 0] == list(r.captions)
    assert len(set(c.captions)) == len(c.captions)
    assert bool(c.valid.all())


def test_cache_with_a_vae_stores_mean_and_std(run):
    cfg, records = run
    cfg = cfg.replace(autoencoder="tiny")
    build_cache(cfg, records[:4], progress=False)
    c = load_cache(cfg, records[:4])
    assert c.mean.shape == (4, 2, 4, 8, 8) and float(c.std.float().min()) > 0


def test_cache_is_reused_when_unchanged_and_rebuilt_when_not(run, capsys):
    cfg, records = run
    first = build_cache(cfg, records, progress=False)
    assert build_cache(cfg, records, progress=False) == first
    assert "Reusing the latent cache" in capsys.readouterr().out
    assert cache_path(cfg.replace(resolution=8), records) != first  # resolution is part of the key
    assert cache_path(cfg.replace(text_encoder="minilm"), records) != first
    records[0].path.write_bytes(records[1].path.read_bytes())  # an image file changes
    os.utime(records[0].path, ns=(1, 1))
    second = build_cache(cfg, records, progress=False)
    assert second != first and first.exists()
    assert torch.equal(load_cache(cfg).mean[0], load_cache(cfg).mean[1])  # the pointer follows the new cache


def test_interrupted_build_resumes_from_finished_shards(run, monkeypatch, capsys):
    cfg, records = run
    monkeypatch.setattr(cache_mod, "SHARD_SIZE", 10)  # 24 images -> 3 shards
    out = build_cache(cfg, records, progress=False)
    before = load_cache(cfg)
    (out / "index.json").unlink()  # as if killed after the shards, before the index
    (out / "shard-00001.safetensors").unlink()
    encoded = []
    real = cache_mod._encode_shard
    monkeypatch.setattr(cache_mod, "_encode_shard", lambda chunk, *a: encoded.append(len(chunk)) or real(chunk, *a))
    with pytest.raises(FileNotFoundError, match="01_data"):
        load_cache(cfg)
    build_cache(cfg, records, progress=False)
    assert encoded == [10]  # only the missing shard was encoded again
    assert "already finished" in capsys.readouterr().out
    after = load_cache(cfg)
    assert torch.equal(after.mean, before.mean) and after.keys == before.keys


def test_undecodable_images_are_listed_not_dropped(run, capsys):
    cfg, records = run
    records[3].path.write_bytes(b"not a png")
    out = build_cache(cfg, records, progress=False)
    assert "1 image(s) could not be decoded" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert index["skipped"]["count"] == 1 and records[3].path.name in index["skipped"]["files"][0]
    c = load_cache(cfg)
    assert len(c) == 24 and c.valid.tolist() == [i != 3 for i in range(24)]  # order kept, flagged


def test_missing_cache_or_split_says_what_to_run(run):
    cfg, _ = run
    with pytest.raises(FileNotFoundError, match="run notebooks/01_data.ipynb first"):
        load_cache(cfg)
    with pytest.raises(FileNotFoundError, match="run notebooks/01_data.ipynb first"):
        read_split(cfg)


def test_split_keeps_monsters_whole(run):
    cfg, records = run
    cfg = cfg.replace(val_fraction=0.34)
    split = write_split(cfg, records)
    assert read_split(cfg) == split
    assert set(split["train"]).isdisjoint(split["val"]) and len(split["val"]) == 2
    assert set(split["train"]) | set(split["val"]) == {r.group for r in records}
