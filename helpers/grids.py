"""Pictures that show what the sampling settings do: guidance × steps, and one row per scheduler."""
from __future__ import annotations

import torch
from .progress import progress_bar

from .images import image_grid, pixel_cell, tensor_to_pil
from .sample import sample_images
from .schedulers import schedulers_for
from .setting import Setting


def _show_row(ax, images: torch.Tensor, title: str = "") -> None:
    strip = image_grid([tensor_to_pil(x) for x in images], cols=len(images), cell=pixel_cell(images.shape[-1], 64))
    ax.imshow(strip, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def guidance_steps_grid(model, prompts, guidances, steps_list, setting: Setting, seed: int = 0):
    """matplotlib Figure: rows = guidance scales, columns = step counts (the rest of `setting` fixed), each cell
    one strip of the prompts."""
    import matplotlib.pyplot as plt

    prompts = list(prompts)
    seeds = [seed + i for i in range(len(prompts))]
    fig, axes = plt.subplots(len(guidances), len(steps_list), squeeze=False,
                             figsize=(1.2 * len(prompts) * len(steps_list) + 1, 1.4 * len(guidances) + 0.8))
    for r, g in enumerate(progress_bar(guidances, desc="guidance × steps grid")):
        for c, s in enumerate(steps_list):
            images = sample_images(model, prompts, seeds, setting.replace(guidance=g, steps=s))
            _show_row(axes[r][c], images, f"{s} steps" if r == 0 else "")
        axes[r][0].set_ylabel(f"guidance {g:g}")
    fig.suptitle(f"{setting.scheduler}: guidance × steps (seeds {seeds[0]}…{seeds[-1]})")
    fig.tight_layout()
    return fig


def scheduler_grid(model, prompts, setting: Setting, schedulers=None, seed: int = 0):
    """matplotlib Figure: one row per scheduler (the rest of `setting` fixed), same prompts and seeds, so only
    the solver differs."""
    import matplotlib.pyplot as plt

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    schedulers = list(schedulers or schedulers_for(model.scheduler_config))
    seeds = [seed + i for i in range(len(prompts))]
    fig, axes = plt.subplots(len(schedulers), 1, squeeze=False,
                             figsize=(1.2 * len(prompts) + 1.5, 1.3 * len(schedulers) + 0.8))
    for r, name in enumerate(progress_bar(schedulers, desc="scheduler grid")):
        images = sample_images(model, prompts, seeds, setting.replace(scheduler=name))
        _show_row(axes[r][0], images)
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"{setting.steps} steps, guidance {setting.guidance:g}")
    fig.tight_layout()
    return fig


def data_grid(records, resolution: int, n: int = 12, seed: int = 0, cols: int = 4):
    """matplotlib Figure: n random training images as the model sees them (square, `resolution` px), enlarged by
    nearest neighbour (every pixel a crisp square), titled by file name and caption wrapped at word boundaries."""
    import random
    import textwrap

    import matplotlib.pyplot as plt

    from .images import square_resize, try_load_rgb

    shown = random.Random(seed).sample(list(records), min(n, len(records)))
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.4 * rows), squeeze=False)
    for ax, r in zip(axes.flat, shown):
        im, problem = try_load_rgb(r.path)
        if im is None:  # the cache leaves it out of training too, and lists it
            print(problem)
            ax.text(0.5, 0.5, "cannot decode", ha="center", va="center")
        else:
            ax.imshow(square_resize(im, resolution), interpolation="nearest")
        caption = textwrap.wrap(r.captions[0], 34, break_long_words=False, break_on_hyphens=False)
        ax.set_title("\n".join([r.path.name] + caption[:3] + (["…"] if len(caption) > 3 else [])), fontsize=10)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig
