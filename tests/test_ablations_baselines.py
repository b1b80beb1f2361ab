"""ablations/ and baselines/: each runs end to end, each diff stays honest, and TRPO's pieces are right."""
import difflib
import glob
import importlib.util
import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fixpo_continuous as fc
from test_fixup import independent_gaussian_kl, perturb_noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = sorted(glob.glob(os.path.join(ROOT, "ablations", "*.py")))
BASELINES = sorted(glob.glob(os.path.join(ROOT, "baselines", "*.py")))
TINY = ["--num-envs", "2", "--num-steps", "64", "--num-minibatches", "4", "--update-epochs", "2",
        "--total-timesteps", "256"]  # two policy updates
COMMON_TAGS = {
    "trust_region/kl_max", "trust_region/kl_mean", "charts/episodic_return", "charts/episodic_length",
    "charts/SPS", "charts/learning_rate", "charts/action_std", "losses/value_loss", "losses/policy_loss",
    "losses/entropy", "losses/explained_variance",
}
# An ablation is fixpo_continuous.py with one idea changed. Its header (about 8 changed lines: which
# ablation, the run and evaluate commands) plus the idea itself (at most about 15) stay under this;
# a larger diff means the copy has drifted from its parent and no longer isolates the idea.
MAX_ABLATION_DIFF = 30


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # inspect finds a class's source through its module
    spec.loader.exec_module(module)
    return module


def changed_lines(a, b):
    with open(a) as fa, open(b) as fb:
        return sum(line[:1] in "+-" and line[:3] not in ("+++", "---")
                   for line in difflib.unified_diff(fa.readlines(), fb.readlines(), n=0))


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_ablation_of_the_paper_is_here():
    names = {os.path.basename(p) for p in ABLATIONS}
    assert {"fixpo_no_fixup.py", "fixpo_mean_kl.py", "fixpo_fixup_last_epoch.py", "fixpo_constant_beta.py"} <= names
    assert {os.path.basename(p) for p in BASELINES} == {"ppo_continuous.py", "trpo_continuous.py"}


@pytest.mark.parametrize("path", ABLATIONS, ids=os.path.basename)
def test_ablation_diff_stays_small(path):
    n = changed_lines(os.path.join(ROOT, "fixpo_continuous.py"), path)
    assert 0 < n <= MAX_ABLATION_DIFF, f"{n} changed lines"


@pytest.mark.parametrize("path", ABLATIONS + BASELINES, ids=os.path.basename)
def test_shared_helpers_are_identical_to_fixpo(path):
    """The skeleton (envs, GAE, KL measure, checkpoints) is FixPO's, so results differ only by the algorithm."""
    module = load(path)
    for name in ["make_envs", "compute_gae", "kl_per_state", "batch_kl", "make_dist", "value_loss", "evaluate",
                 "save_checkpoint"]:
        assert inspect.getsource(getattr(module, name)) == inspect.getsource(getattr(fc, name)), name


# One FixPO API in every script: a script that has one of these helpers has fixpo_continuous.py's source for it,
# so a fix or a signature change lands everywhere or the test fails. A new training script joins FIXPO_SCRIPTS.
FIXPO_SCRIPTS = [os.path.join(ROOT, p) for p in ("fixpo_atari.py", "fixpo_atari_multigpu.py", "fixpo_metaworld.py")] \
    + ABLATIONS
FIXPO_HELPERS = ["Beta", "beta_loss", "FixupResult", "fixup_phase", "backtrack_toward_old", "report_fallback",
                 "compute_gae", "kl_per_state", "batch_kl",
                 # checkpoints, --resume, SIGINT/SIGTERM and non-finite stops: one layout and behaviour everywhere
                 "NonFinite", "check_finite", "save_training_state", "typed_fields", "load_training_state", "restore_rng",
                 "StopSignals", "load_model"]
# The only documented differences. Each entry must still differ (a stale entry fails), everything else must match.
ALLOWED_DIFFERENCES = {
    # discrete actions: the categorical KL from logits (log_softmax stays finite where a probability underflows), and
    # batch_kl's chunk sized for CNN passes; fixup_phase calls both by name, so its own source is the same
    "fixpo_atari.py": {"kl_per_state", "batch_kl"},
    # distributed: the fixup phase's exit and violation tests and the last resort's acceptance test read KL statistics
    # all-reduced over every rank's states; and Atari's logits KL and CNN-sized batch_kl chunks, as fixpo_atari.py
    "fixpo_atari_multigpu.py": {"fixup_phase", "backtrack_toward_old", "kl_per_state", "batch_kl"},
    # the ablation's idea (ablations/README.md): the region bounds the mean KL, so the fixup phase's exit and
    # violation tests and the last resort's acceptance test use the mean
    "fixpo_mean_kl.py": {"fixup_phase", "backtrack_toward_old"},
    "fixpo_excess_fixup.py": {"fixup_phase"},  # its one idea: the fixup step's loss
    "fixpo_log_beta.py": {"Beta"},  # its one idea: Adam steps log(beta), so beta moves by factors and stays > 0
}


@pytest.mark.parametrize("path", FIXPO_SCRIPTS + BASELINES, ids=os.path.basename)
def test_fixpo_helpers_are_one_api_across_scripts(path):
    module = load(path)
    allowed = ALLOWED_DIFFERENCES.get(os.path.basename(path), set())
    for name in FIXPO_HELPERS:
        if not hasattr(module, name):
            assert path in BASELINES, f"{name} missing"  # baselines have no beta and no fixup phase
            continue
        same = inspect.getsource(getattr(module, name)) == inspect.getsource(getattr(fc, name))
        assert same != (name in allowed), f"{name}: {'identical, drop it from ALLOWED_DIFFERENCES' if same else 'differs'}"
    assert "compute_gae" in vars(module)


@pytest.mark.parametrize("path", [os.path.join(ROOT, "fixpo_continuous.py")] + FIXPO_SCRIPTS + BASELINES,
                         ids=os.path.basename)
def test_agent_defaults_are_the_scripts_defaults(path):
    """Agent(obs_dim, act_dim), as evaluate() and tests build it, starts where a training run with the defaults does."""
    module = load(path)
    defaults = inspect.signature(module.Agent.__init__).parameters
    for name, default in vars(module.Args).items():
        if name in defaults and defaults[name].default is not inspect.Parameter.empty:
            assert defaults[name].default == default, name


def test_fallback_report_is_one_line_on_stderr(capsys):
    fc.report_fallback(7, fc.FixupResult(grad_steps=300, passes=100, fallback=True, kl_max=0.15, kl_mean=0.01))
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "update 7" in err and "100 passes" in err and "0.1500" in err


@pytest.mark.parametrize("path", ABLATIONS + BASELINES, ids=os.path.basename)
def test_runs_two_updates_and_logs_the_trust_region(path, tmp_path):
    p = subprocess.run([sys.executable, path, *TINY, "--seed", "2"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 0, p.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    logged = scalars(run_dir)
    assert COMMON_TAGS <= set(logged), COMMON_TAGS - set(logged)
    assert len(logged["trust_region/kl_max"]) == 2
    if "ablations" in path:
        assert {"fixpo/beta", "fixpo/fixup_grad_steps", "fixpo/fixup_fallbacks"} <= set(logged)


def test_constant_beta_ablation_never_moves_beta(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "ablations", "fixpo_constant_beta.py"), *TINY,
                        "--eps-kl", "0.001"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert scalars(run_dir)["fixpo/beta"] == [10.0, 10.0]


def test_mean_kl_ablation_bounds_the_mean_but_not_every_state():
    mean_kl = load(os.path.join(ROOT, "ablations", "fixpo_mean_kl.py"))
    torch.manual_seed(0)
    agent = mean_kl.Agent(11, 3)
    obs = torch.randn(2048, 11) * 2.0
    with torch.no_grad():
        old_params = agent.dist_params(obs)
    theta_old = [p.detach().clone() for p in agent.actor_parameters()]
    perturb_noise(agent, 0.3)
    beta = mean_kl.Beta(1.0, 0.01, 0.2, 3.0, 100.0)
    mean_kl.fixup_phase(agent, obs, old_params, theta_old, beta, 0.2, 256, 3e-4, 50)
    after = independent_gaussian_kl(old_params, agent.dist_params(obs).detach())
    assert after.mean() <= 0.2 * (1 + 1e-5)
    assert after.max() > 0.2  # the ablated guarantee: single states are left outside


@pytest.mark.parametrize("fixture", ["fixup_overshoot_then_steady", "fixup_single_violator", "fixup_mean_at_minimum"])
def test_excess_fixup_ablation_keeps_every_state_inside(fixture):
    """The ablation changes only the fixup step's loss: its exit test, hence the guarantee, is FixPO's."""
    excess = load(os.path.join(ROOT, "ablations", "fixpo_excess_fixup.py"))
    e = torch.load(os.path.join(ROOT, "tests", "data", fixture + ".pt"))
    agent = excess.Agent(e["obs"].shape[1], e["old_params"].shape[1] // 2)
    agent.load_state_dict(e["agent"], strict=False)
    torch.manual_seed(0)
    result = excess.fixup_phase(agent, e["obs"], e["old_params"], e["theta_old"], excess.Beta(1.0, 0.01, 0.2, 3.0, 100.0),
                                e["eps_kl"], e["minibatch_size"], e["lr"], e["max_passes"])
    assert not result.fallback
    assert independent_gaussian_kl(e["old_params"], agent.dist_params(e["obs"]).detach()).max() <= e["eps_kl"] * (1 + 1e-5)


def test_decoupled_kl_penalty_does_not_push_the_std_up_for_mean_moves():
    """The ablation's penalty equals the true KL where the std is unchanged; moving only the mean, the true KL's
    gradient raises log-std (its (mu - mu_old)^2 / 2 sigma^2 term), the decoupled one's is exactly 0."""
    decoupled = load(os.path.join(ROOT, "ablations", "fixpo_decoupled_kl.py"))
    torch.manual_seed(0)
    old = torch.randn(16, 6, dtype=torch.float64)
    new = old.clone()
    new[:, :3] += 0.5 * torch.randn(16, 3, dtype=torch.float64)
    assert torch.allclose(decoupled.decoupled_kl_per_state(old, new), fc.kl_per_state(old, new))
    grads = []
    for kl in (fc.kl_per_state, decoupled.decoupled_kl_per_state):
        p = new.clone().requires_grad_()
        kl(old, p).sum().backward()
        grads.append(p.grad[:, 3:])
    assert (grads[0] < 0).all() and (grads[1] == 0).all()  # gradient descent on the true KL raises log-std


def spied_run(path, tmp_path, spy):
    """A tiny Swimmer-v5 run of `path` in a fresh interpreter after `spy`, Python source that patches torch to append
    what it sees to the list `seen`; returns `seen`."""
    driver = ("import runpy, sys, torch\n"
              "seen = []\n" + spy +
              f"sys.argv = [{path!r}, *{TINY!r}, '--env-id', 'Swimmer-v5']\n"
              f"try:\n    runpy.run_path({path!r}, run_name='__main__')\n"
              "finally:\n    print('SEEN', seen)\n")
    tmp_path.mkdir()
    p = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 0, p.stderr
    return eval(p.stdout.split("SEEN")[-1])


def beta_step_sizes(path, tmp_path):
    """How many states each L_beta step of a tiny run saw: Beta.step's scatter_reduce is its only call."""
    return spied_run(path, tmp_path, "orig = torch.Tensor.scatter_reduce\n"
                                     "def spy(self, dim, index, src, *a, **k):\n"
                                     "    seen.append(len(src))\n"
                                     "    return orig(self, dim, index, src, *a, **k)\n"
                                     "torch.Tensor.scatter_reduce = spy\n")


def test_batch_beta_ablation_steps_beta_on_the_whole_batch(tmp_path):
    """TINY on Swimmer-v5 (no episode ends): 2 updates x 2 epochs x 4 minibatches of 32 of a 128-state batch. The
    parent's 16 primary L_beta steps see a minibatch; the ablation's see all 128 states (fixup steps: both 128)."""
    parent = beta_step_sizes(os.path.join(ROOT, "fixpo_continuous.py"), tmp_path / "parent")
    batch = beta_step_sizes(os.path.join(ROOT, "ablations", "fixpo_batch_beta.py"), tmp_path / "batch")
    assert parent.count(32) == 16 and set(parent) <= {32, 128}
    assert 32 not in batch and batch.count(128) >= 16


def fixup_phase_calls(path, tmp_path):
    """How many times a tiny run called the fixup phase: with its default fresh Adam, each call builds one Adam,
    besides the primary phase's optimiser and Beta's (one each per run)."""
    return len(spied_run(path, tmp_path, "orig = torch.optim.Adam.__init__\n"
                                         "def spy(self, *a, **k):\n"
                                         "    seen.append(1)\n"
                                         "    orig(self, *a, **k)\n"
                                         "torch.optim.Adam.__init__ = spy\n")) - 2


def test_fixup_last_epoch_ablation_calls_the_fixup_phase_once_per_update(tmp_path):
    """TINY: 2 updates x 2 epochs. The parent calls the fixup phase after every epoch (4 calls), the ablation after
    the last epoch of each update only (2 calls), which is all the guarantee between policy updates needs."""
    assert fixup_phase_calls(os.path.join(ROOT, "fixpo_continuous.py"), tmp_path / "parent") == 4
    assert fixup_phase_calls(os.path.join(ROOT, "ablations", "fixpo_fixup_last_epoch.py"), tmp_path / "last") == 2


def test_log_beta_ablation_scales_beta_by_factors_and_keeps_it_positive():
    """Adam's first step moves its parameter by exactly its rate against the gradient's sign: the parent's beta by
    -0.1, the ablation's log(beta) by -0.1, so beta by the factor e^-0.1 at any scale. Beta then stops at beta_min,
    not 0, and a beta restored from a checkpoint (written into .value) is where the next step starts."""
    lb = load(os.path.join(ROOT, "ablations", "fixpo_log_beta.py"))
    inside = torch.zeros(8)  # KL 0 at every state: L_beta lowers beta
    parent = fc.Beta(10.0, 0.1, 0.2, 3.0, 100.0)
    parent.step(inside)
    assert float(parent) == pytest.approx(9.9)
    for start in (10.0, 1.0):
        beta = lb.Beta(start, 0.1, 0.2, 3.0, 100.0, beta_min=0.01)
        beta.step(inside)
        assert float(beta) == pytest.approx(start * np.exp(-0.1), rel=1e-5)
    for _ in range(100):
        beta.step(inside)
    assert float(beta) == pytest.approx(0.01)
    beta.step(torch.ones(8))  # KL 1 > eps_kl / c_beta: L_beta raises it again
    assert float(beta) > 0.01
    resumed = lb.Beta(1.0, 0.1, 0.2, 3.0, 100.0, beta_min=0.01)
    resumed.value.data.fill_(5.0)
    resumed.step(inside)
    assert float(resumed) == pytest.approx(5.0 * np.exp(-0.1), rel=1e-5)


def test_staggered_envs_cut_only_the_first_episode_of_envs_after_the_first():
    """Env 0 keeps its full episodes (so evaluation, which plays env 0, is unchanged); env i > 0 ends its first
    episode, after a seeded reset, at a seeded random length in [1, 1000], then runs full 1000-step episodes."""
    staggered = load(os.path.join(ROOT, "ablations", "fixpo_staggered_envs.py"))

    def episode_lengths(env, seed, episodes):
        lengths, n = [], 0
        env.reset(seed=seed)
        while len(lengths) < episodes:
            n += 1
            _, _, term, trunc, _ = env.step(env.action_space.sample())
            if term or trunc:
                lengths.append(n)
                n = 0
                env.reset()
        return lengths

    assert episode_lengths(staggered.make_env("Swimmer-v5", 0, False, "")(), 7, 2) == [1000, 1000]
    firsts = []
    for seed in (7, 8, 9):
        first, second = episode_lengths(staggered.make_env("Swimmer-v5", 1, False, "")(), seed, 2)
        assert 1 <= first <= 1000 and second == 1000
        firsts.append(first)
    assert len(set(firsts)) == 3  # the seeds spread the envs' phases
    assert firsts[0] == episode_lengths(staggered.make_env("Swimmer-v5", 1, False, "")(), 7, 1)[0]  # seeded

    # through the vector env and its NEXT_STEP autoreset, as training runs it: 20-step episodes, env 0 whole
    import gymnasium as gym
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make("Swimmer-v5", max_episode_steps=20)]
        + [lambda: staggered.RandomFirstEpisodeLength(gym.make("Swimmer-v5", max_episode_steps=20))] * 3,
        autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    envs.reset(seed=1)
    lengths, n = [[] for _ in range(4)], [0] * 4
    for _ in range(60):
        _, _, term, trunc, _ = envs.step(envs.action_space.sample())
        for i in range(4):
            n[i] += 1
            if term[i] or trunc[i]:
                lengths[i].append(n[i])
                n[i] = -1  # the next step is the autoreset transition
    expected = [int(np.random.default_rng(1 + i).integers(1, 21)) for i in range(1, 4)]
    assert lengths[0][:2] == [20, 20] and [x[0] for x in lengths[1:]] == expected
    assert all(x[1] == 20 for x in lengths[1:])


# ---- TRPO ----

@pytest.fixture(scope="module")
def trpo():
    return load(os.path.join(ROOT, "baselines", "trpo_continuous.py"))


def test_conjugate_gradient_solves_an_spd_system(trpo):
    torch.manual_seed(0)
    q = torch.randn(20, 20, dtype=torch.float64)
    a = q @ q.T + 0.5 * torch.eye(20, dtype=torch.float64)
    b = torch.randn(20, dtype=torch.float64)
    x = trpo.conjugate_gradient(lambda v: a @ v, b, iters=60, tol=1e-20)
    assert torch.allclose(x, torch.linalg.solve(a, b), rtol=1e-6, atol=1e-8)


def test_fisher_vector_product_matches_the_explicit_fisher_matrix(trpo):
    """For a diagonal Gaussian, the Fisher of (mean, log_std) is diag(1/std^2, 2): F = mean_s J_s^T M_s J_s."""
    torch.manual_seed(1)
    agent = trpo.Agent(3, 2).double()
    obs = torch.randn(16, 3, dtype=torch.float64)
    with torch.no_grad():
        agent.actor_mean[-1].weight.mul_(100)  # a non-trivial mean, not the 0.01-scaled init
        agent.actor_logstd.copy_(torch.tensor([[-0.3, 0.4]]))
        old_params = agent.dist_params(obs)
    actor = agent.actor_parameters()
    n = sum(p.numel() for p in actor)
    fisher = torch.zeros(n, n, dtype=torch.float64)
    for s in range(len(obs)):
        params = agent.dist_params(obs[s:s + 1])[0]
        jac = torch.stack([trpo.flat_grad(params[i], actor, retain_graph=True) for i in range(len(params))])
        std2 = params[2:].detach().exp() ** 2
        metric = torch.diag(torch.cat([1.0 / std2, torch.full((2,), 2.0, dtype=torch.float64)]))
        fisher += jac.T @ metric @ jac / len(obs)
    for _ in range(3):
        v = torch.randn(n, dtype=torch.float64)
        fvp = trpo.fisher_vector_product(agent, obs, old_params, v, damping=0.0)
        assert torch.allclose(fvp, fisher @ v, rtol=1e-8, atol=1e-10)
    assert torch.allclose(trpo.fisher_vector_product(agent, obs, old_params, v, damping=0.1),
                          fisher @ v + 0.1 * v, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("max_kl", [0.001, 0.01, 0.1])
def test_every_accepted_trpo_step_keeps_the_mean_kl_bound(trpo, max_kl):
    for seed in range(4):
        torch.manual_seed(seed)
        agent = trpo.Agent(11, 3)
        obs = torch.randn(1024, 11) * 2.0
        with torch.no_grad():
            agent.actor_mean[-1].weight.mul_(50)  # far from init, so the quadratic model is imperfect
            old_params = agent.dist_params(obs)
            actions = trpo.make_dist(old_params).sample()
            old_logprob = trpo.make_dist(old_params).log_prob(actions).sum(-1)
        advantages = torch.randn(1024)
        theta_old = torch.cat([p.detach().reshape(-1) for p in agent.actor_parameters()])
        result = trpo.trpo_step(agent, obs, actions, old_logprob, advantages, old_params, max_kl, damping=0.1,
                                cg_iters=10, backtrack_coef=0.8, max_backtracks=10)
        after = independent_gaussian_kl(old_params, agent.dist_params(obs).detach())
        theta = torch.cat([p.detach().reshape(-1) for p in agent.actor_parameters()])
        if result.accepted:
            assert after.mean().item() <= max_kl * (1 + 1e-5)
            assert result.improvement > 0 and 0 < result.step_frac <= 1
            assert not torch.equal(theta, theta_old)
        else:
            assert torch.equal(theta, theta_old)  # a rejected step leaves pi_old in place


def test_trpo_line_search_backtracks_when_the_full_step_is_too_long(trpo):
    """Without damping the quadratic model's full step overshoots the exact mean KL here: with one try the step
    is rejected and pi_old kept; with ten, a shorter step is accepted inside the bound."""
    def attempt(max_backtracks):
        torch.manual_seed(0)
        agent = trpo.Agent(11, 3)
        obs = torch.randn(512, 11)
        with torch.no_grad():
            old_params = agent.dist_params(obs)
            actions = trpo.make_dist(old_params).sample()
            old_logprob = trpo.make_dist(old_params).log_prob(actions).sum(-1)
        advantages = actions.sum(-1) - actions.sum(-1).mean()  # a learnable signal
        before = [p.detach().clone() for p in agent.actor_parameters()]
        result = trpo.trpo_step(agent, obs, actions, old_logprob, advantages, old_params, 0.05, damping=0.0,
                                cg_iters=10, backtrack_coef=0.8, max_backtracks=max_backtracks)
        after = independent_gaussian_kl(old_params, agent.dist_params(obs).detach())
        unchanged = all(torch.equal(p, q) for p, q in zip(agent.actor_parameters(), before))
        return result, after.mean().item(), unchanged

    result, kl_mean, unchanged = attempt(max_backtracks=1)
    assert not result.accepted and unchanged and kl_mean == 0.0
    result, kl_mean, unchanged = attempt(max_backtracks=10)
    assert result.accepted and result.backtracks >= 1 and not unchanged
    assert kl_mean <= 0.05 * (1 + 1e-5)
