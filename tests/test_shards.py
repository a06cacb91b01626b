"""Sampling split over processes (helpers.shards): 2 CPU processes (gloo, torchrun) give the one-process images."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.shards import Shards
from helpers.train import train
from test_train import make_run

WORKER = Path(__file__).with_name("shard_worker.py")


def test_shares_cover_every_item_once_and_gather_restores_the_order():
    shares = [Shards(r, 3).share(8) for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(8)) and shares[0] == [0, 3, 6]
    assert Shards().gather(["a", "b"], 2) == ["a", "b"] and Shards().is_main


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cfg, out: Path, processes: int) -> str:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    args = [torchrun, "--nproc_per_node", str(processes), "--master_port", str(_free_port()), str(WORKER), cfg.run_name,
            str(cfg.outputs_dir), str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_two_processes_write_the_same_pngs_as_one(tmp_path, monkeypatch):
    from conftest import write_course_dataset

    cfg = make_run(tmp_path, write_course_dataset(tmp_path / "course"), max_steps=2, snapshot_every=2,
                   checkpoint_every=2)
    train(cfg, progress=False)
    two = _launch(cfg, tmp_path / "two", 2)
    assert "rank 0 of 2 done" in two and "rank 1 of 2 done" in two
    (tmp_path / "one").mkdir()  # the same script in this one process
    monkeypatch.setattr(sys, "argv", ["shard_worker.py", cfg.run_name, str(cfg.outputs_dir), str(tmp_path / "one")])
    import runpy

    runpy.run_path(str(WORKER), run_name="__main__")
    a, b = torch.load(tmp_path / "one" / "images.pt"), torch.load(tmp_path / "two" / "images.pt")
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)  # gathered in the prompts' order
    pngs = sorted(p.name for p in (tmp_path / "one" / "results").glob("*.png"))
    assert pngs and pngs == sorted(p.name for p in (tmp_path / "two" / "results").glob("*.png"))
    same = [(tmp_path / "one" / "results" / n).read_bytes() == (tmp_path / "two" / "results" / n).read_bytes()
            for n in pngs]
    assert all(same), f"{same.count(False)} of {len(pngs)} PNGs differ"
    # the staged sweep split over both processes: the same finalists with the same scores
    rows1, rows2 = torch.load(tmp_path / "one" / "rows.pt"), torch.load(tmp_path / "two" / "rows.pt")
    assert [r["setting"] for r in rows1] == [r["setting"] for r in rows2] and len(rows1) == 2
    # float rounding of other batch shapes (the PNGs above, after uint8 rounding, are identical)
    assert [r["clip_t"] for r in rows1] == pytest.approx([r["clip_t"] for r in rows2], abs=1e-6)
    manifest = lambda d: (d / "results" / "manifest.json").read_text()  # noqa: E731
    assert '"complete": true' in manifest(tmp_path / "two")
