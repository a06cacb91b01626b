"""The checks of the run config's fields: each takes a value and returns what is wrong with it, or None.

helpers.config declares each field with its check (`_checked(default, check)`); the messages are the second half of
"<field>=<value> <message>" lines, so they say what the value must be.
"""
from __future__ import annotations

import difflib
import math


def at_least(low):
    return lambda v: None if v >= low else f"must be at least {low}"


def finite_at_least(low, above: bool = False):
    def check(v):
        if not math.isfinite(v):
            return "must be a finite number"
        if v < low or (above and v == low):
            return f"must be {'greater than' if above else 'at least'} {low}"
    return check


def fraction(top_included: bool = False):
    def check(v):
        if not math.isfinite(v) or not (0.0 <= v <= 1.0 if top_included else 0.0 <= v < 1.0):
            return f"must be in [0, 1{']' if top_included else ')'}"
    return check


def one_of(choices):
    def check(v):
        if v not in choices():
            close = difflib.get_close_matches(str(v), list(choices()), 1)
            return (f"is not one of {', '.join(choices())}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return check


def not_empty(v):
    return None if v.strip() else "must not be empty"


def folder_name(v):
    if not v.strip() or v in (".", "..") or "/" in v or "\\" in v:
        return "must be a plain folder name (not empty, no '/', '\\' or '..')"


def guidance_list(v):
    if not v or not all(isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g) and g >= 0
                        for g in v):
        return "must be a non-empty list of finite numbers >= 0"


def sigma_interval(v):
    if v and not (len(v) == 2 and all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                                      for s in v) and 0 <= v[0] < v[1]):
        return "must be [] or [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi"


def interval_list(v):
    if not v or not all(isinstance(i, list) and not sigma_interval(i) for i in v):
        return "must be a non-empty list of [] or [sigma_lo, sigma_hi] items with 0 <= sigma_lo < sigma_hi"


def sigma_rel_list(v):
    from .setting import MAX_SIGMA_REL

    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < MAX_SIGMA_REL for s in v) \
            or len(set(v)) != len(v):
        return f"must be a list of distinct EMA lengths sigma_rel in (0, {MAX_SIGMA_REL:.4f}) ([] = off)"


def ema_length_or_zero(v):
    from .setting import MAX_SIGMA_REL

    if not (v == 0 or 0 < v < MAX_SIGMA_REL):
        return f"must be 0 (the stored half-life EMA) or a post-hoc EMA length sigma_rel in (0, {MAX_SIGMA_REL:.4f})"


def ema_length_list(v):
    if not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and not ema_length_or_zero(x)
                        for x in v):
        return "must be a non-empty list of EMA lengths, each " + ema_length_or_zero(-1)[len("must be "):]


def guide_list(v):
    if not v or not all(isinstance(g, str) for g in v):
        return 'must be a non-empty list of snapshot names ("" = no guide)'


def step_list(v):
    if not v or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in v):
        return "must be a non-empty list of step counts >= 1"


def share(v):
    if not (math.isfinite(v) and 0 < v <= 1):
        return "must be a share in (0, 1]: the part of the cells that moves on to the next stage"


def stage_list(v):
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in v) or v != sorted(set(v)):
        return "must be a list of increasing prompt counts >= 2 ([] = the full sweep)"


def unet_presets():
    from .unet import PRESETS  # imported here: helpers.unet imports torch

    return list(PRESETS)


def samplers():
    from .schedulers import SCHEDULERS

    return list(SCHEDULERS)
