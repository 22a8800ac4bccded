"""hsbench: scalable Hessian-diagonal approximations (HesScale and baselines), optimizers and experiments."""

__version__ = "0.1.0"
