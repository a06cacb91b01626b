"""Run by test_shards.py, once alone and once under torchrun with 2 CPU processes: samples the same prompts through
helpers.shards and writes the test set, so the two can be compared byte for byte."""
import sys

import torch

from helpers.data import load_prompts
from helpers.model import load_model
from helpers.run_folder import open_run
from helpers.weights import setting_weights_id
from helpers.setting import Setting
from helpers.shards import Shards
from helpers.submission import write_test_set

run_name, outputs_dir, out = sys.argv[1:4]
torch.set_num_threads(1)
shards = Shards.current()
cfg = open_run(run_name, None, outputs_dir)
model = load_model(cfg)
prompts = load_prompts(cfg.data_path / "test.json")
setting = Setting(scheduler="ddpm", steps=3, guidance=3.0)  # ancestral: per-image noise at every step too
images = shards.sample(model, [p.text for p in prompts], [cfg.seed + i for i in range(len(prompts))], setting,
                       batch_size=3)
if shards.is_main:
    torch.save(images, f"{out}/images.pt")
write_test_set(model, prompts, f"{out}/results", setting, setting_weights_id(cfg, setting), seed=cfg.seed,
               size=cfg.output_size, batch_size=3)


class BrightJudge:
    key, kind, reference = "bright", "course", {}

    def per_prompt(self, images, positions=None):
        return {"clip_t": images.double().mean((1, 2, 3)).numpy()}


from helpers.selection import sweep_settings  # noqa: E402
from helpers.staged import staged_sweep  # noqa: E402

cells = sweep_settings(setting, guidance=[1.0, 2.0, 3.0])
rows, _ = staged_sweep(model, cfg, BrightJudge(), cells, [p.text for p in prompts],
                       [cfg.seed + i for i in range(len(prompts))], batch_size=3, stage_prompts=[4], keep=0.5,
                       budget_hours=0, progress=False, folder=f"{out}/staged")
if shards.is_main:
    torch.save(rows, f"{out}/rows.pt")
print(f"rank {shards.rank} of {shards.world} done")
