"""PPO for continuous actions, as CleanRL's ``ppo_continuous_action`` in the settings the paper's
authors ran (section 7): one environment, rollouts of 2048 steps, 10 epochs of 32 minibatches
(64 samples), GAE (γ 0.99, λ 0.95), clipped surrogate (0.2) with advantages normalized per
minibatch, observation and reward normalization, no learning-rate annealing, no entropy bonus, no
gradient clipping, an unclipped value loss mean((V − R)²) (the authors' ``nn.MSELoss()``, where
CleanRL's one optimizer weighs 0.5·mean((V − R)²) by 0.5), and one optimizer per network.

Any optimizer of ``hsbench.optim`` drives both networks through the shared loop
``opt.zero_grad(); opt.backward(loss); opt.step()``; the actor's loss is ``PPOLoss`` on the
actor's output ``[μ, 2·log_std]``, the critic's ``MSELoss``, so curvature optimizers see
losses they have exact last-layer diagonals for.

Acting uses a NumPy copy of the actor (``NumpyPolicy``); values and the behaviour policy's
log-probabilities are computed in one batched torch forward after each rollout.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from hsbench.losses import PPOLoss, log_prob
from hsbench.rl.training import start_agent


def train(
    env_id: str,
    optimizer: str = "adam",
    lr: float = 3e-4,
    seed: int = 0,
    total_steps: int = 1_000_000,
    *,
    num_steps: int = 2048,
    num_minibatches: int = 32,
    update_epochs: int = 10,
    gamma: float = 0.99,
    gae_lambda: float = 0.95,
    clip: float = 0.2,
    optimizer_options: dict | None = None,
    ctx=None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Train a PPO agent on ``env_id`` for ``total_steps`` environment steps (rounded down to
    whole rollouts of ``num_steps``); returns ``Metrics.as_dict()`` (see ``hsbench.rl.training``).

    ``optimizer`` and ``lr`` (and ``optimizer_options``, e.g. ``{"trust_region": 1e-8}``) make
    one optimizer per network with ε = 1e-5. ``ctx`` is an engine ``RunContext`` (or anything
    with its ``load_checkpoint``/``checkpoint_due``/``save_checkpoint``): the run resumes from its
    checkpoint and saves one after an update when due. ``progress(step)`` is called after every
    update. A non-finite loss or parameter (``FloatingPointError``, e.g. ``hsbench.optim.Diverged``)
    ends the run early with ``diverged_at_step`` set.
    """
    if num_steps % num_minibatches:
        raise ValueError(f"num_steps ({num_steps}) must be a multiple of num_minibatches ({num_minibatches})")
    pg_loss_fn, mse_fn = PPOLoss("gaussian", clip=clip, variance="log"), nn.MSELoss()
    agent = start_agent(env_id, seed, gamma, (pg_loss_fn, mse_fn), optimizer, lr, optimizer_options or {}, ctx)
    env, actor, critic, policy, rng = agent.env, agent.actor, agent.critic, agent.policy, agent.rng
    actor_opt, critic_opt, metrics = agent.actor_opt, agent.critic_opt, agent.metrics

    minibatch_size = num_steps // num_minibatches
    obs = np.zeros((num_steps, env.obs_dim), np.float32)
    actions = np.zeros((num_steps, env.act_dim), np.float32)
    rewards = np.zeros(num_steps)
    dones = np.zeros(num_steps)  # 1 where step t ended its episode: no bootstrapping across it
    clock = metrics.time_s

    while agent.global_step + num_steps <= total_steps:
        # Rollout: act with the NumPy copy of the policy, a ~ N(μ(s), σ²).
        for t in range(num_steps):
            start = time.perf_counter()
            obs[t] = env.obs
            actions[t] = policy.mean(env.obs) + policy.std * rng.standard_normal(env.act_dim)
            middle = time.perf_counter()
            step = env.step(actions[t])
            clock["policy"] += middle - start
            clock["env"] += time.perf_counter() - middle
            rewards[t], dones[t] = step.reward, step.done
            agent.global_step += 1
            if step.episode is not None:
                metrics.episode(agent.global_step, *step.episode)

        start = time.perf_counter()
        b_obs, b_actions = torch.from_numpy(obs), torch.from_numpy(actions)
        with torch.no_grad():
            values = critic(torch.from_numpy(np.vstack([obs, env.obs[None]]))).squeeze(-1).double().numpy()
            b_logprobs = log_prob(actor(b_obs), b_actions, "gaussian", "log")

        advantages = gae(rewards, values, dones, gamma, gae_lambda)
        b_advantages = torch.from_numpy(advantages).float()
        b_returns = torch.from_numpy(advantages + values[:-1]).float()

        # Optimize the clipped surrogate and the value loss, each network with its own optimizer.
        try:
            for _ in range(update_epochs):
                order = torch.from_numpy(rng.permutation(num_steps))
                for mb in order.split(minibatch_size):
                    pg_loss, v_loss = losses(
                        actor, critic, pg_loss_fn, mse_fn,
                        b_obs[mb], b_actions[mb], b_logprobs[mb], b_advantages[mb], b_returns[mb],
                    )  # fmt: skip
                    actor_opt.zero_grad()
                    actor_opt.backward(pg_loss)
                    actor_opt.step()
                    critic_opt.zero_grad()
                    critic_opt.backward(v_loss)
                    critic_opt.step()
                    metrics.add_eta(actor_opt, critic_opt)
            metrics.record_eta(agent.global_step)
            policy.load(actor)
        except FloatingPointError as error:
            return agent.diverged(error)
        finally:
            clock["update"] += time.perf_counter() - start

        if progress is not None:
            progress(agent.global_step)
        if ctx is not None and ctx.checkpoint_due():
            ctx.save_checkpoint(agent.state_dict())
    return metrics.as_dict()


def gae(rewards: np.ndarray, values: np.ndarray, dones: np.ndarray, gamma: float, gae_lambda: float) -> np.ndarray:
    """Generalized advantage estimates A_t, shape (T,), of a rollout of T steps.

    ``rewards`` (T,); ``values`` (T + 1,), V(s_t) and last the value of the observation after the
    rollout; ``dones`` (T,), 1 where step t ended its episode (no bootstrapping across it)::

        δ_t = r_t + γ V(s_{t+1}) (1 − done_t) − V(s_t),   A_t = δ_t + γ λ (1 − done_t) A_{t+1}
    """
    advantages = np.zeros(len(rewards))
    last = 0.0
    for t in reversed(range(len(rewards))):
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * values[t + 1] * nonterminal - values[t]
        advantages[t] = last = delta + gamma * gae_lambda * nonterminal * last
    return advantages


def losses(
    actor: nn.Module,
    critic: nn.Module,
    pg_loss_fn: PPOLoss,
    mse_fn: nn.MSELoss,
    obs: torch.Tensor,
    actions: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The minibatch's clipped surrogate and value loss: obs (B, obs_dim), actions (B, act_dim),
    old log-probabilities, advantages and returns (B,). Advantages are normalized over the
    minibatch, (A − mean) / (std + 1e-8) with the unbiased std; the value loss is mean((V − R)²)
    (the critic has its own optimizer: a factor would only rescale its loss, which changes the
    step-size scaling's η by the factor's inverse square root)."""
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss = pg_loss_fn(actor(obs), (actions, advantages, old_logprobs))
    v_loss = mse_fn(critic(obs), returns[:, None])
    return pg_loss, v_loss
