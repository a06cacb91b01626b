"""Run the five notebooks headless, in order, into one run folder (what `make demo` does).

    python -m helpers.runs --profile demo --run-name demo
    python -m helpers.runs --profile hw6 --run-name hw6-base -p max_steps=30000 -p batch_size=128

Each executed notebook is saved as `<run_dir>/notebooks/<name>.ipynb`, with its outputs, next to the
config and everything the notebooks wrote.
"""
from __future__ import annotations

import argparse
import ast
import time
from pathlib import Path

from .config import PROJECT_ROOT, open_run

NOTEBOOKS = ["01_data", "02_unet_arch", "03_train_cfg", "04_sample", "05_eval"]


def run_pipeline(run_name: str, profile: str, outputs_dir: str = "outputs", parameters: dict | None = None,
                 notebooks: list[str] = NOTEBOOKS, kernel: str = "python3") -> Path:
    """Execute `notebooks` with papermill; every notebook gets run_name, outputs_dir, profile + `parameters`."""
    import papermill

    params = dict(run_name=run_name, outputs_dir=str(outputs_dir), profile=profile, **(parameters or {}))
    cfg = open_run(run_name, profile, outputs_dir)  # creates the run folder (and checks the profile)
    out_dir = cfg.run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    for name in notebooks:
        start = time.perf_counter()
        print(f"--- {name} ({run_name}, {profile})", flush=True)
        papermill.execute_notebook(PROJECT_ROOT / "notebooks" / f"{name}.ipynb", out_dir / f"{name}.ipynb",
                                   parameters=params, cwd=str(PROJECT_ROOT / "notebooks"), kernel_name=kernel,
                                   progress_bar=False, log_output=False, config=kernel_config())
        timings[name] = time.perf_counter() - start
        print(f"    {name}: {timings[name]:.0f} s", flush=True)
    total = sum(timings.values())
    print(f"all {len(notebooks)} notebooks ran in {total / 60:.1f} min; outputs in {cfg.run_dir}")
    return cfg.run_dir


def kernel_config():
    """Jupyter config that starts kernels with CurveZMQ-encrypted sockets where pyzmq and jupyter_client can.

    ipykernel >= 7 warns "Kernel is running over TCP without encryption" at every start unless the kernel
    manager provisions Curve keys, which jupyter_client does only when asked (its default is "disabled").
    """
    import zmq
    from jupyter_client import KernelManager
    from traitlets.config import Config

    if zmq.has("curve") and KernelManager.class_traits().get("transport_encryption") is not None:
        return Config({"KernelManager": {"transport_encryption": "auto"}})
    return Config()


def parse_parameter(text: str) -> tuple[str, object]:
    """'max_steps=300' -> ('max_steps', 300); values are Python literals, else strings."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def main(argv=None):
    ap = argparse.ArgumentParser(description="Run notebooks 01-05 headless into outputs/runs/<run-name>.")
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--run-name", default=None, help="default: the profile's name")
    ap.add_argument("--outputs-dir", default="outputs")
    ap.add_argument("-p", "--param", action="append", type=parse_parameter, default=[],
                    help="a notebook parameter, key=value (repeatable), passed to every notebook")
    ap.add_argument("--only", nargs="*", choices=NOTEBOOKS, help="run only these notebooks (in order)")
    args = ap.parse_args(argv)
    run_pipeline(args.run_name or args.profile, args.profile, args.outputs_dir, dict(args.param),
                 notebooks=args.only or NOTEBOOKS)


if __name__ == "__main__":
    main()
