"""A2C for continuous actions with n-step returns, as the paper's authors ran it (section 7): one
environment with observation and reward normalization (the same wrappers as PPO), an update of
actor and critic after every 5 steps or at the end of an episode, whichever comes first, with

    R_t = r_t + γ r_{t+1} + … + γ^{k−1} r_{t+k−1} + γ^k V(s_{t+k}) (no bootstrap if the episode ended),
    A_t = R_t − V(s_t) (not normalized),
    actor loss  mean_t −A_t log π(a_t | s_t)        (``PolicyGradientLoss``),
    critic loss mean_t (V(s_t) − R_t)²                (``MSELoss``, the authors' plain MSE),

γ 0.99, no entropy bonus, no gradient clipping, one optimizer per network. Values are those of the
critic before the update. As in the authors' A2C runs (not CleanRL's PPO settings): the networks
keep ``nn.Linear``'s initialization (``networks``, ``init="torch"``), and each observation carries
the episode's elapsed time (``NormalizedEnv``, ``time_feature``). The policy is PPO's Gaussian
actor (state-independent log-std; the authors' runs used a separate variance network).

Acting uses a NumPy copy of the actor (``NumpyPolicy``), refreshed after every update.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from hsbench.losses import PolicyGradientLoss
from hsbench.rl.training import start_agent


def train(
    env_id: str,
    optimizer: str = "adam",
    lr: float = 3e-4,
    seed: int = 0,
    total_steps: int = 1_000_000,
    *,
    n_steps: int = 5,
    gamma: float = 0.99,
    record_every: int = 2048,
    optimizer_options: dict | None = None,
    ctx=None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Train an A2C agent on ``env_id`` for ``total_steps`` environment steps; returns
    ``Metrics.as_dict()`` (see ``hsbench.rl.training``).

    ``optimizer``, ``lr``, ``optimizer_options``, ``ctx`` and ``progress`` as in
    ``hsbench.rl.ppo.train``. Every ``record_every`` environment steps (at the first update
    after), η averaged since the last record is recorded, ``progress`` is called and a checkpoint
    is saved if due. A non-finite loss or parameter ends the run early with ``diverged_at_step`` set.
    """
    if n_steps < 1 or record_every < 1:
        raise ValueError(f"n_steps and record_every must be positive; got {n_steps} and {record_every}")
    pg_loss_fn, mse_fn = PolicyGradientLoss("gaussian", variance="log"), nn.MSELoss()
    losses, options = (pg_loss_fn, mse_fn), optimizer_options or {}
    agent = start_agent(env_id, seed, gamma, losses, optimizer, lr, options, ctx, time_feature=True, init="torch")
    env, actor, critic, policy, rng = agent.env, agent.actor, agent.critic, agent.policy, agent.rng
    actor_opt, critic_opt, metrics = agent.actor_opt, agent.critic_opt, agent.metrics

    obs = np.zeros((n_steps + 1, env.obs_dim), np.float32)  # the segment's observations, then the next one
    actions = np.zeros((n_steps, env.act_dim), np.float32)
    rewards = np.zeros(n_steps)
    clock = metrics.time_s
    next_record = agent.global_step + record_every

    while agent.global_step < total_steps:
        # Rollout of a segment: up to n_steps, ending early with the episode.
        k, done = 0, False
        while k < n_steps and not done and agent.global_step < total_steps:
            start = time.perf_counter()
            obs[k] = env.obs
            actions[k] = policy.mean(env.obs) + policy.std * rng.standard_normal(env.act_dim)
            middle = time.perf_counter()
            step = env.step(actions[k])
            clock["policy"] += middle - start
            clock["env"] += time.perf_counter() - middle
            rewards[k], done = step.reward, step.done
            agent.global_step += 1
            k += 1
            if step.episode is not None:
                metrics.episode(agent.global_step, *step.episode)
        obs[k] = env.obs  # unused for bootstrapping when the episode ended

        start = time.perf_counter()
        b_obs = torch.from_numpy(obs[: k + 1])
        with torch.no_grad():
            values = critic(b_obs).squeeze(-1).double().numpy()

        # n-step returns, bootstrapped from the value of the next observation unless the episode ended.
        returns = np.zeros(k)
        running = 0.0 if done else values[k]
        for t in reversed(range(k)):
            returns[t] = running = rewards[t] + gamma * running
        b_returns = torch.from_numpy(returns).float()
        b_advantages = torch.from_numpy(returns - values[:k]).float()

        try:
            pg_loss = pg_loss_fn(actor(b_obs[:k]), (torch.from_numpy(actions[:k]), b_advantages))
            actor_opt.zero_grad()
            actor_opt.backward(pg_loss)
            actor_opt.step()

            v_loss = mse_fn(critic(b_obs[:k]), b_returns[:, None])
            critic_opt.zero_grad()
            critic_opt.backward(v_loss)
            critic_opt.step()
            metrics.add_eta(actor_opt, critic_opt)
            policy.load(actor)
        except FloatingPointError as error:
            return agent.diverged(error)
        finally:
            clock["update"] += time.perf_counter() - start

        if agent.global_step >= next_record or agent.global_step >= total_steps:
            metrics.record_eta(agent.global_step)
            next_record = agent.global_step + record_every
            if progress is not None:
                progress(agent.global_step)
            if ctx is not None and ctx.checkpoint_due():
                ctx.save_checkpoint(agent.state_dict())
    return metrics.as_dict()
