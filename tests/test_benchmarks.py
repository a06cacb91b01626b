"""CI smoke runs of the benchmarks at their tiny CPU size: they start, measure and print their table rows."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_bench_train_tiny_compares_ours_with_the_reference_loop():
    out = run("bench_train.py", "--device", "cpu", "--size", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0")
    assert "images/s" in out and "reference" in out.lower()


@pytest.mark.slow
def test_bench_sample_tiny_reports_images_per_second():
    out = run("bench_sample.py", "--size", "tiny", "--prompts", "4", "--batch-size", "4", "--steps", "2",
              "--schedulers", "dpm++2m,ddim")
    assert out.count("| tiny |") == 2


@pytest.mark.slow
def test_bench_cpu_tiny_reports_each_variant_against_fp32():
    out = run("bench_cpu.py", "--size", "tiny", "--steps", "1", "--warmup", "1", "--variants", "fp32,bf16 autocast")
    assert "fp32" in out and "bf16 autocast" in out and "1.00" in out


@pytest.mark.slow
def test_bench_levers_tiny_trains_each_lever_and_prints_the_table(tmp_path):
    (tmp_path / "data").mkdir()
    out = run("bench_levers.py", "--size", "tiny", "--outputs-dir", str(tmp_path / "out"), "--data-dir",
              str(tmp_path / "data"), "--levers", "baseline,dropout-0.05,guide-every-step", "--max-steps", "2",
              "--guidances", "1,3", "--steps", "2")
    assert out.count("| baseline |") == 1 and "| dropout-0.05 |" in out and "| guide-every-step |" in out
    assert (tmp_path / "out" / "runs" / "lever-dropout-0.05" / "model").is_dir()
    assert not (tmp_path / "out" / "runs" / "lever-guide-every-step").exists()  # sampling-only: baseline's model


@pytest.mark.slow
def test_bench_levers_setting_levers_give_mean_and_spread_over_seed_sets(tmp_path):
    import json

    (tmp_path / "data").mkdir()
    out = run("bench_levers.py", "--size", "tiny", "--outputs-dir", str(tmp_path / "out"), "--data-dir",
              str(tmp_path / "data"), "--setting-levers", "fixed-ema,phema-0.10,autoguide-early-w2", "--seeds", "2",
              "--max-steps", "2", "--guidances", "3", "--steps", "2")
    for lever in ("fixed-ema", "phema-0.10", "autoguide-early-w2"):
        assert f"| {lever} | 3 | 2 | " in out
    assert " ± " in out
    rows = json.loads((tmp_path / "out" / "setting_levers.json").read_text())
    assert len(rows) == 6 and {r["seed_set"] for r in rows} == {0, 1}
    assert {r["setting"]["ema_length"] for r in rows} == {0.0, 0.1}
    assert {r["setting"]["guide"] for r in rows} == {"", "step-000001"}


@pytest.mark.slow
def test_bench_levers_objectives_train_each_seed_and_pair_against_v(tmp_path):
    import json

    (tmp_path / "data").mkdir()
    out = run("bench_levers.py", "--size", "tiny", "--outputs-dir", str(tmp_path / "out"), "--data-dir",
              str(tmp_path / "data"), "--objectives", "v,flow-mean-0.5", "--seeds", "2", "--max-steps", "2",
              "--guidances", "3", "--steps", "2")
    assert "| v | 2 | 3 | 2 | " in out and "| flow-mean-0.5 | 2 | 3 | 2 | " in out and " ± " in out
    assert "+0.000 ± 0.000" in out.split("| v |")[1]  # v paired with itself
    rows = json.loads((tmp_path / "out" / "objectives.json").read_text())
    assert len(rows) == 4 and {(r["objective"], r["seed"]) for r in rows} == \
        {(o, s) for o in ("v", "flow-mean-0.5") for s in (0, 1)}
    config = json.loads((tmp_path / "out" / "runs" / "lever-flow-mean-0.5-2-seed1" / "config.json").read_text())
    assert (config["prediction_type"], config["logit_mean"], config["seed"]) == ("flow_prediction", -0.5, 1)
    # another process adds seed 2 and a longer v into the same folder: one table of all rows, paired on seed
    out = run("bench_levers.py", "--size", "tiny", "--outputs-dir", str(tmp_path / "out"), "--data-dir",
              str(tmp_path / "data"), "--objectives", "v,v@3", "--seed-list", "2", "--max-steps", "2",
              "--guidances", "3", "--steps", "2")
    assert "| v | 2 | 3 | 3 | " in out and "| v@3 | 3 | 3 | 1 | " in out and "| flow-mean-0.5 | 2 | 3 | 2 | " in out
    rows = json.loads((tmp_path / "out" / "objectives.json").read_text())
    assert len(rows) == 6 and {r["max_steps"] for r in rows if r["objective"] == "v@3"} == {3}


@pytest.mark.slow
def test_bench_levers_cpu_precision_pairs_fp32_and_bf16_sampling_on_trained_and_existing_runs(tmp_path):
    import json

    (tmp_path / "data").mkdir()
    common = ("--size", "tiny", "--data-dir", str(tmp_path / "data"), "--cpu-precision", "--max-steps", "2",
              "--guidances", "3", "--steps", "2")
    out = run("bench_levers.py", *common, "--outputs-dir", str(tmp_path / "out"), "--seeds", "1")
    run_dir = tmp_path / "out" / "runs" / "lever-flow-2-seed0"  # named as --objectives flow names it: reused
    assert json.loads((run_dir / "config.json").read_text())["prediction_type"] == "flow_prediction"
    for label in ("fp32", "bf16", "Δ bf16 − fp32"):
        assert f"| 0 | lever-flow-2-seed0 | {label} | " in out and f"| all | 1 runs | {label} | " in out
    rows = json.loads((tmp_path / "out" / "cpu_precision.json").read_text())
    assert [r["precision"] for r in rows] == ["bf16", "fp32"] and rows[0]["setting"] == rows[1]["setting"]
    assert all(0 <= r["accuracy"]["eyes"] <= 1 and r["frechet_distance"] >= 0 for r in rows)
    # a model trained before: sampled and scored again into another folder, nothing trained
    out = run("bench_levers.py", *common, "--outputs-dir", str(tmp_path / "again"), "--run-dirs", str(run_dir))
    assert "| 0 | lever-flow-2-seed0 | Δ bf16 − fp32 | " in out and not (tmp_path / "again" / "runs").exists()
    again = json.loads((tmp_path / "again" / "cpu_precision.json").read_text())
    assert [r["frechet_distance"] for r in again] == [r["frechet_distance"] for r in rows]  # same probe, same images
