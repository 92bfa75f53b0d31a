"""The one error type for bad input data: it names the file, the problem and what to do about it."""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from typing import Any

__all__ = ["ChannelError", "DataError", "source_name"]


class DataError(ValueError):
    """Bad input data (corrupt file, size mismatch, 4D volume, NaN/Inf, unknown label value, ...).

    The message reads ``"<file>: <problem>; <what to do>"`` so a user can act on one line; the parts are also
    kept as attributes for programs (``path``, ``problem``, ``hint``).
    """

    def __init__(self, path: str | PathLike | None, problem: str, hint: str = "") -> None:
        self.path = str(path) if path is not None else "<in-memory data>"
        self.problem = problem
        self.hint = hint
        message = f"{self.path}: {problem}"
        if hint:
            message += f"; {hint}"
        super().__init__(message)


class ChannelError(DataError):
    """A ``channel`` that does not fit the input (a 4D volume without one, one out of range, one for a 2D picture
    or a 3D volume): a setting to change, never skipped as an unreadable file."""


def source_name(value: Any, fallback: Mapping[str, Any] | None = None, key: str | None = None) -> str | None:
    """The file a tensor came from: ``meta['filename_or_obj']`` of a MetaTensor, else ``fallback[key]``.

    Used to name the file in a :class:`DataError` raised long after loading (slices, resized data).
    """
    meta = getattr(value, "meta", None)
    if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    if fallback is not None and key is not None and key in fallback:
        path = fallback[key]
        if isinstance(path, (str, PathLike)):
            return str(path)
        if isinstance(path, (list, tuple)) and path:
            return ", ".join(str(p) for p in path)
    return None
