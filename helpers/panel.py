"""The notebook's guidance playground: an ipywidgets panel that samples one prompt at a few seeds, in rows.

Guidance and steps take one value or several ("1, 2, 3, 5"): each combination (× every snapshot, if asked) is
one captioned row on the same seeds, so only the setting differs between rows. Earlier rows move to a history
strip. Every click reads and checks all controls first (helpers.panel_controls); a bad value, or any error while
sampling, is a red line in the panel (the traceback folded underneath), and the button is usable again.
Sampling runs on a thread, so Cancel (and Kernel → Interrupt) can stop it between two denoising steps.
"""
from __future__ import annotations

import base64
import html
import io
import signal
import threading
import time
import traceback

from .images import image_grid, pixel_cell, tensor_to_pil
from .panel_controls import AMBER, GREY, RED, BadSetting, as_text, guided_note, read_rows, start_problems, token_note
from .sample import SCHEDULERS, guided_steps, make_scheduler, noise_level, sample_images
from .selection import chosen_setting, with_snapshot
from .setting import FINAL, Setting

COMPARE_GUIDANCE = (1.0, 2.0, 3.0, 5.0)
HISTORY_ROWS = 8  # earlier rows kept in the history strip, newest first
CACHED_UNETS = 3  # snapshot U-Nets kept loaded besides the one the panel was given
ROW_CELL, HISTORY_CELL = 96, 48  # about this many px per image; the real size is a whole multiple of the sprite
__all__ = ["BadSetting", "Panel", "make_panel", "row_html", "sample_row"]


class Cancelled(Exception):
    """Raised from the sampler's on_step when Cancel or Kernel → Interrupt asked to stop."""


def sample_row(model, prompt: str, seeds: list[int], setting: Setting, on_step=None):
    """[n, 3, H, W] images of one prompt at `seeds` with `setting` (the model holds its snapshot), one batch."""
    return sample_images(model, [prompt] * len(seeds), seeds, setting, batch_size=len(seeds), on_step=on_step)


def row_html(images, caption: str, cell: int = ROW_CELL) -> str:
    """One captioned row as HTML: a PNG upscaled by a whole factor, drawn pixelated (no browser smoothing)."""
    strip = image_grid([tensor_to_pil(x) for x in images], cols=len(images),
                       cell=pixel_cell(images.shape[-1], cell))
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return (f'<div class="monster-row" style="margin:4px 0"><div class="monster-caption" '
            f'style="font:12px monospace">{html.escape(caption)}</div>'
            f'<img src="{src}" width="{strip.width}" height="{strip.height}" '
            f'style="image-rendering:pixelated;image-rendering:crisp-edges"></div>')


def caption(setting: Setting, seeds: list[int], guided: tuple[int, int]) -> str:
    return f"{setting.label()} · guided at {guided[0]} of {guided[1]} steps · seeds {seeds[0]}…{seeds[-1]}"


def make_panel(model, *, prompt: str = "", setting: Setting | None = None, guidance=None, steps=None,
               scheduler=None, seed=0, snapshot=None, n: int = 4, cfg=None) -> "Panel":
    """The guidance playground for `model`, which holds the U-Net of `setting.snapshot` (default: the run's
    chosen setting, helpers.selection.chosen_setting). guidance / steps / scheduler / seed / snapshot override
    the setting's; guidance and steps may be lists (compare mode). Never raises for a bad value: the panel
    opens with the value in its box and a red line naming the problem."""
    cfg = cfg or model.cfg
    chosen, source = chosen_setting(cfg)
    setting = setting or chosen
    problems = start_problems(prompt=prompt, guidance=guidance, steps=steps, scheduler=scheduler, seed=seed,
                              snapshot=snapshot)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        problems.append(f"make_panel(n={n!r}): expected a whole number ≥ 1; showing 4 seeds")
        n = 4
    start = dict(prompt=prompt, guidance=guidance, steps=steps, scheduler=scheduler, seed=seed, snapshot=snapshot)
    start = {k: (v if v is not None else getattr(setting, k, "")) for k, v in start.items()}
    return Panel(model, cfg, setting, start, chosen=(chosen, source), n=n, problems=problems)


def _widgets():
    import ipywidgets

    return ipywidgets


class Panel(_widgets().VBox):
    """The panel's widgets and what its buttons do; see make_panel."""

    def __init__(self, model, cfg, holds: Setting, start: dict, *, chosen: tuple[Setting, str], n: int,
                 problems: list[str]):
        self.model, self.cfg, self.n, self.chosen = model, cfg, n, chosen
        self.models = {holds.snapshot: model}  # snapshot name -> model with that U-Net
        self.cancel_event, self.thread = threading.Event(), None
        self.current, self.history = [], []  # (images, caption) of the last click's rows, and of earlier ones
        self.c = self._controls(start, holds)
        self._outputs()
        super().__init__(self._layout())
        self._wire()
        self.show_error("; ".join(problems + self._snapshot_problem(start["snapshot"])))
        self.update_notes()

    # ------------------------------------------------------------ building

    def _snapshot_options(self) -> list[tuple[str, str]]:
        chosen, source = self.chosen
        names = self.cfg.layout.candidates()
        names += [name for name in self.models if name not in names]
        mark = " ← the selection's choice" if "selection" in source else " ← the run config's"
        return [(name + (" (final EMA U-Net)" if name == FINAL else "") + (mark if name == chosen.snapshot else ""),
                 name) for name in names]

    def _controls(self, start: dict, holds: Setting) -> dict:
        w = _widgets()
        options = self._snapshot_options()
        names = [name for _, name in options]
        snapshot = start["snapshot"] if start["snapshot"] in names else holds.snapshot
        lo, hi = tuple(self.cfg.guidance_interval) or (0.3, 5.0)  # a start for the σ boxes when the run has none
        text = dict(layout=w.Layout(width="260px"), continuous_update=True)
        return dict(
            prompt=w.Text(value=str(start["prompt"]), description="prompt", layout=w.Layout(width="640px"),
                          continuous_update=True),
            snapshot=w.Dropdown(options=options, value=snapshot, description="snapshot",
                                layout=w.Layout(width="420px")),
            all_snapshots=w.Checkbox(value=False, description="every snapshot (one row each)", indent=False,
                                     layout=w.Layout(width="auto")),
            guidance=w.Text(value=as_text(start["guidance"]), description="guidance", placeholder="3 or 1, 2, 3, 5",
                            **text),
            steps=w.Text(value=as_text(start["steps"]), description="steps", placeholder="10 or 10, 25", **text),
            scheduler=w.Dropdown(options=list(SCHEDULERS), description="scheduler",
                                 value=start["scheduler"] if start["scheduler"] in SCHEDULERS else holds.scheduler),
            # Text, not IntText: the browser holds numbers as doubles, which round seeds above 2**53
            seed=w.Text(value=as_text(start["seed"]), description="seed", **text),
            everywhere=w.Checkbox(value=not holds.guidance_interval, description="guide at every step",
                                  indent=False, layout=w.Layout(width="auto")),
            sigma_lo=w.Text(value=as_text(holds.guidance_interval[0] if holds.guidance_interval else lo),
                            description="or from σ", layout=w.Layout(width="180px")),
            sigma_hi=w.Text(value=as_text(holds.guidance_interval[1] if holds.guidance_interval else hi),
                            description="to σ", layout=w.Layout(width="180px")),
        )

    def _outputs(self):
        w = _widgets()
        self.generate_button = w.Button(description="Generate", button_style="primary")
        self.compare_button = w.Button(description="Compare guidance " + ", ".join(f"{g:g}" for g in COMPARE_GUIDANCE),
                                       layout=w.Layout(width="auto"))
        self.cancel_button = w.Button(description="Cancel", button_style="warning", disabled=True)
        self.reset_button = w.Button(description="reset to chosen", layout=w.Layout(width="auto"))
        self.progress = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="200px", visibility="hidden"))
        self.status, self.error = w.Label(), w.HTML()
        self.tokens, self.guided, self.source = w.HTML(), w.HTML(), w.HTML()
        self.details = w.Accordion(children=[w.HTML()], titles=("traceback",), selected_index=None,
                                   layout=w.Layout(display="none"))
        self.rows, self.history_box = w.HTML(), w.HTML()

    def _layout(self) -> list:
        w, c = _widgets(), self.c
        schedule = make_scheduler("ddpm", self.model.scheduler_config)
        sigma_range = w.HTML(f'<span style="color:{GREY}">σ runs {noise_level(schedule, 0):.3g} … '
                             f'{noise_level(schedule, schedule.config.num_train_timesteps - 1):.3g} '
                             f'on this schedule</span>')
        return [w.HBox([c["prompt"], self.tokens]), w.HBox([c["snapshot"], self.reset_button, c["all_snapshots"]]),
                self.source, w.HBox([c["guidance"], c["steps"]]), w.HBox([c["scheduler"], c["seed"]]),
                w.HBox([c["everywhere"], c["sigma_lo"], c["sigma_hi"], sigma_range]), self.guided,
                w.HBox([self.generate_button, self.compare_button, self.cancel_button, self.progress, self.status]),
                self.error, self.details, self.rows, self.history_box]

    def _wire(self):
        self.generate_button.on_click(lambda _: self.generate())
        self.compare_button.on_click(lambda _: self.compare())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.reset_button.on_click(lambda _: self.reset_to_chosen())
        for name in ("prompt", "guidance", "steps", "scheduler", "everywhere", "sigma_lo", "sigma_hi",
                     "snapshot", "all_snapshots", "seed"):
            self.c[name].observe(lambda _: self.update_notes(), names="value")

    def _repr_mimebundle_(self, **kwargs):
        # a saved or headless copy has no kernel behind the widget: say so instead of a VBox(children=...) repr
        bundle = super()._repr_mimebundle_(**kwargs) or {}
        bundle["text/plain"] = ("[guidance playground: an interactive panel; open this notebook in JupyterLab and "
                                "run it to use it]")
        return bundle

    # ------------------------------------------------------------ notes while typing

    def _snapshot_problem(self, name) -> list[str]:
        names = [n for _, n in self.c["snapshot"].options]
        if not isinstance(name, str) or name in names:
            return []
        return [f"snapshot {name!r} is not in run {self.cfg.run_name!r} (it has {', '.join(names)}); "
                f"showing {self.c['snapshot'].value}"]

    def update_notes(self):
        """Token count and "guided at k of n steps" for what the boxes hold now; σ boxes off when unused."""
        every = self.c["everywhere"].value
        self.c["sigma_lo"].disabled = self.c["sigma_hi"].disabled = every
        self.tokens.value = token_note(self.model.text_encoder, self.c["prompt"].value)[0]
        chosen, source = self.chosen
        self.source.value = (f'<span style="color:{GREY}">chosen setting, from {html.escape(source)}: '
                             f'{html.escape(chosen.label())}</span>')
        try:
            rows, _ = read_rows(self.values(), self.n, self.model.scheduler_config)
            self.guided.value = f'<span style="color:{GREY}">{guided_note(self.model.scheduler_config, rows)}</span>'
        except BadSetting as e:
            self.guided.value = f'<span style="color:{AMBER}">{html.escape(str(e))}</span>'

    def values(self) -> dict:
        c = self.c
        snapshots = [n for _, n in c["snapshot"].options] if c["all_snapshots"].value else [c["snapshot"].value]
        return dict(snapshots=snapshots, **{k: c[k].value for k in (
            "guidance", "steps", "scheduler", "seed", "everywhere", "sigma_lo", "sigma_hi")})

    # ------------------------------------------------------------ buttons

    def reset_to_chosen(self):
        chosen = self.chosen[0]
        c = self.c
        if chosen.snapshot in [n for _, n in c["snapshot"].options]:
            c["snapshot"].value = chosen.snapshot
        c["guidance"].value, c["steps"].value = as_text(chosen.guidance), as_text(chosen.steps)
        c["scheduler"].value, c["everywhere"].value = chosen.scheduler, not chosen.guidance_interval
        if chosen.guidance_interval:
            c["sigma_lo"].value, c["sigma_hi"].value = map(as_text, chosen.guidance_interval)
        c["all_snapshots"].value = False

    def compare(self):
        self.c["guidance"].value = as_text(list(COMPARE_GUIDANCE))
        self.generate()

    def cancel(self):
        self.cancel_event.set()
        self.status.value = "cancelling…"

    def generate(self):
        """Check every control, then sample the rows on a thread (one sample_images call per row)."""
        if self.thread is not None and self.thread.is_alive():
            return
        self.show_error("")
        try:
            rows, seeds = read_rows(self.values(), self.n, self.model.scheduler_config)
        except BadSetting as e:
            self.show_error(f"Cannot sample: {e}")
            return
        self.cancel_event.clear()
        _stop_on_interrupt(self.cancel_event)
        self.history, self.current = (self.current + self.history)[:HISTORY_ROWS], []
        self._show_history()
        self._busy(True, total=sum(s.steps for s in rows))
        self.thread = threading.Thread(target=self._sample_rows, args=(rows, self.c["prompt"].value, seeds),
                                       daemon=True, name="guidance panel")
        self.thread.start()

    def wait(self, timeout: float | None = None):
        """Block until the current Generate has finished (tests, scripts)."""
        if self.thread is not None:
            self.thread.join(timeout)

    # ------------------------------------------------------------ sampling (on the thread)

    def _sample_rows(self, rows: list[Setting], prompt: str, seeds: list[int]):
        began, done = time.perf_counter(), [0]
        try:
            for s in rows:
                model = self._model_for(s.snapshot)
                images = sample_row(model, prompt, seeds, s, on_step=self._ticker(done))
                self.current.append((images, caption(s, seeds, guided_steps(model.scheduler_config, s))))
                self.rows.value = '<div class="monster-rows">' + "".join(row_html(*r) for r in self.current) + "</div>"
            unconditional = "" if prompt.strip() else " (empty prompt: unconditional samples)"
            self.status.value = f"{len(rows)} row(s) in {time.perf_counter() - began:.1f} s{unconditional}"
        except Cancelled:
            self.status.value = f"cancelled after {done[0]} steps; {len(self.current)} of {len(rows)} rows done"
        except Exception as e:  # noqa: BLE001 - shown in the panel; the kernel must go on
            self.show_error(f"{type(e).__name__}: {e}", traceback.format_exc())
        finally:
            self._busy(False)
            _RUNNING.discard(self.cancel_event)

    def _ticker(self, done: list[int]):
        def on_step(step: int, total: int):
            if self.cancel_event.is_set():
                raise Cancelled
            done[0] += 1
            self.progress.value = done[0]
        return on_step

    def _model_for(self, snapshot: str):
        if snapshot not in self.models:
            self.status.value = f"loading {snapshot}…"
            loaded = [k for k in self.models if self.models[k] is not self.model]
            if len(loaded) >= CACHED_UNETS:
                del self.models[loaded[0]]
            self.models[snapshot] = with_snapshot(self.model, self.cfg, snapshot)
            self.status.value = "sampling…"
        return self.models[snapshot]

    # ------------------------------------------------------------ showing

    def _busy(self, busy: bool, total: int = 1):
        self.generate_button.disabled = self.compare_button.disabled = busy
        self.cancel_button.disabled = not busy
        self.progress.layout.visibility = "visible" if busy else "hidden"
        if busy:
            self.progress.max, self.progress.value, self.status.value = total, 0, "sampling…"
            self.rows.value = ""  # the last click's rows are in the history strip now

    def _show_history(self):
        if self.history:
            self.history_box.value = (f'<details class="monster-history" open><summary style="color:{GREY}">'
                                      'earlier rows, newest first'
                                      '</summary>' + "".join(row_html(images, text, HISTORY_CELL)
                                                             for images, text in self.history) + "</details>")

    def show_error(self, message: str, trace: str = ""):
        """A red first line (traceback folded below); an error also dims the last rows: they are stale."""
        first = message.splitlines()[0] + (" …" if "\n" in message else "") if message else ""
        self.error.value = f'<span style="color:{RED}">{html.escape(first)}</span>' if message else ""
        self.details.children[0].value = f"<pre>{html.escape(trace)}</pre>"
        self.details.layout.display = "flex" if trace else "none"
        if message:
            self.status.value = ""
            if self.rows.value and 'opacity:0.35' not in self.rows.value[:40]:
                self.rows.value = f'<div style="opacity:0.35" title="stale">{self.rows.value}</div>'


# ---------------------------------------------------------------- Kernel → Interrupt

_RUNNING: set[threading.Event] = set()


def _on_interrupt(signum, frame):
    for event in list(_RUNNING):
        event.set()


def _stop_on_interrupt(event: threading.Event):
    """Let Kernel → Interrupt cancel a sampling thread.

    While no cell runs, ipykernel ignores SIGINT (the main thread is idle, the thread would sample on): between
    messages it restores `kernel.saved_sigint_handler`, so the panel puts its handler there. During a cell the
    kernel's own handler (KeyboardInterrupt) applies as before."""
    _RUNNING.add(event)
    try:
        from IPython import get_ipython
    except ImportError:
        return
    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None or threading.current_thread() is not threading.main_thread():
        return
    if getattr(kernel, "saved_sigint_handler", None) in (signal.SIG_IGN, None):
        kernel.saved_sigint_handler = _on_interrupt
