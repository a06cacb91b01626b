"""The hw6 defaults (the best public course recipe): crop to content, the hw6-recipe U-Net, epochs, the profile."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import sprite
from helpers.cache import build_cache, cache_path, load_cache
from helpers.config import RunConfig, profile_config
from helpers.length import total_steps, warmup_steps_for
from helpers.run_folder import open_run
from helpers.data import load_records
from helpers.images import crop_to_content, load_image_tensor, load_rgb, pil_to_tensor
from helpers.unet import PRESETS, build_unet, count_params, forward_gflops

GREEN = (10, 200, 30)


def white_margined(path, speck: int = 252):
    """20x16 RGB on white: a 4x8 green box at rows 2-5, columns 3-10, and a near-white speck in a corner."""
    arr = np.full((16, 20, 3), 255, np.uint8)
    arr[2:6, 3:11] = GREEN
    arr[15, 19] = speck
    Image.fromarray(arr, "RGB").save(path)
    return path


# ---------------------------------------------------------------- cropping


def test_transparent_margins_are_cropped_away(tmp_path):
    path = sprite(tmp_path / "s.png", seed=3, size=16)  # an 8x8 opaque blob in the middle, transparent around it
    colour = pil_to_tensor(load_rgb(path))[:, 8, 8]
    whole = load_image_tensor(path, 8)
    cropped = load_image_tensor(path, 8, crop=True)
    assert float(whole[:, 0, 0].min()) == 1.0  # uncropped: the margin composites to white
    assert torch.equal(cropped, colour[:, None, None].expand(3, 8, 8))  # cropped: the blob fills the frame


def test_white_margins_are_cropped_then_padded_to_a_square(tmp_path):
    path = white_margined(tmp_path / "w.png")
    im = crop_to_content(load_rgb(path))
    assert im.size == (8, 4)  # the speck at 252 is background (any channel < 250 is content)
    x = load_image_tensor(path, 8, crop=True)  # 8 wide x 4 high, padded with 2 white rows above and below
    green = pil_to_tensor(Image.new("RGB", (1, 1), GREEN))[:, 0, 0]
    assert torch.equal(x[:, 2:6], green[:, None, None].expand(3, 4, 8))
    assert float(x[:, :2].min()) == 1.0 and float(x[:, 6:].min()) == 1.0


def test_the_content_threshold_is_249(tmp_path):
    path = white_margined(tmp_path / "w.png", speck=249)  # just below 250: content, so the box reaches the corner
    assert crop_to_content(load_rgb(path)).size == (17, 14)


def test_an_all_white_image_is_kept_whole():
    blank = Image.new("RGB", (12, 7), (255, 255, 255))
    assert crop_to_content(blank).size == (12, 7)


# ---------------------------------------------------------------- where cropping reaches


@pytest.fixture
def run(tmp_path, course_dir):
    cfg = open_run("t", "tiny", outputs_dir=str(tmp_path), data_dir=str(course_dir))
    records, _ = load_records(cfg.data_path)
    return cfg, records[:4]


def test_crop_is_in_the_cache_key_and_the_cached_images(run):
    cfg, records = run
    cropped_cfg = cfg.replace(crop_to_content=True)
    assert cache_path(cropped_cfg, records) != cache_path(cfg, records)
    build_cache(cropped_cfg, records, progress=False)
    c = load_cache(cropped_cfg, records)
    expected = torch.stack([load_image_tensor(r.path, cfg.resolution, crop=True) for r in records])
    assert torch.allclose(c.mean[:, 0].float(), expected, atol=1e-3)  # fp16 storage
    assert not torch.allclose(c.mean[:, 0].float(), torch.stack(
        [load_image_tensor(r.path, cfg.resolution) for r in records]), atol=1e-3)


def test_validation_images_are_prepared_like_the_training_images(tmp_path, course_dir):
    from helpers.cache import write_split
    from helpers.data import load_course_data
    from helpers.metrics import validation_set

    cfg = open_run("v", "tiny", str(tmp_path), data_dir=str(course_dir), val_fraction=0.34, crop_to_content=True)
    write_split(cfg, load_course_data(course_dir)[0])
    vs = validation_set(cfg, max_images=1)
    path = course_dir / "train" / f"{vs.keys[0]}_0.png"
    assert torch.equal(vs.real[0], load_image_tensor(path, cfg.resolution, crop=True))


# ---------------------------------------------------------------- the U-Net


def test_hw6_recipe_preset_is_the_recipes_architecture():
    with torch.device("meta"):
        unet = build_unet("hw6-recipe", in_channels=4, cross_attention_dim=512, sample_size=32)
    c = unet.config
    assert tuple(c.block_out_channels) == (192, 384, 768) and c.layers_per_block == 3
    assert tuple(c.down_block_types) == ("CrossAttnDownBlock2D",) * 3
    assert tuple(c.up_block_types) == ("CrossAttnUpBlock2D",) * 3
    assert c.attention_head_dim == 8 and c.cross_attention_dim == 512
    assert round(count_params(unet) / 1e6, 2) == 296.40  # the figure in the preset's comment
    assert {"tiny", "demo", "hw6-base", "hw6-large"} <= set(PRESETS)  # the earlier presets stay


def test_forward_gflops_counts_attention_on_a_cpu_as_on_meta():
    unet = build_unet("tiny", in_channels=3, cross_attention_dim=32, sample_size=16)
    with torch.device("meta"):
        meta = build_unet("tiny", in_channels=3, cross_attention_dim=32, sample_size=16)
    # torch's fused CPU attention kernel alone would count 0 FLOP for the attention products
    assert forward_gflops(unet, 16, tokens=8) == pytest.approx(forward_gflops(meta, 16, tokens=8), rel=1e-9)


# ---------------------------------------------------------------- training length


def test_total_steps_uses_max_steps_unless_epochs_are_set():
    cfg = RunConfig(max_steps=123, batch_size=64)
    assert total_steps(cfg, 43_294) == 123
    sixty = RunConfig(max_epochs=60, batch_size=64)
    assert total_steps(sixty, 43_294) == 40_589  # ceil(60 x 43,294 / 64): flips do not lengthen an epoch
    assert total_steps(sixty, 43_294, num_processes=4) == 10_148  # ceil(60 x 43,294 / 256)
    assert total_steps(RunConfig(max_epochs=2, batch_size=4, grad_accum=2), 16) == 4
    with pytest.raises(ValueError, match="max_epochs=-1"):
        total_steps(RunConfig(max_epochs=-1), 10)
    with pytest.raises(ValueError, match="num_train_images=0"):
        total_steps(sixty, 0)


def test_warmup_is_a_fraction_of_the_run_or_a_step_count():
    assert warmup_steps_for(RunConfig(warmup_steps=50), 40_589) == 50
    assert warmup_steps_for(RunConfig(warmup_fraction=0.05), 40_589) == 2_029
    with pytest.raises(ValueError, match="warmup_fraction=1.5"):
        warmup_steps_for(RunConfig(warmup_fraction=1.5), 100)


# ---------------------------------------------------------------- the profile


RECIPE = dict(
    crop_to_content=True, resolution=256, unet_preset="hw6-recipe", text_encoder="openai/clip-vit-base-patch32",
    max_tokens=77, autoencoder="CompVis/stable-diffusion-v1-4", autoencoder_subfolder="vae",
    prediction_type="epsilon", beta_schedule="linear", num_train_timesteps=1000, min_snr_gamma=0.0,
    caption_dropout=0.05, lr=2e-4, lr_schedule="cosine", warmup_fraction=0.05, batch_size=64, grad_accum=1,
    max_epochs=60, max_grad_norm=1.0, ema_halflife_images=22_150.0,
    scheduler="dpm++2m", sample_steps=15, guidance=3.0, hflip=False, guidance_interval=[], sweep_intervals=[[]],
)


def test_hw6_profile_is_the_recipe_field_by_field():
    cfg = profile_config("hw6")
    assert {k: getattr(cfg, k) for k in RECIPE} == RECIPE
    # 0.998 per step at 64 images per step
    assert 0.5 ** (cfg.batch_size / cfg.ema_halflife_images) == pytest.approx(0.998, abs=1e-5)


def test_hw6_noise_schedule_is_diffusers_default_linear():
    from helpers.model import noise_scheduler

    betas = noise_scheduler(profile_config("hw6")).betas
    assert len(betas) == 1000
    assert float(betas[0]) == pytest.approx(1e-4) and float(betas[-1]) == pytest.approx(0.02)


def test_every_part_of_the_recipe_can_be_switched_off():
    cfg = profile_config("hw6", crop_to_content=False, unet_preset="hw6-base", max_epochs=0, warmup_fraction=0.0,
                         scheduler="ddim", caption_dropout=0.1)
    assert (cfg.crop_to_content, cfg.unet_preset, cfg.max_epochs, cfg.scheduler) == (False, "hw6-base", 0, "ddim")
    assert total_steps(cfg, 43_294) == cfg.max_steps and warmup_steps_for(cfg, cfg.max_steps) == cfg.warmup_steps
    for profile in ("demo", "tiny"):
        assert profile_config(profile).crop_to_content is False and profile_config(profile).max_epochs == 0
    # what the demo measured best (benchmarks/RESULTS.md), and every profile can switch it back
    demo = profile_config("demo")
    assert (demo.hflip, demo.guidance_interval, demo.sweep_intervals) == (False, [0.3, 5.0], [[0.3, 5.0]])
    back = profile_config("demo", hflip=True, guidance_interval=[], sweep_intervals=[[]])
    assert (back.hflip, back.guidance_interval, back.sweep_intervals) == (True, [], [[]])
    # the demo's objective (RESULTS.md, "Training objectives on the demo"): rectified flow, SD3's logit-normal(0, 1) t
    assert (demo.prediction_type, demo.min_snr_gamma, demo.timestep_density, demo.logit_mean, demo.logit_std) == \
        ("flow_prediction", 0.0, "logit_normal", 0.0, 1.0)
    v = profile_config("demo", prediction_type="v_prediction", min_snr_gamma=5.0)
    assert (v.prediction_type, v.min_snr_gamma, profile_config("tiny").prediction_type) == ("v_prediction", 5.0,
                                                                                          "v_prediction")
    with pytest.raises(ValueError, match="min_snr_gamma=5.0 weights epsilon / v_prediction losses"):
        profile_config("demo", min_snr_gamma=5.0)  # flow's density is its weighting
