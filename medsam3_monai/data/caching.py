"""Datasets and loaders for the bundles: cache the deterministic head of a transform chain, rerun the rest.

MONAI's cached datasets run the transforms up to the first random one (for the training chain: load, decode
mask, intensity by modality) once and keep the result; everything from the first random transform on
(``RandAxialSliced`` and after: instances, resize, normalisation, targets, negatives) runs again on every
access, so each epoch still draws new slices and negatives.

* ``"memory"``: :class:`monai.data.CacheDataset`, filled when built (``cache_rate`` of the items; the rest
  is transformed on the fly). Fastest; costs RAM (a 2D RGB image ~ 3 x H x W float32, a volume its voxels).
* ``"disk"``: :class:`monai.data.PersistentDataset` in ``cache_dir`` (one ``.pt`` per item, written on first
  access, reused by later runs). The file name hashes the item with the size and modification time of the files
  it names (``image``, ``label``, ``instance_ids``; every file of a DICOM series folder), the deterministic
  transforms with their settings, and the source code of the modules defining them (with MONAI's version): changing
  any of those makes new files (old ones are not removed; the folder is safe to delete). MetaTensors keep their
  metadata (affine, applied operations) so ``Invertd`` and the slice axis still work on cache hits.
* ``"none"``: :class:`monai.data.Dataset`, everything every time.

Example (bundle JSON)::

    "dataset": {"_target_": "medsam3_monai.data.build_dataset", "data": "@train#data",
                "transform": "@train#preprocessing", "cache": "memory", "num_workers": "@num_workers"}
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset, ThreadDataLoader
from monai.data.utils import pickle_hashing
from monai.transforms import Compose, Randomizable

__all__ = ["CACHE_MODES", "build_dataloader", "build_dataset", "build_training_dataset", "is_picture_item"]

CACHE_MODES = ("memory", "disk", "none")


def build_dataset(
    data: Sequence[Any],
    transform: Callable | Sequence[Callable],
    cache: str | None = "memory",
    cache_dir: str | Path | None = None,
    cache_rate: float = 1.0,
    num_workers: int = 0,
    progress: bool = True,
) -> Dataset:
    """A MONAI dataset of ``data`` (datalist items) through ``transform``, cached as ``cache`` says.

    Args:
        data: datalist items (e.g. ``load_datalists(paths, "training")``).
        transform: a ``Compose`` (or a list of transforms, composed here).
        cache: ``"memory"`` (CacheDataset), ``"disk"`` (PersistentDataset in ``cache_dir``) or ``"none"``
            (``None`` means ``"none"``).
        cache_dir: folder of the disk cache (created if missing); required for ``"disk"``, unused otherwise.
        cache_rate: fraction of the items cached in memory (``"memory"`` only), in ``(0, 1]``.
        num_workers: threads filling the memory cache (0 and 1 both mean one).
        progress: show a progress bar while filling the memory cache.

    Raises:
        ValueError: unknown ``cache`` mode, ``"disk"`` without ``cache_dir``, ``cache_rate`` out of range.
    """
    mode = "none" if cache is None else str(cache).lower()
    if mode not in CACHE_MODES:
        raise ValueError(f"unknown cache mode {cache!r}: use one of {', '.join(map(repr, CACHE_MODES))}")
    if not 0.0 < float(cache_rate) <= 1.0:
        raise ValueError(f"cache_rate must be in (0, 1], got {cache_rate}")
    if mode == "disk" and not cache_dir:
        raise ValueError("cache='disk' needs cache_dir (a folder for the cached items), e.g. cache_dir='runs/cache'")
    if not isinstance(transform, Compose):
        transform = Compose(transform)
    if mode == "memory":
        return CacheDataset(data=data, transform=transform, cache_rate=cache_rate,
                            num_workers=max(int(num_workers), 1), progress=progress)
    if mode == "disk":
        # track_meta keeps MetaTensors (affine, applied operations) in the files; weights_only=False reads them
        # back (metadata holds numpy arrays and strings): point cache_dir only at a folder this package wrote.
        # MONAI hashes the deterministic head via ``transform.flatten()``, whose new Compose reseeds the random
        # transforms (from ``get_seed()``): keep their generators so a seeded chain stays seeded.
        generators = _generators(transform)
        dataset = RebuildingPersistentDataset(data=data, transform=transform, cache_dir=cache_dir,
                                              hash_func=_hash_item, hash_transform=_hash_transforms, track_meta=True,
                                              weights_only=False)
        for randomizable, generator in generators:
            randomizable.R = generator
        return dataset
    return Dataset(data=data, transform=transform)


class RebuildingPersistentDataset(PersistentDataset):
    """MONAI's PersistentDataset that treats its folder as derived data: a folder removed during a run is made again,
    and a cache file that cannot be read (cut short by a full disk or an interrupted copy) is named in a warning,
    deleted and computed again. MONAI's own recomputes only a file it recognises as not a pickle."""

    def _cachecheck(self, item_transformed: Any) -> Any:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            return super()._cachecheck(item_transformed)
        except (OSError, RuntimeError, EOFError) as error:
            hashfile = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"
            if not hashfile.is_file():  # not the cache file's fault: the item's own error
                raise
            warnings.warn(f"unreadable cache file {hashfile} ({error}): deleting and computing it again",
                          stacklevel=2)
            hashfile.unlink(missing_ok=True)
            return super()._cachecheck(item_transformed)


#: the keys of a datalist item that name files the cached transforms read
FILE_KEYS = ("image", "label", "instance_ids")


def _file_stamp(path: Any) -> Any:
    """(size, mtime in ns) of a file, the same of every file of a folder (a DICOM series), a list of those for a
    list of paths (several masks), None for anything else."""
    if isinstance(path, (list, tuple)):
        return [_file_stamp(one) for one in path]
    try:
        if os.path.isdir(path):
            return sorted((entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
                          for entry in os.scandir(path) if entry.is_file())
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime_ns
    except (OSError, TypeError, ValueError):
        return None


def _hash_item(item: Any) -> bytes:
    """Disk-cache key of a datalist item: the item, and the stamps of the files it names (a file changed on disk
    under the same name is read again, not taken from the cache)."""
    if isinstance(item, dict):
        named = [key for key in FILE_KEYS if isinstance(item.get(key), (str, Path, list, tuple))]  # a list: masks
        stamps = {key: _file_stamp(item[key]) for key in named}
        item = {**item, "__file_stamps__": stamps}
    return pickle_hashing(item)


@functools.lru_cache(maxsize=None)
def _source_digest(module_name: str) -> str:
    """Hash of a module's source file ('' when it has none): a fix inside a transform makes new cache files."""
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""
    except OSError:
        return ""


def _code_stamp(transforms: Sequence[Any]) -> dict[str, str]:
    """The source hashes of this package's modules that define ``transforms``, and MONAI's version."""
    import monai

    modules = sorted({type(t).__module__ for t in transforms if type(t).__module__.startswith("medsam3_monai")})
    return {"monai": monai.__version__, **{name: _source_digest(name) for name in modules}}


def _hash_transforms(transforms: Sequence[Any]) -> bytes:
    """Hash of the deterministic head (objects, settings and the code of their modules); by class names when an
    object cannot be pickled."""
    code = _code_stamp(transforms)
    try:
        return pickle_hashing([code, transforms])
    except Exception:  # noqa: BLE001 - e.g. a lambda inside a Lambdad
        return pickle_hashing([code, [f"{type(t).__module__}.{type(t).__qualname__}" for t in transforms]])


def _generators(transform: Any) -> list[tuple[Randomizable, Any]]:
    """``(transform, its RandomState)`` for every randomizable transform in a (nested) Compose."""
    found, stack = [], [transform]
    while stack:
        current = stack.pop()
        if isinstance(current, Randomizable):
            found.append((current, current.R))
        if isinstance(current, Compose):
            stack.extend(current.transforms)
    return found


def is_picture_item(item: dict[str, Any]) -> bool:
    """A 2D picture (PNG, JPEG, TIFF, a single-frame DICOM file, ...) rather than a volume (NIfTI, a series folder,
    ...): :func:`~medsam3_monai.transforms.io.is_picture_path`."""
    from ..transforms.io import is_picture_path

    return is_picture_path(str(item["image"]))


def build_training_dataset(
    data: Sequence[dict[str, Any]],
    picture_transform: Any,
    volume_transform: Any,
    cache: str | None = "memory",
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    progress: bool = True,
):
    """The training set as two cached datasets: 2D pictures through ``picture_transform`` and volumes through
    ``volume_transform`` (a ``ConcatDataset``: pictures first, then volumes, each in datalist order).

    A picture has one slice, so its chain (``train#picture_preprocessing``) is deterministic up to the sampled
    negative prompts and the cache holds it in slice space with its targets (load, decode, intensity, instances,
    resize, normalisation); a volume's chain draws its slice first (``RandAxialSliced``), so only its
    deterministic head (load, decode, intensity) is cached. Both produce what the single training chain would.
    """
    from torch.utils.data import ConcatDataset

    pictures = [item for item in data if is_picture_item(item)]
    volumes = [item for item in data if not is_picture_item(item)]
    parts = []
    for items, transform, folder in ((pictures, picture_transform, "pictures"), (volumes, volume_transform, "volumes")):
        if items:
            sub_dir = None if cache_dir is None else Path(cache_dir) / folder
            parts.append(build_dataset(items, transform, cache=cache, cache_dir=sub_dir, num_workers=num_workers,
                                       progress=progress))
    if not parts:
        raise ValueError("no training items: the datalists' training lists are empty")
    return ConcatDataset(parts)


def build_dataloader(
    dataset: Dataset,
    batch_size: int = 1,
    shuffle: bool = False,
    sampler: Any = None,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    thread: bool = False,
    **kwargs: Any,
) -> DataLoader:
    """A MONAI ``DataLoader`` (or ``ThreadDataLoader`` with ``thread=True``) over ``dataset``.

    ``thread=True`` helps when the data are cached (``cache="memory"``) and what remains per item is cheap
    (the random tail: slice pick, resize, targets): a background thread prepares the next batch while the
    step runs, with ``num_workers=0`` and no worker processes, so the cache is neither copied nor pickled
    across processes. With slow per-item work (uncached decoding of large files) worker processes
    (``num_workers > 0``, either class) scale better. ``kwargs`` go to the loader (``pin_memory``,
    ``generator``, ``buffer_size``/``repeats`` of ``ThreadDataLoader``, ...). MONAI's loader reseeds the
    dataset's random transforms from torch's generator (``generator`` if given) when it is built.

    Raises:
        ValueError: both ``shuffle`` and ``sampler`` given, or ``batch_size`` < 1.
    """
    if shuffle and sampler is not None:
        raise ValueError("give shuffle=True or a sampler, not both (a sampler decides the order itself)")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    loader_kwargs: dict[str, Any] = dict(batch_size=int(batch_size), shuffle=bool(shuffle), sampler=sampler,
                                         num_workers=int(num_workers), **kwargs)
    if collate_fn is not None:
        loader_kwargs["collate_fn"] = collate_fn
    if thread:
        return ThreadDataLoader(dataset, **loader_kwargs)
    return DataLoader(dataset, **loader_kwargs)
