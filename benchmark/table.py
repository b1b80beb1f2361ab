"""A Markdown table per task from a grid's summary.csv (grid.py's `mujoco` grid writes one).

    python benchmark/table.py benchmark/results/mujoco/summary.csv
    python benchmark/table.py benchmark/results/mujoco/summary.csv benchmark/results/beta_floor/summary.csv \
        --algorithms fixpo fixpo_beta_floor        # a screen against the default; the difference is first - second

Per task: each algorithm's final return (mean +- sd over seeds, n seeds), FixPO minus PPO-clip with the 95%
interval of the difference (Welch's t), the median peak-to-final drop of each algorithm (peak_return -
final_return, per run), FixPO's fixup share, and how many of its policy updates ended inside eps_kl.
"""
import argparse
import csv
from collections import defaultdict

import numpy as np

ALGORITHMS = ["fixpo", "ppo", "trpo"]
NAMES = {"fixpo": "FixPO", "ppo": "PPO-clip", "trpo": "TRPO"}


def read(*summary_csvs):
    """{env_id: {algorithm: [row, ...]}} with numbers as floats, from one or more summary files."""
    runs = defaultdict(lambda: defaultdict(list))
    for summary_csv in summary_csvs:
        with open(summary_csv, newline="") as f:
            for r in csv.DictReader(f):
                runs[r["env_id"]][r["algorithm"]].append({k: (v if k in ("algorithm", "env_id") else float(v))
                                                          for k, v in r.items()})
    return runs


def welch_interval(a, b, level=0.95):
    """(mean(a) - mean(b), low, high): the interval of the difference of means by Welch's t; nan if a side has
    fewer than 2 runs."""
    from scipy.stats import t

    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = a.mean() - b.mean() if len(a) and len(b) else np.nan
    if len(a) < 2 or len(b) < 2:
        return diff, np.nan, np.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = np.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se > 0 else 1.0
    half = t.ppf(0.5 + level / 2, dof) * se
    return diff, diff - half, diff + half


def fmt_return(rows, dec=0):
    if not rows:
        return "-"
    finals = np.array([r["final_return"] for r in rows])
    sd = f" +- {finals.std(ddof=1):.{dec}f}" if len(finals) > 1 else ""
    return f"{finals.mean():.{dec}f}{sd} ({len(finals)})"


def table(runs, algorithms=ALGORITHMS):
    """The first algorithm is the one whose fixup share and region are reported; the difference is the first
    minus the second."""
    name = lambda a: NAMES.get(a, a)
    first, second = algorithms[0], (algorithms[1] if len(algorithms) > 1 else None)  # one: no difference column
    lines = ["| task | " + " | ".join(f"{name(a)} final (seeds)" for a in algorithms)
             + (f" | {name(first)} - {name(second)} [95%]" if second else "") + " | median peak-to-final drop "
             + " / ".join(name(a) for a in algorithms)
             + f" | {name(first)} fixup share | {name(first)} updates inside eps_kl |",
             "|" + "---|" * (len(algorithms) + (5 if second else 4))]
    for env_id in sorted(runs):
        by = runs[env_id]
        # one decimal where every return is small (Swimmer, Reacher), so that -4.3 and -5.5 stay apart
        dec = 1 if all(abs(r["final_return"]) < 100 for rows in by.values() for r in rows) else 0
        diff, lo, hi = welch_interval([r["final_return"] for r in by.get(first, [])],
                                      [r["final_return"] for r in by.get(second, [])])
        drops = " / ".join(f"{np.median([r['peak_return'] - r['final_return'] for r in by[a]]):.{dec}f}"
                           if by.get(a) else "-" for a in algorithms)
        fixpo = by.get(first, [])
        share = f"{np.mean([r['fixup_share'] for r in fixpo]):.2%}" if fixpo else "-"
        inside = (f"{np.mean([r['updates_in_region'] for r in fixpo]):.2%}, worst "
                  f"{max(r['worst_kl_over_eps'] for r in fixpo):.3f} x eps_kl, "
                  f"{int(sum(r['fallbacks'] for r in fixpo))} fallbacks") if fixpo else "-"
        interval = "-" if np.isnan(diff) else f"{diff:+.{dec}f}" + ("" if np.isnan(lo) else f" [{lo:+.{dec}f}, {hi:+.{dec}f}]")
        lines.append(f"| {env_id} | " + " | ".join(fmt_return(by.get(a, []), dec) for a in algorithms)
                     + (f" | {interval}" if second else "") + f" | {drops} | {share} | {inside} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summary_csvs", nargs="+")
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS, help="columns, in order (one: its rows alone)")
    cli = parser.parse_args()
    print(table(read(*cli.summary_csvs), cli.algorithms))
