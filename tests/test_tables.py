"""Scores and the selection sweep as small rendered tables: 3 significant digits, only what varies, the choice
highlighted, grouped by snapshot; paths relative to the run."""
import re

from helpers.config import profile_config
from helpers.tables import scores_as_table, sweep_table_html


def rows():
    out = []
    for snapshot in ("step-000300", "step-000900"):
        for g in (1.0, 2.0):
            out.append({"setting": {"snapshot": snapshot, "guidance": g, "steps": 10, "scheduler": "dpm++2m",
                                    "guidance_interval": [0.3, 5.0], "ema_length": 0.05},
                        "accuracy": {"color": 1.0, "eyes": 0.7 + g / 100}, "mean_accuracy": 1.0,
                        "frechet_distance": 12.3456789 * g})
    return out


def cells(table_html: str) -> list[list[str]]:
    return [re.findall(r"<t[dh][^>]*>([^<]*)</t[dh]>", tr) for tr in re.findall(r"<tr.*?</tr>", table_html)]


def test_the_sweep_table_shows_what_varies_grouped_by_snapshot_with_the_choice_marked():
    r = rows()
    table = sweep_table_html(r, ["accuracy.color", "accuracy.eyes", "mean_accuracy", "frechet_distance"], r[3])
    assert cells(table.html) == [
        ["", "guidance", "eyes", "FD"],
        ["step-000300"], ["", "1", "0.71", "12.3"], ["", "2", "0.72", "24.7"],
        ["step-000900"], ["", "1", "0.71", "12.3"], ["★", "2", "0.72", "24.7"]]
    assert table.html.count("monster-chosen") == 1 and "white-space:nowrap" in table.html
    assert "*" in repr(table)  # plain text where there is no HTML


def test_scores_print_as_a_small_table_with_three_significant_digits():
    table = scores_as_table({"accuracy": {"eyes": 0.742857142857, "color": 1.0}, "frechet_distance": 3.14159265358979,
                         "fid": 3871.234, "prompts": "every test prompt"}, "chosen")
    assert cells(table.html) == [["accuracy.eyes", "0.743"], ["accuracy.color", "1"], ["frechet_distance", "3.14"],
                                 ["fid", "3870"], ["prompts", "every test prompt"]]
    assert str(table).splitlines()[1].split() == ["accuracy.eyes", "0.743"]


def test_paths_print_relative_to_the_run(tmp_path):
    cfg = profile_config("tiny", outputs_dir=str(tmp_path))
    assert cfg.layout.shown(cfg.layout.results) == "runs/tiny/results"
    assert cfg.layout.shown("/elsewhere/x.png") == "/elsewhere/x.png"
