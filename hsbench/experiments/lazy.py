"""The modules the experiment kinds use, bound once, each imported on its first attribute access.

A kind module imports its heavy modules from here (``from hsbench.experiments.lazy import np,
torch``) and uses them qualified (``torch.zeros``, ``optim.make``); a type checker sees the real
modules. Importing this module loads none of them (``hsbench.engine.kind``, ``tests/test_cli_speed.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hsbench.engine.kind import LazyModule

__all__ = [
    "F",
    "a2c",
    "activations",
    "colors",
    "curvature",
    "figure",
    "nn",
    "np",
    "optim",
    "pd",
    "ppo",
    "problems",
    "timing",
    "torch",
]

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch
    import torch.nn.functional as F
    from matplotlib import colors, figure
    from torch import nn

    from hsbench import activations, curvature, optim, problems, timing
    from hsbench.rl import a2c, ppo
else:
    np = LazyModule("numpy")
    pd = LazyModule("pandas")
    torch = LazyModule("torch")
    F = LazyModule("torch.nn.functional")
    nn = LazyModule("torch.nn")
    colors = LazyModule("matplotlib.colors")
    figure = LazyModule("matplotlib.figure")
    activations = LazyModule("hsbench.activations")
    curvature = LazyModule("hsbench.curvature")
    optim = LazyModule("hsbench.optim")
    problems = LazyModule("hsbench.problems")
    timing = LazyModule("hsbench.timing")
    a2c = LazyModule("hsbench.rl.a2c")
    ppo = LazyModule("hsbench.rl.ppo")
