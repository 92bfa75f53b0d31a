"""BLAS threads in the data path.

The transforms use numpy's BLAS only for tiny products (the instance-mask crops of
:func:`~medsam3_monai.transforms.targets.resize_instances`). OpenBLAS would split some of them over every core
and its idle threads then spin, costing more CPU than the products themselves (~30 % of a 1008-px GBM40 item,
``scripts/bench_data.py``), and in DataLoader workers they also compete with each other. :func:`one_blas_thread`
runs such code on the calling thread only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["one_blas_thread"]

_controller = None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Limit numpy's BLAS to one thread inside the block (threadpoolctl; ~10 us per use)."""
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield
