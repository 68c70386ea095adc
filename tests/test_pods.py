"""Multi-process jobs on CPU: JAX's distributed runtime (gloo) with 2 processes x 4 devices against 1 x 8.

Each case launches tests/_pod_worker.py (one training job: a sharded LoRA model, masked AdamW, checkpoints through
`lorajax.Checkpoints`) as real processes, so that a run can be SIGKILLed and resumed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_pod_worker.py"
pytestmark = pytest.mark.xdist_group("pods")  # the jobs use every core: one module at a time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(
    procs: int, folder: Path, steps: int, *, kill_after: int | None = None, out: Path | None = None, io: bool = False
) -> list[int]:
    """Run one job of ``procs`` processes to the end (or to its SIGKILL); the exit codes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    port = _free_port()
    cmd = [
        sys.executable,
        str(WORKER),
        "--procs",
        str(procs),
        "--port",
        str(port),
        "--dir",
        str(folder),
        "--steps",
        str(steps),
    ]
    if kill_after is not None:
        cmd += ["--kill-after", str(kill_after)]
    if out is not None:
        cmd += ["--out", str(out)]
    if io:
        cmd += ["--io"]
    runs = [
        subprocess.Popen([*cmd, "--pid", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(procs)
    ]
    codes = []
    for p in runs:
        try:
            log, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in runs:
                q.kill()
            raise
        codes.append(p.returncode)
        # In a killed job, a process whose leader died first is aborted by JAX's distributed runtime (SIGABRT)
        # before it kills itself: dead either way, right after the same save.
        dead = (-signal.SIGKILL, -signal.SIGABRT) if kill_after is not None else ()
        if p.returncode not in (0, *dead):
            pytest.fail(f"worker exited {p.returncode}:\n{log.decode()[-3000:]}")
    return codes


@pytest.mark.parametrize("procs", [1, 2])
def test_a_killed_run_resumes_bit_for_bit(tmp_path, procs):
    steps, k = 6, 3
    job(procs, tmp_path / "whole", steps, out=tmp_path / "whole.json", io=True)
    codes = job(procs, tmp_path / "killed", steps, kill_after=k)
    assert codes[0] == -signal.SIGKILL  # the job really died after step k was saved
    assert all(c in (-signal.SIGKILL, -signal.SIGABRT) for c in codes[1:]), codes
    job(procs, tmp_path / "killed", steps, out=tmp_path / "resumed.json")
    whole = json.loads((tmp_path / "whole.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["first"] == k
    assert resumed["losses"] == whole["losses"][k:]  # the same batches, noise and updates: equal floats
    assert resumed["digest"] == whole["digest"]  # every trained leaf (factors and the also= head), bit for bit
    assert resumed["steps"] == whole["steps"] == [steps - 1, steps]  # keep-last-2
    assert resumed["b_spec"] == whole["b_spec"] == "P(None, 'model')"  # restored onto the base's sharding


def test_every_process_saves_and_loads_adapter_files(tmp_path):
    """save_adapter/save_peft called by each of 2 processes, repeatedly, to one path: files equal one process's."""
    results = {}
    for procs in (1, 2):
        job(procs, tmp_path / f"p{procs}", 1, out=tmp_path / f"p{procs}.json", io=True)
        results[procs] = json.loads((tmp_path / f"p{procs}.json").read_text())["io"]
    for io in results.values():
        assert io["file_equal"]  # the job's factors, LoRA biases, head and token rows, gathered whole
        assert io["adapter_equal"] and io["peft_equal"]
        # loaded factors are placed as the base's factor_specs say (fc1's kernel is sharded P(None, 'model'))
        assert io["adapter_b_spec"] == io["peft_b_spec"] == "P(None, 'model')"
        assert io["adapter_bias_spec"] == io["peft_bias_spec"] == "P('model',)"  # the LoRA bias, as fc1's bias
        assert io["adapter_tokens_spec"] == io["peft_tokens_spec"] == "P(None, 'model')"  # rows, as the table's
        assert io["litter"] == []
    assert results[1]["initial_content"] == results[2]["initial_content"]  # the same content as one process writes
