"""Steps/s of fixpo_atari.py against CleanRL's ppo_atari.py: side by side (both at once, one core each) and alone.

    python benchmark/cleanrl_atari.py /path/to/cleanrl /tmp/cleanrl_ref      # CleanRL's script, outside the repository
    python benchmark/atari_speed.py --cleanrl /tmp/cleanrl_ref/ppo_atari.py --out benchmark/results/atari_speed

Both scripts at CleanRL's Atari settings (8 envs x 128 steps, 4 minibatches, 4 epochs), the same game and seed,
each for --updates updates in a fresh temporary folder. Modes, every round:
  side_by_side  both started together, one torch thread each (OMP_NUM_THREADS=1, FixPO --threads 1): the two
                compete for the machine as two training runs do, each on about one core of a 2-core machine
  alone_T       one script after the other, nothing else running, T torch threads (--threads, default 1 2)
Steps/s of a run: agent steps between the end of its first update (the warm-up) and its last, over the wall time
between them, from the TensorBoard events both scripts write at the end of every update (charts/SPS's wall time).
Writes OUT/speed.csv (round, mode, script, threads, steps_per_s), appending, and prints it.
Run it on an otherwise idle machine: other jobs change the numbers.

    python benchmark/atari_speed.py --window "2026-12-03 18:20" "2026-12-03 18:40" --runs benchmark/results/atari/runs/*

prints instead the steps/s of long runs (any run folders of either script) between two wall-clock times (UTC):
runs that share the machine over the same minutes, late in training, compared from their TensorBoard events.

    py-spy record -p PID -d 60 -r 25 --nonblocking -f raw -o profile.txt      # a running fixpo_atari.py
    python benchmark/atari_speed.py --profile profile.txt

prints the share of samples under each call site of the script's own lines (up to three nested), largest first.
"""
import argparse
import csv
import glob
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

HERE = os.path.dirname(os.path.abspath(__file__))
FIXPO = os.path.join(os.path.dirname(HERE), "fixpo_atari.py")


def command(script, env_id, seed, steps, threads):
    cmd = [sys.executable, script, "--env-id", env_id, "--seed", str(seed), "--total-timesteps", str(steps), "--no-cuda"]
    return cmd + (["--threads", str(threads)] if script == FIXPO else [])


def steps_per_s(workdir=None, run_dir=None, t0=0.0, t1=float("inf")):
    """From a run's TensorBoard events: steps after its first update (in [t0, t1]) over the wall time they took."""
    if run_dir is None:
        (run_dir,) = glob.glob(os.path.join(workdir, "runs", "*"))
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    events = [e for e in acc.Scalars("charts/SPS") if t0 <= e.wall_time <= t1]  # one per update, at its end
    if len(events) < 3:
        raise SystemExit(f"error: {run_dir} has {len(events)} update events in the window; need at least 3")
    first, last = events[0], events[-1]
    return (last.step - first.step) / (last.wall_time - first.wall_time)


def profile_shares(path, script="fixpo_atari.py", depth=3, top=12):
    """[(share, call path)] from py-spy's raw format (one 'frame;frame;... count' line per distinct stack)."""
    counts, total = {}, 0
    for line in open(path):
        stack, n = line.rstrip("\n").rsplit(" ", 1)
        own = [f.split(" ")[0] + ":" + f.rsplit(":", 1)[-1].rstrip(")") for f in stack.split(";") if script in f]
        key = " > ".join(own[:depth]) or "(outside the script)"
        counts[key] = counts.get(key, 0) + int(n)
        total += int(n)
    return sorted(((c / total, k) for k, c in counts.items()), reverse=True)[:top]


def launch(script, args, threads, workdir):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log = open(os.path.join(workdir, "stdout.log"), "w")
    steps = args.updates * 8 * 128
    return subprocess.Popen(command(script, args.env_id, args.seed, steps, threads), cwd=workdir, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def run_mode(mode, threads, args):
    """{script label: steps/s} for one mode: both at once, or one after the other."""
    scripts = {"fixpo_atari": FIXPO, "cleanrl_ppo_atari": args.cleanrl}
    dirs = {label: tempfile.mkdtemp(prefix=f"speed_{label}_") for label in scripts}
    if mode == "side_by_side":
        procs = {label: launch(s, args, threads, dirs[label]) for label, s in scripts.items()}
    else:
        procs = {}
        for label, s in scripts.items():
            procs[label] = launch(s, args, threads, dirs[label])
            procs[label].wait()
    for label, p in procs.items():
        if p.wait() != 0:
            raise SystemExit(f"error: {label} exited {p.returncode}; its output: {dirs[label]}/stdout.log")
    return {label: steps_per_s(d) for label, d in dirs.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cleanrl", help="CleanRL's ppo_atari.py, as benchmark/cleanrl_atari.py prepares it")
    ap.add_argument("--env-id", default="BreakoutNoFrameskip-v4")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--updates", type=int, default=12, help="updates per run (1,024 agent steps each)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--alone-threads", type=int, nargs="*", default=[1, 2], help="thread counts of the alone runs")
    ap.add_argument("--out", default="benchmark/results/atari_speed")
    ap.add_argument("--window", nargs=2, metavar=("START", "END"), help="UTC times, e.g. '2026-12-03 18:20'")
    ap.add_argument("--runs", nargs="*", default=[], help="run folders, with --window")
    ap.add_argument("--profile", help="a py-spy raw profile of fixpo_atari.py: print where its time went")
    args = ap.parse_args()
    if args.profile:
        for share, where in profile_shares(args.profile):
            print(f"{share:6.1%}  {where}")
        return
    if args.window:
        t0, t1 = (datetime.fromisoformat(t).replace(tzinfo=timezone.utc).timestamp() for t in args.window)
        for run_dir in args.runs:
            print(os.path.basename(os.path.normpath(run_dir)), round(steps_per_s(run_dir=run_dir, t0=t0, t1=t1), 1))
        return
    if not args.cleanrl or not os.path.isfile(args.cleanrl):
        raise SystemExit(f"error: {args.cleanrl} not found; prepare it with benchmark/cleanrl_atari.py")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "speed.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["round", "mode", "script", "threads", "env_id", "updates", "steps_per_s"])
        for rnd in range(1, args.rounds + 1):
            for mode, threads in [("side_by_side", 1)] + [(f"alone_{t}", t) for t in args.alone_threads]:
                for label, sps in run_mode(mode, threads, args).items():
                    row = [rnd, mode, label, threads, args.env_id, args.updates, round(sps, 1)]
                    w.writerow(row)
                    f.flush()
                    print(*row, flush=True)


if __name__ == "__main__":
    main()
