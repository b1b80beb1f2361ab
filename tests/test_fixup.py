"""The guarantee: after fixup_phase, KL(pi_old || pi) <= eps_kl at every state of the batch."""
import math

import pytest
import torch

import fixpo_continuous as fc

OBS_DIM, ACT_DIM, N = 11, 3, 2048


def independent_gaussian_kl(old_params, new_params):
    """Closed-form KL of diagonal Gaussians in float64, written out rather than via torch.distributions."""
    old, new = old_params.double(), new_params.double()
    m0, ls0 = old.chunk(2, -1)
    m1, ls1 = new.chunk(2, -1)
    per_dim = ls1 - ls0 + (torch.exp(2 * ls0) + (m0 - m1) ** 2) / (2 * torch.exp(2 * ls1)) - 0.5
    return per_dim.sum(-1)


def setup(seed=0, init_beta=1.0, beta_lr=0.01):
    torch.manual_seed(seed)
    agent = fc.Agent(OBS_DIM, ACT_DIM)
    obs = torch.randn(N, OBS_DIM) * 2.0  # normalised observations are roughly this spread
    with torch.no_grad():
        old_params = agent.dist_params(obs)
    theta_old = [p.detach().clone() for p in agent.actor_parameters()]
    beta = fc.Beta(init_beta, beta_lr, eps_kl=0.2, c_beta=3.0, beta_max=100.0)
    return agent, obs, old_params, theta_old, beta


def perturb_noise(agent, scale):
    with torch.no_grad():
        for p in agent.actor_parameters():
            p.add_(scale * torch.randn_like(p))


def perturb_gradient_ascent(agent, obs, old_params, steps=20, lr=0.01):
    """Large steps that *increase* the KL: the worst a primary phase could do (from a nudge: KL's gradient is 0 at theta_old)."""
    perturb_noise(agent, 0.01)
    opt = torch.optim.Adam(agent.actor_parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (-fc.kl_per_state(old_params, agent.dist_params(obs)).mean()).backward()
        opt.step()


def perturb_log_std(agent, shift):
    with torch.no_grad():
        agent.actor_logstd.add_(shift)


PERTURBATIONS = {
    "noise_small": lambda a, o, p: perturb_noise(a, 0.05),
    "noise_large": lambda a, o, p: perturb_noise(a, 0.5),
    "gradient_ascent": perturb_gradient_ascent,
    "log_std_up": lambda a, o, p: perturb_log_std(a, 1.5),
    "log_std_down": lambda a, o, p: perturb_log_std(a, -2.0),
}


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
@pytest.mark.parametrize("eps_kl", [0.02, 0.2, 0.5])
def test_every_state_within_eps_after_fixup(name, eps_kl):
    agent, obs, old_params, theta_old, beta = setup(seed=sorted(PERTURBATIONS).index(name))
    PERTURBATIONS[name](agent, obs, old_params)
    before = independent_gaussian_kl(old_params, agent.dist_params(obs).detach())
    assert before.max() > eps_kl, "the perturbation must actually leave the region"

    # far-away perturbations (up to ~2500x eps_kl) may end in the last resort: the guarantee must hold either way
    result = fc.fixup_phase(agent, obs, old_params, theta_old, beta, eps_kl, minibatch_size=256, lr=3e-4, max_passes=20)

    after = independent_gaussian_kl(old_params, agent.dist_params(obs).detach())
    assert torch.isfinite(after).all()
    assert after.max().item() <= eps_kl * (1 + 1e-5)  # float32 model vs float64 check
    assert result.kl_max <= eps_kl
    assert abs(result.kl_max - after.max().item()) < 1e-4 * max(1.0, eps_kl)


def test_training_sized_violation_is_fixed_by_gradient_steps_alone():
    """A violation of a few times eps_kl, as a primary phase leaves it: no last resort needed."""
    agent, obs, old_params, theta_old, beta = setup(seed=4)
    perturb_noise(agent, 0.03)  # std 0.37 (the default init): KL 1-2
    assert 1.0 < independent_gaussian_kl(old_params, agent.dist_params(obs).detach()).max() < 2.0
    result = fc.fixup_phase(agent, obs, old_params, theta_old, beta, 0.5, 256, 3e-4, 100)
    assert not result.fallback and 0 < result.grad_steps <= 50 and result.kl_max <= 0.5


def test_no_step_when_already_inside():
    agent, obs, old_params, theta_old, beta = setup()
    perturb_noise(agent, 1e-4)
    before = [p.detach().clone() for p in agent.parameters()]
    result = fc.fixup_phase(agent, obs, old_params, theta_old, beta, 0.2, 256, 3e-4, 100)
    assert result.grad_steps == 0 and result.passes == 0 and not result.fallback
    assert all(torch.equal(a, b) for a, b in zip(before, agent.parameters()))


def test_fixup_moves_only_the_actor_and_raises_beta():
    agent, obs, old_params, theta_old, beta = setup()
    critic_before = [p.detach().clone() for p in agent.critic.parameters()]
    perturb_noise(agent, 0.3)
    result = fc.fixup_phase(agent, obs, old_params, theta_old, beta, 0.2, 256, 3e-4, 20)
    assert result.grad_steps > 0
    assert all(torch.equal(a, b) for a, b in zip(critic_before, agent.critic.parameters()))
    assert float(beta) > 1.0  # every fixup step sees c_beta * max KL > eps_kl


def test_terminates_with_tiny_learning_rate_via_last_resort():
    """Adversarial: a violation far too large for the steps allowed. Bounded passes, then backtracking."""
    agent, obs, old_params, theta_old, beta = setup()
    perturb_noise(agent, 1.0)
    result = fc.fixup_phase(agent, obs, old_params, theta_old, beta, 0.01, 256, lr=1e-12, max_passes=5)
    assert result.fallback and result.passes == 5
    after = independent_gaussian_kl(old_params, agent.dist_params(obs).detach())
    assert after.max().item() <= 0.01 * (1 + 1e-5)


def test_last_resort_survives_nan_parameters():
    agent, obs, old_params, theta_old, beta = setup()
    with torch.no_grad():
        agent.actor_mean[0].weight[0, 0] = float("nan")
    result = fc.fixup_phase(agent, obs, old_params, theta_old, beta, 0.2, 256, 3e-4, max_passes=3)
    assert result.fallback
    after = independent_gaussian_kl(old_params, agent.dist_params(obs).detach())
    assert torch.isfinite(after).all() and after.max().item() <= 0.2


def test_backtrack_keeps_as_much_of_the_step_as_allowed():
    agent, obs, old_params, theta_old, beta = setup()
    perturb_noise(agent, 0.2)
    kl_max = fc.backtrack_toward_old(agent, obs, old_params, theta_old, 0.05)
    assert 0 < kl_max <= 0.05  # stopped at some alpha > 0, not at theta_old


def test_zero_beta_still_terminates():
    """Late in training beta can reach 0, making the first KL-only step a no-op; L_beta then raises it."""
    agent, obs, old_params, theta_old, beta = setup(init_beta=0.0)
    perturb_noise(agent, 0.1)
    result = fc.fixup_phase(agent, obs, old_params, theta_old, beta, 0.05, 256, 3e-4, 20)
    assert result.kl_max <= 0.05 and float(beta) > 0


def test_kl_per_state_matches_closed_form_and_is_zero_at_old():
    torch.manual_seed(1)
    a, b = torch.randn(64, 2 * ACT_DIM), torch.randn(64, 2 * ACT_DIM)
    assert torch.allclose(fc.kl_per_state(a, b).double(), independent_gaussian_kl(a, b), rtol=1e-5, atol=1e-6)
    assert torch.equal(fc.kl_per_state(a, a), torch.zeros(64))


def test_beta_moves_like_a_lagrange_multiplier_and_stays_clamped():
    beta = fc.Beta(1.0, 0.1, eps_kl=0.2, c_beta=3.0, beta_max=1.2)
    beta.step(torch.tensor([0.02, 0.1]))  # per-state KL, max 0.1: c_beta * 0.1 > 0.2, violated -> raise
    assert float(beta) > 1.0
    for _ in range(50):
        beta.step(torch.tensor([0.5]))
    assert float(beta) == pytest.approx(1.2)
    for _ in range(100):
        beta.step(torch.zeros(4))  # far inside -> lower, never below 0
    assert float(beta) == 0.0
    assert math.isfinite(float(beta))


def test_shared_primary_optimizer_keeps_the_guarantee_and_its_learning_rate():
    agent, obs, old_params, theta_old, beta = setup(seed=5)
    primary = torch.optim.Adam(agent.parameters(), lr=3e-4, eps=1e-5)
    for _ in range(10):  # give it primary-phase momentum pointing away from theta_old
        primary.zero_grad()
        (-agent.dist_params(obs)[:, :ACT_DIM].sum(-1).mean() + agent.get_value(obs).pow(2).mean()).backward()
        primary.step()
    perturb_noise(agent, 0.05)
    result = fc.fixup_phase(agent, obs, old_params, theta_old, beta, 0.5, 256, 3e-4, 100, optimizer=primary)
    after = independent_gaussian_kl(old_params, agent.dist_params(obs).detach())
    assert after.max().item() <= 0.5 * (1 + 1e-5) and result.kl_max <= 0.5
    assert all(g["lr"] == 3e-4 for g in primary.param_groups)


@pytest.mark.parametrize("minibatch_size", [512, 2048])
def test_captured_single_violator_instance_converges_without_last_resort(minibatch_size):
    """Regression, from a real run (Hopper-v4, 32 minibatches, seed 2, step 247808): 1 of 2046 states at
    KL 0.2044 > 0.2. Judging progress by max KL halved the rate after every pass (one outlier rose once),
    collapsing it to 1e-30 and ending in the last resort after 100 passes; by L_KL it converges."""
    import os

    e = torch.load(os.path.join(os.path.dirname(__file__), "data", "fixup_single_violator.pt"))
    agent = fc.Agent(e["obs"].shape[1], e["old_params"].shape[1] // 2)
    agent.load_state_dict(e["agent"], strict=False)  # the fixture keeps only the actor
    beta = fc.Beta(e["beta"], 0.01, e["eps_kl"], 3.0, 100.0)
    torch.manual_seed(0)
    result = fc.fixup_phase(agent, e["obs"], e["old_params"], e["theta_old"], beta, e["eps_kl"],
                            minibatch_size, e["lr"], e["max_passes"])
    assert not result.fallback and result.passes <= 20
    assert independent_gaussian_kl(e["old_params"], agent.dist_params(e["obs"]).detach()).max() <= e["eps_kl"] * (1 + 1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_captured_instance_with_the_mean_kl_at_its_minimum_converges(seed):
    """Regression, from a real run (Hopper-v4, --init-log-std -1.0, seed 9, step 112640): 3 of 2036 states
    above eps_kl (max 0.42), mean KL 0.011. Steps on the minibatch's mean KL brought the batch's mean to its
    minimum within 10 passes while one state stayed at 0.225; a plateau judged by the mean alone then halved
    the rate every pass, and the run needed the last resort. The excess over eps_kl still fell: counting
    that as progress converges in a few passes (and the excess alone fails the single-violator instance)."""
    import os

    e = torch.load(os.path.join(os.path.dirname(__file__), "data", "fixup_mean_at_minimum.pt"))
    agent = fc.Agent(e["obs"].shape[1], e["old_params"].shape[1] // 2)
    agent.load_state_dict(e["agent"], strict=False)
    beta = fc.Beta(e["beta"], 0.01, e["eps_kl"], 3.0, 100.0)
    torch.manual_seed(seed)
    result = fc.fixup_phase(agent, e["obs"], e["old_params"], e["theta_old"], beta, e["eps_kl"],
                            e["minibatch_size"], e["lr"], e["max_passes"])
    assert not result.fallback and result.passes <= 20
    assert independent_gaussian_kl(e["old_params"], agent.dist_params(e["obs"]).detach()).max() <= e["eps_kl"] * (1 + 1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_captured_instance_with_an_overshoot_then_steady_progress_converges(seed):
    """Regression, from a real run (InvertedDoublePendulum-v5, defaults, seed 1, update 126): one state at
    KL 0.548. The first fixup step brought it to 0.32, the second overshot to 0.41, and every later pass lowered
    both the mean KL and the excess, slowly. Judged against the best pass so far (0.32, and the mean before any
    step), none of them counted as progress: the rate was halved on every pass down to 1e-30 and the run needed
    the last resort, 7 times in that run. Judged against the previous pass, it converges."""
    import os

    e = torch.load(os.path.join(os.path.dirname(__file__), "data", "fixup_overshoot_then_steady.pt"))
    agent = fc.Agent(e["obs"].shape[1], e["old_params"].shape[1] // 2)
    agent.load_state_dict(e["agent"], strict=False)
    beta = fc.Beta(e["beta"], 0.01, e["eps_kl"], 3.0, 100.0)
    torch.manual_seed(seed)
    result = fc.fixup_phase(agent, e["obs"], e["old_params"], e["theta_old"], beta, e["eps_kl"],
                            e["minibatch_size"], e["lr"], e["max_passes"])
    assert not result.fallback and result.passes <= 30
    assert independent_gaussian_kl(e["old_params"], agent.dist_params(e["obs"]).detach()).max() <= e["eps_kl"] * (1 + 1e-5)


def test_captured_instance_with_beta_pinned_at_zero_converges():
    """Regression, from a real run (Hopper-v4, c_beta = 1, seed 1, step 49152): the fixup phase began with
    beta = 0, held there by its Adam's momentum from the primary phase. A step on beta * L_KL then has a
    zero gradient, the plateau rule halved the rate on every pass, and the run needed the last resort;
    a step on L_KL alone (the paper's Algorithm 1) converges in a pass or two."""
    import os

    e = torch.load(os.path.join(os.path.dirname(__file__), "data", "fixup_beta_at_zero.pt"))
    agent = fc.Agent(e["obs"].shape[1], e["old_params"].shape[1] // 2)
    agent.load_state_dict(e["agent"], strict=False)
    beta = fc.Beta(0.5, 0.01, e["eps_kl"], c_beta=1.0, beta_max=100.0)
    for _ in range(200):  # a primary phase far inside the region drives beta to its clamp at 0, with momentum
        beta.step(torch.zeros(4))
    assert float(beta) == 0.0
    torch.manual_seed(0)
    result = fc.fixup_phase(agent, e["obs"], e["old_params"], e["theta_old"], beta, e["eps_kl"],
                            e["minibatch_size"], e["lr"], e["max_passes"])
    assert not result.fallback and result.passes <= 5
    assert independent_gaussian_kl(e["old_params"], agent.dist_params(e["obs"]).detach()).max() <= e["eps_kl"] * (1 + 1e-5)
