"""The notebook's guidance playground: an ipywidgets panel that samples one prompt at a few seeds."""
from __future__ import annotations

import io

from .images import image_grid, tensor_to_pil
from .sample import SCHEDULERS, sample_images


def preview(model, prompt: str, *, guidance: float, steps: int, scheduler: str, seed: int, n: int = 4,
            cell: int = 128) -> Image.Image:
    """A row of `n` samples of one prompt (seeds seed … seed+n-1): what the widget's button shows."""
    images = sample_images(model, [prompt] * n, range(seed, seed + n), guidance=guidance, steps=steps,
                           scheduler=scheduler, batch_size=n)
    return image_grid([tensor_to_pil(x) for x in images], cols=n, cell=cell)


def make_panel(model, *, prompt: str = "", guidance: float | None = None, steps: int | None = None,
               scheduler: str | None = None, seed: int = 0, n: int = 4):
    """An ipywidgets box: prompt, guidance, steps, scheduler, seed and a Generate button that previews inline."""
    import ipywidgets as w

    cfg = model.cfg
    controls = dict(
        prompt=w.Text(value=prompt, description="prompt", layout=w.Layout(width="600px")),
        guidance=w.FloatSlider(value=guidance if guidance is not None else cfg.guidance, min=1.0, max=12.0,
                               step=0.5, description="guidance"),
        steps=w.IntSlider(value=steps or cfg.sample_steps, min=2, max=100, description="steps"),
        scheduler=w.Dropdown(options=list(SCHEDULERS), value=scheduler or cfg.scheduler, description="scheduler"),
        seed=w.IntText(value=seed, description="seed"),
    )
    button, status = w.Button(description="Generate", button_style="primary"), w.Label()
    image = w.Image(format="png")

    def on_click(_=None):
        status.value = "sampling…"
        grid = preview(model, controls["prompt"].value, guidance=controls["guidance"].value,
                       steps=controls["steps"].value, scheduler=controls["scheduler"].value,
                       seed=controls["seed"].value, n=n)
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        image.value = buf.getvalue()
        status.value = f"seeds {controls['seed'].value}…{controls['seed'].value + n - 1}"

    button.on_click(on_click)
    return w.VBox([controls["prompt"], w.HBox([controls["guidance"], controls["steps"]]),
                   w.HBox([controls["scheduler"], controls["seed"]]), w.HBox([button, status]), image])
