"""Choosing what to submit: the full sweep over snapshots x guidance x steps (helpers.staged.staged_sweep with
no stages), its judges and the choice."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers.sample
from helpers.judges import CourseJudge, ProbeJudge
from helpers.model import load_model
from helpers.data import seeded_subset
from helpers.selection import (choose, chosen_setting, read_cells, spread, sweep_axes, sweep_settings,
                               sweep_table)
from helpers.setting import FINAL, Setting
from helpers.staged import staged_sweep
from judges_for_tests import BrightJudge
from test_train import make_run
from helpers.train import train


def full_sweep(model, cfg, judge, settings, prompts, seeds, *, batch_size, folder=None) -> list[dict]:
    """The selection's rows of a full sweep (no stages: every cell judged on every prompt)."""
    return staged_sweep(model, cfg, judge, settings, prompts, seeds, batch_size=batch_size, stage_prompts=[],
                        budget_hours=0, progress=False, folder=folder)[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import write_course_dataset

    root = tmp_path_factory.mktemp("sel")
    cfg = make_run(root, write_course_dataset(root / "course"), max_steps=4, snapshot_every=2, checkpoint_every=4)
    train(cfg, progress=False)
    return cfg


def test_sweep_samples_each_setting_once_and_resumes_from_its_records(run, monkeypatch, capsys):
    model, judge = load_model(run), BrightJudge()
    calls = []
    real_sample = helpers.sample.sample_images
    monkeypatch.setattr(helpers.sample, "sample_images", lambda *a, **k: calls.append(k) or real_sample(*a, **k))
    assert run.layout.snapshot_names() == ["step-000002", "step-000004"]
    settings = sweep_settings(Setting(scheduler="ddim"), snapshot=run.layout.snapshot_names(), guidance=[1.0, 4.0],
                              steps=[2])
    prompts, seeds = ["a monster number 1.", "a monster number 2. The monster is attacking."], [5, 6]
    sweep = lambda: full_sweep(model, run, judge, settings, prompts, seeds, batch_size=2)  # noqa: E731
    before = len(read_cells(run.layout.cells))
    rows = sweep()
    assert [Setting.from_dict(r["setting"]) for r in rows] == settings and len(calls) == 4
    assert rows[0]["weights"] != rows[2]["weights"]  # each snapshot is its own model
    assert len({r["clip_t"] for r in rows}) == 4  # guidance and snapshot both change the images
    assert len(read_cells(run.layout.cells)) == before + 4  # one row per cell in selection/cells.jsonl
    again = sweep()
    assert again == rows and len(calls) == 4 and "stage 1 was sampled earlier" in capsys.readouterr().out
    # more training rewrote a snapshot: only its cells are sampled again; a half-written cells.jsonl line is
    # skipped, and the rows appended after it stay whole (the cut line is closed first)
    weights = run.run_dir / "snapshots" / "step-000004" / "diffusion_pytorch_model.safetensors"
    save_file({k: v * 1.01 for k, v in load_file(str(weights)).items()}, str(weights))
    with run.layout.cells.open("a") as f:
        f.write('{"setting": {"snap')
    newer = sweep()
    assert len(calls) == 6 and newer[:2] == rows[:2] and newer[2]["weights"] != rows[2]["weights"]
    assert f"line {before + 5}: not JSON" in capsys.readouterr().out
    assert sweep() == newer and len(calls) == 6
    assert len(read_cells(run.layout.cells)) == before + 6  # both rows written after the cut line were read back
    table = sweep_table(newer, judge.columns, choose(newer, judge))
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
    import numpy as np

    import helpers.score
    from helpers.score import feature_statistics, frechet_distance

    seen = {}
    features = np.random.default_rng(0).normal(size=(3, 4))

    def fake_features(images, model, **kw):
        seen.update(sizes={im.size for im in images}, model=model)
        return features

    class FakeClip:
        def image_embeddings(self, images):
            return torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])

        def text_embeddings(self, texts):
            seen["prompts"] = texts
            return torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])

    monkeypatch.setattr(helpers.score, "inception_features", fake_features)
    mu, sigma = np.zeros(4), np.eye(4)
    judge = CourseJudge(["a", "b", "c"], 64, (mu, sigma), "inception", FakeClip())
    scores = judge.evaluate(torch.zeros(3, 3, 16, 16))
    assert scores == {"fid": pytest.approx(frechet_distance(*feature_statistics(features), mu, sigma)),
                      "clip_t": pytest.approx((1.0 + 0.6 + 0.0) / 3)}
    assert seen["sizes"] == {(64, 64)} and seen["prompts"] == ["a", "b", "c"] and seen["model"] == "inception"


def test_spread_keeps_the_last_and_seeded_subset_is_seeded():
    names = [f"step-{i:06d}" for i in range(1, 11)]
    assert spread(names, 3) == ["step-000001", "step-000005", "step-000010"]
    assert spread(names, 1) == ["step-000010"] and spread(names, 0) == names and spread(names[:2], 3) == names[:2]
    assert seeded_subset(10, 4, 0) == seeded_subset(10, 4, 0) != seeded_subset(10, 4, 1)
    assert seeded_subset(10, 0, 0) == list(range(10)) and len(seeded_subset(10, 4, 0)) == 4


def test_hand_damaged_sweep_records_are_reported_and_sampled_again(run, capsys, tmp_path):
    model, judge, folder = load_model(run), BrightJudge(), tmp_path / "staged"
    settings = sweep_settings(Setting(scheduler="ddim", steps=2), snapshot=["step-000002"], guidance=[2.0, 5.0])
    prompts, seeds = ["a monster number 3."], [1]
    calls = []
    real_sample = helpers.sample.sample_images
    sampling = lambda *a, **k: calls.append(k) or real_sample(*a, **k)  # noqa: E731
    with pytest.MonkeyPatch.context() as m:
        m.setattr(helpers.sample, "sample_images", sampling)
        rows = full_sweep(model, run, judge, settings, prompts, seeds, batch_size=1, folder=folder)
        assert len(calls) == 2
        # each cell's per-prompt records: one cut (an interrupted copy), one with another number of prompts
        cut, other = sorted(p for p in folder.glob("*.npz") if not p.name.startswith("reference-"))
        cut.write_bytes(cut.read_bytes()[:40])
        np.savez_compressed(other, sampled=np.ones(3, bool), clip_t=np.zeros(3))
        # and selection/cells.jsonl: a line that is not a cell, one without its weights
        recorded = [json.loads(x) for x in run.layout.cells.read_text().splitlines() if x.endswith("}")]
        kept = [r for r in recorded if r["setting"] not in (rows[0]["setting"], rows[1]["setting"])]
        no_weights = {k: v for k, v in rows[0].items() if k != "weights"}
        run.layout.cells.write_text("\n".join(map(json.dumps, kept + [42, no_weights, rows[1]])) + "\n")
        again = full_sweep(model, run, judge, settings, prompts, seeds, batch_size=1, folder=folder)
    said = capsys.readouterr().out
    n = len(kept)
    assert f"{cut}: unreadable (" in said and f"{other}: not 1 judged prompts" in said
    assert len(calls) == 4  # both cells sampled again
    assert f"line {n + 1}: a int, not a cell object" in said and f"line {n + 2}: no weights" in said
    assert "Traceback" not in said
    assert [r["clip_t"] for r in again] == pytest.approx([r["clip_t"] for r in rows], abs=1e-6)
    # the row left out is written again, once
    assert [r["setting"] for r in read_cells(run.layout.cells)[n:]] == [rows[1]["setting"], rows[0]["setting"]]


@pytest.mark.parametrize("given, message", [
    (dict(guidances=[-1]), "guidances: guidance=-1.0 should be a finite number >= 0"),
    (dict(steps_list=[0]), "steps_list: steps=0 should be a whole number >= 1"),
    (dict(intervals=[0.3, 5]), "intervals: guidance_interval=0.3 should be []"),
    (dict(intervals=[[5, 0.3]]), "intervals: guidance_interval=[5.0, 0.3] should be []"),
    (dict(snapshots="step-000002"), "snapshots='step-000002' should be a non-empty list"),
    (dict(guidances="abc"), "guidances='abc' should be a non-empty list"),
    (dict(guidances=[]), "guidances=[] should be a non-empty list"),
    (dict(snapshots=["step-00002"]), "'step-00002' is not a snapshot of run 't' .step-000002, step-000004, model.; did you mean 'step-000002'"),
])
def test_every_sweep_parameter_is_checked_where_it_enters(run, given, message):
    with pytest.raises(ValueError, match=message.replace("[", "\\[").replace("]", "\\]")):
        sweep_axes(run, **given)


def test_sweep_axes_default_to_the_config_and_legal_values_pass(run):
    axes = sweep_axes(run)
    assert axes == {"snapshot": ["step-000002", "step-000004"], "guidance": run.guidance_sweep,
                    "steps": run.sweep_steps, "guidance_interval": [tuple(i) for i in run.sweep_intervals],
                    "ema_length": [0.0], "guide": [""], "guide_weight": [1.0]}
    axes = sweep_axes(run, guidances=[0.5, 15], steps_list=[150], intervals=[[], [0.3, 5]], snapshots=[FINAL])
    assert axes["guidance"] == [0.5, 15] and axes["guidance_interval"] == [(), (0.3, 5)]


def test_chosen_setting_is_the_selection_in_metrics_json_else_the_config(run):
    setting, source = chosen_setting(run)
    assert setting == Setting.from_config(run) and setting.snapshot == FINAL and "run config" in source
    assert setting.guidance_rescale == run.guidance_rescale  # every config sampling field reaches the setting
    picked = Setting("step-000002", 1.0, 2, "ddim", (0.5, 9.0))
    (run.run_dir / "metrics.json").write_text(json.dumps({"selection": {"choice": {"setting": picked.to_dict()}}}))
    try:
        assert chosen_setting(run) == (picked, f"the selection sweep's choice in runs/{run.run_dir.name}/metrics.json")
        (run.run_dir / "metrics.json").write_text(json.dumps({"selection": {"choice": {"setting": {"guidance": 2}}}}))
        assert chosen_setting(run)[0] == Setting(guidance=2.0)
        (run.run_dir / "metrics.json").write_text(json.dumps({"selection": {"choice": {"setting": {"guidnce": 2}}}}))
        with pytest.raises(ValueError, match="selection.choice.setting: unknown field 'guidnce'.*'guidance'"):
            chosen_setting(run)
        (run.run_dir / "metrics.json").write_text("[]")
        with pytest.raises(ValueError, match="metrics.json: expected an object"):
            chosen_setting(run)
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
    settings = sweep_settings(Setting(scheduler="ddim", steps=2), snapshot=["step-000004"], guidance=[1.0, 3.0])
    rows = full_sweep(load_model(run), run, judged.judge, settings, judged.texts, judged.seeds, batch_size=3)
    assert all(r["fid"] >= 0 and -1 <= r["clip_t"] <= 1 for r in rows)
    assert choose(rows, judged.judge) is min(rows, key=lambda r: r["fid"])


@pytest.mark.slow
def test_04_and_05_offline_on_course_data_report_every_skipped_metric(run, tmp_path):
    """No CLIP, no Inception: 04 says why there is no sweep and writes the config's test set; 05 verifies it."""
    import papermill

    from helpers.config import PROJECT_ROOT

    texts = {}
    for name in ("04_sample", "05_eval"):
        out = tmp_path / f"{name}.ipynb"
        papermill.execute_notebook(str(PROJECT_ROOT / "notebooks" / f"{name}.ipynb"), str(out), progress_bar=False,
                                   parameters=dict(run_name=run.run_name, outputs_dir=str(run.run_dir.parents[1])),
                                   cwd=str(PROJECT_ROOT / "notebooks"), kernel_name="python3")
        texts[name] = "".join("".join(o.get("text", "")) for c in json.loads(out.read_text())["cells"]
                              for o in c.get("outputs", []))
    assert "fid: SKIPPED:" in texts["04_sample"] and "clip_t: SKIPPED:" in texts["04_sample"]
    assert "no sweep" in texts["04_sample"] and "from the run config" in texts["04_sample"]
    assert "SHA-256 as manifest.json and 04_sample's record recorded" in texts["05_eval"]
    assert "clip_t: SKIPPED:" in texts["05_eval"]
    assert "Traceback" not in texts["04_sample"] + texts["05_eval"]


def test_a_pretrained_pipeline_run_is_one_model_without_snapshots(tmp_path):
    from helpers.config import profile_config
    from helpers.weights import weights_id, with_setting

    cfg = profile_config("sd-baseline", outputs_dir=str(tmp_path), pipeline="some/sd-model")
    pipeline = object()
    assert cfg.layout.snapshot_names() == [] and with_setting(pipeline, cfg, Setting(snapshot=FINAL)) is pipeline
    assert weights_id(cfg, FINAL) == "pretrained:some/sd-model" and sweep_axes(cfg)["snapshot"] == [FINAL]


def test_the_cache_of_loaded_unets_keeps_the_last_ones_and_never_drops_the_given_model(monkeypatch):
    import helpers.weights as weights

    loads = []
    monkeypatch.setattr(weights, "with_setting", lambda m, c, s: loads.append(s.snapshot) or object())
    given = object()
    cache = weights.LoadedWeights(given, None, keep=2, holds=Setting(snapshot="a"))
    assert cache.for_setting(Setting(snapshot="a", guidance=7.0)) is given and loads == []
    b = cache.for_setting(Setting(snapshot="b"))
    assert cache.for_setting(Setting(snapshot="b", steps=3)) is b  # other fields: the same U-Nets
    assert Setting(snapshot="b", guide="a", guide_weight=1.0) in cache  # a guide at weight 1 is no guide
    cache.for_setting(Setting(snapshot="c"))
    cache.for_setting(Setting(snapshot="d"))
    assert loads == ["b", "c", "d"]
    assert list(cache.models) == [weights.weights_key(Setting(snapshot=x)) for x in "acd"]  # the oldest went first
