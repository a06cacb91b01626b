"""Run by test_gpu_paths.py under torchrun with 2 CPU processes (gloo): trains runs of one outputs folder in turn,
`run_name:max_steps` each, through helpers.train.train as `accelerate launch -m helpers.train` does, and saves
the cache rows each micro-step of each process drew and the gradient norms each step clipped (after DDP's
average), in drawn-<run>-<max_steps>-rank<r>.pt in the out folder."""
import sys

import torch
from accelerate import Accelerator

from helpers.run_folder import load_config
from helpers.step import DeviceCache
from helpers.train import train

outputs_dir, out, *runs = sys.argv[1:]
torch.set_num_threads(1)
drawn: dict = {"rows": [], "grad_norms": []}
batch, clip = DeviceCache.batch, Accelerator.clip_grad_norm_


def recording_batch(self, rows, *args, **kwargs):
    drawn["rows"].append(rows.clone())
    return batch(self, rows, *args, **kwargs)


def recording_clip(self, *args, **kwargs):
    norm = clip(self, *args, **kwargs)
    drawn["grad_norms"].append(float(norm))
    return norm


DeviceCache.batch, Accelerator.clip_grad_norm_ = recording_batch, recording_clip
rank = 0
for spec in runs:
    name, max_steps = spec.split(":")
    drawn = {"rows": [], "grad_norms": []}
    result = train(load_config(f"{outputs_dir}/runs/{name}"), progress=False, max_steps=int(max_steps))
    rank = torch.distributed.get_rank()
    torch.save(drawn, f"{out}/drawn-{name}-{max_steps}-rank{rank}.pt")
    print(f"rank {rank}: {name} steps {result.first_step}-{result.last_step}")
torch.distributed.destroy_process_group()
print(f"rank {rank} done")
