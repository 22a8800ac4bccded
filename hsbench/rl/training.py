"""What PPO and A2C share around their update rule: optimizers, metrics, checkpoints, divergence.

* ``make_optimizer``: ``hsbench.optim.make`` on one network, with the network and its loss
  registered for curvature backpropagation when the optimizer needs the recorded forward pass.
* ``Metrics``: the JSON-serialisable record of a run (``as_dict``):
  ``episode_steps`` / ``episode_returns`` / ``episode_lengths`` (global environment step at
  which each episode ended, its undiscounted raw return, its length); ``eta_steps`` /
  ``eta_actor`` / ``eta_critic`` (η = ``opt.last_scale`` of step-size-scaled optimizers,
  averaged over the optimizer steps between two records, recorded with the global step at the
  record: per rollout for PPO, per 2048 environment steps for A2C; empty lists for the other
  optimizers); ``time_s`` (seconds in ``env`` steps, the
  ``policy`` acting, and ``update``: values, advantages and the optimizer steps);
  ``diverged_at_step`` (global step of the update that diverged, else None) and ``diverged``
  (its message).
* ``save_state`` / ``load_state``: a checkpoint holding environment, networks, optimizers,
  random generators and metrics, for ``RunContext.save_checkpoint`` / ``load_checkpoint``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from hsbench import optim
from hsbench.curvature import extend
from hsbench.rl.env import NormalizedEnv

DEFAULT_EPS = 1e-5  # Adam's ε in CleanRL and the paper's RL runs
DEFAULT_TRUST_REGION = 1e-8  # Δ of the scaled optimizers (paper, section 7.2)


def make_optimizer(name: str, network: nn.Module, loss_fn: nn.Module, lr: float, **hyper) -> optim.Optimizer:
    """``hsbench.optim.make(name, network.parameters(), lr=lr, eps=1e-5, **hyper)`` (Δ = 1e-8 for
    the scaled optimizers unless given), registering ``network`` and ``loss_fn`` with
    ``hsbench.curvature.extend`` if the optimizer backpropagates curvature."""
    hyper.setdefault("eps", DEFAULT_EPS)
    if name.startswith("scaled-"):
        hyper.setdefault("trust_region", DEFAULT_TRUST_REGION)
    opt = optim.make(name, network.parameters(), lr=lr, **hyper)
    if opt.needs_recording:
        extend(network)
        extend(loss_fn)
    return opt


def step_scale(opt: optim.Optimizer) -> float | None:
    """η of the optimizer's last step if it scales its steps (Algorithm 3), else None."""
    return opt.last_scale if isinstance(opt, optim.DiagonalAdam) and opt.trust_region is not None else None


@dataclass
class Metrics:
    episode_steps: list[int] = field(default_factory=list)
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    eta_steps: list[int] = field(default_factory=list)
    eta_actor: list[float] = field(default_factory=list)
    eta_critic: list[float] = field(default_factory=list)
    time_s: dict[str, float] = field(default_factory=lambda: {"env": 0.0, "policy": 0.0, "update": 0.0})
    diverged_at_step: int | None = None
    diverged: str | None = None

    def episode(self, step: int, episode_return: float, length: int) -> None:
        self.episode_steps.append(step)
        self.episode_returns.append(episode_return)
        self.episode_lengths.append(length)

    def __post_init__(self) -> None:
        self._eta_sums: list[float] = [0.0, 0.0, 0.0]  # count, actor, critic since the last record

    def add_eta(self, actor_opt: optim.Optimizer, critic_opt: optim.Optimizer) -> None:
        """Accumulate η of both optimizers' last steps (nothing for unscaled optimizers)."""
        actor, critic = step_scale(actor_opt), step_scale(critic_opt)
        if actor is not None and critic is not None:
            self._eta_sums = [self._eta_sums[0] + 1, self._eta_sums[1] + actor, self._eta_sums[2] + critic]

    def record_eta(self, step: int) -> None:
        """Record the mean η accumulated since the last record at global step ``step``."""
        count, actor, critic = self._eta_sums
        if count:
            self.eta_steps.append(step)
            self.eta_actor.append(actor / count)
            self.eta_critic.append(critic / count)
        self._eta_sums = [0.0, 0.0, 0.0]

    def as_dict(self) -> dict:
        """The record (JSON-serialisable); η accumulated since the last ``record_eta`` is not in it."""
        return asdict(self)


def save_state(
    step: int,
    env: NormalizedEnv,
    networks: Mapping[str, nn.Module],
    optimizers: Mapping[str, optim.Optimizer],
    rng: np.random.Generator,
    metrics: Metrics,
) -> dict:
    """A checkpoint after ``step`` environment steps (deep copies: later training leaves it unchanged)."""
    return copy.deepcopy(
        {
            "step": step,
            "env": env.state_dict(),
            "networks": {name: net.state_dict() for name, net in networks.items()},
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "metrics": metrics.as_dict(),
        }
    )


def load_state(
    state: dict,
    env: NormalizedEnv,
    networks: Mapping[str, nn.Module],
    optimizers: Mapping[str, optim.Optimizer],
    rng: np.random.Generator,
) -> tuple[int, Metrics]:
    """Restore a ``save_state`` checkpoint into the given objects; returns its step and metrics."""
    env.load_state_dict(state["env"])
    for name, net in networks.items():
        net.load_state_dict(state["networks"][name])
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    return state["step"], Metrics(**state["metrics"])
