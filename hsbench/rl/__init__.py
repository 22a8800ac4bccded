"""Reinforcement learning on gymnasium's MuJoCo tasks with any optimizer of ``hsbench.optim``.

* ``ppo.train`` and ``a2c.train``: the algorithms, each readable top to bottom in its module;
  both return the metrics described in ``training``.
* ``env``: one environment with CleanRL's observation/reward normalization (for A2C also the
  authors' elapsed-time feature), its state savable.
* ``networks``: 2×64 tanh actor (Gaussian, state-independent log-std) and critic, CleanRL's
  initialization for PPO and ``nn.Linear``'s for A2C (as the authors ran them), and a NumPy copy
  of the actor for acting.
* ``training``: optimizers per network, metrics, checkpoints.

Example::

    from hsbench.rl import ppo

    metrics = ppo.train("Hopper-v5", "scaled-adahesscale", lr=3e-4, seed=0, total_steps=100_000)
    metrics["episode_steps"], metrics["episode_returns"], metrics["eta_actor"]
"""
