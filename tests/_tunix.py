"""tunix's model modules in tests: imported without tunix's trainer dependencies, and the flax flag they flip.

google-tunix is installed with ``pip install --no-deps google-tunix==0.1.7 einops`` (its own requirements pin older
transformers/safetensors). ``tunix/__init__`` imports its trainers (grain, metrax, ...); where those are absent, the
model and loader modules are imported without it: they need only jax, flax, einops and safetensors.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

#: Marks for a test that runs tunix's models.
NEEDS_TUNIX = [
    pytest.mark.libraries,
    pytest.mark.skipif(
        importlib.util.find_spec("tunix") is None,
        reason="google-tunix is not installed (pip install --no-deps google-tunix==0.1.7 einops)",
    ),
]


def needs_tunix(test: Any) -> Any:
    """Decorate ``test`` with :data:`NEEDS_TUNIX`."""
    for mark in NEEDS_TUNIX:
        test = mark(test)
    return test


def tunix_module(name: str) -> types.ModuleType:
    """The tunix module ``name`` (``"tunix.models.qwen3.model"``), under a bare package stub if tunix/__init__ fails."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if not isinstance(sys.modules.get("tunix"), types.ModuleType) or hasattr(sys.modules["tunix"], "__file__"):
            sys.modules.pop("tunix", None)
            stub = types.ModuleType("tunix")
            spec = importlib.util.find_spec("tunix")
            assert spec is not None and spec.submodule_search_locations is not None
            stub.__path__ = list(spec.submodule_search_locations)
            sys.modules["tunix"] = stub
        return importlib.import_module(name)


@contextlib.contextmanager
def flax_shard_flag_kept() -> Iterator[None]:
    """Run with flax's global ``flax_always_shard_variable`` as tunix's model modules set it (False), then give back
    the value it had.

    tunix sets it when its modules are first imported, so a second test module in the same process (its modules
    already imported) would build tunix's models with the flag as the first one gave it back, and fail; and NNX
    models built by later tests would silently stop being placed by their sharding names if it were not given back.
    """
    import flax

    before = flax.config.flax_always_shard_variable
    flax.config.update("flax_always_shard_variable", False)
    try:
        yield
    finally:
        flax.config.update("flax_always_shard_variable", before)
