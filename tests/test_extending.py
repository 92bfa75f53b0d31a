"""Extending the bundles and the catalogue the way the docs say: an augmentation added to a training chain is
re-seeded each epoch like the bundle's own random transforms; a catalogue entry of one's own that reuses a converter
gives items of its own."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from medsam3_monai.bundle import config_parser

AUGMENTED_PICTURE_CHAIN = ("$@loading + [@train#picture_slicing] + @to_slice_space[:2] + [@augment] + "
                           "@to_slice_space[2:] + [@train#negatives]")


def test_an_augmentation_added_to_the_picture_chain_is_reseeded_each_epoch():
    """The docs' override (a random transform in ``train#picture_preprocessing``, the chain of every 2D picture):
    its draws are a function of (seed, epoch) alone, as exact resume needs; the sampled negatives, shared by both
    chains, draw what they drew when only the volume chain was re-seeded."""
    parser = config_parser("train.json", **{"train#sampler": None, "train#concepts": ["polyp", "lung"]})
    parser["augment"] = {"_target_": "RandGaussianNoised", "keys": "image", "prob": 1.0, "std": 0.05}
    parser["train#picture_preprocessing#transforms"] = AUGMENTED_PICTURE_CHAIN
    seeding = parser.get_parsed_content("train#handlers#0")
    augment, negatives = parser.get_parsed_content("augment"), parser.get_parsed_content("train#negatives")
    assert augment in parser.get_parsed_content("train#picture_preprocessing").transforms

    def draws(epoch: int) -> tuple[list[float], list[float]]:
        seeding(SimpleNamespace(state=SimpleNamespace(epoch=epoch)))
        return augment.R.uniform(size=3).tolist(), negatives.R.uniform(size=3).tolist()

    third = draws(3)
    assert draws(4) != third and draws(3) == third
    parser.get_parsed_content("train#preprocessing").set_random_state(seed=42 + 1000 * 3)  # the volume chain alone
    assert negatives.R.uniform(size=3).tolist() == third[1]


def test_a_catalogue_entry_of_ones_own_reuses_a_converter_with_its_own_labels(shared_data, tmp_path):
    """The docs' way to add a dataset in a published layout: a ``datasets/<name>.json`` entry naming an existing
    converter. Its items carry its own name, prompts and instance rule (they used to carry the converter's dataset's,
    silently)."""
    import shutil

    from medsam3_monai.data import build_datalist
    from medsam3_monai.data.catalogue import load_catalogue
    from medsam3_monai.data.pairs import DatalistError

    meta = tmp_path / "datasets_meta"
    shutil.copytree(load_catalogue().root, meta)
    entry = json.loads((meta / "datasets" / "ISBI2012_EM_membrane.json").read_text())
    entry.update(name="MyEMCells", aliases=["my-em"], labels={"1": "neuron interior"}, concepts=["neuron interior"],
                 instance_rule="semantic", role="internal")
    (meta / "datasets" / "MyEMCells.json").write_text(json.dumps(entry))
    entry = json.loads((meta / "datasets" / "TotalSegmentator.json").read_text())
    entry.update(name="MyOrgans", aliases=[])
    (meta / "datasets" / "MyOrgans.json").write_text(json.dumps(entry))
    catalogue = load_catalogue(meta)
    items = build_datalist("my-em", shared_data / "ISBI2012_EM_membrane", catalogue=catalogue).datalist
    every = [item for split in items.values() for item in split]
    assert len(every) == 30
    assert {(item["dataset"], item["instance_rule"]) for item in every} == {("MyEMCells", "semantic")}
    assert {tuple(item["prompts"].items()) for item in every} == {(("1", "neuron interior"),)}
    # the original entry is unchanged
    original = build_datalist("ISBI2012_EM_membrane", shared_data / "ISBI2012_EM_membrane", catalogue=catalogue)
    assert {item["dataset"] for split in original.datalist.values() for item in split} == {"ISBI2012_EM_membrane"}

    # an entry reusing a converter that reads several datasets, none of them the entry, is refused by name
    with pytest.raises(DatalistError, match="found the datasets .* there, not MyOrgans"):
        build_datalist("MyOrgans", shared_data / "TotalSegmentator_example_CT_MR", catalogue=catalogue)
