"""Crash safety and corrupted files: killed saves, failing saves, stale temp files, fuzzed adapters.

- Kill tests: ``_fault_driver.py`` forks real ``save_peft``/``save_adapter`` calls and SIGKILLs
  them before every file-system call they make, and at random times; a reader must find the
  old pair or the new one, byte for byte, and the next save must leave nothing beside the target.
- Saves that raise part-way leave the old files and no temp file, and name the target.
- Fuzzed files (truncated, flipped bytes, wrong dtypes and shapes, extra and missing keys) in
  both formats give a ValueError naming the file or tensor, and never touch the caller's params.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as stnp

import lorajax
from lorajax import _files

HERE = Path(__file__).parent


# --------------------------------------------------------------------------------------------------------------------
# Kill tests (one driver process; see tests/_fault_driver.py).


@pytest.fixture(scope="module")
def kills(tmp_path_factory):
    work = tmp_path_factory.mktemp("kills")
    out = subprocess.run(
        [sys.executable, str(HERE / "_fault_driver.py"), str(work), "0"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def _check_runs(runs, min_killed, both=True):
    killed = [r for r in runs if r["killed"]]
    assert len(killed) >= min_killed
    bad = [r for r in runs if r["seen"] not in ("old", "new") or r["after"]]
    assert not bad, bad[:3]
    if both:  # kills landed both before and after the switch
        assert {r["seen"] for r in killed} == {"old", "new"}
    return killed


@pytest.mark.parametrize("kind", ["peft", "adapter"])
def test_a_save_killed_at_every_step_leaves_the_old_or_the_new_pair_and_the_next_save_no_litter(kills, kind):
    report = kills[f"{kind}-steps"]
    assert report["steps"] >= (12 if kind == "peft" else 5)  # every file call of a real save is a kill point
    killed = _check_runs(report["runs"], min_killed=report["steps"])  # plus the kills of a first save
    assert len(killed) >= (30 if kind == "peft" else 12)
    assert any(r["litter"] for r in killed)  # killed saves do leave temp entries, and the next save removes them


@pytest.mark.parametrize("kind", ["peft", "adapter"])
def test_a_save_killed_at_random_times_leaves_the_old_or_the_new_pair(kills, kind):
    runs = kills[f"{kind}-random"]["runs"]
    assert len(runs) >= 30
    _check_runs(runs, min_killed=5, both=False)


def test_without_an_atomic_exchange_a_killed_folder_save_is_rolled_forward_by_the_next_load(kills):
    report = kills["peft-fallback-steps"]
    _check_runs(report["runs"], min_killed=report["steps"])


# --------------------------------------------------------------------------------------------------------------------
# The file layer in process.


def _lora(seed=0, d=8):
    base = {"params": {"fc1": {"kernel": jnp.ones((d, 4))}, "fc2": {"kernel": jnp.ones((4, d))}}}
    return base, lorajax.lorafy(base, rank=2, where=["fc1", "fc2"], alpha=4.0 + seed, key=jax.random.key(seed))


def _listing(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_a_folder_save_keeps_other_files_subfolders_and_permissions(tmp_path):
    base, p = _lora()
    target = tmp_path / "adapter"
    lorajax.save_peft(target, p)
    (target / "README.md").write_text("card")
    (target / "other").mkdir()
    (target / "other" / "adapter_config.json").write_text("{}")
    os.symlink("README.md", target / "link")
    target.chmod(0o750)
    lorajax.save_peft(target, _lora(1)[1])
    assert _listing(tmp_path) == ["adapter"]
    assert _listing(target) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "link", "other"]
    assert (target / "README.md").read_text() == "card" and (
        target / "other" / "adapter_config.json"
    ).read_text() == "{}"
    assert os.readlink(target / "link") == "README.md" and (target.stat().st_mode & 0o777) == 0o750
    assert json.loads((target / "adapter_config.json").read_text())["lora_alpha"] == 5


def test_a_symlinked_folder_is_replaced_where_it_points(tmp_path):
    base, p = _lora()
    real = tmp_path / "real"
    lorajax.save_peft(real, p)
    os.symlink(real, tmp_path / "link")
    lorajax.save_peft(tmp_path / "link", _lora(1)[1])
    assert (tmp_path / "link").is_symlink() and _listing(tmp_path) == ["link", "real"]
    assert json.loads((real / "adapter_config.json").read_text())["lora_alpha"] == 5


def _failing(orig, error):
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            raise error
        return orig(*args, **kwargs)

    return failing


@pytest.mark.parametrize("step", ["write", "fsync", "chmod", "switch"])
@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["ENOSPC", "Ctrl-C"]
)
def test_a_save_that_raises_leaves_the_old_files_and_no_temp_and_names_the_target(tmp_path, monkeypatch, step, error):
    base, p = _lora()
    folder, file = tmp_path / "peft", tmp_path / "a.safetensors"
    lorajax.save_peft(folder, p)
    lorajax.save_adapter(file, p)
    before = {n: (folder / n).read_bytes() for n in _listing(folder)}, file.read_bytes()
    new = _lora(1)[1]
    for save, target in ((lorajax.save_peft, folder), (lorajax.save_adapter, file)):
        with monkeypatch.context() as m:
            if step != "switch":
                m.setattr(os, step, _failing(getattr(os, step), error))
            elif save is lorajax.save_peft:
                m.setattr(_files, "exchange", _failing(_files.exchange, error))
            else:
                m.setattr(os, "replace", _failing(os.replace, error))
            message = rf"{save.__name__}: cannot write {re.escape(str(target))}: No space" if step != "Ctrl-C" else ""
            with pytest.raises(type(error), match=message if isinstance(error, OSError) else None):
                save(target, new)
    assert _listing(tmp_path) == ["a.safetensors", "peft"]
    assert ({n: (folder / n).read_bytes() for n in _listing(folder)}, file.read_bytes()) == before


def test_errors_name_the_target_never_a_temp_file(tmp_path):
    base, p = _lora()
    (tmp_path / "blocker").write_text("a file where a folder should be")
    for save, target in (
        (lorajax.save_adapter, tmp_path / "blocker" / "sub" / "a.safetensors"),
        (lorajax.save_peft, tmp_path / "blocker" / "adapter"),
    ):
        with pytest.raises(OSError) as info:
            save(target, p)
        assert str(tmp_path / "blocker") in str(info.value) and ".tmp" not in str(info.value)
    with pytest.raises(FileExistsError, match="save_peft: .*blocker exists and is not a directory"):
        lorajax.save_peft(tmp_path / "blocker", p)
    with pytest.raises(OSError, match=r"save_adapter: cannot write .*/dir\.safetensors") as info:
        (tmp_path / "dir.safetensors").mkdir()
        lorajax.save_adapter(tmp_path / "dir.safetensors", p)
    assert ".tmp" not in str(info.value)
    assert _listing(tmp_path) == ["blocker", "dir.safetensors"]


def test_save_adapter_creates_parent_folders(tmp_path):
    base, p = _lora()
    f = tmp_path / "runs" / "7" / "a.safetensors"
    lorajax.save_adapter(f, p)
    assert lorajax.load_adapter(f, base)["params"]["fc1"]["kernel"].rank == 2


def _stale(folder: Path, name: str, directory: bool) -> Path:
    path = folder / f".{name}.lorajax-{os.urandom(8).hex()}.tmp"
    if directory:
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"half a file")
    else:
        path.write_bytes(b"half a file")
    return path


def test_loads_and_saves_remove_dead_writers_temps_but_not_a_live_writers(tmp_path):
    import fcntl

    base, p = _lora()
    lorajax.save_peft(tmp_path / "adapter", p)
    lorajax.save_adapter(tmp_path / "a.safetensors", p)
    dead = [_stale(tmp_path, "adapter", True), _stale(tmp_path, "a.safetensors", False)]
    live = _stale(tmp_path, "adapter", True)
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer still at work
        foreign = tmp_path / ".adapter.someone-else.tmp"
        foreign.write_text("not ours")
        lorajax.load_peft(tmp_path / "adapter", base)
        lorajax.load_adapter(tmp_path / "a.safetensors", base)
        assert not any(d.exists() for d in dead) and live.exists() and foreign.exists()
        lorajax.save_peft(tmp_path / "adapter", p)
        assert live.exists()
    finally:
        os.close(fd)
    lorajax.save_peft(tmp_path / "adapter", p)
    assert _listing(tmp_path) == [".adapter.someone-else.tmp", "a.safetensors", "adapter"]


def test_a_folder_save_without_exchange_swaps_by_two_renames(tmp_path, monkeypatch):
    base, p = _lora()
    target = tmp_path / "adapter"
    lorajax.save_peft(target, p)
    (target / "README.md").write_text("card")
    monkeypatch.setattr(_files, "exchange", lambda a, b: False)
    lorajax.save_peft(target, _lora(1)[1])
    assert _listing(tmp_path) == ["adapter"] and (target / "README.md").read_text() == "card"
    assert lorajax.read_peft(target)[0]["lora_alpha"] == 5


def test_a_folder_that_cannot_be_renamed_has_its_files_replaced_in_place(tmp_path, monkeypatch):
    import errno

    base, p = _lora()
    target = tmp_path / "adapter"
    lorajax.save_peft(target, p)
    (target / "README.md").write_text("card")

    def mount_point(a, b):
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(_files, "exchange", mount_point)
    lorajax.save_peft(target, _lora(1)[1])
    assert _listing(tmp_path) == ["adapter"]
    assert _listing(target) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert lorajax.read_peft(target)[0]["lora_alpha"] == 5


def test_a_staged_folder_whose_block_raises_leaves_the_old_folder_and_the_error_as_it_was(tmp_path):
    target = tmp_path / "model"
    with _files.staged_folder(target, caller="demo") as tmp:
        (Path(tmp) / "config.json").write_text("old")
    missing = r"^\[Errno 2\] No such file or directory: '/nonexistent/shard'$"
    with pytest.raises(FileNotFoundError, match=missing), _files.staged_folder(target, caller="demo") as tmp:
        (Path(tmp) / "config.json").write_text("new")
        open("/nonexistent/shard")  # noqa: SIM115 - the caller's own error
    assert _listing(tmp_path) == ["model"] and (target / "config.json").read_text() == "old"


# --------------------------------------------------------------------------------------------------------------------
# Fuzzed files.


def _snapshot(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _mutations(data: bytes, rng: random.Random, header_end: int, count: int):
    """(what, mutated bytes): truncations anywhere, and byte flips in the header or in the tensor data."""
    for _ in range(count):
        kind = rng.choice(["truncate", "flip-header"] + (["flip-data"] if header_end < len(data) else []))
        if kind == "truncate":
            cut = rng.randrange(0, len(data))
            yield f"truncated at {cut}", data[:cut]
        else:
            lo, hi = (0, header_end) if kind == "flip-header" else (header_end, len(data))
            i = rng.randrange(lo, hi)
            yield f"{kind} at {i}", data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]


def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def test_fuzzed_adapter_files_give_clear_errors(tmp_path):
    base, p = _lora()
    good = tmp_path / "good.safetensors"
    lorajax.save_adapter(good, p)
    data, rng = good.read_bytes(), random.Random(0)
    want = _snapshot(lorajax.read_adapter(good).factors)
    before = _snapshot(base)
    silent = []
    for what, bad in _mutations(data, rng, _header_end(data), 60):
        f = tmp_path / "bad.safetensors"
        f.write_bytes(bad)
        try:
            got = lorajax.load_adapter(f, base)
        except ValueError as e:
            assert str(f) in str(e), (what, str(e))
            continue
        # A flip the file cannot notice (JSON whitespace, a metadata string) must load the same adapter.
        if _snapshot(lorajax.adapter(got).factors) != want:
            silent.append(what)
    assert not silent, silent
    assert _snapshot(base) == before


def _peft_folder(tmp_path, p, name="good"):
    folder = tmp_path / name
    lorajax.save_peft(folder, p)
    return folder


def test_fuzzed_peft_folders_give_clear_errors_or_load_what_the_bytes_say(tmp_path):
    base, p = _lora()
    good = _peft_folder(tmp_path, p)
    weights = (good / "adapter_model.safetensors").read_bytes()
    config = (good / "adapter_config.json").read_bytes()
    before = _snapshot(base)
    rng = random.Random(1)
    bad = tmp_path / "bad"
    bad.mkdir()
    errors = 0
    for which, data, end in (
        ("adapter_model.safetensors", weights, _header_end(weights)),
        ("adapter_config.json", config, len(config)),
    ):
        for what, mutated in _mutations(data, rng, end, 40):
            (bad / "adapter_model.safetensors").write_bytes(weights)
            (bad / "adapter_config.json").write_bytes(config)
            (bad / which).write_bytes(mutated)
            try:
                lorajax.load_peft(bad, base)
            except ValueError as e:  # PEFT's format has no checksum: flipped data can only be caught as NaN/Inf
                assert str(bad) in str(e) or "base_model.model." in str(e) or "module" in str(e), (what, str(e))
                errors += 1
    assert errors >= 30
    assert _snapshot(base) == before


def _rewrite(path: Path, change):
    tensors = stnp.load_file(path)
    change(tensors)
    # safetensors' NumPy writer ignores strides: give it contiguous arrays.
    stnp.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata={"format": "pt"})


A = "base_model.model.fc1.lora_A.weight"
B = "base_model.model.fc1.lora_B.weight"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.update({A: t[A].astype(np.int32)}), rf"{re.escape(A)}: dtype int32; LoRA factors are floats"),
        (lambda t: t.update({B: t[B].astype(np.bool_)}), rf"{re.escape(B)}: dtype bool"),
        (lambda t: t.update({A: np.full_like(t[A], np.nan)}), rf"{re.escape(A)}: 16 NaN/Inf of 16 entries"),
        (lambda t: t.update({A: t[A][:, :-1]}), r"params/fc1/kernel: kernel \(8, 4\) .* needs PEFT factors A \(2, 8\)"),
        (lambda t: t.update({A: t[A][:1]}), r"fc1: factor shapes A \(1, 8\), B \(4, 2\) do not form"),
        (lambda t: t.pop(B), r"fc1: has only lora_A"),
        (lambda t: t.update({"base_model.model.fc1.lora_C.weight": t[A]}), r"lora_C.weight: not a LoRA factor"),
        (
            lambda t: t.update(
                {"base_model.model.fc9.lora_A.weight": t[A], "base_model.model.fc9.lora_B.weight": t[B]}
            ),
            r"fc9: the tensors adapt it but target_modules=\['fc1', 'fc2'\] does not name it",
        ),
    ],
    ids=["int", "bool", "nan", "shape", "rank", "missing", "extra-tensor", "extra-module"],
)
def test_wrong_peft_tensors_are_refused_naming_them(tmp_path, change, message):
    base, p = _lora()
    folder = _peft_folder(tmp_path, p)
    _rewrite(folder / "adapter_model.safetensors", change)
    before = _snapshot(p)
    with pytest.raises(ValueError, match=message):
        lorajax.load_peft(folder, p)  # onto lorafied params: their nodes stay as they were
    assert _snapshot(p) == before


def _rewrite_adapter(path: Path, change):
    import safetensors

    data = path.read_bytes()
    meta = json.loads(data[8 : _header_end(data)])["__metadata__"]
    tensors = {
        k: np.frombuffer(v["data"], dtype=np.float32).reshape(v["shape"]) for k, v in safetensors.deserialize(data)
    }
    header = json.loads(meta["lorajax"])
    change(tensors, header)
    from lorajax.adapters._format import tensor_digest

    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}  # safetensors' NumPy writer ignores strides
    header["sha256"] = tensor_digest(tensors)  # a consistent checksum: the other checks must catch it
    path.write_bytes(stnp.save(tensors, metadata={**meta, "lorajax": json.dumps(header)}))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t, h: t.update({"params/fc1/kernel.a": t["params/fc1/kernel.a"][:, :1]}),
            r"shape: params/fc1/kernel: factor a",
        ),
        (lambda t, h: t.pop("params/fc1/kernel.b"), r"missing: params/fc1/kernel: tensor params/fc1/kernel.b"),
        (
            lambda t, h: t.update({"params/fc9/kernel.a": t["params/fc1/kernel.a"]}),
            r"extra: tensor 'params/fc9/kernel.a'",
        ),
        (
            lambda t, h: h["targets"]["params/fc1/kernel"].update(rank=3),
            r"params/fc1/kernel: factor a has shape \(8, 2\)",
        ),
        (lambda t, h: h["targets"]["params/fc1/kernel"].update(alpha=5.0), r"scale: params/fc1/kernel: recorded"),
        (lambda t, h: h["targets"]["params/fc1/kernel"].update(rslora=True), r"scale: params/fc1/kernel: recorded"),
    ],
    ids=["shape", "missing", "extra", "header-rank", "header-alpha", "header-rslora"],
)
def test_wrong_adapter_tensors_are_refused_naming_them(tmp_path, change, message):
    base, p = _lora()
    f = tmp_path / "a.safetensors"
    lorajax.save_adapter(f, p)
    _rewrite_adapter(f, change)
    with pytest.raises(ValueError, match=rf"load_adapter: {re.escape(str(f))} (?s:.*){message}"):
        lorajax.load_adapter(f, base)
