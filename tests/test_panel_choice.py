"""The panel opens at the run's whole choice (EMA length and autoguide included), Reset restores every field, and
its first sample at that setting is the very PNG the test set holds for the same prompt and seed."""
import html
import io
import json
import re
import shutil

import pytest
import torch

from helpers.autoencoder import load_autoencoder
from helpers.config import profile_config
from helpers.data import Prompt
from helpers.model import TextToImage, noise_scheduler
from helpers.panel import make_panel
from helpers.phema import PowerEMA
from helpers.sample import to_output_pils
from helpers.setting import FINAL, Setting
from helpers.submission import write_test_set
from helpers.text import load_text_encoder
from helpers.unet import build_unet
from helpers.weights import setting_weights_id, with_setting

CHOSEN = Setting("step-000004", 2.0, 3, "ddim", (0.3, 5.0), 0.25, guide="step-000002", guide_weight=1.5,
                 ema_length=0.05)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with two snapshots, a final model equal to the last one, post-hoc EMA profiles, and a choice."""
    cfg = profile_config("tiny", outputs_dir=str(tmp_path_factory.mktemp("run")))
    torch.manual_seed(0)
    unet = build_unet("tiny", 3, 32, cfg.resolution).eval()
    ema = PowerEMA(unet)
    for step in (2, 4):
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.01 * torch.randn_like(p))
        ema.update(unet, images=8)
        ema.store(cfg.layout.phema, step)
        unet.save_pretrained(cfg.layout.unet_dir(f"step-{step:06d}"))
    shutil.copytree(cfg.layout.unet_dir("step-000004"), cfg.layout.unet_dir(FINAL))
    cfg.layout.metrics.write_text(json.dumps({"selection": {"choice": {"setting": CHOSEN.to_dict()}}}))
    model = TextToImage(cfg, unet, load_text_encoder("tiny", 16), load_autoencoder("identity"),
                        dict(noise_scheduler(cfg).config))
    return cfg, model


def fields(p) -> dict:
    return {k: w.value for k, w in p.c.items() if k != "prompt"}


def test_the_panel_opens_at_the_whole_choice_and_reset_restores_every_field(run):
    cfg, model = run
    p = make_panel(model, prompt="a red monster", setting=Setting.from_config(cfg, "step-000002"))
    opened = fields(p)
    assert opened == dict(snapshot="step-000004", all_snapshots=False, ema_length=0.05, guidance="2", steps="3",
                          scheduler="ddim", rescale="0.25", everywhere=False, sigma_lo="0.3", sigma_hi="5",
                          guide="step-000002", guide_weight="1.5", seed="0")  # not a test prompt: the run's seed
    # "model" holds the same weights as step-000004: listed once, named on the one kept
    assert [name for _, name in p.c["snapshot"].options] == ["step-000002", "step-000004"]
    assert "step-000004 (= model) ← chosen" in dict(p.c["snapshot"].options)
    assert [x for _, x in p.c["ema_length"].options] == [0.0, 0.05, 0.1]  # the stored profiles' lengths
    for k, v in dict(snapshot="step-000002", ema_length=0.1, guidance="1, 3", steps="5", scheduler="euler",
                     rescale="0", everywhere=True, guide="", guide_weight="2", all_snapshots=True, seed="5").items():
        p.c[k].value = v
    assert fields(p) != opened
    p.reset_button.click()
    assert fields(p) == opened


def test_the_plan_line_says_rows_and_time_before_a_click(run, monkeypatch):
    cfg, model = run
    p = make_panel(model, prompt="x", n=2)
    plan = html.unescape(re.sub("<[^>]+>", "", p.plan.value))
    assert plan == ("Generate: 1 row × 2 seeds (time: measured on the first click) · "
                    "Compare: 4 rows × 2 seeds (time: measured on the first click)")
    p.c["all_snapshots"].value = True
    assert "Generate: 2 rows × 2 seeds" in p.plan.value
    p.seconds_per_step = 1.0  # as if measured: 2 rows × 3 steps
    p.update_notes()
    assert "Generate: 2 rows × 2 seeds, about 6 s" in p.plan.value and "8 rows × 2 seeds, about 24 s" in p.plan.value


def test_the_first_sample_at_the_opening_setting_is_the_handed_in_png(run, tmp_path):
    cfg, model = run
    prompts = [Prompt(f"k{i}", f"{i:03d}.png", t) for i, t in
               enumerate(["a red round monster", "a blue tall monster with horns", "a green monster"])]
    results = tmp_path / "results"
    write_test_set(with_setting(model, cfg, CHOSEN), prompts, results, CHOSEN, setting_weights_id(cfg, CHOSEN),
                   seed=cfg.seed, size=cfg.output_size, batch_size=cfg.sample_batch_size)
    i = 1
    p = make_panel(model, prompt=prompts[i].text, setting=Setting.from_config(cfg, "step-000004"), seed=cfg.seed + i,
                   n=2)  # as 04 calls it: the model holds the newest snapshot, the panel loads the choice
    p.generate_button.click()
    p.thread.join(120)
    assert p.error.value == "" and len(p.current) == 1
    images, caption, setting = p.current[0]
    assert setting == CHOSEN and " · chosen setting · " in caption
    png = io.BytesIO()
    to_output_pils(images[:1], cfg.output_size)[0].save(png, format="PNG")
    assert png.getvalue() == (results / prompts[i].image_name).read_bytes()
