"""Means of chosen tags by the stretch of episode time that each update's rollout covered, one row per (run, tag).

    python benchmark/phase.py benchmark/results/mujoco/scalars/fixpo__Swimmer-v5__*.csv.gz \\
        --tags losses/explained_variance trust_region/kl_mean --num-steps 256 --from-step 300000

For tasks whose episodes never end early (Swimmer-v5, HalfCheetah-v5: always 1,000 steps). There the N
vector envs reset together and stay in step for the whole run, so each rollout of T steps per env covers the
same window of episode time in every env: with T = 256, a batch holds steps 0-255 of all 8 episodes, or
256-511, and so on, never the whole episode. Update k (logged at global step k * N * T) covered episode time
from ((k - 1) * T) mod (L + 1) on, where L is the episode length and the extra step is the NEXT_STEP autoreset
transition. This groups each update's logged values by that start, in `--bins` equal windows of L + 1.
"""
import argparse
import math
import os
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from binned import read_rows, run_name  # noqa: E402


def window_start(update, num_steps, episode_len):
    """Episode time at which update `update` (1-based)'s rollout began, for envs that never end early."""
    return ((update - 1) * num_steps) % (episode_len + 1)


def phase_means(rows, tags, num_steps, episode_len, bins, batch, from_step=0):
    """{tag: [mean over the updates whose rollout began in window 0, 1, ..., bins - 1]} (NaN where empty)."""
    width = (episode_len + 1) / bins
    groups = {tag: defaultdict(list) for tag in tags}
    for *_, tag, step, _, value in rows:
        if tag in groups and step > from_step and step % batch == 0:
            groups[tag][int(window_start(step // batch, num_steps, episode_len) // width)].append(value)
    return {tag: [float(np.mean(g[b])) if g[b] else float("nan") for b in range(bins)] for tag, g in groups.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories or grid.py's kept scalars files (*.csv.gz)")
    parser.add_argument("--tags", nargs="+", required=True)
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=256, help="steps per env per rollout (T)")
    parser.add_argument("--episode-len", type=int, default=1000, help="L, the task's episode length")
    parser.add_argument("--bins", type=int, default=4)
    parser.add_argument("--from-step", type=int, default=0, help="only updates logged after this global step")
    cli = parser.parse_args(argv)
    width = (cli.episode_len + 1) / cli.bins
    heads = [f"{math.ceil(b * width)}-{math.ceil((b + 1) * width) - 1}" for b in range(cli.bins)]
    print("| run | tag | " + " | ".join(f"rollout began at episode step {h}" for h in heads) + " |")
    print("|---|---|" + "---|" * cli.bins)
    for path in cli.runs:
        means = phase_means(read_rows(path), cli.tags, cli.num_steps, cli.episode_len, cli.bins,
                            cli.num_envs * cli.num_steps, cli.from_step)
        for tag, values in means.items():
            print(f"| {run_name(path)} | {tag} | " + " | ".join("-" if np.isnan(v) else f"{v:.4g}" for v in values) + " |")


if __name__ == "__main__":
    main()
