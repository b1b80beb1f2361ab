"""ABLATION (log_beta) of fixpo_continuous.py: L_beta = log(beta) * sg(eps_kl - c_beta max KL), Adam on log(beta):
each step scales beta by about e^(+-beta_lr) instead of adding +-beta_lr (multiplicative, as PPO's adaptive KL
coefficient), and beta stays >= beta_min > 0 instead of settling at 0. `diff fixpo_continuous.py ablations/fixpo_log_beta.py` shows it all.

FixPO (Fixup Policy Optimization) for continuous actions: Gymnasium MuJoCo, Gaussian policy.

Zentner, Puri, Huang, Sukhatme (2023), "Guaranteed Trust Region Optimization via Two-Phase KL
Penalization", arXiv 2312.05405. Every policy update ends inside the trust region

    KL(s) = D_KL(pi_old(.|s) || pi(.|s)) <= eps_kl   at EVERY state s of the batch,

using only a KL penalty and a short "fixup" phase:
  1. primary phase: minibatch steps on L_theta = L_pi + vf_coef * L_VF + beta * L_KL, while the
     Lagrange multiplier beta steers max_s KL(s) towards eps_kl / c_beta (inside the region);
  2. fixup phase (`fixup_phase` below): KL-only steps on the minibatches that still violate the
     region, until one whole pass over the batch finds no violation. That exit test is the guarantee.

Run:       python ablations/fixpo_log_beta.py --env-id Hopper-v5
Evaluate:  python ablations/fixpo_log_beta.py --eval-checkpoint runs/<run_name>/fixpo_log_beta.fixpo_model
Docs: docs/fixpo.md (the algorithm as implemented, porting guide)
"""
import hashlib
import os
import random
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import List, Optional, Tuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from gymnasium.wrappers import vector as vw
from torch.distributions import Normal, kl_divergence


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (python, numpy, torch and the environments)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda is used when available"""
    threads: int = 1
    """torch CPU threads; 1 is fastest for networks this small"""
    track: bool = False
    """if toggled, log to Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "fixpo"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    capture_video: bool = False
    """if toggled, record videos of the first env to `videos/{run_name}` (headless: MUJOCO_GL=egl)"""
    save_model: bool = False
    """if toggled, save agent + observation-normalisation statistics to `runs/{run_name}` and evaluate them"""
    eval_checkpoint: Optional[str] = None
    """path of a saved model (--save-model) or of a run's checkpoint.pt: evaluate it and exit, without training"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    eval_deterministic: bool = True
    """evaluate with the mean action (--no-eval-deterministic samples as in training)"""
    checkpoint_every: int = 0
    """also write runs/{run_name}/checkpoint.pt every N updates (0: only at the end and on SIGINT/SIGTERM)"""
    resume: Optional[str] = None
    """path of a checkpoint.pt: continue that run, with its arguments, in its run folder and TensorBoard log"""

    # Algorithm-specific arguments
    env_id: str = "Hopper-v4"
    """the id of the environment (a Gymnasium task with a Box action space)"""
    total_timesteps: int = 1000000
    """total environment steps of the experiment"""
    learning_rate: float = 3e-4
    """gamma_theta: Adam learning rate of the actor and critic"""
    num_envs: int = 8
    """the number of parallel environments"""
    num_steps: int = 256
    """steps per environment per rollout (rollout = num_envs * num_steps; the batch D leaves out its autoreset steps)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly towards 0 (the last update runs at learning_rate / num_iterations)"""
    gamma: float = 0.99
    """the discount factor"""
    gae_lambda: float = 0.95
    """the lambda of generalised advantage estimation"""
    num_minibatches: int = 8
    """minibatches per epoch of the primary phase"""
    update_epochs: int = 10
    """epochs per policy-improvement step (a fixup phase follows each)"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_vloss: bool = True
    """clip the value loss around the rollout's values (as most PPO code does)"""
    vf_clip_coef: float = 0.2
    """range of the value clipping (FixPO never clips the policy ratio)"""
    ent_coef: float = 0.0
    """entropy bonus coefficient (FixPO needs none)"""
    vf_coef: float = 0.1
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """maximum gradient norm of a primary-phase step"""
    init_log_std: float = -1.0
    """initial log-std of the Gaussian policy (state-independent; narrower than the authors' -0.5: docs/results.md)"""

    # FixPO
    eps_kl: float = 0.2
    """eps_kl: trust-region radius, every state ends with KL(s) <= eps_kl (paper: 0.1-0.5)"""
    c_beta: float = 3.0
    """c_beta >= 1: the primary phase aims at max KL ~ eps_kl / c_beta (paper: 3, robust 2-10)"""
    beta_lr: float = 0.01
    """gamma_beta: Adam learning rate of beta (paper: 0.001-0.1; 0 keeps beta constant)"""
    init_beta: float = 1.0
    """initial KL penalty coefficient beta"""
    beta_max: float = 100.0
    """upper bound on beta: the penalty never swamps L_pi (the paper's termination argument also uses it)"""
    beta_min: float = 0.01
    """ABLATION: lower bound on beta (> 0: log(beta) is what Adam steps)"""
    fixup_minibatch_size: int = 512
    """minibatch size of the fixup phase"""
    fixup_max_passes: int = 100
    """fixup passes before the last resort (backtracking toward pi_old)"""
    fixup_fresh_adam: bool = True
    """fixup phase with a fresh Adam; --no-fixup-fresh-adam shares the primary phase's Adam and momentum"""
    trace_updates: Tuple[int, int] = (0, 0)
    """updates [first, last) to trace (paper Fig. 2): batch max KL and beta after every gradient step, tags trace/*"""

    # filled in at runtime
    batch_size: int = 0
    """num_envs * num_steps, the steps per rollout (computed in runtime)"""
    num_iterations: int = 0
    """the number of policy-improvement steps (computed in runtime)"""


class UsageError(Exception):
    """Bad input: reported as one line, no traceback."""


def check_args(args: Args) -> None:
    rules = [
        (args.eps_kl > 0, f"--eps-kl must be > 0 (got {args.eps_kl})"),
        (args.c_beta >= 1, f"--c-beta must be >= 1 (got {args.c_beta}); below 1 the primary phase aims outside the region"),
        (args.beta_lr >= 0, f"--beta-lr must be >= 0 (got {args.beta_lr})"),
        (0 < args.beta_min <= args.init_beta, f"need 0 < --beta-min <= --init-beta (got {args.beta_min})"),  # ABLATION
        (0 <= args.init_beta <= args.beta_max, f"need 0 <= --init-beta <= --beta-max (got {args.init_beta}, {args.beta_max})"),
        (args.learning_rate > 0, f"--learning-rate must be > 0 (got {args.learning_rate})"),
        (args.num_envs >= 1 and args.num_steps >= 1, "--num-envs and --num-steps must be >= 1"),
        (args.num_minibatches >= 1 and args.update_epochs >= 1, "--num-minibatches and --update-epochs must be >= 1"),
        (args.num_envs * args.num_steps % args.num_minibatches == 0,
         f"batch {args.num_envs}x{args.num_steps}={args.num_envs * args.num_steps} is not divisible by --num-minibatches {args.num_minibatches}"),
        (args.total_timesteps >= args.num_envs * args.num_steps,
         f"--total-timesteps {args.total_timesteps} is less than one batch ({args.num_envs * args.num_steps} steps)"),
        (0 < args.gamma <= 1 and 0 <= args.gae_lambda <= 1, "need 0 < --gamma <= 1 and 0 <= --gae-lambda <= 1"),
        (args.fixup_minibatch_size >= 1 and args.fixup_max_passes >= 1, "--fixup-minibatch-size and --fixup-max-passes must be >= 1"),
        (args.max_grad_norm > 0 and args.vf_coef >= 0 and args.ent_coef >= 0, "need --max-grad-norm > 0, --vf-coef >= 0, --ent-coef >= 0"),
        (args.threads >= 1 and args.eval_episodes >= 1, "--threads and --eval-episodes must be >= 1"),
        (args.checkpoint_every >= 0, f"--checkpoint-every must be >= 0 (got {args.checkpoint_every})"),
    ]
    for ok, message in rules:
        if not ok:
            raise UsageError(message)


def check_env(env_id: str) -> None:
    """Refuse unknown ids and discrete-action envs before anything is written."""
    try:
        env = gym.make(env_id)
    except gym.error.Error as e:
        raise UsageError(f"unknown env id {env_id!r} ({e}); try e.g. Hopper-v4, HalfCheetah-v5, Walker2d-v5") from None
    except ImportError as e:
        raise UsageError(f"{env_id!r} needs a missing package: {e}") from None
    obs_space, space = env.observation_space, env.action_space
    env.close()
    if not isinstance(space, gym.spaces.Box):
        raise UsageError(f"{env_id!r} has a {type(space).__name__} action space; fixpo_continuous.py needs Box (continuous) actions")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise UsageError(f"{env_id!r} has {obs_space} observations; fixpo_continuous.py needs flat Box observations")


def make_env(env_id, idx, capture_video, run_name):
    def thunk():
        # no passive env checker: it only warns, and slows every step
        if capture_video and idx == 0:
            env = gym.make(env_id, render_mode="rgb_array", disable_env_checker=True)
            return gym.wrappers.RecordVideo(env, f"videos/{run_name}")
        return gym.make(env_id, disable_env_checker=True)

    return thunk


def make_envs(env_id, num_envs, gamma, capture_video=False, run_name=""):
    # NEXT_STEP autoreset (gymnasium's default): the step after a done is a fake "autoreset" transition.
    envs = gym.vector.SyncVectorEnv([make_env(env_id, i, capture_video, run_name) for i in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    envs = vw.RecordEpisodeStatistics(envs)  # innermost: returns are the true, unnormalised ones
    envs = vw.ClipAction(envs)
    envs = vw.NormalizeObservation(envs)  # one statistic shared by all envs: saved with the model
    envs = vw.TransformObservation(envs, lambda o: np.clip(o, -10, 10))
    envs = vw.NormalizeReward(envs, gamma=gamma)
    envs = vw.TransformReward(envs, lambda r: np.clip(r, -10, 10))
    return envs


def find_wrapper(envs, cls):
    # vector wrappers do not forward attributes, so walk the chain
    while not isinstance(envs, cls):
        envs = envs.env
    return envs


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Separate 64-64 tanh actor and critic; Gaussian policy with a state-independent log-std."""

    def __init__(self, obs_dim: int, act_dim: int, init_log_std: float = -1.0):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        self.actor_mean = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, act_dim), std=0.01),
        )
        self.actor_logstd = nn.Parameter(torch.full((1, act_dim), init_log_std))

    def get_value(self, x):
        return self.critic(x).squeeze(-1)

    def dist_params(self, x):
        """The action distribution's parameters, one row per state: [mean, log_std]."""
        mean = self.actor_mean(x)
        return torch.cat([mean, self.actor_logstd.expand_as(mean)], dim=-1)

    def actor_parameters(self) -> List[nn.Parameter]:
        """theta of the policy: what the fixup phase moves (the critic is separate)."""
        return list(self.actor_mean.parameters()) + [self.actor_logstd]


def make_dist(params):
    mean, log_std = params.chunk(2, dim=-1)
    return Normal(mean, log_std.exp(), validate_args=False)  # skip per-call argument checks: hot path


def kl_per_state(old_params, new_params):
    """KL(pi_old(.|s) || pi(.|s)) at every state: old first (TRPO's direction), analytic, summed over action dims."""
    return kl_divergence(make_dist(old_params), make_dist(new_params)).sum(-1)


def batch_kl(agent, obs, old_params, chunk=8192):
    """KL(s) at every state of the batch, without gradients: the measure the guarantee is stated in."""
    with torch.no_grad():
        return torch.cat([kl_per_state(old_params[i:i + chunk], agent.dist_params(obs[i:i + chunk]))
                          for i in range(0, len(obs), chunk)])


def compute_gae(rewards, values, next_value, terminations, dones, valids, gamma, gae_lambda):
    """Generalised advantage estimation over a (T, N) rollout under NEXT_STEP autoreset.

    At a done step t, obs[t+1] is the real final observation, so V(obs[t+1]) bootstraps a
    truncation (only `terminations` cut the bootstrap); `dones` stop the recursion at the episode's end.
    Step t+1 is then the autoreset transition (final obs -> reset obs, action ignored): `valids` = 0
    gives it zero advantage, and the training loop leaves it out of the batch.
    """
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(next_value)
    for t in reversed(range(num_steps)):
        nextvalues = next_value if t == num_steps - 1 else values[t + 1]
        delta = rewards[t] + gamma * nextvalues * (1.0 - terminations[t]) - values[t]
        lastgaelam = (delta + gamma * gae_lambda * (1.0 - dones[t]) * lastgaelam) * valids[t]
        advantages[t] = lastgaelam
    return advantages, advantages + values


def policy_loss(new_logprob, old_logprob, advantages):
    """L_pi = -mean(ratio * A): importance sampled and NOT clipped; the KL penalty does the limiting."""
    return -((new_logprob - old_logprob).exp() * advantages).mean()


def value_loss(new_value, old_value, returns, clip_coef=None):
    """L_VF: squared error to the GAE returns, optionally clipped around the rollout's values."""
    loss = (new_value - returns) ** 2
    if clip_coef is not None:
        clipped = old_value + torch.clamp(new_value - old_value, -clip_coef, clip_coef)
        loss = torch.max(loss, (clipped - returns) ** 2)
    return 0.5 * loss.mean()


def beta_loss(beta, kl_max, eps_kl, c_beta):
    """L_beta = sum_k beta_k * sg(eps_kl - c_beta * max_{s of group k} KL(s)): raises beta_k while c_beta * max KL
    > eps_kl on group k's states. kl_max is NaN for a group absent from the minibatch: no gradient for its beta_k.
    With one group (a shared beta) this is the single-task L_beta = beta * sg(eps_kl - c_beta * max_s KL(s))."""
    present = ~kl_max.isnan()
    return (beta[present] * (eps_kl - c_beta * kl_max[present].detach())).sum()


class Beta:
    """KL penalty coefficients beta_k >= 0, one per group of states (one group: a shared beta; per task: beta_k):
    Lagrange multipliers with their own Adam, clamped to [0, beta_max]."""

    def __init__(self, init_beta, beta_lr, eps_kl, c_beta, beta_max, device="cpu", num_groups=1, beta_min=0.01):
        self.value = torch.full((num_groups,), float(init_beta), device=device, requires_grad=True)
        self.log_value = self.value.detach().clamp(min=beta_min).log().requires_grad_()  # ABLATION: Adam steps log(beta)
        self.optimizer = torch.optim.Adam([self.log_value], lr=beta_lr, fused=True)
        self.eps_kl, self.c_beta, self.beta_max, self.beta_min = eps_kl, c_beta, beta_max, beta_min

    def step(self, kl, group=None):
        """One step on L_beta; kl: KL(s) at a minibatch's states, group: each state's beta index (None: all 0)."""
        group = torch.zeros(len(kl), dtype=torch.long, device=kl.device) if group is None else group
        kl_max = torch.full_like(self.value, float("nan")).scatter_reduce(0, group, kl.detach(), "amax", include_self=False)
        absent = kl_max.isnan()  # a group with no state here: Adam's momentum alone would still move its beta_k
        kept = [t.detach().clone() for t in self.moments()] if absent.any() else []
        self.log_value.data.copy_(self.value.detach().clamp(min=self.beta_min).log())  # ABLATION: beta may be resumed
        self.optimizer.zero_grad()
        beta_loss(self.log_value, kl_max, self.eps_kl, self.c_beta).backward()  # ABLATION: L_beta on log(beta)
        self.optimizer.step()
        with torch.no_grad():
            self.value.copy_(self.log_value.exp())  # ABLATION: beta from the log(beta) Adam just stepped
            for t, old in zip(self.moments(), kept):  # so an absent group keeps its beta_k and its Adam moments
                t[absent] = old[absent]
            self.value.clamp_(self.beta_min, self.beta_max)  # ABLATION: >= beta_min > 0, not >= 0

    def moments(self):
        """beta and its Adam moments (those that exist yet): the per-group state of the multipliers."""
        state = self.optimizer.state[self.log_value]  # ABLATION
        return [self.value] + [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]

    def __float__(self):
        return self.value.mean().item()  # several groups: their mean


@dataclass
class FixupResult:
    grad_steps: int  # KL-only gradient steps taken
    passes: int  # passes over the batch that found a violation
    fallback: bool  # the last resort ran
    kl_max: float  # max_s KL(s) over the whole batch on exit: <= eps_kl
    kl_mean: float  # mean_s KL(s) over the whole batch on exit


def fixup_phase(agent, obs, old_params, theta_old, beta, eps_kl, minibatch_size, lr, max_passes, *, optimizer=None,
                state_group=None, on_step=None):
    """Enforce KL(s) <= eps_kl at every state of the batch; the heart of FixPO.

    Repeat: measure KL(s) on the whole batch with the current theta. If every state is within eps_kl,
    return: that check IS the guarantee (it is a full pass that changes nothing). Otherwise pass over
    the minibatches and take one step on L_KL (no policy-gradient term) on each that violates.
    Termination, bounded: a fresh Adam by default (independent of the primary phase's state; pass
    `optimizer` to share the primary phase's, as the authors do), its rate halved when a pass lowers neither
    L_KL (the whole batch's mean KL) nor the excess sum_s max(KL(s) - eps_kl, 0) below the previous pass's
    (either test alone fails an instance in tests/data/), and after `max_passes` the last resort `backtrack_toward_old`, which always
    succeeds because KL = 0 at theta_old.
    `state_group`: each state's beta index (multi-task beta_k; None: one shared beta); the exit test still covers
    every state. `on_step`: called with 1 after every KL step (to trace it).
    """
    if optimizer is None:
        optimizer = torch.optim.Adam(agent.actor_parameters(), lr=lr, fused=True)
    steps, passes, prev_mean, prev_excess, scale = 0, 0, float("inf"), float("inf"), 1.0
    while True:
        kl = batch_kl(agent, obs, old_params)
        kl_max, kl_mean, excess = kl.max().item(), kl.mean().item(), (kl - eps_kl).clamp(min=0).sum().item()
        if kl_max <= eps_kl or passes == max_passes:  # NaN never passes the first test
            break
        # no progress since the previous pass (neither lower): smaller steps. Against the previous pass, not the best
        # so far: after one overshoot, steady progress would never beat the best and the rate would collapse
        if not (kl_mean < prev_mean or excess < prev_excess):
            scale *= 0.5
        prev_mean, prev_excess = kl_mean, excess
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        for idx in torch.randperm(len(obs), device=obs.device).split(minibatch_size):
            kl = kl_per_state(old_params[idx], agent.dist_params(obs[idx]))
            if not kl.max() <= eps_kl:
                # L_KL alone, as in the paper's Algorithm 1 (no policy-gradient term, and no beta factor:
                # beta is often clamped at 0 here, which would zero the step; Adam ignores its scale anyway)
                optimizer.zero_grad()
                kl.mean().backward()
                optimizer.step()
                beta.step(kl, None if state_group is None else state_group[idx])
                steps += 1
                if on_step is not None:
                    on_step(1)
        passes += 1
    for group in optimizer.param_groups:
        group["lr"] = lr  # a shared optimizer leaves with the primary phase's rate
    if kl_max <= eps_kl:
        return FixupResult(steps, passes, False, kl_max, kl_mean)
    kl_max = backtrack_toward_old(agent, obs, old_params, theta_old, eps_kl)
    return FixupResult(steps, passes, True, kl_max, batch_kl(agent, obs, old_params).mean().item())


def backtrack_toward_old(agent, obs, old_params, theta_old, eps_kl, max_halvings=20):
    """Last resort, always correct: theta <- theta_old + alpha (theta - theta_old), alpha = 1/2, 1/4, ...
    until every state is within eps_kl; alpha = 0 restores theta_old itself, where KL(s) = 0 exactly.
    theta is agent.actor_parameters(): every parameter the action distribution, hence the KL, depends on."""
    actor = agent.actor_parameters()
    theta = [p.detach().clone() for p in actor]
    for k in range(1, max_halvings + 2):
        alpha = 0.5 ** k if k <= max_halvings else 0.0
        with torch.no_grad():
            for p, new, old in zip(actor, theta, theta_old):
                p.copy_(old + alpha * (new - old) if alpha > 0 else old)
        kl_max = batch_kl(agent, obs, old_params).max().item()
        if kl_max <= eps_kl:
            return kl_max
    raise AssertionError("unreachable: KL at theta_old is 0")


def report_fallback(iteration, fix):
    """One line on stderr when the fixup phase needed its last resort (fixpo/fixup_fallbacks counts them)."""
    print(f"warning: update {iteration}: the fixup phase stopped after {fix.passes} passes and backtracked toward "
          f"pi_old (kl_max now {fix.kl_max:.4f})", file=sys.stderr)


def save_checkpoint(path, agent, envs, args, global_step):
    obs_rms = find_wrapper(envs, vw.NormalizeObservation).obs_rms
    checkpoint = {
        "agent": agent.state_dict(),
        "obs_rms": {k: torch.as_tensor(getattr(obs_rms, k)) for k in ("mean", "var", "count")},
        "args": vars(args),
        "global_step": global_step,
    }
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash never leaves a half-written model


# numpy arrays and scalars (RNG states, counters) inside a training state (checkpoint.pt): data types only
NUMPY_TYPES = [np._core.multiarray._reconstruct, np._core.multiarray.scalar, np.ndarray, np.dtype,
               *{type(np.dtype(c)) for c in np.typecodes["All"]}]


def load_model(path):
    """A saved model (--save-model) or a training state (checkpoint.pt, which every run leaves) as one dict: the
    agent's weights, the run's args and any normalisation statistics. weights_only: loading runs no stored code."""
    with torch.serialization.safe_globals(NUMPY_TYPES):
        model = torch.load(path, map_location="cpu")  # on the CPU: load_state_dict moves the weights to the agent
    if model.get("format") == "fixpo-training-state-1":
        model = {"agent": model["agent"], "args": model["args"], **model["normalization"]}
    return model


def evaluate(checkpoint_path, eval_episodes, seed, deterministic=True, capture_video=False, device="cpu"):
    """Play `eval_episodes` episodes of a saved model with its frozen observation statistics; returns the returns."""
    try:
        checkpoint = load_model(checkpoint_path)
        env_id = checkpoint["args"]["env_id"]
    except Exception as e:
        raise UsageError(f"cannot read a checkpoint at {checkpoint_path!r} ({type(e).__name__})") from None
    run_name = f"{os.path.basename(checkpoint_path)}-eval-{int(time.time())}"
    envs = make_envs(env_id, 1, checkpoint["args"]["gamma"], capture_video, run_name)
    norm = find_wrapper(envs, vw.NormalizeObservation)
    norm.update_running_mean = False
    for k, v in checkpoint["obs_rms"].items():
        setattr(norm.obs_rms, k, v.numpy())
    agent = Agent(envs.single_observation_space.shape[0], envs.single_action_space.shape[0]).to(device)
    agent.load_state_dict(checkpoint["agent"])
    torch.manual_seed(seed)
    obs, _ = envs.reset(seed=seed)
    returns = []
    while len(returns) < eval_episodes:
        with torch.no_grad():
            params = agent.dist_params(torch.as_tensor(obs, dtype=torch.float32, device=device))
            action = make_dist(params).mean if deterministic else make_dist(params).sample()
        obs, _, _, _, infos = envs.step(action.cpu().numpy())
        if "episode" in infos and infos["_episode"][0]:
            returns.append(float(infos["episode"]["r"][0]))
    envs.close()
    return returns


class NonFinite(Exception):
    """An observation, reward, loss or parameter became NaN or inf: the run stops before training on it."""


def check_finite(what, value, global_step):
    finite = np.isfinite(value).all() if isinstance(value, np.ndarray) else torch.isfinite(value).all()
    if not finite:
        raise NonFinite(f"non-finite {what} at step {global_step}")


RESUMABLE = ["checkpoint_every", "threads", "cuda", "track", "resume"]  # the only flags a resume may change


def save_training_state(path, *, run_name, args, global_step, iteration, agent, optimizer, beta, normalization,
                        counters):
    """Everything a continuation needs (the same layout in every script), written atomically: a crash mid-write
    keeps the previous file. The environments are not saved: a resumed run starts new episodes."""
    state = {
        "format": "fixpo-training-state-1", "script": os.path.basename(__file__), "run_name": run_name,
        "args": vars(args), "global_step": global_step, "iteration": iteration,  # iteration: updates completed
        "agent": agent.state_dict(), "optimizer": optimizer.state_dict(),
        "beta": None if beta is None else {"value": beta.value.detach().clone(), "optimizer": beta.optimizer.state_dict()},
        "normalization": normalization, "counters": counters,
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def typed_fields(argv):
    """The Args fields named on a command line (--eps-kl 0.2, --eps-kl=0.2, --no-anneal-lr), defaults included."""
    names = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    return names | {n[3:] for n in names if n.startswith("no_")}


def load_training_state(path, cli_args, typed=()):
    """The saved state, and the run's saved arguments; a flag given now that would change the run (anything but
    RESUMABLE; typed: the fields named on the command line, so that one set back to its default counts too) is
    refused rather than ignored."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        script = state["script"] if state["format"] == "fixpo-training-state-1" else None
    except Exception as e:
        raise UsageError(f"cannot read a training state at {path!r} ({type(e).__name__})") from None
    if script != os.path.basename(__file__):
        raise UsageError(f"{path!r} was written by {script}, not {os.path.basename(__file__)}")
    saved, defaults = state["args"], vars(Args())
    changed = [k for k, v in vars(cli_args).items()
               if k not in RESUMABLE and (k in typed or v != defaults[k]) and v != saved[k]]
    if changed:
        raise UsageError("--resume continues a run with its saved arguments; drop "
                         + ", ".join("--" + k.replace("_", "-") for k in changed))
    return state, Args(**{**saved, **{k: getattr(cli_args, k) for k in RESUMABLE}})


def restore_rng(rng):
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


class StopSignals:
    """SIGINT/SIGTERM set a flag that the loop reads after each update, to checkpoint and exit cleanly; a second
    signal stops at once, as does the first once `training_over` (the model saved, only its evaluation left)."""

    def __init__(self):
        self.signum, self.training_over = None, False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None or self.training_over:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after this update (again to stop now)", flush=True)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.capture_video:
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede the first gym.make
    torch.set_num_threads(args.threads)
    try:
        check_args(args)
        if args.eval_checkpoint is not None:
            rets = evaluate(args.eval_checkpoint, args.eval_episodes, args.seed, args.eval_deterministic, args.capture_video)
            print("episodic returns:", " ".join(f"{r:.2f}" for r in rets))
            print(f"mean {np.mean(rets):.2f} +- {np.std(rets):.2f} over {len(rets)} episodes")
            sys.exit(0)
        if args.track:
            try:
                import wandb
            except ImportError:
                raise UsageError("--track needs wandb: pip install wandb") from None
        state, run_name = None, f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        if args.resume is not None:
            state, args = load_training_state(args.resume, args, typed_fields(sys.argv[1:]))
            run_name = state["run_name"]
        run_dir = os.path.dirname(os.path.abspath(args.resume)) if state else f"runs/{run_name}"
        if state is None and os.path.exists(run_dir):
            raise UsageError(f"{run_dir} exists already; not overwriting it")
        check_env(args.env_id)
    except UsageError as e:
        sys.exit(f"error: {e}")

    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // args.batch_size
    if args.track:
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, monitor_gym=True, save_code=True,
                   id=hashlib.sha1(run_name.encode()).hexdigest()[:16], resume="allow")  # --resume: the same wandb run
    from torch.utils.tensorboard import SummaryWriter

    # a resumed run appends to its log; whatever a killed run logged after its checkpoint is dropped
    writer = SummaryWriter(run_dir, purge_step=None if state is None else state["global_step"] + 1)
    if state is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    envs = make_envs(args.env_id, args.num_envs, args.gamma, args.capture_video, run_name)
    envs.action_space.seed(args.seed)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    agent = Agent(obs_dim, act_dim, args.init_log_std).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)  # fused: one kernel for all parameters
    beta = Beta(args.init_beta, args.beta_lr, args.eps_kl, args.c_beta, args.beta_max, device, beta_min=args.beta_min)  # ABLATION

    T, N = args.num_steps, args.num_envs  # rollout storage is (num_steps, num_envs, ...)
    obs, actions = torch.zeros((T, N, obs_dim), device=device), torch.zeros((T, N, act_dim), device=device)
    old_params = torch.zeros((T, N, 2 * act_dim), device=device)  # pi_old's mean and log-std at every state
    logprobs, rewards, values, terms, dones, valids = (torch.zeros((T, N), device=device) for _ in range(6))

    global_step, total_primary, total_fixup, fallbacks, first_iteration = 0, 0, 0, 0, 1
    recent_returns = deque(maxlen=20)
    obs_norm, rew_norm = find_wrapper(envs, vw.NormalizeObservation), find_wrapper(envs, vw.NormalizeReward)
    checkpoint_path, stop = os.path.join(run_dir, "checkpoint.pt"), StopSignals()

    def checkpoint(iteration):
        rms = lambda r: {k: torch.as_tensor(np.asarray(getattr(r, k))) for k in ("mean", "var", "count")}
        save_training_state(checkpoint_path, run_name=run_name, args=args, global_step=global_step,
                            iteration=iteration, agent=agent, optimizer=optimizer, beta=beta,
                            normalization={"obs_rms": rms(obs_norm.obs_rms), "return_rms": rms(rew_norm.return_rms)},
                            counters={"primary": total_primary, "fixup": total_fixup, "fallbacks": fallbacks,
                                      "traced": trace_steps[0], "recent_returns": list(recent_returns)})

    if state is not None:
        agent.load_state_dict(state["agent"])
        optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            beta.value.copy_(state["beta"]["value"])
        beta.optimizer.load_state_dict(state["beta"]["optimizer"])
        for rms, saved in ((obs_norm.obs_rms, state["normalization"]["obs_rms"]),
                           (rew_norm.return_rms, state["normalization"]["return_rms"])):
            rms.mean, rms.var, rms.count = (saved[k].numpy().astype(np.float64) for k in ("mean", "var", "count"))
        c = state["counters"]
        total_primary, total_fixup, fallbacks = c["primary"], c["fixup"], c["fallbacks"]
        recent_returns.extend(c["recent_returns"])
        global_step, first_iteration = state["global_step"], state["iteration"] + 1
        restore_rng(state["rng"])
        print(f"resuming {run_name} at step {global_step}, " + (f"update {first_iteration} of {args.num_iterations}"
              if first_iteration <= args.num_iterations else "every update done: finishing (model, evaluation)"))

    def on_non_finite(kind, error, tb):  # sys.excepthook: a NonFinite anywhere ends the run with one line
        if not issubclass(kind, NonFinite):
            return sys.__excepthook__(kind, error, tb)
        writer.close()
        kept = f"the last good checkpoint {checkpoint_path} is kept" if os.path.exists(checkpoint_path) else \
            "no checkpoint was written (--checkpoint-every N writes them)"
        print(f"error: {error}; stopped without training on it; {kept}", file=sys.stderr)

    sys.excepthook = on_non_finite
    start_time, start_step = time.time(), global_step
    next_obs = torch.as_tensor(envs.reset(seed=args.seed + global_step)[0], dtype=torch.float32, device=device)
    next_valid = torch.ones(N, device=device)
    trace_steps = [0 if state is None else state["counters"]["traced"]]  # gradient steps traced so far

    def trace(fixup):  # --trace-updates (paper Fig. 2): the whole batch's max KL and beta after a gradient step
        if args.trace_updates[0] <= iteration < args.trace_updates[1]:
            for tag, value in [("kl_max", batch_kl(agent, b_obs, b_old_params).max().item()), ("beta", float(beta)),
                               ("fixup", fixup), ("epoch", (iteration - 1) * args.update_epochs + epoch)]:
                writer.add_scalar(f"trace/{tag}", value, trace_steps[0])
            trace_steps[0] += 1

    for iteration in range(first_iteration, args.num_iterations + 1):
        lr_now = args.learning_rate * (1.0 - (iteration - 1.0) / args.num_iterations) if args.anneal_lr else args.learning_rate
        optimizer.param_groups[0]["lr"] = lr_now

        # ---- rollout with pi_old ----
        for step in range(T):
            global_step += N
            obs[step], valids[step] = next_obs, next_valid
            with torch.no_grad():
                params = agent.dist_params(next_obs)
                dist = make_dist(params)
                action = dist.sample()
                logprobs[step] = dist.log_prob(action).sum(-1)
                values[step] = agent.get_value(next_obs)
            actions[step], old_params[step] = action, params
            next_obs, reward, term, trunc, infos = envs.step(action.cpu().numpy())
            check_finite("observation", next_obs, global_step)  # stop before a NaN reaches the batch
            check_finite("reward", reward, global_step)
            done = np.logical_or(term, trunc)
            rewards[step] = torch.as_tensor(reward, dtype=torch.float32, device=device)
            terms[step] = torch.as_tensor(term, dtype=torch.float32, device=device)
            dones[step] = torch.as_tensor(done, dtype=torch.float32, device=device)
            next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
            next_valid = torch.as_tensor(~done, dtype=torch.float32, device=device)  # 0 where done: the next step is an autoreset, left out of D
            if "episode" in infos:
                for i in np.flatnonzero(infos["_episode"]):
                    recent_returns.append(float(infos["episode"]["r"][i]))
                    writer.add_scalar("charts/episodic_return", infos["episode"]["r"][i], global_step)
                    writer.add_scalar("charts/episodic_length", infos["episode"]["l"][i], global_step)

        with torch.no_grad():
            advantages, returns = compute_gae(rewards, values, agent.get_value(next_obs), terms, dones, valids,
                                              args.gamma, args.gae_lambda)

        # the batch D: every real transition (autoreset steps left out)
        keep = valids.reshape(-1).bool()
        b_obs, b_actions = obs.reshape(-1, obs_dim)[keep], actions.reshape(-1, act_dim)[keep]
        b_old_params = old_params.reshape(-1, 2 * act_dim)[keep]
        b_logprobs, b_advantages = logprobs.reshape(-1)[keep], advantages.reshape(-1)[keep]
        b_returns, b_values = returns.reshape(-1)[keep], values.reshape(-1)[keep]
        theta_old = [p.detach().clone() for p in agent.actor_parameters()]  # for the last resort
        primary_steps = fixup_steps = fixup_passes = 0

        for epoch in range(args.update_epochs):
            # ---- primary phase: L_theta = L_pi + vf_coef L_VF + beta L_KL, then one step on L_beta ----
            for mb in torch.randperm(len(b_obs), device=device).tensor_split(args.num_minibatches):
                params = agent.dist_params(b_obs[mb])
                dist = make_dist(params)
                newlogprob = dist.log_prob(b_actions[mb]).sum(-1)
                mb_adv = b_advantages[mb]
                if args.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                kl = kl_per_state(b_old_params[mb], params)
                pg_loss = policy_loss(newlogprob, b_logprobs[mb], mb_adv)
                v_loss = value_loss(agent.get_value(b_obs[mb]), b_values[mb], b_returns[mb],
                                    args.vf_clip_coef if args.clip_vloss else None)
                entropy = dist.entropy().sum(-1).mean()
                loss = pg_loss + args.vf_coef * v_loss + beta.value.detach() * kl.mean() - args.ent_coef * entropy
                check_finite("loss", loss, global_step)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                beta.step(kl)
                primary_steps += 1
                trace(0)

            # ---- fixup phase: afterwards KL(s) <= eps_kl at every state of the batch ----
            fix = fixup_phase(agent, b_obs, b_old_params, theta_old, beta, args.eps_kl, args.fixup_minibatch_size,
                              lr_now, args.fixup_max_passes, optimizer=None if args.fixup_fresh_adam else optimizer,
                              on_step=trace)
            fixup_steps += fix.grad_steps
            fixup_passes += fix.passes
            fallbacks += fix.fallback
            if fix.fallback:
                report_fallback(iteration, fix)

        # ---- logging: the guarantee, measured over the whole batch ----
        kl = batch_kl(agent, b_obs, b_old_params)
        total_primary, total_fixup = total_primary + primary_steps, total_fixup + fixup_steps
        elapsed = time.time() - start_time
        sps = int((global_step - start_step) / elapsed)
        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        for tag, value in {
            "trust_region/kl_max": kl.max().item(),  # <= eps_kl: the guarantee, over every state of the batch
            "trust_region/kl_mean": kl.mean().item(),
            "fixpo/beta": float(beta),
            "fixpo/primary_grad_steps": primary_steps,
            "fixpo/fixup_grad_steps": fixup_steps,
            "fixpo/fixup_passes": fixup_passes,
            "fixpo/fixup_fraction": fixup_steps / (primary_steps + fixup_steps),
            "fixpo/fixup_fraction_cumulative": total_fixup / (total_primary + total_fixup),
            "fixpo/fixup_fallbacks": fallbacks,  # cumulative; should stay 0
            "charts/learning_rate": lr_now,
            "charts/action_std": agent.actor_logstd.exp().mean().item(),
            "charts/SPS": sps,
            "losses/value_loss": v_loss.item(),
            "losses/policy_loss": pg_loss.item(),
            "losses/entropy": entropy.item(),
            "losses/explained_variance": np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y,
        }.items():
            writer.add_scalar(tag, value, global_step)
        ret = f"{np.mean(recent_returns):8.1f}" if recent_returns else "     n/a"
        eta = int(elapsed * (args.num_iterations - iteration) / (iteration - first_iteration + 1))  # seconds left at the average speed so far
        print(f"step {global_step:8d}/{args.total_timesteps} ({global_step / args.total_timesteps:4.0%})  "
              f"eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}  sps {sps:5d}  return {ret}  kl_max {kl.max().item():.3f}/{args.eps_kl}  "
              f"beta {float(beta):6.3f}  fixup {fixup_steps:3d}/{primary_steps + fixup_steps}  fallbacks {fallbacks}")
        if stop.signum is not None or iteration == args.num_iterations or (
                args.checkpoint_every and iteration % args.checkpoint_every == 0):
            check_finite("parameter", torch.cat([p.detach().flatten() for p in agent.parameters()]), global_step)
            checkpoint(iteration)  # only ever after a complete update with finite parameters
        if stop.signum is not None:
            print(f"checkpoint written; continue with: python {sys.argv[0]} --resume {checkpoint_path}", flush=True)
            envs.close()  # finishes a --capture-video clip
            writer.close()
            sys.exit(128 + stop.signum)

    if args.save_model:
        model_path = os.path.join(run_dir, f"{args.exp_name}.fixpo_model")
        save_checkpoint(model_path, agent, envs, args, global_step)
        stop.training_over = True  # a signal now ends the evaluation at once, rather than after it
        print(f"model saved to {model_path}")
        eval_returns = evaluate(model_path, args.eval_episodes, args.seed, args.eval_deterministic, False, device)
        for i, r in enumerate(eval_returns):
            writer.add_scalar("eval/episodic_return", r, i)
        print(f"evaluation: mean {np.mean(eval_returns):.2f} over {len(eval_returns)} episodes "
              f"(reproduce: python {sys.argv[0]} --eval-checkpoint {model_path} --seed {args.seed})")

    envs.close()
    writer.close()
