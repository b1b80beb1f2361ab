"""fixpo_atari_multigpu.py: the fixup phase's guarantee over the GLOBAL batch, ranks in lockstep, and runs via torchrun.

Function-level checks run 2 gloo ranks (torch.multiprocessing) on a small stand-in agent; the script runs end to end
through torchrun, as one machine and as two local "machines".
"""
import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn as nn

import fixpo_atari as fa
import fixpo_atari_multigpu as mg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "fixpo_atari_multigpu.py")
OBS_DIM, NUM_ACTIONS, BATCH, SPLIT = 8, 6, 128, 56  # rank 0 holds states [0, 56), rank 1 [56, 128): unequal halves


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SmallAgent(nn.Module):
    """Stand-in for the Nature-CNN agent, with the contract fixup_phase needs: dist_params, actor_parameters."""

    def __init__(self):
        super().__init__()
        self.network = nn.Sequential(nn.Linear(OBS_DIM, 32), nn.Tanh())
        self.actor, self.critic = nn.Linear(32, NUM_ACTIONS), nn.Linear(32, 1)

    def dist_params(self, x):
        return self.actor(self.network(x))

    def get_value(self, x):
        return self.critic(self.network(x)).squeeze(-1)

    def actor_parameters(self):
        return list(self.network.parameters()) + list(self.actor.parameters())


def problem(seed, noise):
    """The same agent, batch and perturbation in every process: (agent, obs, old_params, theta_old)."""
    torch.manual_seed(seed)
    agent = SmallAgent()
    obs = torch.randn(BATCH, OBS_DIM) * 2
    with torch.no_grad():
        old_params = agent.dist_params(obs)
        theta_old = [p.detach().clone() for p in agent.actor_parameters()]
        for p in agent.actor_parameters():
            p.add_(noise * torch.randn_like(p))
    return agent, obs, old_params, theta_old


def beta_for(module):
    return module.Beta(1.0, 0.01, eps_kl=0.05, c_beta=3.0, beta_max=100.0)


def flat(agent):
    return torch.cat([p.detach().reshape(-1) for p in agent.parameters()])


# (name: seed, noise, eps_kl, minibatch size, lr, max passes); each rank holds its half of the batch
SCENARIOS = {
    "halves": (1, 0.15, 0.05, 32, 1e-2, 100),  # max KL 0.61 / 0.57 on the halves: ~20 steps in one process
    "whole_minibatch": (4, 0.1, 0.05, BATCH, 1e-2, 100),
    "last_resort": (3, 1.0, 0.01, 32, 1e-12, 2),
    "rank1_empty": (2, 0.1, 0.05, 32, 1e-2, 100),
}


def worker(rank, world, port, out):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                             timeout=timedelta(seconds=60))
    results = {}
    for name, (seed, noise, eps_kl, mb, lr, passes) in SCENARIOS.items():
        agent, obs, old_params, theta_old = problem(seed, noise)
        lo, hi = ((0, SPLIT), (SPLIT, BATCH))[rank] if name != "rank1_empty" else ((0, BATCH), (BATCH, BATCH))[rank]
        calls = mg.COMM["calls"]
        fix = mg.fixup_phase(agent, obs[lo:hi], old_params[lo:hi], theta_old, beta_for(mg), eps_kl, mb, lr, passes)
        results[name] = dict(fix=fix, params=flat(agent), calls=mg.COMM["calls"] - calls,
                             kl_all=mg.batch_kl(agent, obs, old_params))  # every state of BOTH halves

    # a NaN on rank 1 only: its actor emits NaN; the pass statistics must say NaN on both ranks
    agent, obs, old_params, theta_old = problem(5, 0.3)
    lo, hi = ((0, SPLIT), (SPLIT, BATCH))[rank]
    kl = mg.batch_kl(agent, obs[lo:hi], old_params[lo:hi])
    if rank == 1:
        kl[3] = float("nan")
        with torch.no_grad():
            agent.actor.bias[0] = float("nan")
    results["nan_stats"] = mg.global_kl_stats(kl, 0.05)
    fix = mg.fixup_phase(agent, obs[lo:hi], old_params[lo:hi], theta_old, beta_for(mg), 0.05, 32, 3e-3, 3)
    results["nan_fixup"] = dict(fix=fix, params=flat(agent), kl_all=mg.batch_kl(agent, obs, old_params))

    # advantage moments over the global minibatch; gradients averaged with unequal counts
    torch.manual_seed(6)
    values = torch.randn(BATCH)
    chunks = [torch.arange(lo, hi).tensor_split(3) for lo, hi in ((0, SPLIT), (SPLIT, BATCH))]
    results["moments"] = mg.minibatch_moments(values, chunks[rank])  # rank r's chunks of the global minibatches
    agent, obs, old_params, _ = problem(7, 0.3)
    agent.zero_grad()
    mg.kl_per_state(old_params[lo:hi], agent.dist_params(obs[lo:hi])).sum().backward()
    mg.average_gradients(agent.actor_parameters(), hi - lo)
    results["grad"] = torch.cat([p.grad.reshape(-1) for p in agent.actor_parameters()])

    # the per-update check: parameters that differ in one bit on one rank fail on every rank, naming the update
    torch.manual_seed(8)
    agent = SmallAgent()
    if rank == 1:
        with torch.no_grad():
            agent.actor.bias[0] = torch.nextafter(agent.actor.bias[0], torch.tensor(1.0))
    try:
        mg.check_in_sync(agent, beta_for(mg), 7)
        results["sync"] = None
    except mg.OutOfSync as e:
        results["sync"] = str(e)
    tdist.destroy_process_group()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    os._exit(0)  # as the script's ranks do: a spawned worker's interpreter teardown can abort (SIGABRT) after gloo


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ranks"))
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(worker, args=(2, free_port(), out), nprocs=2, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def lockstep(r0, r1):
    assert torch.equal(r0["params"], r1["params"]), "ranks hold different parameters"
    assert (r0["fix"].grad_steps, r0["fix"].passes, r0["fix"].fallback) == (r1["fix"].grad_steps, r1["fix"].passes,
                                                                             r1["fix"].fallback)
    assert r0["fix"].kl_max == r1["fix"].kl_max


@pytest.mark.parametrize("name", ["halves", "whole_minibatch", "rank1_empty"])
def test_every_state_of_both_halves_within_eps_and_ranks_identical(ranks, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    eps_kl = SCENARIOS[name][2]
    lockstep(r0, r1)
    assert r0["fix"].grad_steps > 0 and not r0["fix"].fallback  # the violation was fixed by KL steps
    assert torch.equal(r0["kl_all"], r1["kl_all"])
    assert r0["kl_all"].max().item() <= eps_kl  # every state of the GLOBAL batch, both ranks' halves
    assert r0["fix"].kl_max == pytest.approx(r0["kl_all"].max().item(), rel=1e-5)
    assert r0["calls"] == r1["calls"] > 0  # the same collectives, in the same number


def test_violation_was_on_both_halves_before():
    """The perturbation leaves the region on both halves: each rank had states of its own to fix."""
    agent, obs, old_params, _ = problem(*SCENARIOS["halves"][:2])
    kl = mg.batch_kl(agent, obs, old_params)
    assert kl[:SPLIT].max() > 0.5 and kl[SPLIT:].max() > 0.5


def test_whole_batch_minibatch_equals_one_process(ranks):
    """Minibatch = the whole batch: 2 ranks with unequal halves take the steps one process takes on the whole batch."""
    seed, noise, eps_kl, mb, lr, passes = SCENARIOS["whole_minibatch"]
    agent, obs, old_params, theta_old = problem(seed, noise)
    fix = fa.fixup_phase(agent, obs, old_params, theta_old, beta_for(fa), eps_kl, mb, lr, passes)
    dist_fix = ranks[0]["whole_minibatch"]["fix"]
    assert (fix.grad_steps, fix.passes, fix.fallback) == (dist_fix.grad_steps, dist_fix.passes, dist_fix.fallback)
    assert torch.allclose(flat(agent), ranks[0]["whole_minibatch"]["params"], atol=1e-5)
    assert fix.kl_max == pytest.approx(dist_fix.kl_max, rel=1e-3)
    # and the module itself, in a world of one, is the single-process algorithm
    agent, obs, old_params, theta_old = problem(seed, noise)
    one = mg.fixup_phase(agent, obs, old_params, theta_old, beta_for(mg), eps_kl, mb, lr, passes)
    assert (one.grad_steps, one.passes) == (fix.grad_steps, fix.passes)


def test_forced_last_resort_stays_in_lockstep(ranks):
    r0, r1 = ranks[0]["last_resort"], ranks[1]["last_resort"]
    lockstep(r0, r1)
    assert r0["fix"].fallback and r0["fix"].passes == 2
    assert r0["kl_all"].max().item() <= 0.01


def test_nan_on_one_rank_is_seen_by_both(ranks):
    for r in ranks:
        kl_max, _, _, count = r["nan_stats"]
        assert kl_max != kl_max and count == BATCH  # NaN on both ranks, though rank 0's KL is finite
    r0, r1 = ranks[0]["nan_fixup"], ranks[1]["nan_fixup"]
    lockstep(r0, r1)
    assert r0["fix"].fallback and r0["fix"].passes == 3  # no pass could exit; the last resort restored theta_old
    assert r0["fix"].kl_max == 0.0 and r0["kl_all"].max().item() == 0.0


def test_moments_and_gradients_are_global(ranks):
    torch.manual_seed(6)
    values = torch.randn(BATCH)
    chunks = [torch.cat([a, b]) for a, b in zip(torch.arange(0, SPLIT).tensor_split(3),
                                                 torch.arange(SPLIT, BATCH).tensor_split(3))]
    for (mean, std), chunk in zip(ranks[0]["moments"], chunks):
        assert mean.item() == pytest.approx(values[chunk].mean().item(), abs=1e-6)
        assert std.item() == pytest.approx(values[chunk].std().item(), rel=1e-5)
    agent, obs, old_params, _ = problem(7, 0.3)
    mg.kl_per_state(old_params, agent.dist_params(obs)).mean().backward()
    expected = torch.cat([p.grad.reshape(-1) for p in agent.actor_parameters()])
    assert torch.equal(ranks[0]["grad"], ranks[1]["grad"])
    assert torch.allclose(ranks[0]["grad"], expected, rtol=1e-4, atol=1e-7)


def test_parameter_check_fails_loudly_on_every_rank(ranks):
    for r in ranks:
        assert r["sync"] is not None and r["sync"].startswith("update 7:")


# ---- the script, launched as users launch it ----

EPS_KL = 0.0003  # tiny, with a large lr: the fixup phase has work to do
TINY = ["--num-envs", "2", "--num-steps", "64", "--num-minibatches", "4", "--update-epochs", "2",
        "--fixup-minibatch-size", "32", "--total-timesteps", "256", "--eps-kl", str(EPS_KL), "--learning-rate", "1e-3",
        "--dist-timeout", "60"]  # 2 ranks x 1 env x 64 steps: two updates of 128 states


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the venv's torchrun, whether or not the venv is on PATH


def env():
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_torchrun_two_ranks_keep_every_update_inside(tmp_path):
    start = time.time()
    # 128 steps per env: near-random Breakout games end in ~200 steps, so each rank finishes games to report
    p = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", SCRIPT, *TINY, "--seed", "3",
                        "--num-steps", "128", "--total-timesteps", "512", "--save-model", "--eval-episodes", "1"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=150, env=env())
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))  # rank 0 alone logs
    logged = scalars(run_dir)
    from test_atari import TAGS

    assert TAGS <= set(logged), TAGS - set(logged)  # the same tags as fixpo_atari.py
    kl_max = logged["trust_region/kl_max"]
    assert len(kl_max) >= 2 and max(kl_max) <= EPS_KL  # the guarantee, as logged, over the global batch
    assert logged["fixpo/primary_grad_steps"] == [8, 8] and logged["dist/world_size"] == [2, 2]
    assert all(r >= 0 and r == int(r) for r in logged["charts/episodic_return"])  # whole games, every rank's
    assert sum(logged["fixpo/fixup_grad_steps"]) >= 1  # the distributed fixup phase had work to do
    assert logged["charts/SPS"] and "dist/comm_fraction" in logged
    assert len(re.findall(r"^step .*kl_max", p.stdout, re.M)) == 2  # one line per update, from rank 0 only
    assert len(glob.glob(str(tmp_path / "runs" / "*" / "*.fixpo_model"))) == 1
    print(f"torchrun 2 ranks: {time.time() - start:.1f}s")


def test_two_local_machines(tmp_path):
    """Two torchrun launches, --nnodes 2, static rendezvous at node 0's address (loopback): each a "machine" of one
    process. Static, as the script's docstring shows: node 0 hosts the store and the workers meet at --master-addr,
    not at a hostname that may not resolve (c10d's endpoint race and hostname lookup hung this test once)."""
    port = free_port()
    procs = []
    for node in range(2):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        procs.append(subprocess.Popen(
            [*TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
             "--master-port", str(port), SCRIPT, *TINY],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()))
    outputs, deadline = [], time.time() + 150
    for proc in procs:  # one deadline for both: a launch that failed early must not leave the other hanging
        try:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            errs = [p.communicate()[1][-1500:] for p in procs]
            pytest.fail(f"torchrun launches hung; stderr of node 0:\n{errs[0]}\nstderr of node 1:\n{errs[1]}")
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    logs = [glob.glob(str(tmp_path / f"node{n}" / "runs" / "*")) for n in range(2)]
    assert len(logs[0]) + len(logs[1]) == 1  # one run directory, written by rank 0's machine
    logged = scalars((logs[0] + logs[1])[0])
    assert len(logged["trust_region/kl_max"]) == 2 and max(logged["trust_region/kl_max"]) <= EPS_KL
    assert logged["dist/world_size"] == [2, 2]


def test_torchrun_sigterm_checkpoints_and_resumes_to_exactly_the_total(tmp_path):
    """SIGTERM to torchrun (it forwards it to every rank): all ranks stop after the same update, rank 0 writes the
    checkpoint; a torchrun with --resume continues to exactly the total, each update logged once."""
    start, batch, total = time.time(), 128, 768  # 6 updates
    first = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc_per_node", "2", SCRIPT, *TINY, "--total-timesteps",
                              str(total), "--checkpoint-every", "1"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.time() + 90
    while not glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=90)
    assert first.returncode != 0 and "checkpoint written" in out, err[-3000:]
    (ckpt,) = glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))
    state = torch.load(ckpt, weights_only=False)
    stopped_at, rngs = state["global_step"], state["counters"]["rng_per_rank"]
    assert 0 < stopped_at < total and f"--resume {os.path.relpath(ckpt, tmp_path)}" in out
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # each rank's own RNG states
    assert torch.equal(rngs[0]["torch"], state["rng"]["torch"])  # "rng": rank 0's, the layout of every script

    p = subprocess.run([sys.executable, SCRIPT, "--resume", ckpt], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60, env=env())  # a world of one
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"error: {ckpt!r} was written by 2 processes; resume it with as many (now 1)"]

    second = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", SCRIPT, "--resume", ckpt],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env())
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"at step {stopped_at}" in second.stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))  # the same run folder, nothing new
    from test_resume import scalar_events

    kl = scalar_events(run_dir, "trust_region/kl_max")
    assert [s for s, _ in kl] == list(range(batch, total + 1, batch))  # every update once: nothing lost or duplicated
    assert max(v for _, v in kl) <= EPS_KL
    assert torch.load(ckpt, weights_only=False)["global_step"] == total
    print(f"torchrun SIGTERM + resume: {time.time() - start:.1f}s")


# ---- bad input: one line, before any collective ----

def test_bad_input_is_one_clear_line(tmp_path):
    for args, extra_env, expected in [
        (["--env-id", "Hopper-v4"], {}, "not an Atari game"),
        (["--num-envs", "3", "--num-steps", "4", "--num-minibatches", "1"], {"WORLD_SIZE": "2"},
         "not divisible by the world size 2"),
    ]:
        p = subprocess.run([sys.executable, SCRIPT, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                           env=dict(env(), **extra_env))
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], p.stderr
        assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("flags, world, expected", [
    ({"num_envs": 6}, 4, "not divisible by the world size 4"), ({"dist_timeout": 0.0}, 1, "--dist-timeout"),
    ({"eps_kl": 0.0}, 2, "--eps-kl"),
])
def test_impossible_settings_are_refused(flags, world, expected):
    with pytest.raises(mg.UsageError, match=re.escape(expected)):
        mg.check_args(mg.Args(**flags), world)


def test_a_finished_run_skips_the_interpreter_teardown_on_every_rank(tmp_path):
    """Every finished rank leaves through os._exit, so a C++ thread destroyed out of order at interpreter teardown
    cannot turn a finished run into SIGABRT (seen once on rank 0 of a resumed run). An atexit hook that aborts stands
    in for that teardown: it runs, and the rank exits -6, only if the rank goes through the normal teardown."""
    driver = tmp_path / "driver.py"
    driver.write_text("import atexit, os, runpy, sys\n"
                      "atexit.register(os.abort)\n"
                      f"sys.argv = [{SCRIPT!r}, *sys.argv[1:]]\n"
                      f"runpy.run_path({SCRIPT!r}, run_name='__main__')\n")
    p = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(driver), *TINY], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env=env())
    assert p.returncode == 0, p.stderr[-3000:]
