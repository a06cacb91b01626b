"""The sampling schedulers by name: diffusers classes that share the training run's noise schedule.

Its own room so that `Setting` (which names a scheduler) can check the name without importing the sampler.
"""
from __future__ import annotations

# name -> (diffusers class, kwargs on top of the training schedule's config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # PLMS: Runge-Kutta warm-up steps are wasteful at 25 steps
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    # Karras sigmas span the training schedule's sigma range; on the cosine schedule that is ~2e4 and
    # about 10 of 25 steps land at t >= 998, so pixel-space cosine runs do better with plain "dpm++2m".
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler",
                       {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

# For every sampler: "trailing" spacing starts at the last training step (pure noise), which the default
# "leading" spacing misses at few steps (25 steps start at t=961, where the cosine schedule still keeps
# 6 % of the signal, so samples come out washed-out; Lin et al. 2023, "Common Diffusion Noise Schedules
# and Sample Steps are Flawed"). steps_offset=1 is what StableDiffusionPipeline forces on load anyway,
# so an exported pipeline samples exactly as we do.
COMMON_KWARGS = {"timestep_spacing": "trailing", "steps_offset": 1}


def make_scheduler(name: str, train_scheduler_config: dict):
    """A sampling scheduler that shares the training run's noise schedule (betas, prediction type)."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    class_name, extra = SCHEDULERS[name]
    config = {k: v for k, v in dict(train_scheduler_config).items() if not k.startswith("_")}
    return getattr(diffusers, class_name).from_config(config, **{**COMMON_KWARGS, **extra})
