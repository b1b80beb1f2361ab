"""fixpo_metaworld.py: per-task beta keeps the guarantee, success bookkeeping, transfer, and the script end to end."""
import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import fixpo_continuous as fc
import fixpo_metaworld as fm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "fixpo_metaworld.py")
# 1 env x 256 steps, two policy updates; the first 500-step episode ends in the second update
TINY = ["--num-envs", "1", "--num-steps", "256", "--num-minibatches", "4", "--update-epochs", "2",
        "--fixup-minibatch-size", "128", "--total-timesteps", "512"]
TAGS = {
    "trust_region/kl_max", "trust_region/kl_mean", "fixpo/beta", "fixpo/primary_grad_steps",
    "fixpo/fixup_grad_steps", "fixpo/fixup_passes", "fixpo/fixup_fraction", "fixpo/fixup_fraction_cumulative",
    "fixpo/fixup_fallbacks", "charts/episodic_return", "charts/episodic_length", "charts/SPS",
    "charts/learning_rate", "charts/action_std", "charts/success_rate", "losses/value_loss", "losses/policy_loss",
    "losses/entropy", "losses/explained_variance",
}


def run(args, cwd, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def independent_gaussian_kl(old_params, new_params):
    """Closed-form KL of diagonal Gaussians in float64, written out rather than via torch.distributions."""
    old, new = old_params.double(), new_params.double()
    m0, ls0 = old.chunk(2, -1)
    m1, ls1 = new.chunk(2, -1)
    return (ls1 - ls0 + (torch.exp(2 * ls0) + (m0 - m1) ** 2) / (2 * torch.exp(2 * ls1)) - 0.5).sum(-1)


# ---- per-task beta: the guarantee at every state of every task ----

K, PER_TASK, ACT = 5, 400, 4


def multitask_batch(seed=0):
    torch.manual_seed(seed)
    agent = fm.Agent(fm.OBS_DIM + K, ACT)
    task = torch.arange(K).repeat_interleave(PER_TASK)
    obs = torch.cat([torch.randn(K * PER_TASK, fm.OBS_DIM) * 2.0, torch.eye(K)[task]], dim=1)
    with torch.no_grad():
        agent.actor_mean[4].weight.mul_(30.0)  # a trained policy's output layer, not the 0.01-scaled initial one
        old_params = agent.dist_params(obs)
    theta_old = [p.detach().clone() for p in agent.actor_parameters()]
    return agent, obs, task, old_params, theta_old


@pytest.mark.parametrize("eps_kl,max_passes", [(0.5, 100), (0.05, 10)])
def test_per_task_beta_fixup_puts_every_state_of_every_task_within_eps(eps_kl, max_passes):
    """Tasks 0 and 3 leave the region (through their one-hot columns), the others stay at KL 0. At eps_kl = 0.5 this
    is the size of violation a primary phase leaves: gradient steps alone fix it. At 0.05 (up to 26x eps_kl) the
    passes run out and the last resort must still deliver the guarantee."""
    agent, obs, task, old_params, theta_old = multitask_batch()
    with torch.no_grad():
        first = agent.actor_mean[0].weight
        first[:, fm.OBS_DIM + 0] += 3.0 * torch.randn(first.shape[0])
        first[:, fm.OBS_DIM + 3] += 2.0 * torch.randn(first.shape[0])
    before = independent_gaussian_kl(old_params, agent.dist_params(obs).detach())
    worst = [before[task == k].max().item() for k in range(K)]
    assert worst[0] > eps_kl and worst[3] > eps_kl and max(worst[1:3] + worst[4:]) == 0.0, worst
    beta = fm.Beta(1.0, 0.01, eps_kl, c_beta=3.0, beta_max=100.0, num_groups=K)
    result = fm.fixup_phase(agent, obs, old_params, theta_old, beta, eps_kl, 500, 3e-4, max_passes, state_group=task)
    after = independent_gaussian_kl(old_params, agent.dist_params(obs).detach())
    for k in range(K):
        assert after[task == k].max().item() <= eps_kl * (1 + 1e-5), (k, after[task == k].max().item())
    assert result.kl_max <= eps_kl and result.grad_steps > 0 and result.fallback == (eps_kl < 0.5)
    b = beta.value.tolist()
    assert b[0] > 1.0 and b[3] > 1.0 and max(b[1], b[2], b[4]) < 1.0  # each multiplier saw only its task's KL


def test_per_task_beta_moves_each_multiplier_on_its_own_states():
    beta = fm.Beta(1.0, 0.1, eps_kl=0.3, c_beta=3.0, beta_max=100.0, num_groups=3)
    kl = torch.tensor([0.5, 0.01, 0.02, 0.2])  # task 0: 3 x 0.5 > 0.3 (raise); task 1: 3 x 0.02 < 0.3 (lower)
    beta.step(kl, torch.tensor([0, 1, 1, 0]))
    b = beta.value.tolist()
    assert b[0] > 1.0 and b[1] < 1.0 and b[2] == 1.0  # task 2 has no state here: no gradient, no step yet


def test_absent_task_keeps_its_beta_and_momentum():
    """Adam steps the whole vector: without care, a task missing from a minibatch moves on its old momentum."""
    beta = fm.Beta(1.0, 0.01, eps_kl=0.5, c_beta=3.0, beta_max=100.0, num_groups=2)
    beta.step(torch.tensor([0.4, 0.4]), torch.tensor([0, 1]))  # both over eps_kl / c_beta: both rise
    b1, m1 = beta.value[1].item(), beta.optimizer.state[beta.value]["exp_avg"][1].item()
    assert b1 > 1.0
    for _ in range(5):
        beta.step(torch.tensor([0.4]), torch.tensor([0]))  # task 1 absent
    assert beta.value[1].item() == b1 and beta.optimizer.state[beta.value]["exp_avg"][1].item() == m1
    assert beta.value[0].item() > b1


def test_shared_beta_is_the_single_task_multiplier():
    """One group: a step on every state's KL is fixpo_continuous's step on max_s KL(s) alone."""
    shared, single = fm.Beta(1.0, 0.05, 0.2, 3.0, 100.0), fc.Beta(1.0, 0.05, 0.2, 3.0, 100.0)
    torch.manual_seed(0)
    for scale in [0.01, 0.3, 0.2, 0.0, 0.05] * 4:
        kl = scale * torch.rand(64)
        shared.step(kl)
        single.step(kl.max().reshape(1))
        assert float(shared) == pytest.approx(float(single), abs=1e-6)


# ---- success bookkeeping ----

def test_success_tracker_on_a_scripted_episode_sequence():
    """Two envs, NEXT_STEP autoreset: an episode succeeds if the flag fired at any of its steps; the autoreset
    step after a done belongs to no episode, so a flag there (none in Meta-World, but say one came) is ignored."""
    tracker = fm.SuccessTracker(2)
    script = [  # (success per env, done per env) -> finished episodes' flags
        ([0, 0], [0, 0], []),
        ([1, 0], [0, 0], []),  # env 0 succeeds mid-episode...
        ([0, 0], [1, 0], [True]),  # ...and ends without the flag on its last step: still a success
        ([1, 0], [0, 0], []),  # env 0's autoreset step: a flag here must not count for the next episode
        ([0, 0], [0, 1], [False]),  # env 1 never succeeded
        ([0, 1], [1, 0], [False]),  # env 0's second episode: no flag; env 1's autoreset step has one: ignored
        ([0, 0], [0, 0], []),
        ([0, 1], [0, 1], [True]),  # flag on the last step itself counts
        ([1, 1], [1, 1], [True, False]),  # env 0: a real step; env 1: its autoreset step, and done (as Meta-World never does)
    ]
    for success, dones, expected in script:
        assert list(tracker.update(np.array(success, dtype=float), np.array(dones, dtype=bool))) == expected


# ---- transfer: the loaded policy is the saved one, on every task ----

def saved(benchmark, env_id="pick-place-v3", seed=0):
    tasks = fm.check_env(env_id, benchmark)
    torch.manual_seed(seed)
    agent = fm.Agent(fm.OBS_DIM + (len(tasks) if benchmark else 0), ACT)
    with torch.no_grad():  # give the one-hot columns weight, as training would
        for layer in (agent.actor_mean[0], agent.critic[0]):
            layer.weight[:, fm.OBS_DIM:] = torch.randn_like(layer.weight[:, fm.OBS_DIM:])
    return agent, {"agent": agent.state_dict(), "args": {"env_id": env_id, "benchmark": benchmark}}


def test_transfer_from_one_task_to_mt10_starts_every_task_at_the_saved_policy():
    source, checkpoint = saved(None)
    tasks = fm.check_env("", "MT10")
    target = fm.Agent(fm.OBS_DIM + len(tasks), ACT)
    target.load_state_dict(fm.transfer_state(checkpoint, tasks, one_hot=True))
    x = torch.randn(32, fm.OBS_DIM)
    for k in range(len(tasks)):
        xk = torch.cat([x, torch.eye(len(tasks))[k].expand(32, -1)], dim=1)
        assert torch.allclose(target.dist_params(xk), source.dist_params(x), atol=1e-6)
        assert torch.allclose(target.get_value(xk), source.get_value(x), atol=1e-6)


def test_transfer_from_mt10_back_to_one_of_its_tasks_keeps_that_task_s_policy():
    source, checkpoint = saved("MT10")
    tasks = fm.check_env("", "MT10")
    k = tasks.index("pick-place-v3")
    target = fm.Agent(fm.OBS_DIM, ACT)
    target.load_state_dict(fm.transfer_state(checkpoint, ["pick-place-v3"], one_hot=False))
    x = torch.randn(32, fm.OBS_DIM)
    xk = torch.cat([x, torch.eye(len(tasks))[k].expand(32, -1)], dim=1)
    assert torch.allclose(target.dist_params(x), source.dist_params(xk), atol=1e-5)


def test_mt10_observation_is_normalised_state_plus_exact_one_hot():
    envs = fm.make_envs(["reach-v3", "push-v3", "door-open-v3"], 2, 0.99, seed=0, one_hot=True)  # env i: task i % 3
    obs, _ = envs.reset()
    obs, *_ = envs.step(envs.action_space.sample())
    assert obs.shape == (2, fm.OBS_DIM + 3) and envs.single_observation_space.shape == (fm.OBS_DIM + 3,)
    assert np.array_equal(obs[:, fm.OBS_DIM:], np.eye(3)[:2]) and np.all(np.abs(obs) <= 10)
    assert envs.unwrapped.envs[1].unwrapped.__class__.__name__ == "SawyerPushEnvV3"
    assert fm.find_wrapper(envs, fm.vw.NormalizeObservation).obs_rms.mean.shape == (fm.OBS_DIM,)
    envs.close()


def test_a_resumed_run_gets_new_goals_not_a_replay_of_the_first_ones():
    """Meta-World ignores reset(seed=): without reseed_goals a resumed run would replay the goals its start saw."""
    def goals(reseed=None):
        envs = fm.make_envs(["reach-v3"], 2, 0.99, seed=0)
        if reseed is not None:
            fm.reseed_goals(envs, reseed)
        out = []
        for _ in range(3):  # three episodes' goals per env
            envs.reset()
            out.append(np.stack([e.unwrapped._target_pos.copy() for e in envs.unwrapped.envs]))
        envs.close()
        return np.stack(out)

    start = goals()
    assert np.array_equal(goals(reseed=0), start)  # reseed_goals(seed) is the stream make_env starts with
    resumed = goals(reseed=0 + 5000)  # as the script does on --resume at step 5000
    resumed, start = resumed.reshape(-1, 3), start.reshape(-1, 3)
    assert not np.any(np.all(np.isclose(resumed[:, None], start[None]), axis=-1))  # no goal of the start repeats


# ---- the script end to end ----

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("train")
    p = run([*TINY, "--env-id", "reach-v3", "--seed", "3", "--eps-kl", "0.05", "--save-model", "--eval-episodes", "1"], cwd)
    assert p.returncode == 0, p.stderr
    return cwd, p


def test_smoke_two_updates_logs_every_tag(trained):
    cwd, p = trained
    (run_dir,) = glob.glob(str(cwd / "runs" / "*"))
    logged = scalars(run_dir)
    assert TAGS <= set(logged), TAGS - set(logged)
    assert len(logged["trust_region/kl_max"]) == 2 and max(logged["trust_region/kl_max"]) <= 0.05
    assert logged["fixpo/primary_grad_steps"] == [8, 8]
    assert logged["charts/episodic_length"] == [500] and len(logged["charts/success_rate"]) == 1
    assert {"eval/success_rate", "eval/episodic_return"} <= set(logged)
    assert len(re.findall(r"^step .*success .*kl_max", p.stdout, re.M)) == 2  # one progress line per update


def test_saved_model_evaluation_reproduces_the_success_rate(trained):
    cwd, p = trained
    (model,) = glob.glob(str(cwd / "runs" / "*" / "*.fixpo_model"))
    in_training = re.search(r"evaluation: success rate (\S+) over 1 goal", p.stdout).group(1)
    e = run(["--eval-checkpoint", model, "--eval-episodes", "1", "--seed", "3"], cwd)
    assert e.returncode == 0, e.stderr
    assert re.search(r"^success rate (\S+) over 1 goal", e.stdout, re.M).group(1) == in_training
    assert re.search(r"^reach-v3 +success rate", e.stdout, re.M)
    (ckpt,) = glob.glob(str(cwd / "runs" / "*" / "checkpoint.pt"))  # the run's training state evaluates the same
    e = run(["--eval-checkpoint", ckpt, "--eval-episodes", "1", "--seed", "3"], cwd)
    assert e.returncode == 0, e.stderr
    assert re.search(r"^success rate (\S+) over 1 goal", e.stdout, re.M).group(1) == in_training
    ckpt = torch.load(model)
    assert ckpt["obs_rms"]["mean"].shape == (fm.OBS_DIM,) and ckpt["obs_rms"]["count"] > 512


def test_transfer_to_mt10_with_per_task_beta_holds_the_region_from_the_first_update(trained):
    """--load-checkpoint from the one-task model into MT10 (one env per task), one beta per task."""
    cwd, _ = trained
    (model,) = glob.glob(str(cwd / "runs" / "*" / "*.fixpo_model"))
    p = run(["--benchmark", "MT10", "--per-task-beta", "--load-checkpoint", model, "--num-steps", "16",
             "--num-minibatches", "4", "--update-epochs", "2", "--fixup-minibatch-size", "40",
             "--total-timesteps", "320", "--eps-kl", "0.02"], cwd)  # too short for an episode to end
    assert p.returncode == 0, p.stderr
    (run_dir,) = glob.glob(str(cwd / "runs" / "MT10*"))
    logged = scalars(run_dir)
    assert logged["trust_region/kl_max"][0] <= 0.02 and max(logged["trust_region/kl_max"]) <= 0.02
    tasks = fm.check_env("", "MT10")
    per_task = {f"tasks/{kind}/{t}" for kind in ("beta", "kl_max") for t in tasks}
    no_episode_ended = {"charts/success_rate", "charts/episodic_return", "charts/episodic_length"}
    assert per_task | (TAGS - no_episode_ended) <= set(logged)
    assert len({logged[f"tasks/beta/{t}"][-1] for t in tasks}) > 1  # the multipliers went their own ways


BAD = {  # checked in-process: the script turns each UsageError into one `error:` line and exit 1
    "unknown task": (lambda: fm.check_env("pick-place-v2"), "unknown Meta-World task 'pick-place-v2'; valid: "),
    "unknown benchmark": (lambda: fm.check_env("reach-v3", "MT7"), "valid: MT10, MT50"),
    "per-task beta on one task": (lambda: fm.check_args(fm.Args(num_envs=10, per_task_beta=True)), "--per-task-beta"),
    "envs not a multiple of tasks": (lambda: fm.check_args(fm.Args(num_envs=15, benchmark="MT10"), 10), "multiple"),
    "missing checkpoint": (lambda: fm.read_checkpoint("nowhere.fixpo_model"), "cannot read"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_with_a_clear_message(case):
    check, expected = BAD[case]
    with pytest.raises(fm.UsageError) as e:
        check()
    assert expected in str(e.value) and "\n" not in str(e.value)
    if case == "unknown task":
        assert "reach-v3" in str(e.value) and "pick-place-v3" in str(e.value)


def test_another_script_s_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "hopper.fixpo_model")
    torch.save({"agent": {}, "obs_rms": {}, "args": {"env_id": "Hopper-v4"}}, path)
    with pytest.raises(fm.UsageError, match="cannot read a fixpo_metaworld.py checkpoint"):
        fm.read_checkpoint(path)


def test_unknown_task_from_the_command_line_is_one_line_and_writes_nothing(tmp_path):
    p = run(["--env-id", "pick-place-v2", "--load-checkpoint", "x"], tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: unknown Meta-World task"), p.stderr
    assert "reach-v3" in lines[0] and not os.listdir(tmp_path)


def test_import_has_no_side_effects(tmp_path):
    # dependencies first: their imports may set variables of their own; `import metaworld` registers env ids
    code = ("import os, sys, gymnasium, metaworld, torch, tyro; sys.path.insert(0, %r); before = dict(os.environ); "
            "import fixpo_metaworld; assert dict(os.environ) == before; print(sorted(os.listdir('.')))" % ROOT)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
