"""Actor and critic of CleanRL's continuous-action agents, and a NumPy copy of the actor for rollouts.

* ``actor(obs_dim, act_dim)``: ``Sequential(Linear, Tanh, Linear, Tanh, Linear, GaussianHead)``,
  2×64 tanh; input (N, obs_dim), output ``[μ, 2·log_std]`` of shape (N, 2·act_dim), read by the
  ``variance="log"`` losses of ``hsbench.losses`` as N(μ, diag exp(2·log_std)). ``log_std`` is a
  state-independent parameter (CleanRL's ``actor_logstd``), initialized to 0.
* ``critic(obs_dim)``: ``Sequential(Linear, Tanh, Linear, Tanh, Linear)``, output (N, 1).

Initialization (``init``): ``"cleanrl"``, CleanRL's ``layer_init`` (the authors' PPO): orthogonal
weights with gain √2, the actor's last layer gain 0.01, the critic's 1.0, biases 0; ``"torch"``,
``nn.Linear``'s own (the authors' A2C networks).
``log_std`` starts at 0 with either.

``NumpyPolicy`` holds a float32 NumPy copy of the actor (refreshed with ``load`` after every
update): a 2×64 forward on one observation costs a fraction of torch's per-call overhead.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from hsbench.losses import GaussianHead

HIDDEN = 64


INITS = ("cleanrl", "torch")


def _layer(n_in: int, n_out: int, gain: float, init: str) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)  # nn.Linear's own initialization: "torch"
    if init == "cleanrl":
        nn.init.orthogonal_(layer.weight, gain)
        nn.init.zeros_(layer.bias)
    return layer


def _mlp(n_in: int, n_out: int, last_gain: float, init: str) -> list[nn.Module]:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
    return [
        _layer(n_in, HIDDEN, math.sqrt(2), init),
        nn.Tanh(),
        _layer(HIDDEN, HIDDEN, math.sqrt(2), init),
        nn.Tanh(),
        _layer(HIDDEN, n_out, last_gain, init),
    ]


def actor(obs_dim: int, act_dim: int, init: str = "cleanrl") -> nn.Sequential:
    """The Gaussian policy network (see the module docstring); draws from torch's global generator."""
    return nn.Sequential(*_mlp(obs_dim, act_dim, 0.01, init), GaussianHead(act_dim, init_log_std=0.0))


def critic(obs_dim: int, init: str = "cleanrl") -> nn.Sequential:
    """The state-value network; draws from torch's global generator."""
    return nn.Sequential(*_mlp(obs_dim, 1, 1.0, init))


class NumpyPolicy:
    """The actor's mean network and standard deviation in NumPy, for acting one step at a time.

    ``mean(obs)``: obs (obs_dim,) float32 → μ (act_dim,). ``std``: σ = exp(log_std), (act_dim,)."""

    def __init__(self, actor: nn.Sequential):
        self.load(actor)

    def load(self, actor: nn.Sequential) -> None:
        """Copy the actor's current parameters; ``FloatingPointError`` if any is not finite."""
        linears, head = [m for m in actor if isinstance(m, nn.Linear)], actor[-1]
        assert isinstance(head, GaussianHead)
        with torch.no_grad():
            self.layers = [(m.weight.numpy().T.copy(), m.bias.numpy().copy()) for m in linears]
            self.std = np.exp(head.log_std.numpy().astype(np.float64))
        arrays = [a for layer in self.layers for a in layer] + [self.std]
        if not all(np.isfinite(a).all() for a in arrays):
            raise FloatingPointError("the policy's parameters are not finite")

    def mean(self, obs: np.ndarray) -> np.ndarray:
        (w1, b1), (w2, b2), (w3, b3) = self.layers
        return np.tanh(np.tanh(obs @ w1 + b1) @ w2 + b2) @ w3 + b3
