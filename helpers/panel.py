"""The notebook's guidance playground: an ipywidgets panel that samples one prompt at a few seeds.

Every click reads and checks all controls first; a bad value, or any error while sampling, is shown in the
panel itself (a red line, the traceback folded underneath), and the button is usable again afterwards.
"""
from __future__ import annotations

import html
import io
import math
import time
import traceback

from PIL import Image

from .images import image_grid, tensor_to_pil
from .sample import SCHEDULERS, make_scheduler, noise_level, sample_images
from .setting import Setting

GUIDANCE_RANGE = (1.0, 12.0)
STEPS_RANGE = (1, 100)
SEED_LIMIT = 2**63  # seeds are signed 64-bit integers downstream (torch generators, numpy)
DEFAULT_INTERVAL = (0.3, 5.0)  # a starting point for the "guide from / to sigma" boxes when the run sets none


class BadSetting(ValueError):
    """A panel control holds a value the sampler cannot use; the message names each one."""


def preview(model, prompt: str, *, guidance: float, steps: int, scheduler: str, seed: int, n: int = 4,
            cell: int = 128, guidance_interval=None, on_step=None) -> Image.Image:
    """A row of `n` samples of one prompt (seeds seed … seed+n-1): what the widget's button shows."""
    setting = Setting(guidance=guidance, steps=steps, scheduler=scheduler, guidance_interval=guidance_interval or (),
                      **held_weights(model))
    images = sample_images(model, [prompt] * n, range(seed, seed + n), setting, batch_size=n, on_step=on_step)
    return image_grid([tensor_to_pil(x) for x in images], cols=n, cell=cell)


def held_weights(model) -> dict:
    """The EMA length and guide the model was loaded with (helpers.selection.with_setting): the panel samples them."""
    return dict(ema_length=getattr(model, "ema_length", 0.0), guide=getattr(model, "guide", ""),
                guide_weight=getattr(model, "guide_weight", 1.0))


def check_settings(values: dict, n: int) -> dict:
    """The panel's raw control values as `preview` keyword arguments, or BadSetting naming every bad one."""
    problems = [p for p in Setting(guidance=values["guidance"], steps=values["steps"],
                                   scheduler=values["scheduler"]).problems()]
    seed = values["seed"].strip() if isinstance(values["seed"], str) else values["seed"]
    try:
        seed = int(seed)
    except ValueError:
        problems.append(f"seed={seed!r} is not a whole number")
    else:
        if not 0 <= seed <= SEED_LIMIT - n:
            problems.append(f"seed={seed} is outside 0…{SEED_LIMIT - n} (the {n} seeds seed…seed+{n - 1} "
                            f"must stay below 2**63)")
    interval = None
    if not values["everywhere"]:
        interval = (values["sigma_lo"], values["sigma_hi"])
        if not (all(map(math.isfinite, interval)) and 0 <= interval[0] < interval[1]):
            problems.append(f"guide from σ={interval[0]:g} to σ={interval[1]:g}: needs 0 ≤ from < to")
    if problems:
        raise BadSetting("; ".join(problems))
    return dict(prompt=values["prompt"], guidance=float(values["guidance"]), steps=int(values["steps"]),
                scheduler=values["scheduler"], seed=seed, guidance_interval=interval)


def make_panel(model, *, prompt: str = "", guidance: float | None = None, steps: int | None = None,
               scheduler: str | None = None, seed: int = 0, n: int = 4):
    """An ipywidgets box: prompt, guidance, steps, scheduler, seed, guidance interval and a Generate button
    that previews `n` seeds inline. Starting values the sampler cannot use raise BadSetting here; legal ones
    outside the sliders' usual ranges widen them."""
    import ipywidgets as w

    c = _controls(model, prompt=prompt, guidance=guidance, steps=steps, scheduler=scheduler, seed=seed, n=n)
    button = w.Button(description="Generate", button_style="primary")
    progress = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="200px", visibility="hidden"))
    status, error = w.Label(), w.HTML()
    details = w.Accordion(children=[w.HTML()], titles=("traceback",), selected_index=None,
                          layout=w.Layout(display="none"))
    # hidden until the first grid (no broken-image icon), then at its own size rather than stretched to the panel
    image = w.Image(format="png", layout=w.Layout(display="none", align_self="flex-start"))

    def show_error(message: str, trace: str = ""):
        first_line = message.splitlines()[0] + (" …" if "\n" in message else "") if message else ""
        error.value = f'<span style="color:#c62828">{html.escape(first_line)}</span>' if message else ""
        details.children[0].value = f"<pre>{html.escape(trace)}</pre>"
        details.layout.display = "flex" if trace else "none"
        status.value = ""

    def on_step(done: int, total: int):
        progress.max, progress.value = total, done

    def on_click(_=None):
        show_error("")
        button.disabled, progress.value, progress.layout.visibility = True, 0, "visible"
        status.value = "sampling…"
        began = time.perf_counter()
        try:
            settings = check_settings({k: v.value for k, v in c.items()}, n)
            buf = io.BytesIO()
            preview(model, **settings, n=n, on_step=on_step).save(buf, format="PNG")
            image.value, image.layout.display = buf.getvalue(), ""
            unconditional = "" if settings["prompt"].strip() else " (empty prompt: unconditional samples)"
            status.value = (f"seeds {settings['seed']}…{settings['seed'] + n - 1}, "
                            f"{time.perf_counter() - began:.1f} s{unconditional}")
        except BadSetting as e:  # the message says it all
            show_error(f"Cannot sample: {e}")
        except KeyboardInterrupt:  # the kernel's stop button
            show_error("Interrupted")
        except Exception as e:
            show_error(f"{type(e).__name__}: {e}", traceback.format_exc())
        finally:
            button.disabled, progress.layout.visibility = False, "hidden"

    button.on_click(on_click)
    return w.VBox([c["prompt"], w.HBox([c["guidance"], c["steps"]]), w.HBox([c["scheduler"], c["seed"]]),
                   w.HBox([c["everywhere"], c["sigma_lo"], c["sigma_hi"], _sigma_range(model)]),
                   w.HBox([button, progress, status]), error, details, image])


def _controls(model, *, prompt, guidance, steps, scheduler, seed, n) -> dict:
    """The panel's input widgets by setting name, at the given starting values (None: the run's config)."""
    import ipywidgets as w

    cfg = model.cfg
    lo, hi = tuple(cfg.guidance_interval) or DEFAULT_INTERVAL
    start = check_settings(dict(prompt=prompt, guidance=cfg.guidance if guidance is None else guidance,
                                steps=cfg.sample_steps if steps is None else steps,
                                scheduler=scheduler or cfg.scheduler, seed=seed,
                                everywhere=not cfg.guidance_interval, sigma_lo=lo, sigma_hi=hi), n)
    # the sliders' usual ranges, widened to any legal starting value: the run's setting is never refused here
    g_lo, g_hi = min(GUIDANCE_RANGE[0], start["guidance"]), max(GUIDANCE_RANGE[1], start["guidance"])
    return dict(
        prompt=w.Text(value=prompt, description="prompt", layout=w.Layout(width="600px")),
        guidance=w.FloatSlider(value=start["guidance"], min=g_lo, max=g_hi, step=0.5, description="guidance"),
        steps=w.IntSlider(value=start["steps"], min=STEPS_RANGE[0], max=max(STEPS_RANGE[1], start["steps"]),
                          description="steps"),
        scheduler=w.Dropdown(options=list(SCHEDULERS), value=start["scheduler"], description="scheduler"),
        # Text, not IntText: the browser holds numbers as doubles, which round seeds above 2**53
        seed=w.Text(value=str(start["seed"]), description="seed"),
        everywhere=w.Checkbox(value=not cfg.guidance_interval, description="guide at every step", indent=False,
                              layout=w.Layout(width="auto")),
        sigma_lo=w.FloatText(value=lo, description="or from σ", layout=w.Layout(width="180px")),
        sigma_hi=w.FloatText(value=hi, description="to σ", layout=w.Layout(width="180px")),
    )


def _sigma_range(model):
    """A grey note of the noise levels σ the model was trained on: the range the interval boxes make sense in."""
    import ipywidgets as w

    schedule = make_scheduler("ddpm", model.scheduler_config)
    last_t = schedule.config.num_train_timesteps - 1
    return w.HTML(f'<span style="color:gray">σ runs {noise_level(schedule, 0):.3g} … '
                  f'{noise_level(schedule, last_t):.3g} on this schedule</span>')
