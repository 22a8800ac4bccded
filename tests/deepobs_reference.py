"""DeepOBS's PyTorch code as a test reference, imported without ``deepobs/__init__.py``.

``import deepobs`` imports DeepOBS's TensorFlow part (TensorFlow 1.x), which is not installed,
and ``deepobs.analyzer`` imports plotting packages (seaborn, matplotlib2tikz); the modules
used here (``pytorch.*``, ``analyzer.shared_utils``) need only torch, torchvision, SciPy and
NumPy. ``module`` registers those two packages as empty package objects whose search paths
are the installed folders, so that their submodules import normally.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def module(name: str) -> types.ModuleType:
    """DeepOBS's submodule ``deepobs.<name>``, e.g. ``pytorch.testproblems.testproblems_modules``;
    skips the test if deepobs is not installed."""
    if "deepobs" not in sys.modules:
        spec = importlib.util.find_spec("deepobs")
        if spec is None:
            pytest.skip("deepobs not installed (pip install deepobs==1.1.2 --no-deps)")
        root = spec.submodule_search_locations[0]
        for package, folder in (("deepobs", root), ("deepobs.analyzer", f"{root}/analyzer")):
            stub = types.ModuleType(package)
            stub.__path__ = [folder]
            sys.modules[package] = stub
    return importlib.import_module(f"deepobs.{name}")
