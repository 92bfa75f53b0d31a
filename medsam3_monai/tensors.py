"""Plain tensors out of MONAI's ``MetaTensor`` (or arrays), for code that reads values, not metadata; and the data
path's whole-tensor checks (finite values, whole numbers), read a cache-sized chunk at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["CHECK_CHUNK", "all_chunks", "all_finite", "all_near_integers", "plain_tensor", "resolve_device",
           "voxel_spacing"]

#: elements :func:`all_chunks` reads at a time: numpy's temporaries of a chunk stay in the CPU's cache
CHECK_CHUNK = 1 << 16
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def plain_tensor(x: Any) -> torch.Tensor:
    """``x`` as a plain ``torch.Tensor``: a tensor subclass such as ``MetaTensor`` as a view (same storage, same
    autograd history; what ``MetaTensor.as_tensor`` returns), anything else through ``torch.as_tensor``.

    A subclass runs every operation through its ``__torch_function__``: in the network that cost a training step of
    the tiny network 1.5x the time and its forward 2x, for metadata the network never reads."""
    if isinstance(x, torch.Tensor):
        return x if type(x) is torch.Tensor else x.as_subclass(torch.Tensor)
    return torch.as_tensor(x)


def all_chunks(x: torch.Tensor, test: Callable[[np.ndarray], bool]) -> bool | None:
    """Whether ``test`` holds for every chunk of ``CHECK_CHUNK`` values of ``x`` (flattened, as a numpy array),
    stopping at the first that fails; None when ``x`` is not a CPU float16/32/64 tensor (numpy cannot view it).

    For whole-tensor checks in the data path: numpy's ufuncs on a chunk that stays in the CPU's cache, where
    torch's composite checks (``isfinite``, ``allclose``) make several full passes and tensor-sized temporaries,
    many times the time on one thread (a data loader worker; ``scripts/bench_eval.py``'s ``volume_loading``)."""
    x = plain_tensor(x).detach()
    if x.device.type != "cpu" or x.dtype not in _NUMPY_FLOATS:
        return None
    flat = x.numpy().reshape(-1)  # a view of a contiguous tensor (a copy of a strided one)
    return all(bool(test(flat[start:start + CHECK_CHUNK])) for start in range(0, flat.size, CHECK_CHUNK))


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite (no NaN, no +-inf); True for integer and bool tensors, unread.
    (:func:`all_chunks` in numpy; other devices and bfloat16 with torch.)"""
    if not plain_tensor(x).is_floating_point():
        return True
    finite = all_chunks(x, lambda chunk: np.isfinite(chunk).all())
    return bool(torch.isfinite(x).all()) if finite is None else finite


def all_near_integers(x: torch.Tensor, atol: float = 1e-3, rtol: float = 1e-5) -> bool:
    """``torch.allclose(torch.round(x), x, rtol, atol)`` for a float tensor without NaN/inf: every value within
    ``atol + rtol * |value|`` of its nearest integer (:func:`all_chunks` in numpy; elsewhere torch itself)."""
    near = all_chunks(x, lambda chunk: (np.abs(np.rint(chunk) - chunk) <= atol + rtol * np.abs(chunk)).all())
    return bool(torch.allclose(torch.round(x), x, rtol=rtol, atol=atol)) if near is None else near


def resolve_device(name: str | torch.device) -> torch.device:
    """A ``--device`` value -> ``torch.device``: ``auto`` is CUDA when there is a GPU, else the CPU; ``cpu``,
    ``cuda``, ``cuda:1``, ... are checked against this machine, so a missing GPU is a clear ValueError (what to
    give instead) rather than a driver traceback at the first tensor moved."""
    if isinstance(name, torch.device):
        device = name
    elif str(name).strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(str(name).strip())
        except RuntimeError:
            raise ValueError(f"--device {name!r} is not a device: give auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: this machine has no CUDA GPU that torch {torch.__version__} can use; "
                             "give --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: there are {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def voxel_spacing(affine: Any) -> torch.Tensor:
    """A 4x4 (or 3x4) voxel-to-world ``affine`` -> the voxel size along each array axis, ``(3,)`` float64: the
    lengths of its first three columns."""
    return torch.as_tensor(affine, dtype=torch.float64)[:3, :3].norm(dim=0)
