"""Means of chosen TensorBoard tags per bin of environment steps, one markdown row per (run, tag).

    python benchmark/binned.py benchmark/results/atari/runs/Pong* --tags charts/episodic_return \\
        trust_region/kl_mean losses/approx_kl --bin 100000
    python benchmark/binned.py benchmark/results/mujoco/scalars/fixpo__InvertedDoublePendulum-v5__1.csv.gz \
        --tags charts/episodic_return fixpo/beta --bin 100000

With `--last N`, one column instead: each tag's mean over each run's last N steps, and a row of the mean +- sd
over the runs (steadier than the summaries' last 20 episodes where episodes are short, e.g. Reacher-v5's 50 steps).

For reading how a run moved over time (e.g. the policy's KL per update against a baseline's), where a curve
is too coarse and a single final number too little. A run is a run directory or one of grid.py's kept scalars
files (OUT/scalars/*.csv.gz, for grids whose run directories are not kept). A tag a run does not log is left out of its rows; a bin
with no value of the tag prints "-". Steps are each script's global step (agent steps on Atari).
"""
import argparse
import csv
import gzip
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from collect import read_run  # noqa: E402


def read_rows(path):
    """collect.py's rows of a run directory or of a kept scalars file (the same columns, gzipped CSV)."""
    if not path.endswith(".csv.gz"):
        return read_run(path)
    with gzip.open(path, "rt", newline="") as f:
        return [[*r[:5], int(r[5]), float(r[6]), float(r[7])] for r in list(csv.reader(f))[1:]]


def run_name(path):
    return os.path.basename(os.path.normpath(path)).removesuffix(".csv.gz")


def binned_means(run_dir, tags, bin_size, until=None):
    """{tag: [mean of the values logged in bin 0, bin 1, ...]} (NaN where a bin is empty); with the bin starts."""
    rows = read_rows(run_dir)
    last = max((r[5] for r in rows), default=0) if until is None else until
    starts = list(range(0, int(last) + 1, bin_size))
    out = {}
    for tag in tags:
        pts = np.array([(r[5], r[7]) for r in rows if r[4] == tag], dtype=float).reshape(-1, 2)
        if len(pts) == 0:
            continue
        out[tag] = [float(pts[(pts[:, 0] >= s) & (pts[:, 0] < s + bin_size), 1].mean())
                    if ((pts[:, 0] >= s) & (pts[:, 0] < s + bin_size)).any() else float("nan") for s in starts]
    return starts, out


def last_means(run_dir, tags, n):
    """{tag: mean of the values logged after the run's last step - n} (NaN where none)."""
    rows = read_rows(run_dir)
    end = max((r[5] for r in rows), default=0)
    out = {}
    for tag in tags:
        points = [(r[5], r[7]) for r in rows if r[4] == tag]
        if points:  # end is over every tag, so a tag that stopped logging early gives NaN, not an older mean
            late = [v for step, v in points if step > end - n]
            out[tag] = float(np.mean(late)) if late else float("nan")
    return out


def last_table(run_dirs, tags, n):
    """A markdown table: run, tag, mean over the run's last n steps; then mean +- sd over the runs, per tag."""
    results = [(run_name(d), last_means(d, tags, n)) for d in run_dirs]
    lines = [f"| run | tag | last {n // 1000}k steps |", "|---|---|---|"]
    for name, means in results:
        lines += [f"| {name} | {tag} | {v:.4g} |" for tag, v in means.items()]
    for tag in tags:
        values = [m[tag] for _, m in results if tag in m and not np.isnan(m[tag])]
        if len(values) > 1:
            lines.append(f"| mean +- sd ({len(values)} runs) | {tag} | {np.mean(values):.4g} +- {np.std(values, ddof=1):.2g} |")
    return "\n".join(lines)


def table(run_dirs, tags, bin_size, until=None):
    """A markdown table: run, tag, then one column per bin (as many as the longest run has)."""
    results = [(run_name(d), *binned_means(d, tags, bin_size, until)) for d in run_dirs]
    starts = max((s for _, s, _ in results), key=len)
    fmt = lambda v: "-" if np.isnan(v) else f"{v:.4g}"
    lines = ["| run | tag | " + " | ".join(f"{s // 1000}k-{(s + bin_size) // 1000}k" for s in starts) + " |",
             "|---|---|" + "---|" * len(starts)]
    for name, _, means in results:
        for tag, values in means.items():
            values = values + [float("nan")] * (len(starts) - len(values))
            lines.append(f"| {name} | {tag} | " + " | ".join(fmt(v) for v in values) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run directories ({env_id}__{exp_name}__{seed}__{time}) or kept scalars files (.csv.gz)")
    parser.add_argument("--tags", nargs="+", required=True, help="TensorBoard scalar tags")
    parser.add_argument("--bin", type=int, default=100000, help="bin width in steps")
    parser.add_argument("--until", type=int, help="last step to cover (default: each run's last)")
    parser.add_argument("--last", type=int, help="instead of bins: the mean over each run's last N steps")
    cli = parser.parse_args()
    if cli.bin < 1 or (cli.last is not None and cli.last < 1):
        sys.exit("error: --bin and --last must be >= 1")
    if cli.last and cli.until is not None:
        sys.exit("error: --last takes each run's own last steps; leave out --until")
    print(last_table(cli.run_dirs, cli.tags, cli.last) if cli.last else table(cli.run_dirs, cli.tags, cli.bin, cli.until))
