"""Durable, atomic writes: after a crash or a full disk a path holds its old content or its new
content, never a part of either, and a pointer (``state.json``) never outlives what it points at.

    file    write <dir>/.<name>.<random>.tmp → fsync it → os.replace onto <name> → fsync <dir>
    folder  delete a stale <name>.tmp (a crash's leftover, never reused) → write into a fresh
            <name>.tmp → fsync each file and the folder → move an old <name> aside →
            os.replace <name>.tmp onto <name> → fsync the parent → delete the old one

A renamed file or folder is durable only once its directory is fsynced too; these helpers do both.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (directories: where supported)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        if not Path(path).is_dir():
            raise
    finally:
        os.close(fd)


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temp path in ``path``'s folder, fsync it, then rename it onto
    ``path`` (e.g. ``atomic_write_with(p, lambda t: pq.write_table(table, t))``). On any error the
    temp file is removed and ``path`` keeps what it held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name that ``write`` creates, so the file gets the usual permissions (mkstemp: 0600)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to ``path`` atomically and durably."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(raw))


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and directory under ``folder``, deepest first, then ``folder``."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for f in files:
            fsync_path(Path(root) / f)
        fsync_path(root)


def replace_folder(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Move the complete folder ``src`` to ``dst`` (same file system), replacing an old ``dst``:
    the old one is moved aside first and deleted only after the rename is durable."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_path(dst.parent)
    shutil.rmtree(old, ignore_errors=True)
    return dst


@contextmanager
def durable_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """``with durable_folder(f) as tmp:`` write the folder's files into ``tmp``; on a clean exit
    they are fsynced and ``tmp`` becomes ``f`` (``replace_folder``). A ``<f>.tmp`` left by an
    earlier crash is deleted first, never reused; on an error ``tmp`` is deleted and ``f`` is
    left as it was."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        log.warning("deleting %s, a partial write left by an earlier crash", tmp)
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
