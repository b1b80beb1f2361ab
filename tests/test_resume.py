"""--checkpoint-every / --resume / SIGINT-SIGTERM and non-finite stops, end to end (subprocesses)."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "fixpo_continuous.py")
TINY = ["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "4",
        "--update-epochs", "2", "--fixup-minibatch-size", "64", "--eps-kl", "0.05"]
ENV = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=os.path.join(ROOT, "tests"))


def scalar_events(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


SMALL = ["--num-envs", "1", "--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "1",
         "--fixup-minibatch-size", "64", "--eps-kl", "0.05"]
CASES = {  # script, its arguments, the signal, the batch size
    "continuous-SIGINT": (SCRIPT, TINY, signal.SIGINT, 128),
    "continuous-SIGTERM": (SCRIPT, TINY, signal.SIGTERM, 128),
    "atari-SIGTERM": (os.path.join(ROOT, "fixpo_atari.py"), SMALL + ["--env-id", "BreakoutNoFrameskip-v4"], signal.SIGTERM, 64),
    "ppo-SIGTERM": (os.path.join(ROOT, "baselines", "ppo_continuous.py"), SMALL[:8] + ["--env-id", "Pendulum-v1"],
                    signal.SIGTERM, 64),
    "trpo-SIGINT": (os.path.join(ROOT, "baselines", "trpo_continuous.py"), SMALL[:4] + ["--env-id", "Pendulum-v1"],
                    signal.SIGINT, 64),
    "metaworld-SIGINT": (os.path.join(ROOT, "fixpo_metaworld.py"), SMALL + ["--env-id", "reach-v3"], signal.SIGINT, 64),
}


@pytest.mark.parametrize("case", CASES)
def test_interrupted_run_resumes_to_exactly_the_total(case, tmp_path):
    script, args, sig, batch = CASES[case]
    total = 30 * batch
    first = subprocess.Popen([sys.executable, script, *args, "--total-timesteps", str(total), "--checkpoint-every", "3"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, "the run ended before its first checkpoint could be interrupted"
    first.send_signal(sig)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 128 + sig, err
    (ckpt,) = glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))
    stopped_at = torch.load(ckpt, weights_only=False)["global_step"]
    assert 0 < stopped_at < total and f"--resume {os.path.relpath(ckpt, tmp_path)}" in out

    second = subprocess.run([sys.executable, script, "--resume", ckpt], cwd=tmp_path, capture_output=True, text=True,
                            env=ENV, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"resuming" in second.stdout and f"at step {stopped_at}" in second.stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))  # the same run folder, nothing new
    kl = scalar_events(run_dir, "trust_region/kl_max")
    steps = [s for s, _ in kl]
    assert steps == list(range(batch, total + 1, batch))  # every update once: nothing lost or duplicated
    if "baselines" not in script:  # PPO-clip and TRPO promise no bound on the max KL
        assert max(v for _, v in kl) <= 0.05  # both pieces inside eps_kl
    returns = [s for s, _ in scalar_events(run_dir, "charts/episodic_return")]
    assert returns == sorted(returns) and returns[-1] <= total
    assert torch.load(ckpt, weights_only=False)["global_step"] == total


def test_resume_refuses_flags_that_would_change_the_run(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, *TINY, "--total-timesteps", "256", "--checkpoint-every", "1"],
                       cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    (ckpt,) = glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))
    p = subprocess.run([sys.executable, SCRIPT, "--resume", ckpt, "--learning-rate", "0.1"], cwd=tmp_path,
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [
        "error: --resume continues a run with its saved arguments; drop --learning-rate"]
    p = subprocess.run([sys.executable, SCRIPT, "--resume", ckpt, "--num-envs", "8"], cwd=tmp_path,  # 8: the default
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [
        "error: --resume continues a run with its saved arguments; drop --num-envs"]
    p = subprocess.run([sys.executable, SCRIPT, "--resume", str(tmp_path / "nothing.pt")], cwd=tmp_path,
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "cannot read" in p.stderr
    p = subprocess.run([sys.executable, SCRIPT, "--resume", ckpt], cwd=tmp_path,  # a run stopped in its last update
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 0 and "at step 256, every update done: finishing" in p.stdout, p.stderr


def test_nan_observation_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    env = dict(ENV, FIXPO_TEST_NAN_AT="300")  # each env's 300th step: update 5 of 2 envs x 64 steps
    p = subprocess.run([sys.executable, SCRIPT, *TINY, "--env-id", "nan_env:NanPendulum-v0", "--total-timesteps",
                        "1280", "--checkpoint-every", "2"], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 1
    (line,) = p.stderr.strip().splitlines()  # no traceback
    assert line.startswith("error: non-finite observation at step 6") and "checkpoint.pt is kept" in line
    (ckpt,) = glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == 512 and state["iteration"] == 4  # the last good one, not overwritten
    assert all(torch.isfinite(v).all() for v in state["agent"].values())
    assert not glob.glob(str(tmp_path / "runs" / "*" / "*.tmp"))


def test_track_continues_the_same_wandb_run_after_resume(tmp_path):
    """--track with --resume logs to the first piece's wandb run: one id per run name, resume="allow" (wandb is
    stood in for by a module that records what wandb.init was given)."""
    standin = tmp_path / "standin" / "wandb"
    standin.mkdir(parents=True)
    (standin / "__init__.py").write_text(
        "import json, os\n\n\ndef init(**kw):\n    with open(os.environ['WANDB_STANDIN_LOG'], 'a') as f:\n"
        "        f.write(json.dumps({k: kw.get(k) for k in ('id', 'resume', 'name')}) + '\\n')\n")
    log = tmp_path / "inits.jsonl"
    env = dict(ENV, PYTHONPATH=f"{standin.parent}{os.pathsep}{ENV['PYTHONPATH']}", WANDB_STANDIN_LOG=str(log))
    first = subprocess.run([sys.executable, SCRIPT, *TINY, "--total-timesteps", "256", "--track"], cwd=tmp_path,
                           capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    (ckpt,) = glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))
    second = subprocess.run([sys.executable, SCRIPT, "--resume", ckpt, "--track"], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    import json

    inits = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(inits) == 2 and inits[0] == inits[1] and inits[0]["resume"] == "allow" and len(inits[0]["id"]) == 16


def test_typed_fields_sees_every_spelling_of_a_flag():
    sys.path.insert(0, ROOT)
    import fixpo_continuous as fc

    typed = fc.typed_fields(["--eps-kl", "0.2", "--num-envs=8", "--no-anneal-lr", "--env-id", "Hopper-v4"])
    assert {"eps_kl", "num_envs", "anneal_lr", "env_id"} <= typed and "hopper_v4" not in typed


def test_a_signal_during_the_final_evaluation_stops_it_at_once(tmp_path):
    """After training the model is saved; a first SIGINT during --save-model's evaluation must end it then, not
    after every episode: the evaluation never reports."""
    p = subprocess.Popen([sys.executable, SCRIPT, *TINY, "--total-timesteps", "128", "--save-model",
                          "--eval-episodes", "300"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(ENV, PYTHONUNBUFFERED="1"))
    for line in p.stdout:  # printed once the flag is set: the evaluation (60,000 Pendulum steps) is about to start
        if line.startswith("model saved to"):
            break
    p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=600)  # only a hang guard
    finally:
        p.kill()
    assert p.returncode != 0 and "KeyboardInterrupt" in err and "evaluation:" not in out
    (model,) = glob.glob(str(tmp_path / "runs" / "*" / "*.fixpo_model"))
    assert torch.load(model, weights_only=False)["global_step"] == 128  # the saved model is whole
