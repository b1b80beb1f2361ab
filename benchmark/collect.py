"""Collect every scalar of every run into one long CSV: one row per (run, tag, step).

    python benchmark/collect.py benchmark/results/quick/runs/* --csv benchmark/results/quick/scalars.csv
    python benchmark/collect.py benchmark/results/atari/scalars/*.csv.gz benchmark/results/atari/runs/*ppo_cleanrl* \
        --csv /tmp/atari.csv --summary benchmark/results/atari/summary.csv

Columns: run, env_id, exp_name, seed, tag, step, wall_time, value. The run directory's name gives the
first three ({env_id}__{exp_name}__{seed}__{time}, as every script here names it), and exp_name is the
algorithm's label in the plots. eps_kl and c_beta are added as pseudo-tags `hparams/eps_kl`, `hparams/c_beta`
(at step 0) for runs that log them, so plots can draw kl_max / eps_kl and the primary phase's target.
--summary also writes summary.csv (columns SUMMARY, one row per run, as grid.py does for finished runs) from
any run directories, finished or paused (`steps` says how far each got); runs that log no trust_region/kl_max
(CleanRL's own scripts) get nan in the two KL columns. An input ending in .csv.gz is a run's scalars as grid.py
keeps them (benchmark/results/*/scalars/), read in place of its run directory, which a fresh checkout may not have.
"""
import argparse
import csv
import gzip
import os
import re
from collections import defaultdict

import numpy as np

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

COLUMNS = ["run", "env_id", "exp_name", "seed", "tag", "step", "wall_time", "value"]


def read_run(run_dir):
    """Rows of one run directory."""
    name = os.path.basename(os.path.normpath(run_dir))
    parts = name.split("__")
    if len(parts) != 4:
        raise ValueError(f"{run_dir}: not a run directory ({{env_id}}__{{exp_name}}__{{seed}}__{{time}})")
    env_id, exp_name, seed = parts[0], parts[1], int(parts[2])
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    rows = []
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            rows.append([name, env_id, exp_name, seed, tag, e.step, e.wall_time, e.value])
    if "hyperparameters/text_summary" in acc.Tags()["tensors"]:
        text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
        for hparam in ("eps_kl", "c_beta"):
            found = re.search(rf"\|{hparam}\|([^|]+)\|", text)
            if found:
                rows.append([name, env_id, exp_name, seed, f"hparams/{hparam}", 0, 0.0, float(found.group(1))])
    return rows


def read_kept(path):
    """Rows of one run from grid.py's kept scalars file (gzipped CSV, COLUMNS)."""
    with gzip.open(path, "rt", newline="") as g:
        reader = csv.reader(g)
        if next(reader, None) != COLUMNS:
            raise ValueError(f"{path}: not a kept scalars file (columns {', '.join(COLUMNS)})")
        return list(reader)


def collect(run_dirs, csv_path):
    """Write the CSV (atomically: a crash never leaves half a file) from run directories and/or kept scalars
    files; returns the number of rows. The same run given twice (its folder and its kept file) is refused."""
    n, seen = 0, {}
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for source in sorted(run_dirs):
            rows = read_kept(source) if source.endswith(".csv.gz") else read_run(source)
            for run in {(r[2], r[1], str(r[3])) for r in rows}:  # (exp_name, env_id, seed): one summary row each
                if run in seen:
                    raise ValueError(f"{source}: run {'__'.join(run)} already read from {seen[run]}")
                seen[run] = source
            writer.writerows(rows)
            n += len(rows)
    os.replace(csv_path + ".tmp", csv_path)
    return n


def concat_scalars(paths, csv_path):
    """One CSV from several of grid.py's kept per-run files (gzipped, same columns); returns the number of rows."""
    n = 0
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for path in sorted(paths):
            rows = read_kept(path)
            writer.writerows(rows)
            n += len(rows)
    os.replace(csv_path + ".tmp", csv_path)
    return n


SUMMARY = ["algorithm", "env_id", "seed", "steps", "final_return", "peak_return", "worst_kl_over_eps",
           "updates_in_region", "fixup_share", "fallbacks", "wall_s"]


def summary_row(run, eps_kl_default=0.2, window=20):
    """One summary row from a run's {tag: [(step, wall_time, value), ...]}: final return = mean of the last
    `window` episodes, peak return = the best mean of `window` consecutive episodes; KL against the run's eps_kl
    (the baselines log none: FixPO's default 0.2); fixup share = fixup / all policy gradient steps."""
    get = lambda tag: np.array([v for _, _, v in sorted(run.get(tag, []), key=lambda e: e[0])])
    returns, kl_max = get("charts/episodic_return"), get("trust_region/kl_max")
    eps_kl = get("hparams/eps_kl")[0] if "hparams/eps_kl" in run else eps_kl_default
    if len(returns) == 0:
        returns = np.array([np.nan])  # no episode ended: nan, not a warning
    means = np.convolve(returns, np.ones(window) / window, "valid") if len(returns) >= window else returns.mean(keepdims=True)
    primary, fixup = get("fixpo/primary_grad_steps").sum(), get("fixpo/fixup_grad_steps").sum()
    fallbacks = get("fixpo/fixup_fallbacks")
    events = [e for tag, es in run.items() if not tag.startswith("hparams/") for e in es]
    return {"steps": max(s for s, _, _ in events), "final_return": returns[-window:].mean(),
            "peak_return": means.max(), "worst_kl_over_eps": kl_max.max() / eps_kl if len(kl_max) else np.nan,
            "updates_in_region": float(np.mean(kl_max <= eps_kl)) if len(kl_max) else np.nan,  # nan: no KL logged
            "fixup_share": fixup / max(primary + fixup, 1), "fallbacks": int(fallbacks[-1]) if len(fallbacks) else 0,
            "wall_s": training_seconds([w for _, w, _ in events], [w for _, w, _ in run.get("charts/SPS", [])])}


def training_seconds(wall_times, update_times=(), gap=3600.0):
    """Seconds from a run's first logged event to its last, less the pauses of a run resumed from a checkpoint:
    a silence longer than `gap` seconds and 20 updates (the median interval of `update_times`, one event per
    update) counts as one update."""
    walls = np.sort(np.asarray(wall_times, dtype=float))
    deltas = np.diff(walls)
    if len(deltas) == 0:
        return 0.0
    per_update = np.diff(np.sort(np.asarray(update_times, dtype=float)))
    typical = float(np.median(per_update)) if len(per_update) else float(np.median(deltas))
    return float(np.where(deltas > max(gap, 20 * typical), typical, deltas).sum())


def write_summary(csv_path, summary_path):
    """summary.csv (columns SUMMARY), one row per run of the scalars CSV; returns the number of runs."""
    runs = defaultdict(lambda: defaultdict(list))
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            runs[(r["exp_name"], r["env_id"], int(r["seed"]))][r["tag"]].append(
                (int(r["step"]), float(r["wall_time"]), float(r["value"])))
    with open(summary_path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SUMMARY)
        for (algorithm, env_id, seed), run in sorted(runs.items()):
            row = summary_row(run)
            writer.writerow([algorithm, env_id, seed, row["steps"]] + [
                f"{row[c]:.6g}" if isinstance(row[c], float) else row[c] for c in SUMMARY[4:]])
    os.replace(summary_path + ".tmp", summary_path)
    return len(runs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run directories (runs/{env_id}__{exp_name}__{seed}__{time}) "
                        "or grid.py's kept scalars files (scalars/*.csv.gz)")
    parser.add_argument("--csv", required=True, help="the CSV to write")
    parser.add_argument("--summary", help="also write this summary.csv, one row per run")
    cli = parser.parse_args()
    try:
        rows = collect([d for d in cli.run_dirs if os.path.isdir(d) or d.endswith(".csv.gz")], cli.csv)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    print(f"{rows} rows from {len(cli.run_dirs)} runs -> {cli.csv}")
    if cli.summary:
        print(f"{write_summary(cli.csv, cli.summary)} runs -> {cli.summary}")
