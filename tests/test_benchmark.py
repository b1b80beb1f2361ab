"""benchmark/: the grid runner, the CSV collection and the plots, on tiny synthetic logs (no training)."""
import csv
import glob
import os
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import collect  # noqa: E402
import grid  # noqa: E402


def write_run(runs_dir, env_id, exp_name, seed, eps_kl=None, updates=12, trace=False):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(runs_dir, f"{env_id}__{exp_name}__{seed}__{1000 + seed}"))
    if eps_kl is not None:
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n|eps_kl|{eps_kl}|\n|seed|{seed}|\n|c_beta|3.0|")
    for u in range(1, updates + 1):
        step = 2048 * u
        writer.add_scalar("charts/episodic_return", 100.0 * u + seed, step)
        writer.add_scalar("charts/episodic_return", 100.0 * u + seed + 5, step + 1000)
        writer.add_scalar("trust_region/kl_max", 0.01 * u if eps_kl is None else 0.9 * eps_kl, step)
        writer.add_scalar("charts/action_std", 1.0 / u, step)
        writer.add_scalar("charts/SPS", 1000 + u, step)
        if eps_kl is not None:
            writer.add_scalar("fixpo/beta", 1.0 + 0.1 * u, step)
            writer.add_scalar("fixpo/fixup_grad_steps", u % 3, step)
            writer.add_scalar("charts/success_rate", u / updates, step)
            for task in ("reach-v3", "push-v3"):
                writer.add_scalar(f"tasks/success_rate/{task}", u / updates, step)
                writer.add_scalar(f"tasks/kl_max/{task}", 0.1, step)
    if trace:  # --trace-updates: 2 epochs of 4 primary steps, the first followed by 2 fixup steps
        for i, (kl, fixup, epoch) in enumerate([(0.01, 0, 0), (0.05, 0, 0), (0.1, 0, 0), (0.25, 0, 0), (0.21, 1, 0),
                                                (0.19, 1, 0), (0.0, 0, 1), (0.02, 0, 1), (0.04, 0, 1), (0.06, 0, 1)]):
            for tag, value in (("kl_max", kl), ("beta", 1.0 + i), ("fixup", fixup), ("epoch", epoch)):
                writer.add_scalar(f"trace/{tag}", value, i)
    writer.close()


@pytest.fixture
def synthetic(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        write_run(str(runs), "Hopper-v4", "fixpo", seed, eps_kl=0.2, trace=seed == 1)
        write_run(str(runs), "Hopper-v4", "ppo", seed)
    return tmp_path


def test_collect_writes_every_scalar_and_eps_kl(synthetic):
    path = str(synthetic / "scalars.csv")
    n = collect.collect(glob.glob(str(synthetic / "runs" / "*")), path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n == 2 * (12 * 12 + 2) + 10 * 4 + 2 * 12 * 5
    assert set(rows[0]) == set(collect.COLUMNS)
    fixpo_eps = [r for r in rows if r["exp_name"] == "fixpo" and r["tag"] == "hparams/eps_kl"]
    assert len(fixpo_eps) == 2 and float(fixpo_eps[0]["value"]) == 0.2
    assert [float(r["value"]) for r in rows if r["tag"] == "hparams/c_beta"] == [3.0, 3.0]
    assert not [r for r in rows if r["exp_name"] == "ppo" and r["tag"] == "hparams/eps_kl"]
    assert {r["seed"] for r in rows} == {"1", "2"} and {r["env_id"] for r in rows} == {"Hopper-v4"}
    assert not os.path.exists(path + ".tmp")


def test_collect_refuses_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(ValueError, match="not a run directory"):
        collect.read_run(str(tmp_path / "notes"))


def test_plots_are_nonempty_pngs(synthetic):
    pytest.importorskip("matplotlib")
    import plots

    path = str(synthetic / "scalars.csv")
    collect.collect(glob.glob(str(synthetic / "runs" / "*")), path)
    written = plots.make_plots(path, str(synthetic / "plots"))
    names = {os.path.basename(p) for p in written}
    assert names == {"returns_vs_steps.png", "returns_vs_time.png", "kl_max_over_eps.png", "fixup_steps.png",
                     "action_std.png", "kl_and_beta.png", "trace.png", "success_rate.png", "tasks_success_rate.png",
                     "tasks_kl_max.png"}
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 5000


def test_running_mean_and_band():
    import numpy as np
    import plots

    assert np.allclose(plots.running_mean(np.array([1.0, 3.0, 5.0, 7.0]), window=2), [1, 2, 4, 6])
    x = np.array([0.0, 10.0])
    g, mean, lo, hi = plots.band([(x, np.array([0.0, 10.0])), (x, np.array([2.0, 12.0]))], np.array([0.0, 5.0, 10.0]))
    assert np.allclose(mean, [1, 6, 11]) and np.allclose(hi - mean, 1.96 * np.sqrt(2) / np.sqrt(2))
    # minmax (the log-scale KL figure): each seed's largest value in each bin, then the seeds' min and max
    x3 = np.array([0.0, 4.0, 10.0])
    g, mean, lo, hi = plots.band([(x3, np.array([1.0, 3.0, 10.0])), (x3, np.array([2.0, 0.5, 12.0]))],
                                 np.array([5.0, 20.0, 30.0]), spread="minmax")
    assert np.allclose(g, [5.0, 20.0]) and np.allclose(lo, [2.0, 10.0]) and np.allclose(hi, [3.0, 12.0])  # 30: empty
    # seeds of different lengths: the mean stops where the shorter seed ends, it never falls back to one seed
    g, mean, lo, hi = plots.band([(x, np.array([0.0, 10.0])), (np.array([0.0, 5.0]), np.array([2.0, 7.0]))],
                                 np.array([0.0, 5.0, 10.0]))
    assert np.allclose(g, [0.0, 5.0]) and np.allclose(mean, [1.0, 6.0])


FAKE = textwrap.dedent("""
    # stands in for a training script: writes a tiny TensorBoard log the way they do, or fails on request
    import os, sys, time
    from torch.utils.tensorboard import SummaryWriter
    a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    if os.path.exists(a.get("--fail-flag", "")):
        sys.exit("error: asked to fail")
    w = SummaryWriter(f"runs/{a['--env-id']}__{a['--exp-name']}__{a['--seed']}__{time.time_ns()}")
    w.add_scalar("charts/SPS", 1.0, 1)
    w.add_scalar("trust_region/kl_max", 0.1, 1)
    w.close()
""")


def test_grid_is_resumable_and_never_overwrites(tmp_path):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    flag = tmp_path / "fail"
    flag.write_text("")
    out = str(tmp_path / "out")
    runs = {"ok": (str(script), []), "flaky": (str(script), ["--fail-flag", str(flag)])}

    failures = grid.run_grid(out, runs, ["Hopper-v4"], [1, 2], 100, jobs=2)
    assert sorted(failures) == [("flaky", "Hopper-v4", 1), ("flaky", "Hopper-v4", 2)]
    assert grid.finished(out, "ok", "Hopper-v4", 1) and not grid.finished(out, "flaky", "Hopper-v4", 1)
    first = sorted(glob.glob(os.path.join(out, "runs", "*")))
    assert len(first) == 2

    flag.unlink()  # the failure is fixed: only the two failed runs run again
    assert grid.run_grid(out, runs, ["Hopper-v4"], [1, 2], 100, jobs=2) == []
    second = sorted(glob.glob(os.path.join(out, "runs", "*")))
    assert len(second) == 4 and set(first) <= set(second)
    assert len(glob.glob(os.path.join(out, "logs", "flaky__Hopper-v4__1.*.err"))) == 2  # the failed attempt's log kept
    assert "asked to fail" in open(os.path.join(out, "logs", "flaky__Hopper-v4__1.0.err")).read()

    assert grid.run_grid(out, runs, ["Hopper-v4"], [1, 2], 100, jobs=2) == []  # all finished: nothing runs
    assert sorted(glob.glob(os.path.join(out, "runs", "*"))) == second
    grid.collect_finished(out, runs, ["Hopper-v4"], [1, 2])
    with open(os.path.join(out, "scalars.csv"), newline="") as f:
        assert {r["exp_name"] for r in csv.DictReader(f)} == {"ok", "flaky"}


def test_grids_name_existing_scripts():
    for name, g in grid.GRIDS.items():
        for script, _ in g["runs"].values():
            assert os.path.exists(os.path.join(ROOT, script)), (name, script)


def test_checkpointing_grids_run_only_scripts_that_resume():
    # a grid with checkpoint_every passes --checkpoint-every, and --resume on a later call: every script must take both
    for name, g in grid.GRIDS.items():
        if g.get("checkpoint_every"):
            for script, _ in g["runs"].values():
                text = open(os.path.join(ROOT, script)).read()
                assert "checkpoint_every: int" in text and "resume: Optional[str]" in text, (name, script)


def test_summarize_reads_a_run_without_trust_region_tags(tmp_path, capsys):
    """CleanRL's own ppo_continuous_action.py, run beside the project for comparison, logs no KL tags."""
    import summarize
    from torch.utils.tensorboard import SummaryWriter

    run_dir = str(tmp_path / "Hopper-v4__ppo_continuous_action__1__1000")
    writer = SummaryWriter(run_dir)
    for u in range(1, 31):
        writer.add_scalar("charts/episodic_return", float(u), 2048 * u)
        writer.add_scalar("charts/SPS", 800, 2048 * u)
    writer.close()
    row = summarize.summarize(run_dir)
    assert row["final_return"] == sum(range(11, 31)) / 20 and row["steps"] == 2048 * 30
    assert np.isnan(row["worst_kl_over_eps"]) and np.isnan(row["updates_in_region"]) and row["fixup_share"] == 0


def test_mujoco_grid_plan_per_label_seeds_in_seed_order():
    g = grid.GRIDS["mujoco"]
    todo = grid.plan(g["runs"], g["env_ids"], g["seeds"], g["order"])
    assert len(todo) == 6 * (5 + 3 + 3) and len(set((r[0], r[3], r[4]) for r in todo)) == len(todo)
    assert [(r[0], r[3], r[4]) for r in todo[:4]] == [("fixpo", "HalfCheetah-v5", 1), ("ppo", "HalfCheetah-v5", 1),
                                                      ("trpo", "HalfCheetah-v5", 1), ("fixpo", "Hopper-v5", 1)]
    assert [r[4] for r in todo] == sorted(r[4] for r in todo)  # every task's seed 1 before any seed 2
    assert {r[0] for r in todo if r[4] > 3} == {"fixpo"}


def test_kept_scalars_survive_a_fresh_checkout_and_make_the_summary(tmp_path):
    import shutil

    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    out, runs = str(tmp_path / "out"), {"fixpo": (str(script), []), "ppo": (str(script), [])}
    seeds = {"fixpo": [1, 2], "ppo": [1]}
    assert grid.run_grid(out, runs, ["Hopper-v5"], seeds, 100, jobs=2, order="seed", keep=True) == []
    assert sorted(os.listdir(os.path.join(out, "scalars"))) == [
        "fixpo__Hopper-v5__1.csv.gz", "fixpo__Hopper-v5__2.csv.gz", "ppo__Hopper-v5__1.csv.gz"]
    shutil.rmtree(os.path.join(out, "runs"))  # what a fresh checkout has: the committed scalars only
    shutil.rmtree(os.path.join(out, "logs"))
    assert grid.run_grid(out, runs, ["Hopper-v5"], seeds, 100, jobs=2, order="seed", keep=True) == []
    assert not os.path.exists(os.path.join(out, "runs"))  # nothing ran again
    grid.collect_finished(out, runs, ["Hopper-v5"], seeds, keep=True)
    with open(os.path.join(out, "summary.csv"), newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["algorithm", "env_id", "seed", "steps", "final_return", "peak_return",
                                 "worst_kl_over_eps", "updates_in_region", "fixup_share", "fallbacks", "wall_s"]
    assert [(r["algorithm"], r["seed"]) for r in rows] == [("fixpo", "1"), ("fixpo", "2"), ("ppo", "1")]
    assert float(rows[0]["worst_kl_over_eps"]) == pytest.approx(0.5) and float(rows[0]["updates_in_region"]) == 1


def test_summary_row_final_and_peak_return():
    returns = [0.0] * 20 + [100.0] * 20 + [50.0] * 20  # peak window: the 20 episodes at 100
    run = {"charts/episodic_return": [(i, float(i), r) for i, r in enumerate(returns)],
           "trust_region/kl_max": [(0, 0.0, 0.1), (1, 1.0, 0.3)], "hparams/eps_kl": [(0, 0.0, 0.2)],
           "fixpo/primary_grad_steps": [(0, 0.0, 80), (1, 1.0, 80)], "fixpo/fixup_grad_steps": [(0, 0.0, 0), (1, 1.0, 4)],
           "fixpo/fixup_fallbacks": [(0, 0.0, 0), (1, 1.0, 1)]}
    row = collect.summary_row(run)
    assert row["final_return"] == 50 and row["peak_return"] == 100 and row["steps"] == 59
    assert row["worst_kl_over_eps"] == pytest.approx(1.5) and row["updates_in_region"] == 0.5
    assert row["fixup_share"] == pytest.approx(4 / 164) and row["fallbacks"] == 1 and row["wall_s"] == 59


def test_summary_of_paused_runs_and_of_a_run_without_kl(synthetic, tmp_path):
    """collect.py --summary: any run directories (a paused Atari run, CleanRL's script logging no kl_max)."""
    import subprocess

    runs = synthetic / "runs"
    (cleanrl,) = glob.glob(str(runs / "Hopper-v4__ppo__1__*"))
    from torch.utils.tensorboard import SummaryWriter

    bare = runs / "Hopper-v4__ppo_cleanrl__1__1"  # returns and SPS only, as CleanRL's scripts log
    writer = SummaryWriter(str(bare))
    for u in range(1, 4):
        writer.add_scalar("charts/episodic_return", -20.0 + u, 1000 * u)
        writer.add_scalar("charts/SPS", 100.0, 1000 * u)
    writer.close()
    out = tmp_path / "summary.csv"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "collect.py"), cleanrl, str(bare),
                        "--csv", str(tmp_path / "s.csv"), "--summary", str(out)], capture_output=True, text=True)
    assert p.returncode == 0 and "2 runs ->" in p.stdout, p.stderr
    with open(out, newline="") as f:
        rows = {r["algorithm"]: r for r in csv.DictReader(f)}
    assert rows["ppo_cleanrl"]["steps"] == "3000" and float(rows["ppo_cleanrl"]["final_return"]) == -18
    assert np.isnan(float(rows["ppo_cleanrl"]["worst_kl_over_eps"])) and rows["ppo_cleanrl"]["fixup_share"] == "0"
    assert float(rows["ppo"]["updates_in_region"]) == 1 and rows["ppo"]["steps"] == str(2048 * 12 + 1000)


def test_table_reports_each_algorithm_and_the_interval_of_the_difference(tmp_path):
    import table

    path = tmp_path / "summary.csv"
    rows = ["algorithm,env_id,seed,steps,final_return,peak_return,worst_kl_over_eps,updates_in_region,fixup_share,"
            "fallbacks,wall_s"]
    for seed, (f, p) in enumerate([(100, 90), (110, 100), (120, 110)], 1):
        rows.append(f"fixpo,Swimmer-v5,{seed},1000,{f},{f + 10},0.9,1,0.01,0,60")
        rows.append(f"ppo,Swimmer-v5,{seed},1000,{p},{p + 30},3.0,0.5,0,0,60")
    path.write_text("\n".join(rows) + "\n")
    text = table.table(table.read(str(path)))
    assert "| Swimmer-v5 | 110 +- 10 (3) | 100 +- 10 (3) | - | +10 [" in text
    assert "| 10 / 30 / - | 1.00% | 100.00%, worst 0.900 x eps_kl, 0 fallbacks |" in text
    alone = table.table(table.read(str(path)), ["fixpo"])  # one algorithm: its rows, no difference column
    assert "| Swimmer-v5 | 110 +- 10 (3) | 10 | 1.00% | 100.00%, worst 0.900 x eps_kl, 0 fallbacks |" in alone
    diff, lo, hi = table.welch_interval([100, 110, 120], [90, 100, 110])
    assert diff == 10 and lo < 0 < hi and hi - diff == pytest.approx(diff - lo)
    small = tmp_path / "small.csv"  # returns under 100 (Reacher): one decimal
    small.write_text(rows[0] + "\nfixpo,Reacher-v5,1,1000,-5.52,-3.7,0.9,1,0.01,0,60\nfixpo,Reacher-v5,2,1000,-5.32,-3.9,0.9,1,0.01,0,60\n")
    assert "| Reacher-v5 | -5.4 +- 0.1 (2) | 1.6 |" in table.table(table.read(str(small)), ["fixpo"])


def test_algorithm_figures_are_pngs(synthetic):
    pytest.importorskip("matplotlib")
    import plots

    path = str(synthetic / "scalars.csv")
    collect.collect(glob.glob(str(synthetic / "runs" / "*")), path)
    written = plots.make_plots(path, str(synthetic / "fig3"), kind="algorithms")
    assert sorted(os.path.basename(p) for p in written) == ["fig3_kl_max_over_eps.png", "fig3_returns.png"]
    written = plots.make_plots(path, str(synthetic / "atari"), kind="atari")
    assert sorted(os.path.basename(p) for p in written) == ["atari_kl_max_over_eps.png", "atari_returns.png"]
    written = plots.make_plots(path, str(synthetic / "fig3"), kind="algorithms", name_prefix="six_")
    assert sorted(os.path.basename(p) for p in written) == ["six_fig3_kl_max_over_eps.png", "six_fig3_returns.png"]


FAKE_RESUMABLE = textwrap.dedent("""
    # stands in for an Atari script: the first run writes checkpoint.pt and is "killed"; --resume finishes it
    import os, sys, time
    from torch.utils.tensorboard import SummaryWriter
    a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    assert a["--checkpoint-every"] == "10"
    if "--resume" in a:
        assert set(a) == {"--resume", "--threads", "--checkpoint-every"}  # a resume takes the run's saved flags
        w = SummaryWriter(os.path.dirname(a["--resume"]))
        w.add_scalar("charts/SPS", 2.0, 2)
        w.close()
        sys.exit(0)
    run_dir = f"runs/{a['--env-id']}__{a['--exp-name']}__{a['--seed']}__{time.time_ns()}"
    w = SummaryWriter(run_dir)
    w.add_scalar("charts/SPS", 1.0, 1)
    w.close()
    open(os.path.join(run_dir, "checkpoint.pt"), "w").close()
    sys.exit(143)
""")


def test_grid_with_checkpoints_resumes_an_unfinished_run_in_its_own_directory(tmp_path):
    script = tmp_path / "fake.py"
    script.write_text(FAKE_RESUMABLE)
    out = str(tmp_path / "out")
    runs = {"fixpo": (str(script), [])}
    assert grid.run_grid(out, runs, ["PongNoFrameskip-v4"], [1], 100, jobs=1, checkpoint_every=10)  # "killed"
    (run_dir,) = glob.glob(os.path.join(out, "runs", "*"))
    assert grid.run_grid(out, runs, ["PongNoFrameskip-v4"], [1], 100, jobs=1, checkpoint_every=10) == []
    assert glob.glob(os.path.join(out, "runs", "*")) == [run_dir]  # continued, not started afresh
    assert grid.finished(out, "fixpo", "PongNoFrameskip-v4", 1) == os.path.relpath(run_dir, out)


def test_training_seconds_leaves_out_the_pause_of_a_resumed_run():
    updates = [100.0 + 10.0 * i for i in range(100)]  # an update every 10 s: 990 s
    events = sorted(updates + [u + 1e-4 for u in updates] + [1490.0])  # several tags a step; a 400 s evaluation
    assert collect.training_seconds(events, updates) == pytest.approx(1390.0)  # a silence of a run in one piece
    later = [100000.0 + 10.0 * i for i in range(100)]  # stopped, resumed a day later
    assert collect.training_seconds(events + later + [t + 1e-4 for t in later], updates + later) == pytest.approx(
        1390.0 + 10.0 + 990.0)


def test_part_of_a_grid_still_summarises_the_whole_grid():
    runs, env_ids, seeds = grid.collect_scope("mujoco", env_ids=["Hopper-v5", "Ant-v5"], seeds=[2, 7])
    assert set(runs) == {"fixpo", "ppo", "trpo"}  # --labels narrows what runs, not what the summary holds
    assert env_ids == grid.GRIDS["mujoco"]["env_ids"] + ["Ant-v5"]
    assert seeds == {"fixpo": [1, 2, 3, 4, 5, 7], "ppo": [1, 2, 3, 7], "trpo": [1, 2, 3, 7]}
    assert grid.collect_scope("quick") == (grid.GRIDS["quick"]["runs"], ["Hopper-v4"], [1, 2])


def test_binned_means_per_run_and_tag(synthetic):
    import binned

    run = glob.glob(str(synthetic / "runs" / "Hopper-v4__fixpo__1__*"))[0]
    starts, means = binned.binned_means(run, ["fixpo/beta", "losses/approx_kl"], 2048 * 6)  # updates at 2048 u
    assert starts == [0, 12288, 24576] and set(means) == {"fixpo/beta"}  # a tag the run lacks is left out
    assert means["fixpo/beta"] == pytest.approx([1.0 + 0.1 * 3, 1.0 + 0.1 * 8.5, 1.0 + 0.1 * 12])  # u 1-5, 6-11, 12
    text = binned.table([run], ["fixpo/beta"], 2048 * 6, until=40000)
    assert text.splitlines()[0].startswith("| run | tag | 0k-12k |") and text.endswith("| - |")  # no value after 24576


def test_binned_last_means_cover_each_runs_last_steps(synthetic):
    import binned

    runs = sorted(glob.glob(str(synthetic / "runs" / "Hopper-v4__fixpo__*")))
    means = binned.last_means(runs[0], ["fixpo/beta", "losses/approx_kl"], 2048 * 3)  # updates 10-12 of 12
    assert means == {"fixpo/beta": pytest.approx(1.0 + 0.1 * 11)}  # a tag the run lacks is left out
    text = binned.last_table(runs[:1] * 2, ["fixpo/beta"], 2048 * 3)
    assert text.splitlines()[0] == "| run | tag | last 6k steps |"
    assert text.splitlines()[-1] == "| mean +- sd (2 runs) | fixpo/beta | 2.1 +- 0 |"


def test_phase_groups_updates_by_the_episode_window_their_rollout_covered():
    import phase

    # 8 envs x 256 steps, 1,000-step episodes (+1 autoreset step): updates 1-4 begin at 0, 256, 512, 768, update 5
    # at 1024 mod 1001 = 23; update 1's value 1, update 2's 2, ...
    assert [phase.window_start(k, 256, 1000) for k in range(1, 6)] == [0, 256, 512, 768, 23]
    rows = [("r", "Swimmer-v5", "fixpo", "1", "t", k * 2048, 0.0, float(k)) for k in range(1, 6)]
    rows.append(("r", "Swimmer-v5", "fixpo", "1", "t", 1000, 0.0, 99.0))  # not an update's step: left out
    assert phase.phase_means(rows, ["t"], 256, 1000, 4, 2048)["t"] == pytest.approx([3.0, 2.0, 3.0, 4.0])  # (1+5)/2
    assert phase.phase_means(rows, ["t"], 256, 1000, 4, 2048, from_step=2048)["t"][0] == 5.0


def test_binned_reads_a_kept_scalars_file_as_its_run_directory(synthetic, tmp_path):
    """grid.py keeps OUT/scalars/*.csv.gz instead of run directories: binned.py reads either, with the same means."""
    import binned

    run = glob.glob(str(synthetic / "runs" / "Hopper-v4__fixpo__1__*"))[0]
    grid.keep_scalars(str(tmp_path), "fixpo", "Hopper-v4", 1, run)
    kept = grid.scalars_path(str(tmp_path), "fixpo", "Hopper-v4", 1)
    assert binned.binned_means(kept, ["fixpo/beta"], 4096) == binned.binned_means(run, ["fixpo/beta"], 4096)
    assert binned.table([kept], ["fixpo/beta"], 4096).splitlines()[2].startswith("| fixpo__Hopper-v4__1 | fixpo/beta |")


def test_atari_speed_window_is_steps_over_wall_time_between_update_events(tmp_path):
    """atari_speed.py --window: steps/s of a run between two wall-clock times, from its per-update charts/SPS
    events (the logged SPS values themselves are ignored: CleanRL's are averages since its start)."""
    import atari_speed
    from torch.utils.tensorboard import SummaryWriter

    run_dir = str(tmp_path / "runs" / "BreakoutNoFrameskip-v4__x__1__1000")
    writer = SummaryWriter(run_dir)
    t0 = 1_800_000_000.0
    for u in range(1, 11):  # 1,024 steps per update; 10 s an update, then 20 s from update 6 on
        writer.add_scalar("charts/SPS", 999, 1024 * u, walltime=t0 + 10 * min(u, 5) + 20 * max(u - 5, 0))
    writer.close()
    assert atari_speed.steps_per_s(run_dir=run_dir) == pytest.approx(1024 * 9 / 140)
    assert atari_speed.steps_per_s(run_dir=run_dir, t0=t0 + 50, t1=t0 + 150) == pytest.approx(1024 / 20)
    with pytest.raises(SystemExit, match="2 update events in the window"):
        atari_speed.steps_per_s(run_dir=run_dir, t0=t0 + 5, t1=t0 + 25)


def test_atari_speed_profile_shares_group_samples_by_the_script_s_call_sites(tmp_path):
    import atari_speed

    raw = tmp_path / "profile.txt"
    raw.write_text("<module> (fixpo_atari.py:729);backward (torch/autograd/graph.py:979) 6\n"
                   "<module> (fixpo_atari.py:737);fixup_phase (fixpo_atari.py:384);batch_kl (fixpo_atari.py:279) 3\n"
                   "<module> (fixpo_atari.py:729);step (torch/optim/adam.py:10) 2\n"
                   "_bootstrap (threading.py:1) 1\n")
    assert atari_speed.profile_shares(str(raw)) == [
        (8 / 12, "<module>:729"), (3 / 12, "<module>:737 > fixup_phase:384 > batch_kl:279"),
        (1 / 12, "(outside the script)")]


def test_summary_from_kept_scalars_beside_run_directories(synthetic, tmp_path):
    """collect.py reads grid.py's kept scalars files (a finished run whose folder a checkout lacks) beside run
    directories, to the same summary row, and refuses a run given twice (its folder and its kept file)."""
    import gzip
    import subprocess

    runs = sorted(glob.glob(str(synthetic / "runs" / "Hopper-v4__fixpo__*")))
    collect.collect(runs[:1], str(tmp_path / "one.csv"))
    kept = tmp_path / "fixpo__Hopper-v4__1.csv.gz"
    with open(tmp_path / "one.csv", "rb") as f, gzip.open(kept, "wb") as g:
        g.write(f.read())
    script = os.path.join(ROOT, "benchmark", "collect.py")
    both = subprocess.run([sys.executable, script, str(kept), runs[1], "--csv", str(tmp_path / "a.csv"),
                           "--summary", str(tmp_path / "a_summary.csv")], capture_output=True, text=True)
    dirs = subprocess.run([sys.executable, script, *runs, "--csv", str(tmp_path / "b.csv"),
                           "--summary", str(tmp_path / "b_summary.csv")], capture_output=True, text=True)
    assert both.returncode == 0 and dirs.returncode == 0, both.stderr + dirs.stderr
    with open(tmp_path / "a_summary.csv") as a, open(tmp_path / "b_summary.csv") as b:
        assert a.read() == b.read()
    twice = subprocess.run([sys.executable, script, str(kept), runs[0], "--csv", str(tmp_path / "c.csv")],
                           capture_output=True, text=True)
    assert twice.returncode != 0 and "already read from" in twice.stderr and "Traceback" not in twice.stderr
