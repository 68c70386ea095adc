"""Crash-safe writes: a file, or a folder's files as one unit, replaced so readers see the old or the new.

A file is written to a temp file beside it and renamed over it. A folder is
rebuilt beside itself (the new files, plus hard links to every other entry of the
old folder: a README stays) and swapped in by one ``renameat2(RENAME_EXCHANGE)``
on Linux (``renamex_np(RENAME_SWAP)`` on macOS): at every instant the folder's
name holds the old files or the new ones. Where the filesystem cannot exchange,
two renames are used and a save killed between them is rolled forward by the
next save or load.

Temp entries are named ``.<name>.lorajax-<16 hex>.tmp`` (``.old`` for the fallback's
old folder) and are ``flock``-ed by their writer for as long as it runs: the next
save or load of the same target (:func:`clean_stale`) removes those whose writer
is gone, never a live writer's (the lock dies with the process, SIGKILL included).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Collection, Iterator, Mapping

try:
    import fcntl
except ImportError:  # Windows: no flock; stale temps are recognised by age instead
    fcntl = None  # type: ignore[assignment]

#: Without flock, a temp entry this old (seconds) counts as left by a dead writer.
STALE_AGE = 24 * 3600.0
_MARK = ".lorajax-"
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
#: Errors of renaming a folder that is a mount point (or busy): its files are then replaced one by one.
_IMMOVABLE = (errno.EBUSY, errno.EXDEV)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Give a temp file or folder the permissions a plain ``open``/``mkdir`` would have had.

    Temp entries are created private (0600/0700); an adapter must stay readable by
    whoever the caller's umask lets read it (a serving user, say).
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _named(e: OSError, caller: str, target: str) -> OSError:
    """``e`` reworded to name the target the caller asked for (never a temp entry)."""
    message = f"{caller}: cannot write {target}: {e.strerror or e}"
    return OSError(e.errno, message) if e.errno is not None else type(e)(message)


def _lock(fd: int, block: bool) -> bool:
    """Take the exclusive flock on ``fd``; False if another process holds it (only when not ``block``)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _open(path: str, directory: bool) -> int:
    return os.open(path, os.O_RDONLY | (_O_DIRECTORY if directory else 0))


def _new_temp(target: str, directory: bool) -> tuple[str, int]:
    """A fresh temp file or folder beside ``target`` and an fd holding its lock."""
    parent, base = os.path.split(target)
    while True:
        tmp = os.path.join(parent, f".{base}{_MARK}{secrets.token_hex(8)}.tmp")
        if directory:
            os.mkdir(tmp, 0o700)
            fd = _open(tmp, True)
        else:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        _lock(fd, block=True)
        with contextlib.suppress(OSError):
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        os.close(fd)  # a cleaner took it for a dead writer's between create and lock: make another


def _begin(target: str, caller: str, directory: bool) -> tuple[str, int]:
    """Start a write of ``target``: its killed writers' temps removed, a fresh locked temp made beside it."""
    clean_stale(target)
    try:
        return _new_temp(target, directory)
    except OSError as e:
        raise _named(e, caller, target) from None


def _write_all(fd: int, data: bytes, *, sync: bool = True) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    if sync:  # before the rename: after a crash the new name never points at a file whose data never reached disk
        os.fsync(fd)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | _O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


@contextlib.contextmanager
def _claimed(path: str | None) -> Iterator[bool]:
    """Whether ``path`` (a temp entry) is a dead writer's: its lock is free (or, without flock, it is old)."""
    if path is None:
        yield True
        return
    if fcntl is None:
        try:
            yield time.time() - os.lstat(path).st_mtime > STALE_AGE
        except OSError:
            yield False
        return
    try:
        fd = _open(path, os.path.isdir(path))
    except OSError:
        yield False
        return
    try:
        yield _lock(fd, block=False)
    finally:
        os.close(fd)


def clean_stale(path: str | os.PathLike[str]) -> None:
    """Remove the temp entries that saves of ``path`` left when killed (best effort, never raises).

    A live writer's temp is kept (it holds its lock). A folder save killed between
    the two renames of the no-exchange fallback is rolled forward: its complete new
    folder takes the empty name.

    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / ".x.bin.lorajax-0123456789abcdef.tmp").write_bytes(b"half")  # a killed save's
    >>> clean_stale(d / "x.bin"); sorted(p.name for p in d.iterdir())
    []
    """
    target = os.path.realpath(os.path.abspath(path))
    parent, base = os.path.split(target)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    pattern = re.compile(re.escape(f".{base}{_MARK}") + r"([0-9a-f]{16})\.(tmp|old)")
    found: dict[str, dict[str, str]] = {}
    for name in names:
        if m := pattern.fullmatch(name):
            found.setdefault(m[1], {})[m[2]] = os.path.join(parent, name)
    for kinds in found.values():
        tmp, old = kinds.get("tmp"), kinds.get("old")
        with _claimed(tmp) as dead, contextlib.suppress(OSError):
            if not dead:
                continue  # a live writer's
            if old is not None and not os.path.lexists(target):
                os.rename(tmp if tmp is not None else old, target)  # killed between the fallback's renames
            for entry in (tmp, old):
                if entry is not None and os.path.lexists(entry):
                    _remove(entry)


def _target(path: str | os.PathLike[str], caller: str) -> str:
    """The absolute target (symlinks resolved: the linked file or folder is replaced), its parent created."""
    target = os.path.realpath(os.path.abspath(path))
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
    except OSError as e:
        raise _named(e, caller, target) from None
    return target


def atomic_write(path: str | os.PathLike[str], data: bytes, *, caller: str = "lorajax") -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part.

    Parent folders are created; errors name ``path`` and ``caller``.

    >>> import pathlib, tempfile
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "new" / "x.bin"
    >>> atomic_write(f, b"abc"); f.read_bytes()
    b'abc'
    """
    target = _target(path, caller)
    tmp, fd = _begin(target, caller, directory=False)
    try:
        _write_all(fd, data)
        publish(tmp)
        os.replace(tmp, target)
        _fsync_dir(os.path.dirname(target))
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError):
            raise _named(e, caller, target) from None
        raise
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry(old: str, new: str, skip: Collection[str]) -> None:
    """Every entry of the folder ``old`` not named in ``skip`` into ``new``: hard links, or copies."""
    for name in os.listdir(old):
        if name in skip:
            continue
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)
    os.chmod(new, stat.S_IMODE(os.stat(old).st_mode))


def exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2``, macOS ``renamex_np``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        result = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        result = libc.renamex_np(os.fsencode(a), os.fsencode(b), 0x2)  # RENAME_SWAP
    else:
        return False
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this filesystem cannot exchange
    raise OSError(err, os.strerror(err))


def _swap_in(tmp: str, target: str) -> None:
    """Put the complete folder ``tmp`` at ``target``; afterwards ``tmp`` holds the old folder, if any."""
    if not os.path.lexists(target):
        try:
            os.rename(tmp, target)
            return
        except OSError as e:  # another writer created it meanwhile: swap with theirs
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if exchange(tmp, target):
        return
    old = tmp.removesuffix(".tmp") + ".old"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    os.rename(old, tmp)


def _sync_tree(root: str) -> None:
    """fsync every file and folder under ``root`` (what the caller wrote into a staged folder)."""
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(folder)


def _copy_in(tmp: str, target: str, caller: str) -> None:
    """The in-place fallback: each file of ``tmp`` into ``target`` atomically, JSON (configs, indexes) last."""
    names = sorted(os.listdir(tmp), key=lambda n: (n.endswith(".json"), n))
    for name in names:
        src = os.path.join(tmp, name)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, os.path.join(target, name), symlinks=True, dirs_exist_ok=True)
        else:
            with open(src, "rb") as fh:
                atomic_write(os.path.join(target, name), fh.read(), caller=caller)


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike[str], *, caller: str) -> Iterator[str]:
    """A temp folder to fill; when the ``with`` block ends cleanly it replaces the folder ``path`` as one unit.

    Readers see the folder's old entries or all the new ones, never a mix, whatever
    the point the process is killed at. Entries of an existing folder that the new
    one lacks (a README, subfolders) are kept, as hard links; the folder keeps its
    permissions. If the block raises, ``path`` is untouched and the temp folder is
    removed. A folder that cannot be renamed (a mount point) has its files replaced
    one by one instead, each atomically, JSON files last.

    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "model"
    >>> with staged_folder(d, caller="demo") as tmp:
    ...     _ = (pathlib.Path(tmp) / "weights.bin").write_bytes(b"x")
    >>> sorted(p.name for p in d.iterdir())
    ['weights.bin']
    """
    target = os.path.realpath(os.path.abspath(path))
    if os.path.lexists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{caller}: {target} exists and is not a directory; pass a folder path.")
    target = _target(target, caller)
    tmp, fd = _begin(target, caller, directory=True)
    in_place = False
    try:
        yield tmp
    except BaseException:  # the caller's own error, as it is
        _remove(tmp)
        os.close(fd)
        raise
    try:
        if os.path.isdir(target):
            _carry(target, tmp, set(os.listdir(tmp)))
        else:
            publish(tmp, directory=True)
        _sync_tree(tmp)
        try:
            _swap_in(tmp, target)
        except OSError as e:
            if e.errno not in _IMMOVABLE:
                raise
            in_place = True  # a mount point (a container's volume, say) cannot be renamed
            _copy_in(tmp, target, caller)
        else:
            _fsync_dir(os.path.dirname(target))
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError) and not in_place:
            raise _named(e, caller, target) from None
        raise
    finally:
        os.close(fd)
    _remove(tmp)  # the old folder (or, in place, the copied new one)


def atomic_folder(path: str | os.PathLike[str], files: Mapping[str, bytes], *, caller: str) -> None:
    """Write ``files`` (``{file name: contents}``) into the folder ``path`` as one unit (:func:`staged_folder`).

    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "adapter"
    >>> atomic_folder(d, {"a.json": b"{}", "b.bin": b"x"}, caller="save_peft")
    >>> sorted(p.name for p in d.iterdir())
    ['a.json', 'b.bin']
    """
    with staged_folder(path, caller=caller) as tmp:
        for name, data in files.items():
            try:
                fd = os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                try:
                    _write_all(fd, data, sync=False)  # staged_folder syncs the whole folder before the swap
                finally:
                    os.close(fd)
            except OSError as e:
                raise _named(e, caller, os.path.realpath(os.path.abspath(path))) from None
