"""Errors of the machine's storage, not of the program or its input: a full disk, an exceeded quota or file-size
limit, a read-only file system. Found inside any wrapper (torch re-raises a failed write as a ``RuntimeError`` whose
context is the ``OSError``; SQLite says "database or disk is full"; safetensors names the OS error in its text) and
said in one line with what to do: ``medsam3`` and the bundles end with it and status 2, like an input error.
Standard library only (the command line reports it without importing torch).
"""

from __future__ import annotations

import errno

__all__ = ["STORAGE_ERRNOS", "StorageError", "storage_error"]

#: the ``errno`` values of a storage that cannot take the write
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
#: how libraries that do not raise an ``OSError`` say it (SQLite; Rust's and C++'s own messages)
_SAID_IN_TEXT = {"database or disk is full": errno.ENOSPC, "No space left on device": errno.ENOSPC,
                 "Disk quota exceeded": errno.EDQUOT, "File too large": errno.EFBIG,
                 "Read-only file system": errno.EROFS}
_WHAT_TO_DO = {
    errno.ENOSPC: "free space on that disk, or write elsewhere",
    errno.EDQUOT: "free space within your quota (or ask for a larger one), or write elsewhere",
    errno.EFBIG: "raise the file-size limit (ulimit -f; a job scheduler's file-size limit), or write elsewhere",
    errno.EROFS: "write to a folder on a writable file system",
}


class StorageError(RuntimeError):
    """A write the storage refused (:func:`storage_error`): the message names the file when known, the reason and
    what to do."""

    def __init__(self, reason: str, code: int, filename: object = None) -> None:
        where = f"writing {filename}: " if filename else ""
        super().__init__(f"{where}{reason}: {_WHAT_TO_DO[code]}, then run the same command again (nothing "
                         "half-written is kept)")
        self.code = code


def storage_error(err: BaseException | None) -> StorageError | None:
    """The storage error behind ``err`` (itself, its causes and contexts, however deep), as a
    :class:`StorageError`; None when there is none (a bug, an input error)."""
    seen, visited = err, set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, StorageError):
            return seen
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
            return StorageError(seen.strerror or errno.errorcode.get(seen.errno, "storage error"), seen.errno,
                                seen.filename2 or seen.filename)  # (a copy's: its destination)
        text = str(seen)
        for words, code in _SAID_IN_TEXT.items():
            if words in text:
                return StorageError(words, code)
        seen = seen.__cause__ or seen.__context__
    return None
