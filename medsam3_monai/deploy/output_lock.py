"""One ``medsam3`` command at a time per output folder.

Two runs aimed at one ``--out`` (a job array given one folder, a job submitted twice) would both pass the "new or
empty" check and then write over each other: one report silently replaced by the other, two trainings' checkpoints
interleaved. While a command that writes a folder runs, it holds an exclusive lock (``fcntl.flock``: released when the
process ends, however it ends) on a hidden file beside the folder, ``.<name>.medsam3.lock``; a second command aimed at
the folder is refused at once. Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["OUTPUT_FOLDER_OPTIONS", "held_descriptors", "output_lock"]

#: the descriptors of the locks this process holds (a child that writes the folder for it inherits them:
#: ``medsam3 train``'s bundle process, so the lock lasts while either runs)
_HELD: list[int] = []


def held_descriptors() -> tuple[int, ...]:
    """The file descriptors of the output locks this process holds (for ``subprocess.Popen(pass_fds=...)``)."""
    return tuple(_HELD)

#: the ``medsam3`` commands that write a folder -> the argument naming it
OUTPUT_FOLDER_OPTIONS = {"evaluate": "out", "train": "out", "demo": "out", "reproduce": "out", "segment": "out_dir",
                         "convert-checkpoint": "dst"}


def _lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.medsam3.lock"


@contextlib.contextmanager
def output_lock(folder: str | Path, option: str) -> Iterator[None]:
    """Hold the lock of ``folder`` (``option`` names it in the refusal: ``--out``) while the block runs.

    Raises FileExistsError when another process holds it. Where the lock file cannot be made (the parent is
    read-only or missing and cannot be made), the block runs without it: the command's own checks say what is wrong.
    Parent folders made for the lock are removed again when the command left them empty (a refused command leaves
    nothing behind).
    """
    folder = Path(os.path.realpath(Path(folder).expanduser()))  # one lock whatever the path's links and '..'
    lock = _lock_path(folder)
    made = []  # the missing parents, deepest first
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        made.append(parent)
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):  # a place this user cannot write: the command's checks say so
        yield
        return
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+")  # noqa: SIM115 - held for the block
    except OSError:
        _remove_empty(made)
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"{option} {folder}: another medsam3 command is writing into it now (it holds "
                                  f"{lock}): wait for it to end, or choose another {option}") from None
        if not os.path.exists(lock) or os.stat(lock).st_ino != os.fstat(handle.fileno()).st_ino:
            # the holder before us ended and removed the file between our open and our lock: take the new one
            handle.close()
            with output_lock(folder, option):
                yield
            return
        _HELD.append(handle.fileno())
        try:
            yield
        finally:
            _HELD.remove(handle.fileno())
            with contextlib.suppress(OSError):
                lock.unlink()
    finally:
        handle.close()
        _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for made in folders:
        try:
            made.rmdir()
        except OSError:
            return
