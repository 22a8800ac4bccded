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
* ``Agent`` (built by ``start_agent``): environment, networks, optimizers, acting policy, random
  generator, metrics and step; its ``state_dict`` is the checkpoint for
  ``RunContext.save_checkpoint`` / ``load_checkpoint``, its ``diverged`` the metrics of a run
  ended by a non-finite value.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from hsbench import optim
from hsbench.curvature import extend
from hsbench.rl import networks
from hsbench.rl.env import NormalizedEnv
from hsbench.rl.networks import NumpyPolicy

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


@dataclass
class Agent:
    """What PPO and A2C train: the environment, actor and critic with one optimizer each, the NumPy
    copy of the actor that acts, the random generator, the metrics and the global step.

    ``start_agent`` builds one, restored from the run context's checkpoint if there is one."""

    env: NormalizedEnv
    actor: nn.Sequential
    critic: nn.Sequential
    actor_opt: optim.Optimizer
    critic_opt: optim.Optimizer
    policy: NumpyPolicy
    rng: np.random.Generator
    metrics: Metrics
    global_step: int = 0

    def state_dict(self) -> dict:
        """A checkpoint (deep copies: later training leaves it unchanged)."""
        return copy.deepcopy(
            {
                "step": self.global_step,
                "env": self.env.state_dict(),
                "networks": {"actor": self.actor.state_dict(), "critic": self.critic.state_dict()},
                "optimizers": {"actor": self.actor_opt.state_dict(), "critic": self.critic_opt.state_dict()},
                "numpy_rng": self.rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "metrics": self.metrics.as_dict(),
            }
        )

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict`` checkpoint, the acting policy included."""
        self.env.load_state_dict(state["env"])
        self.actor.load_state_dict(state["networks"]["actor"])
        self.critic.load_state_dict(state["networks"]["critic"])
        self.actor_opt.load_state_dict(state["optimizers"]["actor"])
        self.critic_opt.load_state_dict(state["optimizers"]["critic"])
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        self.global_step, self.metrics = state["step"], Metrics(**state["metrics"])
        self.policy.load(self.actor)

    def diverged(self, error: FloatingPointError) -> dict:
        """The metrics of a run ended by a non-finite loss or parameter at the current step."""
        self.metrics.diverged_at_step, self.metrics.diverged = self.global_step, str(error) or type(error).__name__
        self.metrics.record_eta(self.global_step)
        return self.metrics.as_dict()


def start_agent(
    env_id: str,
    seed: int,
    gamma: float,
    losses: tuple[nn.Module, nn.Module],
    optimizer: str,
    lr: float,
    options: dict,
    ctx,
    time_feature: bool = False,
    init: str = "cleanrl",
) -> Agent:
    """Seed, build the environment (``NormalizedEnv``, ``time_feature``) and the 2x64 tanh actor
    and critic (``networks``, ``init``) with one optimizer each, on the actor's and the critic's
    loss module in ``losses``, and resume from ``ctx``'s checkpoint if any."""
    torch.manual_seed(seed)
    env = NormalizedEnv(env_id, seed, gamma, time_feature)
    actor, critic = networks.actor(env.obs_dim, env.act_dim, init), networks.critic(env.obs_dim, init)
    agent = Agent(
        env=env,
        actor=actor,
        critic=critic,
        actor_opt=make_optimizer(optimizer, actor, losses[0], lr, **options),
        critic_opt=make_optimizer(optimizer, critic, losses[1], lr, **options),
        policy=NumpyPolicy(actor),
        rng=np.random.default_rng(seed),
        metrics=Metrics(),
    )
    state = ctx.load_checkpoint() if ctx is not None else None
    if state is not None:
        agent.load_state_dict(state)
    return agent
