"""Run the five notebooks headless, in order, into one run folder (what `make demo` does).

    python -m helpers.runs --profile demo --run-name demo
    python -m helpers.runs --profile hw6 --run-name hw6-base -p max_steps=30000 -p batch_size=128
    # 30,000 steps: a max_steps you set replaces the profile's max_epochs=60 (helpers.length.apply_length_rule)

Each executed notebook is saved as `<run_dir>/notebooks/<name>.ipynb`, with its outputs, next to the
config and everything the notebooks wrote.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import sys
import time
from pathlib import Path

from .config import ALIASES, PROJECT_ROOT, RunConfig, profile_config
from .files import os_errors_end_in_one_line
from .run_folder import open_run
from .runlock import RunLockedError
from .values import as_bool

NOTEBOOKS = ["01_data", "02_unet_arch", "03_train_cfg", "04_sample", "05_eval"]


def run_pipeline(run_name: str, profile: str, outputs_dir: str = "outputs", parameters: dict | None = None,
                 notebooks: list[str] = NOTEBOOKS, kernel: str = "python3") -> Path:
    """Execute `notebooks` with papermill, each with run_name, outputs_dir, profile + the `parameters` it declares.

    Every parameter is checked before anything runs (see route_parameters); config fields that no
    notebook declares are saved into the run's config.json first."""
    import papermill

    per_notebook, config_only = route_parameters(parameters or {}, notebooks)
    # only 01_data starts a run: a later notebook on a run that does not exist is refused, and nothing is created
    cfg = open_run(run_name, profile, outputs_dir, create="01_data" in notebooks, **config_only)
    out_dir = cfg.layout.notebooks
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    for name in notebooks:
        if name in AFTER_TRAINING and not (cfg.pipeline or cfg.layout.trained()):
            raise TrainingNotFinished(cfg, name, ran_training="03_train_cfg" in timings)
        start = time.perf_counter()
        print(f"--- {name} ({run_name}, {profile})", flush=True)
        run_params = dict(run_name=run_name, outputs_dir=str(outputs_dir), profile=profile)
        params = {k: v for k, v in run_params.items() if k in notebook_parameters(name)} | per_notebook[name]
        try:
            papermill.execute_notebook(PROJECT_ROOT / "notebooks" / f"{name}.ipynb", out_dir / f"{name}.ipynb",
                                       parameters=params, cwd=str(PROJECT_ROOT / "notebooks"), kernel_name=kernel,
                                       progress_bar=False, log_output=False, config=kernel_config())
        except papermill.PapermillExecutionError as e:
            raise NotebookFailed(name, e, out_dir / f"{name}.ipynb") from None
        timings[name] = time.perf_counter() - start
        print(f"    {name}: {timings[name]:.0f} s", flush=True)
    total = sum(timings.values())
    print(f"all {len(notebooks)} notebooks ran in {total / 60:.1f} min; outputs in {cfg.run_dir}")
    return cfg.run_dir


AFTER_TRAINING = ("04_sample", "05_eval")


class TrainingNotFinished(RuntimeError):
    """04/05 wait for training to finish. After a session that stopped (session_hours) this is the expected end."""

    def __init__(self, cfg, notebook: str, ran_training: bool):
        step = cfg.layout.last_checkpoint_step()
        where = f"at step {step:,}" if step is not None else "before its first checkpoint"
        self.session_ended = ran_training
        super().__init__(
            f"training of run {cfg.run_name!r} stopped {where} (session_hours, or interrupted): run the same command "
            f"again to resume it; {notebook} and what follows run once training has finished" if ran_training else
            f"{notebook} needs a trained model, but run {cfg.run_name!r} has not finished training (stopped {where}): "
            "run 03_train_cfg first (the same helpers.runs command without --only resumes it)")


class NotebookFailed(RuntimeError):
    """A notebook raised: its message in one line, and where the executed copy with the full traceback is."""

    def __init__(self, name: str, error, executed: Path):
        message = " ".join(str(error.evalue).split())
        super().__init__(f"{name} failed: {error.ename}: {message} (full traceback in {executed})")


RESERVED = {"run_name": "--run-name", "outputs_dir": "--outputs-dir", "profile": "--profile"}


@functools.cache
def notebook_parameters(name: str) -> dict[str, str]:
    """{parameter: default as written} of a notebook's `parameters` cell."""
    import papermill  # inspect_notebook reads the cell as execute_notebook does when it checks names

    found = papermill.inspect_notebook(str(PROJECT_ROOT / "notebooks" / f"{name}.ipynb"))
    return {k: p["default"] for k, p in found.items()}


def route_parameters(parameters: dict, notebooks: list[str]) -> tuple[dict[str, dict], dict]:
    """({notebook: the parameters it declares}, {config fields no notebook declares}); ValueError naming any
    unknown key (with a close match) or bad value, so nothing runs with a typo.

    papermill warns "Passed unknown parameter" for every key a notebook does not declare, and then ignores
    it; passing each notebook only its own keys keeps that warning for real mistakes, which end here first."""
    declared = {name: notebook_parameters(name) for name in notebooks}
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    known = set().union(*declared.values()) | fields
    problems = [f"{k!r}: set it with {RESERVED[k]}, not -p" for k in parameters if k in RESERVED]
    for key in parameters:
        if key not in known:
            close = [ALIASES[key]] if key in ALIASES else difflib.get_close_matches(key, sorted(known), 1)
            problems.append(f"{key!r} is not a parameter of {', '.join(notebooks)} nor a config field"
                            + (f" (did you mean {close[0]!r}?)" if close else ""))
    if problems:
        raise ValueError("Unknown parameter(s): " + "; ".join(problems))
    parameters = {k: as_bool(v, k) if k in OPTIONAL_BOOLS or any(
        declared[n].get(k) in ("True", "False") for n in notebooks if k in declared[n]) else v
        for k, v in parameters.items()}
    RunConfig().replace(**{k: v for k, v in parameters.items() if k in fields})  # every value checked, nothing saved
    for key, value in parameters.items():  # the notebooks' own parameters, as the notebooks will check them
        if key in NOTEBOOK_CHECKS and value is not None:
            NOTEBOOK_CHECKS[key](value)
    per_notebook = {n: {k: v for k, v in parameters.items() if k in declared[n]} for n in notebooks}
    config_only = {k: v for k, v in parameters.items() if k in fields and not any(k in d for d in declared.values())}
    return per_notebook, config_only


def _axis(field: str, name: str):
    from .selection import axis_values

    return lambda value: axis_values(field, value, name)


def _count(name: str, minimum: int):
    from .values import as_count

    return lambda value: as_count(value, name, minimum)


# Checks of notebook parameters that are not config fields (those are checked by RunConfig): the same functions
# the notebooks call, so `-p` is refused before anything runs. Snapshot names are checked in 04, once they exist.
NOTEBOOK_CHECKS = {
    "guidances": _axis("guidance", "guidances"), "steps_list": _axis("steps", "steps_list"),
    "intervals": _axis("guidance_interval", "intervals"), "snapshots": _axis("snapshot", "snapshots"),
    "grid_guidances": _axis("guidance", "grid_guidances"), "grid_steps": _axis("steps", "grid_steps"),
    "sweep_prompts": _count("sweep_prompts", 0), "probe_steps": _count("probe_steps", 1),
    "grid_prompts": _count("grid_prompts", 1), "torch_threads": _count("torch_threads", 1),
    "steps": lambda v: _axis("steps", "steps")([v]), "snapshot": lambda v: _axis("snapshot", "snapshot")([v]),
    "ema_lengths": _axis("ema_length", "ema_lengths"), "guides": _axis("guide", "guides"),
    "guide_weights": _axis("guide_weight", "guide_weights"),
    "ema_length": lambda v: _axis("ema_length", "ema_length")([v]), "guide": lambda v: _axis("guide", "guide")([v]),
    "guide_weight": lambda v: _axis("guide_weight", "guide_weight")([v]),
    "student_id": lambda v: _handin().check_student_id(v), "report": lambda v: _handin().check_report(v),
}


def _handin():
    from . import handin

    return handin


def kernel_config():
    """Jupyter config that starts kernels with CurveZMQ-encrypted sockets where pyzmq and jupyter_client can.

    ipykernel >= 7 warns "Kernel is running over TCP without encryption" at every start unless the kernel
    manager provisions Curve keys, which jupyter_client does only when asked (its default is "disabled").
    The kernels' own log is kept to critical lines: jupyter_client interrupts every kernel it shuts down (SIGINT
    before the shutdown request), and a kernel that is between two messages then logs "[IPKernelApp] ERROR |
    KeyboardInterrupt caught in kernel." on the runner's stderr after a notebook that succeeded. A notebook's own
    errors are in the executed copy and end the runner with one line (NotebookFailed).
    """
    import zmq
    from jupyter_client import KernelManager
    from traitlets.config import Config

    config = Config({"NotebookClient": {"extra_arguments": ["--IPKernelApp.log_level=CRITICAL"]}})
    if zmq.has("curve") and KernelManager.class_traits().get("transport_encryption") is not None:
        config["KernelManager"] = Config({"transport_encryption": "auto"})
    return config


OPTIONAL_BOOLS = {"make_zip"}  # yes/no parameters whose default None means "decided from the others"

# -p values are Python literals, except these: they stay the text typed (student_id=2024_001 is not 2024001, a
# snapshot named 1e3 is not 1000.0); the config's text fields join them below
TEXT_PARAMETERS = {"student_id", "report", "ref_stats", "inception_weights", "clip_weights", "snapshot"} | {
    f.name for f in dataclasses.fields(RunConfig) if f.type == "str"}


def parse_parameter(text: str) -> tuple[str, object]:
    """'max_steps=300' -> ('max_steps', 300); values are Python literals, else strings; a text parameter's value
    stays the string typed (quotes around it are taken off)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key = key.strip()
    if key in TEXT_PARAMETERS:
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        return key, None if value == "None" else value[1:-1] if quoted else value
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def with_report_resolved(parameters: dict) -> dict:
    """`report` as an absolute path: typed relative to where the command runs, while the notebooks run in notebooks/."""
    if parameters.get("report"):
        return {**parameters, "report": str(_handin().check_report(parameters["report"]))}
    return parameters


def main(argv=None):
    ap = argparse.ArgumentParser(description="Run notebooks 01-05 headless into outputs/runs/<run-name>.")
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--run-name", default=None, help="default: the profile's name")
    ap.add_argument("--outputs-dir", default="outputs")
    ap.add_argument("-p", "--param", action="append", type=parse_parameter, default=[],
                    help="a notebook parameter, key=value (repeatable), passed to every notebook")
    ap.add_argument("--only", nargs="+", choices=NOTEBOOKS, metavar="NOTEBOOK",
                    help=f"run only these notebooks (in order), one or more of {', '.join(NOTEBOOKS)}")
    args = ap.parse_args(argv)
    notebooks = args.only or NOTEBOOKS
    try:
        profile_config(args.profile)  # an unknown profile, before anything is created
        parameters = with_report_resolved(dict(args.param))
        route_parameters(parameters, notebooks)
    except ValueError as e:
        ap.exit(2, f"helpers.runs: {' '.join(str(e).split())}\n")
    with os_errors_end_in_one_line("helpers.runs"):  # e.g. a read-only outputs folder: one line, not a traceback
        try:
            run_pipeline(args.run_name or args.profile, args.profile, args.outputs_dir, parameters,
                         notebooks=notebooks)
        except TrainingNotFinished as e:  # a session that ended is a success: the next one resumes
            print(f"helpers.runs: {e}", file=sys.stdout if e.session_ended else sys.stderr)
            raise SystemExit(0 if e.session_ended else 1) from None
        except (NotebookFailed, ValueError, RunLockedError) as e:  # a bad run name, another profile, a notebook
            ap.exit(1, f"helpers.runs: {' '.join(str(e).split())}\n")


if __name__ == "__main__":
    main()
