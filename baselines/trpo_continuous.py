"""BASELINE: TRPO for continuous actions on fixpo_continuous.py's skeleton (Gymnasium MuJoCo).

Schulman et al. (2015), "Trust Region Policy Optimization": one step per batch that maximises the
surrogate mean(ratio * A) subject to mean_s KL(s) <= delta (`max_kl`). The step direction is the natural
gradient F^-1 g, found by conjugate gradient on Fisher-vector products (F is never formed), scaled so
that 0.5 s^T F s = delta; a backtracking line search then accepts only a step that improves the
surrogate AND keeps the exact mean KL <= delta. The critic is trained by its own Adam. Same envs,
networks, GAE and logging as FixPO: `diff fixpo_continuous.py baselines/trpo_continuous.py` shows the
algorithm. TRPO bounds the MEAN KL; trust_region/kl_max shows what that allows at single states.

Run:       python baselines/trpo_continuous.py --env-id Hopper-v4
Evaluate:  python baselines/trpo_continuous.py --eval-checkpoint runs/<run_name>/trpo_continuous.fixpo_model
Docs: docs/fixpo.md (FixPO, and how these baselines are held against the same region: docs/results.md)
"""
import hashlib
import os
import random
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import List, Optional

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
    learning_rate: float = 1e-3
    """Adam learning rate of the critic (the policy's step is set by max_kl)"""
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
    """minibatches per epoch of the critic's training"""
    update_epochs: int = 10
    """epochs of the critic's training per batch (the policy takes one TRPO step)"""
    norm_adv: bool = True
    """normalise advantages over the batch"""
    clip_vloss: bool = True
    """clip the value loss around the rollout's values (as most PPO code does)"""
    vf_clip_coef: float = 0.2
    """range of the value clipping"""
    max_grad_norm: float = 0.5
    """maximum gradient norm of a critic step"""
    init_log_std: float = -0.5
    """initial log-std of the Gaussian policy (state-independent)"""

    max_kl: float = 0.01
    """delta: the bound on the MEAN KL of a policy step"""
    cg_iters: int = 10
    """conjugate-gradient iterations for the natural gradient"""
    cg_damping: float = 0.1
    """damping added to the Fisher-vector product (F + damping I), for a stable solve"""
    backtrack_coef: float = 0.8
    """line search: shrink the step by this factor after each rejection"""
    max_backtracks: int = 10
    """line search: tries before the step is rejected (the policy then stays at pi_old)"""

    # filled in at runtime
    batch_size: int = 0
    """num_envs * num_steps, the steps per rollout (computed in runtime)"""
    minibatch_size: int = 0
    """the minibatch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of policy-improvement steps (computed in runtime)"""


class UsageError(Exception):
    """Bad input: reported as one line, no traceback."""


def check_args(args: Args) -> None:
    rules = [
        (args.max_kl > 0 and args.cg_damping >= 0, f"need --max-kl > 0 and --cg-damping >= 0 (got {args.max_kl}, {args.cg_damping})"),
        (0 < args.backtrack_coef < 1, f"--backtrack-coef must be in (0, 1) (got {args.backtrack_coef})"),
        (args.cg_iters >= 1 and args.max_backtracks >= 1, "--cg-iters and --max-backtracks must be >= 1"),
        (args.learning_rate > 0, f"--learning-rate must be > 0 (got {args.learning_rate})"),
        (args.num_envs >= 1 and args.num_steps >= 1, "--num-envs and --num-steps must be >= 1"),
        (args.num_minibatches >= 1 and args.update_epochs >= 1, "--num-minibatches and --update-epochs must be >= 1"),
        (args.num_envs * args.num_steps % args.num_minibatches == 0,
         f"batch {args.num_envs}x{args.num_steps}={args.num_envs * args.num_steps} is not divisible by --num-minibatches {args.num_minibatches}"),
        (args.total_timesteps >= args.num_envs * args.num_steps,
         f"--total-timesteps {args.total_timesteps} is less than one batch ({args.num_envs * args.num_steps} steps)"),
        (0 < args.gamma <= 1 and 0 <= args.gae_lambda <= 1, "need 0 < --gamma <= 1 and 0 <= --gae-lambda <= 1"),
        (args.max_grad_norm > 0, f"--max-grad-norm must be > 0 (got {args.max_grad_norm})"),
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

    def __init__(self, obs_dim: int, act_dim: int, init_log_std: float = -0.5):
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
        """theta of the policy: what the TRPO step moves (the critic is separate)."""
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
    """L_pi = -mean(ratio * A): minus TRPO's surrogate, importance sampled, not clipped."""
    return -((new_logprob - old_logprob).exp() * advantages).mean()


def value_loss(new_value, old_value, returns, clip_coef=None):
    """L_VF: squared error to the GAE returns, optionally clipped around the rollout's values."""
    loss = (new_value - returns) ** 2
    if clip_coef is not None:
        clipped = old_value + torch.clamp(new_value - old_value, -clip_coef, clip_coef)
        loss = torch.max(loss, (clipped - returns) ** 2)
    return 0.5 * loss.mean()


def flat_grad(y, params, **kwargs):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(y, params, **kwargs)])


def set_flat_params(params, flat):
    with torch.no_grad():
        for p, chunk in zip(params, flat.split([p.numel() for p in params])):
            p.copy_(chunk.view_as(p))


def conjugate_gradient(Avp, b, iters=10, tol=1e-10):
    """Solve A x = b for symmetric positive-definite A, given only the product v -> A v."""
    x, r = torch.zeros_like(b), b.clone()  # r = b - A x at x = 0
    p, rr = r.clone(), r @ r
    for _ in range(iters):
        if rr <= tol:
            break
        Ap = Avp(p)
        alpha = rr / (p @ Ap)
        x, r = x + alpha * p, r - alpha * Ap
        rr_new = r @ r
        p, rr = r + (rr_new / rr) * p, rr_new
    return x


def fisher_vector_product(agent, obs, old_params, v, damping):
    """(F + damping I) v, F = Hessian of mean_s KL(pi_old || pi) at theta = theta_old, which is the Fisher
    information matrix: two backward passes, F itself is never formed."""
    actor = agent.actor_parameters()
    kl = kl_per_state(old_params, agent.dist_params(obs)).mean()
    g = flat_grad(kl, actor, create_graph=True)
    return flat_grad(g @ v, actor) + damping * v


@dataclass
class TRPOResult:
    accepted: bool  # the line search found a step; if not, theta stays at theta_old
    step_frac: float  # fraction of the full natural-gradient step taken (0 when rejected)
    backtracks: int  # line-search rejections before the accepted step
    kl_mean: float  # mean_s KL(s) after the step: <= max_kl
    improvement: float  # surrogate gain of the step: > 0 when accepted


def trpo_step(agent, obs, actions, old_logprob, advantages, old_params, max_kl, damping, cg_iters,
              backtrack_coef, max_backtracks):
    """One TRPO policy step: natural gradient by CG, scaled to the KL bound, then a backtracking line search."""
    actor = agent.actor_parameters()

    def surrogate_loss():
        return policy_loss(make_dist(agent.dist_params(obs)).log_prob(actions).sum(-1), old_logprob, advantages)

    loss_old = surrogate_loss()
    g = -flat_grad(loss_old, actor)  # ascent direction of the surrogate
    x = conjugate_gradient(lambda v: fisher_vector_product(agent, obs, old_params, v, damping), g, cg_iters)
    shs = 0.5 * (x @ fisher_vector_product(agent, obs, old_params, x, damping))
    theta_old = torch.cat([p.detach().reshape(-1) for p in actor])
    if not shs > 0:  # a zero or degenerate gradient: no step
        return TRPOResult(False, 0.0, 0, 0.0, 0.0)
    full_step = x * torch.sqrt(max_kl / shs)  # the quadratic model's KL of full_step is max_kl
    for k in range(max_backtracks):
        frac = backtrack_coef ** k
        set_flat_params(actor, theta_old + frac * full_step)
        with torch.no_grad():
            improvement = (loss_old - surrogate_loss()).item()
        kl_mean = batch_kl(agent, obs, old_params).mean().item()  # the exact KL, not the quadratic model
        if kl_mean <= max_kl and improvement > 0:
            return TRPOResult(True, frac, k, kl_mean, improvement)
    set_flat_params(actor, theta_old)  # every try failed: keep pi_old
    return TRPOResult(False, 0.0, max_backtracks, 0.0, 0.0)


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
    args.minibatch_size = args.batch_size // args.num_minibatches
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
    optimizer = torch.optim.Adam(agent.critic.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)  # the critic's own

    # rollout storage, (num_steps, num_envs, ...)
    T, N = args.num_steps, args.num_envs
    obs = torch.zeros((T, N, obs_dim), device=device)
    actions = torch.zeros((T, N, act_dim), device=device)
    old_params = torch.zeros((T, N, 2 * act_dim), device=device)  # pi_old's mean and log-std at every state
    logprobs, rewards, values, terms, dones, valids = (torch.zeros((T, N), device=device) for _ in range(6))

    global_step, rejected, first_iteration = 0, 0, 1
    recent_returns = deque(maxlen=20)
    obs_norm, rew_norm = find_wrapper(envs, vw.NormalizeObservation), find_wrapper(envs, vw.NormalizeReward)
    checkpoint_path, stop = os.path.join(run_dir, "checkpoint.pt"), StopSignals()

    def checkpoint(iteration):
        rms = lambda r: {k: torch.as_tensor(np.asarray(getattr(r, k))) for k in ("mean", "var", "count")}
        save_training_state(checkpoint_path, run_name=run_name, args=args, global_step=global_step,
                            iteration=iteration, agent=agent, optimizer=optimizer, beta=None,
                            normalization={"obs_rms": rms(obs_norm.obs_rms), "return_rms": rms(rew_norm.return_rms)},
                            counters={"rejected": rejected, "recent_returns": list(recent_returns)})

    if state is not None:
        agent.load_state_dict(state["agent"])
        optimizer.load_state_dict(state["optimizer"])
        for rms, saved in ((obs_norm.obs_rms, state["normalization"]["obs_rms"]),
                           (rew_norm.return_rms, state["normalization"]["return_rms"])):
            rms.mean, rms.var, rms.count = (saved[k].numpy().astype(np.float64) for k in ("mean", "var", "count"))
        rejected = state["counters"]["rejected"]
        recent_returns.extend(state["counters"]["recent_returns"])
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
    next_obs, _ = envs.reset(seed=args.seed + global_step)
    next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
    next_valid = torch.ones(N, device=device)

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
        # ---- the policy: one TRPO step, mean KL <= max_kl ----
        if args.norm_adv:
            b_advantages = (b_advantages - b_advantages.mean()) / (b_advantages.std() + 1e-8)
        step = trpo_step(agent, b_obs, b_actions, b_logprobs, b_advantages, b_old_params, args.max_kl,
                         args.cg_damping, args.cg_iters, args.backtrack_coef, args.max_backtracks)
        rejected += not step.accepted
        with torch.no_grad():
            dist = make_dist(agent.dist_params(b_obs))
            pg_loss = policy_loss(dist.log_prob(b_actions).sum(-1), b_logprobs, b_advantages)
            entropy = dist.entropy().sum(-1).mean()

        # ---- the critic: its own Adam on L_VF, minibatches ----
        for epoch in range(args.update_epochs):
            for mb in torch.randperm(len(b_obs), device=device).tensor_split(args.num_minibatches):
                v_loss = value_loss(agent.get_value(b_obs[mb]), b_values[mb], b_returns[mb],
                                    args.vf_clip_coef if args.clip_vloss else None)
                optimizer.zero_grad()
                check_finite("value loss", v_loss, global_step)
                v_loss.backward()
                nn.utils.clip_grad_norm_(agent.critic.parameters(), args.max_grad_norm)
                optimizer.step()

        # ---- logging: the exact KL over the whole batch, as FixPO logs it ----
        kl = batch_kl(agent, b_obs, b_old_params)
        elapsed = time.time() - start_time
        sps = int((global_step - start_step) / elapsed)
        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        for tag, value in {
            "trust_region/kl_max": kl.max().item(),  # over every state of the batch
            "trust_region/kl_mean": kl.mean().item(),
            "trpo/step_fraction": step.step_frac,
            "trpo/backtracks": step.backtracks,
            "trpo/rejected_steps": rejected,  # cumulative
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
              f"eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}  sps {sps:5d}  return {ret}  kl_max {kl.max().item():.3f}  "
              f"kl_mean {kl.mean().item():.4f}/{args.max_kl}  step {step.step_frac:.3f}  rejected {rejected}")
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
