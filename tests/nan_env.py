"""A test environment: Pendulum-v1 whose observation turns NaN after FIXPO_TEST_NAN_AT steps of each env.

Used as `--env-id nan_env:NanPendulum-v0` with tests/ on PYTHONPATH (gymnasium imports the module first)."""
import os

import gymnasium as gym
import numpy as np


class NanAfter(gym.Wrapper):
    def __init__(self, env, at):
        super().__init__(env)
        self.at, self.steps = at, 0

    def step(self, action):
        obs, reward, term, trunc, info = self.env.step(action)
        self.steps += 1
        if self.steps >= self.at:
            obs = np.full_like(obs, np.nan)
        return obs, reward, term, trunc, info


def make_nan_pendulum(**kwargs):
    return NanAfter(gym.make("Pendulum-v1", **kwargs), int(os.environ.get("FIXPO_TEST_NAN_AT", "1000000")))


gym.register("NanPendulum-v0", entry_point=make_nan_pendulum, max_episode_steps=200)
