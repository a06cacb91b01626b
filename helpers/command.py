"""What every `python -m helpers.*` command that works on a run shares: its arguments, and ending in one line.

The run is `--run-name` (a name under `<outputs-dir>/runs`, or a run folder), never `--run`: `torchrun` and
`accelerate launch` read the options after the module as their own when a prefix matches one of theirs (torchrun:
"ambiguous option: --run could match --run-path"). A run that does not exist is refused before anything is created.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-name", required=True, metavar="NAME",
                        help="the run: a name under <outputs-dir>/runs (as helpers.runs makes it), or a run folder")
    parser.add_argument("--outputs-dir", default="outputs", help="default: %(default)s (relative to the project)")


def existing_run(args: argparse.Namespace):
    """The RunConfig of an existing run; FileNotFoundError naming it (and the runs there) otherwise."""
    from .config import resolve_path
    from .run_folder import load_config, open_run

    folder = Path(args.run_name)
    if "/" in args.run_name and (folder / "config.json").exists():
        return load_config(folder)
    if "/" in args.run_name:
        raise FileNotFoundError(f"{folder}: no run folder there (no config.json)")
    return open_run(args.run_name, None, str(resolve_path(args.outputs_dir)), create=False)


@contextlib.contextmanager
def ends_in_one_line(prog: str, *errors: type[BaseException]):
    """A command's expected failures (an OS error, a missing or locked run, a bad value, and `errors`) end it with
    one line `<prog>: <message>` on stderr and exit status 1, not a traceback."""
    from .files import os_error_line
    from .runlock import RunLockedError

    try:
        yield
    except OSError as e:  # FileNotFoundError too: a missing run names itself
        print(os_error_line(prog, e), file=sys.stderr)
        raise SystemExit(1) from None
    except (ValueError, RunLockedError, *errors) as e:
        print(f"{prog}: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None


def _one_line(error) -> str:
    return " ".join(str(error).split())
