"""The training loop: batches, losses, exact resume, kill + resume, NaN stop, several processes, previews."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.cache import build_cache, load_cache, write_split
from helpers.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from helpers.config import PROJECT_ROOT
from helpers.run_folder import open_run
from helpers.data import load_records
from helpers.diffusion import Objective
from helpers.model import training_objective
from helpers.train import train
from helpers.step import DeviceCache, data_rows, step_generator
from helpers.trainlog import read_log

FAST = dict(preview_every=0, log_every=1)  # previews are tested once, last


def make_run(tmp_path, course_dir, name="t", **overrides):
    """open_run + split + cache, as notebook 01 does, for the tiny profile."""
    cfg = open_run(name, "tiny", outputs_dir=str(tmp_path), data_dir=str(course_dir), **{**FAST, **overrides})
    records, _ = load_records(cfg.data_path)
    write_split(cfg, records)
    build_cache(cfg, records, progress=False)
    return cfg


def model_weights(cfg, folder):
    return load_file(str(cfg.run_dir / "model" / folder / "diffusion_pytorch_model.safetensors"))


def test_data_order_is_a_seeded_permutation_per_epoch():
    rows = torch.arange(10, 20)
    stream = data_rows(rows, 0, 0, 30)
    for e in range(3):
        assert sorted(stream[10 * e:10 * e + 10].tolist()) == rows.tolist()
    assert not torch.equal(stream[:10], stream[10:20])  # a new order each epoch
    assert torch.equal(data_rows(rows, 0, 7, 9), stream[7:16])  # any window of the same stream
    assert not torch.equal(data_rows(rows, 1, 0, 10), stream[:10])


def test_batches_drop_captions_to_the_empty_prompt(tmp_path, course_dir):
    cfg = make_run(tmp_path, course_dir)
    cache = DeviceCache.from_cache(load_cache(cfg), "cpu")
    rows = torch.arange(24).repeat(20)
    objective = training_objective(cfg)
    draw = lambda seed, dropout: cache.batch(rows, step_generator(0, seed), dropout, 0.0, objective)
    for p, lo, hi in ((0.0, 0.0, 0.0), (0.5, 0.4, 0.6)):
        _, context, _, t = draw(1, p)
        empty = (context == cache.embeddings[0]).flatten(1).all(1).float().mean()
        assert lo <= float(empty) <= hi
    assert int(t.min()) >= 0 and int(t.max()) < cfg.num_train_timesteps
    assert torch.equal(draw(5, 0.1)[0], draw(5, 0.1)[0])  # same step, same batch
    assert not torch.equal(draw(5, 0.1)[2], draw(6, 0.1)[2])  # another step, other noise


def test_batches_are_mirrored_only_when_asked():
    images = torch.randn(6, 3, 4, 4)
    both = torch.stack([images, images.flip(-1)], 1).half()  # the cache's layout: index 1 = mirror image
    one_caption = torch.zeros(6, 1, dtype=torch.long), torch.ones(6, dtype=torch.long)
    cache = DeviceCache(both, torch.zeros_like(both), *one_caption, torch.zeros(1, 2, 8, dtype=torch.float16))
    rows = torch.arange(6).repeat(20)
    plain, mirror = both[rows, 0].float(), both[rows, 1].float()
    x0, _, eps, _ = cache.batch(rows, step_generator(0, 1), 0.0, 0.0, Objective("epsilon", 1000))
    assert torch.equal(x0, plain)
    x0, _, eps_mirrored, _ = cache.batch(rows, step_generator(0, 1), 0.0, 0.0, Objective("epsilon", 1000), hflip=True)
    is_plain, is_mirror = (x0 == plain).flatten(1).all(1), (x0 == mirror).flatten(1).all(1)
    assert (is_plain ^ is_mirror).all() and 0.3 < float(is_mirror.float().mean()) < 0.7
    assert torch.equal(eps, eps_mirrored)  # the same random stream either way


def test_resume_is_exact(tmp_path, course_dir):
    """4 steps straight == 2 steps, stop, resume for 2 more: losses and weights (EMA too)."""
    settings = dict(max_steps=4, grad_accum=2, checkpoint_every=2, min_snr_gamma=5.0, offset_noise=0.1)
    a = make_run(tmp_path / "a", course_dir, **settings)
    train(a, progress=False)
    b = make_run(tmp_path / "b", course_dir, **settings)
    first = train(b, progress=False, stop_at=2)
    assert first.model_dir is None and [p.name for p in list_checkpoints(b.run_dir / "checkpoints")] == ["step-000002"]
    second = train(b, progress=False)
    assert second.resumed_from.endswith("step-000002") and (second.first_step, second.last_step) == (3, 4)
    assert read_log(b)["step"] == [1.0, 2.0, 3.0, 4.0]
    assert read_log(b)["loss"] == pytest.approx(read_log(a)["loss"], rel=1e-5, abs=1e-6)
    for folder in ("unet", "unet_ema"):
        wa, wb = model_weights(a, folder), model_weights(b, folder)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    ema, raw = model_weights(a, "unet_ema"), model_weights(a, "unet")
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # the EMA is an average, not a copy
    for name in ("phema-0.050.safetensors", "phema-0.100.safetensors"):  # post-hoc EMA profiles resume too
        pa, pb = (load_file(str(c.run_dir / "phema" / "step-000004" / name)) for c in (a, b))
        for k in pa:  # stored as fp16: float rounding of the run may move a value by one fp16 step
            torch.testing.assert_close(pa[k].float(), pb[k].float(), rtol=2**-10, atol=1e-6)


def test_post_hoc_ema_profiles_are_stored_and_reconstruct(tmp_path, course_dir, capsys):
    from helpers.phema import plan_rebuild, stored_profiles

    cfg = make_run(tmp_path, course_dir, max_steps=4, snapshot_every=2, checkpoint_every=2, phema_ema_lengths=[])
    train(cfg, progress=False, stop_at=2)
    assert not (cfg.run_dir / "phema").exists()  # [] = off
    train(cfg.replace(phema_ema_lengths=[0.05, 0.1]), progress=False)
    assert "Post-hoc EMA profiles [0.05, 0.1] start at this step (the checkpoint has none)" in capsys.readouterr().out
    stored = stored_profiles(cfg.run_dir / "phema")
    assert [(p.step, p.images, p.sigma_rel) for p in stored] == [(4, 32, 0.05), (4, 32, 0.1)]
    own = load_file(str(stored[0].path))
    rebuilt = plan_rebuild(stored, 0.05, max_error=None).weights()
    for k in own:  # x = (1, 0) up to float64 rounding
        torch.testing.assert_close(rebuilt[k], own[k].float(), rtol=1e-6, atol=1e-7)
    assert rebuilt.keys() == model_weights(cfg, "unet_ema").keys()  # a U-Net state dict, ready to load


def test_snapshots_keep_the_ema_unet_every_n_steps_and_at_the_end(tmp_path, course_dir):
    cfg = make_run(tmp_path, course_dir, max_steps=5, snapshot_every=2, checkpoint_every=5)
    result = train(cfg, progress=False)
    assert [Path(p).name for p in result.snapshots] == ["step-000002", "step-000004", "step-000005"]
    last = load_file(str(Path(result.snapshots[-1]) / "diffusion_pytorch_model.safetensors"))
    final = model_weights(cfg, "unet_ema")
    assert all(torch.equal(last[k], final[k]) for k in final)  # the last snapshot is the saved EMA model
    early = load_file(str(Path(result.snapshots[0]) / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(early[k], final[k]) for k in final)
    assert not list((cfg.run_dir / "snapshots").glob(".tmp-*"))


def test_v_prediction_with_gradient_checkpointing_trains(tmp_path, course_dir):
    cfg = make_run(tmp_path, course_dir, max_steps=2, prediction_type="v_prediction", gradient_checkpointing=True,
                   batch_size=4)
    result = train(cfg, progress=False)
    assert result.last_step == 2 and all(map(lambda l: l == l and l < 10, read_log(cfg)["loss"]))
    assert '"prediction_type": "v_prediction"' in (cfg.run_dir / "model" / "scheduler" / "scheduler_config.json").read_text()

def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, course_dir):
    cfg = make_run(tmp_path, course_dir, max_steps=6, lr=1e30, warmup_steps=1, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match=r"(at step \d|after step \d).*last good checkpoint is .*step-00000"):
        train(cfg, progress=False)
    found = latest_checkpoint(cfg.run_dir / "checkpoints")
    assert found is not None
    assert all(torch.isfinite(v).all() for v in found[1]["unet"].values())
    assert not (cfg.run_dir / "model").exists()


def test_damaged_or_partial_checkpoints_are_skipped(tmp_path, course_dir, capsys):
    cfg = make_run(tmp_path, course_dir, max_steps=2, checkpoint_every=1, keep_checkpoints=3)
    train(cfg, progress=False)
    root = cfg.run_dir / "checkpoints"
    (root / ".tmp-step-000003-999").mkdir()  # a writer killed mid-checkpoint
    (root / "step-000004").mkdir()  # a folder without done.json is not a checkpoint
    damaged = root / "step-000002" / "unet.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    path, ckpt = latest_checkpoint(root)
    assert path.name == "step-000001" and "Skipping" in capsys.readouterr().out
    with pytest.raises(ValueError, match="damaged checkpoint"):
        load_checkpoint(root / "step-000002")


@pytest.mark.slow
def test_killed_training_resumes_from_last_complete_checkpoint(tmp_path, course_dir):
    cfg = make_run(tmp_path, course_dir, max_steps=5, checkpoint_every=1, keep_checkpoints=2)
    root = cfg.run_dir / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "helpers.train", "--run-name", str(cfg.run_dir), "--no-progress"],
                            cwd=PROJECT_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not list_checkpoints(root) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_at = max(int(p.name[5:]) for p in list_checkpoints(root))
    assert killed_at < 5
    result = train(cfg, progress=False)
    assert result.resumed_from is not None and result.last_step == 5
    assert result.first_step == int(Path(result.resumed_from).name[5:]) + 1
    assert not list(root.glob(".tmp-*"))
    assert read_log(cfg)["step"] == [float(s) for s in range(1, 6)]  # no duplicated rows after the kill
    assert (cfg.run_dir / "model" / "unet_ema").is_dir()


@pytest.mark.slow
def test_two_processes_train_with_accelerate_launch(tmp_path, course_dir):
    cfg = make_run(tmp_path, course_dir, max_steps=2, checkpoint_every=2)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "helpers.train",
                             "--run-name", str(cfg.run_dir), "--no-progress"],
                            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "16 images/step" in result.stdout
    assert read_log(cfg)["step"] == [1.0, 2.0]  # one writer: no duplicated rows
    assert (cfg.run_dir / "model" / "unet_ema").is_dir()
    assert [p.name for p in list_checkpoints(cfg.run_dir / "checkpoints")] == ["step-000002"]


@pytest.mark.slow
def test_previews_come_from_fixed_prompts_and_seeds(tmp_path, course_dir):
    cfg = make_run(tmp_path, course_dir, max_steps=2, preview_every=2, checkpoint_every=2)
    result = train(cfg, progress=False)
    from PIL import Image

    assert [Path(p).name for p in result.previews] == ["step-000002.png"]
    grid = Image.open(result.previews[0])
    assert grid.size == (4 * 64, 2 * 64)  # 8 prompts, 4 per row, 64 px cells


@pytest.mark.slow
def test_notebook_03_trains_headless(tmp_path, course_dir):
    import papermill

    cfg = make_run(tmp_path, course_dir, max_steps=2, checkpoint_every=2, preview_every=2)
    out = tmp_path / "03.ipynb"
    papermill.execute_notebook(str(PROJECT_ROOT / "notebooks" / "03_train_cfg.ipynb"), str(out),
                               parameters=dict(run_name=cfg.run_name, outputs_dir=str(tmp_path), lr=5e-4),
                               cwd=str(PROJECT_ROOT / "notebooks"), progress_bar=False, kernel_name="python3")
    assert (cfg.run_dir / "loss_curve.png").exists() and (cfg.run_dir / "model" / "unet_ema").is_dir()
    assert read_log(cfg)["step"] == [1.0, 2.0]
    assert '"lr": 0.0005' in (cfg.run_dir / "config.json").read_text()


def test_training_length_in_epochs_and_warmup_as_a_fraction(tmp_path, course_dir):
    from helpers.step import train_rows

    cfg = make_run(tmp_path, course_dir, max_epochs=2, batch_size=8, warmup_fraction=0.5, checkpoint_every=100,
                   snapshot_every=0)
    n = len(train_rows(cfg, load_cache(cfg)))
    result = train(cfg, progress=False)
    steps = -(-2 * n // 8)  # two passes over the training images, the last step partial
    assert result.last_step == steps != cfg.max_steps
    lrs = read_log(cfg)["lr"]  # the lr each step trained with: warm-up over the first half, then decay
    assert lrs.index(max(lrs)) == round(0.5 * steps) and lrs[0] == 0.0 and lrs[-1] < max(lrs)


def test_a_resume_is_one_call_to_the_runs_saved_state(tmp_path, course_dir):
    """CheckpointIO owns what a run saves: load_latest() restores every part from the newest checkpoint."""
    from helpers.diffusion import EMA
    from helpers.phema import PowerEMA
    from helpers.run_state import CheckpointIO
    from helpers.step import unet_for_cache
    from helpers.train import make_accelerator, make_optimizer

    cfg = make_run(tmp_path, course_dir, max_steps=6, checkpoint_every=2)
    train(cfg, progress=False, stop_at=4)
    accelerator = make_accelerator(cfg)
    io = CheckpointIO.open(cfg, accelerator, resume=True)
    assert io.found[0].name == "step-000004" and io.saved_config["max_steps"] == 6
    unet = unet_for_cache(cfg, load_cache(cfg))
    ema, phema = EMA(unet, cfg.ema_halflife_images, cfg.ema_rampup), PowerEMA(unet, cfg.phema_ema_lengths)
    optimizer, lr_schedule = make_optimizer(cfg, unet, torch.device("cpu"))
    io.attach(unet, ema, phema, optimizer, lr_schedule, cfg.batch_size)
    assert io.load_latest() == (4, 4 * cfg.batch_size)  # step and data position
    saved = load_checkpoint(io.found[0])
    assert all(torch.equal(v, saved["unet"][k]) for k, v in unet.state_dict().items())
    assert all(torch.equal(v, saved["ema"][k]) for k, v in ema.state_dict().items())
    assert lr_schedule.last_epoch == 4 and optimizer.state_dict()["state"]  # AdamW's moments, not a fresh optimizer
    assert all(torch.equal(v, saved["state"]["phema"][k]) for k, v in phema.state_dict().items())
