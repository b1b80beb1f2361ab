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
    g, mean, lo, hi = plots.band([(x, np.array([0.0, 10.0])), (x, np.array([2.0, 12.0]))], np.array([5.0, 20.0]),
                                 spread="minmax")
    assert np.allclose(g, [5.0]) and np.allclose(lo, [5.0]) and np.allclose(hi, [7.0])  # past the end: dropped


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
