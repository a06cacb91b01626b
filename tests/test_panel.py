"""The notebook's guidance panel, clicked headless: compare rows, history, snapshots, honest inputs, Cancel."""
import base64
import dataclasses
import html
import io
import json
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

import helpers.panel
from helpers.autoencoder import load_autoencoder
from helpers.config import profile_config
from helpers.model import TextToImage, noise_scheduler
from helpers.panel import caption_html, make_panel, sample_row
from helpers.panel_controls import format_number, sigma_note
from helpers.sample import guided_steps, sigma_range
from helpers.setting import Setting
from helpers.text import load_text_encoder
from helpers.unet import build_unet


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = profile_config("tiny", outputs_dir=str(tmp_path_factory.mktemp("run")))
    unet = build_unet("tiny", 3, 32, cfg.resolution).eval()
    return TextToImage(cfg, unet, load_text_encoder("tiny", 16), load_autoencoder("identity"),
                       dict(noise_scheduler(cfg).config))


def click(panel, button="generate"):
    getattr(panel, f"{button}_button").click()
    panel.thread.join(60)
    assert not panel.thread.is_alive()


def captions(box_html: str) -> list[str]:
    """Each caption's text (its phrases are spans)."""
    found = re.findall(r'class="monster-caption"[^>]*>(.*?)</div>', box_html)
    return [html.unescape(re.sub(r"<[^>]+>", "", c)) for c in found]


def row_images(box_html: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in re.findall(r"base64,([^\"]+)\"", box_html)]


def error_text(panel) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", panel.error.value))


class Recorder:
    """Stands in for sample_images: records each call's setting and seeds, returns grey images."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, prompts, seeds, setting, **kwargs):
        self.calls.append(dict(prompts=list(prompts), seeds=list(seeds), **dataclasses.asdict(setting)))
        for step in range(setting.steps):
            kwargs["on_step"](step + 1, setting.steps)
        return torch.zeros(len(prompts), 3, 16, 16)


@pytest.fixture
def recorder(monkeypatch):
    fake = Recorder()
    monkeypatch.setattr(helpers.panel, "sample_images", fake)
    return fake


def test_compare_mode_samples_one_captioned_row_per_guidance_on_the_same_seeds(model):
    p = make_panel(model, prompt="a red monster", guidance=[1, 3], steps=2, seed=7, n=2)
    assert p.c["guidance"].value == "1, 3" and p.rows.value == ""
    click(p)
    assert p.error.value == "" and p.status.value.startswith("2 row(s) in")
    texts = captions(p.rows.value)
    assert texts[0] == "“a red monster” · chosen setting but guidance 1 (no guidance), 2 steps · seeds 7…8"
    assert texts[1].startswith("“a red monster” · chosen setting but 2 steps") and texts[1].endswith("seeds 7…8")
    assert "guided" not in texts[0]  # guidance 1 never guides: its caption says nothing about where it guides
    shown = row_images(p.rows.value)
    # the rows are exactly what sample_row gives for those seeds: only the setting differs
    direct = sample_row(model, "a red monster", [7, 8], Setting("model", 3.0, 2, p.c["scheduler"].value, (0.3, 5.0)))
    expected = helpers.panel.image_grid([helpers.panel.tensor_to_pil(x) for x in direct], cols=2, cell=96)
    assert np.array_equal(np.asarray(shown[1]), np.asarray(expected))
    assert not np.array_equal(np.asarray(shown[0]), np.asarray(shown[1]))
    assert p.progress.value == p.progress.max == 4  # one tick per denoising step of every row
    assert not p.generate_button.disabled and p.cancel_button.disabled


def test_the_compare_button_and_the_history_strip(model, recorder):
    p = make_panel(model, prompt="a red monster", steps=2, n=2)
    click(p)
    first = captions(p.rows.value)
    assert len(first) == 1 and p.history_box.value == ""
    click(p, "compare")
    assert [c["guidance"] for c in recorder.calls[1:]] == [1.0, 2.0, 3.0, 5.0]
    assert all(c["seeds"] == [0, 1] and c["prompts"] == ["a red monster"] * 2 for c in recorder.calls)
    assert [re.search(r"guidance \d( \(no guidance\))?|chosen setting but 2 steps ·", t).group(0)
            for t in captions(p.rows.value)] == ["guidance 1 (no guidance)", "guidance 2",
                                                 "chosen setting but 2 steps ·", "guidance 5"]
    assert p.c["guidance"].value == "3"  # Compare leaves the box as typed: the next Generate makes one row
    assert [html.unescape(h) for h in re.findall(r"<th [^>]*>([^<]*)</th>", p.rows.value)] == [
        "guidance 1 (no guidance)", "guidance 2", "guidance 3", "guidance 5"]  # each row labelled with its value
    assert captions(p.history_box.value) == first  # the earlier row, with its caption, smaller
    assert row_images(p.history_box.value)[0].size == (2 * 48, 48)
    for _ in range(3):
        click(p, "compare")
    assert len(captions(p.history_box.value)) == helpers.panel.HISTORY_ROWS


def test_sprites_are_shown_as_pixels(model, recorder):
    p = make_panel(model, prompt="x", steps=1, n=3)
    click(p)
    (strip,) = row_images(p.rows.value)
    assert strip.size == (3 * 96, 96)  # 16-px sprites at a whole factor (6), not stretched to 128
    assert 'image-rendering:pixelated' in p.rows.value
    chequer = Image.fromarray(np.indices((16, 16)).sum(0).astype(np.uint8) % 2 * 255).convert("RGB")
    big = helpers.panel.image_grid([chequer], cols=1, cell=100)
    assert big.size == (96, 96) and len(np.unique(np.asarray(big)[:6, :6])) == 1  # one source pixel, one colour


@pytest.mark.parametrize("box, typed, message", [
    ("steps", "0", "steps=0 should be a whole number >= 1"),
    ("guidance", "-3", "guidance=-3.0 should be a finite number >= 0"),
    ("guidance", "2, x", "guidance='x' is not a number"),
    ("steps", "2.5", "steps='2.5' is not a whole number"),
    ("seed", "-1", "seed=-1 is outside"),
    ("seed", "99999999999999999999", "seed=99999999999999999999 is outside 0…"),
    ("sigma_hi", "0.1", "guidance_interval=[0.3, 0.1] should be [] (every step) or [sigma_lo, sigma_hi]"),
    ("guidance", ", ".join(["2"] * 30), "30 rows"),
])
def test_bad_typed_values_are_reported_not_clamped_and_the_last_rows_dim(model, recorder, box, typed, message):
    p = make_panel(model, prompt="a red monster", steps=2, n=2)
    click(p)
    p.c[box].value = typed
    assert message in html.unescape(p.guided.value)  # already while typing
    p.generate_button.click()
    assert message in error_text(p) and "color:#c62828" in p.error.value
    assert len(recorder.calls) == 1 and p.c[box].value == typed  # nothing sampled, the box keeps what was typed
    assert 'opacity:0.35' in p.rows.value  # the picture above belongs to the last good setting
    assert not p.generate_button.disabled
    p.c[box].value = {"sigma_hi": "5", "guidance": "3"}.get(box, "2" if box == "steps" else "0")
    click(p)
    assert p.error.value == "" and len(recorder.calls) == 2


def test_any_value_the_sampler_accepts_is_legal_and_python_types_are_reported(model, recorder):
    p = make_panel(model, guidance=20, steps=500, seed=2**63 - 4)
    assert (p.c["guidance"].value, p.c["steps"].value, p.error.value) == ("20", "500", "")
    p = make_panel(model, guidance="3", steps=None, scheduler=5, n=2)  # never raises: the panel says it
    assert error_text(p) == ("make_panel(guidance='3'): got str, expected a number; "
                             "make_panel(scheduler=5): got int, expected a string")
    assert p.c["steps"].value == str(model.cfg.sample_steps)  # None: the run's value
    click(p)
    assert recorder.calls[-1]["guidance"] == 3.0 and p.error.value == ""


def test_the_token_count_warns_when_the_prompt_will_be_cut(model):
    p = make_panel(model, prompt="a red monster")
    assert re.search(r"\d+ of 16 tokens", p.tokens.value)
    p.c["prompt"].value = "this is a really cute little creature and it is a red round monster with two eyes and horns"
    note = html.unescape(p.tokens.value)
    count = model.text_encoder.token_lengths([p.c["prompt"].value])[0]
    assert count > 16 and f"{count} tokens: the text encoder keeps 16" in note and "is cut" in note
    assert "#c62828" in p.tokens.value


def test_guided_steps_and_the_sigma_boxes(model, recorder):
    # the demo's rectified flow at 10 steps: t = 1, 0.9, ..., 0.1, sigma = t / (1 - t); (0.3, 5] holds t = 0.8 ... 0.3
    config = dict(noise_scheduler(profile_config("demo")).config)
    assert guided_steps(config, Setting("model", 2.0, 10, "dpm++2m", (0.3, 5.0))) == (6, 10)
    config = dict(noise_scheduler(profile_config("demo", prediction_type="v_prediction")).config)  # cosine betas
    assert guided_steps(config, Setting("model", 2.0, 10, "dpm++2m", (0.3, 5.0))) == (7, 10)
    assert guided_steps(config, Setting("model", 2.0, 25, "dpm++2m", (0.3, 5.0))) == (17, 25)
    every_step = dataclasses.replace(model, cfg=model.cfg.replace(guidance_interval=[]))
    p = make_panel(every_step, steps=4, n=2)  # opens at the chosen (here: the config's) interval: every step
    assert p.c["everywhere"].value and p.c["sigma_lo"].disabled and p.c["sigma_hi"].disabled
    assert "guided at 4 of 4 steps" in p.guided.value
    click(p)
    assert recorder.calls[-1]["guidance_interval"] == ()
    p.c["everywhere"].value = False
    assert not p.c["sigma_lo"].disabled
    p.c["sigma_lo"].value, p.c["sigma_hi"].value = "0.5", "4"
    k, n = guided_steps(model.scheduler_config, Setting("model", 3.0, 4, "dpm++2m", (0.5, 4.0)))
    assert f"guided at {k} of {n} steps" in p.guided.value
    click(p)
    assert recorder.calls[-1]["guidance_interval"] == (0.5, 4.0)
    assert (f"guided at {k} of {n}" in p.rows.value) == (k < n)


def test_cancel_stops_between_steps_and_the_panel_stays_usable(model, monkeypatch):
    steps_done = []

    def slow(model, prompts, seeds, setting, **kwargs):
        for step in range(setting.steps):
            time.sleep(0.02)
            steps_done.append(step)
            kwargs["on_step"](step + 1, setting.steps)
        return torch.zeros(len(prompts), 3, 16, 16)

    monkeypatch.setattr(helpers.panel, "sample_images", slow)
    p = make_panel(model, prompt="x", steps=100, n=2)
    p.generate_button.click()
    while len(steps_done) < 5:
        time.sleep(0.01)
    assert p.generate_button.disabled and not p.cancel_button.disabled
    assert (p.generate_button.button_style, p.cancel_button.button_style) == ("", "warning")  # the live one coloured
    p.cancel_button.click()
    p.thread.join(10)
    assert len(steps_done) < 10 and p.status.value.startswith("cancelled after")
    assert not p.generate_button.disabled and p.cancel_button.disabled and p.error.value == ""
    assert (p.generate_button.button_style, p.cancel_button.button_style) == ("primary", "")  # no orange when off


def test_an_error_while_sampling_shows_in_the_panel_with_its_traceback(model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (pretend)")

    p = make_panel(model, prompt="a red monster", steps=1, n=2)
    click(p)
    monkeypatch.setattr(helpers.panel, "sample_images", broken)
    click(p)
    assert "RuntimeError: CUDA out of memory (pretend)" in p.error.value
    assert p.details.layout.display != "none" and "in broken" in p.details.children[0].value
    assert not p.generate_button.disabled and p.status.value == "" and p.progress.layout.visibility == "hidden"


def test_the_snapshot_picker(model, recorder, tmp_path):
    cfg = profile_config("tiny", outputs_dir=str(tmp_path))
    for name in ("step-000002", "step-000004"):
        model.unet.save_pretrained(cfg.run_dir / "snapshots" / name)
    chosen = Setting("step-000002", 2.0, 3, "ddim", (0.3, 5.0))
    (cfg.run_dir / "metrics.json").write_text(json.dumps({"selection": {"choice": {"setting": chosen.to_dict()}}}))
    run_model = dataclasses.replace(model, cfg=cfg)
    p = make_panel(run_model, setting=chosen.replace(snapshot="step-000004"), snapshot="step-300")
    assert [name for _, name in p.c["snapshot"].options] == ["step-000002", "step-000004"]
    assert dict(p.c["snapshot"].options)["step-000002 ← chosen"] == "step-000002"
    assert error_text(p).startswith("snapshot 'step-300' is not in run 'tiny' (it has step-000002, step-000004)")
    assert p.c["snapshot"].value == "step-000004"  # what the given model holds: the typed name is not there
    p = make_panel(run_model, setting=chosen.replace(snapshot="step-000004"))
    assert (p.c["snapshot"].value, p.c["guidance"].value, p.c["steps"].value) == ("step-000002", "2", "3")
    assert html.unescape(re.sub("<[^>]+>", "", p.source.value)) == "chosen by 04's sweep (runs/tiny/metrics.json)"
    p.c["guidance"].value = "7"
    p.c["snapshot"].value = "step-000004"
    p.reset_button.click()
    assert (p.c["snapshot"].value, p.c["guidance"].value, p.c["steps"].value, p.c["scheduler"].value) == \
        ("step-000002", "2", "3", "ddim")
    click(p)
    assert recorder.calls[-1]["guidance"] == 2.0
    assert re.fullmatch(r"\(empty prompt\) · chosen setting( · guided at \d of 3 steps)? · seeds 0…3",
                        captions(p.rows.value)[0])
    assert p.loaded.models[("step-000002", 0.0, "")].unet is not model.unet  # loaded from its folder, once
    p.c["all_snapshots"].value = True
    assert p.c["snapshot"].disabled  # every snapshot: the list does nothing, and looks it
    click(p)
    assert [c.split(" · ")[1] for c in captions(p.rows.value)] == ["chosen setting", "chosen setting but step-000004"]
    assert p.loaded.models[("step-000004", 0.0, "")] is run_model
    p.c["guidance"].value = "1, 3"
    click(p)  # two fields vary: a grid, snapshots down, guidance across, both axes labelled
    assert len(recorder.calls) == 7 and len(captions(p.rows.value)) == 4
    headers = [html.unescape(h) for h in re.findall(r"<th [^>]*>([^<]*)</th>", p.rows.value)]
    assert headers == ["guidance 1 (no guidance)", "guidance 3", "step-000002", "step-000004"]


def test_an_executed_copy_shows_a_one_line_note_instead_of_a_repr(model):
    bundle = make_panel(model)._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("[guidance playground") and "VBox" not in bundle["text/plain"]


def test_reset_gives_back_the_handed_in_seed_and_clears_the_red_line_and_the_dimming(model, recorder, tmp_path):
    (tmp_path / "test.json").write_text(json.dumps({k: {"image_name": f"{k}.png", "text_prompt": t} for k, t in
                                                    [("a", "a red round monster"), ("b", "a blue monster")]}))
    run_model = dataclasses.replace(model, cfg=model.cfg.replace(data_dir=str(tmp_path), seed=10))
    p = make_panel(run_model, prompt="a blue monster", steps=2, n=2)
    assert p.c["seed"].value == "11"  # cfg.seed + its index in test.json: the handed-in picture's seed
    click(p)
    shown = p.rows.value
    p.c["seed"].value, p.c["guidance"].value = "5", "-2"
    p.generate_button.click()
    assert error_text(p).startswith("Cannot sample: guidance=-2.0") and 'opacity:0.35' in p.rows.value
    p.reset_button.click()
    assert (p.c["seed"].value, p.c["guidance"].value) == ("11", "3")
    assert p.error.value == "" and p.details.layout.display == "none" and p.rows.value == shown  # undimmed
    click(p)
    assert recorder.calls[-1]["seeds"] == recorder.calls[0]["seeds"] == [11, 12]
    p.c["prompt"].value, p.c["seed"].value = "a red round monster", "5"
    p.reset_button.click()
    assert p.c["seed"].value == "10"  # the seed of the prompt shown, not of the one the panel opened with
    p = make_panel(run_model, prompt="not a test prompt", seed=42, n=2)
    p.c["seed"].value = "5"
    p.reset_button.click()
    assert p.c["seed"].value == "42"  # a prompt the test set lacks: the seed the panel opened with
    assert make_panel(run_model, prompt="no test prompt").c["seed"].value == "10"  # and by default the run's


@pytest.mark.parametrize("x, words", [(0, "0"), (0.3, "0.3"), (5, "5"), (157, "157"), (999.98, "1,000"),
                                      (1000, "1,000"), (14.6, "14.6"), (0.006427, "0.00643"), (20291.3, "20,300")])
def test_numbers_are_written_as_people_write_them(x, words):
    assert format_number(x) == words
    assert "e" not in format_number(x * 1e6) + format_number(x / 1e6)


def test_two_figures_for_a_rough_range():
    assert [format_number(x, digits=2) for x in (999, 157, 14.6, 0.3)] == ["1,000", "160", "15", "0.3"]


def test_the_sigma_note_in_plain_numbers(model):
    assert sigma_note(0.0, 998.9999999999991) == "this schedule's noise σ runs from 0 to about 1,000"
    assert sigma_note(0.3, 14) == "this schedule's noise σ runs from 0.3 to 14"  # "about" only when rounded
    note = sigma_note(*sigma_range(model.scheduler_config))
    assert note == "this schedule's noise σ runs from about 0.0064 to about 20,000"
    shown = [w.value for box in make_panel(model).children for w in getattr(box, "children", ()) if
             hasattr(w, "value") and "σ runs" in str(w.value)]
    assert [html.unescape(re.sub(r"<[^>]+>", "", v)) for v in shown] == [
        "(this schedule's noise σ runs from\xa0about\xa00.0064 to\xa0about\xa020,000)"]  # each bound one unit


def test_a_caption_breaks_between_phrases_only():
    caption = ("“a red, round monster” · chosen setting but guidance 2, 5 steps, guided for σ in (0.3, 5] · "
               "guided at 3 of 5 steps · seeds 0…3")
    phrases = [html.unescape(p) for p in re.findall(r'<span class="monster-phrase"[^>]*>([^<]*)</span>',
                                                    caption_html(caption))]
    assert phrases == ["“a red,", "round monster” ·", "chosen setting but guidance 2,", "5 steps,",
                       "guided for σ in (0.3, 5] ·", "guided at 3 of 5 steps ·", "seeds 0…3"]
    assert " ".join(phrases) == caption  # the text reads (and copies) as before
    assert 'display:inline-block' in caption_html(caption)  # a box: it moves to the next line whole
