"""Every task the README names builds, acts and steps through the script's env stack."""
import numpy as np
import pytest
import torch

import fixpo_continuous as fc

TASKS = ["Hopper-v4", "Hopper-v5", "HalfCheetah-v5", "Walker2d-v5", "Swimmer-v5", "InvertedDoublePendulum-v5",
         "Reacher-v5", "Ant-v5", "Humanoid-v5"]


@pytest.mark.parametrize("env_id", TASKS)
def test_task_runs_through_agent_and_env_stack(env_id):
    fc.check_env(env_id)
    envs = fc.make_envs(env_id, 2, 0.99)
    obs, _ = envs.reset(seed=0)
    agent = fc.Agent(envs.single_observation_space.shape[0], envs.single_action_space.shape[0])
    for _ in range(5):
        with torch.no_grad():
            action = fc.make_dist(agent.dist_params(torch.as_tensor(obs, dtype=torch.float32))).sample()
        obs, reward, term, trunc, _ = envs.step(action.numpy())
        assert obs.shape == (2,) + envs.single_observation_space.shape and np.all(np.abs(obs) <= 10)
    envs.close()
