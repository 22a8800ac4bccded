"""One gymnasium MuJoCo environment with CleanRL's wrappers, as one object whose state can be saved.

``NormalizedEnv(env_id, seed, gamma)`` does what CleanRL's ``make_env`` stack does for
``ppo_continuous_action`` (RecordEpisodeStatistics, ClipAction, NormalizeObservation, clip to
±10, NormalizeReward, clip to ±10, gymnasium 1.x semantics), plus the episode's time limit and an
immediate reset at the end of an episode, written out so that ``state_dict()`` holds everything
a resumed run needs to continue bit for bit: the complete MuJoCo ``MjData``, the environment's
random generator, the episode in progress and the normalizers' statistics. ``time_feature=True``
adds the authors' A2C observation entry, the episode's elapsed time (``NormalizedEnv``).

Conventions: observations handed to the agent are float32 of shape (obs_dim,), normalized by the
running statistics *including* the observation itself (gymnasium updates before normalizing);
rewards handed to the agent are r / √(Var[G] + 1e-8) clipped to ±10, G the discounted sum
G ← γ G (1 − terminated) + r of raw rewards; episode returns are undiscounted sums of raw rewards.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium.envs.mujoco import MujocoEnv

CLIP = 10.0
EPSILON = 1e-8  # under the square root of both normalizers, as gymnasium's


class RunningMeanStd:
    """Running mean and (population) variance of a stream of samples of one shape (() for
    scalars, kept as Python floats), merged one sample at a time with Chan et al.'s parallel
    formula; starts from mean 0, variance 1 and a pseudo-count of 1e-4, as gymnasium's
    ``RunningMeanStd``. Statistics are float64."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.mean: np.ndarray | float = np.zeros(shape) if shape else 0.0
        self.var: np.ndarray | float = np.ones(shape) if shape else 1.0
        self.count = 1e-4

    def update(self, x: np.ndarray | float) -> None:
        """Merge one sample ``x`` (a batch of one: batch mean x, batch variance 0)."""
        delta = x - self.mean
        total = self.count + 1
        self.mean = self.mean + delta / total
        self.var = (self.var * self.count + delta * delta * self.count / total) / total
        self.count = total

    def state_dict(self) -> dict:
        return {"mean": np.copy(self.mean), "var": np.copy(self.var), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        mean, var = state["mean"], state["var"]
        self.mean, self.var = (mean.copy(), var.copy()) if mean.shape else (float(mean), float(var))
        self.count = state["count"]


@dataclass
class Step:
    """What ``NormalizedEnv.step`` returns. ``obs`` is the next observation the agent acts on
    (the first of a new episode when ``done``, the step ended an episode: terminated, or truncated
    by the time limit); ``episode`` is then (undiscounted raw return, length) of that episode."""

    obs: np.ndarray
    reward: float
    terminated: bool
    done: bool = False
    episode: tuple[float, int] | None = None


class NormalizedEnv:
    """``env_id`` (a gymnasium MuJoCo task such as "Hopper-v5") seeded with ``seed``, with
    normalized observations and rewards (``gamma`` is the reward normalizer's discount).

    ``time_feature``: each observation gets one more entry before it is normalized, the episode's
    elapsed time as the authors' A2C runs added it (their ``AddTimeInfo`` wrapper): −0.5 at a
    reset and after the first step, then 1 / (time limit) more after each further step."""

    def __init__(self, env_id: str, seed: int, gamma: float = 0.99, time_feature: bool = False):
        try:
            spec = gym.spec(env_id)
        except gym.error.Error as error:
            raise ValueError(f"unknown environment {env_id!r}: {error}") from None
        env = gym.make(env_id).unwrapped  # time limit and statistics are kept here
        if not isinstance(env, MujocoEnv) or spec.max_episode_steps is None:
            raise ValueError(f"{env_id} is not a MuJoCo environment with a time limit")
        assert isinstance(env.observation_space, gym.spaces.Box) and isinstance(env.action_space, gym.spaces.Box)
        self.env: MujocoEnv = env
        self.max_episode_steps: int = spec.max_episode_steps
        self.time_feature = time_feature
        self.obs_dim, self.act_dim = env.observation_space.shape[0] + time_feature, env.action_space.shape[0]
        self.action_low, self.action_high = env.action_space.low, env.action_space.high
        self.gamma = gamma
        self.obs_rms = RunningMeanStd((self.obs_dim,))
        self.return_rms = RunningMeanStd(())
        self.discounted_return = 0.0
        self.episode_return, self.episode_length = 0.0, 0
        self.obs = self._normalize_obs(self.env.reset(seed=seed)[0])

    def _normalize_obs(self, obs: np.ndarray) -> np.ndarray:
        if self.time_feature:  # episode_length: the steps taken in this episode so far
            obs = np.append(obs, -0.5 + max(self.episode_length - 1, 0) / self.max_episode_steps)
        self.obs_rms.update(obs)
        normalized = (obs - self.obs_rms.mean) / np.sqrt(self.obs_rms.var + EPSILON)
        return np.clip(normalized, -CLIP, CLIP).astype(np.float32)

    def _normalize_reward(self, reward: float, terminated: bool) -> float:
        self.discounted_return = self.discounted_return * self.gamma * (1 - terminated) + reward
        self.return_rms.update(self.discounted_return)
        return min(max(reward / math.sqrt(self.return_rms.var + EPSILON), -CLIP), CLIP)

    def step(self, action: np.ndarray) -> Step:
        """Apply ``action`` (shape (act_dim,), clipped to the action space); reset at an episode's end."""
        obs, reward, terminated, _, _ = self.env.step(np.clip(action, self.action_low, self.action_high))
        self.episode_return += float(reward)
        self.episode_length += 1
        truncated = self.episode_length >= self.max_episode_steps
        step = Step(self._normalize_obs(obs), self._normalize_reward(float(reward), terminated), terminated)
        if terminated or truncated:
            step.done, step.episode = True, (self.episode_return, self.episode_length)
            self.episode_return, self.episode_length = 0.0, 0
            step.obs = self._normalize_obs(self.env.reset()[0])
        self.obs = step.obs
        return step

    def state_dict(self) -> dict:
        """Everything that determines the rest of the run (picklable; MjData as bytes)."""
        return {
            "mjdata": pickle.dumps(self.env.data),
            "np_random": self.env.np_random.bit_generator.state,
            "obs_rms": self.obs_rms.state_dict(),
            "return_rms": self.return_rms.state_dict(),
            "discounted_return": self.discounted_return,
            "episode": (self.episode_return, self.episode_length),
            "obs": self.obs.copy(),
        }

    def load_state_dict(self, state: dict) -> None:
        mujoco.mj_copyData(self.env.data, self.env.model, pickle.loads(state["mjdata"]))
        self.env.np_random.bit_generator.state = state["np_random"]
        self.obs_rms.load_state_dict(state["obs_rms"])
        self.return_rms.load_state_dict(state["return_rms"])
        self.discounted_return = state["discounted_return"]
        self.episode_return, self.episode_length = state["episode"]
        self.obs = state["obs"].copy()
