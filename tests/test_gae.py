"""compute_gae against hand-computed values: plain, termination, truncation, vector resets."""
import numpy as np
import pytest
import torch

import fixpo_continuous as fc

G, L = 0.9, 0.8  # gamma, lambda: gamma * lambda = 0.72
REWARDS = [1.0, 2.0, 3.0]
VALUES = [0.5, 1.0, 1.5]
NEXT_VALUE = 2.0


def run(terms, dones, valids, rewards=REWARDS, values=VALUES, next_value=NEXT_VALUE):
    col = lambda x: torch.tensor(x, dtype=torch.float64).reshape(-1, 1)
    adv, ret = fc.compute_gae(col(rewards), col(values), torch.tensor([next_value], dtype=torch.float64),
                              col(terms), col(dones), col(valids), G, L)
    return adv.flatten().tolist(), ret.flatten().tolist()


def test_no_episode_end():
    # deltas: d2 = 3 + .9*2 - 1.5 = 3.3; d1 = 2 + .9*1.5 - 1 = 2.35; d0 = 1 + .9*1 - .5 = 1.4
    # A2 = 3.3; A1 = 2.35 + .72*3.3 = 4.726; A0 = 1.4 + .72*4.726 = 4.80272
    adv, ret = run([0, 0, 0], [0, 0, 0], [1, 1, 1])
    assert adv == pytest.approx([4.80272, 4.726, 3.3])
    assert ret == pytest.approx([4.80272 + 0.5, 4.726 + 1.0, 3.3 + 1.5])


def test_termination_does_not_bootstrap():
    # env terminates at t=1; t=2 is the autoreset step (obs[2] = final obs, but the episode has no future)
    # d1 = 2 + 0 - 1 = 1.0 -> A1 = 1.0; A2 = 0 (fake transition); A0 = 1.4 + .72*1.0 = 2.12
    adv, _ = run([0, 1, 0], [0, 1, 0], [1, 1, 0])
    assert adv == pytest.approx([2.12, 1.0, 0.0])


def test_truncation_bootstraps_from_the_final_observation():
    # truncated at t=1: values[2] = V(final obs) = 1.5 bootstraps; d1 = 2 + .9*1.5 - 1 = 2.35
    # A1 = 2.35 (no recursion through the reset); A2 = 0; A0 = 1.4 + .72*2.35 = 3.092
    adv, _ = run([0, 0, 0], [0, 1, 0], [1, 1, 0])
    assert adv == pytest.approx([3.092, 2.35, 0.0])


def test_episode_ending_on_the_last_step_of_the_rollout():
    # done at t=2 (truncation): next_value = V(final obs) = 2.0 bootstraps; no autoreset step inside this rollout
    adv, _ = run([0, 0, 0], [0, 0, 1], [1, 1, 1])
    assert adv == pytest.approx([4.80272, 4.726, 3.3])
    adv, _ = run([0, 0, 1], [0, 0, 1], [1, 1, 1])  # the same as a termination: d2 = 3 - 1.5 = 1.5
    assert adv == pytest.approx([1.4 + 0.72 * (2.35 + 0.72 * 1.5), 2.35 + 0.72 * 1.5, 1.5])


def test_autoreset_step_at_the_start_of_a_rollout_is_masked():
    # the previous rollout ended with a done: this rollout's t=0 is the autoreset transition
    adv, _ = run([0, 0, 0], [0, 0, 0], [0, 1, 1])
    assert adv == pytest.approx([0.0, 4.726, 3.3])


def test_vector_envs_are_independent():
    # three envs side by side: plain, terminated at t=1, truncated at t=1
    cols = lambda *xs: torch.tensor(list(zip(*xs)), dtype=torch.float64)
    r, v = cols(REWARDS, REWARDS, REWARDS), cols(VALUES, VALUES, VALUES)
    terms = cols([0, 0, 0], [0, 1, 0], [0, 0, 0])
    dones = cols([0, 0, 0], [0, 1, 0], [0, 1, 0])
    valids = cols([1, 1, 1], [1, 1, 0], [1, 1, 0])
    adv, ret = fc.compute_gae(r, v, torch.full((3,), NEXT_VALUE, dtype=torch.float64), terms, dones, valids, G, L)
    assert adv[:, 0].tolist() == pytest.approx([4.80272, 4.726, 3.3])
    assert adv[:, 1].tolist() == pytest.approx([2.12, 1.0, 0.0])
    assert adv[:, 2].tolist() == pytest.approx([3.092, 2.35, 0.0])
    assert torch.allclose(ret, adv + v)


def test_wrapped_envs_follow_next_step_autoreset():
    """What compute_gae assumes of make_envs: after a done comes one step with reward 0 and no done, whose
    observation is a reset one; and the done step's observation is the real final one (not a reset obs)."""
    import gymnasium as gym

    envs = fc.make_envs("Hopper-v4", 2, 0.99)
    assert envs.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    prev_done, checked = np.zeros(2, bool), 0
    for _ in range(300):
        _, r, term, trunc, _ = envs.step(rng.uniform(-1, 1, (2, 3)) * 3)  # violent actions: Hopper falls fast
        assert np.all(r[prev_done] == 0) and not np.any((term | trunc)[prev_done])
        checked += prev_done.sum()
        prev_done = term | trunc
    envs.close()
    assert checked >= 3
