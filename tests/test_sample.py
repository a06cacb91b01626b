"""The sampler, the pictures built on it, the diffusers export, and the SD baseline's offline behaviour."""

import numpy as np
import pytest
import torch

from helpers.autoencoder import load_autoencoder
from helpers.config import profile_config
from helpers.model import TextToImage, noise_scheduler
from helpers.baseline import load_pipeline
from helpers.grids import guidance_steps_grid, scheduler_grid
from helpers.sample import (SCHEDULERS, guided_steps, make_scheduler, noise_level, sample_images, sample_latents,
                            to_output_pils)
from helpers.setting import Setting
from helpers.text import load_text_encoder
from helpers.unet import build_unet

PROMPTS = ["a red round monster with two eyes", "a blue square monster. The monster is attacking.", "a tiny thing"]


def tiny_model(tmp_path, autoencoder="identity", **overrides) -> TextToImage:
    cfg = profile_config("tiny", outputs_dir=str(tmp_path), **overrides)
    ae = load_autoencoder(autoencoder)
    size = cfg.resolution // ae.downsample
    unet = build_unet("tiny", ae.latent_channels, 32, size).eval()
    return TextToImage(cfg, unet, load_text_encoder("tiny", 16), ae, dict(noise_scheduler(cfg).config))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def vae_model(tmp_path_factory):
    # the VAE profiles (hw6) train on SD's scaled_linear schedule; fp32 like the exported pipeline it is compared
    # with ("auto" would sample bf16 on a CPU with AMX or AVX512-BF16)
    return tiny_model(tmp_path_factory.mktemp("vae_run"), "tiny", beta_schedule="scaled_linear", mixed_precision="no")


def test_every_scheduler_is_built_from_the_training_schedule(model):
    for name, (class_name, extra) in SCHEDULERS.items():
        sched = make_scheduler(name, model.scheduler_config)
        assert type(sched).__name__ == class_name
        assert sched.config.num_train_timesteps == model.cfg.num_train_timesteps
        assert sched.config.beta_schedule == model.cfg.beta_schedule
        for k, v in extra.items():
            assert sched.config[k] == v
    with pytest.raises(ValueError, match="Unknown scheduler 'dpm'.*dpm\\+\\+2m-karras.*unipc"):
        make_scheduler("dpm", model.scheduler_config)


@pytest.mark.parametrize("scheduler", ["dpm++2m-karras", "euler-a", "ddpm"])
def test_same_seed_same_image_whatever_the_batch(model, scheduler):
    seeds = [7, 8, 9]
    together = sample_images(model, PROMPTS, seeds, Setting(guidance=3.0, steps=4, scheduler=scheduler), batch_size=3)
    alone = sample_images(model, PROMPTS, seeds, Setting(guidance=3.0, steps=4, scheduler=scheduler), batch_size=1)
    assert together.shape == (3, 3, 16, 16)
    # float noise of batched matmuls only (v-prediction with Euler a amplifies it to ~1e-4): far below
    # one 8-bit level (7.8e-3), far above it for another seed
    assert torch.allclose(together, alone, atol=2e-4)
    other_seed = sample_images(model, PROMPTS[:1], [10], Setting(guidance=3.0, steps=4, scheduler=scheduler))
    assert (other_seed[0] - together[0]).abs().max() > 1e-2


def test_each_distinct_prompt_is_encoded_once_and_reads_as_encoded(tmp_path, monkeypatch):
    model = tiny_model(tmp_path)
    direct = model.text_encoder.encode(PROMPTS)
    seen = []
    encode = model.text_encoder.encode
    monkeypatch.setattr(model.text_encoder, "encode",
                        lambda captions, **kw: seen.append(list(captions)) or encode(captions))
    first = model.encode_prompts(PROMPTS[:2] + PROMPTS[:1])
    again = model.encode_prompts(list(reversed(PROMPTS)))
    assert seen == [PROMPTS[:2], PROMPTS[2:]]  # the repeat within a call and the two known ones: not encoded again
    assert torch.allclose(first, direct[[0, 1, 0]], atol=1e-5) and torch.allclose(again, direct.flip(0), atol=1e-5)
    import dataclasses
    assert dataclasses.replace(model, guide="x").encoded is model.encoded  # settings' copies share what is known
    monkeypatch.setattr("helpers.model.PROMPTS_KEPT", 2)
    model.encode_prompts(["a fourth prompt"])
    assert list(model.encoded) == [PROMPTS[2], "a fourth prompt"]  # the oldest let go
    assert model.encode_prompts([]).shape == (0, *direct.shape[1:])


def test_guidance_one_skips_the_unconditional_half_and_guidance_changes_the_image(model):
    batches = []
    hook = model.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        plain = sample_images(model, PROMPTS[:2], [0, 1], Setting(guidance=1.0, steps=3, scheduler="ddim"))
        guided = sample_images(model, PROMPTS[:2], [0, 1], Setting(guidance=5.0, steps=3, scheduler="ddim"))
    finally:
        hook.remove()
    assert batches == [2] * 3 + [4] * 3  # one forward per step; CFG doubles the batch instead of a second call
    assert (plain - guided).abs().max() > 1e-3


def test_guidance_rescale_changes_the_result_and_stays_finite(model):
    plain = Setting(guidance=7.0, steps=3, scheduler="euler")
    rescaled = sample_images(model, PROMPTS[:1], [3], plain.replace(guidance_rescale=0.7))
    plain = sample_images(model, PROMPTS[:1], [3], plain)
    assert torch.isfinite(rescaled).all() and (plain - rescaled).abs().max() > 1e-4


def test_output_pils_are_rgb_at_the_output_size_with_crisp_pixels():
    x = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
    (im,) = to_output_pils(x, 256)
    assert im.mode == "RGB" and im.size == (256, 256)
    arr = np.asarray(im)
    assert (arr[:16, :16] == arr[0, 0]).all()  # each model pixel became one 16×16 block
    (small,) = to_output_pils(torch.zeros(1, 3, 512, 512), 256)
    assert small.size == (256, 256)


def test_grids_are_figures_with_one_panel_per_setting(model):
    import matplotlib.pyplot as plt

    fig = guidance_steps_grid(model, PROMPTS[:2], [1.0, 4.0], [2, 3], Setting(scheduler="ddim"), seed=0)
    assert len(fig.axes) == 4
    fig2 = scheduler_grid(model, PROMPTS[:2], Setting(steps=2), ["ddim", "euler-a", "dpm++2m-karras"], seed=0)
    assert [ax.get_ylabel() for ax in fig2.axes] == ["ddim", "euler-a", "dpm++2m-karras"]
    plt.close("all")


class CountingUNet(torch.nn.Module):
    """Wraps a U-Net and records the batch size of every call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config, self.batches = unet, unet.config, []

    def forward(self, x, t, **kw):
        self.batches.append(x.shape[0])
        return self.unet(x, t, **kw)


def test_guidance_interval_guides_only_inside_it(model):
    sampler = make_scheduler("ddim", model.scheduler_config)
    sampler.set_timesteps(6)
    sigmas = sorted(noise_level(sampler, t) for t in sampler.timesteps)
    middle = (sigmas[1], sigmas[3])  # (lo, hi]: exactly the 3rd and 4th lowest noise levels
    cond, uncond = model.encode_prompts(PROMPTS[:2]), model.encode_prompts([""])
    counting = CountingUNet(model.unet)
    run = lambda interval, g=3.0: sample_latents(counting, make_scheduler("ddim", model.scheduler_config), cond,
                                                 uncond, [1, 2], Setting(guidance=g, steps=6, scheduler="ddim",
                                                                         guidance_interval=interval),
                                                 latent_shape=model.latent_shape)
    everywhere = run(())
    assert guided_steps(model.scheduler_config, Setting(guidance=3.0, steps=6, scheduler="ddim",
                                                        guidance_interval=middle)) == (2, 6)
    assert counting.batches == [4] * 6  # uncond + cond in one forward at every step
    counting.batches.clear()
    partial = run(middle)
    assert sorted(counting.batches) == [2, 2, 2, 2, 4, 4]  # one call per image outside the interval
    counting.batches.clear()
    nowhere = run((1e9, 2e9))
    assert counting.batches == [2] * 6
    assert torch.allclose(nowhere, run((), g=1.0), atol=1e-6)  # no guided step = the plain conditional model
    assert not torch.allclose(partial, everywhere, atol=1e-3) and not torch.allclose(partial, nowhere, atol=1e-3)


@pytest.mark.parametrize("scheduler", ["dpm++2m-karras", "euler-a"])
def test_exported_pipeline_gives_our_image_for_the_same_seed(vae_model, tmp_path, scheduler):
    from diffusers import DiffusionPipeline

    from helpers.export import export_pipeline

    out = export_pipeline(vae_model, tmp_path / "pipe", scheduler=scheduler)
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == SCHEDULERS[scheduler][0]
    for seed, prompt in [(3, PROMPTS[0]), (11, PROMPTS[1])]:
        theirs = pipe(prompt, num_inference_steps=5, guidance_scale=3.0, height=16, width=16, output_type="pt",
                      generator=torch.Generator().manual_seed(seed)).images[0]
        ours = sample_images(vae_model, [prompt], [seed], Setting(guidance=3.0, steps=5, scheduler=scheduler))[0]
        assert torch.allclose((ours + 1) / 2, theirs, atol=1e-4), (ours / 2 + 0.5 - theirs).abs().max()


def test_export_of_a_pixel_space_model_says_why_not(model, tmp_path):
    from helpers.export import export_pipeline

    with pytest.raises(ValueError, match="pixel space.*VAE"):
        export_pipeline(model, tmp_path / "pipe")


def test_sd_baseline_offline_says_what_to_download(tmp_path):
    from helpers.hub import WeightsUnavailableError

    cfg = profile_config("sd-baseline", outputs_dir=str(tmp_path), sd_model="CompVis/stable-diffusion-v1-4")
    with pytest.raises(WeightsUnavailableError, match="CompVis/stable-diffusion-v1-4.*huggingface-cli download"):
        load_pipeline(cfg, cfg.pipeline, device="cpu")
