"""What the guidance panel's boxes mean, without widgets: typed text → the Settings to sample, or every problem.

Numbers are typed into text boxes, not sliders: a slider clamps a typed 0 steps to 1 without a word, and any
value the sampler accepts (Setting.problems) is legal here, however far from the usual range. Guidance and steps
take one value or several ("1, 2, 3, 5"): several make one row each, on the same prompt and seeds (compare mode).
"""
from __future__ import annotations

import html
import itertools
import math
import numbers
import re

from .sample import guided_steps, unhonoured
from .setting import Setting

SEED_LIMIT = 2**63  # seeds are signed 64-bit integers downstream (torch generators, numpy)
MAX_ROWS = 24  # one click samples at most this many rows: a typo like "1, 2, 3, 45, 6, …" × 3 snapshots is not a job
RED, AMBER, GREY = "#c62828", "#b26a00", "gray"


class BadSetting(ValueError):
    """A panel control holds a value the sampler cannot use; the message names each one."""


def parse_numbers(name: str, text, kind=float) -> tuple[list, list[str]]:
    """(values, problems) of a box holding one number or several separated by commas or spaces."""
    parts = [p for p in re.split(r"[,;\s]+", str(text).strip()) if p]
    if not parts:
        return [], [f"{name} is empty: type a number, or several separated by commas"]
    values, problems = [], []
    for part in parts:
        try:
            values.append(kind(part))
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            problems.append(f"{name}={part!r} is not {what}")
    return values, problems


def parse_seed(text, n: int) -> tuple[int | None, list[str]]:
    """(first seed, problems): the row's n seeds seed … seed+n-1 must all be valid 64-bit seeds."""
    text = str(text).strip()
    try:
        seed = int(text)
    except ValueError:
        return None, [f"seed={text!r} is not a whole number"]
    if not 0 <= seed <= SEED_LIMIT - n:
        return None, [f"seed={seed} is outside 0…{SEED_LIMIT - n} (the {n} seeds seed…seed+{n - 1} "
                      f"must stay below 2**63)"]
    return seed, []


def read_rows(values: dict, n: int, scheduler_config: dict | None = None) -> tuple[list[Setting], list[int]]:
    """(one Setting per row, the n seeds) from the raw control values, or BadSetting naming every bad one.

    values: snapshots (list of names), guidance, steps, seed, sigma_lo, sigma_hi, rescale, guide_weight (typed
    text), scheduler, guide (a snapshot name, "" for none), ema_length (a number), everywhere (bool: guide at every
    step)."""
    guidances, problems = parse_numbers("guidance", values["guidance"])
    steps, more = parse_numbers("steps", values["steps"], int)
    seed, seed_problems = parse_seed(values["seed"], n)
    problems += more + seed_problems
    interval = ()
    if not values["everywhere"]:
        interval_problems = []
        for name, text in (("guide from σ", values["sigma_lo"]), ("to σ", values["sigma_hi"])):
            found, bad = parse_numbers(name, text)
            interval_problems += bad or ([f"{name}: one number, not {len(found)}"] if len(found) != 1 else [])
        problems += interval_problems
        if not interval_problems:
            interval = (float(values["sigma_lo"]), float(values["sigma_hi"]))
    extra = {}
    for name, box in (("guidance_rescale", "rescale"), ("guide_weight", "guide_weight")):
        found, bad = parse_numbers(box.replace("_", " "), values.get(box, "0" if box == "rescale" else "1"))
        problems += bad or ([f"{box.replace('_', ' ')}: one number, not {len(found)}"] if len(found) != 1 else [])
        if len(found) == 1:
            extra[name] = found[0]
    guide = values.get("guide", "")
    rows = [Setting(snap, g, s, values["scheduler"], interval, guide=guide,
                    ema_length=float(values.get("ema_length", 0.0)), **extra)
            for snap, s, g in itertools.product(values["snapshots"], steps, guidances)]
    problems += list(dict.fromkeys(p for row in rows
                                   for p in row.problems() + unhonoured(row, scheduler_config or {})))
    if len(rows) > MAX_ROWS:
        problems.append(f"{len(rows)} rows ({len(values['snapshots'])} snapshots × {len(steps)} steps × "
                        f"{len(guidances)} guidance values): at most {MAX_ROWS} per click")
    if problems:
        raise BadSetting("; ".join(problems))
    return rows, list(range(seed, seed + n))


def short_prompt(prompt: str, limit: int = 48) -> str:
    """The prompt quoted, cut at a word boundary to about `limit` characters."""
    prompt = " ".join(prompt.split())
    if not prompt:
        return "(empty prompt)"
    if len(prompt) > limit:
        prompt = prompt[:limit].rsplit(" ", 1)[0] + "…"
    return f"“{prompt}”"


def setting_words(s: Setting, field: str) -> str:
    """One field of a setting in words, as a caption names it."""
    if field == "snapshot":
        return s.snapshot
    if field == "ema_length":
        return f"EMA length {s.ema_length:g}" if s.ema_length else "half-life EMA"
    if field == "guidance":
        return "guidance 1 (no guidance)" if s.guidance == 1.0 else f"guidance {s.guidance:g}"
    if field == "steps":
        return f"{s.steps} steps"
    if field == "scheduler":
        return s.scheduler
    if field == "guidance_interval":
        lo_hi = s.guidance_interval
        return f"guided for σ in ({lo_hi[0]:g}, {lo_hi[1]:g}]" if lo_hi else "guided at every step"
    if field == "guidance_rescale":
        return f"rescale {s.guidance_rescale:g}" if s.guidance_rescale else "no rescale"
    if field in ("guide", "guide_weight"):
        return f"autoguided by {s.guide} × {s.guide_weight:g}" if s.autoguided else "no autoguidance"
    raise KeyError(field)


CAPTION_FIELDS = ("snapshot", "ema_length", "guidance", "steps", "scheduler", "guidance_interval",
                  "guidance_rescale", "guide")


def differences(s: Setting, base: Setting) -> list[str]:
    """The fields where `s` differs from `base`, in words; fields that cannot matter are left out (where guidance
    acts when guidance is 1, the guide's weight when there is no guide)."""
    words = []
    for field in CAPTION_FIELDS:
        if field in ("guidance_interval", "guidance_rescale") and s.guidance == 1.0:
            continue  # no guidance: where and how it would act says nothing
        if field == "guide":
            if (s.autoguided, s.guide, s.guide_weight) != (base.autoguided, base.guide, base.guide_weight) and \
                    (s.autoguided or base.autoguided):
                words.append(setting_words(s, field))
        elif getattr(s, field) != getattr(base, field):
            words.append(setting_words(s, field))
    return words


def row_caption(s: Setting, chosen: Setting, prompt: str, seeds: list[int], guided: tuple[int, int]) -> str:
    """A row's caption: the prompt (shortened), what differs from the chosen setting, how many steps are guided,
    the seeds. It never names guided steps for guidance 1 (it never guides)."""
    changed = differences(s, chosen)
    what = "chosen setting" if not changed else "chosen setting but " + ", ".join(changed)
    if s.guidance != 1.0 and guided[0] < guided[1]:
        what += f" · guided at {guided[0]} of {guided[1]} steps"
    return f"{short_prompt(prompt)} · {what} · seeds {seeds[0]}…{seeds[-1]}"


def run_estimate(rows: list[Setting], n: int, seconds_per_step: float | None) -> str:
    """"4 rows × 4 seeds, about 9 s" from the last measured seconds per denoising step of one row."""
    text = f"{len(rows)} row{'s' if len(rows) != 1 else ''} × {n} seeds"
    if seconds_per_step is None:
        return text + " (time: measured on the first click)"
    seconds = seconds_per_step * sum(s.steps for s in rows)
    return text + f", about {seconds:.0f} s" if seconds >= 1.5 else text + ", about a second"


def guided_note(scheduler_config: dict, rows: list[Setting]) -> str:
    """"guided at k of n steps" for each distinct step count and guidance-on/off of the rows."""
    seen = {}
    for s in rows:
        seen.setdefault((s.steps, s.guidance == 1.0), s)
    parts = []
    for (steps, unguided), s in seen.items():
        k, total = guided_steps(scheduler_config, s)
        parts.append(f"guided at {k} of {total} steps" + (" (guidance 1 never guides)" if unguided else ""))
    return "; ".join(parts)


def token_note(text_encoder, prompt: str) -> tuple[str, bool]:
    """(HTML note, whether the prompt is cut): the prompt's token count against what the text encoder keeps."""
    limit = text_encoder.max_tokens
    count = text_encoder.token_lengths([prompt])[0]
    if count <= limit:
        return f'<span style="color:{GREY}">{count} of {limit} tokens</span>', False
    kept = text_encoder.tokenizer(prompt, truncation=True, max_length=limit)["input_ids"]
    tail = text_encoder.tokenizer.decode(kept, skip_special_tokens=True).split()[-4:]
    return (f'<span style="color:{RED}"><b>{count} tokens: the text encoder keeps {limit}</b>, so everything '
            f'after “…{html.escape(" ".join(tail))}” is cut and does not reach the model</span>'), True


def start_problems(**given) -> list[str]:
    """Python values passed to make_panel that have the wrong type, each named (None means: the run's value)."""
    wanted = dict(prompt=str, guidance=numbers.Real, steps=numbers.Integral, scheduler=str, seed=numbers.Integral,
                  snapshot=str)
    problems = []
    for name, value in given.items():
        ok = isinstance(value, wanted[name]) and not isinstance(value, bool)
        if isinstance(value, (list, tuple)) and name in ("guidance", "steps"):
            ok = all(isinstance(v, wanted[name]) and not isinstance(v, bool) for v in value) and bool(value)
        if value is not None and not ok:
            problems.append(f"make_panel({name}={value!r}): got {type(value).__name__}, expected "
                            f"{_WANTED_WORDS.get(wanted[name], 'a string')}")
    return problems


_WANTED_WORDS = {numbers.Integral: "a whole number", numbers.Real: "a number"}


def format_number(x: float, digits: int = 3) -> str:
    """A number as people write it, to `digits` significant figures: 157 not 1.57e+02, 1,000 not 1e+03, 0.3."""
    if not math.isfinite(x) or x == 0:
        return f"{x:g}"
    rounded = float(f"{x:.{digits}g}")
    if abs(rounded) >= 1000:
        return f"{rounded:,.0f}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(rounded))))
    text = f"{rounded:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def sigma_note(lowest: float, highest: float) -> str:
    """The noise range the σ boxes can cut, in words: "this schedule's noise σ runs from 0 to about 1,000" (two
    figures: a rough range to pick the boxes' values in, not a measurement)."""
    def about(x):  # "about" only where rounding changed the number
        words = format_number(x, digits=2)
        return words if float(words.replace(",", "")) == x else "about " + words
    return f"this schedule's noise σ runs from {about(lowest)} to {about(highest)}"


def as_text(value) -> str:
    """A starting value as the text a box shows: lists as "1, 2, 3"."""
    if isinstance(value, (list, tuple)):
        return ", ".join(as_text(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)
