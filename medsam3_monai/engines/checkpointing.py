"""Training checkpoints with exact resume, on Ignite's ``Checkpoint`` + ``DiskSaver`` and MONAI's
``CheckpointLoader``: network, optimiser, scheduler, the engine's counters and torch's RNG, and the network's
configuration, so that a ``checkpoint_iterN.pt`` is also a model file (``--checkpoint``)."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

from ..bundle import in_front_words
from ..compat import skip_batches
from ..networks.outputs import unwrap
from .distributed import barrier, broadcast_object, get_rank

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^checkpoint_iter(\d+)\.pt$")
FILENAME_PATTERN = "checkpoint_iter{global_step}.{ext}"


def _checkpoints(save_dir: str | Path) -> list[tuple[int, Path]]:
    """``(N, path)`` of every ``checkpoint_iterN.pt`` in ``save_dir`` (none when it does not exist), by N."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)))


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The ``checkpoint_iterN.pt`` with the largest N in ``save_dir``, or None."""
    found = _checkpoints(save_dir)
    return found[-1][1] if found else None


#: the name of a temporary file Python's ``tempfile`` makes (Ignite's ``DiskSaver`` writes each checkpoint to one)
_INTERRUPTED_WRITE = re.compile(r"tmp[a-z0-9_]{8}")

TRAINING_STATE = ("trainer", "checkpointer")  # what every checkpoint_iterN.pt holds beside the trained objects
#: objects a resume restores when the checkpoint holds them (older checkpoints were written without), and what a
#: resume from such a checkpoint does without them
OPTIONAL_STATE = {
    "best_model": "its best value is not known, so the first validation rewrites the best model's file",
    "training_data": "the training items it was trained on are not known, so other data is not detected",
}


def stored_keys(path: Path) -> set[str]:
    """The top-level keys of a checkpoint file (memory-mapped: the tensors are not read; a full-size checkpoint with
    its optimiser is gigabytes); empty when it is not a mapping."""
    stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    keys = set(stored) if isinstance(stored, Mapping) else set()
    del stored
    return keys


def check_resume_source(resume: bool | str, needed: tuple[str, ...] = TRAINING_STATE,
                        keys: set[str] | None = None) -> None:
    """Refuse a ``--resume`` path that is not a file, or not a training checkpoint holding ``needed`` (a model file
    such as ``models/model.pt`` is not one), before anything is cached or written; ``True`` / ``False`` pass.
    ``keys``: the file's :func:`stored_keys` when already read."""
    if isinstance(resume, bool):
        return
    path = Path(resume).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--resume '{resume}': no such checkpoint file. Give a checkpoint_iterN.pt of "
                                "runs/checkpoints, true (the latest one there, if any) or false (start afresh)")
    keys = stored_keys(path) if keys is None else keys
    missing = [name for name in needed if name not in keys]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}: it is not a training checkpoint of this bundle "
                         "(checkpoint_iterN.pt). To fine-tune from a model file, pass it as --checkpoint; to "
                         "start afresh, --resume false or another bundle_root")


def check_resume_checkpoint(resume: bool | str, save_dir: str | Path, max_epochs: int,
                            items: Sequence[Mapping[str, Any]] | None = None, batch_size: int | None = None,
                            replicas: int = 1, image_size: int | None = None,
                            resize_kernel: str | None = None, ct_window: Any = None) -> None:
    """Before the data is cached, what the checkpoint a resume would start from already tells (read memory-mapped):
    a network of another slice space than ``image_size`` is refused, and so are training ``items`` other than its
    own or another ``resize_kernel`` (:class:`TrainingData`'s check, which the resume itself makes only after
    caching) and epochs of another
    length (``items`` in batches of ``batch_size`` on each of ``replicas`` processes, as the bundles'
    ``DistributedSampler`` and ``DataLoader`` make them); and when it has trained ``max_epochs`` epochs the process
    ends (status 0) with a warning, as rerunning a finished training would cache everything and rewrite the final
    model to train nothing."""
    from ..networks.checkpoints import described_image_size

    if resume is False:
        return
    path = latest_checkpoint(save_dir) if resume is True else Path(resume).expanduser()
    if path is None or not path.is_file():
        return
    stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    trainer = stored.get("trainer") if isinstance(stored, Mapping) else None
    fingerprint = stored.get("training_data") if isinstance(stored, Mapping) else None
    trained_size = described_image_size(stored.get("network_config")) if isinstance(stored, Mapping) else None
    from ..networks.checkpoints import described_preprocessing

    recorded = described_preprocessing(stored.get("network_config")) if isinstance(stored, Mapping) else {}
    del stored
    if ct_window is not None and "ct_window" in recorded:
        from ..inferers.trained_settings import same_setting

        if not same_setting("ct_window", ct_window, recorded["ct_window"]):
            raise ValueError(f"checkpoint {path} was trained with ct_window {recorded['ct_window']!r} and this run's "
                             f"is {ct_window!r}: resume with --ct_window {recorded['ct_window']!r}, or start afresh "
                             "with --resume false")
    if image_size is not None and trained_size is not None and trained_size != int(image_size):
        raise ValueError(f"checkpoint {path} was trained at {trained_size} px and this run's slice space is "
                         f"{int(image_size)} px: resume with --image_size {trained_size} (and the --checkpoint it "
                         "started from), or start afresh with --resume false")
    if items is not None and isinstance(fingerprint, Mapping):
        TrainingData(items, resize_kernel).load_state_dict(fingerprint)
    if not isinstance(trainer, Mapping) or not trainer.get("epoch_length"):
        return
    if items is not None and batch_size:
        per_process = math.ceil(len(items) / max(1, int(replicas)))  # DistributedSampler(even_divisible=True)
        _check_epoch_length(path, int(trainer["epoch_length"]), range(math.ceil(per_process / int(batch_size))))
    epoch = int(trainer.get("epoch") or int(trainer.get("iteration", 0)) // int(trainer["epoch_length"]))
    if epoch >= max_epochs:
        if get_rank() == 0:
            logger.warning(in_front_words("%s finished epoch %d of max_epochs %d: nothing left to train, so no data "
                                          "was cached and no model or checkpoint written; raise --max_epochs to "
                                          "train on, or pass --resume false to start afresh"), path, epoch, max_epochs)
        raise SystemExit(0)


def _check_epoch_length(path: Path, epoch_length: int | None, loader: Any) -> None:
    """Refuse to resume on data whose epochs are not as long as the checkpoint's (another datalist or batch size):
    Ignite would keep the checkpoint's epoch length and cycle the new loader to fill it."""
    try:
        batches = len(loader)
    except TypeError:  # an iterable without a length: nothing to compare
        return
    if epoch_length and batches != epoch_length:
        raise ValueError(f"checkpoint {path} was written by a training whose epochs had {epoch_length} "
                         f"iteration{'s' if epoch_length != 1 else ''}; the data given now makes {batches}: resume "
                         "with the datalists, batch size and torchrun process count it was trained with, or start "
                         "afresh with --resume false (to fine-tune on other data from its weights, pass the run's "
                         "models/model.pt as --checkpoint)")


class TrainingData:
    """The training items as a checkpointable object: a fingerprint of their cases (dataset and image file name,
    not the folders, so a moved data root still resumes) and of their prompts, and the slice-space resize kernel
    (``resize_kernel``: how the network saw the pictures), saved in every training checkpoint; a resume on other
    items, on the same images with other prompts, or with the other kernel, is refused (a different epoch length alone
    would not show same-sized other data). Checkpoints of before a fingerprint's part are not compared on it.

    ``num_workers`` (the loader's) is recorded too: each loader worker draws its own random stream (MONAI's
    ``worker_init_fn`` re-seeds the random transforms), so the draws (volume slices, box prompts, negatives) depend on
    the worker count. A resume with another count is warned about: it trains on, but not as the uninterrupted run
    would have."""

    def __init__(self, items: Sequence[Mapping[str, Any]], resize_kernel: str | None = None,
                 num_workers: int | None = None) -> None:
        self.items = items
        self.resize_kernel = resize_kernel
        self.num_workers = num_workers

    def state_dict(self) -> dict[str, Any]:
        import hashlib
        import json

        def digest(lines: list[str]) -> str:
            return hashlib.sha256("\n".join(sorted(lines)).encode("utf-8")).hexdigest()

        names = [f"{item.get('dataset', '')}/{Path(str(item.get('image', ''))).name}" for item in self.items]
        prompts = [f"{name} {json.dumps(item.get('prompts'), sort_keys=True, default=str)}"
                   for name, item in zip(names, self.items)]
        kernel = {} if self.resize_kernel is None else {"resize_kernel": self.resize_kernel}
        workers = {} if self.num_workers is None else {"num_workers": int(self.num_workers)}
        return {"cases": len(names), "sha256": digest(names), "prompts_sha256": digest(prompts), **kernel, **workers}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = self.state_dict()
        trained, now = state.get("resize_kernel"), mine.get("resize_kernel")
        if trained is not None and now is not None and trained != now:
            raise ValueError(f"the checkpoint was written by a training whose pictures were resized with the "
                             f"'{trained}' kernel, and this run's resize kernel is '{now}': resume with "
                             f"--resize_kernel '{trained}', or start afresh with --resume false")
        if state.get("sha256") == mine["sha256"] and state.get("prompts_sha256", mine["prompts_sha256"]) != \
                mine["prompts_sha256"]:  # (checkpoints of before the prompts' fingerprint: not compared)
            raise ValueError("the checkpoint was written by a training whose items had other prompts (the label -> "
                             "concept texts of the same images): resume with the datalists it was trained on, or "
                             "start afresh with --resume false (to fine-tune on the new prompts from its weights, "
                             "pass the run's models/model.pt as --checkpoint)")
        if state.get("sha256") != mine["sha256"]:
            counts = (f"{mine['cases']} training items, as now, but other images" if state.get("cases") == mine["cases"]
                      else f"{state.get('cases')} training items; the datalists given now hold {mine['cases']}")
            raise ValueError(f"the checkpoint was written by a training on other data ({counts}): resume with the "
                             "datalists it was trained on, or start afresh with --resume false (to fine-tune on "
                             "other data from its weights, pass the run's models/model.pt as --checkpoint)")
        trained, now = state.get("num_workers"), mine.get("num_workers")
        if trained is not None and now is not None and trained != now and get_rank() == 0:
            # the value inside the text, so that `medsam3 train` says --set num_workers=N
            logger.warning("%s", in_front_words(
                f"the checkpoint was written by a training with num_workers {int(trained)} and this run has "
                f"{int(now)}: each loader worker draws its own random stream (volume slices, box prompts, negatives), "
                f"so the rest of this run differs from the uninterrupted one; resume with --num_workers {int(trained)} "
                "to repeat it exactly"))


class TorchRNGState:
    """torch's global CPU RNG as a checkpointable object (dropout draws after a resume match the first run)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"cpu": torch.get_rng_state()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])


class NetworkConfig:
    """A ``MedSAM3Net``'s SAM3 configuration as a checkpointable object, saved in every training checkpoint as
    ``network_config`` (our model file's description, ``networks.checkpoints.model_description``) so that
    ``MedSAM3Net(path)`` and every ``--checkpoint`` build the network a ``checkpoint_iterN.pt`` holds; a resume does
    not read it. ``preprocessing``: the training's ``resize_kernel`` and ``ct_window``, recorded with it."""

    def __init__(self, network: torch.nn.Module, preprocessing: Mapping[str, Any] | None = None) -> None:
        self.network, self.preprocessing = network, preprocessing

    def state_dict(self) -> dict[str, Any]:
        from ..networks.checkpoints import model_description

        return model_description(self.network.sam3, self.preprocessing)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore: the configuration is the network's own."""


class TrainingCheckpoint:
    """Save every ``save_interval`` iterations and at the end; resume from the latest checkpoint at start.

    Saving and rotation are Ignite's ``Checkpoint`` with a ``DiskSaver`` (atomic writes, rank 0 only, the
    checkpointer's own list of files included so that rotation continues across a resume); loading is MONAI's
    ``CheckpointLoader`` (which keeps the engine's ``max_epochs``).

    Args:
        save_dir: folder of ``checkpoint_iterN.pt`` files.
        objects: name -> object with ``state_dict``/``load_state_dict`` (network, optimizer, lr_scheduler).
        save_interval: iterations between checkpoints (with gradient accumulation, a due checkpoint waits for the
            next optimiser step: the accumulated gradients are not saved).
        n_saved: checkpoints kept (oldest deleted).
        resume: ``True`` resumes from the latest checkpoint in ``save_dir`` when one exists, a path resumes from
            that file, ``False`` starts fresh.
        preprocessing: the training's ``{"resize_kernel", "ct_window"}``, recorded beside the network's
            configuration (``network_config``) for an inference from the checkpoint to repeat.

    Resume is exact at any iteration: with per-epoch seeding (``EpochSeedHandler``) the resumed epoch draws the
    same data order and random transforms; the batches the killed run had already trained on are drawn again and
    skipped, and torch's global RNG (dropout) is restored as it was when the checkpoint was written.

    Under DistributedDataParallel attach it on every rank: rank 0 alone saves, and every rank loads the
    checkpoint rank 0 picks (``save_dir`` must be visible to every rank, e.g. a shared file system).
    """

    def __init__(self, save_dir: str, objects: Mapping[str, Any], save_interval: int = 100, n_saved: int = 2,
                 resume: bool | str = True, preprocessing: Mapping[str, Any] | None = None) -> None:
        if save_interval < 1:
            raise ValueError(f"save_interval must be >= 1, got {save_interval}")
        check_resume_source(resume)  # before DiskSaver makes save_dir: a refused start leaves no empty folder
        self.save_dir = Path(save_dir)
        self.objects = {name: unwrap(obj) if isinstance(obj, torch.nn.Module) else obj
                        for name, obj in objects.items()}
        self.save_interval, self.resume = save_interval, resume
        self.resumed_from: Path | None = None
        self._skip_batches = 0
        self._rng = TorchRNGState()
        self._rng_state = torch.get_rng_state()
        self._checkpointer: Checkpoint | None = None
        self._n_saved = n_saved
        self._save_due = False
        self.preprocessing = preprocessing

    def _to_save(self, engine: Engine) -> dict[str, Any]:
        return {**self.objects, "trainer": engine, "torch_rng": self._rng}

    def _saved(self, engine: Engine) -> dict[str, Any]:
        """What a checkpoint holds: what a resume restores, and the network's configuration (a ``MedSAM3Net``'s)."""
        network = self.objects.get("network")
        described = ({"network_config": NetworkConfig(network, self.preprocessing)} if hasattr(network, "sam3")
                     else {})
        return {**self._to_save(engine), **described}

    def attach(self, engine: Engine) -> None:
        self._checkpointer = Checkpoint(
            self._saved(engine), DiskSaver(self.save_dir, require_empty=False),
            filename_pattern=FILENAME_PATTERN, n_saved=self._n_saved, include_self=True,
            global_step_transform=lambda engine, _event: engine.state.iteration,
        )
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._save_when_due)
        engine.add_event_handler(Events.COMPLETED, self.save)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._resume_mid_epoch)

    def _save_when_due(self, engine: Engine) -> None:
        """Every ``save_interval`` iterations, at the next optimiser step: inside a gradient accumulation window
        the gradients accumulated so far (not saved) would be lost, and a resume from it would not be exact."""
        if engine.state.iteration % self.save_interval == 0:
            self._save_due = True
        if self._save_due and _ends_a_step(engine):
            self._save_due = False
            self.save(engine)

    def save(self, engine: Engine) -> Path | None:
        """Write ``checkpoint_iter<iteration>.pt`` (once per iteration) and drop the oldest beyond ``n_saved``."""
        assert self._checkpointer is not None, "attach the handler to the trainer first"
        path = self.save_dir / FILENAME_PATTERN.format(global_step=engine.state.iteration, ext="pt")
        if self._checkpointer.last_checkpoint is None or Path(self._checkpointer.last_checkpoint) != path:
            self._checkpointer(engine)  # its DiskSaver writes on rank 0 only
            if get_rank() == 0:
                logger.info("saved training checkpoint %s", path)
        return path

    def _resume_mid_epoch(self, engine: Engine) -> None:
        """First batch after a mid-epoch resume: draw and drop the batches already trained on, restore the RNG."""
        if not self._skip_batches:
            return
        skip, self._skip_batches = self._skip_batches, 0
        skip_batches(engine, skip)  # the epoch's seeding was replayed at EPOCH_STARTED: same order and draws
        torch.set_rng_state(self._rng_state)  # as it was when the checkpoint was written
        logger.info("skipped the %d batches of this epoch trained on before the checkpoint", skip)

    def _forget_missing_files(self, resumed_from: Path) -> None:
        """Drop from the restored rotation list the files that are not in ``save_dir`` (a checkpoint of another
        folder, or older ones deleted or rotated away since it was written), so that rotation never deletes a file
        that is not there; warn about newer checkpoints, which an automatic resume could pick over this run's."""
        assert self._checkpointer is not None
        state = self._checkpointer.state_dict()
        state["_saved"] = [(priority, name) for priority, name in state["_saved"] if (self.save_dir / name).is_file()]
        self._checkpointer.load_state_dict(state)
        match = _NAME.match(resumed_from.name)
        if match is None or get_rank() != 0:
            return
        newer = [path.name for n, path in _checkpoints(self.save_dir) if n > int(match.group(1))]
        if newer:
            logger.warning("%s holds checkpoints newer than %s (%s), of the run that went on from it: delete them, "
                           "or a later automatic resume may pick one of them instead of this run's newest",
                           self.save_dir, resumed_from.name, ", ".join(newer))

    def _remove_interrupted_writes(self) -> None:
        """Delete the temporary files of checkpoint writes a killed run left (``DiskSaver`` writes a ``tmpXXXXXXXX``
        file in ``save_dir`` and renames it when done; a SIGTERM or a crash mid-write keeps it forever)."""
        if get_rank() != 0 or not self.save_dir.is_dir():
            return
        for path in self.save_dir.iterdir():
            if path.is_file() and _INTERRUPTED_WRITE.fullmatch(path.name):
                path.unlink()
                logger.info("removed %s, an unfinished checkpoint write of an interrupted run", path)

    def _set_aside_earlier_run(self) -> None:
        """A fresh start (``resume=False``) in a folder that holds an earlier run's checkpoints: move its ``.pt``
        files (``checkpoint_iterN.pt``, ``model_best_val_dice.pt``) to ``earlier_<time>/`` beside them, so that a
        later resume starts from this run's newest checkpoint and the best model is this run's."""
        if get_rank() == 0 and self.save_dir.is_dir():
            earlier = sorted(p for p in self.save_dir.iterdir() if p.is_file() and p.suffix == ".pt")
            if earlier:
                import time

                aside = self.save_dir / f"earlier_{time.strftime('%Y%m%d_%H%M%S')}"
                aside.mkdir(exist_ok=True)
                for path in earlier:
                    path.rename(aside / path.name)
                logger.warning(in_front_words("--resume false: the %d checkpoint file(s) of the earlier run in %s "
                                              "(%s) are moved to %s, so that a later resume continues this run"),
                               len(earlier), self.save_dir, ", ".join(p.name for p in earlier), aside)
        barrier()  # DDP: no rank starts (nor rank 0 saves) before the folder is this run's

    def load(self, engine: Engine) -> None:
        from monai.handlers import CheckpointLoader

        self._remove_interrupted_writes()
        if self.resume is False:
            self._set_aside_earlier_run()
            return
        path = latest_checkpoint(self.save_dir) if self.resume is True else Path(self.resume)
        path = broadcast_object(path)  # DDP: every rank resumes from rank 0's choice (only rank 0 saves)
        if path is None:
            return
        to_load = {**self._to_save(engine), "checkpointer": self._checkpointer}
        keys = stored_keys(path)
        for name, without in OPTIONAL_STATE.items():
            if name in to_load and name not in keys:
                del to_load[name]
                if get_rank() == 0:
                    logger.warning("%s was written without the %s state: %s", path, name, without)
        check_resume_source(str(path), tuple(to_load), keys)  # MONAI's loader, below, reads the file once
        try:
            CheckpointLoader(str(path), to_load, map_location="cpu")(engine)
        except RuntimeError as error:  # torch's load_state_dict report: another architecture
            if "Error(s) in loading state_dict" not in str(error):
                raise
            lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
            shown = "; ".join(lines[:3]) + (f"; and {len(lines) - 3} more" if len(lines) > 3 else "")
            raise ValueError(f"checkpoint {path} holds a network of another architecture than this run's ({shown}): "
                             "resume with the --checkpoint and --image_size it was trained with, or start afresh "
                             "with --resume false") from None
        except ValueError as error:
            if "parameter group" not in str(error):
                raise
            raise ValueError(f"checkpoint {path} was written by a training with other trainable parameters ({error}):"
                             " resume with the settings it was trained with (the same --mode, e.g. medsam3 or full, "
                             "and the same frozen parts), or start afresh with --resume false") from error
        self._forget_missing_files(path)
        self._rng_state = torch.get_rng_state()  # the checkpoint's; EPOCH_STARTED re-seeds before the first batch
        self.resumed_from = path
        epoch_length = engine.state.epoch_length
        _check_epoch_length(path, epoch_length, engine.state.dataloader)
        self._skip_batches = engine.state.iteration % epoch_length if epoch_length else 0
        barrier()  # DDP: no rank trains (nor rank 0 saves) before every rank has loaded
        logger.info("resumed from %s at iteration %d (epoch %d)", path, engine.state.iteration, engine.state.epoch)
        if engine.state.max_epochs is not None and engine.state.epoch >= engine.state.max_epochs:
            logger.warning(in_front_words("the training in %s finished at epoch %d of max_epochs %d: nothing left to "
                                          "train; raise --max_epochs to train on, or pass --resume false to start "
                                          "afresh"), self.save_dir, engine.state.epoch, engine.state.max_epochs)


def _ends_a_step(engine: Engine) -> bool:
    """Whether the iteration just completed ended with an optimiser step (every one without gradient accumulation;
    ``MedSAM3Trainer._should_zero_and_step`` says so with it)."""
    should = getattr(engine, "_should_zero_and_step", None)
    if getattr(engine, "accumulation_steps", 1) <= 1 or should is None:
        return True
    return bool(should(engine)[1])
