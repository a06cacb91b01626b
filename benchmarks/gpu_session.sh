#!/usr/bin/env bash
# The prepared GPU session (issue 22): one script that measures what only a GPU can, with random-initialised parts of
# the real configs, into one log to paste into benchmarks/RESULTS.md. Run it on a lent or rented CUDA machine:
#     make env TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#     bash benchmarks/gpu_session.sh 2>&1 | tee gpu_session.log          # about 20 min on one H100
# Nothing here needs the model hub: the U-Net, VAE and text tower are built from config with random weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv
$PY -c "from helpers.precision import decide; print('precision auto:', decide('auto', 'cuda').reason)"
# 1. the fp16 fit on a 16 GB cap (a T4/V100/P100 simulated), then auto's precision on the whole card
$PY benchmarks/bench_fit.py --device cuda --preset hw6-recipe --batch 64 --steps 10 --cap-gb 16 --mixed-precision fp16
$PY benchmarks/bench_fit.py --device cuda --preset hw6-recipe --batch 64 --steps 10 --cap-gb 0 --mixed-precision auto --no-fit
$PY benchmarks/bench_fit.py --device cuda --preset hw6-recipe --batch 64 --steps 10 --cap-gb 0 --mixed-precision bf16 --no-fit
# 2. training images/s: our loop against the course's reference loop
$PY benchmarks/bench_train.py --device cuda --size full --batch 64 --steps 30
# 3. sampling images/s at hw6 scale (1,063 prompts, SD latents), the schedulers the sweep uses
$PY benchmarks/bench_sample.py --device cuda --size full --schedulers dpm++2m --steps 10,15,20
# 4. the staged selection against the full sweep, on a demo run trained here (GPU minutes, not CPU ones)
$PY -m helpers.runs --profile demo --run-name gpu-demo --only 01_data 02_unet_arch 03_train_cfg
$PY benchmarks/bench_selection.py --run gpu-demo --plan 16,48:0.33 --plan 32,96:0.33
# 5. the hw6 FLOP arithmetic the per-card table is derived from (seconds = FLOP / measured FLOP/s above)
$PY -m helpers.selection_cost
