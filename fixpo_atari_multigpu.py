"""FixPO (Fixup Policy Optimization) for Atari on many processes and machines: torch.distributed, launched by torchrun.

Zentner, Puri, Huang, Sukhatme (2023), "Guaranteed Trust Region Optimization via Two-Phase KL
Penalization", arXiv 2312.05405. Every policy update ends inside the trust region

    KL(s) = D_KL(pi_old(.|s) || pi(.|s)) <= eps_kl   at EVERY state s of the GLOBAL batch (all ranks' states),

using only a KL penalty and a short "fixup" phase:
  1. primary phase: minibatch steps on L_theta = L_pi + vf_coef * L_VF + beta * L_KL, while the
     Lagrange multiplier beta steers max_s KL(s) towards eps_kl / c_beta (inside the region);
  2. fixup phase (`fixup_phase` below): KL-only steps on the minibatches that still violate the
     region, until one whole pass over the batch finds no violation. That exit test is the guarantee.

Distribution (the diff against fixpo_atari.py): each rank steps num_envs / world_size envs (distinct seeds) and
keeps its own share of the batch; gradients are averaged by hand over one flat buffer, weighted by each rank's
count of states (no DDP: the fixup phase moves only the actor and takes a data-dependent number of steps).
Lockstep rule: every branch that decides whether a collective happens is decided on a value that came out of
a collective, so all ranks take the same branches and the same number of steps. Minibatch j is the union of
every rank's j-th chunk. Rank 0 alone logs and saves; each update checks that all ranks hold the same parameters.
--checkpoint-every / --resume / SIGINT-SIGTERM / non-finite stops as in fixpo_atari.py: rank 0 writes the checkpoint
(with every rank's RNG states), every rank loads it (same world size only), and a signal or a non-finite value seen
by any one rank stops all ranks after the same update or at the same check.

Run (one machine, 2 processes; gloo on CPU, nccl on GPUs, one GPU per process):
    torchrun --standalone --nproc_per_node 2 fixpo_atari_multigpu.py --env-id BreakoutNoFrameskip-v4
Run (2 machines x 4 GPUs; the same command on each, K = 0 on the machine at address HOST, 1 on the other):
    torchrun --nnodes 2 --node-rank K --nproc_per_node 4 --master-addr HOST --master-port 29500 \
        fixpo_atari_multigpu.py --env-id BreakoutNoFrameskip-v4 --num-envs 64
  (or elastic: --rdzv-backend c10d --rdzv-endpoint HOST:29400; the workers then meet at the hostname of one
  machine, which must resolve from every other, else add --local-addr with each machine's own address)
  --num-envs is the global number of envs (divisible by the world size); rank r steps envs r*n .. r*n+n-1 of them.
  Ranks must run the same code, versions and hardware kind: the per-update parameter check is exact.
  A rank that stops answering ends the run after --dist-timeout seconds instead of hanging.
Plain `python fixpo_atari_multigpu.py ...` runs a world of one process.
Evaluate:  python fixpo_atari_multigpu.py --eval-checkpoint runs/<run_name>/fixpo_atari_multigpu.fixpo_model
Docs: docs/fixpo.md (the algorithm as implemented, porting guide)
"""
import copy
import difflib
import hashlib
import math
import os
import random
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as tdist  # not `dist`: in the loop, `dist` is the action distribution
import torch.nn as nn
import tyro
from torch.distributions import Categorical


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (python, numpy, torch and the environments)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda is used when available (one GPU per process, GPU LOCAL_RANK, nccl)"""
    dist_timeout: float = 300.0
    """seconds a collective may wait for the other ranks before the run ends with an error"""
    threads: int = 1
    """torch CPU threads (AtariVectorEnv steps the games on threads of its own)"""
    track: bool = False
    """if toggled, log to Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "fixpo"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    capture_video: bool = False
    """if toggled, record a game of the final policy to `videos/{run_name}` (in a separate rendering env)"""
    save_model: bool = False
    """if toggled, save the agent to `runs/{run_name}` and evaluate it"""
    eval_checkpoint: Optional[str] = None
    """path of a saved model (--save-model) or of a run's checkpoint.pt: evaluate it and exit, without training"""
    eval_episodes: int = 10
    """whole games per evaluation"""
    eval_deterministic: bool = False
    """evaluate with the most likely action (off by default: an argmax policy can stall, e.g. never launch the ball)"""
    checkpoint_every: int = 0
    """also write runs/{run_name}/checkpoint.pt every N updates (0: only at the end and on SIGINT/SIGTERM)"""
    resume: Optional[str] = None
    """path of a checkpoint.pt: continue that run, with its arguments, in its run folder and TensorBoard log"""

    # Algorithm-specific arguments
    env_id: str = "BreakoutNoFrameskip-v4"
    """the Atari game (BreakoutNoFrameskip-v4, ALE/Breakout-v5, Breakout-v5, breakout: ale-py's breakout, always with
    the NoFrameskip-v4 protocol of CleanRL's PPO: no sticky actions, up to 30 no-ops; not v5's sticky actions)"""
    total_timesteps: int = 10000000
    """total environment steps of the experiment (agent steps; x4 frames)"""
    learning_rate: float = 2.5e-4
    """gamma_theta: Adam learning rate of the network"""
    num_envs: int = 8
    """the number of parallel environments, over all ranks (each rank steps num_envs / world_size)"""
    num_steps: int = 128
    """steps per environment per rollout (global batch = num_envs * num_steps)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly towards 0 (the last update runs at learning_rate / num_iterations)"""
    gamma: float = 0.99
    """the discount factor"""
    gae_lambda: float = 0.95
    """the lambda of generalised advantage estimation"""
    num_minibatches: int = 4
    """minibatches per epoch of the primary phase (minibatch j: every rank's j-th chunk)"""
    update_epochs: int = 4
    """epochs per policy-improvement step (a fixup phase follows each)"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_vloss: bool = True
    """clip the value loss around the rollout's values (as most PPO code does)"""
    vf_clip_coef: float = 0.1
    """range of the value clipping (FixPO never clips the policy ratio)"""
    ent_coef: float = 0.01
    """entropy bonus coefficient (CleanRL's Atari value)"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """maximum gradient norm of a primary-phase step"""

    # FixPO
    eps_kl: float = 0.02
    """eps_kl: trust-region radius, every state ends with KL(s) <= eps_kl (MuJoCo: 0.2; why 0.02 on Atari:
    docs/fixpo.md)"""
    c_beta: float = 3.0
    """c_beta >= 1: the primary phase aims at max KL ~ eps_kl / c_beta (paper: 3, robust 2-10)"""
    beta_lr: float = 0.01
    """gamma_beta: Adam learning rate of beta (paper: 0.001-0.1; 0 keeps beta constant)"""
    init_beta: float = 1.0
    """initial KL penalty coefficient beta"""
    beta_max: float = 100.0
    """upper bound on beta: the penalty never swamps L_pi (the paper's termination argument also uses it)"""
    fixup_minibatch_size: int = 256
    """minibatch size of the fixup phase, over all ranks"""
    fixup_max_passes: int = 100
    """fixup passes before the last resort (backtracking toward pi_old)"""
    fixup_fresh_adam: bool = True
    """fixup phase with a fresh Adam; --no-fixup-fresh-adam shares the primary phase's Adam and momentum"""

    # filled in at runtime
    batch_size: int = 0
    """num_envs * num_steps, the steps per rollout (computed in runtime)"""
    minibatch_size: int = 0
    """the minibatch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of policy-improvement steps (computed in runtime)"""
    world_size: int = 0
    """the number of processes (computed in runtime)"""
    local_num_envs: int = 0
    """the number of environments of this process (computed in runtime)"""


class UsageError(Exception):
    """Bad input: reported as one line, no traceback."""


def check_args(args: Args, world_size: int = 1) -> None:
    rules = [
        (args.num_envs % world_size == 0,
         f"--num-envs {args.num_envs} is not divisible by the world size {world_size} (each rank steps its share)"),
        (args.dist_timeout > 0, f"--dist-timeout must be > 0 (got {args.dist_timeout})"),
        (args.eps_kl > 0, f"--eps-kl must be > 0 (got {args.eps_kl})"),
        (args.c_beta >= 1, f"--c-beta must be >= 1 (got {args.c_beta}); below 1 the primary phase aims outside the region"),
        (args.beta_lr >= 0, f"--beta-lr must be >= 0 (got {args.beta_lr})"),
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


def check_env(env_id: str) -> str:
    """ale-py's game for BreakoutNoFrameskip-v4, ALE/Breakout-v5, Breakout-v5, breakout; refuses anything else."""
    from ale_py.roms import get_all_rom_ids

    roms = {rom.replace("_", ""): rom for rom in get_all_rom_ids()}  # MsPacman -> mspacman -> ms_pacman
    base = env_id.removeprefix("ALE/").split("-v")[0].removesuffix("NoFrameskip").removesuffix("Deterministic")
    if base.replace("_", "").lower() in roms:
        return roms[base.replace("_", "").lower()]
    if env_id in gym.registry:
        raise UsageError(f"{env_id!r} is not an Atari game; try BreakoutNoFrameskip-v4 (MuJoCo tasks: fixpo_continuous.py)")
    near = [roms[k] for k in difflib.get_close_matches(base.replace("_", "").lower(), roms, n=3, cutoff=0.5)]
    raise UsageError(f"ale-py has no Atari game {base!r} (from {env_id!r}); nearest: {', '.join(near) or 'none'}")


def make_env(env_id, idx, capture_video, run_name):
    def thunk():  # for video only (AtariVectorEnv cannot render): make_envs' preprocessing in gymnasium's wrappers
        from ale_py.env import AtariEnv

        env = AtariEnv(game=check_env(env_id), frameskip=1, repeat_action_probability=0.0,
                       max_num_frames_per_episode=108000, render_mode="rgb_array" if capture_video else None)
        if capture_video and idx == 0:  # the first game only
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}", episode_trigger=lambda e: e == 0, disable_logger=True)
        env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84, terminal_on_life_loss=False)
        return gym.wrappers.FrameStackObservation(FireOnReset(env), 4)

    return thunk


class FireOnReset(gym.Wrapper):
    """Press FIRE once after each reset, as AtariVectorEnv does: games such as Breakout wait for it."""

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        meanings = self.env.unwrapped.get_action_meanings()
        if "FIRE" in meanings:
            obs, _, terminated, truncated, info = self.env.step(meanings.index("FIRE"))
            if terminated or truncated:
                obs, info = self.env.reset(**kwargs)
        return obs, info


def make_envs(env_id, num_envs):
    from ale_py.vector_env import AtariVectorEnv

    # C++ (a thread per core); defaults: 84x84 gray, 4-frame stack, max-pooled frame skip 4, fire reset, NEXT_STEP autoreset.
    # life_loss_info: a life loss is terminated=True (cuts bootstrapping) but the game goes on and the next step is real;
    # only after a game over is it a fake autoreset step. Raw rewards, for GameScores; the learner clips them.
    return AtariVectorEnv(game=check_env(env_id), num_envs=num_envs, noop_max=30,
                          repeat_action_probability=0.0, episodic_life=False, life_loss_info=True, reward_clipping=False)


class GameScores:
    """True game scores (all lives, unclipped) from an env where a life loss ends an episode but not the game."""

    def __init__(self, n):
        self.returns, self.lengths, self.autoreset_next = np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)

    def update(self, reward, term, trunc, lives):
        """Call after every step; returns the games that ended: [(env index, score, agent steps)]."""
        fake = self.autoreset_next  # this step is the autoreset step after a game over (reward 0, reset obs): no game's
        self.returns, self.lengths = np.where(fake, 0.0, self.returns + reward), np.where(fake, 0, self.lengths + 1)
        self.autoreset_next = (term & (lives == 0)) | trunc  # term with lives left is a life loss: the game goes on
        return [(i, float(self.returns[i]), int(self.lengths[i])) for i in np.flatnonzero(self.autoreset_next)]


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Nature-CNN torso shared by a categorical actor head and a value head (as CleanRL's PPO)."""

    def __init__(self, num_actions: int):
        super().__init__()
        self.network = nn.Sequential(  # Nature CNN: (4, 84, 84) -> 512 features
            layer_init(nn.Conv2d(4, 32, 8, stride=4)), nn.ReLU(), layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(), nn.Flatten(), layer_init(nn.Linear(3136, 512)), nn.ReLU(),
        )
        self.actor = layer_init(nn.Linear(512, num_actions), std=0.01)
        self.critic = layer_init(nn.Linear(512, 1), std=1.0)
        self.to(memory_format=torch.channels_last)  # conv weights NHWC: CPU (oneDNN) convolutions run faster so

    def features(self, x):  # uint8 frames in storage, floats only in here; NHWC like the weights
        return self.network(x.contiguous(memory_format=torch.channels_last) / 255.0)

    def get_value(self, x):
        return self.critic(self.features(x)).squeeze(-1)

    def dist_params(self, x):
        """The action distribution's parameters, one row per state: the logits."""
        return self.actor(self.features(x))

    def dist_params_and_value(self, x):  # both heads from one pass through the torso, which is most of the cost
        hidden = self.features(x)
        return self.actor(hidden), self.critic(hidden).squeeze(-1)

    def actor_parameters(self) -> List[nn.Parameter]:
        """theta of the policy, what the fixup phase moves: the torso too (the KL depends on it), so V(s) moves with it."""
        return list(self.network.parameters()) + list(self.actor.parameters())


def make_dist(params):
    return Categorical(logits=params, validate_args=False)  # skip per-call argument checks: hot path


def kl_per_state(old_params, new_params):
    """KL(pi_old(.|s) || pi(.|s)) at every state: old first (TRPO's direction), analytic, from logits. Not kl_divergence:
    it gives inf (then NaN gradients) where a float32 probability of pi underflows to 0; log_softmax stays finite."""
    old_logp, new_logp = torch.log_softmax(old_params, -1), torch.log_softmax(new_params, -1)
    return (old_logp.exp() * (old_logp - new_logp)).sum(-1)


def batch_kl(agent, obs, old_params, chunk=256):  # CNN passes of 256 states: faster on CPU than larger chunks
    """KL(s) at every state of the batch, without gradients: the measure the guarantee is stated in."""
    with torch.no_grad():
        return torch.cat([kl_per_state(old_params[i:i + chunk], agent.dist_params(obs[i:i + chunk]))
                          for i in range(0, len(obs), chunk)] or [old_params.new_zeros(0)])  # a rank may hold none


# ---- collectives: each decision that gates a collective is taken on a value that came out of a collective ----

COMM = {"seconds": 0.0, "calls": 0}  # wall-clock in collectives (waiting for slower ranks included): dist/ tags


def world_size():
    return tdist.get_world_size() if tdist.is_initialized() else 1


def _timed(collective, tensor):
    if world_size() > 1:  # a world of one (plain `python`, or tests of one process) needs no communication
        start = time.perf_counter()
        collective()
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)  # nccl returns once queued: time the transfer itself
        COMM["seconds"] += time.perf_counter() - start
        COMM["calls"] += 1


def all_reduce(tensor, op=tdist.ReduceOp.SUM):
    """In place over every rank; returns the tensor (the same values on every rank)."""
    _timed(lambda: tdist.all_reduce(tensor, op), tensor)
    return tensor


def all_gather(vec):
    """(world_size, len(vec)): every rank's vec in rank order, the same on every rank, so that a reduction of it
    in Python gives bit-identical results everywhere (unlike a max-reduce, which may drop a NaN)."""
    rows = [torch.empty_like(vec) for _ in range(world_size())] if world_size() > 1 else [vec]
    _timed(lambda: tdist.all_gather(rows, vec), vec)
    return torch.stack(rows)


def global_kl_stats(kl, eps_kl):
    """max_s KL(s), mean KL, excess sum_s max(KL(s) - eps_kl, 0) and the count of states over EVERY rank's states:
    one collective of (max, sum, excess, count, non-finite flag). A NaN or inf on any rank: max is NaN everywhere."""
    local = torch.stack([kl.max() if len(kl) else kl.new_tensor(-math.inf), kl.sum(), (kl - eps_kl).clamp(min=0).sum(),
                         kl.new_tensor(len(kl)), (~torch.isfinite(kl)).any().to(kl.dtype)]).double()
    rows = all_gather(local).cpu()
    count = rows[:, 3].sum().item()
    kl_max = math.nan if rows[:, 4].any() else rows[:, 0].max().item()
    return kl_max, rows[:, 1].sum().item() / max(count, 1.0), rows[:, 2].sum().item(), int(count)


def global_group_max(kl, group, num_groups):
    """max_s KL(s) per beta group over every rank's states of a minibatch, one max-reduce. Returns the global max
    (NaN counted as +inf: whether the minibatch violates), and, for Beta.step, each group's max with its group index
    (NaN where no rank holds the group or a KL is NaN: Beta.step skips it, as it skips a NaN KL in one process)."""
    group = torch.zeros(len(kl), dtype=torch.long, device=kl.device) if group is None else group
    top = torch.full((num_groups,), -math.inf, device=kl.device)
    top = all_reduce(top.scatter_reduce(0, group, kl.detach().nan_to_num(nan=math.inf), "amax"), tdist.ReduceOp.MAX)
    return top.max().item(), top.masked_fill(top.isinf(), math.nan), torch.arange(num_groups, device=kl.device)


def average_gradients(params, count):
    """p.grad <- (sum over ranks of p.grad) / (sum over ranks of count): the exact global-mean gradient when each
    rank's p.grad is the gradient of a SUM over its `count` states. One all-reduce of a flat buffer, count last."""
    params = list(params)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                     + [torch.tensor([float(count)], device=params[0].device)])
    all_reduce(flat)
    flat = flat[:-1] / flat[-1]
    offset = 0
    for p in params:
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def minibatch_moments(values, minibatches):
    """Mean and standard deviation (unbiased, as torch.std) of `values` over each GLOBAL minibatch (every rank's
    chunk j), from one all-reduce of (count, sum, sum of squares) per minibatch, in float64."""
    sums = all_reduce(torch.stack([torch.stack([values.new_tensor(len(mb)), values[mb].sum(), (values[mb] ** 2).sum()])
                                   for mb in minibatches]).double())
    n, mean = sums[:, 0], sums[:, 1] / sums[:, 0]
    std = ((sums[:, 2] - n * mean ** 2) / (n - 1)).clamp(min=0).sqrt()
    return list(zip(mean.float(), std.float()))


def gather_objects(obj):
    """[rank 0's obj, rank 1's obj, ...] on every rank (pickled: for small, per-update data such as finished games)."""
    rows = [None] * world_size() if world_size() > 1 else [obj]
    _timed(lambda: tdist.all_gather_object(rows, obj), torch.zeros(0))
    return rows


def broadcast_from_rank0(agent, beta):
    """Start every rank from rank 0's parameters and beta."""
    for tensor in [*agent.state_dict().values(), beta.value.data]:
        _timed(lambda: tdist.broadcast(tensor, 0), tensor)


class OutOfSync(RuntimeError):
    pass


def check_in_sync(agent, beta, iteration):
    """All ranks hold identical parameters and beta: two float64 checksums (plain and position-weighted) all-gathered."""
    flat = torch.cat([p.detach().reshape(-1) for p in agent.parameters()] + [beta.value.detach().reshape(-1)]).double()
    weights = torch.arange(1, len(flat) + 1, device=flat.device, dtype=torch.float64).remainder_(1009.0).add_(1.0)
    rows = all_gather(torch.stack([flat.sum(), (flat * weights).sum()])).cpu()
    if not (rows == rows[0]).all():
        raise OutOfSync(f"update {iteration}: ranks hold different parameters (checksums per rank: {rows.tolist()})")


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

    def __init__(self, init_beta, beta_lr, eps_kl, c_beta, beta_max, device="cpu", num_groups=1):
        self.value = torch.full((num_groups,), float(init_beta), device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.value], lr=beta_lr, fused=True)
        self.eps_kl, self.c_beta, self.beta_max = eps_kl, c_beta, beta_max

    def step(self, kl, group=None):
        """One step on L_beta; kl: KL(s) at a minibatch's states, group: each state's beta index (None: all 0)."""
        group = torch.zeros(len(kl), dtype=torch.long, device=kl.device) if group is None else group
        kl_max = torch.full_like(self.value, float("nan")).scatter_reduce(0, group, kl.detach(), "amax", include_self=False)
        absent = kl_max.isnan()  # a group with no state here: Adam's momentum alone would still move its beta_k
        kept = [t.detach().clone() for t in self.moments()] if absent.any() else []
        self.optimizer.zero_grad()
        beta_loss(self.value, kl_max, self.eps_kl, self.c_beta).backward()
        self.optimizer.step()
        with torch.no_grad():
            for t, old in zip(self.moments(), kept):  # so an absent group keeps its beta_k and its Adam moments
                t[absent] = old[absent]
            self.value.clamp_(0.0, self.beta_max)  # >= 0: a multiplier; <= beta_max: the penalty never swamps L_pi

    def moments(self):
        """beta and its Adam moments (those that exist yet): the per-group state of the multipliers."""
        state = self.optimizer.state[self.value]
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
    """Enforce KL(s) <= eps_kl at every state of the GLOBAL batch (every rank's `obs`); the heart of FixPO.

    Repeat: measure KL(s) on the whole batch with the current theta. If every state is within eps_kl,
    return: that check IS the guarantee (it is a full pass that changes nothing). Otherwise pass over
    the minibatches and take one step on L_KL (no policy-gradient term) on each that violates.
    Termination, bounded: a fresh Adam by default (independent of the primary phase's state; pass
    `optimizer` to share the primary phase's, as the authors do), its rate halved when a pass lowers neither
    L_KL (the whole batch's mean KL) nor the excess sum_s max(KL(s) - eps_kl, 0) below the previous pass's
    (either test alone fails an instance in tests/data/), and after `max_passes` the last resort
    `backtrack_toward_old`, which always succeeds because KL = 0 at theta_old.
    `state_group`: each state's beta index (multi-task beta_k; None: one shared beta); the exit test still covers
    every state. `on_step`: called with 1 after every KL step (to trace it).
    Distributed, in lockstep: every test below reads a value all ranks got from the same collective (max, mean,
    excess and the non-finite flag of the pass; minibatch j's max), so all ranks step, pass and exit together.
    """
    if optimizer is None:
        optimizer = torch.optim.Adam(agent.actor_parameters(), lr=lr, fused=True)
    steps, passes, prev_mean, prev_excess, scale = 0, 0, float("inf"), float("inf"), 1.0
    while True:
        kl = batch_kl(agent, obs, old_params)
        kl_max, kl_mean, excess, count = global_kl_stats(kl, eps_kl)  # over all ranks: the one collective of a pass
        if kl_max <= eps_kl or passes == max_passes:  # NaN (on any rank) never passes the first test
            break
        # no progress since the previous pass (neither lower): smaller steps. Against the previous pass, not the best
        # so far: after one overshoot, steady progress would never beat the best and the rate would collapse
        if not (kl_mean < prev_mean or excess < prev_excess):
            scale *= 0.5
        prev_mean, prev_excess = kl_mean, excess
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        # minibatch j = every rank's chunk j; the number of chunks comes from the global count, so it is the same on all
        for idx in torch.randperm(len(obs), device=obs.device).tensor_split(max(1, math.ceil(count / minibatch_size))):
            kl = kl_per_state(old_params[idx], agent.dist_params(obs[idx]))
            mb_max, mb_group_max, groups = global_group_max(kl, None if state_group is None else state_group[idx],
                                                            beta.value.numel())
            if not mb_max <= eps_kl:  # decided on the all-reduced max: every rank steps, or none
                # L_KL alone, as in the paper's Algorithm 1 (no policy-gradient term, and no beta factor:
                # beta is often clamped at 0 here, which would zero the step; Adam ignores its scale anyway)
                optimizer.zero_grad()
                kl.sum().backward()  # this rank's sum; averaged over all ranks' states of minibatch j below
                average_gradients(agent.actor_parameters(), len(idx))
                optimizer.step()
                beta.step(mb_group_max, groups)
                steps += 1
                if on_step is not None:
                    on_step(1)
        passes += 1
    for group in optimizer.param_groups:
        group["lr"] = lr  # a shared optimizer leaves with the primary phase's rate
    if kl_max <= eps_kl:
        return FixupResult(steps, passes, False, kl_max, kl_mean)
    kl_max = backtrack_toward_old(agent, obs, old_params, theta_old, eps_kl)
    return FixupResult(steps, passes, True, kl_max, global_kl_stats(batch_kl(agent, obs, old_params), eps_kl)[1])


def backtrack_toward_old(agent, obs, old_params, theta_old, eps_kl, max_halvings=20):
    """Last resort, always correct: theta <- theta_old + alpha (theta - theta_old), alpha = 1/2, 1/4, ...
    until every state is within eps_kl; alpha = 0 restores theta_old itself, where KL(s) = 0 exactly.
    theta is agent.actor_parameters(): every parameter the action distribution, hence the KL, depends on.
    Distributed: each alpha is tested on the all-reduced max over every rank's states, so all ranks stop together."""
    actor = agent.actor_parameters()
    theta = [p.detach().clone() for p in actor]
    for k in range(1, max_halvings + 2):
        alpha = 0.5 ** k if k <= max_halvings else 0.0
        with torch.no_grad():
            for p, new, old in zip(actor, theta, theta_old):
                p.copy_(old + alpha * (new - old) if alpha > 0 else old)
        kl_max = global_kl_stats(batch_kl(agent, obs, old_params), eps_kl)[0]
        if kl_max <= eps_kl:
            return kl_max
    raise AssertionError("unreachable: KL at theta_old is 0")


def report_fallback(iteration, fix):
    """One line on stderr when the fixup phase needed its last resort (fixpo/fixup_fallbacks counts them)."""
    print(f"warning: update {iteration}: the fixup phase stopped after {fix.passes} passes and backtracked toward "
          f"pi_old (kl_max now {fix.kl_max:.4f})", file=sys.stderr)


def save_checkpoint(path, agent, envs, args, global_step):
    checkpoint = {"agent": agent.state_dict(), "args": vars(args), "global_step": global_step}  # frames need no statistics
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash never leaves a half-written model


def play_games(envs, agent, num_games, seed, deterministic=False, device="cpu"):
    """Play whole games in a vector env of one; returns their scores (all lives, unclipped), in order."""
    obs, _ = envs.reset(seed=seed)
    scores, returns = GameScores(1), []
    while len(returns) < num_games:
        with torch.no_grad():
            params = agent.dist_params(torch.as_tensor(obs, device=device))
        action = params.argmax(-1) if deterministic else make_dist(params).sample()
        obs, reward, term, trunc, infos = envs.step(action.cpu().numpy())
        returns += [score for _, score, _ in scores.update(reward, term, trunc, infos["lives"])]
    envs.close()
    return returns


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


def evaluate(checkpoint_path, eval_episodes, seed, deterministic=False, capture_video=False, device="cpu"):
    """Play `eval_episodes` whole games of a saved model with the training preprocessing; returns the raw scores."""
    checkpoint = load_model(checkpoint_path)
    env_id = checkpoint["args"]["env_id"]
    agent = Agent(len(checkpoint["agent"]["actor.bias"])).to(device)
    agent.load_state_dict(checkpoint["agent"])
    torch.manual_seed(seed)
    returns = play_games(make_envs(env_id, 1), agent, eval_episodes, seed, deterministic, device)
    if capture_video:  # one more game, in a rendering env
        play_games(gym.vector.SyncVectorEnv([make_env(env_id, 0, True, f"eval-{int(time.time())}")]), agent, 1, seed, deterministic, device)
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
    # torchrun sets RANK, LOCAL_RANK, WORLD_SIZE (and the rendezvous); plain `python` is a world of one
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    try:
        check_args(args, world)  # the same verdict on every rank: all exit, before any collective
        if args.eval_checkpoint is not None:
            try:
                load_model(args.eval_checkpoint)["agent"]["actor.bias"]  # a categorical head: this script's model
            except Exception as e:
                raise UsageError(f"cannot read a checkpoint at {args.eval_checkpoint!r} ({type(e).__name__})") from None
            torch.set_num_threads(args.threads)
            rets = evaluate(args.eval_checkpoint, args.eval_episodes, args.seed, args.eval_deterministic, args.capture_video)
            print("episodic returns:", " ".join(f"{r:.2f}" for r in rets))
            print(f"mean {np.mean(rets):.2f} +- {np.std(rets):.2f} over {len(rets)} episodes")
            sys.exit(0)
        if args.track:
            try:
                import wandb
            except ImportError:
                raise UsageError("--track needs wandb: pip install wandb") from None
        state, run_name = None, f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        if args.resume is not None:  # every rank reads the same file
            state, args = load_training_state(args.resume, args, typed_fields(sys.argv[1:]))
            run_name = state["run_name"]
            if state["args"]["world_size"] != world:  # each rank's envs and RNG states belong to its rank
                raise UsageError(f"{args.resume!r} was written by {state['args']['world_size']} processes; resume it "
                                 f"with as many (now {world})")
        args.world_size = world
        run_dir = os.path.dirname(os.path.abspath(args.resume)) if state else f"runs/{run_name}"
        if state is None and rank == 0 and os.path.exists(run_dir):  # rank 0 alone writes runs/
            raise UsageError(f"{run_dir} exists already; not overwriting it")
        check_env(args.env_id)
    except UsageError as e:
        sys.exit(f"error: {e}" if rank == 0 else 1)  # one line, from rank 0

    use_cuda = torch.cuda.is_available() and args.cuda
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")  # one GPU per process
    if use_cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=args.dist_timeout))

    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.num_iterations = args.total_timesteps // args.batch_size
    args.local_num_envs = args.num_envs // args.world_size
    if args.track and rank == 0:
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, monitor_gym=True, save_code=True,
                   id=hashlib.sha1(run_name.encode()).hexdigest()[:16], resume="allow")  # --resume: the same wandb run
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run appends to its log; whatever a killed run logged after its checkpoint is dropped
        writer = SummaryWriter(run_dir, purge_step=None if state is None else state["global_step"] + 1)
    if rank == 0 and state is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # each rank samples its own actions; the parameters come from rank 0
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.threads)

    envs = make_envs(args.env_id, args.local_num_envs)
    obs_shape, num_actions = envs.single_observation_space.shape, envs.single_action_space.n
    agent = Agent(num_actions).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)  # fused: one kernel for all parameters
    beta = Beta(args.init_beta, args.beta_lr, args.eps_kl, args.c_beta, args.beta_max, device)
    broadcast_from_rank0(agent, beta)

    # rollout storage of this rank, (num_steps, local_num_envs, ...)
    T, N = args.num_steps, args.local_num_envs
    # frames as uint8 (4x less memory), laid out channels-last (T, N, H, W, C) as the CNN wants them: no conversions
    obs = torch.zeros((T, N) + obs_shape[1:] + obs_shape[:1], dtype=torch.uint8, device=device).permute(0, 1, 4, 2, 3)
    actions = torch.zeros((T, N), dtype=torch.long, device=device)
    old_params = torch.zeros((T, N, num_actions), device=device)  # pi_old's logits at every state
    logprobs, rewards, values, terms, dones, valids = (torch.zeros((T, N), device=device) for _ in range(6))

    global_step, total_primary, total_fixup, fallbacks, first_iteration = 0, 0, 0, 0, 1
    recent_returns = deque(maxlen=20)
    scores = GameScores(N)
    checkpoint_path, stop = os.path.join(run_dir, "checkpoint.pt"), StopSignals()

    def checkpoint(iteration):  # a collective (every rank's RNG states to rank 0), then rank 0 alone writes
        rng_per_rank = gather_objects({"python": random.getstate(), "numpy": np.random.get_state(),
                                       "torch": torch.get_rng_state(),
                                       "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})
        if rank == 0:  # "rng" holds rank 0's states, as in every script; counters["rng_per_rank"] every rank's
            save_training_state(checkpoint_path, run_name=run_name, args=args, global_step=global_step,
                                iteration=iteration, agent=agent, optimizer=optimizer, beta=beta,
                                normalization={},
                                counters={"primary": total_primary, "fixup": total_fixup, "fallbacks": fallbacks,
                                          "traced": 0, "recent_returns": list(recent_returns),
                                          "rng_per_rank": rng_per_rank})
        all_reduce(torch.zeros(1, device=device))  # every rank returns once the file is written: a rank may exit next

    if state is not None:  # every rank loads the same parameters, optimizer and beta: the ranks start in sync
        agent.load_state_dict(state["agent"])
        optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            beta.value.copy_(state["beta"]["value"])
        beta.optimizer.load_state_dict(state["beta"]["optimizer"])
        c = state["counters"]
        total_primary, total_fixup, fallbacks = c["primary"], c["fixup"], c["fallbacks"]
        recent_returns.extend(c["recent_returns"])
        global_step, first_iteration = state["global_step"], state["iteration"] + 1
        restore_rng(c["rng_per_rank"][rank])  # this rank's own states
        if rank == 0:
            print(f"resuming {run_name} at step {global_step}, " + (f"update {first_iteration} of {args.num_iterations}"
                  if first_iteration <= args.num_iterations else "every update done: finishing (model, evaluation)"))

    def on_non_finite(kind, error, tb):  # sys.excepthook: a NonFinite anywhere ends the run with one line
        if not issubclass(kind, NonFinite):
            return sys.__excepthook__(kind, error, tb)
        if rank != 0:  # every rank raised it at the same check (lockstep); rank 0 says why
            return
        writer.close()
        kept = f"the last good checkpoint {checkpoint_path} is kept" if os.path.exists(checkpoint_path) else \
            "no checkpoint was written (--checkpoint-every N writes them)"
        print(f"error: {error}; stopped without training on it; {kept}", file=sys.stderr)

    sys.excepthook = on_non_finite

    def leave(code):  # a finished rank ends here: rank 0 after saving and evaluating, the others at once
        if tdist.is_initialized():
            tdist.destroy_process_group()
        envs.close()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)  # as multiprocessing's workers do: skip interpreter teardown, where a C++ thread (gloo's, the
        # ALE's) destroyed out of order can abort the finished rank with SIGABRT
    start_time, start_step = time.time(), global_step
    next_obs, _ = envs.reset(seed=args.seed + global_step + rank * N)  # rank r's envs: seeds + rN, ..., + rN + N - 1
    next_obs = torch.as_tensor(next_obs, device=device)
    next_valid = torch.ones(N, device=device)

    for iteration in range(first_iteration, args.num_iterations + 1):
        lr_now = args.learning_rate * (1.0 - (iteration - 1.0) / args.num_iterations) if args.anneal_lr else args.learning_rate
        optimizer.param_groups[0]["lr"] = lr_now

        # ---- rollout with pi_old ----
        games, bad_reward_step = [], math.inf  # (global_step, score, length) of this rank's finished games
        for step in range(T):
            global_step += N * args.world_size  # every rank steps its N envs at once
            obs[step], valids[step] = next_obs, next_valid
            with torch.no_grad():
                params, values[step] = agent.dist_params_and_value(next_obs)
                dist = make_dist(params)
                action = dist.sample()
                logprobs[step] = dist.log_prob(action)
            actions[step], old_params[step] = action, params
            next_obs, reward, term, trunc, infos = envs.step(action.cpu().numpy())
            if bad_reward_step == math.inf and not np.isfinite(reward).all():  # frames are uint8: never NaN
                bad_reward_step = global_step  # told to every rank after the rollout
            done = np.logical_or(term, trunc)  # a life loss is done: it cuts bootstrapping (DQN's convention)
            rewards[step] = torch.as_tensor(np.sign(reward), dtype=torch.float32, device=device)  # learn from clipped rewards
            terms[step] = torch.as_tensor(term, dtype=torch.float32, device=device)
            dones[step] = torch.as_tensor(done, dtype=torch.float32, device=device)
            next_obs = torch.as_tensor(next_obs, device=device)
            games += [(global_step, score, length) for i, score, length in scores.update(reward, term, trunc, infos["lives"])]
            next_valid = torch.as_tensor(~scores.autoreset_next, dtype=torch.float32, device=device)  # 0 only after a game over (a lost life keeps the game going)
        # any rank's non-finite reward stops every rank here, before training on it: one collective per update, not per step
        first_bad = all_gather(torch.tensor([bad_reward_step], dtype=torch.float64, device=device)).min().item()
        if first_bad < math.inf:
            raise NonFinite(f"non-finite reward at step {int(first_bad)}")

        with torch.no_grad():
            advantages, returns = compute_gae(rewards, values, agent.get_value(next_obs), terms, dones, valids,
                                              args.gamma, args.gae_lambda)

        # this rank's share of the batch D: every real transition (autoreset steps left out)
        keep = valids.reshape(-1).bool()
        b_obs, b_actions = obs.reshape((-1,) + obs_shape)[keep], actions.reshape(-1)[keep]
        b_old_params = old_params.reshape(-1, num_actions)[keep]
        b_logprobs, b_advantages = logprobs.reshape(-1)[keep], advantages.reshape(-1)[keep]
        b_returns, b_values = returns.reshape(-1)[keep], values.reshape(-1)[keep]
        theta_old = [p.detach().clone() for p in agent.actor_parameters()]  # for the last resort
        primary_steps = fixup_steps = fixup_passes = value_shift = 0

        for epoch in range(args.update_epochs):
            # ---- primary phase: L_theta = L_pi + vf_coef L_VF + beta L_KL, then one step on L_beta ----
            # minibatch j = every rank's chunk j; ranks may hold different numbers of states (autoreset steps dropped)
            minibatches = torch.randperm(len(b_obs), device=device).tensor_split(args.num_minibatches)
            for mb, (adv_mean, adv_std) in zip(minibatches, minibatch_moments(b_advantages, minibatches)):
                params, newvalue = agent.dist_params_and_value(b_obs[mb])
                dist = make_dist(params)
                newlogprob = dist.log_prob(b_actions[mb])
                mb_adv = b_advantages[mb]
                if args.norm_adv:  # over the global minibatch, as one process would
                    mb_adv = (mb_adv - adv_mean) / (adv_std + 1e-8)
                kl = kl_per_state(b_old_params[mb], params)
                pg_loss = policy_loss(newlogprob, b_logprobs[mb], mb_adv)
                v_loss = value_loss(newvalue, b_values[mb], b_returns[mb],
                                    args.vf_clip_coef if args.clip_vloss else None)
                entropy = dist.entropy().mean()
                loss = pg_loss + args.vf_coef * v_loss + beta.value.detach() * kl.mean() - args.ent_coef * entropy
                optimizer.zero_grad()
                if len(mb):  # an empty chunk (a rank with few states) adds nothing but takes part in the collectives
                    (loss * len(mb)).backward()  # this rank's sum; average_gradients makes it the global mean
                    next(agent.parameters()).grad.add_(loss.detach() * 0)  # NaN if this rank's loss is not finite
                average_gradients(agent.parameters(), len(mb))
                grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)  # global gradient: same on all
                # a non-finite loss on any rank makes the all-reduced gradient, hence its norm, non-finite on every rank:
                # all ranks stop at this check together, with no collective of its own
                check_finite("loss", grad_norm, global_step)
                optimizer.step()
                beta.step(*global_group_max(kl, None, beta.value.numel())[1:])  # on the all-reduced max KL
                primary_steps += 1
            last_mb = torch.cat([torch.stack([v_loss, pg_loss, entropy]).detach().nan_to_num() * len(mb),
                                 v_loss.new_tensor([len(mb)])])  # to log the global minibatch's losses

            # ---- fixup phase: afterwards KL(s) <= eps_kl at every state of the batch ----
            agent_before = copy.deepcopy(agent)  # to measure how far the fixup phase moves V(s) via the shared torso
            fix = fixup_phase(agent, b_obs, b_old_params, theta_old, beta, args.eps_kl, args.fixup_minibatch_size,
                              lr_now, args.fixup_max_passes, optimizer=None if args.fixup_fresh_adam else optimizer)
            fixup_steps += fix.grad_steps
            fixup_passes += fix.passes
            fallbacks += fix.fallback
            if fix.grad_steps or fix.fallback:  # the same on every rank (lockstep): the all-reduce below happens on all
                with torch.no_grad():
                    probe = b_obs[::(len(b_obs) + 255) // 256]  # <= 256 states per rank: whole-batch passes cost 15%
                    shift = (agent.get_value(probe) - agent_before.get_value(probe)).abs()
                    shift = all_reduce(torch.stack([shift.sum(), shift.new_tensor(len(shift))]).double())
                    value_shift += (shift[0] / shift[1]).item()
            if fix.fallback and rank == 0:
                report_fallback(iteration, fix)

        check_in_sync(agent, beta, iteration)  # fails loudly, on every rank, if any rank's parameters differ

        # ---- logging: the guarantee, over the whole (global) batch, as the last fixup phase's exit test measured it at
        # the parameters this update ends with (no second pass needed) ----
        kl_max, kl_mean = fix.kl_max, fix.kl_mean
        rows = gather_objects((games, stop.signum))  # every rank's games and stop signal: no collective of its own
        games = sorted(g for rank_games, _ in rows for g in rank_games)
        # torchrun forwards a signal to every rank, but they may see it in different updates: all stop after the update
        # in which any rank saw one, deciding on the gathered value (lockstep)
        signum = max((s for _, s in rows if s is not None), default=None)
        saving = signum is not None or iteration == args.num_iterations or (
            args.checkpoint_every and iteration % args.checkpoint_every == 0)
        residual = b_returns - b_values
        sums = all_reduce(torch.cat([last_mb.double(), torch.stack([  # the last minibatch's losses, explained variance
            b_returns.new_tensor(len(b_returns)), b_returns.sum(), (b_returns ** 2).sum(), residual.sum(),
            (residual ** 2).sum()]).double()]))
        if rank != 0:  # the same checks, and its part of the checkpoint's collectives; rank 0 logs and writes
            if saving:
                check_finite("parameter", torch.cat([p.detach().flatten() for p in agent.parameters()]), global_step)
                checkpoint(iteration)
            if signum is not None:  # wait for rank 0 to finish its log: torchrun stops every rank once one exits
                all_reduce(torch.zeros(1, device=device))
                leave(128 + signum)
            continue
        for step, score, length in games:
            recent_returns.append(score)
            writer.add_scalar("charts/episodic_return", score, step)  # whole game, unclipped
            writer.add_scalar("charts/episodic_length", length, step)
        total_primary += primary_steps
        total_fixup += fixup_steps
        elapsed = time.time() - start_time
        sps = int((global_step - start_step) / elapsed)
        v_loss, pg_loss, entropy = sums[:3] / sums[3]  # the last global minibatch's mean losses
        var_y = (sums[6] / sums[4] - (sums[5] / sums[4]) ** 2).item()
        var_res = (sums[8] / sums[4] - (sums[7] / sums[4]) ** 2).item()
        for tag, value in {
            "trust_region/kl_max": kl_max,  # <= eps_kl: the guarantee, over every state of every rank's batch
            "trust_region/kl_mean": kl_mean,
            "fixpo/beta": float(beta),
            "fixpo/primary_grad_steps": primary_steps,
            "fixpo/fixup_grad_steps": fixup_steps,
            "fixpo/fixup_passes": fixup_passes,
            "fixpo/fixup_fraction": fixup_steps / (primary_steps + fixup_steps),
            "fixpo/fixup_fraction_cumulative": total_fixup / (total_primary + total_fixup),
            "fixpo/fixup_fallbacks": fallbacks,  # cumulative; should stay 0
            "fixpo/fixup_value_shift": value_shift,  # mean_s |V after - V before| (<= 256 states per rank), summed over the fixup phases
            "charts/learning_rate": lr_now,
            "charts/SPS": sps,
            "losses/value_loss": v_loss.item(),
            "losses/policy_loss": pg_loss.item(),
            "losses/entropy": entropy.item(),
            "losses/explained_variance": np.nan if var_y == 0 else 1 - var_res / var_y,
            "dist/world_size": args.world_size,
            "dist/comm_seconds": COMM["seconds"],  # cumulative, rank 0's time in collectives (waiting included)
            "dist/comm_fraction": COMM["seconds"] / elapsed,
            "dist/comm_calls": COMM["calls"],
        }.items():
            writer.add_scalar(tag, value, global_step)
        ret = f"{np.mean(recent_returns):8.1f}" if recent_returns else "     n/a"
        eta = int(elapsed * (args.num_iterations - iteration) / (iteration - first_iteration + 1))  # seconds left at the average speed so far
        print(f"step {global_step:8d}/{args.total_timesteps} ({global_step / args.total_timesteps:4.0%})  "
              f"eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}  sps {sps:5d}  return {ret}  kl_max {kl_max:.3f}/{args.eps_kl}  "
              f"beta {float(beta):6.3f}  fixup {fixup_steps:3d}/{primary_steps + fixup_steps}  fallbacks {fallbacks}  "
              f"comm {100 * COMM['seconds'] / elapsed:4.1f}%")
        if saving:
            check_finite("parameter", torch.cat([p.detach().flatten() for p in agent.parameters()]), global_step)
            checkpoint(iteration)  # only ever after a complete update with finite parameters
        if signum is not None:
            print(f"checkpoint written; continue with: torchrun --nproc_per_node {args.world_size} {sys.argv[0]} "
                  f"--resume {checkpoint_path}", flush=True)
            writer.close()
            all_reduce(torch.zeros(1, device=device))  # the log is written: now every rank may exit
            tdist.destroy_process_group() if tdist.is_initialized() else None
            envs.close()
            sys.exit(128 + signum)

    if tdist.is_initialized():  # the collectives are over (every rank is here); rank 0 alone saves and evaluates
        tdist.destroy_process_group()
    if rank != 0:
        leave(0)
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

    if args.capture_video:  # AtariVectorEnv cannot render: a game of the final policy in a rendering env, to videos/
        play_games(gym.vector.SyncVectorEnv([make_env(args.env_id, 0, True, run_name)]), agent, 1, args.seed, device=device)
    writer.close()
    if args.track:
        wandb.finish()  # before leave(): os._exit skips the atexit hooks, wandb's upload among them
    leave(0)  # rank 0 too: a finished run whose teardown aborts (SIGABRT, seen on a resumed 2-rank run) would exit -6
