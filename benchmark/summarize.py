"""Summarise FixPO runs from their TensorBoard logs: one row per run, then the mean per experiment.

    python benchmark/summarize.py runs/Hopper-v4__fixpo_continuous__*

Final return = mean of the last 20 training episodes; fixup share = fixup / (primary + fixup) gradient
steps over the run, and fixup steps per policy update; worst kl_max / eps_kl over all policy updates and
the share of updates with kl_max <= eps_kl; SPS as last logged; wall = minutes from the first to the last
logged event; Meta-World runs add final_success, the success rate over the last 10 rollouts. Runs without an eps_kl (baselines/) are measured against --eps-kl (FixPO's default, 0.2).
Runs that log no trust_region/kl_max (CleanRL's own scripts, run beside the project) get nan in the KL columns.
"""
import argparse
import os
import re
from collections import defaultdict

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def summarize(run_dir, default_eps_kl=0.2):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    s = lambda tag: np.array([e.value for e in acc.Scalars(tag)]) if tag in acc.Tags()["scalars"] else np.array([])
    text = acc.Tensors("hyperparameters/text_summary") if "hyperparameters/text_summary" in acc.Tags()["tensors"] else []
    found = re.search(r"\|eps_kl\|([^|]+)\|", text[0].tensor_proto.string_val[0].decode()) if text else None
    eps_kl = float(found.group(1)) if found else default_eps_kl
    primary, fixup = s("fixpo/primary_grad_steps").sum(), s("fixpo/fixup_grad_steps").sum()
    kl_max = s("trust_region/kl_max")
    updates = max(len(kl_max), 1)
    events = acc.Scalars("charts/SPS")
    return {
        "run": os.path.basename(run_dir.rstrip("/")),
        "steps": int(events[-1].step),
        "wall_min": (events[-1].wall_time - events[0].wall_time) / 60,
        "final_return": s("charts/episodic_return")[-20:].mean(),
        "sps": s("charts/SPS")[-1],
        "fixup_share": fixup / max(primary + fixup, 1),
        "fixup_per_update": fixup / updates,
        "worst_kl_over_eps": kl_max.max() / eps_kl if len(kl_max) else np.nan,
        "updates_in_region": np.mean(kl_max <= eps_kl) if len(kl_max) else np.nan,
        "fallbacks": int(s("fixpo/fixup_fallbacks")[-1]) if len(s("fixpo/fixup_fallbacks")) else 0,
        # Meta-World: success rate of the episodes that ended in the last 10 rollouts (nan elsewhere)
        "final_success": s("charts/success_rate")[-10:].mean() if len(s("charts/success_rate")) else np.nan,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--eps-kl", type=float, default=0.2, help="the region for runs that log no eps_kl")
    cli = parser.parse_args()
    rows = [summarize(d, cli.eps_kl) for d in cli.run_dirs]
    cols = ["steps", "wall_min", "final_return", "sps", "fixup_share", "fixup_per_update", "worst_kl_over_eps",
            "updates_in_region", "fallbacks"] + (["final_success"] if any(r["final_success"] >= 0 for r in rows) else [])
    print(f"{'run':58s} " + " ".join(f"{c:>17s}" for c in cols))
    groups = defaultdict(list)
    for r in rows:
        print(f"{r['run'][:58]:58s} " + " ".join(f"{r[c]:17.4g}" for c in cols))
        groups[r["run"].split("__")[0] + "__" + r["run"].split("__")[1]].append(r)
    for name, rs in groups.items():
        rets = [r["final_return"] for r in rs]
        print(f"{name}: {len(rs)} runs, final return {np.mean(rets):.0f} +- {np.std(rets):.0f} "
              f"(min {min(rets):.0f}, max {max(rets):.0f}), sps {np.mean([r['sps'] for r in rs]):.0f}, "
              f"fixup share {np.mean([r['fixup_share'] for r in rs]):.4f} "
              f"({np.mean([r['fixup_per_update'] for r in rs]):.1f} steps/update), "
              f"updates in region {np.mean([r['updates_in_region'] for r in rs]):.4f}, "
              f"wall {np.mean([r['wall_min'] for r in rs]):.0f} min, "
              f"worst kl_max/eps_kl {max(r['worst_kl_over_eps'] for r in rs):.4f}, "
              f"fallbacks {sum(r['fallbacks'] for r in rs)}"
              + (f", final success {np.mean([r['final_success'] for r in rs]):.2f}" if rs[0]["final_success"] >= 0 else ""))
