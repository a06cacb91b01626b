"""The notebook's widget panel, clicked headless: validation, errors shown in the panel, progress, the image."""
import dataclasses
import html
import io

import pytest
import torch
from PIL import Image

import helpers.panel
from helpers.autoencoder import load_autoencoder
from helpers.config import profile_config
from helpers.model import TextToImage, noise_scheduler
from helpers.panel import BadSetting, make_panel, preview
from helpers.text import load_text_encoder
from helpers.unet import build_unet


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = profile_config("tiny", outputs_dir=str(tmp_path_factory.mktemp("run")))
    unet = build_unet("tiny", 3, 32, cfg.resolution).eval()
    return TextToImage(cfg, unet, load_text_encoder("tiny", 16), load_autoencoder("identity"),
                       dict(noise_scheduler(cfg).config))


def parts(panel) -> dict:
    """The panel's widgets: controls by their description, the rest by type (the first of each: the error line
    is the first HTML)."""
    found, todo = {}, [panel]
    while todo:
        widget = todo.pop(0)
        todo += getattr(widget, "children", ())
        found.setdefault(getattr(widget, "description", "") or type(widget).__name__, widget)
    return found


def test_preview_and_the_panel_button_headless(model):
    grid = preview(model, "a red monster", guidance=3, steps=2, scheduler="unipc", seed=5, n=3, cell=32)
    assert grid.size == (96, 32)
    p = parts(make_panel(model, prompt="a red monster", steps=2, n=2))
    assert p["Image"].layout.display == "none" and not p["Image"].value  # no broken-image icon before a click
    p["Generate"].click()
    shown = Image.open(io.BytesIO(p["Image"].value))
    assert shown.format == "PNG" and shown.size == (256, 128)
    assert p["Image"].layout.display != "none"
    assert p["Label"].value.startswith("seeds 0…1") and p["HTML"].value == ""
    assert p["IntProgress"].value == p["IntProgress"].max == 2  # one tick per denoising step
    assert not p["Generate"].disabled


@pytest.mark.parametrize("seed, message", [("99999999999999999999", "seed=99999999999999999999 is outside 0…"),
                                           ("-1", "seed=-1 is outside"), ("12a", "seed='12a' is not a whole number")])
def test_a_bad_seed_is_named_in_the_panel_and_the_button_works_again(model, seed, message):
    p = parts(make_panel(model, prompt="a red monster", steps=2, n=2))
    p["seed"].value = seed
    p["Generate"].click()
    assert message in html.unescape(p["HTML"].value) and "color:" in p["HTML"].value
    assert p["Label"].value == "" and not p["Generate"].disabled  # not left at "sampling…"
    assert p["Image"].layout.display == "none"
    p["seed"].value = str(2**63 - 2)  # the largest seed whose two-image row still fits below 2**63
    p["Generate"].click()
    assert p["HTML"].value == ""
    assert p["Label"].value.startswith(f"seeds {2**63 - 2}…{2**63 - 1}")


def test_an_error_while_sampling_shows_in_the_panel_with_its_traceback(model, monkeypatch):
    def broken(*args, **kwargs):
        during.update(disabled=p["Generate"].disabled, progress=p["IntProgress"].layout.visibility,
                      status=p["Label"].value)
        raise RuntimeError("CUDA out of memory (pretend)")

    monkeypatch.setattr(helpers.panel, "sample_images", broken)
    p, during = parts(make_panel(model, prompt="a red monster", steps=2, n=2)), {}
    p["Generate"].click()
    assert during == dict(disabled=True, progress="visible", status="sampling…")
    assert "RuntimeError: CUDA out of memory (pretend)" in p["HTML"].value
    assert p["Accordion"].layout.display != "none" and "in broken" in p["Accordion"].children[0].value
    assert not p["Generate"].disabled and p["Label"].value == "" and p["IntProgress"].layout.visibility == "hidden"


def test_the_guidance_interval_control_reaches_the_sampler(model, monkeypatch):
    calls = []

    def fake(model, prompts, seeds, setting, **kwargs):
        calls.append({"guidance_interval": setting.guidance_interval or None})
        return torch.zeros(len(prompts), 3, 16, 16)

    monkeypatch.setattr(helpers.panel, "sample_images", fake)
    every_step = dataclasses.replace(model, cfg=model.cfg.replace(guidance_interval=[]))
    p = parts(make_panel(every_step, prompt="", steps=2, n=2))
    assert p["guide at every step"].value  # a run that sets no interval
    p["Generate"].click()
    assert calls[-1]["guidance_interval"] is None
    assert "empty prompt: unconditional samples" in p["Label"].value
    p["guide at every step"].value, p["or from σ"].value, p["to σ"].value = False, 0.5, 4.0
    p["Generate"].click()
    assert calls[-1]["guidance_interval"] == (0.5, 4.0)
    p["to σ"].value = 0.1
    p["Generate"].click()
    assert len(calls) == 2 and "guide from σ=0.5 to σ=0.1: needs 0 ≤ from < to" in html.unescape(p["HTML"].value)
    # a run that guides on an interval starts the panel there
    run_with_interval = dataclasses.replace(model, cfg=model.cfg.replace(guidance_interval=[0.2, 3.0]))
    p = parts(make_panel(run_with_interval, prompt="a red monster", steps=2, n=2))
    assert not p["guide at every step"].value and (p["or from σ"].value, p["to σ"].value) == (0.2, 3.0)
    p["Generate"].click()
    assert calls[-1]["guidance_interval"] == (0.2, 3.0)


def test_legal_starting_values_widen_the_sliders_and_illegal_ones_are_refused(model):
    p = parts(make_panel(model, guidance=0.5, steps=150))  # legal in the config: never gates the notebook
    assert (p["guidance"].value, p["guidance"].min, p["steps"].value, p["steps"].max) == (0.5, 0.5, 150, 150)
    with pytest.raises(BadSetting, match=r"guidance=-1.0 should be a finite number >= 0; steps=0 should be a whole"):
        make_panel(model, guidance=-1, steps=0)
