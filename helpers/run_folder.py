"""The run folder `<outputs_dir>/runs/<run_name>/` and its config.json: open, read, write.

The first notebook that opens a run creates it from a profile; later notebooks read it back and apply their own
papermill parameters on top, and the folder keeps the config actually used."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import RunConfig, check_fields, field_problem, profile_config, renamed, resolve_path
from .files import atomic_write_text, read_json


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"No run config at {path}: run notebooks/01_data.ipynb for this run first")
    values = renamed(read_json(path))  # a config.json written before a field was renamed loads as it is
    check_fields(values)
    return _where_it_is(RunConfig(**values).validate(), path.parent)


def _where_it_is(cfg: RunConfig, folder: Path) -> RunConfig:
    """A run folder's location wins over the outputs_dir and run_name its config.json remembers.

    A copied or moved run must write into itself, never into the folder it was copied from."""
    if cfg.run_dir.resolve() == folder.resolve():
        return cfg
    if folder.parent.name != "runs":
        raise ValueError(f"{folder}: this run's config.json says it lives in {cfg.run_dir}; a run folder must sit "
                         f"at <outputs_dir>/runs/<run_name>, so move it there (or open it under its outputs_dir)")
    outputs_dir = folder.parent.parent
    print(f"{folder}: config.json remembers outputs_dir={cfg.outputs_dir!r}, run_name={cfg.run_name!r} "
          f"(a copied or moved run); using the folder where it is: outputs_dir={str(outputs_dir)!r}")
    return dataclasses.replace(cfg, outputs_dir=str(outputs_dir), run_name=folder.name)


def save_config(cfg: RunConfig) -> Path:
    return atomic_write_text(cfg.layout.config, cfg.to_json())


def open_run(run_name: str, profile: str | None = None, outputs_dir: str = "outputs", create: bool = True,
             **overrides) -> RunConfig:
    """The config of run `run_name`: read from its folder if it exists, else made from `profile` (with `create`;
    without it a missing run is a FileNotFoundError naming it, and nothing is created).

    Notebook parameters left as None keep the stored value. The result is saved back, so the run
    folder always holds the config that was actually used.
    """
    bad_name = field_problem("run_name", run_name) if isinstance(run_name, str) else "must be a string"
    if bad_name:  # before the name is joined to a path
        raise ValueError(f"run_name={run_name!r} {bad_name}")
    path = resolve_path(outputs_dir) / "runs" / run_name / "config.json"
    if not path.exists() and not create:
        runs = sorted(p.parent.name for p in path.parent.parent.glob("*/config.json"))
        raise FileNotFoundError(f"run {run_name!r} does not exist: {path.parent} has no config.json (runs here: "
                                f"{', '.join(runs) or 'none'}); start it with 01_data, or pass profile= to make it")
    if path.exists():
        cfg = load_config(path)
        if profile is not None and profile != cfg.profile:
            raise ValueError(f"Run {run_name!r} was made with profile {cfg.profile!r}, not {profile!r}: "
                             f"pick another run_name or delete {path.parent}")
        changed = {k: v for k, v in overrides.items() if v is not None and getattr(cfg, k, object()) != v}
        cfg = cfg.replace(**overrides)
        if changed:
            print(f"Run {run_name}: updating config.json with {changed}")
    else:
        cfg = profile_config(profile or "demo", run_name=run_name, outputs_dir=str(outputs_dir), **overrides)
    save_config(cfg)
    return cfg
