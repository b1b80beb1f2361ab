"""End to end: the script as a user runs it (subprocesses in a temporary directory)."""
import glob
import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "fixpo_continuous.py")
TINY = ["--num-envs", "2", "--num-steps", "64", "--num-minibatches", "4", "--update-epochs", "2",
        "--fixup-minibatch-size", "64", "--total-timesteps", "256"]  # two policy updates
TAGS = {
    "trust_region/kl_max", "trust_region/kl_mean", "fixpo/beta", "fixpo/primary_grad_steps",
    "fixpo/fixup_grad_steps", "fixpo/fixup_fraction", "fixpo/fixup_fraction_cumulative", "fixpo/fixup_fallbacks",
    "charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
    "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/explained_variance",
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("train")
    p = run([*TINY, "--seed", "3", "--eps-kl", "0.05", "--save-model", "--eval-episodes", "3", "--trace-updates", "2", "3"],
            cwd)
    assert p.returncode == 0, p.stderr
    return cwd, p


def test_smoke_two_updates_logs_every_tag(trained):
    cwd, p = trained
    (run_dir,) = glob.glob(str(cwd / "runs" / "*"))
    logged = scalars(run_dir)
    assert TAGS <= set(logged), TAGS - set(logged)
    assert len(logged["trust_region/kl_max"]) == 2
    assert max(logged["trust_region/kl_max"]) <= 0.05  # the guarantee, as logged
    assert logged["fixpo/primary_grad_steps"] == [8, 8]
    assert len(re.findall(r"^step .*kl_max", p.stdout, re.M)) == 2  # one progress line per update


def test_trace_logs_every_gradient_step_of_the_traced_update(trained):
    """--trace-updates 2 3 (paper Fig. 2): update 2 only, every primary and fixup step, and each epoch ends inside."""
    cwd, p = trained
    (run_dir,) = glob.glob(str(cwd / "runs" / "*"))
    logged = scalars(run_dir)
    kl, beta, fixup, epoch = (logged[f"trace/{t}"] for t in ("kl_max", "beta", "fixup", "epoch"))
    assert len(kl) == len(beta) == len(fixup) == len(epoch)
    assert sorted(set(epoch)) == [2, 3]  # the 2 epochs of update 2: (2 - 1) * 2 + {0, 1}
    assert fixup.count(0) == 8  # 4 minibatches x 2 epochs; the rest are fixup steps
    for e in (2, 3):
        steps = [i for i, x in enumerate(epoch) if x == e]
        assert [fixup[i] for i in steps[:4]] == [0, 0, 0, 0] and all(fixup[i] == 1 for i in steps[4:])
        assert kl[steps[-1]] <= 0.05  # the epoch's last step leaves every state of the batch inside eps_kl
    assert all(b >= 0 for b in beta)


def test_saved_model_evaluation_reproduces_the_return(trained):
    cwd, p = trained
    (model,) = glob.glob(str(cwd / "runs" / "*" / "*.fixpo_model"))
    in_training = float(re.search(r"evaluation: mean (\S+)", p.stdout).group(1))
    e = run(["--eval-checkpoint", model, "--eval-episodes", "3", "--seed", "3"], cwd)
    assert e.returncode == 0, e.stderr
    assert float(re.search(r"^mean (\S+)", e.stdout, re.M).group(1)) == in_training
    assert not glob.glob(str(cwd / "runs" / "*" / "*.tmp"))


def test_a_runs_checkpoint_evaluates_as_its_saved_model(trained):
    """--eval-checkpoint takes the checkpoint.pt every run leaves (agent and statistics as the saved model's)."""
    cwd, p = trained
    (ckpt,) = glob.glob(str(cwd / "runs" / "*" / "checkpoint.pt"))
    in_training = float(re.search(r"evaluation: mean (\S+)", p.stdout).group(1))
    e = run(["--eval-checkpoint", ckpt, "--eval-episodes", "3", "--seed", "3"], cwd)
    assert e.returncode == 0, e.stderr
    assert float(re.search(r"^mean (\S+)", e.stdout, re.M).group(1)) == in_training


def test_a_model_saved_on_a_gpu_evaluates_on_a_cpu(trained, tmp_path, monkeypatch):
    """A model saved by a CUDA run (tensors tagged cuda:0) loads on a machine without one: load_model maps to the CPU."""
    import torch
    import torch.serialization

    cwd, p = trained
    (model,) = glob.glob(str(cwd / "runs" / "*" / "*.fixpo_model"))
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")  # as torch.save writes a CUDA tensor
        torch.save(torch.load(model), tmp_path / "gpu.fixpo_model")
    if not torch.cuda.is_available():  # the file really is a CUDA one: a plain torch.load refuses it here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.fixpo_model")
    in_training = float(re.search(r"evaluation: mean (\S+)", p.stdout).group(1))
    e = run(["--eval-checkpoint", str(tmp_path / "gpu.fixpo_model"), "--eval-episodes", "3", "--seed", "3"], cwd)
    assert e.returncode == 0, e.stderr
    assert float(re.search(r"^mean (\S+)", e.stdout, re.M).group(1)) == in_training


def test_evaluation_uses_the_saved_normalisation_statistics(trained):
    import torch

    cwd, _ = trained
    (model,) = glob.glob(str(cwd / "runs" / "*" / "*.fixpo_model"))
    ckpt = torch.load(model)
    assert ckpt["obs_rms"]["count"] > 256  # updated during training, not the initial statistics
    assert ckpt["obs_rms"]["mean"].shape == (11,) and ckpt["args"]["env_id"] == "Hopper-v4"


BAD = {
    "unknown env": (["--env-id", "NoSuchEnv-v9"], "unknown env id"),
    "discrete env": (["--env-id", "CartPole-v1"], "Discrete"),
    "eps_kl <= 0": (["--eps-kl", "0"], "--eps-kl"),
    "c_beta < 1": (["--c-beta", "0.5"], "--c-beta"),
    "indivisible batch": (["--num-envs", "3", "--num-steps", "5", "--num-minibatches", "4"], "not divisible"),
    "too few steps": (["--total-timesteps", "100"], "less than one batch"),
    "negative beta lr": (["--beta-lr", "-1"], "--beta-lr"),
    "missing checkpoint": (["--eval-checkpoint", "nowhere.fixpo_model"], "cannot read a checkpoint"),
    "corrupt checkpoint": (["--eval-checkpoint", __file__], "cannot read a checkpoint"),
}


try:
    import wandb  # noqa: F401
except ImportError:
    BAD["--track without wandb"] = (["--track"], "needs wandb")


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line(case, tmp_path):
    args, expected = BAD[case]
    p = run(args, tmp_path)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], p.stderr
    assert not os.path.exists(tmp_path / "runs")  # nothing written


def test_existing_run_directory_is_never_overwritten(tmp_path):
    now = int(time.time())
    dirs = [tmp_path / "runs" / f"Hopper-v4__fixpo_continuous__1__{t}" for t in range(now, now + 30)]
    for d in dirs:
        d.mkdir(parents=True)
        (d / "keep.txt").write_text("precious")
    p = run([*TINY], tmp_path)
    assert p.returncode != 0 and "exists already" in p.stderr and "Traceback" not in p.stderr
    assert all((d / "keep.txt").read_text() == "precious" and len(os.listdir(d)) == 1 for d in dirs)


def test_help_lists_the_fixpo_arguments(tmp_path):
    p = run(["--help"], tmp_path)
    assert p.returncode == 0
    for flag in ("--eps-kl", "--c-beta", "--beta-lr", "--init-beta", "--beta-max", "--fixup-minibatch-size",
                 "--cuda", "--no-cuda", "--track", "--capture-video", "--save-model", "--eval-checkpoint"):
        assert flag in p.stdout


def test_import_has_no_side_effects(tmp_path):
    # dependencies first: gymnasium's own import sets PYGAME_HIDE_SUPPORT_PROMPT, which is not ours to judge
    code = ("import os, sys, gymnasium, torch, tyro; sys.path.insert(0, %r); before = dict(os.environ); "
            "import fixpo_continuous; "
            "assert dict(os.environ) == before; print(sorted(os.listdir('.')))" % ROOT)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_capture_video_headless(tmp_path):
    pytest.importorskip("moviepy")
    p = run([*TINY, "--capture-video"], tmp_path)
    assert p.returncode == 0, p.stderr
    videos = glob.glob(str(tmp_path / "videos" / "*" / "*.mp4"))
    assert videos and all(os.path.getsize(v) > 0 for v in videos)


def test_benchmark_summary_reads_the_smoke_run(trained):
    import importlib.util

    cwd, _ = trained
    spec = importlib.util.spec_from_file_location("summarize", os.path.join(ROOT, "benchmark", "summarize.py"))
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    (run_dir,) = glob.glob(str(cwd / "runs" / "*"))
    row = summarize.summarize(run_dir)
    assert row["steps"] == 256 and row["updates_in_region"] == 1.0 and row["worst_kl_over_eps"] <= 1.0
    assert 0 <= row["fixup_share"] <= 1 and row["fallbacks"] == 0


def test_fixup_and_policy_flags_reach_the_run(tmp_path):
    """--no-fixup-fresh-adam and --init-log-std through the CLI: the run keeps the guarantee and starts from that std."""
    import torch

    p = run([*TINY, "--no-fixup-fresh-adam", "--init-log-std", "-0.5", "--eps-kl", "0.05", "--save-model",
             "--eval-episodes", "1"], tmp_path)
    assert p.returncode == 0, p.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert max(scalars(run_dir)["trust_region/kl_max"]) <= 0.05
    (model,) = glob.glob(str(tmp_path / "runs" / "*" / "*.fixpo_model"))
    log_std = torch.load(model)["agent"]["actor_logstd"]
    assert abs(log_std.mean().item() + 0.5) < 0.1  # two small updates move it little from -0.5 (default -1.0)
