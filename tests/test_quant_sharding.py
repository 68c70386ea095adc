"""Quantized bases sharded on an explicit-axis mesh (``jax.make_mesh``'s default), FSDP included.

Runs tests/_quant_mesh_worker.py once in a subprocess with 8 virtual CPU devices (the flag must be set before JAX
starts) and checks its JSON report.
"""

from __future__ import annotations

import os

import pytest
from _workers import run_worker

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.xdist_group("mesh")


@pytest.fixture(scope="module")
def report():
    return run_worker(os.path.join(HERE, "_quant_mesh_worker.py"))


NAMES = [f"{f}_{a}" for f in ("nf4_dq", "nf4_plain", "int8_plain", "fp8_plain") for a in ("fan_in", "fan_out")]


def test_the_mesh_has_explicit_axes(report):
    assert report["axis_types"] == ["AxisType.Explicit"]


@pytest.mark.parametrize("name", NAMES)
def test_quantize_on_an_explicit_mesh_gives_the_one_device_bits(report, name):
    r = report["kernels"][name]
    assert r["codes_equal"], "codes or scales differ from the one-device quantization"
    assert r["dequantize_equal"] and r["jit_dequantize_equal"], "dequantize differs from one device"
    assert r["dequantize_spec"] == ("P('fsdp', None)" if name.endswith("fan_in") else "P(None, 'fsdp')")


@pytest.mark.parametrize("name", NAMES)
def test_codes_take_one_nth_per_device(report, name):
    r = report["kernels"][name]
    assert r["per_device"]["codes"] * 8 == r["total"]["codes"], r["specs"]
    if name.startswith("nf4") or name.endswith("fan_out"):  # int8/fp8 keep one scale per output row
        assert r["per_device"]["scales"] * 8 == r["total"]["scales"], r["specs"]


def test_fsdp_nf4_codes_are_kept_per_row_and_sharded_by_columns(report):
    specs = report["kernels"]["nf4_dq_fan_in"]["specs"]
    assert specs["codes"] == specs["scales"] == "P(None, None, 'fsdp')"


def test_misaligned_blocks_name_the_block_size_to_use(report):
    err = report["kernels"]["misaligned_error"]
    assert "block_size=128" in err and "64 weights of each row a device" in err and "Use block_size=64" in err


@pytest.mark.parametrize("path", ["merge", "factored"])
def test_qlora_through_an_fsdp_sharded_base_matches_one_device(report, path):
    r = report["qlora"]
    assert r["codes_spec"] == "P(None, None, 'fsdp')"
    assert r["partition_specs_match"], "partition_specs describes other shardings than the arrays have"
    # relative errors (float32 partial sums over 8 fan-in shards in another order)
    assert r[path]["forward_err"] < 1e-6 and r[path]["loss_rel"] < 1e-6 and r[path]["grad_err"] < 1e-6, r[path]


@pytest.mark.parametrize("name", ["nf4_dq_fan_in", "nf4_plain_fan_in"])
def test_memory_analysis_counts_one_nth_of_the_fsdp_codes(report, name):
    r = report["kernels"][name]
    small = sum(r["total"].get(f, 0) for f in ("nested", "offset"))  # double-quantization stats: replicated
    assert r["argument_bytes"] == (r["total"]["codes"] + r["total"]["scales"]) // 8 + small


def test_merge_step_on_the_explicit_mesh_matches_one_device(report):
    rel = report["explicit_merge_loss_rel"]
    assert isinstance(rel, float) and rel < 1e-6, rel


def test_requantize_of_an_fsdp_layer_shards_its_codes_again(report):
    r = report["requantize"]
    assert r["codes_spec"] == "P(None, None, 'fsdp')" and r["equal"], r
