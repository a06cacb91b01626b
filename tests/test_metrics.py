"""helpers.metrics: the evaluation sets, the guidance sweep and metrics.json (the scores: tests/test_score.py)."""
import json

import pytest
import torch

from helpers.config import open_run
from helpers.metrics import best_guidance, demo_test_set, guidance_sweep, sweep_table, validation_set, write_metrics


# ---------------------------------------------------------------- guidance sweep and choosing the best


def test_guidance_sweep_samples_each_scale_with_the_same_seeds_and_evaluates():
    calls = []

    def fake_sample(model, prompts, seeds, *, guidance, steps, scheduler, batch_size):
        calls.append((tuple(prompts), tuple(seeds), guidance, steps, scheduler))
        return torch.full((len(prompts), 3, 4, 4), guidance / 10)

    kept = {}
    rows = guidance_sweep(None, ["a", "b"], [7, 8], [1, 3.0], steps=5, scheduler="ddim", batch_size=2,
                          evaluate=lambda im: {"mean": float(im.mean())}, sample=fake_sample, images_out=kept,
                          progress=False)
    assert rows == [{"guidance": 1.0, "mean": pytest.approx(0.1)}, {"guidance": 3.0, "mean": pytest.approx(0.3)}]
    assert [c[1] for c in calls] == [(7, 8), (7, 8)] and [c[2] for c in calls] == [1.0, 3.0]
    assert sorted(kept) == [1.0, 3.0] and kept[3.0].shape == (2, 3, 4, 4)


def test_guidance_sweep_with_the_real_sampler_on_a_tiny_model(tmp_path):
    from helpers.model import TextToImage, load_frozen_parts, new_unet, noise_scheduler

    cfg = open_run("t", "tiny", str(tmp_path))
    text_encoder, autoencoder = load_frozen_parts(cfg, "cpu")
    model = TextToImage(cfg, new_unet(cfg, text_encoder, autoencoder).eval(), text_encoder, autoencoder,
                        dict(noise_scheduler(cfg).config))
    kept = {}
    rows = guidance_sweep(model, ["a red monster", "a blue monster"], [0, 1], [1.0, 4.0], steps=2,
                          scheduler="ddim", batch_size=2, evaluate=lambda im: {"std": float(im.std())},
                          images_out=kept, progress=False)
    assert [r["guidance"] for r in rows] == [1.0, 4.0]
    assert kept[1.0].shape == (2, 3, cfg.resolution, cfg.resolution)
    assert not torch.equal(kept[1.0], kept[4.0])  # guidance changed the images


def test_best_guidance_prefers_accuracy_then_lower_distance_then_less_guidance():
    sweep = [{"guidance": 1.0, "acc": {"mean": 0.5}, "fd": 3.0},
             {"guidance": 3.0, "acc": {"mean": 0.9}, "fd": 5.0},
             {"guidance": 5.0, "acc": {"mean": 0.9}, "fd": 4.0},
             {"guidance": 7.5, "acc": {"mean": 0.9}, "fd": 4.0}]
    assert best_guidance(sweep, "acc.mean") == 3.0  # tie without tie-break: the smaller guidance
    assert best_guidance(sweep, "acc.mean", tie_break="fd") == 5.0
    assert best_guidance(sweep, "fd", higher_is_better=False) == 1.0
    with pytest.raises(ValueError):
        best_guidance([], "fd")
    table = sweep_table(sweep, ["acc.mean", "fd"]).splitlines()
    assert table[0].split() == ["guidance", "acc.mean", "fd"] and table[4].split() == ["5", "0.900", "4.000"]


# ---------------------------------------------------------------- metrics.json


def test_write_metrics_merges_nested_values_and_writes_valid_json(tmp_path):
    write_metrics(tmp_path, {"best_guidance": 3.0, "probe": {"accuracy": {"color": 0.9}, "guidance": 3.0}})
    path = write_metrics(tmp_path, {"probe": {"frechet_distance": torch.tensor(1.5), "accuracy": {"shape": 0.8}},
                                    "validation": {"fid": float("nan")}})
    data = json.loads(path.read_text())
    assert data == {"best_guidance": 3.0, "validation": {"fid": None},
                    "probe": {"accuracy": {"color": 0.9, "shape": 0.8}, "guidance": 3.0, "frechet_distance": 1.5}}
    assert not list(tmp_path.glob("*.tmp"))
    path.write_text("{broken")
    with pytest.raises(ValueError, match="metrics.json: malformed JSON"):
        write_metrics(tmp_path, {"x": 1})


# ---------------------------------------------------------------- what is evaluated


def test_validation_set_is_one_first_frame_per_held_out_key(tmp_path, course_dir):
    from helpers.cache import write_split
    from helpers.data import load_course_data

    cfg = open_run("v", "tiny", str(tmp_path), data_dir=str(course_dir), val_fraction=0.34)
    records, _ = load_course_data(course_dir)
    split = write_split(cfg, records)
    vs = validation_set(cfg)
    assert vs.keys and all(k.split("_")[0] in split["val"] for k in vs.keys)
    assert len(set(vs.keys)) == len(vs.keys) == len({r.key for r in records if r.group in split["val"]})
    captions = {r.key: r.captions for r in records}
    assert all(p in captions[k] for k, p in zip(vs.keys, vs.prompts))
    from helpers.images import load_image_tensor
    assert torch.equal(vs.real[0], load_image_tensor(course_dir / "train" / f"{vs.keys[0]}_0.png", cfg.resolution))
    assert len(validation_set(cfg, max_images=1)) == 1 and validation_set(cfg).prompts == vs.prompts


def test_demo_test_set_pairs_prompts_with_attributes_and_reference_images(tmp_path):
    from helpers.demo_data import make_demo_dataset

    data = make_demo_dataset(tmp_path / "demo", num_monsters=8, num_test_monsters=2, frames_per_action=1)
    cfg = open_run("d", "tiny", str(tmp_path), data_dir=str(data))
    ts = demo_test_set(cfg)
    assert len(ts) == 12 and ts.real.shape == (12, 3, 16, 16) and len(ts.seeds) == len(set(ts.seeds)) == 12
    assert all(a["color"] in p.lower() for a, p in zip(ts.attributes, ts.prompts))
    assert len(demo_test_set(cfg, max_images=5)) == 5

