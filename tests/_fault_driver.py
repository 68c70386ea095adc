"""Kill real saves at every write step and at random times; print what a reader saw, as JSON.

Run by tests/test_faults.py as ``python tests/_fault_driver.py <workdir> <seed>``. It imports
lorajax once (never starting a JAX backend: the LoRA nodes hold NumPy arrays) and forks one
child per run. The child counts calls to the file-system functions a save uses and SIGKILLs
itself just before call ``k`` (or, for the random-time runs, the parent kills it after a random
delay). After each kill the parent reads the target: it must hold the old pair or the new pair,
byte for byte, with the folder's other files intact; then it runs the next save and checks that
nothing else is left beside the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's lorajax

import lorajax
from lorajax import Layout, LoRA, LoRASpec, _files

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
HOOKED = ("open", "write", "fsync", "replace", "rename", "mkdir", "link", "symlink", "unlink", "chmod", "rmdir")


def params(seed: int, size: int) -> dict:
    rng = np.random.default_rng(seed)
    spec = LoRASpec(rank=4, alpha=8.0 + seed, layout=Layout("io"))  # alpha differs: the config differs too
    node = LoRA(
        base=np.zeros((size, 16), np.float32),
        a=rng.normal(size=(size, 4)).astype(np.float32),
        b=rng.normal(size=(4, 16)).astype(np.float32),
        spec=spec,
    )
    return {"fc1": {"kernel": node}}


def hook(kill_at: int, counter: list[int]) -> None:
    """Wrap the file functions (and the folder exchange) so that call number ``kill_at`` SIGKILLs the process."""

    def wrap(orig):
        def wrapped(*args, **kwargs):
            counter[0] += 1
            if counter[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(*args, **kwargs)

        return wrapped

    for name in HOOKED:
        setattr(os, name, wrap(getattr(os, name)))
    _files.exchange = wrap(_files.exchange)


def canonical(data: bytes) -> bytes:
    """A safetensors file with its JSON header's keys sorted: safetensors writes ``__metadata__`` in hash order."""
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True).encode()
    except ValueError:  # a torn header: compares unequal to both
        return data
    return header + data[8 + n :]


class Case:
    """One target (a PEFT folder or an adapter file), its old and new contents, and the checks."""

    def __init__(self, kind: str, root: str, size: int) -> None:
        self.kind, self.root = kind, root
        self.target = os.path.join(root, "adapter" if kind == "peft" else "adapter.safetensors")
        self.old, self.new = params(0, size), params(1, size)
        self.save(self.old)
        self.old_bytes = self.read()
        self.save(self.new)
        self.new_bytes = self.read()
        assert self.old_bytes != self.new_bytes

    def save(self, p: dict) -> None:
        if self.kind == "peft":
            lorajax.save_peft(self.target, p)
        else:
            lorajax.save_adapter(self.target, p)

    def read(self) -> tuple[bytes, ...] | None:
        if not os.path.exists(self.target):
            return None
        if self.kind == "adapter":
            with open(self.target, "rb") as fh:
                return (canonical(fh.read()),)
        out = []
        for name in PEFT_FILES:
            path = os.path.join(self.target, name)
            with open(path, "rb") as fh:
                out.append(fh.read())
        return tuple(out)

    def reset(self, fresh: bool) -> None:
        """The old state (or, ``fresh``, no target at all), with a README in the folder, nothing else beside it."""
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.root)
        if not fresh:
            self.save(self.old)
            if self.kind == "peft":
                with open(os.path.join(self.target, "README.md"), "w") as fh:
                    fh.write("model card")

    def seen(self, fresh: bool) -> str:
        """What a reader finds: 'old', 'new', or a description of what is wrong."""
        got = self.read()
        if got is None:
            return "old" if fresh else "missing"
        if self.kind == "peft" and not fresh:
            readme = os.path.join(self.target, "README.md")
            if not os.path.isfile(readme) or Path(readme).read_text() != "model card":
                return "README lost"
        extra = set(os.listdir(self.target)) - set(PEFT_FILES) - {"README.md"} if self.kind == "peft" else set()
        if extra:
            return f"extra files in the folder: {sorted(extra)}"
        return "old" if got == self.old_bytes else "new" if got == self.new_bytes else "mixed"

    def litter(self) -> list[str]:
        return sorted(set(os.listdir(self.root)) - {os.path.basename(self.target)})


def child(case: Case, kill_at: int, fallback: bool) -> None:
    counter = [0]
    if fallback:
        _files.exchange = lambda a, b: False
    hook(kill_at, counter)
    try:
        case.save(case.new)
    finally:
        os._exit(0 if counter[0] else 3)


def run_once(case: Case, kill_at: int | None, delay: float | None, fresh: bool, fallback: bool) -> dict:
    case.reset(fresh)
    pid = os.fork()
    if pid == 0:
        child(case, kill_at if kill_at is not None else -1, fallback)
    if delay is not None:
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status)
    if fallback:
        _files.clean_stale(case.target)  # what every load_* does first: rolls a save killed between renames forward
    seen = case.seen(fresh)
    litter = case.litter()
    case.save(case.new)  # the next save cleans up
    after = case.litter() + (["next save did not give the new pair"] if case.seen(fresh) != "new" else [])
    return {"killed": killed, "seen": seen, "litter": litter, "after": after}


def count_steps(case: Case, fallback: bool) -> int:
    case.reset(False)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        counter = [0]
        if fallback:
            _files.exchange = lambda a, b: False
        hook(-1, counter)
        case.save(case.new)
        os.write(write, str(counter[0]).encode())
        os._exit(0)
    os.close(write)
    steps = int(os.read(read, 100))
    os.waitpid(pid, 0)
    return steps


def main(work: str, seed: int) -> None:
    rng = random.Random(seed)
    report: dict = {}
    for kind in ("peft", "adapter"):
        case = Case(kind, os.path.join(work, kind), size=32)
        for fallback in (False, True) if kind == "peft" else (False,):
            steps = count_steps(case, fallback)
            runs = [run_once(case, k, None, False, fallback) for k in range(1, steps + 2)]
            runs += [run_once(case, k, None, True, fallback) for k in range(1, steps + 2)]
            report[f"{kind}{'-fallback' if fallback else ''}-steps"] = {"steps": steps, "runs": runs}
        big = Case(kind, os.path.join(work, kind + "-big"), size=1 << 15)  # ~2 MB: a save takes some ms
        # The fastest of a few saves: one timing on a busy machine (CI runs two test workers) can be many times a
        # save's usual time, and delays drawn from it would then land after nearly every save had finished.
        took = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            big.save(big.new)
            took = min(took, time.perf_counter() - start)
        runs = [run_once(big, None, rng.uniform(0.0, 2.5 * took), False, False) for _ in range(30)]
        report[f"{kind}-random"] = {"save_s": took, "runs": runs}
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
