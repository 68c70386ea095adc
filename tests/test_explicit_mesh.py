"""``lorajax.factored`` on a mesh with explicit axis types (``jax.make_mesh(..., axis_types=Explicit)``).

Runs tests/_explicit_mesh_worker.py once in a subprocess with 8 virtual CPU devices (the flag must be set before
JAX starts) and checks its JSON report: ``jax.grad`` through ``factored`` equals ``jax.grad`` through ``merge`` for
LoRA, DoRA, QLoRA and QDoRA on a base sharded along fan-out and fan-in (the second product contracts a sharded axis),
and each gradient carries its factor's sharding.
"""

from __future__ import annotations

import os

import pytest
from _workers import run_worker

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.xdist_group("mesh")
CASES = ["lora", "dora", "qlora", "qdora"]


@pytest.fixture(scope="module")
def report():
    return run_worker(os.path.join(HERE, "_explicit_mesh_worker.py"))


def test_the_mesh_has_explicit_axes(report):
    assert report["axis_types"] == ["AxisType.Explicit", "AxisType.Explicit"]


@pytest.mark.parametrize("case", CASES)
def test_factored_gradients_on_an_explicit_mesh_equal_the_merge_path(report, case):
    r = report["cases"][case]
    assert "error" not in r, r.get("trace", r.get("error"))
    lf, lm = r["loss"]
    assert abs(lf - lm) <= 1e-6 * abs(lm)
    assert len(r["grads"]) == (6 if "dora" in case else 4)
    for name, g in r["grads"].items():
        # float32, the products in another order: ~3e-7 of the largest entry seen
        assert g["max_abs_diff"] <= 5e-6 * g["max_abs"], (name, g)


@pytest.mark.parametrize("case", CASES)
def test_gradients_are_sharded_like_their_factors(report, case):
    for name, g in report["cases"][case]["grads"].items():
        assert g["spec"] == g["primal_spec"] == g["merge_spec"], (name, g)
