"""The whole chain, headless: all five notebooks under papermill on a tiny demo dataset."""
import json
import re

import pytest
from PIL import Image

from helpers.config import PROJECT_ROOT
from helpers.runs import NOTEBOOKS, run_pipeline


def cell_texts(path) -> list[str]:
    """The text each code cell of an executed notebook printed (streams and plain-text results)."""
    texts = []
    for cell in json.loads(path.read_text())["cells"]:
        parts = [o.get("text") or o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", [])]
        texts.append("".join("".join(p) if isinstance(p, list) else p for p in parts))
    return texts


def noise(path, roots) -> list[str]:
    """What an executed notebook should not show: absolute paths under `roots`, a raw dict, a progress bar's "0%"
    start line, a line repeated within a cell."""
    found = []
    for text in cell_texts(path):
        lines = [line for line in text.splitlines() if line.strip()]
        found += [f"absolute path: {line}" for line in lines if any(str(r) in line for r in roots)]
        found += [f"raw dict: {line}" for line in lines if line.lstrip().startswith("{'")]
        found += [f"0% line: {line}" for line in lines if re.search(r"\b0%\|", line)]
        found += [f"repeated: {line}" for line in set(lines) if lines.count(line) > 1]
    return found


@pytest.mark.slow
def test_all_notebooks_run_headless_and_write_their_outputs(tmp_path, capfd):
    data = tmp_path / "data"
    data.mkdir()  # the demo generator writes only into the profile's data_dir or an empty folder
    run_dir = run_pipeline("nb", "tiny", str(tmp_path), parameters=dict(
        data_dir=str(data), demo_monsters=8, demo_test_monsters=2, demo_frames=1, make_zip=True, student_id="b1"))
    # the kernels' sockets are encrypted, so ipykernel has no plain-TCP warning to print
    assert "without encryption" not in capfd.readouterr().err
    for name in NOTEBOOKS:  # executed copies, with outputs, in the run folder
        nb = json.loads((run_dir / "notebooks" / f"{name}.ipynb").read_text())
        assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), name
        assert "requires torchvision" not in json.dumps(nb), name  # transformers' image-processor warning
    for name in ("03_train_cfg", "04_sample", "05_eval"):  # issue 33: what a student reads, without noise
        assert noise(run_dir / "notebooks" / f"{name}.ipynb", [tmp_path, PROJECT_ROOT]) == [], name
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
    # 03: EMA snapshots to choose from
    snapshots = sorted(p.name for p in (run_dir / "snapshots").glob("step-*"))
    assert snapshots == ["step-000002", "step-000004"]
    # 04: a selection over snapshots x guidance x steps, its choice, and the test set of exactly that choice,
    # sampled once (no earlier set was moved aside); 05 scored those files and zipped those very bytes
    metrics = json.loads((run_dir / "metrics.json").read_text())
    table, choice = metrics["selection"]["table"], metrics["selection"]["choice"]
    cells = {(r["setting"]["snapshot"], r["setting"]["guidance"], r["setting"]["steps"]) for r in table}
    assert cells == {(s, g, n) for s in snapshots for g in config["guidance_sweep"] for n in config["sweep_steps"]}
    assert choice in table and all(0.0 <= r["accuracy"][a] <= 1.0 for r in table for a in ("color", "shape", "action"))
    assert max(r["mean_accuracy"] for r in table) == choice["mean_accuracy"]
    manifest = json.loads((run_dir / "results" / "manifest.json").read_text())
    assert manifest["complete"] and {k: manifest[k] for k in choice["setting"]} == choice["setting"]
    assert not (run_dir / "results.history").exists()
    from helpers.handin import check_zip_layout, zipped_results_match

    assert zipped_results_match(run_dir / "hw6_b1.zip", run_dir / "results") == len(manifest["images"])
    assert "hw6_b1/code/requirements.txt" in check_zip_layout(run_dir / "hw6_b1.zip", "b1")
    # the chosen setting's sweep row, measured again on the handed-in PNGs read back: equal up to uint8 rounding
    again = metrics["chosen"]["on_sweep_prompts"]
    assert again["handed_in"]["mean_accuracy"] == pytest.approx(again["sweep"]["mean_accuracy"], abs=0.02)
    assert metrics["chosen"]["setting"] == choice["setting"] and 0.0 <= metrics["chosen"]["mean_accuracy"] <= 1.0
    # one PNG per test prompt, at the configured output size
    prompts = json.loads((tmp_path / "data" / "test.json").read_text())
    results = sorted(p.name for p in (run_dir / "results").glob("*.png"))
    assert results == sorted(e["image_name"] for e in prompts.values())
    assert Image.open(run_dir / "results" / results[0]).size == (config["output_size"],) * 2


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_papermill_reads_every_parameter_of_every_notebook(name):
    """A comment papermill cannot parse (e.g. one with '=') silently drops that parameter from -p checks."""
    import re

    import papermill

    from helpers.config import PROJECT_ROOT

    path = PROJECT_ROOT / "notebooks" / f"{name}.ipynb"
    cell = next(c for c in json.loads(path.read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
    assigned = re.findall(r"^(\w+)\s*=", "".join(cell["source"]), flags=re.M)
    assert list(papermill.inspect_notebook(str(path))) == assigned


@pytest.mark.slow
def test_the_short_run_command_ends_with_a_zip_in_the_course_layout(tmp_path):
    """The one-way issue's short run (`-p max_steps=20 -p snapshot_every=10 -p sweep_prompts=8 -p make_zip=True` on
    the demo), on the tiny profile: the demo's EMA-length axis [0, 0.05] and its stores every 100 steps, so the
    earlier snapshot has no post-hoc EMA store of its own."""
    import zipfile

    from helpers.handin import PLACEHOLDER_ID, check_zip_layout, zipped_results_match
    from helpers.runs import main

    data = tmp_path / "data"
    data.mkdir()
    main(["--profile", "tiny", "--run-name", "X", "--outputs-dir", str(tmp_path), "-p", f"data_dir={data}",
          "-p", "demo_monsters=8", "-p", "demo_test_monsters=2", "-p", "demo_frames=1", "-p", "max_steps=4",
          "-p", "snapshot_every=2", "-p", "phema_every=100", "-p", "sweep_ema_lengths=[0.0, 0.05]",
          "-p", "sweep_prompts=2", "-p", "make_zip=True"])
    run_dir = tmp_path / "runs" / "X"
    zip_path = run_dir / f"hw6_{PLACEHOLDER_ID}.zip"
    assert f"student_id not set: packing hw6_{PLACEHOLDER_ID}.zip" in (run_dir / "notebooks/05_eval.ipynb").read_text()
    names = check_zip_layout(zip_path, PLACEHOLDER_ID)
    assert zipped_results_match(zip_path, run_dir / "results") == len(list((run_dir / "results").glob("*.png")))
    with zipfile.ZipFile(zip_path) as zf:
        assert {n.split("/")[1] for n in names} == {"code", "model", "results"}
        manifest = zf.read(f"hw6_{PLACEHOLDER_ID}/results/manifest.json")
    assert manifest == (run_dir / "results" / "manifest.json").read_bytes()
