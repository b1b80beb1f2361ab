"""Where the per-state KL of one Atari update sits: FixPO's update against PPO-clip's, from the same start.

    python benchmark/kl_tail.py benchmark/results/atari/runs/Breakout*/checkpoint.pt --batches 4

From a `fixpo_atari.py` run's checkpoint.pt (its network, Adam state, beta and arguments), collect a batch with the
checkpoint's policy and update a copy of the network on it twice from the same start:
  fixpo  the update as fixpo_atari.py makes it (primary phase with beta's steps, a fixup phase after each epoch);
  ppo    CleanRL's ppo_atari.py update (clipped surrogate, clip 0.1, no beta, no fixup phase; the same network,
         Adam state, batch, learning rate, epochs and minibatches).
For each it prints KL(s) = D_KL(pi_old(.|s) || pi(.|s)) over the batch's states: quantiles, mean, max / mean, the
share of the summed KL held by the top 1% of states, and what those states have in common (pi_old's entropy, its
probability of the action taken, the advantage in batch standard deviations). Each batch is collected after
`--warmup` steps of play (games under way) and the envs keep playing between batches.

The update mirrors fixpo_atari.py's training loop (which lives in its `__main__` block, CleanRL style), from its
module-level pieces: kl_per_state, batch_kl, compute_gae, policy_loss, value_loss, Beta, fixup_phase.
"""
import argparse
import copy
import os
import sys
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fixpo_atari as F  # noqa: E402

PPO_CLIP = 0.1  # CleanRL ppo_atari.py's clip_coef (its value clip is the same 0.1, as fixpo_atari.py's vf_clip_coef)


def collect(envs, agent, args, obs):
    """One rollout of args.num_steps x args.num_envs with the agent's policy: the batch as fixpo_atari.py builds it."""
    T, N = args.num_steps, args.num_envs
    scores, valid = F.GameScores(N), torch.ones(N)
    rows = {k: [] for k in ("obs", "action", "params", "logprob", "value", "reward", "term", "done", "valid")}
    for _ in range(T):
        with torch.no_grad():
            params, value = agent.dist_params_and_value(obs)
            dist = F.make_dist(params)
            action = dist.sample()
        for k, v in (("obs", obs), ("action", action), ("params", params), ("logprob", dist.log_prob(action)),
                     ("value", value), ("valid", valid)):
            rows[k].append(v)
        obs, reward, term, trunc, infos = envs.step(action.numpy())
        obs = torch.as_tensor(obs)
        rows["reward"].append(torch.as_tensor(np.sign(reward), dtype=torch.float32))
        rows["term"].append(torch.as_tensor(term, dtype=torch.float32))
        rows["done"].append(torch.as_tensor(term | trunc, dtype=torch.float32))
        scores.update(reward, term, trunc, infos["lives"])
        valid = torch.as_tensor(~scores.autoreset_next, dtype=torch.float32)
    r = {k: torch.stack(v) for k, v in rows.items()}
    with torch.no_grad():
        adv, ret = F.compute_gae(r["reward"], r["value"], agent.get_value(obs), r["term"], r["done"], r["valid"],
                                 args.gamma, args.gae_lambda)
    keep = r["valid"].reshape(-1).bool()
    flat = lambda x: x.reshape((T * N,) + x.shape[2:])[keep]  # noqa: E731
    batch = {k: flat(r[k]) for k in ("obs", "action", "params", "logprob", "value")}
    batch.update(advantage=flat(adv), ret=flat(ret))
    return batch, obs


def update(agent, optimizer, beta, batch, args, lr, algorithm):
    """One policy-improvement step on the batch, as fixpo_atari.py (algorithm="fixpo") or CleanRL's PPO ("ppo")."""
    n = len(batch["obs"])
    theta_old = [p.detach().clone() for p in agent.actor_parameters()]
    fixup_steps = 0
    for _ in range(args.update_epochs):
        for mb in torch.randperm(n).tensor_split(args.num_minibatches):
            params, value = agent.dist_params_and_value(batch["obs"][mb])
            dist = F.make_dist(params)
            logprob = dist.log_prob(batch["action"][mb])
            adv = batch["advantage"][mb]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            v_loss = F.value_loss(value, batch["value"][mb], batch["ret"][mb], args.vf_clip_coef if args.clip_vloss else None)
            if algorithm == "fixpo":
                kl = F.kl_per_state(batch["params"][mb], params)
                pg = F.policy_loss(logprob, batch["logprob"][mb], adv) + beta.value.detach() * kl.mean()
            else:
                ratio = (logprob - batch["logprob"][mb]).exp()
                pg = -torch.min(ratio * adv, ratio.clamp(1 - PPO_CLIP, 1 + PPO_CLIP) * adv).mean()
            loss = pg + args.vf_coef * v_loss - args.ent_coef * dist.entropy().mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
            if algorithm == "fixpo":
                beta.step(kl)
        if algorithm == "fixpo":
            fixup_steps += F.fixup_phase(agent, batch["obs"], batch["params"], theta_old, beta, args.eps_kl,
                                         args.fixup_minibatch_size, lr, args.fixup_max_passes).grad_steps
    return fixup_steps


def describe(kl, batch):
    """The KL distribution over the batch's states, and the top 1% of states against all of them."""
    old_logp = torch.log_softmax(batch["params"], -1)
    entropy = -(old_logp.exp() * old_logp).sum(-1)
    p_taken = old_logp.gather(1, batch["action"][:, None]).squeeze(1).exp()
    adv = (batch["advantage"] - batch["advantage"].mean()) / batch["advantage"].std()
    top = kl.argsort(descending=True)[:max(1, len(kl) // 100)]
    q = torch.quantile(kl, torch.tensor([0.5, 0.9, 0.99]))
    return dict(median=q[0].item(), q90=q[1].item(), q99=q[2].item(), max=kl.max().item(), mean=kl.mean().item(),
                top1_share=(kl[top].sum() / kl.sum()).item(),
                entropy_top1=entropy[top].mean().item(), entropy_all=entropy.mean().item(),
                p_taken_top1=p_taken[top].mean().item(), p_taken_all=p_taken.mean().item(),
                abs_adv_top1=adv[top].abs().mean().item(), abs_adv_all=adv.abs().mean().item(),
                adv_top1=adv[top].mean().item())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a fixpo_atari.py run's checkpoint.pt")
    parser.add_argument("--batches", type=int, default=4, help="batches to collect (each updated both ways)")
    parser.add_argument("--warmup", type=int, default=200, help="steps of play before the first batch")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(cli.seed)
    state = torch.load(cli.checkpoint, map_location="cpu", weights_only=False)
    if state.get("script") != "fixpo_atari.py":
        sys.exit(f"error: {cli.checkpoint} is not a fixpo_atari.py checkpoint")
    args = types.SimpleNamespace(**state["args"])
    num_iterations = args.total_timesteps // (args.num_envs * args.num_steps)
    iteration = min(state["iteration"] + 1, num_iterations)  # the run's next update (a finished run: its last one)
    lr = args.learning_rate * (1.0 - (iteration - 1.0) / num_iterations) if args.anneal_lr else args.learning_rate

    envs = F.make_envs(args.env_id, args.num_envs)
    agent = F.Agent(envs.single_action_space.n)
    agent.load_state_dict(state["agent"])
    obs = torch.as_tensor(envs.reset(seed=cli.seed)[0])
    for _ in range(cli.warmup):
        with torch.no_grad():
            obs, *_ = envs.step(F.make_dist(agent.dist_params(obs)).sample().numpy())
        obs = torch.as_tensor(obs)
    print(f"{args.env_id} at {state['global_step']:,} agent steps, eps_kl {args.eps_kl}, c_beta {args.c_beta}, "
          f"beta {state['beta']['value'].item():.3g}, lr {lr:.3g}; {cli.batches} batches of {args.num_envs}x{args.num_steps}")
    rows = {"fixpo": [], "ppo": []}
    for b in range(cli.batches):
        batch, obs = collect(envs, agent, args, obs)
        for algorithm in rows:
            net = copy.deepcopy(agent)
            optimizer = torch.optim.Adam(net.parameters(), lr=lr, eps=1e-5)
            optimizer.load_state_dict(state["optimizer"])
            optimizer.param_groups[0]["lr"] = lr
            beta = F.Beta(args.init_beta, args.beta_lr, args.eps_kl, args.c_beta, args.beta_max)
            with torch.no_grad():
                beta.value.copy_(state["beta"]["value"])
            beta.optimizer.load_state_dict(state["beta"]["optimizer"])
            fixup_steps = update(net, optimizer, beta, batch, args, lr, algorithm)
            row = describe(F.batch_kl(net, batch["obs"], batch["params"]), batch)
            row["fixup_steps"] = fixup_steps if algorithm == "fixpo" else None
            rows[algorithm].append(row)
    keys = ["median", "q90", "q99", "max", "mean", "top1_share", "entropy_top1", "entropy_all", "p_taken_top1",
            "p_taken_all", "abs_adv_top1", "abs_adv_all", "adv_top1"]
    print("| update | " + " | ".join(keys) + " | max / mean |")
    print("|---" * (len(keys) + 2) + "|")
    for algorithm, rs in rows.items():
        means = {k: np.mean([r[k] for r in rs]) for k in keys}
        ratio = np.mean([r["max"] / r["mean"] for r in rs])
        print(f"| {algorithm} | " + " | ".join(f"{means[k]:.3g}" for k in keys) + f" | {ratio:.3g} |")
    print("(mean over the batches; KL per state after the update; *_top1: the 1% of states with the largest KL, "
          "*_all: every state; adv in batch standard deviations)")
    fixup = [r["fixup_steps"] for r in rows["fixpo"]]
    print(f"fixpo: fixup steps per update {fixup}; largest KL {max(r['max'] for r in rows['fixpo']):.4g} <= eps_kl {args.eps_kl}")
    return rows


if __name__ == "__main__":
    main()
