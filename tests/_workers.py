"""Tests that need their own JAX process (a device count set before JAX starts): run one, read its JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(*argv: str, timeout: float = 600) -> Any:
    """Run ``python *argv`` in a fresh process and return the JSON of its last line of output.

    The worker starts without the parent's ``XLA_FLAGS``/``JAX_PLATFORMS`` (it sets its own device count) and with
    this checkout first on ``PYTHONPATH`` (its lorajax, whatever is installed). A failing worker fails the test
    with the end of its stderr.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
