"""Prepare CleanRL's ppo_atari.py as the same-machine Atari reference: today's gymnasium, and resumable.

    python benchmark/cleanrl_atari.py /path/to/cleanrl /tmp/cleanrl_ref     # writes /tmp/cleanrl_ref/ppo_atari.py
    cd benchmark/results/atari && OMP_NUM_THREADS=1 python /tmp/cleanrl_ref/ppo_atari.py --env-id PongNoFrameskip-v4 \\
        --seed 1 --total-timesteps 2000000 --exp-name ppo_cleanrl --no-cuda --checkpoint-every 10
    ... killed or stopped with SIGTERM (it writes a checkpoint first), then:
    OMP_NUM_THREADS=1 python /tmp/cleanrl_ref/ppo_atari.py --resume runs/<run_name>/checkpoint.pt --checkpoint-every 10

CleanRL is not part of this project: this copies its ppo_atari.py (written for CleanRL commit fe8d8a0, gymnasium
0.29) and its atari_wrappers.py OUT of a CleanRL checkout into a folder outside the repository and edits the copy:
  1. gymnasium 1.x: register ale_py's envs; GrayScaleObservation/FrameStack are now GrayscaleObservation/
     FrameStackObservation; the vector env autoresets in the same step (the semantics CleanRL's GAE was written for,
     the default before gymnasium 1.0), and whole-game returns are read from infos["final_info"]["episode"].
  2. --checkpoint-every N / --resume PATH: agent, optimizer, global step, iteration and RNG states, written
     atomically every N updates and on SIGTERM/SIGINT; a resume appends to the same TensorBoard log (purge_step).
     A 2M-step Pong run takes hours on a CPU, so it must survive being stopped. The learning algorithm is untouched.
Each edit checks that its anchor text occurs exactly once, so a different CleanRL version fails loudly.
"""
import os
import shutil
import sys

EDITS = [  # (anchor in CleanRL's file, replacement)
    ("import gymnasium as gym\n", "import gymnasium as gym\nimport ale_py\nimport signal\n\ngym.register_envs(ale_py)\n"),
    ("gym.wrappers.GrayScaleObservation(env)", "gym.wrappers.GrayscaleObservation(env)"),
    ("gym.wrappers.FrameStack(env, 4)", "gym.wrappers.FrameStackObservation(env, 4)"),
    ('    """the number of iterations (computed in runtime)"""\n', '    """the number of iterations (computed in runtime)"""\n'
     '    checkpoint_every: int = 0\n    """write runs/{run_name}/checkpoint.pt every N updates (0: only on SIGTERM/SIGINT)"""\n'
     '    resume: str = ""\n    """continue the run saved in this checkpoint (its own arguments are used)"""\n'),
    ("    args = tyro.cli(Args)\n",
     "    args = tyro.cli(Args)\n"
     "    ck = torch.load(args.resume, map_location='cpu', weights_only=False) if args.resume else None\n"
     "    if ck is not None:  # the saved run's arguments, but this invocation's checkpoint/resume flags\n"
     "        args = Args(**{**ck['args'], 'checkpoint_every': args.checkpoint_every, 'resume': args.resume})\n"),
    ('    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"\n',
     '    run_name = ck["run_name"] if ck is not None else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"\n'),
    ('    writer = SummaryWriter(f"runs/{run_name}")\n',
     '    writer = SummaryWriter(f"runs/{run_name}", purge_step=None if ck is None else ck["global_step"] + 1)\n'),
    ("        [make_env(args.env_id, i, args.capture_video, run_name) for i in range(args.num_envs)],\n",
     "        [make_env(args.env_id, i, args.capture_video, run_name) for i in range(args.num_envs)],\n"
     "        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,\n"),
    ("    next_done = torch.zeros(args.num_envs).to(device)\n",
     "    next_done = torch.zeros(args.num_envs).to(device)\n"
     "    first_iteration, stop = 1, []\n"
     "    for s in (signal.SIGTERM, signal.SIGINT):\n"
     "        signal.signal(s, lambda signum, frame: stop.append(signum))\n"
     "    if ck is not None:\n"
     "        agent.load_state_dict(ck['agent'])\n"
     "        optimizer.load_state_dict(ck['optimizer'])\n"
     "        global_step, first_iteration = ck['global_step'], ck['iteration'] + 1\n"
     "        random.setstate(ck['rng'][0]), np.random.set_state(ck['rng'][1]), torch.set_rng_state(ck['rng'][2])\n"
     "        start_time -= ck['elapsed']\n"
     "        next_obs = torch.Tensor(envs.reset(seed=args.seed + global_step)[0]).to(device)  # new games, new seeds\n"
     "        print(f'resuming {run_name} at step {global_step}', flush=True)\n"),
    ("    for iteration in range(1, args.num_iterations + 1):\n",
     "    for iteration in range(first_iteration, args.num_iterations + 1):\n"),
    ('            if "final_info" in infos:\n'
     '                for info in infos["final_info"]:\n'
     '                    if info and "episode" in info:\n'
     "                        print(f\"global_step={global_step}, episodic_return={info['episode']['r']}\")\n"
     '                        writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)\n'
     '                        writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)\n',
     '            if "final_info" in infos and "episode" in infos["final_info"]:\n'
     '                final = infos["final_info"]\n'
     '                for i in np.where(final["_episode"])[0]:\n'
     "                    print(f\"global_step={global_step}, episodic_return={final['episode']['r'][i]}\")\n"
     '                    writer.add_scalar("charts/episodic_return", final["episode"]["r"][i], global_step)\n'
     '                    writer.add_scalar("charts/episodic_length", final["episode"]["l"][i], global_step)\n'),
    ('        writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)\n',
     '        writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)\n'
     "        if stop or iteration == args.num_iterations or (args.checkpoint_every and iteration % args.checkpoint_every == 0):\n"
     "            path = f'runs/{run_name}/checkpoint.pt'\n"
     "            torch.save({'run_name': run_name, 'args': {k: v for k, v in vars(args).items()},\n"
     "                        'agent': agent.state_dict(), 'optimizer': optimizer.state_dict(),\n"
     "                        'global_step': global_step, 'iteration': iteration, 'elapsed': time.time() - start_time,\n"
     "                        'rng': (random.getstate(), np.random.get_state(), torch.get_rng_state())}, path + '.tmp')\n"
     "            os.replace(path + '.tmp', path)\n"
     "            if stop:\n"
     "                writer.close()\n"
     "                print(f'checkpoint written: {path}', flush=True)\n"
     "                sys.exit(128 + stop[0])\n"),
    ("import os\n", "import os\nimport sys\n"),
]


def prepare(cleanrl_dir, out_dir):
    src = open(os.path.join(cleanrl_dir, "cleanrl", "ppo_atari.py")).read()
    for anchor, replacement in EDITS:
        count = src.count(anchor)
        if count != 1:
            sys.exit(f"error: expected one {anchor.strip()[:60]!r} in ppo_atari.py, found {count} (CleanRL version?)")
        src = src.replace(anchor, replacement)
    os.makedirs(os.path.join(out_dir, "cleanrl_utils"), exist_ok=True)
    shutil.copy(os.path.join(cleanrl_dir, "cleanrl_utils", "atari_wrappers.py"), os.path.join(out_dir, "cleanrl_utils"))
    open(os.path.join(out_dir, "cleanrl_utils", "__init__.py"), "w").close()
    with open(os.path.join(out_dir, "ppo_atari.py"), "w") as f:
        f.write(src)
    return os.path.join(out_dir, "ppo_atari.py")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.abspath(sys.argv[2]).startswith(root + os.sep):
        sys.exit("error: write CleanRL's copy outside this repository")
    print(prepare(sys.argv[1], sys.argv[2]))
