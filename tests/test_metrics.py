"""helpers.metrics: the validation set and metrics.json (the scores: tests/test_score.py)."""
import json

import pytest
import torch

from helpers.run_folder import open_run
from helpers.metrics import validation_set, write_metrics


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
