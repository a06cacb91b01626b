"""A resume repairs what its checkpoints promised (helpers.repair), and post-hoc EMA rebuilds are exact about
their step in a trained run (issue 24, items 4 and 5)."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from helpers.config import PROJECT_ROOT
from helpers.train import train
from test_train import make_run

WEIGHTS = "diffusion_pytorch_model.safetensors"
TWO_STORES = dict(max_steps=4, snapshot_every=2, checkpoint_every=2, phema_every=0)


def tensors(folder, name=WEIGHTS):
    return load_file(str(folder / name))


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:  # two runs of the same steps: float rounding only (as tests/test_train.py's exact resume)
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6)


def test_disk_full_while_the_step_2_snapshot_is_written_then_a_resume_rewrites_snapshot_and_store(
        tmp_path, course_dir, monkeypatch, capsys):
    from diffusers import UNet2DConditionModel

    straight = make_run(tmp_path / "a", course_dir, **TWO_STORES)
    train(straight, progress=False)
    cfg = make_run(tmp_path / "b", course_dir, **TWO_STORES)
    real = UNet2DConditionModel.save_pretrained

    def disk_fills(self, folder, **kw):
        if str(folder).endswith(os.path.join("snapshots", ".tmp-step-000002")):
            os.makedirs(folder, exist_ok=True)
            (folder / "config.json").write_text("{")  # cut off mid-write
            raise OSError(errno.ENOSPC, "No space left on device", str(folder))
        return real(self, folder, **kw)

    monkeypatch.setattr(UNet2DConditionModel, "save_pretrained", disk_fills)
    with pytest.raises(OSError, match="No space left"):
        train(cfg, progress=False)
    monkeypatch.setattr(UNet2DConditionModel, "save_pretrained", real)
    run = cfg.run_dir
    assert (run / "checkpoints" / "step-000002").is_dir()  # written before the snapshot
    assert not (run / "snapshots" / "step-000002").exists() and not (run / "phema" / "step-000002").exists()
    capsys.readouterr()

    result = train(cfg, progress=False)  # resumed with room
    out = capsys.readouterr().out
    assert result.first_step == 3 and result.last_step == 4
    assert "Rewrote from the checkpoint of the same step what an interrupted write left missing: snapshot " \
           "step-000002, post-hoc EMA store step-000002" in out
    assert_same(tensors(run / "snapshots" / "step-000002"), tensors(straight.run_dir / "snapshots" / "step-000002"))
    for name in ("phema-0.050.safetensors", "phema-0.100.safetensors"):
        assert_same(tensors(run / "phema" / "step-000002", name),
                    tensors(straight.run_dir / "phema" / "step-000002", name))
    assert not list((run / "snapshots").glob(".tmp-*"))
    capsys.readouterr()
    train(cfg, progress=False)  # nothing is missing any more: a further resume says nothing about repairs
    assert "Rewrote" not in capsys.readouterr().out


def test_steps_without_a_checkpoint_are_named_unrecoverable_and_stale_temp_folders_are_removed(
        tmp_path, course_dir, capsys):
    cfg = make_run(tmp_path, course_dir, keep_checkpoints=1, **TWO_STORES)
    train(cfg, progress=False)
    run = cfg.run_dir
    kept_final = tensors(run / "snapshots" / "step-000004")
    for gone in ("snapshots/step-000002", "snapshots/step-000004", "phema/step-000002"):
        shutil.rmtree(run / gone)
    (run / "snapshots" / ".tmp-step-000006").mkdir()
    (run / "phema" / ".tmp-step-000004").mkdir()
    capsys.readouterr()
    train(cfg, progress=False)  # at max_steps already: nothing to train, only repairs and model/
    out = capsys.readouterr().out
    assert "Removed what interrupted writes left unfinished: snapshots/.tmp-step-000006, phema/.tmp-step-000004" in out
    assert "Rewrote from the checkpoint of the same step what an interrupted write left missing: snapshot " \
           "step-000004\n" in out  # its checkpoint is kept (keep_checkpoints=1)
    lines = [line for line in out.splitlines() if "not recoverable" in line]
    assert len(lines) == 1 and "snapshot step-000002, post-hoc EMA store step-000002" in lines[0]
    assert_same(tensors(run / "snapshots" / "step-000004"), kept_final)
    assert not list(run.glob("*/.tmp-*"))


KILL_IN_LAST_STORE = textwrap.dedent("""
    import os, signal, sys
    import safetensors.torch

    write = safetensors.torch.save_file

    def killed_after_the_first_file(tensors, filename, metadata=None):
        write(tensors, filename, metadata=metadata)
        if os.path.join("phema", ".tmp-step-000004") in str(filename):
            os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = killed_after_the_first_file
    from helpers.train import main
    main(["--run-name", sys.argv[1], "--no-progress"])
""")


@pytest.mark.slow
def test_sigkill_inside_the_last_post_hoc_ema_store_then_the_command_line_resume_rewrites_it(tmp_path, course_dir):
    from helpers.checkpoint import load_checkpoint

    cfg = make_run(tmp_path, course_dir, **TWO_STORES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILL_IN_LAST_STORE, str(cfg.run_dir)], cwd=PROJECT_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    run = cfg.run_dir
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (run / "phema" / ".tmp-step-000004").is_dir() and not (run / "phema" / "step-000004").exists()
    assert not (run / "model").exists()

    resumed = subprocess.run([sys.executable, "-m", "helpers.train", "--run-name", str(run), "--no-progress"],
                             cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Removed what interrupted writes left unfinished: phema/.tmp-step-000004" in resumed.stdout
    assert "left missing: post-hoc EMA store step-000004" in resumed.stdout
    assert not list((run / "phema").glob(".tmp-*"))
    state = load_checkpoint(run / "checkpoints" / "step-000004")["state"]["phema"]
    for length in ("0.050", "0.100"):
        stored = tensors(run / "phema" / "step-000004", f"phema-{length}.safetensors")
        assert stored and all(torch.equal(w, state[f"{length}/{k}"].half()) for k, w in stored.items())
    assert (run / "model" / "unet_ema" / WEIGHTS).exists()  # model/ too: the resume at max_steps writes it


def test_snapshots_not_on_the_phema_grid_rebuild_from_their_own_store_and_the_sweep_drops_what_cannot(
        tmp_path, course_dir, capsys):
    from helpers.selection import sweep_axes
    from helpers.weights import setting_unet

    cfg = make_run(tmp_path, course_dir, max_steps=4, snapshot_every=3, phema_every=2, checkpoint_every=4)
    train(cfg, progress=False)
    run = cfg.run_dir
    assert sorted(p.name for p in (run / "phema").iterdir()) == ["step-000002", "step-000003", "step-000004"]
    capsys.readouterr()
    for snapshot, step in (("step-000003", 3), ("model", 4)):
        setting_unet(cfg, snapshot, 0.05)
        assert f"EMA length 0.05 at step {step} rebuilt from" in capsys.readouterr().out
    axes = sweep_axes(cfg, snapshots=["step-000003", "step-000004"], ema_lengths=[0.0, 0.05, 0.01])
    assert axes["ema_length"] == [0.0, 0.05]
    out = capsys.readouterr().out
    assert "Sweep: EMA length 0.01 left out, not every snapshot can rebuild it (snapshot 'step-000003': post-hoc " \
           "EMA length 0.01 at step 3 cannot be rebuilt faithfully" in out

    shutil.rmtree(run / "phema" / "step-000003")  # a deleted store: step 3 would be extrapolated from step 2
    with pytest.raises(ValueError, match=r"^snapshot 'step-000003': post-hoc EMA length 0.05 at step 3 cannot be "
                                         r"rebuilt faithfully: from the stores up to step 2 .* step-000003 is missing"):
        setting_unet(cfg, "step-000003", 0.05)
    assert sweep_axes(cfg, snapshots=["step-000003", "step-000004"], ema_lengths=[0.0, 0.05])["ema_length"] == [0.0]
    with pytest.raises(ValueError, match=r"^ema_lengths: none of \[0.05\] can be rebuilt for every snapshot swept"):
        sweep_axes(cfg, snapshots=["step-000003"], ema_lengths=[0.05])
