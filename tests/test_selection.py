"""Choosing what to submit: the selection sweep over snapshots x guidance x steps, its judges and the choice."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers.selection as selection
from helpers.judges import CourseJudge, ProbeJudge
from helpers.model import load_model
from helpers.selection import (FINAL, Setting, choose, chosen_setting, default_setting, prompt_subset, selection_sweep,
                               snapshot_names, spread, sweep_settings, sweep_table)
from test_train import make_run
from helpers.train import train


class MeanJudge:
    """A stand-in judge: the images' mean brightness, higher is better."""

    key, columns = "mean", ["brightness"]

    def evaluate(self, images):
        return {"brightness": float(images.mean())}

    def rank(self, row):
        return (-row["brightness"], row["setting"]["guidance"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import write_course_dataset

    root = tmp_path_factory.mktemp("sel")
    cfg = make_run(root, write_course_dataset(root / "course"), max_steps=4, snapshot_every=2, checkpoint_every=4)
    train(cfg, progress=False)
    return cfg


def test_sweep_samples_each_setting_once_and_resumes_from_its_cells(run, monkeypatch, capsys):
    model = load_model(run)
    calls = []
    real_sample = selection.sample_images
    monkeypatch.setattr(selection, "sample_images", lambda *a, **k: calls.append(k) or real_sample(*a, **k))
    assert snapshot_names(run) == ["step-000002", "step-000004"]
    settings = sweep_settings(snapshot_names(run), [1.0, 4.0], [2], "ddim")
    prompts, seeds = ["a monster number 1.", "a monster number 2. The monster is attacking."], [5, 6]
    rows = selection_sweep(model, run, MeanJudge(), settings, prompts, seeds, batch_size=2, progress=False)
    assert [Setting.from_dict(r["setting"]) for r in rows] == settings and len(calls) == 4
    assert rows[0]["weights"] != rows[2]["weights"]  # each snapshot is its own model
    assert len({r["brightness"] for r in rows}) == 4  # guidance and snapshot both change the images
    again = selection_sweep(model, run, MeanJudge(), settings, prompts, seeds, batch_size=2, progress=False)
    assert again == rows and len(calls) == 4 and "Reusing 4 of 4 sweep cells" in capsys.readouterr().out
    # more training rewrote a snapshot: only its cells are sampled again; a half-written cell line is skipped
    weights = run.run_dir / "snapshots" / "step-000004" / "diffusion_pytorch_model.safetensors"
    save_file({k: v * 1.01 for k, v in load_file(str(weights)).items()}, str(weights))
    with (run.run_dir / "selection" / "cells.jsonl").open("a") as f:
        f.write('{"setting": {"snap')
    newer = selection_sweep(model, run, MeanJudge(), settings, prompts, seeds, batch_size=2, progress=False)
    assert len(calls) == 6 and newer[:2] == rows[:2] and newer[2]["weights"] != rows[2]["weights"]
    assert "an unfinished cell" in capsys.readouterr().out
    table = sweep_table(newer, MeanJudge.columns, choose(newer, MeanJudge()))
    assert table.count("*") == 1 and "step-000004" in table


def test_probe_rule_prefers_accuracy_then_lower_distance_then_less_guidance():
    row = lambda acc, fd, g, steps=10: {"setting": Setting("model", g, steps, "ddim").to_dict(),  # noqa: E731
                                        "mean_accuracy": acc, "frechet_distance": fd}
    judge = ProbeJudge(None, [], torch.zeros(0))
    rows = [row(0.80, 1.0, 1.0), row(0.90, 9.0, 3.0), row(0.90, 5.0, 5.0), row(0.90, 5.0, 2.0, 20)]
    assert choose(rows, judge) is rows[3]  # best accuracy; of those the lower FD; then the smaller guidance
    assert choose(rows[:3], judge) is rows[2]
    with pytest.raises(ValueError, match="empty selection sweep"):
        choose([], judge)


def test_course_rule_is_lowest_fid_then_higher_clip_t_and_clip_t_alone_without_fid():
    row = lambda g, **m: {"setting": Setting("model", g, 15, "dpm++2m").to_dict(), **m}  # noqa: E731
    with_fid = CourseJudge(["p"], 256, None, None, None)
    rows = [row(2.0, fid=63.4, clip_t=0.30), row(3.0, fid=59.7, clip_t=0.29), row(4.0, fid=59.7, clip_t=0.31)]
    assert choose(rows, with_fid) is rows[2]
    no_fid = CourseJudge(["p"], 256, None, None, None, skipped={"fid": "no Inception"})
    assert choose([row(2.0, clip_t=0.30), row(3.0, clip_t=0.32)], no_fid)["setting"]["guidance"] == 3.0
    assert "highest CLIP-T" in no_fid.rule and no_fid.columns == ["clip_t"] and "lowest FID" in with_fid.rule


def test_course_judge_scores_images_as_the_pngs_they_would_be(monkeypatch):
    seen = {}

    def fake_score(images, prompts, **kw):
        seen.update(sizes={im.size for im in images}, prompts=prompts, **kw)
        return {"fid": 12.5, "clip_t": 0.3, "clip_i": None, "images": len(images), "clip_backend": "x", "skipped": {}}

    import helpers.score

    monkeypatch.setattr(helpers.score, "score_images", fake_score)
    judge = CourseJudge(["a", "b"], 64, ("mu", "sigma"), "inception", "clip")
    assert judge.evaluate(torch.zeros(2, 3, 16, 16)) == {"fid": 12.5, "clip_t": 0.3}
    assert seen["sizes"] == {(64, 64)} and seen["prompts"] == ["a", "b"] and seen["reference_stats"] == ("mu", "sigma")


def test_spread_keeps_the_last_and_prompt_subset_is_seeded():
    names = [f"step-{i:06d}" for i in range(1, 11)]
    assert spread(names, 3) == ["step-000001", "step-000005", "step-000010"]
    assert spread(names, 1) == ["step-000010"] and spread(names, 0) == names and spread(names[:2], 3) == names[:2]
    assert prompt_subset(10, 4, 0) == prompt_subset(10, 4, 0) != prompt_subset(10, 4, 1)
    assert prompt_subset(10, 0, 0) == list(range(10)) and len(prompt_subset(10, 4, 0)) == 4


def test_chosen_setting_is_the_selection_in_metrics_json_else_the_config(run):
    setting, source = chosen_setting(run)
    assert setting == default_setting(run) and setting.snapshot == FINAL and "run config" in source
    picked = Setting("step-000002", 1.0, 2, "ddim", (0.5, 9.0))
    (run.run_dir / "metrics.json").write_text(json.dumps({"selection": {"choice": {"setting": picked.to_dict()}}}))
    try:
        assert chosen_setting(run) == (picked, f"the selection sweep's choice in {run.run_dir / 'metrics.json'}")
    finally:
        (run.run_dir / "metrics.json").unlink()
    assert picked.replace(guidance=None, steps=5) == Setting("step-000002", 1.0, 5, "ddim", (0.5, 9.0))


def test_course_judge_path_end_to_end_with_stand_in_networks(run, monkeypatch):
    """judge_for_run on non-demo data: reference statistics from the validation split, a sweep, a choice."""
    import helpers.score as score
    from helpers.judges import judge_for_run
    from test_score import StandInFeatures, tiny_clip

    monkeypatch.setattr(score, "load_inception", lambda weights=None, device=None: StandInFeatures())
    monkeypatch.setattr(score, "load_clip_scorer", lambda weights=None, device=None: score.ClipScorer.from_transformers(
        *tiny_clip(), progress=False))
    judged, skipped = judge_for_run(run, 3)
    assert skipped == {} and isinstance(judged.judge, CourseJudge) and len(judged.prompts) == 3
    assert sorted(p.name for p in (run.run_dir / "selection" / "val_real").glob("*.png"))  # the real reference
    assert (run.run_dir / "selection" / "val_stats" / "test_mu.npy").exists()
    settings = sweep_settings(["step-000004"], [1.0, 3.0], [2], "ddim")
    rows = selection_sweep(load_model(run), run, judged.judge, settings, judged.texts, judged.seeds, batch_size=3,
                           progress=False)
    assert all(r["fid"] >= 0 and -1 <= r["clip_t"] <= 1 for r in rows)
    assert choose(rows, judged.judge) is min(rows, key=lambda r: r["fid"])


@pytest.mark.slow
def test_05_eval_offline_on_course_data_reports_every_skipped_metric(run, tmp_path):
    import papermill

    from helpers.config import PROJECT_ROOT

    out = tmp_path / "05.ipynb"
    papermill.execute_notebook(str(PROJECT_ROOT / "notebooks" / "05_eval.ipynb"), str(out), progress_bar=False,
                               parameters=dict(run_name=run.run_name, outputs_dir=str(run.run_dir.parents[1])),
                               cwd=str(PROJECT_ROOT / "notebooks"), kernel_name="python3")
    text = "".join("".join(o.get("text", "")) for c in json.loads(out.read_text())["cells"] for o in c.get("outputs", []))
    assert "fid: SKIPPED:" in text and "clip_t: SKIPPED:" in text and "no sweep" in text
    assert "Traceback" not in text


def test_the_sd_baseline_is_one_pretrained_model_without_snapshots(tmp_path):
    from helpers.config import profile_config
    from helpers.selection import weights_id, with_snapshot

    cfg = profile_config("sd-baseline", outputs_dir=str(tmp_path), sd_model="some/sd-model")
    pipeline = object()
    assert snapshot_names(cfg) == [] and with_snapshot(pipeline, cfg, FINAL) is pipeline
    assert weights_id(cfg, FINAL) == "pretrained:some/sd-model"
