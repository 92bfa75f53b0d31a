"""Helpers of the multi-GPU (DistributedDataParallel) training bundle, ``configs/multi_gpu_train.json``.

Launched by ``torchrun``: one process per device, ``LOCAL_RANK``/``RANK``/``WORLD_SIZE`` in the environment.
Every rank builds the same network (same seed), DDP averages the gradients, so all ranks hold identical
parameters after each step; only rank 0 logs, tracks and writes checkpoints, while every rank resumes from the
same checkpoint (see :class:`~medsam3_monai.engines.TrainingCheckpoint`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from collections.abc import Iterable, Sequence, Sized
from typing import Any

import torch
import torch.distributed as dist

from ..networks.outputs import unwrap

logger = logging.getLogger(__name__)

#: Handlers attached on rank 0 only (matched by class name along the MRO): console/tracking logs and files
#: written by one process. Handlers that take part in collectives (ValidationHandler, MetricsSaver, metrics)
#: or that every rank needs (TrainingCheckpoint: it also resumes, OptimizerStepLrSchedule, EpochSeedHandler) stay.
RANK0_ONLY = (
    "StatsHandler",
    "TensorBoardStatsHandler",
    "TensorBoardImageHandler",
    "MLFlowHandler",
    "ClearMLStatsHandler",
    "ClearMLImageHandler",
    "CheckpointSaver",
    "FinalCheckpoint",
    "BestModelCheckpoint",
    "MLflowRunInfoHandler",
    "LossProgressBar",
    "ProgressBar",  # Ignite's, over any engine
)


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def launched_world_size() -> int:
    """The process count ``torchrun`` launched (``WORLD_SIZE``; 1 without it), known before the process group is."""
    return get_world_size() if is_distributed() else int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Rank 0, or a single process."""
    return get_rank() == 0


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU (gloo training)."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init_distributed(device: torch.device | str) -> int:
    """Select ``device`` and join the process group (NCCL on CUDA, gloo on CPU) once; returns the world size."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not is_distributed():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    logger.debug("rank %d of %d on %s", get_rank(), get_world_size(), device)
    return get_world_size()


def destroy_distributed() -> None:
    """Wait for every rank (rank 0 may still be writing its last checkpoint), then leave the process group."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects); unchanged without a process group."""
    if not is_distributed() or get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def _class_names(obj: Any) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def handlers_for_rank(handlers: Sequence[Any] | None, rank0_only: Iterable[str] = RANK0_ONLY) -> list[Any]:
    """All ``handlers`` on rank 0; on other ranks those whose class (or a base class) is not in ``rank0_only``.

    A filter by type rather than the model zoo's slice by position (``handlers[:-2]``): the training checkpoint
    must stay on every rank (it resumes them all) and ``--tracking mlflow`` appends handlers to the list.
    """
    handlers = list(handlers or [])
    if is_main_process():
        return handlers
    names = set(rank0_only)
    return [h for h in handlers if not (_class_names(h) & names)]


def quiet_non_main(*engines: Any) -> None:
    """Ignite engines' own INFO logs ("Epoch[1] Complete", ...) on rank 0 only."""
    if not is_main_process():
        for engine in engines:
            engine.logger.setLevel(logging.WARNING)


def validation_sampler(dataset: Sized, shuffle: bool = False) -> torch.utils.data.DistributedSampler:
    """Shards of the validation set, each item on exactly one rank (uneven shards, exact metrics).

    With fewer items than ranks some ranks would get none (they would skip validation and leave the others
    waiting in the metric's all-reduce; MONAI's sampler refuses it): the shards are then padded by repeating
    items (every rank validates one; the repeated items count twice in the metric) and a warning says so.
    """
    from monai.data import DistributedSampler

    world = get_world_size()
    pad = len(dataset) < world  # MONAI's uneven shards refuse this case; an empty set stays empty on every rank
    if 0 < len(dataset) < world:
        logger.warning(
            "validation set has %d item(s) for %d ranks: items are repeated so that every rank validates one "
            "(the metric counts them twice); add validation items for an exact metric", len(dataset), world
        )
    return DistributedSampler(dataset, even_divisible=pad, num_replicas=world, rank=get_rank(), shuffle=shuffle)


def save_rank_state(network: torch.nn.Module, folder: str | Path, **extra: Any) -> Path:
    """Write this rank's state dict (DDP unwrapped) and ``extra`` to ``folder/rank{r}.pt``.

    A check that DDP kept the replicas in step: after training every ``rank{r}.pt`` must hold the same tensors.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = unwrap(network)
    path = folder / f"rank{get_rank()}.pt"
    payload = {"state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}, **extra}
    with open(path, "wb") as handle:  # (a full disk then raises its OSError: storage_errors)
        torch.save(payload, handle)
    return path
