"""What choosing a setting and writing the test set cost, from the run config alone (before anything is sampled).

`selection_cost` counts the staged plan's cells, images and U-Net evaluations (helpers.staged) and the test set's;
helpers.budget's time plan reserves them (at the measured sampling speed) before it plans training. `flop_report` sets them against training in
FLOP: the U-Net's forward FLOP per evaluation (torch's counter on the meta device, attention included), plus the
autoencoder's decode per image, against 3 forward passes per training image.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import RunConfig
from .setting import FINAL, FIRST_SNAPSHOT, NO_GUIDE, Setting
from .staged import StagePlan, cells_per_stage, stage_sizes, unet_evals

HW6_TRAIN_STEPS = 36_535  # issue 22: 60 epochs of hw6's training images at batch 64
HW6_TEST_PROMPTS = 1_063  # the course's test.json


@dataclass
class SelectionCost:
    plan: StagePlan
    test_images: int
    test_evals_per_image: int

    @property
    def selection_images(self) -> int:
        return sum(self.plan.images)

    @property
    def selection_unet_evals(self) -> float:
        """At the sweep's average cost per image (which cells move on is not known before)."""
        return sum(self.plan.evals())

    @property
    def selection_unet_evals_max(self) -> float:
        """If the costliest cells were the ones to move on: the bound a budget can rely on."""
        costly = sorted(self.plan.evals_per_image, reverse=True)
        new = [n - (self.plan.sizes[k - 1] if k else 0) for k, n in enumerate(self.plan.sizes)]
        return sum(sum(costly[:c]) * m for c, m in zip(self.plan.counts, new))


def stand_in_snapshots(cfg: RunConfig, n_snapshots: int) -> list[str]:
    """The snapshot names a run of this config will have (n_snapshots of them, evenly spaced over training)."""
    if n_snapshots < 1:
        raise ValueError(f"n_snapshots={n_snapshots}: a run has at least one snapshot")
    return [f"step-{i + 1:06d}" for i in range(n_snapshots)]


def config_settings(cfg: RunConfig, n_snapshots: int) -> list[Setting]:
    """The sweep's cells as 04 will build them (helpers.selection.sweep_settings) for a run with n_snapshots."""
    from .selection import spread, sweep_settings

    names = stand_in_snapshots(cfg, n_snapshots)
    guides = [names[0] if g == FIRST_SNAPSHOT else g for g in cfg.sweep_guides]
    axes = {"snapshot": spread(names, cfg.sweep_snapshots) if names else [FINAL], "guidance": cfg.guidance_sweep,
            "steps": cfg.sweep_steps, "guidance_interval": [tuple(i) for i in cfg.sweep_intervals],
            "ema_length": cfg.sweep_ema_lengths, "guide": guides or [NO_GUIDE],
            "guide_weight": cfg.sweep_guide_weights}
    return sweep_settings(Setting.from_config(cfg), **axes)


def selection_cost(cfg: RunConfig, n_snapshots: int, n_test_prompts: int | None = None, *, settings=None,
                   n_judged: int | None = None, stage_prompts: list[int] | None = None) -> SelectionCost:
    """The staged selection and the test set of a run of `cfg` with `n_snapshots` snapshots, counted in images and
    U-Net evaluations. `n_test_prompts`: the test set's size (None: read from <data_dir>/test.json); `settings`,
    `n_judged`, `stage_prompts`: what 04 was given instead of the config's axes, sweep_prompts and stages."""
    from .sample import guided_steps
    from .staged import train_scheduler_config

    if n_test_prompts is None:
        from .data import load_prompts

        n_test_prompts = len(load_prompts(cfg.data_path / "test.json"))
    schedule = train_scheduler_config(cfg)
    evals = lambda s: unet_evals(s, *guided_steps(schedule, s))  # noqa: E731
    settings = config_settings(cfg, n_snapshots) if settings is None else list(settings)
    judged = n_judged or (min(cfg.sweep_prompts, n_test_prompts) if cfg.sweep_prompts else n_test_prompts)
    sizes = stage_sizes(cfg.sweep_stage_prompts if stage_prompts is None else stage_prompts, judged)
    plan = StagePlan(settings, sizes, cells_per_stage(len(settings), len(sizes), cfg.sweep_keep),
                [evals(s) for s in settings])
    return SelectionCost(plan, n_test_prompts, evals(Setting.from_config(cfg)))


def unet_gflop(cfg: RunConfig, latent_channels: int, latent_size: int, text_width: int) -> float:
    """Forward GFLOP per sample of the config's U-Net preset (built on the meta device: no memory, no weights)."""
    import torch

    from .unet import build_unet, forward_gflops

    with torch.device("meta"):
        unet = build_unet(cfg.unet_preset, latent_channels, text_width, latent_size)
    return forward_gflops(unet, latent_size, cfg.max_tokens)


def sd_vae_decode_gflop(latent_size: int) -> float:
    """GFLOP of one Stable Diffusion v1 VAE decode of a 4 x latent_size² latent (its published architecture)."""
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            vae.decode(torch.zeros(1, 4, latent_size, latent_size))
    return counter.get_total_flops() / 1e9


def flop_totals(cfg: RunConfig, n_snapshots: int, train_steps: int, n_test_prompts: int, *, gflop: float,
                decode_gflop: float, **given) -> tuple[SelectionCost, dict]:
    """(the counts, FLOP of training, selection (at the average and the costliest cells), test set, full sweep);
    `given`: selection_cost's settings / n_judged / stage_prompts."""
    cost = selection_cost(cfg, n_snapshots, n_test_prompts, **given)
    g, dec = gflop * 1e9, decode_gflop * 1e9
    return cost, {"training": train_steps * cfg.batch_size * 3 * g,
                  "selection": cost.selection_unet_evals * g + cost.selection_images * dec,
                  "selection_max": cost.selection_unet_evals_max * g + cost.selection_images * dec,
                  "test_set": cost.test_images * (cost.test_evals_per_image * g + dec),
                  "full_sweep": cost.plan.full_evals() * g + cost.plan.full_images * dec}


def flop_report(cfg: RunConfig, n_snapshots: int, train_steps: int, n_test_prompts: int, *, gflop: float,
                decode_gflop: float, **given) -> str:
    """The selection and the test set against training, in FLOP, with every count and product shown."""
    cost, f = flop_totals(cfg, n_snapshots, train_steps, n_test_prompts, gflop=gflop, decode_gflop=decode_gflop,
                          **given)
    plan = cost.plan
    train, sel, sel_max, test, full = f["training"], f["selection"], f["selection_max"], f["test_set"], f["full_sweep"]
    mean_evals = sum(plan.evals_per_image) / len(plan.evals_per_image)
    stages = "; ".join(f"stage {k + 1}: {c} cells x {n} prompts"
                       for k, (c, n) in enumerate(zip(plan.counts, plan.sizes)))
    return "\n".join([
        f"{cfg.profile}: {len(plan.settings)} cells ({n_snapshots} snapshots, "
        f"{len(set(s.snapshot for s in plan.settings))} swept), {mean_evals:.1f} U-Net evaluations per image on average; U-Net {gflop:.2f} GFLOP per evaluation, "
        f"decode {decode_gflop:.0f} GFLOP per image",
        f"training: {train_steps:,} steps x {cfg.batch_size} images x 3 x {gflop:.2f} GFLOP = {train:.3g} FLOP",
        f"staged selection ({stages}; keep {cfg.sweep_keep:g}): {plan.images} = {cost.selection_images:,} new images,"
        f" {cost.selection_unet_evals:,.0f} U-Net evaluations x {gflop:.2f} GFLOP + {cost.selection_images:,} decodes"
        f" x {decode_gflop:.0f} GFLOP = {sel:.3g} FLOP (at most {sel_max:.3g} if the costliest cells move on)",
        f"test set: {cost.test_images:,} images x ({cost.test_evals_per_image} evaluations x {gflop:.2f} + "
        f"{decode_gflop:.0f}) GFLOP = {test:.3g} FLOP",
        f"selection + test set = {sel + test:.3g} FLOP = {(sel + test) / train:.1%} of training "
        f"(at most {(sel_max + test) / train:.1%}); the full sweep it replaces ({len(plan.settings)} cells x "
        f"{plan.sizes[-1]:,} prompts = {plan.full_images:,} images) would be {full:.3g} FLOP = {full / train:.0%}"])


def hw6_flop_report(n_snapshots: int = 9, **overrides) -> str:
    """flop_report of the hw6 profile: nine snapshots (every 4,000 of 36,535 steps), 1,063 test prompts, the
    hw6-recipe U-Net at 4 x 32² latents with 77 CLIP tokens of width 512, the SD VAE's decode to 256 px."""
    from .config import profile_config

    cfg = profile_config("hw6", **overrides)
    return flop_report(cfg, n_snapshots, HW6_TRAIN_STEPS, HW6_TEST_PROMPTS, gflop=unet_gflop(cfg, 4, 32, 512),
                       decode_gflop=sd_vae_decode_gflop(32))



def run_flop_report(cfg: RunConfig, model, settings=None, n_judged: int | None = None,
                    stage_prompts: list[int] | None = None) -> str:
    """flop_report for a trained run as 04 sees it: its snapshots, its training steps, its sweep (`settings` on
    `n_judged` prompts; None: the config's), its U-Net measured by torch's FLOP counter, and the SD VAE's decode
    (nothing for pixel-space profiles)."""
    from .data import load_prompts
    from .weights import snapshot_step
    from .unet import forward_gflops

    names = cfg.layout.snapshot_names()
    steps = max([snapshot_step(n) for n in names] + [cfg.max_steps if not cfg.max_epochs else 0])
    latent = model.latent_shape
    gflop = forward_gflops(model.unet, latent[-1], cfg.max_tokens)
    decode = sd_vae_decode_gflop(latent[-1]) if cfg.autoencoder != "identity" else 0.0
    n_test = len(load_prompts(cfg.data_path / "test.json"))
    return flop_report(cfg, max(len(names), 1), steps, n_test, gflop=gflop, decode_gflop=decode, settings=settings,
                       n_judged=n_judged, stage_prompts=stage_prompts)


def main() -> None:
    """`python -m helpers.selection_cost`: the hw6 selection and test set against training, in FLOP."""
    print(hw6_flop_report())


if __name__ == "__main__":
    main()
