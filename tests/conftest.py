import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# What a test marked `torch` needs: PyTorch, Hugging Face PEFT and transformers (the `torch` extra).
TORCH_SIDE = ("torch", "peft", "transformers")


def installed(name: str) -> bool:
    # A real package has an __init__ origin. tests/fixtures/peft/ (on sys.path once --doctest-modules has imported
    # tests/fixtures/make_peft_fixtures.py) would otherwise pass for `peft` as a namespace package.
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.origin is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the `torch`-marked tests, with the reason, when the `torch` extra is not installed.

    The test install (`pip install -e ".[test]"`) has no PyTorch; the PEFT parity tests that do not need it run
    from the committed fixtures in tests/fixtures/peft/. `.ci/run` installs the extra and runs `pytest -m torch`.
    """
    missing = [name for name in TORCH_SIDE if not installed(name)]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"needs the torch extra (pip install -e '.[torch]'): {', '.join(missing)} missing")
    for item in items:
        if item.get_closest_marker("torch") is not None:
            item.add_marker(skip)
