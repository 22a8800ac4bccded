"""The DeepOBS networks (3C3D, ALL-CNN-C, MLP) as flat ``nn.Sequential``s of standard modules.

DeepOBS's PyTorch version pads "same" convolutions and pools with a ``ZeroPad2d`` whose padding
a forward pre-hook computes from the input size, TensorFlow-style (the extra row and column
go bottom / right). Our inputs have fixed sizes, so the padding is computed once, when the
network is built, and the result is a plain ``ZeroPad2d``: same function, no hooks, and every
module is one the curvature core supports. As in DeepOBS's PyTorch code, max pools are padded
with zeros (TensorFlow pads them with -inf; the two agree after a ReLU, not after ELU or tanh).

Inputs are (N, C, H, W) images; outputs are (N, classes) logits. Initialisation follows
DeepOBS and draws from torch's global generator (seed it first for reproducible weights).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from itertools import pairwise

from torch import nn

from hsbench.activations import ACTIVATIONS


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same" padding (before, after) of one spatial axis of length ``size``."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _Builder:
    """Appends named layers to an ordered dict while tracking the square feature-map side."""

    def __init__(self, side: int, activation: str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
        self.side, self.activation = side, ACTIVATIONS[activation]
        self.layers: OrderedDict[str, nn.Module] = OrderedDict()

    def add(self, name: str, module: nn.Module) -> None:
        self.layers[name] = module

    def pad_same(self, name: str, kernel: int, stride: int) -> None:
        before, after = same_padding(self.side, kernel, stride)
        if before or after:
            self.add(name, nn.ZeroPad2d((before, after, before, after)))
            self.side += before + after

    def conv(self, i: int, channels: tuple[int, int], kernel: int, stride: int = 1, same: bool = True) -> None:
        """``conv{i}`` (with ``pad{i}`` before it if "same") followed by ``act{i}``."""
        if same:
            self.pad_same(f"pad{i}", kernel, stride)
        self.add(f"conv{i}", nn.Conv2d(*channels, kernel, stride))
        self.add(f"act{i}", self.activation())
        self.side = (self.side - kernel) // stride + 1

    def maxpool_same(self, i: int, kernel: int, stride: int) -> None:
        self.pad_same(f"pool_pad{i}", kernel, stride)
        self.add(f"pool{i}", nn.MaxPool2d(kernel, stride))
        self.side = (self.side - kernel) // stride + 1

    def dense(self, i: int, features: tuple[int, int], activation: bool = True) -> None:
        self.add(f"dense{i}", nn.Linear(*features))
        if activation:
            self.add(f"dense_act{i}", self.activation())

    def build(self) -> nn.Sequential:
        return nn.Sequential(self.layers)


def net_3c3d(classes: int, activation: str = "relu") -> nn.Sequential:
    """DeepOBS ``net_cifar10_3c3d``: three conv layers (64, 96, 128 filters) each followed by a
    3x3 / stride-2 max pool, dense layers of 512 and 256 units, then ``classes`` logits; input
    (N, 3, 32, 32). Xavier-normal conv weights, Xavier-uniform dense weights, zero biases."""
    b = _Builder(32, activation)
    b.conv(1, (3, 64), 5, same=False)
    b.maxpool_same(1, 3, 2)
    b.conv(2, (64, 96), 3, same=False)
    b.maxpool_same(2, 3, 2)
    b.conv(3, (96, 128), 3)
    b.maxpool_same(3, 3, 2)
    b.add("flatten", nn.Flatten())
    b.dense(1, (b.side * b.side * 128, 512))
    b.dense(2, (512, 256))
    b.dense(3, (256, classes), activation=False)
    net = b.build()
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            init = nn.init.xavier_normal_ if isinstance(module, nn.Conv2d) else nn.init.xavier_uniform_
            init(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return net


def net_allcnnc(classes: int = 100, activation: str = "relu") -> nn.Sequential:
    """DeepOBS ``net_cifar100_allcnnc`` (Springenberg et al.'s ALL-CNN-C): dropout 0.2, three
    3x3 convs of 96 filters (the last with stride 2), dropout 0.5, three of 192 (the last with
    stride 2), dropout 0.5, a valid 3x3 and two 1x1 convs (192, ``classes``), each conv followed
    by the activation, then the 6x6 average; input (N, 3, 32, 32). Xavier-normal weights, biases 0.1."""
    b = _Builder(32, activation)
    b.add("dropout1", nn.Dropout(0.2))
    b.conv(1, (3, 96), 3)
    b.conv(2, (96, 96), 3)
    b.conv(3, (96, 96), 3, stride=2)
    b.add("dropout2", nn.Dropout(0.5))
    b.conv(4, (96, 192), 3)
    b.conv(5, (192, 192), 3)
    b.conv(6, (192, 192), 3, stride=2)
    b.add("dropout3", nn.Dropout(0.5))
    b.conv(7, (192, 192), 3, same=False)
    b.conv(8, (192, 192), 1)
    b.conv(9, (192, classes), 1)
    b.add("mean", nn.AvgPool2d(b.side))
    b.add("flatten", nn.Flatten())
    net = b.build()
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0.1)
    return net


def net_mlp(classes: int = 10, activation: str = "relu") -> nn.Sequential:
    """DeepOBS ``net_mlp``: flatten, dense layers of 1000, 500 and 100 units, then ``classes``
    logits; input (N, 1, 28, 28). Weights from a normal of standard deviation 0.03 truncated at
    two standard deviations (as DeepOBS, which draws them with SciPy), zero biases."""
    b = _Builder(0, activation)
    b.add("flatten", nn.Flatten())
    widths = (784, 1000, 500, 100, classes)
    for i, features in enumerate(pairwise(widths), start=1):
        b.dense(i, features, activation=i < len(widths) - 1)
    net = b.build()
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.03, a=-0.06, b=0.06)
            nn.init.zeros_(module.bias)
    return net
