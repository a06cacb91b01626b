"""Notebook and command-line values as the type they mean: papermill and `-p key=value` hand over strings."""
from __future__ import annotations

import argparse


def as_bool(value, name: str) -> bool:
    """A notebook parameter meant as a bool: True/False, 0/1, or the strings true/false/yes/no/on/off/1/0.

    papermill and `-p key=value` hand over `resume=false` as the string "false", which Python counts as true."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ValueError(f"{name}={value!r} should be True or False")


def as_count(value, name: str, minimum: int = 0) -> int:
    """A notebook parameter meant as a whole number >= minimum (papermill may hand over "3" or 3.0)."""
    try:
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number != int(number):
            raise ValueError
    except (ValueError, OverflowError):
        raise ValueError(f"{name}={value!r} should be a whole number >= {minimum}") from None
    if number < minimum:
        raise ValueError(f"{name}={value!r} should be a whole number >= {minimum}")
    return int(number)


def count_argument(minimum: int):
    """An argparse `type` for a whole number >= minimum, whose refusal argparse prints as the message itself."""
    def count(value: str) -> int:
        try:
            return as_count(value, "", minimum)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} should be a whole number >= {minimum}") from None
    return count


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}

