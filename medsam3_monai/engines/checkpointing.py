"""Training checkpoints with exact resume: network, optimiser, scheduler and the Ignite engine's counters."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.engine import Engine, Events

from ..compat import skip_batches
from ..networks.outputs import unwrap
from .distributed import barrier, broadcast_object

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^checkpoint_iter(\d+)\.pt$")


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The ``checkpoint_iterN.pt`` with the largest N in ``save_dir``, or None."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


class TrainingCheckpoint:
    """Save every ``save_interval`` iterations and at the end; resume from the latest checkpoint at start.

    Args:
        save_dir: folder of ``checkpoint_iterN.pt`` files.
        objects: name -> object with ``state_dict``/``load_state_dict`` (network, optimizer, lr_scheduler).
        save_interval: iterations between checkpoints.
        n_saved: checkpoints kept (oldest deleted).
        resume: ``True`` resumes from the latest checkpoint in ``save_dir`` when one exists, a path resumes from
            that file, ``False`` starts fresh.

    Resume is exact at any iteration: with per-epoch seeding (``EpochSeedHandler``) the resumed epoch draws the
    same data order and random transforms; the batches the killed run had already trained on are drawn again and
    skipped, and torch's global RNG (dropout) is restored as it was when the checkpoint was written.

    Under DistributedDataParallel attach it on every rank: rank 0 alone saves, and every rank loads the
    checkpoint rank 0 picks (``save_dir`` must be visible to every rank, e.g. a shared file system).
    """

    def __init__(self, save_dir: str, objects: Mapping[str, Any], save_interval: int = 100, n_saved: int = 2,
                 resume: bool | str = True) -> None:
        if save_interval < 1:
            raise ValueError(f"save_interval must be >= 1, got {save_interval}")
        self.save_dir = Path(save_dir)
        self.objects = dict(objects)
        self.save_interval, self.n_saved, self.resume = save_interval, n_saved, resume
        self.resumed_from: Path | None = None
        self._skip_batches = 0
        self._rng_state: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._resume_mid_epoch)

    @staticmethod
    def _unwrap(obj: Any) -> Any:
        return unwrap(obj) if isinstance(obj, torch.nn.Module) else obj

    def save(self, engine: Engine) -> Path | None:
        if not _is_rank0():
            return None
        self.save_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_dir / f"checkpoint_iter{engine.state.iteration}.pt"
        if path.exists():
            return path
        payload = {name: self._unwrap(obj).state_dict() for name, obj in self.objects.items()}
        payload["trainer"] = engine.state_dict()
        payload["torch_rng_state"] = torch.get_rng_state()
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        kept = sorted((int(m.group(1)), p) for p in self.save_dir.iterdir() if (m := _NAME.match(p.name)))
        for _, old in kept[: -self.n_saved]:
            old.unlink(missing_ok=True)
        logger.info("saved training checkpoint %s", path)
        return path

    def _resume_mid_epoch(self, engine: Engine) -> None:
        """First batch after a mid-epoch resume: draw and drop the batches already trained on, restore the RNG."""
        if not self._skip_batches:
            return
        skip, self._skip_batches = self._skip_batches, 0
        skip_batches(engine, skip)  # the epoch's seeding was replayed at EPOCH_STARTED: same order and draws
        if self._rng_state is not None:
            torch.set_rng_state(self._rng_state)
        logger.info("skipped the %d batches of this epoch trained on before the checkpoint", skip)

    def load(self, engine: Engine) -> None:
        if self.resume is False:
            return
        path = latest_checkpoint(self.save_dir) if self.resume is True else Path(self.resume)
        path = broadcast_object(path)  # DDP: every rank resumes from rank 0's choice (only rank 0 saves)
        if path is None:
            return
        if not path.is_file():
            raise FileNotFoundError(f"resume checkpoint {path} does not exist")
        payload = torch.load(path, map_location="cpu", weights_only=False)
        missing = [name for name in self.objects if name not in payload]
        if missing:
            raise KeyError(f"checkpoint {path} lacks {missing}; it was not written by this training bundle")
        for name, obj in self.objects.items():
            self._unwrap(obj).load_state_dict(payload[name])
        max_epochs = engine.state.max_epochs
        engine.load_state_dict(payload["trainer"])
        engine.state.max_epochs = max_epochs
        self.resumed_from = path
        epoch_length = engine.state.epoch_length
        self._skip_batches = engine.state.iteration % epoch_length if epoch_length else 0
        self._rng_state = payload.get("torch_rng_state")
        barrier()  # DDP: no rank trains (nor rank 0 saves) before every rank has loaded
        logger.info("resumed from %s at iteration %d (epoch %d)", path, engine.state.iteration, engine.state.epoch)
