"""Draw the benchmark's figures (PNG) from the CSV that collect.py writes.

    python benchmark/plots.py benchmark/results/quick/scalars.csv --out benchmark/results/quick/plots

One line per algorithm (the run's exp_name), one panel per env id: the mean over seeds, with a band of
+- 1.96 standard errors (a normal approximation: with 2-3 seeds read it as a spread, not a test), or
of the seeds' min to max on the log-scale kl_max figure.
  returns_vs_steps.png   charts/episodic_return (mean of the last 20 episodes) against env steps (paper Fig. 3, 5)
  returns_vs_time.png    the same against wall-clock minutes
  kl_max_over_eps.png    trust_region/kl_max / eps_kl per policy update; above the line at 1 = outside the region
  fixup_steps.png        fixpo/fixup_grad_steps per policy update, mean of 10 updates (paper Fig. 1: label runs
                         by c_beta, as grid.py's "cbeta" grid does)
  action_std.png         charts/action_std, the policy's mean standard deviation (paper Fig. 4)
  kl_and_beta.png        trust_region/kl_max and fixpo/beta over a window of consecutive updates of one run
  trace.png              the batch's max KL and beta after every gradient step of the updates a run traced
                         (`--trace-updates A B`; paper Fig. 2), fixup steps shaded green, one panel per run
  success_rate.png       charts/success_rate (Meta-World)
  tasks_success_rate.png tasks/success_rate/* (Meta-World MT10/MT50), one panel per task
  tasks_kl_max.png       tasks/kl_max/*: each task's own max KL after every update (shared vs per-task beta)
With --kind algorithms (the `mujoco` grid), only:
  fig3_returns.png       return against steps per task, mean and 95% t-interval over seeds (paper Fig. 3)
  fig3_kl_max_over_eps.png  kl_max / eps_kl per update, log scale: only FixPO stays below 1
With --kind atari, the same pair as atari_returns.png and atari_kl_max_over_eps.png (whole-game scores).
--prefix P names each file P + its name (the committed figures use algorithms_, ablations_, mt1_, mt10_).
Needs matplotlib: pip install -r benchmark/requirements.txt
"""
import argparse
import csv
import os
import re
import textwrap
import warnings
from collections import defaultdict

import numpy as np


def load(csv_path):
    """{exp_name: {env_id: {seed: {tag: (steps, wall_times, values)}}}}, each array sorted by step."""
    raw = defaultdict(lambda: defaultdict(list))
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            raw[(r["exp_name"], r["env_id"], int(r["seed"]))][r["tag"]].append(
                (int(r["step"]), float(r["wall_time"]), float(r["value"])))
    data = defaultdict(lambda: defaultdict(dict))
    for (exp, env, seed), tags in raw.items():
        data[exp][env][seed] = {t: tuple(np.array(c) for c in zip(*sorted(v, key=lambda x: x[0]))) for t, v in tags.items()}
    return data


def natural(name):
    """Sort key: fixpo_cbeta2 before fixpo_cbeta10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def running_mean(values, window=20):
    """Mean of the last `window` values at each point (fewer at the start)."""
    c = np.concatenate([[0.0], np.cumsum(values)])
    i = np.arange(1, len(values) + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


# one colour per algorithm in every panel and figure; other labels take the next free colours in turn
COLORS = {"fixpo": "tab:blue", "ppo": "tab:orange", "trpo": "tab:green"}


def color_of(exp, order):
    free = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
    others = [e for e in order if e not in COLORS]
    return COLORS.get(exp) or free[others.index(exp) % len(free)]


def band(curves, grid, spread="se"):
    """Mean of several (x, y) curves, each linearly interpolated onto `grid`, with a band: mean +- 1.96
    standard errors (spread="se"), a 95% confidence interval of the mean from Student's t with n - 1 degrees of
    freedom (spread="t95": honest with 3-5 seeds), or the seeds' min to max (spread="minmax", for log scales)."""
    if spread == "minmax":  # log-scale KL: each seed's largest value in each bin, so no spike falls between points
        ys = np.array([binned_max(x, y, grid) for x, y in curves])
    else:
        ys = np.array([np.interp(grid, x, y, left=np.nan, right=np.nan) for x, y in curves])
    # only where every seed has a value: past one seed's end (a paused run, or its last episode a few steps before
    # another's) the mean would be the other seeds' alone and jump
    keep = ~np.any(np.isnan(ys), axis=0)
    grid, ys = grid[keep], ys[:, keep]
    mean = np.nanmean(ys, axis=0)
    if spread == "minmax":
        return grid, mean, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
    n = np.sum(~np.isnan(ys), axis=0)
    with warnings.catch_warnings():  # a point with one seed has no spread: 0 below, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        se = np.where(n > 1, np.nanstd(ys, axis=0, ddof=1) / np.sqrt(n), 0.0)
    if spread == "t95":
        from scipy.stats import t

        half = se * np.where(n > 1, t.ppf(0.975, np.maximum(n - 1, 1)), 0.0)
        return grid, mean, mean - half, mean + half
    return grid, mean, mean - 1.96 * se, mean + 1.96 * se


def binned_max(x, y, grid):
    """The largest y with x in each bin (grid[i-1], grid[i]] (the first bin: x <= grid[0]); nan for an empty bin."""
    out = np.full(len(grid), np.nan)
    idx = np.searchsorted(grid, x)
    inside = idx < len(grid)
    np.fmax.at(out, idx[inside], y[inside])
    return out


def eps_kl_of(run, default):
    return run["hparams/eps_kl"][2][0] if "hparams/eps_kl" in run else default


def panels(plt, data, title, cols=None):
    envs = sorted({env for exp in data.values() for env in exp})
    cols = min(cols or len(envs), len(envs))
    rows = -(-len(envs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(envs):]:
        ax.axis("off")
    fig.suptitle("\n".join(textwrap.wrap(title, 60 * cols)))  # wrapped to the figure's width (one panel: 5.5 in)
    return fig, dict(zip(envs, axes.flat))


def curve_figure(plt, data, tag, title, ylabel, xkind="steps", transform=None, logy=False, hline=None, eps_default=0.2,
                 spread="se", cols=None):
    fig, axes = panels(plt, data, title, cols)
    drawn = False
    order = sorted(data, key=natural)
    seen = {}  # env: (lowest, highest) value of any seed, so that a wide interval (2 seeds: t = 12.7) stays in view
    for exp in order:
        for env, ax in axes.items():
            curves = []
            for seed, run in sorted(data[exp].get(env, {}).items()):
                if tag not in run:
                    continue
                steps, wall, values = run[tag]
                if transform is not None:
                    values = transform(values, run, eps_default)
                x = steps if xkind == "steps" else (wall - wall[0]) / 60.0
                curves.append((x, values))
            if not curves:
                continue
            grid = np.linspace(min(c[0].min() for c in curves), max(c[0].max() for c in curves), 200)
            lo_env, hi_env = seen.get(env, (np.inf, -np.inf))
            seen[env] = (min(lo_env, *(np.nanmin(c[1]) for c in curves)), max(hi_env, *(np.nanmax(c[1]) for c in curves)))
            grid, mean, lo, hi = band(curves, grid, "minmax" if logy else spread)
            color = color_of(exp, order)
            ax.plot(grid, mean, color=color, label=f"{exp} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
            ax.fill_between(grid, lo, hi, color=color, alpha=0.2)
            drawn = True
    for env, ax in axes.items():
        ax.set_title(env)
        ax.set_xlabel("environment steps" if xkind == "steps" else "wall-clock minutes")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        elif env in seen and np.isfinite(seen[env]).all() and seen[env][1] > seen[env][0]:
            low, high = seen[env]  # the band may run past the seeds' own range: cut it at the axes, not the curves
            ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        if hline is not None:
            ax.axhline(hline, color="k", linestyle="--", linewidth=1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig if drawn else None


def kl_beta_figure(plt, data, first_update=20, num_updates=30):
    """kl_max and beta over consecutive updates of the first seed of each FixPO-like run (those that log beta)."""
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    drawn = False
    for exp in sorted(data):
        for env in sorted(data[exp]):
            seed = min(data[exp][env])
            run = data[exp][env][seed]
            if "fixpo/beta" not in run or "trust_region/kl_max" not in run:
                continue
            window = slice(first_update, first_update + num_updates)
            steps, _, kl = run["trust_region/kl_max"]
            _, _, beta = run["fixpo/beta"]
            ax1.plot(steps[window], kl[window], marker=".", label=f"{exp} {env} seed {seed}")
            ax2.plot(steps[window], beta[window], marker=".", label=f"{exp} {env} seed {seed}")
            ax1.axhline(eps_kl_of(run, 0.2), color="k", linestyle="--", linewidth=1)
            drawn = True
    ax1.set_ylabel("kl_max after the update")
    ax2.set_ylabel("beta")
    ax2.set_xlabel("environment steps")
    ax1.legend(fontsize=8)
    fig.suptitle(f"kl_max and beta over {num_updates} consecutive policy updates (dashed: eps_kl)")
    return fig if drawn else None


def trace_figure(plt, data, max_panels=6):
    """Paper Fig. 2 from the trace/* tags: kl_max (red) and beta (blue) at every gradient step; green spans are
    fixup steps, green lines mark epochs whose fixup phase took no step; dashed: eps_kl and eps_kl / c_beta."""
    traced = [(exp, env, seed, run) for exp in sorted(data, key=natural) for env in sorted(data[exp])
              for seed, run in sorted(data[exp][env].items()) if "trace/kl_max" in run][:max_panels]
    if not traced:
        return None
    fig, axes = plt.subplots(len(traced), 1, figsize=(10, 3.2 * len(traced)), squeeze=False)
    for ax, (exp, env, seed, run) in zip(axes[:, 0], traced):
        steps, _, kl = run["trace/kl_max"]
        beta, fixup, epoch = (run[f"trace/{t}"][2] for t in ("beta", "fixup", "epoch"))
        for i in np.flatnonzero(fixup):
            ax.axvspan(steps[i] - 0.5, steps[i] + 0.5, color="tab:green", alpha=0.3, linewidth=0)
        ends = np.flatnonzero(np.diff(epoch) != 0)  # last step of each epoch but the final one
        for i in [*ends, len(epoch) - 1]:
            if not fixup[i]:
                ax.axvline(steps[i] + 0.5, color="tab:green", linewidth=1)
        eps = eps_kl_of(run, 0.2)
        c_beta = run["hparams/c_beta"][2][0] if "hparams/c_beta" in run else None
        ax.plot(steps, kl, color="tab:red", label="max KL over the batch")
        ax.axhline(eps, color="tab:red", linestyle="--", linewidth=1, label="eps_kl")
        if c_beta:
            ax.axhline(eps / c_beta, color="tab:red", linestyle=":", linewidth=1, label="eps_kl / c_beta")
        ax.set_ylabel("max KL", color="tab:red")
        ax2 = ax.twinx()
        ax2.plot(steps, beta, color="tab:blue")
        ax2.set_ylabel("beta", color="tab:blue")
        ax.set_title(f"{exp} {env} seed {seed}" + (f", c_beta = {c_beta:g}" if c_beta else "")
                     + f": {int(np.sum(fixup))} fixup of {len(fixup)} gradient steps in {len(set(epoch))} epochs")
        ax.legend(fontsize=8, loc="upper left")
    axes[-1, 0].set_xlabel("gradient step (traced updates only)")
    return fig


def task_figure(plt, data, prefix="tasks/success_rate/", title="success rate", ylim=(-0.05, 1.05)):
    """One panel per task: its tag `prefix + task` per update (mean of 10), one line per exp (mean over seeds)."""
    tasks = sorted({t[len(prefix):] for exp in data.values() for env in exp.values() for run in env.values()
                    for t in run if t.startswith(prefix)})
    if not tasks:
        return None
    cols = min(5, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax, task in zip(axes.flat, tasks):
        for exp in sorted(data, key=natural):
            curves = [(run[prefix + task][0], running_mean(run[prefix + task][2], 10))
                      for env in data[exp].values() for run in env.values() if prefix + task in run]
            if curves:
                grid = np.linspace(min(c[0].min() for c in curves), max(c[0].max() for c in curves), 100)
                grid, mean, _, _ = band(curves, grid)
                ax.plot(grid, mean, label=f"{exp} ({len(curves)})")
        ax.set_title(task, fontsize=9)
        ax.locator_params(axis="x", nbins=3)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        if ylim:
            ax.set_ylim(*ylim)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{title}, one panel per task (mean of 10 updates, over seeds), against environment steps")
    return fig


def algorithm_figures(plt, data, eps_kl=0.2, prefix="fig3", episodes="episodes"):
    """Paper Fig. 3 for the `mujoco` grid: return against steps per task (mean, 95% t-interval over seeds), and
    kl_max / eps_kl per update (log scale, the seeds' min to max), in a 2 x 3 grid of panels. Atari: the same
    pair, of whole-game scores, prefixed atari_."""
    return {
        f"{prefix}_returns": curve_figure(plt, data, "charts/episodic_return",
                                          f"Return (mean of the last 20 {episodes}): mean and 95% interval over seeds",
                                          "episodic return", transform=lambda v, run, e: running_mean(v),
                                          spread="t95", cols=3),
        f"{prefix}_kl_max_over_eps": curve_figure(plt, data, "trust_region/kl_max",
                                             "kl_max / eps_kl after each policy update (the largest in each of 200 bins; "
                                             "band: seeds' min to max); above 1 = outside the region", "kl_max / eps_kl",
                                             transform=lambda v, run, e: v / eps_kl_of(run, e), logy=True, hline=1.0,
                                             eps_default=eps_kl, cols=3),
    }


def make_plots(csv_path, out_dir, eps_kl=0.2, kind="all", name_prefix=""):
    """Write every figure the data allows into out_dir, each file named name_prefix + its name; returns the paths
    written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    data = load(csv_path)
    os.makedirs(out_dir, exist_ok=True)
    figures = algorithm_figures(plt, data, eps_kl) if kind == "algorithms" else algorithm_figures(
        plt, data, eps_kl, "atari", "whole games") if kind == "atari" else {
        "returns_vs_steps": curve_figure(plt, data, "charts/episodic_return", "Return", "episodic return (last 20)",
                                         transform=lambda v, run, e: running_mean(v)),
        "returns_vs_time": curve_figure(plt, data, "charts/episodic_return", "Return against wall-clock time",
                                        "episodic return (last 20)", xkind="time",
                                        transform=lambda v, run, e: running_mean(v)),
        "kl_max_over_eps": curve_figure(plt, data, "trust_region/kl_max", "kl_max / eps_kl per policy update",
                                        "kl_max / eps_kl", transform=lambda v, run, e: v / eps_kl_of(run, e),
                                        logy=True, hline=1.0, eps_default=eps_kl),
        "fixup_steps": curve_figure(plt, data, "fixpo/fixup_grad_steps", "Fixup gradient steps per policy update",
                                    "fixup steps (mean of 10 updates)", transform=lambda v, run, e: running_mean(v, 10)),
        "action_std": curve_figure(plt, data, "charts/action_std", "Policy action std", "mean action std"),
        "kl_and_beta": kl_beta_figure(plt, data),
        "trace": trace_figure(plt, data),
        "success_rate": curve_figure(plt, data, "charts/success_rate", "Success rate", "success rate (mean of 10 updates)",
                                     transform=lambda v, run, e: running_mean(v, 10)),
        "tasks_success_rate": task_figure(plt, data),
        "tasks_kl_max": task_figure(plt, data, "tasks/kl_max/", "max KL over the task's states after each update", None),
    }
    written = []
    for name, fig in figures.items():
        if fig is None:
            continue
        path = os.path.join(out_dir, name_prefix + name + ".png")
        fig.tight_layout()
        fig.savefig(path + ".tmp.png", dpi=100)
        os.replace(path + ".tmp.png", path)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="the CSV written by collect.py")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--eps-kl", type=float, default=0.2, help="the region for runs that log no eps_kl (baselines)")
    parser.add_argument("--kind", choices=["all", "algorithms", "atari"], default="all",
                        help="algorithms: only the paper's Fig. 3 pair (fig3_returns.png, fig3_kl_max_over_eps.png); "
                             "atari: the same pair of whole-game scores (atari_returns.png, atari_kl_max_over_eps.png)")
    parser.add_argument("--prefix", default="", help="put before every file name, e.g. ablations_ (ablations_kl_max_over_eps.png)")
    cli = parser.parse_args()
    for path in make_plots(cli.csv, cli.out, cli.eps_kl, cli.kind, cli.prefix):
        print(path)
