"""The examples and notebooks run end to end (fast modes), so they never rot.

Marked ``examples``: select with ``pytest -m examples`` or skip with ``-m "not examples"``. Each example runs in a
fresh interpreter (as a user would run it) and is checked for what it promises to print or write; the notebooks run
through nbclient and must be committed without outputs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

pytestmark = pytest.mark.examples


def run(args: list[str], cwd: Path = ROOT, timeout: int = 600) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def import_textlm() -> Any:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import textlm
    finally:
        sys.path.pop(0)
    return textlm


def test_finetune_fast(tmp_path: Path) -> None:
    out = run([str(EXAMPLES / "finetune.py"), "--fast", "--out", str(tmp_path / "run")])
    run_dir = tmp_path / "run"
    for name in ["loss_curves.png", "results.json", "table.md", "samples.txt", "full_finetune.safetensors"]:
        assert (run_dir / name).stat().st_size > 0, name
    for name in ["attn_qv", "all_linear"]:
        assert (run_dir / f"adapter_{name}.safetensors").stat().st_size > 0
    results = json.loads((run_dir / "results.json").read_text())
    rows = {r["name"]: r for r in results["results"]}
    assert set(rows) == {"attn_qv", "all_linear", "full"}
    for name, row in rows.items():
        # LoRA starts exactly at the base (B = 0); every method then moves. A dozen steps at full learning rate can
        # bump the validation loss up first, so no direction is promised here (the default 200 steps bring it down).
        assert row["val_before"] == pytest.approx(results["base_val"]["code"], abs=1e-5), name
        assert 1e-4 < abs(row["val_after"] - row["val_before"]) < 0.2, name
    assert rows["attn_qv"]["trainable"] < 0.02 * rows["full"]["trainable"]
    assert rows["attn_qv"]["opt_state_bytes"] < 0.05 * rows["full"]["opt_state_bytes"]
    assert rows["attn_qv"]["file_bytes"] < 0.05 * rows["full"]["file_bytes"]
    for name, adapter_val, reloaded_val in results["reload_checks"]:
        assert abs(adapter_val - reloaded_val) < 1e-4, name
    for row in rows.values():  # forgetting is tracked along the run: prose loss at every evaluation, base first
        assert len(row["prose_curve"]) == len(row["curve"]) and row["prose_curve"][-1][1] == row["prose_after"]
        assert row["prose_curve"][0][1] == pytest.approx(results["base_val"]["prose"], abs=1e-5)
    assert "reload check attn_qv" in out and "MISMATCH" not in out
    # method | code val before | code val after | prose val after | trainable params ...
    assert re.search(r"\| LoRA attn_qv +\| \d\.\d{3} +\| \d\.\d{3} +\| \d\.\d{3} +\| 16,384 ", out), out
    assert re.search(r"gap attn_qv vs full fine-tune: [+-]\d\.\d{3} nats/byte", out), out
    assert "fine-tuning set code: 176 kB train" in out  # --train-kb 176 by default
    assert f"outputs in {run_dir}" in out


def test_spread_sample_takes_evenly_spaced_pieces() -> None:
    textlm = import_textlm()
    data = np.arange(10_000, dtype=np.int64)
    sub = textlm.spread_sample(data, 3_000, piece=1_000)
    # 3 pieces of 1,000 from 10 (first, middle, last), each contiguous, in order.
    np.testing.assert_array_equal(sub, np.concatenate([data[0:1_000], data[4_000:5_000], data[9_000:10_000]]))
    assert textlm.spread_sample(data, 20_000, piece=1_000) is data  # asking for more than there is: all of it


def test_finetune_pretrains_when_flags_differ_from_checkpoint(tmp_path: Path) -> None:
    # A width the shipped checkpoint does not have: the demo must pretrain its own base (tiny here) and still work.
    # --quantize nf4 adds QLoRA attn_qv: every linear kernel but the head in NF4 (the bare ones dequantized in the
    # step), reloaded onto the quantized base.
    out = run(
        [str(EXAMPLES / "finetune.py"), "--fast", "--d-model", "32", "--n-layers", "1", "--methods", "attn_qv"]
        + ["--quantize", "nf4", "--out", str(tmp_path / "run")]
    )
    assert "pretrained here" in out
    assert "reload check attn_qv:" in out and "reload check attn_qv@nf4:" in out and "MISMATCH" not in out
    rows = {r["name"]: r for r in json.loads((tmp_path / "run" / "results.json").read_text())["results"]}
    assert set(rows) == {"attn_qv", "attn_qv@nf4"} and rows["attn_qv@nf4"]["trainable"] == rows["attn_qv"]["trainable"]
    assert rows["attn_qv@nf4"]["frozen_bytes"] < 0.75 * rows["attn_qv"]["frozen_bytes"]  # NF4 kernels, float32 rest
    assert re.search(r"\| QLoRA attn_qv \(nf4 base\) +\| \d\.\d{3} +\| \d\.\d{3} ", out), out


def test_pretrain_base_script_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    out = run(
        [str(EXAMPLES / "pretrain_base.py"), "--steps", "3", "--d-model", "32", "--n-layers", "1"]
        + ["--out", str(tmp_path / "base.safetensors")]
    )
    assert "wrote" in out and "15% of windows from code" in out
    textlm = import_textlm()
    params, config = textlm.load_params(tmp_path / "base.safetensors")
    assert (config.d_model, config.n_layers) == (32, 1)
    assert params["params"]["block0"]["fc1"]["kernel"].shape == (32, 128)
    assert tmp_path.joinpath("base.safetensors").stat().st_size < 2_000_000


def test_pretrain_base_rejects_a_code_share_outside_0_1() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "pretrain_base.py"), "--code-frac", "1.5"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "--code-frac must be in [0, 1], got 1.5" in proc.stderr


def test_shipped_base_checkpoint_is_small_and_pretrained() -> None:
    textlm = import_textlm()
    assert textlm.BASE_CHECKPOINT.stat().st_size < 2_000_000
    params, config = textlm.load_params(textlm.BASE_CHECKPOINT)
    prose, _ = textlm.load_corpora(max_train=1_000, max_val=20_000)
    loss = textlm.make_eval(textlm.TinyGPT(config))(params, textlm.val_windows(prose.val, config.seq_len, 16))
    assert loss < 2.0, f"the shipped base is not pretrained (prose val loss {loss:.3f}; uniform bytes give 5.55)"


def test_quickstart() -> None:
    out = run([str(EXAMPLES / "quickstart.py")])
    assert len((EXAMPLES / "quickstart.py").read_text().splitlines()) < 40
    before, after = map(float, re.search(r"base loss ([\d.]+) -> merged loss ([\d.]+)", out).groups())
    assert after < 0.5 * before


@pytest.mark.parametrize("script", ["nnx_finetune.py", "equinox_finetune.py"])
def test_framework_finetunes(script: str) -> None:
    out = run([str(EXAMPLES / script), "--steps", "150"])
    before, after = map(
        float, re.search(r"task B loss: base ([\d.]+) -> LoRA-adapted and merged ([\d.]+)", out).groups()
    )
    assert after < 0.2 * before, out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code"), (
        f"{path.name} is committed with outputs; rebuild it with notebooks/build_notebooks.py"
    )
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    plots = {"01_lora_from_scratch.ipynb": 4, "02_lorajax_tour.ipynb": 1}.get(path.name, 1)
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= plots, "the notebook's plots were not drawn"


def test_notebooks_match_their_generator(tmp_path: Path) -> None:
    # The .ipynb files are generated; a hand edit that the generator does not know about would be lost.
    nbformat = pytest.importorskip("nbformat")
    sys.path.insert(0, str(ROOT / "notebooks"))
    try:
        import build_notebooks
    finally:
        sys.path.pop(0)
    for name, cells in [
        ("01_lora_from_scratch.ipynb", build_notebooks.NB1),
        ("02_lorajax_tour.ipynb", build_notebooks.NB2),
    ]:
        build_notebooks.build(cells, tmp_path / name)
        assert nbformat.read(tmp_path / name, as_version=4) == nbformat.read(ROOT / "notebooks" / name, as_version=4)


def test_peft_interop() -> None:
    out = run([str(EXAMPLES / "peft_interop.py")])
    err = float(re.search(r"max \|lorajax - PEFT\| = ([0-9.e+-]+)", out).group(1))
    assert err < 1e-5 and "saved ['adapter_config.json', 'adapter_model.safetensors']" in out


def test_multi_adapter() -> None:
    out = run([str(EXAMPLES / "multi_adapter.py")])
    diffs = [float(m) for m in re.findall(r"max \|mixed - alone\| = ([0-9.e+-]+)", out)]
    assert len(diffs) == 6 and max(diffs) < 1e-5 and "swap alice -> bob" in out
    assert "slot changes: the server was traced 1 time(s)" in out  # put/evict never retrace the jitted server


def test_sharded_finetune() -> None:
    out = run([str(EXAMPLES / "sharded_finetune.py"), "--steps", "5"])
    assert "8 devices" in out and "A P(None, None), B P(None, 'model', None)" in out
    before = float(re.search(r"validation loss before: ([0-9.]+)", out).group(1))
    after = float(re.search(r"validation loss after: +([0-9.]+)", out).group(1))
    merged = float(re.search(r"merged model validation loss ([0-9.]+)", out).group(1))
    assert after < before and abs(merged - after) < 2e-3
