"""The whole chain, headless: all five notebooks under papermill on a tiny demo dataset."""
import json

import pytest
from PIL import Image

from helpers.runs import NOTEBOOKS, run_pipeline


@pytest.mark.slow
def test_all_notebooks_run_headless_and_write_their_outputs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()  # the demo generator writes only into the profile's data_dir or an empty folder
    run_dir = run_pipeline("nb", "tiny", str(tmp_path), parameters=dict(
        data_dir=str(data), demo_monsters=8, demo_test_monsters=2, demo_frames=1))
    for name in NOTEBOOKS:  # executed copies, with outputs, in the run folder
        nb = json.loads((run_dir / "notebooks" / f"{name}.ipynb").read_text())
        assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["profile"] == "tiny" and config["data_dir"] == str(tmp_path / "data")
    # 01: report, split, cache pointer
    assert (run_dir / "data_report.json").exists()
    split = json.loads((run_dir / "split.json").read_text())
    assert split["train"] and split["val"] and not set(split["train"]) & set(split["val"])
    # 03: a trained model, a checkpoint, logs, previews
    assert (run_dir / "model" / "unet_ema" / "diffusion_pytorch_model.safetensors").exists()
    assert list((run_dir / "checkpoints").glob("step-*"))
    assert (run_dir / "logs" / "train.csv").read_text().count("\n") >= 2
    assert list((run_dir / "previews").glob("*.png"))
    # 04: one PNG per test prompt, at the configured output size
    prompts = json.loads((tmp_path / "data" / "test.json").read_text())
    results = sorted(p.name for p in (run_dir / "results").glob("*.png"))
    assert results == sorted(e["image_name"] for e in prompts.values())
    assert Image.open(run_dir / "results" / results[0]).size == (config["output_size"],) * 2
    # 05: metrics with the demo probe's figures
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for attr in ("color", "shape", "action"):
        assert 0.0 <= metrics["probe"]["accuracy"][attr] <= 1.0
    assert [s["guidance"] for s in metrics["probe"]["guidance_sweep"]] == config["guidance_sweep"]
