"""The notebook's guidance playground: an ipywidgets panel that samples one prompt at a few seeds, in rows.

It opens at the run's chosen setting (every field: snapshot, EMA length, guidance, steps, scheduler, guidance
interval and rescale, autoguide) and the prompt's handed-in seed; *reset to chosen* goes back to both and clears a
red line. Guidance and steps take one value or several ("1, 2, 3, 5"): each combination (× every snapshot, if
asked) is one row on the same seeds, so only the setting differs between rows; several values are laid out as a
grid with labelled axes. Captions name the prompt and what differs from the choice; a caption breaks between its
phrases, never inside one. Before a click the panel says how many rows it will sample and, once it has measured its
speed, about how long that takes. Earlier rows move to a history strip. Every click reads and checks all controls
first (helpers.panel_controls); a bad value, or any error while sampling, is a red line in the panel (the traceback
folded underneath), and the button is usable again.
Sampling runs on a thread, so Cancel (and Kernel → Interrupt) can stop it between two denoising steps.
"""
from __future__ import annotations

import base64
import html
import io
import re
import signal
import threading
import time
import traceback

from .data import load_prompts
from .images import image_grid, pixel_cell, tensor_to_pil
from .panel_controls import (AMBER, GREY, RED, BadSetting, as_text, guided_note, read_rows, row_caption, run_estimate,
                             setting_words, sigma_note, start_problems, token_note)
from .sample import guided_steps, sample_images, sigma_range
from .schedulers import schedulers_for
from .selection import chosen_setting
from .setting import FINAL, NO_GUIDE, Setting
from .weights import LoadedWeights, weights_sha256

COMPARE_GUIDANCE = (1.0, 2.0, 3.0, 5.0)
HISTORY_ROWS = 8  # earlier rows kept in the history strip, newest first
CACHED_UNETS = 3  # snapshot U-Nets kept loaded besides the one the panel was given
ROW_CELL, GRID_CELL, HISTORY_CELL = 96, 64, 48  # about this many px per image; really a whole multiple of the sprite
__all__ = ["BadSetting", "Panel", "make_panel", "row_html", "rows_html", "sample_row"]


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
            f'style="font:12px monospace">{caption_html(caption)}</div>'
            f'<img src="{src}" width="{strip.width}" height="{strip.height}" '
            f'style="image-rendering:pixelated;image-rendering:crisp-edges"></div>')


# a caption breaks after " · " and after a list's ", " (not one inside brackets, as in "σ in (0.3, 5]")
PHRASE_BREAK = re.compile(r"(?<= ·) |(?<=,) (?![^(\[]*[\])])")


def caption_html(caption: str) -> str:
    """The caption with each phrase one box: a line breaks between phrases, never inside one (no lone "3" of
    "seeds 0…3" on the next line), unless the phrase alone is wider than the whole line."""
    return " ".join(f'<span class="monster-phrase" style="display:inline-block;max-width:100%">{html.escape(p)}'
                    '</span>' for p in PHRASE_BREAK.split(caption))


GRID_FIELDS = ("snapshot", "ema_length", "steps", "guidance")  # the fields a click can vary; the last is the columns


def rows_html(rows: list[tuple], cell: int = ROW_CELL) -> str:
    """The rows of one click, (images, caption, setting) each: one under the other, labelled with the value of the
    field that varies (if one does); with two or more varying fields a grid whose columns are the last of them and
    whose rows are the others, both axes labelled with the values."""
    varying = [f for f in GRID_FIELDS if len({getattr(s, f) for _, _, s in rows}) > 1]
    if not varying:
        return '<div class="monster-rows">' + "".join(row_html(im, text, cell) for im, text, _ in rows) + "</div>"
    across = varying[-1] if len(varying) > 1 else None  # one varying field: one column, rows labelled
    columns = list(dict.fromkeys(getattr(s, across) for _, _, s in rows)) if across else [None]
    down = [f for f in varying if f != across]
    lines = {}
    for images, text, s in rows:
        lines.setdefault(tuple(getattr(s, f) for f in down), {})[getattr(s, across) if across else None] = \
            (images, text, s)
    th = 'style="font:12px sans-serif;padding:2px 6px;text-align:left;white-space:nowrap"'
    head = ""
    if across:
        head = "<tr><th></th>" + "".join(
            f"<th {th}>{html.escape(setting_words(Setting(**{across: v}), across))}</th>" for v in columns) + "</tr>"
        cell = GRID_CELL
    body = []
    for key, cells in lines.items():
        any_setting = next(iter(cells.values()))[2]
        label = ", ".join(setting_words(any_setting, f) for f in down)
        body.append(f"<tr><th {th}>{html.escape(label)}</th>" + "".join(
            f"<td>{row_html(cells[v][0], cells[v][1], cell) if v in cells else ''}</td>" for v in columns)
            + "</tr>")
    return ('<div class="monster-rows"><table class="monster-grid" style="border-collapse:collapse">'
            + head + "".join(body) + "</table></div>")


def handed_in_seed(cfg, prompt: str) -> int | None:
    """The seed the test set draws `prompt` with (cfg.seed + its index in test.json, as helpers.submission
    does), so the chosen setting at it is the handed-in picture; None for a prompt not in test.json."""
    path = cfg.data_path / "test.json"
    try:
        texts = [p.text for p in load_prompts(path)] if path.is_file() else []
    except (OSError, ValueError):  # an unreadable test.json: the panel still opens, at the run's seed
        return None
    return cfg.seed + texts.index(prompt) if prompt in texts else None


def make_panel(model, *, prompt: str = "", setting: Setting | None = None, guidance=None, steps=None,
               scheduler=None, seed=None, snapshot=None, n: int = 4, cfg=None) -> "Panel":
    """The guidance playground for `model`, which holds the U-Net of `setting` (default: the run's chosen
    setting, helpers.selection.chosen_setting). The panel opens at the chosen setting and at the prompt's
    handed-in seed (handed_in_seed; else the run's seed); guidance / steps / scheduler / seed / snapshot override
    it; guidance and steps may be lists (compare mode). Never raises for a bad value: the panel opens with the
    value in its box and a red line naming the problem."""
    cfg = cfg or model.cfg
    chosen, source = chosen_setting(cfg)
    holds = setting or chosen
    # the EMA length and guide the model really holds (helpers.weights.with_setting records them on it)
    holds = holds.replace(ema_length=getattr(model, "ema_length", None), guide=getattr(model, "guide", None),
                          guide_weight=getattr(model, "guide_weight", None))
    problems = start_problems(prompt=prompt, guidance=guidance, steps=steps, scheduler=scheduler, seed=seed,
                              snapshot=snapshot)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        problems.append(f"make_panel(n={n!r}): expected a whole number ≥ 1; showing 4 seeds")
        n = 4
    start = dict(prompt=prompt, guidance=guidance, steps=steps, scheduler=scheduler, seed=seed, snapshot=snapshot)
    start = {k: (v if v is not None else getattr(chosen, k, "")) for k, v in start.items()}
    if seed is None:
        start["seed"] = handed_in_seed(cfg, prompt) if isinstance(prompt, str) else None
        start["seed"] = cfg.seed if start["seed"] is None else start["seed"]
    return Panel(model, cfg, holds, start, chosen=(chosen, source), n=n, problems=problems)


def source_note(cfg, source: str) -> str:
    """Where the chosen setting comes from, short: "chosen by 04's sweep (runs/demo/metrics.json)"."""
    where = f"runs/{cfg.run_name}/" + ("metrics.json" if "selection" in source else "config.json")
    return ("chosen by 04's sweep" if "selection" in source else "the run config's (no sweep yet)") + f" ({where})"


def distinct_snapshots(cfg, keep: tuple = ()) -> tuple[list[str], dict[str, str]]:
    """(the run's snapshots with identical weights listed once, {dropped name: the name kept}): FINAL ("model")
    is usually the last snapshot again. Of two alike, a name in `keep` (the chosen one) stays, else the first."""
    names = cfg.layout.candidates()
    if FINAL not in names or len(names) < 2 or cfg.pipeline:
        return names, {}
    last = names[-2]
    a, b = cfg.layout.unet_dir(FINAL), cfg.layout.unet_dir(last)
    sizes = [sum(f.stat().st_size for f in d.iterdir() if f.is_file()) for d in (a, b)]
    if sizes[0] != sizes[1] or weights_sha256(a) != weights_sha256(b):
        return names, {}
    dropped, kept = (last, FINAL) if last not in keep and FINAL in keep else (FINAL, last)
    return [n for n in names if n != dropped], {dropped: kept}


def rebuildable_ema_lengths(cfg, *also: float) -> list[float]:
    """0 (the snapshots' own half-life EMA) and the post-hoc EMA lengths this run can rebuild: those it stores
    profiles of, its sweep's, and `also` (the chosen one); only 0 when it stores no profiles."""
    from .phema import stored_profiles

    stored = stored_profiles(cfg.layout.phema) if cfg.layout.phema.is_dir() and not cfg.pipeline else []
    if not stored:
        return sorted({0.0, *(float(x) for x in also if x == 0)})
    return sorted({0.0, *(p.sigma_rel for p in stored), *map(float, cfg.sweep_ema_lengths), *map(float, also)})


def _widgets():
    import ipywidgets

    return ipywidgets


class Panel(_widgets().VBox):
    """The panel's widgets and what its buttons do; see make_panel."""

    def __init__(self, model, cfg, holds: Setting, start: dict, *, chosen: tuple[Setting, str], n: int,
                 problems: list[str]):
        self.model, self.cfg, self.n, self.chosen, self.holds = model, cfg, n, chosen, holds
        self.start_seed = start["seed"]  # what reset gives a prompt the test set does not hold
        self.loaded = LoadedWeights(model, cfg, keep=CACHED_UNETS, holds=holds)  # the U-Nets loaded so far
        self.seconds_per_step = None  # of one row, measured on the last click
        self.cancel_event, self.thread = threading.Event(), None
        self.current, self.history = [], []  # (images, caption, setting) of the last click's rows, of earlier ones
        self.c = self._controls(start, holds)
        self._outputs()
        super().__init__(self._layout())
        self._wire()
        self.show_error("; ".join(problems + self._snapshot_problem(start["snapshot"])))
        self.update_notes()

    # ------------------------------------------------------------ building

    def _snapshot_options(self) -> list[tuple[str, str]]:
        chosen, source = self.chosen
        names, self.alias = distinct_snapshots(self.cfg, keep=(chosen.snapshot, self.holds.snapshot))
        names += [name for name in self.models_snapshots() if name not in names and name not in self.alias]
        mark = " ← chosen" if "selection" in source else " ← the run config's"
        same = {kept: dropped for dropped, kept in self.alias.items()}
        return [(name + (" (final EMA U-Net)" if name == FINAL else "") + (f" (= {same[name]})" if name in same else "")
                 + (mark if name == chosen.snapshot else ""), name) for name in names]

    def models_snapshots(self) -> list[str]:
        return list(dict.fromkeys(key[0] for key in self.loaded.models))

    def _controls(self, start: dict, holds: Setting) -> dict:
        w = _widgets()
        chosen = self.chosen[0]
        options = self._snapshot_options()
        names = [name for _, name in options]
        snapshot = self.alias.get(start["snapshot"], start["snapshot"])
        snapshot = snapshot if snapshot in names else self.alias.get(holds.snapshot, holds.snapshot)
        lo, hi = tuple(self.cfg.guidance_interval) or (0.3, 5.0)  # a start for the σ boxes when the run has none
        usable = schedulers_for(self.model.scheduler_config)  # a flow-matching run: the flow solvers only
        text = dict(layout=w.Layout(width="260px"), continuous_update=True)
        small = dict(layout=w.Layout(width="200px"), continuous_update=True, style={"description_width": "auto"})
        lengths = rebuildable_ema_lengths(self.cfg, chosen.ema_length)
        guides = [NO_GUIDE] + names
        return dict(
            prompt=w.Text(value=str(start["prompt"]), description="prompt", continuous_update=True,
                          layout=w.Layout(width="640px", flex="0 0 640px")),  # a long prompt never shrinks the box
            snapshot=w.Dropdown(options=options, value=snapshot, description="snapshot",
                                layout=w.Layout(width="420px")),
            all_snapshots=w.Checkbox(value=False, description="every snapshot (one row each)", indent=False,
                                     layout=w.Layout(width="auto")),
            ema_length=w.Dropdown(options=[(setting_words(Setting(ema_length=x), "ema_length"), x) for x in lengths],
                                  value=chosen.ema_length if chosen.ema_length in lengths else 0.0,
                                  description="EMA length", style={"description_width": "auto"},
                                  layout=w.Layout(width="240px")),
            guidance=w.Text(value=as_text(start["guidance"]), description="guidance", placeholder="3 or 1, 2, 3, 5",
                            **text),
            steps=w.Text(value=as_text(start["steps"]), description="steps", placeholder="10 or 10, 25", **text),
            scheduler=w.Dropdown(options=usable, description="scheduler",
                                 value=start["scheduler"] if start["scheduler"] in usable else holds.scheduler),
            # Text, not IntText: the browser holds numbers as doubles, which round seeds above 2**53
            seed=w.Text(value=as_text(start["seed"]), description="seed", **text),
            rescale=w.Text(value=as_text(chosen.guidance_rescale), description="rescale", **small),
            everywhere=w.Checkbox(value=not chosen.guidance_interval, description="guide at every step",
                                  indent=False, layout=w.Layout(width="auto")),
            sigma_lo=w.Text(value=as_text(chosen.guidance_interval[0] if chosen.guidance_interval else lo),
                            description="or only for noise σ from", style={"description_width": "auto"},
                            layout=w.Layout(width="260px")),
            sigma_hi=w.Text(value=as_text(chosen.guidance_interval[1] if chosen.guidance_interval else hi),
                            description="to", style={"description_width": "auto"}, layout=w.Layout(width="120px")),
            guide=w.Dropdown(options=[("no autoguide" if g == NO_GUIDE else g, g) for g in guides],
                             value=chosen.guide if chosen.guide in guides else NO_GUIDE, description="autoguide by",
                             style={"description_width": "auto"}, layout=w.Layout(width="300px")),
            guide_weight=w.Text(value=as_text(chosen.guide_weight), description="weight", **small),
        )

    def _outputs(self):
        w = _widgets()
        self.generate_button = w.Button(description="Generate", button_style="primary")
        self.compare_button = w.Button(description="Compare guidance " + ", ".join(f"{g:g}" for g in COMPARE_GUIDANCE),
                                       layout=w.Layout(width="auto", flex="0 0 auto"))  # never a cut label
        self.cancel_button = w.Button(description="Cancel")
        self._enable(self.cancel_button, False)
        self.reset_button = w.Button(description="reset to chosen", layout=w.Layout(width="auto"))
        self.progress = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="200px", visibility="hidden"))
        # the status gets the rest of the line, and a line of its own when that is too short: never cut
        self.status = w.Label(layout=w.Layout(width="auto", flex="1 1 320px"))
        self.error, self.plan = w.HTML(), w.HTML()
        self.tokens, self.guided, self.source = w.HTML(), w.HTML(), w.HTML()
        self.details = w.Accordion(children=[w.HTML()], titles=("traceback",), selected_index=None,
                                   layout=w.Layout(display="none"))
        self.rows, self.history_box = w.HTML(), w.HTML()

    def _layout(self) -> list:
        w, c = _widgets(), self.c
        lowest, highest = sigma_range(self.model.scheduler_config)
        # "from about 0.0064" and "to about 20,000" each stay on one line when the note wraps
        note = re.sub(r"(from|to) (about )?\S+", lambda m: m.group(0).replace(" ", "\xa0"),
                      sigma_note(lowest, highest))
        sigmas = w.HTML(f'<span style="color:{GREY}">({html.escape(note)})</span>')
        return [w.HBox([c["prompt"], self.tokens], layout=w.Layout(flex_flow="row wrap")),
                w.HBox([c["snapshot"], c["ema_length"], c["all_snapshots"]]),
                w.HBox([self.source, self.reset_button]), w.HBox([c["guidance"], c["steps"], c["rescale"]]),
                w.HBox([c["scheduler"], c["seed"]]),
                w.HBox([c["everywhere"], c["sigma_lo"], c["sigma_hi"], sigmas]), self.guided,
                w.HBox([c["guide"], c["guide_weight"]]),
                w.HBox([self.generate_button, self.compare_button, self.cancel_button, self.progress, self.status],
                       layout=w.Layout(flex_flow="row wrap")),
                self.plan, self.error, self.details, self.rows, self.history_box]

    def _wire(self):
        self.generate_button.on_click(lambda _: self.generate())
        self.compare_button.on_click(lambda _: self.compare())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.reset_button.on_click(lambda _: self.reset_to_chosen())
        for name in self.c:
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
        """Token count, "guided at k of n steps" and what each button will sample, for what the boxes hold now;
        boxes that do not apply are disabled."""
        c = self.c
        c["sigma_lo"].disabled = c["sigma_hi"].disabled = c["everywhere"].value
        c["snapshot"].disabled = c["all_snapshots"].value
        c["guide_weight"].disabled = c["guide"].value == NO_GUIDE
        self.tokens.value = token_note(self.model.text_encoder, c["prompt"].value)[0]
        self.source.value = f'<span style="color:{GREY}">{html.escape(source_note(self.cfg, self.chosen[1]))}</span>'
        try:
            rows, _ = read_rows(self.values(), self.n, self.model.scheduler_config)
            self.guided.value = f'<span style="color:{GREY}">{guided_note(self.model.scheduler_config, rows)}</span>'
            plan = f"Generate: {run_estimate(rows, self.n, self.seconds_per_step)}"
        except BadSetting as e:
            self.guided.value = f'<span style="color:{AMBER}">{html.escape(str(e))}</span>'
            plan = "Generate: fix the value above first"
        try:
            compare = run_estimate(read_rows(self.values(compare=True), self.n, self.model.scheduler_config)[0],
                                   self.n, self.seconds_per_step)
            plan += f" · Compare: {compare}"
        except BadSetting:
            pass
        self.plan.value = f'<span style="color:{GREY}">{html.escape(plan)}</span>'

    def values(self, compare: bool = False) -> dict:
        """The raw control values read_rows takes; compare=True: with COMPARE_GUIDANCE in place of the guidance."""
        c = self.c
        snapshots = [n for _, n in c["snapshot"].options] if c["all_snapshots"].value else [c["snapshot"].value]
        values = dict(snapshots=snapshots, **{k: c[k].value for k in (
            "guidance", "steps", "scheduler", "seed", "everywhere", "sigma_lo", "sigma_hi", "rescale", "guide",
            "guide_weight", "ema_length")})
        if compare:
            values["guidance"] = as_text(list(COMPARE_GUIDANCE))
        return values

    # ------------------------------------------------------------ buttons

    def reset_to_chosen(self):
        """Every control back to the chosen setting and the seed to the prompt's handed-in one, so the next row is
        the handed-in picture (the prompt stays); the red line and the dimming go: every box is valid again."""
        self._reset_setting()
        self.c["seed"].value = as_text(self.reset_seed())
        self.show_error("")
        if self.current and not self._running():  # the rows shown are current again: undimmed
            self.rows.value = rows_html(self.current)

    def reset_seed(self) -> int:
        """The test set's seed for the prompt shown, else the seed the panel opened with (if it was a seed)."""
        seed = handed_in_seed(self.cfg, self.c["prompt"].value)
        if seed is None:
            valid = isinstance(self.start_seed, int) and not isinstance(self.start_seed, bool)
            seed = self.start_seed if valid else self.cfg.seed
        return seed

    def _reset_setting(self):
        chosen = self.chosen[0]
        c = self.c
        c["all_snapshots"].value = False
        snapshot = self.alias.get(chosen.snapshot, chosen.snapshot)
        if snapshot in [n for _, n in c["snapshot"].options]:
            c["snapshot"].value = snapshot
        if chosen.ema_length in [x for _, x in c["ema_length"].options]:
            c["ema_length"].value = chosen.ema_length
        c["guidance"].value, c["steps"].value = as_text(chosen.guidance), as_text(chosen.steps)
        c["scheduler"].value, c["everywhere"].value = chosen.scheduler, not chosen.guidance_interval
        if chosen.guidance_interval:
            c["sigma_lo"].value, c["sigma_hi"].value = map(as_text, chosen.guidance_interval)
        c["rescale"].value = as_text(chosen.guidance_rescale)
        guides = [g for _, g in c["guide"].options]
        c["guide"].value = chosen.guide if chosen.guide in guides else NO_GUIDE
        c["guide_weight"].value = as_text(chosen.guide_weight)

    def compare(self):
        """The compare guidance values on what the other boxes hold; the guidance box keeps what was typed."""
        self.generate(compare=True)

    def cancel(self):
        self.cancel_event.set()
        self.status.value = "cancelling…"

    def generate(self, compare: bool = False):
        """Check every control, then sample the rows on a thread (one sample_images call per row)."""
        if self._running():
            return
        self.show_error("")
        try:
            rows, seeds = read_rows(self.values(compare), self.n, self.model.scheduler_config)
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

    def _running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    # ------------------------------------------------------------ sampling (on the thread)

    def _sample_rows(self, rows: list[Setting], prompt: str, seeds: list[int]):
        began, done = time.perf_counter(), [0]
        try:
            for s in rows:
                model = self._model_for(s)
                row_began = time.perf_counter()
                images = sample_row(model, prompt, seeds, s, on_step=self._ticker(done))
                self.seconds_per_step = (time.perf_counter() - row_began) / s.steps
                text = row_caption(s, self.chosen[0], prompt, seeds, guided_steps(model.scheduler_config, s))
                self.current.append((images, text, s))
                self.rows.value = rows_html(self.current)
            unconditional = "" if prompt.strip() else " (empty prompt: unconditional samples)"
            self.status.value = f"{len(rows)} row(s) in {time.perf_counter() - began:.1f} s{unconditional}"
        except Cancelled:
            self.status.value = f"cancelled after {done[0]} steps; {len(self.current)} of {len(rows)} rows done"
        except Exception as e:  # noqa: BLE001 - shown in the panel; the kernel must go on
            self.show_error(f"{type(e).__name__}: {e}", traceback.format_exc())
        finally:
            self._busy(False)
            _RUNNING.discard(self.cancel_event)
            self.update_notes()  # the time estimate, with the speed just measured

    def _ticker(self, done: list[int]):
        def on_step(step: int, total: int):
            if self.cancel_event.is_set():
                raise Cancelled
            done[0] += 1
            self.progress.value = done[0]
        return on_step

    def _model_for(self, s: Setting):
        if s in self.loaded:
            return self.loaded.for_setting(s)
        self.status.value = f"loading {setting_words(s, 'snapshot')}, {setting_words(s, 'ema_length')}…"
        model = self.loaded.for_setting(s)
        self.status.value = "sampling…"
        return model

    # ------------------------------------------------------------ showing

    BUTTON_STYLES = dict(Generate="primary", Cancel="warning")  # their colours while they can be pressed

    def _enable(self, button, on: bool):
        """A disabled button drops its colour too: a dimmed orange Cancel still looks pressable."""
        button.disabled = not on
        button.button_style = self.BUTTON_STYLES.get(button.description, "") if on else ""

    def _busy(self, busy: bool, total: int = 1):
        for button in (self.generate_button, self.compare_button):
            self._enable(button, not busy)
        self._enable(self.cancel_button, busy)
        self.progress.layout.visibility = "visible" if busy else "hidden"
        if busy:
            self.progress.max, self.progress.value, self.status.value = total, 0, "sampling…"
            self.rows.value = ""  # the last click's rows are in the history strip now

    def _show_history(self):
        if self.history:
            self.history_box.value = (f'<details class="monster-history" open><summary style="color:{GREY}">'
                                      'earlier rows, newest first'
                                      '</summary>' + "".join(row_html(images, text, HISTORY_CELL)
                                                             for images, text, _ in self.history) + "</details>")

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
