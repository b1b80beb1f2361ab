#!/usr/bin/env bash
# Hopper-v4 for 1M steps per seed with fixpo_continuous.py (or SCRIPT=...), two runs at a time (one torch thread each),
# each under /usr/bin/time -v for peak memory; then the summary table of every run of this TAG.
#
#   bash benchmark/hopper_1m.sh TAG "SEEDS" [fixpo_continuous.py args...]
#   bash benchmark/hopper_1m.sh default "1 2 3 4 5 6"
#   bash benchmark/hopper_1m.sh eps05 "1 2 3 4" --eps-kl 0.5
#   SCRIPT=ablations/fixpo_no_fixup.py bash benchmark/hopper_1m.sh no_fixup "1 2"
#
# Logs: benchmark/logs/TAG-SEED-TIME.{log,err}; TensorBoard: runs/Hopper-v4__TAG__SEED__TIME.
# A finished run is never re-run or overwritten: a seed that already exited 0 under this TAG is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=$1; seeds=$2; shift 2
script=${SCRIPT:-fixpo_continuous.py}
mkdir -p benchmark/logs
for seed in $seeds; do
  if grep -qs "Exit status: 0" benchmark/logs/"$tag-$seed"-*.err; then echo "skip $tag seed $seed: finished" >&2; continue; fi
  echo "$seed"
done | xargs -P 2 -I{} sh -c 'log=benchmark/logs/'"$tag"'-{}-$(date +%s); /usr/bin/time -v python '"$script"' --env-id Hopper-v4 --seed {} --exp-name '"$tag"' '"$*"' > $log.log 2> $log.err; grep -h "Maximum resident" $log.err'
python benchmark/summarize.py runs/Hopper-v4__"$tag"__*
