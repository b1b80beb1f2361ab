"""Collect every scalar of every run into one long CSV: one row per (run, tag, step).

    python benchmark/collect.py benchmark/results/quick/runs/* --csv benchmark/results/quick/scalars.csv

Columns: run, env_id, exp_name, seed, tag, step, wall_time, value. The run directory's name gives the
first three ({env_id}__{exp_name}__{seed}__{time}, as every script here names it), and exp_name is the
algorithm's label in the plots. eps_kl and c_beta are added as pseudo-tags `hparams/eps_kl`, `hparams/c_beta`
(at step 0) for runs that log them, so plots can draw kl_max / eps_kl and the primary phase's target.
"""
import argparse
import csv
import os
import re

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


def collect(run_dirs, csv_path):
    """Write the CSV (atomically: a crash never leaves half a file); returns the number of rows."""
    n = 0
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for run_dir in sorted(run_dirs):
            rows = read_run(run_dir)
            writer.writerows(rows)
            n += len(rows)
    os.replace(csv_path + ".tmp", csv_path)
    return n


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run directories (runs/{env_id}__{exp_name}__{seed}__{time})")
    parser.add_argument("--csv", required=True, help="the CSV to write")
    cli = parser.parse_args()
    try:
        rows = collect([d for d in cli.run_dirs if os.path.isdir(d)], cli.csv)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"{rows} rows from {len(cli.run_dirs)} runs -> {cli.csv}")
