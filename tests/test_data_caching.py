"""build_dataset / build_dataloader: memory and disk caches give exactly the uncached items, epoch after epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor, PersistentDataset, ThreadDataLoader
from monai.utils import TraceKeys

from _transforms_helpers import SAMPLES, item
from medsam3_monai.data import build_dataloader, build_dataset, build_datalist
from medsam3_monai.transforms import slice_space_transforms

SIZE = 64
EPOCHS = 2


def _without_ids(ops: Any) -> Any:
    """Applied operations minus the transform ids (object ids; PersistentDataset resets them on purpose)."""
    if isinstance(ops, dict):
        return {k: _without_ids(v) for k, v in ops.items() if k != TraceKeys.ID}
    if isinstance(ops, (list, tuple)):
        return [_without_ids(v) for v in ops]
    return ops


def assert_same(a: Any, b: Any, where: str = "item") -> None:
    """Equal values, types, dtypes and shapes, MetaTensor metadata and applied operations included."""
    if isinstance(a, MetaTensor) or isinstance(b, MetaTensor):
        assert isinstance(a, MetaTensor) and isinstance(b, MetaTensor), f"{where}: {type(a)} vs {type(b)}"
        assert_same(a.meta, b.meta, f"{where}.meta")
        assert_same(_without_ids(a.applied_operations), _without_ids(b.applied_operations), f"{where}.ops")
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: {type(a)} vs {type(b)}"
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor)), f"{where}: values differ"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, f"{where}: {a!r} vs {b!r}"
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), f"{where}: {a!r} vs {b!r}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:  # NaN (e.g. meta original_channel_dim of a channel-less mask)
        assert isinstance(b, float) and b != b, f"{where}: {a!r} vs {b!r}"
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def items(shared_data: Path) -> list[dict[str, Any]]:
    """The Kvasir sample's training split (JPEG 2D RGB, via its converter) and one hippocampus volume (3D,
    the affine picks the slice axis). The validation image (1.3 s per pass) is left out to keep this quick."""
    kvasir = build_datalist("Kvasir-SEG_sample", shared_data / "Kvasir-SEG_sample").datalist["training"]
    assert len(kvasir) == 4
    volume = item("MSD_Task04_Hippocampus_cropped", *SAMPLES["MSD_Task04_Hippocampus_cropped"][0])
    return kvasir + [volume]


def _transform():
    """The training chain with a fixed seed: slice sampling and negatives are random, the head is cached.

    ``Compose`` reseeds its random children in its constructor (from ``monai.utils.get_seed()``, random unless
    ``set_determinism`` ran), so the seed is set on the Compose itself.
    """
    transform = slice_space_transforms(SIZE, train=True, slices_per_volume=2,
                                       negative_concepts=["liver", "polyp", "lung"])
    return transform.set_random_state(seed=0)


def _epochs(dataset) -> list[Any]:
    return [dataset[i] for _ in range(EPOCHS) for i in range(len(dataset))]


@pytest.fixture(scope="module")
def uncached(items) -> list[Any]:
    dataset = build_dataset(items, _transform(), cache="none")
    assert type(dataset) is Dataset
    return _epochs(dataset)


def test_uncached_epochs_draw_new_random_parts(uncached, items):
    """The reference itself is random per epoch (else the cache comparisons below could not catch a frozen tail)."""
    first, second = uncached[: len(items)], uncached[len(items):]
    draws = [[t["text"] for s in sample for t in s["targets"]] + [s["image"].meta.get("slice_index") for s in sample]
             for sample in first + second]
    assert draws[: len(items)] != draws[len(items):]


def test_memory_cache_gives_the_uncached_items(items, uncached):
    dataset = build_dataset(items, _transform(), cache="memory", num_workers=2, progress=False)
    assert isinstance(dataset, CacheDataset) and dataset.cache_num == len(items)
    assert dataset._cache[-1]["image"].ndim == 4  # the volume is cached whole, before slice sampling
    assert_same(_epochs(dataset), uncached)


def test_memory_cache_rate_caches_a_fraction(items):
    dataset = build_dataset(items, _transform(), cache="memory", cache_rate=0.5, progress=False)
    assert dataset.cache_num == len(items) // 2


def test_disk_cache_writes_files_and_gives_the_uncached_items(items, uncached, tmp_path):
    cache_dir = tmp_path / "cache"
    dataset = build_dataset(items, _transform(), cache="disk", cache_dir=cache_dir)
    assert isinstance(dataset, PersistentDataset)
    assert_same(_epochs(dataset), uncached)  # epoch 1 writes the files, epoch 2 reads them back
    files = sorted(cache_dir.glob("*.pt"))
    assert len(files) == len(items)
    stamps = [f.stat().st_mtime_ns for f in files]
    again = build_dataset(items, _transform(), cache="disk", cache_dir=cache_dir)  # a later run: all hits
    assert_same([again[i] for i in range(len(items))], uncached[: len(items)])
    assert [f.stat().st_mtime_ns for f in sorted(cache_dir.glob("*.pt"))] == stamps


def test_disk_cache_files_change_with_the_deterministic_transforms(items, tmp_path):
    build_dataset(items[:1], _transform(), cache="disk", cache_dir=tmp_path)[0]
    other = slice_space_transforms(SIZE, train=True, ct_window="lung", seed=0)  # same names, other settings
    build_dataset(items[:1], other, cache="disk", cache_dir=tmp_path)[0]
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_a_file_changed_under_its_name_is_read_again_not_taken_from_the_disk_cache(items, tmp_path):
    """helper-91: a corrected mask saved under the same name went on training on the old targets, run after run."""
    import shutil
    import sys

    from medsam3_monai.data import caching

    folder = tmp_path / "data"
    folder.mkdir()
    image, label = (Path(shutil.copy(items[0][key], folder)) for key in ("image", "label"))
    changed = dict(items[0], image=str(image), label=str(label))
    cache = tmp_path / "cache"
    first = build_dataset([changed], _transform(), cache="disk", cache_dir=cache)[0]
    flipped = np.ascontiguousarray(np.asarray(Image.open(label))[::-1])  # the same file name, another mask
    Image.fromarray(flipped).save(label)
    second = build_dataset([changed], _transform(), cache="disk", cache_dir=cache)[0]
    assert len(list(cache.glob("*.pt"))) == 2  # a new file for the changed item
    boxes = [[t["boxes"] for t in sample[0]["targets"] if not t["is_negative"]] for sample in (first, second)]
    assert not all(torch.equal(a, b) for a, b in zip(*boxes))  # its targets are the new mask's
    # a change in the code of a cached transform's module makes new files too (a fix inside __call__)
    module = type(_transform().transforms[0]).__module__
    assert module.startswith("medsam3_monai")
    real = caching._source_digest(module)
    caching._source_digest.cache_clear()
    try:
        original = sys.modules[module].__file__
        edited = tmp_path / "edited.py"
        edited.write_text(Path(original).read_text() + "\n# a fix\n")
        sys.modules[module].__file__ = str(edited)
        assert caching._source_digest(module) != real
        build_dataset([changed], _transform(), cache="disk", cache_dir=cache)[0]
        assert len(list(cache.glob("*.pt"))) == 3
    finally:
        sys.modules[module].__file__ = original
        caching._source_digest.cache_clear()


def test_the_cache_key_follows_every_file_of_an_item(tmp_path):
    """Several masks of one picture (a list of labels, BUSI's 'benign (25)'): a change to any of them is a new key."""
    import os

    from medsam3_monai.data.caching import _hash_item

    files = [tmp_path / name for name in ("a.png", "m1.png", "m2.png")]
    for file in files:
        file.write_bytes(b"x")
    item = {"image": str(files[0]), "label": [str(files[1]), str(files[2])], "prompts": {"1": "tumor"}}
    before = _hash_item(item)
    assert _hash_item(dict(item)) == before
    os.utime(files[2], ns=(1, 1))  # the second mask edited (another modification time)
    assert _hash_item(item) != before


def test_a_cut_short_cache_file_and_a_removed_cache_folder_are_computed_again(items, uncached, tmp_path):
    """The cache is derived data (helper-91): a file cut short (a full disk, an interrupted copy) is named, deleted
    and computed again, not a bare ``OSError``; a folder removed during a run is made again."""
    import shutil

    cache = tmp_path / "cache"
    dataset = build_dataset(items[:1], _transform(), cache="disk", cache_dir=cache)
    first = dataset[0]
    (file,) = cache.glob("*.pt")
    file.write_bytes(file.read_bytes()[:20000])
    with pytest.warns(UserWarning, match=f"unreadable cache file {file}.*computing it again"):
        again = build_dataset(items[:1], _transform(), cache="disk", cache_dir=cache)[0]
    assert_same(again[0]["image"], first[0]["image"])  # the cached head computed again
    running = build_dataset(items[:1], _transform(), cache="disk", cache_dir=cache)
    shutil.rmtree(cache)  # during the run
    assert running[0] and len(list(cache.glob("*.pt"))) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cache": "ram"}, "unknown cache mode 'ram'"),
        ({"cache": "disk"}, "needs cache_dir"),
        ({"cache": "memory", "cache_rate": 0.0}, "cache_rate"),
    ],
)
def test_bad_cache_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_dataset([{"image": "x.png"}], [], **kwargs)


def test_none_means_no_cache():
    assert type(build_dataset([{"x": 1}], [], cache=None)) is Dataset


def test_dataloader_kinds_and_batches():
    data = [{"x": torch.full((2,), float(i))} for i in range(5)]
    dataset = build_dataset(data, [], cache="memory", progress=False)
    plain = build_dataloader(dataset, batch_size=2)
    assert type(plain) is DataLoader
    assert [b["x"][:, 0].tolist() for b in plain] == [[0.0, 1.0], [2.0, 3.0], [4.0]]
    threaded = build_dataloader(dataset, batch_size=2, collate_fn=list, thread=True)
    assert isinstance(threaded, ThreadDataLoader)
    assert [[float(d["x"][0]) for d in b] for b in threaded] == [[0.0, 1.0], [2.0, 3.0], [4.0]]
    with torch.random.fork_rng():  # seeded: the order is fixed (a permutation other than the stored order)
        torch.manual_seed(0)
        loader = build_dataloader(dataset, shuffle=True, generator=torch.Generator().manual_seed(0))
        order = [float(b["x"][0, 0]) for b in loader]
    assert sorted(order) == [0.0, 1.0, 2.0, 3.0, 4.0] and order != [0.0, 1.0, 2.0, 3.0, 4.0]


def test_dataloader_rejects_shuffle_with_sampler():
    dataset = build_dataset([{"x": 0}], [], cache="none")
    with pytest.raises(ValueError, match="not both"):
        build_dataloader(dataset, shuffle=True, sampler=torch.utils.data.SequentialSampler(dataset))
