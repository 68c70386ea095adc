"""Atomic file writes: a temp file (or folder) beside the target, then one rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Give a temp file or folder the permissions a plain ``open``/``mkdir`` would have had.

    ``mkstemp``/``mkdtemp`` create private (0600/0700) entries; an adapter must stay
    readable by whoever the caller's umask lets read it (a serving user, say).
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _write_synced(fd: int, data: bytes) -> None:
    # fsync before the rename: after a crash the new name never points at a file whose data never reached disk.
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part.

    >>> import pathlib, tempfile
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> atomic_write(f, b"abc"); f.read_bytes()
    b'abc'
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        _write_synced(fd, data)
        publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_folder(path: str | os.PathLike[str], files: Mapping[str, bytes], *, caller: str) -> None:
    """Write ``files`` (``{file name: contents}``) into the folder ``path`` atomically.

    A new folder is built as a temp folder beside ``path`` and renamed: it appears
    whole or not at all. In an existing folder each file is replaced on its own
    (:func:`atomic_write`) and files not in ``files`` (a README, say) stay.

    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "adapter"
    >>> atomic_folder(d, {"a.json": b"{}", "b.bin": b"x"}, caller="save_peft")
    >>> sorted(p.name for p in d.iterdir())
    ['a.json', 'b.bin']
    """
    root = os.path.abspath(path)
    if os.path.isdir(root):
        for name, data in files.items():
            atomic_write(os.path.join(root, name), data)
        return
    if os.path.lexists(root):
        raise FileExistsError(f"{caller}: {root} exists and is not a directory; pass a folder path.")
    parent, base = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
    try:
        publish(tmp, directory=True)
        for name, data in files.items():
            _write_synced(os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), data)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
