"""What packing the U-Net in float16 (05_eval's `fp16_model=True`) does to a run's test images.

    python benchmarks/bench_fp16.py --run demo                # the run's chosen setting, its first 16 test prompts
    python benchmarks/bench_fp16.py --run hw6-base --count 64 --outputs-dir outputs

Samples the first `--count` test prompts at the run's chosen setting (results/manifest.json, else the selection's
choice) twice, with the fp32 U-Net and with the fp16 copy the hand-in would hold (loaded as from_pretrained loads
it), writes both as the test set's PNGs, and prints the weights' sizes and the PNG differences in uint8 levels.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from helpers.data import load_prompts
from helpers.handin import fp16_copy
from helpers.layout import WEIGHTS_FILE
from helpers.results import manifest_setting, read_manifest
from helpers.run_folder import open_run
from helpers.selection import chosen_setting
from helpers.submission import generate_test_set
from helpers.weights import load_for_setting, setting_unet_folder


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--outputs-dir", default="outputs")
    ap.add_argument("--count", type=int, default=16)
    args = ap.parse_args(argv)
    from diffusers import UNet2DConditionModel

    cfg = open_run(args.run, None, args.outputs_dir, create=False)
    manifest = read_manifest(cfg.layout.results)
    setting = manifest_setting(manifest) if manifest else chosen_setting(cfg)[0]
    prompts = load_prompts(cfg.data_path / "test.json")[:args.count]
    model, _ = load_for_setting(cfg, setting)
    unet_dir = setting_unet_folder(cfg, setting)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        half = fp16_copy(unet_dir, tmp / "unet_fp16")
        kw = dict(batch_size=cfg.sample_batch_size, seed=cfg.seed, size=cfg.output_size)
        generate_test_set(model, prompts, tmp / "fp32", setting, **kw)
        unet = UNet2DConditionModel.from_pretrained(half).to(model.device).eval().requires_grad_(False)
        generate_test_set(dataclasses.replace(model, unet=unet), prompts, tmp / "fp16", setting, **kw)
        diffs = np.stack([np.abs(np.asarray(Image.open(tmp / "fp16" / p.image_name), dtype=int)
                                 - np.asarray(Image.open(tmp / "fp32" / p.image_name), dtype=int)) for p in prompts])
        full, small = (unet_dir / WEIGHTS_FILE).stat().st_size / 1e6, (half / WEIGHTS_FILE).stat().st_size / 1e6
    identical = sum(int(d.max() == 0) for d in diffs)
    print(f"run {cfg.run_name} ({cfg.profile}), {setting.label()}, {len(prompts)} prompts, {model.device}")
    print("| U-Net fp32 MB | fp16 MB | PNGs identical | max diff (uint8) | mean diff | pixels differing |")
    print(f"| {full:.1f} | {small:.1f} | {identical}/{len(prompts)} | {diffs.max()} | {diffs.mean():.4f} | "
          f"{(diffs.max(axis=-1) > 0).mean():.2%} |")


if __name__ == "__main__":
    main()
