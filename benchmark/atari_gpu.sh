#!/usr/bin/env bash
# fixpo_atari.py for 10M agent steps (40M frames) on PongNoFrameskip-v4 and BreakoutNoFrameskip-v4, seed 1, both
# at once, on a machine with a CUDA GPU; then the summary (benchmark/results/atari10m/summary.csv) and the
# score-against-steps figure. Resumable: a finished run's scalars are kept and skipped on a second call.
#
#   bash benchmark/atari_gpu.sh                     # from the repository root, in the installed virtualenv
#   CLEANRL_PPO_ATARI=/path/to/cleanrl/ppo_atari.py bash benchmark/atari_gpu.sh   # also CleanRL's PPO on Pong
#
# Needs: pip install -r requirements.txt -r benchmark/requirements.txt, with a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmark/results/atari10m
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this script is for a GPU machine'"
python benchmark/grid.py atari10m --jobs 2 --out "$out"
if [[ -n "${CLEANRL_PPO_ATARI:-}" ]]; then
    # CleanRL's script beside the project (not part of it); its runs/ folder goes next to FixPO's
    mkdir -p "$out/cleanrl"
    (cd "$out/cleanrl" && python "$CLEANRL_PPO_ATARI" --env-id PongNoFrameskip-v4 --seed 1 \
        --total-timesteps 10000000 --exp-name ppo_cleanrl > ppo_cleanrl.log 2>&1)
    python benchmark/summarize.py "$out"/cleanrl/runs/*
fi
python benchmark/table.py "$out/summary.csv"
python benchmark/plots.py "$out/scalars.csv" --out "$out" --kind algorithms
