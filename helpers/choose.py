"""Choose a setting and write its test set: the one job behind 04_sample's selection cell and `python -m helpers.choose`.

Under the run's results lock (one writer of selection/ and results/ at a time, whichever of the two started it):
1. the staged selection sweep (helpers.staged) over the candidate settings, and its choice in metrics.json
   `selection` (skipped with select=False: the earlier choice, else the config's, stays);
2. the setting to hand in (the choice with the test-set overrides the user gave) in metrics.json `test_set`, before
   any PNG is written;
3. the test set of that setting, written through results.partial/ and swapped in when complete
   (helpers.submission.write_test_set), with its record selection/test_set.json.
So an interruption anywhere leaves one story: `test_set` in metrics.json is what the run means to hand in, and
05_eval packs results/ only when results/, its manifest and the record are that set. A dry run prints the plan and
writes nothing. Every process of `accelerate launch` / `torchrun` calls this; the main one holds the lock.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from .config import RunConfig
from .setting import Setting

OVERRIDE_FIELDS = tuple(Setting().to_dict())  # any field of a setting (04 offers snapshot … guide_weight)


@dataclass
class Outcome:
    """What choose_and_write did: the finalists and the choice (when it swept), the setting it wrote (or would)."""

    setting: Setting
    source: str
    overrides: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    choice: dict | None = None
    stages: dict | None = None
    written: dict | None = None  # write_test_set's stats
    seconds: float = 0.0
    no_sweep: str = ""  # why nothing was swept, when nothing was


def choose_and_write(cfg: RunConfig, model, prompts, judged=None, *, settings: list[Setting] = (),
                     select: bool = True, stage_prompts: list[int] | None = None, overrides: dict | None = None,
                     dry_run: bool = False, write: bool = True, progress: bool = True) -> Outcome:
    """Sweep `settings` with `judged` (helpers.judges.judge_for_run; None or select=False: no sweep), choose by the
    judge's rule, and write the test set of the choice with `overrides` (setting fields; None keeps the choice's)."""
    from .selection import chosen_setting
    from .shards import Shards
    from .weights import LoadedWeights

    began, shards = time.perf_counter(), Shards.current()
    loaded = LoadedWeights(model, cfg)  # the sweep's last cell stays loaded: the test set of its setting reuses it
    overrides = checked_overrides(cfg, model, settings, overrides or {})  # before hours of sweeping, not after
    if dry_run:
        _print_plan(cfg, model, settings, judged, stage_prompts, shards)
        return Outcome(Setting.from_config(cfg), "select_dry_run=True: nothing was sampled or written", overrides)
    with results_lock(cfg, "choose and write the test set", shards):
        outcome = _sweep(cfg, model, judged, settings, stage_prompts, progress, shards, loaded) if select and judged \
            else Outcome(*chosen_setting(cfg), no_sweep="select=False" if not select else
                         "no metric can judge here (see above)")
        outcome.overrides = overrides
        outcome.setting = outcome.setting.replace(**overrides).checked()
        if write:
            outcome.written = _write(cfg, loaded, prompts, outcome, shards)
    outcome.seconds = time.perf_counter() - began
    return outcome


def checked_overrides(cfg: RunConfig, model, settings, overrides: dict) -> dict:
    """The overrides that are set, each checked against this run and its sampler: ValueError naming them."""
    from .sample import check_honoured

    given = named_overrides(cfg, overrides)
    probe = (settings[0] if settings else Setting.from_config(cfg)).replace(**given)
    try:
        check_honoured(probe.checked(), model.scheduler_config)
    except ValueError as e:
        raise ValueError(f"the test-set override(s) {_listed(given)} cannot be used: {e} (refused before the "
                         "selection sweep; nothing was sampled)") from None
    return given


def named_overrides(cfg: RunConfig, overrides: dict) -> dict:
    """{field: value} of the overrides that are set; snapshot and guide must name snapshots of this run ("model",
    or "first" for a guide, which becomes the earliest snapshot's name)."""
    from .selection import axis_values

    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(OVERRIDE_FIELDS))
    if unknown:
        raise ValueError(f"test-set override(s) {', '.join(unknown)}: not setting fields ({', '.join(OVERRIDE_FIELDS)})")
    for name in ("snapshot", "guide"):
        if given.get(name):  # guide="" is "no guide"
            given[name] = axis_values(name, [given[name]], name, cfg)[0]
    return given


@contextlib.contextmanager
def results_lock(cfg: RunConfig, what: str, shards):
    """The run's results lock, held by the main process for every process: a refusal reaches them all."""
    from .runlock import RESULTS_LOCK, RunLockedError, run_lock

    with contextlib.ExitStack() as stack:
        refused = None
        if shards.is_main:
            try:
                stack.enter_context(run_lock(cfg.run_dir, what, RESULTS_LOCK))
            except RunLockedError as e:
                refused = str(e)
        refused = shards.broadcast(refused)
        if refused:
            raise RunLockedError(refused)
        yield


def _sweep(cfg, model, judged, settings, stage_prompts, progress, shards, loaded) -> Outcome:
    from .budget import sweep_budget_hours
    from .metrics import write_metrics
    from .selection import choose
    from .staged import staged_sweep

    hours, why = sweep_budget_hours(cfg)  # the whole-job budget's share, less what training ran over
    if why and shards.is_main:
        print(why)
    rows, stages = staged_sweep(model, cfg, judged.judge, list(settings), judged.texts, judged.seeds,
                                batch_size=cfg.sample_batch_size, stage_prompts=stage_prompts, budget_hours=hours,
                                progress=progress and shards.is_main, loaded=loaded)
    choice = choose(rows, judged.judge)
    if shards.is_main:
        write_metrics(cfg.run_dir, {"selection": {
            "rule": judged.judge.rule, "judge": judged.judge.key, "prompts": judged.note,
            "sweep_prompts": len(judged.prompts), "stages": stages["plan"], "table": rows, "choice": choice}})
    shards.barrier()
    return Outcome(Setting.from_dict(choice["setting"]), "the selection sweep's choice", rows=rows, choice=choice,
                   stages=stages)


def _write(cfg: RunConfig, loaded, prompts, outcome: Outcome, shards) -> dict:
    """The test set of outcome.setting, announced in metrics.json `test_set` first (what 05 checks results/ by);
    `loaded`: the cache of loaded U-Nets (helpers.weights.LoadedWeights) the sweep used."""
    from .metrics import write_metrics
    from .selection import read_metrics_selection
    from .submission import write_test_set
    from .weights import setting_weights_id

    weights = setting_weights_id(cfg, outcome.setting)
    if shards.is_main:  # `choice`: the sweep's choice it follows, so a later choose-only run is not handed in stale
        write_metrics(cfg.run_dir, {"test_set": {
            "setting": outcome.setting.to_dict(), "weights": weights, "source": outcome.source,
            "choice": (outcome.choice or read_metrics_selection(cfg).get("choice") or {}).get("setting"),
            "overrides": sorted([k, v] for k, v in outcome.overrides.items()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}})
    shards.barrier()
    return write_test_set(loaded.for_setting(outcome.setting), prompts, cfg.layout.results, outcome.setting,
                          weights, seed=cfg.seed, size=cfg.output_size, batch_size=cfg.sample_batch_size,
                          record=cfg.layout.test_set_record)


def _print_plan(cfg, model, settings, judged, stage_prompts, shards) -> None:
    from .selection_cost import run_flop_report

    if shards.is_main and judged is not None:
        print(run_flop_report(cfg, model, list(settings), len(judged.prompts), stage_prompts))
    if shards.is_main:
        print("select_dry_run=True: the plan only; nothing was sampled, chosen or written")


def _listed(given: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in given.items())


def check_is_the_choice(cfg: RunConfig, manifest: dict) -> None:
    """ValueError, one line, unless the set whose `manifest` results/ holds is the one the run means to hand in
    (metrics.json `test_set`, which choose_and_write writes before a PNG): saying which is which and what to run."""
    from .files import read_json
    from .results import manifest_setting

    metrics = read_json(cfg.layout.metrics) if cfg.layout.metrics.exists() else {}
    meant = metrics.get("test_set") if isinstance(metrics, dict) else None
    shown = cfg.layout.shown
    if not isinstance(meant, dict) or "setting" not in meant:
        raise ValueError(f"{shown(cfg.layout.metrics)} does not say which test set the run hands in (no 'test_set'; "
                         "a set written by an older version?): run 04_sample again (select=False keeps the choice)")
    swept = (metrics.get("selection") or {}).get("choice") or {}
    if swept.get("setting") is not None and swept["setting"] != meant.get("choice", swept["setting"]):
        raise ValueError(
            f"the selection sweep now chooses {Setting.from_dict(swept['setting']).label()}, but the run's test set "
            f"follows an earlier choice ({shown(cfg.layout.metrics)}; a choose-only run, --no-test-set?): run "
            f"04_sample with select=False (or python -m helpers.choose --run-name {cfg.run_name} --no-select) to write "
            "the set of the current choice; nothing was packed")
    held = manifest_setting(manifest, str(cfg.layout.results / "manifest.json"))
    chosen = Setting.from_dict(meant["setting"], where=f"{cfg.layout.metrics}: test_set.setting")
    if held != chosen or manifest.get("weights_sha256") != meant.get("weights"):
        what = "another setting" if held != chosen else "other weights of the same setting"
        raise ValueError(
            f"{shown(cfg.layout.results)} holds {held.label()} (weights {manifest.get('weights_sha256')}), but the run's "
            f"current choice is {chosen.label()} (weights {meant.get('weights')}; {shown(cfg.layout.metrics)} test_set, "
            f"since {meant.get('started', '?')}): {what} — its test set was not finished. Run 04_sample again "
            "(or python -m helpers.choose --run-name " + cfg.run_name + " --no-select) to write it; nothing was packed")


def show_outcome(outcome: Outcome, judged=None) -> None:
    """04's report of choose_and_write: the finalists (the choice starred), the rule, what was written."""
    from IPython.display import display

    from .tables import scores_as_table, sweep_table_html

    if outcome.rows:
        counts = outcome.stages["plan"]["counts"]
        print(f"{len(outcome.rows)} finalists of {counts[0]} settings on {judged.note}")
        display(sweep_table_html(outcome.rows, judged.judge.columns, outcome.choice))
        print(f"chosen (★): {outcome.setting.label()}\nrule: {judged.judge.rule}")
    elif outcome.no_sweep:
        print(f"no sweep: {outcome.no_sweep}")
    print(outcome_line(outcome))
    if outcome.written:
        display(scores_as_table(outcome.written, "test set"))


# ---------------------------------------------------------------- command line (accelerate launch, torchrun)


def main(argv=None) -> int:
    """Choose a setting and write its test set, as 04_sample's selection cell does, on one process or several:

        python -m helpers.choose --run-name demo
        accelerate launch --multi_gpu --num_processes 2 -m helpers.choose --run-name hw6 --outputs-dir OUT
        torchrun --nproc_per_node 2 -m helpers.choose --run-name hw6
    """
    import argparse

    from .command import add_run_arguments, ends_in_one_line, existing_run
    from .weights import TrainingNotFinishedError
    from .values import count_argument

    p = argparse.ArgumentParser(prog="python -m helpers.choose", description=main.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=main.__doc__.split("\n\n", 1)[1])
    add_run_arguments(p)
    p.add_argument("--no-select", action="store_true", help="no sweep: write the test set of the earlier choice")
    p.add_argument("--no-test-set", action="store_true", help="choose only; write no test set")
    p.add_argument("--dry-run", action="store_true", help="print the selection's plan; sample and write nothing")
    p.add_argument("--probe-steps", type=count_argument(1), default=400,
                   help="the demo probe's training steps (cached)")
    args = p.parse_args(argv)
    with ends_in_one_line("helpers.choose", TrainingNotFinishedError):
        cfg = existing_run(args)
        outcome = _run_from_command(cfg, args)
    if outcome is not None:
        print(outcome_line(outcome))
    return 0


def _run_from_command(cfg: RunConfig, args) -> Outcome | None:
    from .data import load_prompts
    from .selection import sweep_axes, sweep_settings
    from .shards import Shards
    from .weights import load_for_setting

    shards = Shards.current()  # before any model is placed: each process on its own device
    if shards.is_main:
        print(processes_line(shards.world))
    axes = sweep_axes(cfg)
    base = Setting.from_config(cfg, snapshot=axes["snapshot"][-1])
    model, _ = load_for_setting(cfg, base)
    judged = None if args.no_select else _judge_on_main_first(cfg, args.probe_steps, shards)
    outcome = choose_and_write(cfg, model, load_prompts(cfg.data_path / "test.json"), judged,
                               settings=sweep_settings(base, **axes), select=not args.no_select,
                               dry_run=args.dry_run, write=not args.no_test_set)
    return outcome if shards.is_main else None


def _judge_on_main_first(cfg: RunConfig, probe_steps: int, shards):
    """The run's judge; the main process builds what is cached (the demo probe, reference statistics) first."""
    from .judges import judge_for_run

    if not shards.is_main:
        shards.barrier()
    judged, skipped = judge_for_run(cfg, cfg.sweep_prompts, probe_steps=probe_steps)
    if shards.is_main:
        shards.barrier()
    if judged is None:
        raise ValueError(f"nothing can judge run {cfg.run_name!r} here: "
                         + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return judged


def processes_line(world: int) -> str:
    """How many processes share the work, and why only one where a launcher was probably asked for more."""
    import os

    import torch

    line = f"helpers.choose: {world} process{'es' if world > 1 else ''}"
    if world == 1 and any(k.startswith("ACCELERATE_") for k in os.environ) and not torch.cuda.is_available():
        line += (" (accelerate launch starts several processes on a CPU only with --multi_gpu, which then uses "
                 "gloo: accelerate launch --multi_gpu --num_processes 2 -m helpers.choose ...)")
    return line


def outcome_line(outcome: Outcome) -> str:
    """One line: what was chosen and written, and from where."""
    wrote = outcome.written
    test_set = (f"; test set: {wrote['written']} images written, {wrote['skipped']} already there"
                if wrote else "")
    given = f", with {_listed(outcome.overrides)}" if outcome.overrides else ""
    return (f"setting: {outcome.setting.label()}, from {outcome.source}{given}{test_set} in {outcome.seconds:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
