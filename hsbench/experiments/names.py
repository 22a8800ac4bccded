"""The names the kinds' fields accept from registries that import torch, as plain strings.

Declaring a kind imports no torch (``hsbench.engine.kind``), so a field cannot take its choices from
``hsbench.optim.OPTIMIZERS`` and the like; it takes them from here. Each tuple lists the keys of the
registry in its comment, in the same order (``tests/test_cli_speed.py`` checks that they are equal).
"""

ACTIVATIONS = ("relu", "elu", "tanh", "sigmoid")  # hsbench.activations.ACTIVATIONS
OPTIMIZERS = (  # hsbench.optim.OPTIMIZERS
    "adahesscale", "adahesscale-gn", "adabl89", "adaggnmc", "adahessian", "adam", "sgd",
    "scaled-adahesscale", "scaled-adam",
)  # fmt: skip
PROBLEMS = (  # hsbench.problems.PROBLEMS
    "cifar100_3c3d", "cifar100_allcnnc", "cifar10_3c3d", "mnist_mlp", "embedded_mnist_mlp",
)  # fmt: skip
CLOCKS = ("wall", "cpu")  # hsbench.timing.CLOCKS
