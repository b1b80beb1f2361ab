"""fixpo_atari.py: the guarantee for the categorical CNN policy, game-score bookkeeping, ids, and a smoke run."""
import glob
import os
import re
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import fixpo_atari as fa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "fixpo_atari.py")
NUM_ACTIONS, N = 6, 64
NEAR_DETERMINISTIC = torch.tensor([0.0, -60.0, -90.0, -30.0, -100.0, -120.0])  # probabilities down to 1e-52: 0 in float32


def independent_categorical_kl(old_logits, new_logits):
    """KL(old || new) of categoricals in float64, via an explicit logsumexp rather than torch.distributions."""
    def log_probs(logits):
        z = logits.double()
        m = z.max(-1, keepdim=True).values
        return z - m - (z - m).exp().sum(-1, keepdim=True).log()

    lp0, lp1 = log_probs(old_logits), log_probs(new_logits)
    return (lp0.exp() * (lp0 - lp1)).sum(-1)


def setup(seed=0, near_deterministic=False, init_beta=1.0):
    torch.manual_seed(seed)
    agent = fa.Agent(NUM_ACTIONS)
    if near_deterministic:
        with torch.no_grad():
            agent.actor.bias.copy_(NEAR_DETERMINISTIC)
    obs = torch.randint(0, 256, (N, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        old_params = agent.dist_params(obs)
    theta_old = [p.detach().clone() for p in agent.actor_parameters()]
    beta = fa.Beta(init_beta, 0.01, eps_kl=0.2, c_beta=3.0, beta_max=100.0)
    return agent, obs, old_params, theta_old, beta


def perturb_noise(params, scale):
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn_like(p))


def perturb_gradient_ascent(agent, obs, old_params, steps=3, lr=1e-3):
    """Steps that *increase* the KL (from a nudge: its gradient is 0 at theta_old): the worst a primary phase could do."""
    perturb_noise(agent.actor_parameters(), 0.01)
    opt = torch.optim.Adam(agent.actor_parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (-fa.kl_per_state(old_params, agent.dist_params(obs)).mean()).backward()
        opt.step()


def perturb_like_a_primary_phase(agent, obs, steps=8, lr=2.5e-4):
    """Adam steps (the script's lr) toward random actions on the whole network: a violation as training makes one."""
    actions = torch.randint(0, NUM_ACTIONS, (len(obs),))
    opt = torch.optim.Adam(agent.parameters(), lr=lr, eps=1e-5)
    for _ in range(steps):
        opt.zero_grad()
        (-fa.make_dist(agent.dist_params(obs)).log_prob(actions).mean()).backward()
        opt.step()


def shift_top_action(agent, shift):
    with torch.no_grad():
        agent.actor.bias[0] -= shift  # the near-certain action 0 becomes (shift > 60) unlikely


PERTURBATIONS = {  # name: (near-deterministic pi_old?, perturbation); max KL before: ~0.1 to ~1e3
    "primary_phase_like": (False, lambda a, o, p: perturb_like_a_primary_phase(a, o)),
    "head_noise": (False, lambda a, o, p: perturb_noise(a.actor.parameters(), 0.06)),
    "all_noise_far": (False, lambda a, o, p: perturb_noise(a.actor_parameters(), 0.1)),
    "gradient_ascent": (False, perturb_gradient_ascent),
    "near_deterministic_tie": (True, lambda a, o, p: (shift_top_action(a, 60.0), perturb_noise(a.actor.parameters(), 0.03))),
    "near_deterministic_far": (True, lambda a, o, p: shift_top_action(a, 200.0)),
}


def test_kl_per_state_is_finite_where_probabilities_underflow():
    old = torch.tensor([[0.0, -80.0, -120.0], [0.0, 0.0, 0.0], [5.0, -3.0, 1.0]])
    new = torch.tensor([[-150.0, 0.0, -300.0], [0.0, -200.0, 0.0], [5.0, -3.0, 1.0]])  # float32 probs of 0 in pi
    kl = fa.kl_per_state(old, new)
    assert torch.isfinite(kl).all()
    assert torch.allclose(kl.double(), independent_categorical_kl(old, new), rtol=1e-5)
    assert kl[0].item() == pytest.approx(150.0, rel=1e-4) and kl[2].item() == 0.0
    logits = torch.zeros(3, 3, requires_grad=True)
    fa.kl_per_state(old, logits).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_kl_per_state_matches_float64_on_random_and_extreme_logits():
    torch.manual_seed(1)
    a = torch.randn(512, NUM_ACTIONS) * torch.tensor([1.0, 10.0, 100.0, 1.0, 50.0, 1.0])
    b = a + torch.randn_like(a) * 30.0
    kl = fa.kl_per_state(a, b)
    ref = independent_categorical_kl(a, b)
    assert torch.isfinite(kl).all() and (kl >= -1e-6).all()
    assert torch.allclose(kl.double(), ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(fa.kl_per_state(a, a), torch.zeros(512))


@pytest.mark.parametrize("name, eps_kl", [(name, 0.05) for name in sorted(PERTURBATIONS)]
                         + [("gradient_ascent", 0.5), ("near_deterministic_tie", 0.5)])
def test_every_state_within_eps_after_fixup(name, eps_kl):
    near_deterministic, perturb = PERTURBATIONS[name]
    agent, obs, old_params, theta_old, beta = setup(sorted(PERTURBATIONS).index(name), near_deterministic)
    if near_deterministic:
        assert (torch.softmax(old_params, -1) == 0).any(), "pi_old must have float32 probabilities of 0"
    perturb(agent, obs, old_params)
    before = independent_categorical_kl(old_params, agent.dist_params(obs).detach())
    assert before.max() > eps_kl, "the perturbation must actually leave the region"

    # far perturbations (up to ~1e4 x eps_kl) may end in the last resort: the guarantee must hold either way
    result = fa.fixup_phase(agent, obs, old_params, theta_old, beta, eps_kl, minibatch_size=64, lr=2.5e-4, max_passes=6)

    after = independent_categorical_kl(old_params, agent.dist_params(obs).detach())
    assert torch.isfinite(after).all()
    assert after.max().item() <= eps_kl * (1 + 1e-5)  # float32 model vs float64 check
    assert result.kl_max <= eps_kl
    assert abs(result.kl_max - after.max().item()) < 1e-4 * max(1.0, eps_kl)


def test_training_sized_violation_is_fixed_by_gradient_steps_alone():
    """A violation of a few times eps_kl, as a primary phase leaves it: steps on torso + head, no last resort,
    and the value head's own parameters untouched (its output moves only through the shared torso)."""
    agent, obs, old_params, theta_old, beta = setup(seed=7)
    perturb_like_a_primary_phase(agent, obs)
    assert 0.04 < independent_categorical_kl(old_params, agent.dist_params(obs).detach()).max() < 0.5
    critic_before = [p.detach().clone() for p in agent.critic.parameters()]
    torso_before = [p.detach().clone() for p in agent.network.parameters()]
    result = fa.fixup_phase(agent, obs, old_params, theta_old, beta, 0.02, 64, 2.5e-4, 100)
    assert not result.fallback and 0 < result.grad_steps <= 10 and result.kl_max <= 0.02
    assert all(torch.equal(a, b) for a, b in zip(critic_before, agent.critic.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(torso_before, agent.network.parameters()))


def test_last_resort_restores_exactly_what_the_kl_depends_on():
    """At alpha = 0 the torso and actor head are theta_old again, so KL(s) = 0 exactly at every state."""
    agent, obs, old_params, theta_old, beta = setup(seed=3)
    perturb_noise(agent.parameters(), 0.1)
    critic = [p.detach().clone() for p in agent.critic.parameters()]
    kl_max = fa.backtrack_toward_old(agent, obs, old_params, theta_old, eps_kl=0.0)
    assert kl_max == 0.0
    assert all(torch.equal(p, old) for p, old in zip(agent.actor_parameters(), theta_old))
    assert all(torch.equal(p, c) for p, c in zip(agent.critic.parameters(), critic))


def test_terminates_with_tiny_learning_rate_via_last_resort():
    """Adversarial: near-deterministic pi_old, a violation far too large for the steps allowed."""
    agent, obs, old_params, theta_old, beta = setup(seed=4, near_deterministic=True)
    shift_top_action(agent, 100.0)
    result = fa.fixup_phase(agent, obs, old_params, theta_old, beta, 0.01, 64, lr=1e-12, max_passes=2)
    assert result.fallback and result.passes == 2
    after = independent_categorical_kl(old_params, agent.dist_params(obs).detach())
    assert after.max().item() <= 0.01 * (1 + 1e-5)


def test_no_step_when_already_inside():
    agent, obs, old_params, theta_old, beta = setup()
    before = [p.detach().clone() for p in agent.parameters()]
    result = fa.fixup_phase(agent, obs, old_params, theta_old, beta, 0.2, 64, 2.5e-4, 10)
    assert result.grad_steps == 0 and result.passes == 0 and not result.fallback
    assert all(torch.equal(a, b) for a, b in zip(before, agent.parameters()))


# ---- game scores across life losses, game overs, autoreset steps and truncations ----

def test_game_scores_on_a_scripted_sequence():
    """Env 0: life losses (one with a reward on it), game over, the autoreset step, a new game truncated.
    Env 1: plays on, then loses its last life at the same step env 0 is truncated."""
    scores = fa.GameScores(2)
    script = [  # (rewards, terms, truncs, lives) per step
        ([1, 0], [0, 0], [0, 0], [3, 3]),
        ([4, 2], [1, 0], [0, 0], [2, 3]),  # env 0 loses a life, scoring 4 on that step: the game goes on
        ([0, 0], [0, 0], [0, 0], [2, 3]),  # a real step of env 0's next life
        ([2, 0], [1, 0], [0, 0], [1, 3]),
        ([3, 0], [1, 1], [0, 0], [0, 2]),  # env 0: last life lost -> game over (score 10, 5 steps)
        ([0, 5], [0, 0], [0, 0], [3, 2]),  # env 0: autoreset step (reward 0, lives back): in no game
        ([7, 0], [0, 0], [0, 0], [3, 2]),
        ([1, 0], [0, 1], [1, 0], [3, 0]),  # env 0 truncated with lives left; env 1 game over
        ([0, 0], [0, 0], [0, 0], [3, 3]),  # both autoreset
        ([2, 1], [0, 0], [0, 0], [3, 3]),
    ]
    finished = []
    for t, (r, term, trunc, lives) in enumerate(script):
        done = scores.update(np.array(r, float), np.array(term, bool), np.array(trunc, bool), np.array(lives))
        finished += [(t, *f) for f in done]
        if t == 1:
            assert not scores.autoreset_next.any()  # a life loss: the next step is real
        if t == 4:
            assert scores.autoreset_next.tolist() == [True, False]
    assert finished == [(4, 0, 10.0, 5), (7, 0, 8.0, 2), (7, 1, 7.0, 8)]
    assert scores.returns.tolist() == [2.0, 1.0] and scores.lengths.tolist() == [1, 1]


def test_real_env_life_loss_is_a_real_step_and_game_over_autoresets():
    """AtariVectorEnv as make_envs builds it: after a life loss the frame counter runs on; after a game over it restarts."""
    envs = fa.make_envs("BreakoutNoFrameskip-v4", 2)
    obs, info = envs.reset(seed=0)
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    scores, rng = fa.GameScores(2), np.random.default_rng(0)
    prev_frame, prev_kind, seen, games = info["episode_frame_number"], [None, None], set(), 0
    while games < 2:
        obs, reward, term, trunc, info = envs.step(rng.integers(0, 4, 2))
        games += len(scores.update(reward, term, trunc, info["lives"]))
        for i in range(2):
            if prev_kind[i] is not None:
                restarted = info["episode_frame_number"][i] < prev_frame[i]
                assert restarted == (prev_kind[i] == "game_over"), prev_kind[i]
                seen.add(prev_kind[i])
            prev_kind[i] = ("game_over" if info["lives"][i] == 0 else "life_loss") if term[i] else None
        prev_frame = info["episode_frame_number"]
    envs.close()
    assert seen == {"life_loss", "game_over"}


@pytest.mark.parametrize("env_id, game", [
    ("BreakoutNoFrameskip-v4", "breakout"), ("ALE/Breakout-v5", "breakout"), ("Breakout-v5", "breakout"),
    ("breakout", "breakout"), ("MsPacmanNoFrameskip-v4", "ms_pacman"), ("ALE/SpaceInvaders-v5", "space_invaders"),
    ("PongDeterministic-v4", "pong"), ("ALE/UpNDown-v5", "up_n_down"), ("ALE/TicTacToe3D-v5", "tic_tac_toe_3d"),
])
def test_id_forms_map_to_the_game(env_id, game):
    assert fa.check_env(env_id) == game


# ---- the script as a user runs it ----

TINY = ["--num-envs", "1", "--num-steps", "128", "--num-minibatches", "4", "--update-epochs", "2",
        "--fixup-minibatch-size", "64", "--total-timesteps", "256"]  # two policy updates; a near-random game of Breakout ends in ~200 steps
TAGS = {
    "trust_region/kl_max", "trust_region/kl_mean", "fixpo/beta", "fixpo/primary_grad_steps",
    "fixpo/fixup_grad_steps", "fixpo/fixup_passes", "fixpo/fixup_fraction", "fixpo/fixup_fraction_cumulative",
    "fixpo/fixup_fallbacks", "fixpo/fixup_value_shift", "charts/episodic_return", "charts/episodic_length",
    "charts/SPS", "charts/learning_rate", "losses/value_loss", "losses/policy_loss", "losses/entropy",
    "losses/explained_variance",
}


def run(args, cwd, timeout=120):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("train")
    # a tiny eps_kl and a large lr, so that the fixup phase takes steps (and moves V(s) through the shared torso)
    p = run([*TINY, "--seed", "3", "--eps-kl", "0.0003", "--learning-rate", "1e-3", "--save-model",
             "--eval-episodes", "1", "--capture-video"], cwd)
    assert p.returncode == 0, p.stderr
    return cwd, p


def test_smoke_two_updates_logs_every_tag(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cwd, p = trained
    (run_dir,) = glob.glob(str(cwd / "runs" / "*"))
    acc = EventAccumulator(run_dir)
    acc.Reload()
    logged = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert TAGS <= set(logged), TAGS - set(logged)
    assert len(logged["trust_region/kl_max"]) == 2
    assert max(logged["trust_region/kl_max"]) <= 0.0003  # the guarantee, as logged
    assert logged["fixpo/primary_grad_steps"] == [8, 8] and sum(logged["fixpo/fixup_grad_steps"]) >= 1
    assert all((steps > 0) == (shift > 0) for steps, shift in zip(logged["fixpo/fixup_grad_steps"], logged["fixpo/fixup_value_shift"]))
    assert all(r >= 0 and r == int(r) for r in logged["charts/episodic_return"])  # whole-game, unclipped scores
    assert logged["charts/episodic_return"] and len(re.findall(r"^step .*kl_max", p.stdout, re.M)) == 2  # one progress line per update
    videos = glob.glob(str(cwd / "videos" / "*" / "*.mp4"))
    assert videos and all(os.path.getsize(v) > 0 for v in videos)


def test_saved_model_evaluation_reproduces_the_scores(trained):
    cwd, p = trained
    (model,) = glob.glob(str(cwd / "runs" / "*" / "*.fixpo_model"))
    in_training = float(re.search(r"evaluation: mean (\S+)", p.stdout).group(1))
    command = re.search(r"reproduce: python \S+ (.*)\)", p.stdout).group(1).split()
    e = run(command + ["--eval-episodes", "1"], cwd)
    assert e.returncode == 0, e.stderr
    assert float(re.search(r"^mean (\S+)", e.stdout, re.M).group(1)) == in_training
    (ckpt,) = glob.glob(str(cwd / "runs" / "*" / "checkpoint.pt"))  # the run's training state evaluates the same
    e = run([command[0], ckpt, *command[2:], "--eval-episodes", "1"], cwd)
    assert e.returncode == 0, e.stderr
    assert float(re.search(r"^mean (\S+)", e.stdout, re.M).group(1)) == in_training


BAD = {
    "unknown game": (["--env-id", "ALE/Breakot-v5"], "nearest: breakout"),
    "mujoco id": (["--env-id", "Hopper-v4"], "not an Atari game"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line(case, tmp_path):
    args, expected = BAD[case]
    p = run(args, tmp_path)
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], p.stderr
    assert not os.path.exists(tmp_path / "runs")  # nothing written


def test_another_scripts_model_is_one_clear_line(tmp_path):
    path = tmp_path / "gaussian.fixpo_model"  # what fixpo_continuous.py saves: no categorical head
    torch.save({"agent": {"actor_mean.0.weight": torch.zeros(2, 2)}, "args": {"env_id": "Hopper-v4"}}, path)
    p = run(["--eval-checkpoint", str(path)], tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1 and "cannot read a checkpoint" in lines[0], p.stderr


@pytest.mark.parametrize("flags, expected", [
    ({"eps_kl": 0.0}, "--eps-kl"), ({"c_beta": 0.5}, "--c-beta"), ({"num_envs": 3, "num_steps": 5}, "not divisible"),
    ({"total_timesteps": 100}, "less than one batch"),
])
def test_impossible_hyperparameters_are_refused(flags, expected):
    with pytest.raises(fa.UsageError, match=re.escape(expected)):
        fa.check_args(fa.Args(**flags))


def test_import_has_no_side_effects(tmp_path):
    code = ("import os, sys, gymnasium, torch, tyro; sys.path.insert(0, %r); before = dict(os.environ); "
            "ids = set(gymnasium.registry); import fixpo_atari; "
            "assert dict(os.environ) == before and set(gymnasium.registry) == ids; print(sorted(os.listdir('.')))" % ROOT)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


class _FireGame(gym.Env):
    """Stands in for a game that waits for FIRE after a reset (as Breakout does); records the actions it gets."""
    observation_space, action_space = gym.spaces.Discrete(1), gym.spaces.Discrete(4)

    def __init__(self, fire_ends_episode=False):
        self.actions, self.resets, self.fire_ends_episode = [], 0, fire_ends_episode

    def get_action_meanings(self):
        return ["NOOP", "FIRE", "RIGHT", "LEFT"]

    def reset(self, **kwargs):
        self.resets += 1
        return 0, {}

    def step(self, action):
        self.actions.append(action)
        return 0, 0.0, self.fire_ends_episode and self.resets == 1, False, {}


@pytest.mark.parametrize("module", ["fixpo_atari", "fixpo_atari_multigpu"])
def test_video_env_presses_fire_after_reset(module):
    """The rendering env (videos) starts a game as AtariVectorEnv does: FIRE once after each reset."""
    mod = __import__(module)
    game = _FireGame()
    env = mod.FireOnReset(game)
    env.reset(seed=0)
    assert game.actions == [1]
    env.reset()
    assert game.actions == [1, 1]
    ended = _FireGame(fire_ends_episode=True)  # FIRE that ends the episode: reset once more, do not return a done state
    mod.FireOnReset(ended).reset()
    assert ended.actions == [1] and ended.resets == 2


def test_kl_tail_updates_a_checkpoint_both_ways_and_fixpo_stays_inside(trained):
    """benchmark/kl_tail.py: from a run's checkpoint, FixPO's update ends inside eps_kl on the batch; PPO's is measured."""
    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    import kl_tail

    cwd, _ = trained
    (ckpt,) = glob.glob(str(cwd / "runs" / "*" / "checkpoint.pt"))
    rows = kl_tail.main([ckpt, "--batches", "1", "--warmup", "10"])
    (fixpo,), (ppo,) = rows["fixpo"], rows["ppo"]
    assert 0 < fixpo["max"] <= 0.0003  # the trained fixture's eps_kl
    assert fixpo["median"] <= fixpo["q99"] <= fixpo["max"] and 0 < fixpo["top1_share"] <= 1
    assert ppo["max"] > 0 and ppo["fixup_steps"] is None
