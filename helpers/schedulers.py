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

# The schedulers that can sample a flow-matching run (prediction_type "flow_prediction"), by the same names: each
# steps from t = 1 (pure noise) with the U-Net's velocity (the others would read it as eps or v). Flow sigmas ignore
# timestep spacing; steps_offset=1 only spares the warning StableDiffusionPipeline gives on load.
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "steps_offset": 1}
FLOW_SCHEDULERS: dict[str, tuple[str, dict]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, **FLOW}),
    "unipc": ("UniPCMultistepScheduler", FLOW),
}


def is_flow(scheduler_config) -> bool:
    return dict(scheduler_config).get("prediction_type") == "flow_prediction"


def marked_flow(scheduler):
    """`scheduler` with prediction_type "flow_prediction" in its config, which FlowMatchEulerDiscreteScheduler lacks:
    how a flow schedule's config, saved or handed on, says what the U-Net predicts."""
    if "prediction_type" not in scheduler.config:
        scheduler.register_to_config(prediction_type="flow_prediction")
    return scheduler


def schedulers_for(train_scheduler_config) -> list[str]:
    """The names of SCHEDULERS that can sample a run with this training schedule."""
    return list(FLOW_SCHEDULERS if is_flow(train_scheduler_config) else SCHEDULERS)


def make_scheduler(name: str, train_scheduler_config: dict):
    """A sampling scheduler that shares the training run's noise schedule (betas, prediction type)."""
    import inspect

    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    flow = is_flow(train_scheduler_config)
    if flow and name not in FLOW_SCHEDULERS:
        raise ValueError(f"Scheduler {name!r} cannot sample a flow-matching run (prediction_type "
                         f"'flow_prediction'); choose one of {', '.join(FLOW_SCHEDULERS)}")
    class_name, extra = FLOW_SCHEDULERS[name] if flow else SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    config = {k: v for k, v in dict(train_scheduler_config).items() if not k.startswith("_")}
    if not flow:
        return cls.from_config(config, **{**COMMON_KWARGS, **extra})
    # only what the class takes: the flow classes' configs share little, and diffusers warns of the rest
    config = {k: v for k, v in config.items() if k in inspect.signature(cls.__init__).parameters}
    return marked_flow(cls.from_config(config, **extra))
