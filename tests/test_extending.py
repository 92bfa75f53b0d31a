"""Extending the bundles, the catalogue and the network the way the docs say: an augmentation added to a training
chain is re-seeded each epoch like the bundle's own random transforms; a catalogue entry of one's own that reuses a
converter gives items of its own; a subclass of ``MedSAM3Net`` with a head of its own has the head optimised and
saved; a whole network pickles and runs in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from medsam3_monai.bundle import config_parser

AUGMENTED_PICTURE_CHAIN = ("$@loading + [@train#picture_slicing] + @to_slice_space[:2] + [@augment] + "
                           "@to_slice_space[2:] + [@train#negatives, @train#box_choice]")


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


class WithHead:
    """Built lazily (``MedSAM3Net`` imports transformers): a subclass with a head of its own."""

    @staticmethod
    def build(**kwargs):
        from medsam3_monai.networks import MedSAM3Net

        class Network(MedSAM3Net):
            def __init__(self, *args, **kw) -> None:
                super().__init__(*args, **kw)
                self.quality = nn.Linear(4, 1)

        return Network("tiny", **kwargs)


def test_a_head_of_ones_own_is_optimised_and_saved(tmp_path):
    from medsam3_monai.engines import build_optimizer
    from medsam3_monai.engines.handlers import save_model_file
    from medsam3_monai.networks import CheckpointError, MedSAM3Net, load_extra_state

    net = WithHead.build(seed=1)
    optimizer = build_optimizer(net, detector_lr=3e-4, weight_decay=0.1)
    extra = {group["name"]: group for group in optimizer.param_groups if group["component"] == "extra"}
    assert {n: (len(g["params"]), g["lr"], g["weight_decay"]) for n, g in extra.items()} == {
        "extra": (1, 3e-4, 0.1), "extra.no_decay": (1, 3e-4, 0.0)}  # weight and bias, SAM3's decay rule
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in net.parameters())

    path = tmp_path / "model.pt"
    save_model_file(net, path)
    with pytest.warns(UserWarning, match=r"2 tensors .*quality\.bias, quality\.weight.*load_extra_state"):
        plain = MedSAM3Net(path)  # the SAM3 weights, as ever
    assert all(torch.equal(a, b) for a, b in zip(plain.sam3.state_dict().values(), net.sam3.state_dict().values()))
    other = WithHead.build(seed=2)
    assert not torch.equal(other.quality.weight, net.quality.weight)
    assert load_extra_state(other, path) == ["quality.bias", "quality.weight"]
    assert torch.equal(other.quality.weight, net.quality.weight) and torch.equal(other.quality.bias, net.quality.bias)
    with pytest.raises(CheckpointError, match="in the file only: \\['quality.bias', 'quality.weight'\\]"):
        load_extra_state(MedSAM3Net("tiny"), path)
    save_model_file(plain, tmp_path / "plain.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain network's file: nothing to note
        MedSAM3Net(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="no state outside the SAM3 model"):
        load_extra_state(other, tmp_path / "plain.pt")


def test_a_whole_network_pickles_and_runs_in_a_process_of_its_own(tmp_path):
    """``torch.save(net)`` (SAM3's training dropout on, the default) and ``torch.load`` in a new Python:
    the same scores; and the dropout still acts in training mode there."""
    from medsam3_monai.networks import MedSAM3Net

    net = MedSAM3Net("tiny").eval()  # SAM3's training dropout is on by default
    images = torch.rand(1, 3, net.image_size, net.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(images, ["polyp"]).scores
    torch.save({"net": net, "images": images}, tmp_path / "net.pt")
    child = f"""
import torch
saved = torch.load({str(tmp_path / "net.pt")!r}, weights_only=False)
net = saved["net"]
with torch.no_grad():
    print(net(saved["images"], ["polyp"]).scores.tolist())
    net.train()
    first, second = (net(saved["images"], ["polyp"]).scores for _ in range(2))
print(bool(torch.equal(first, second)))
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    scores, train_equal = done.stdout.strip().splitlines()[-2:]
    torch.testing.assert_close(torch.tensor(json.loads(scores)), expected)
    assert train_equal == "False"  # dropout draws differ between two training-mode forwards


def test_a_subclass_training_checkpoint_and_a_compiled_subclass_save_as_the_plain_network(tmp_path):
    """helper-93: a subclass's training checkpoint (its whole state: sam3.* and the head's keys) was 'not a SAM3
    checkpoint'; a compiled network's model file put the whole SAM3 model into extra_state under _orig_mod.*."""
    from medsam3_monai.engines.handlers import save_model_file
    from medsam3_monai.networks import MedSAM3Net

    net = WithHead.build(seed=1)
    from medsam3_monai.networks.checkpoints import model_description

    torch.save({"network": net.state_dict(), "optimizer": {}, "network_config": model_description(net.sam3)},
               tmp_path / "checkpoint_iter4.pt")  # as engines.checkpointing writes one
    with pytest.warns(UserWarning, match=r"2 tensors .*outside its SAM3 model \(quality\.bias, quality\.weight\)"):
        loaded = MedSAM3Net(tmp_path / "checkpoint_iter4.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.sam3.state_dict().values(), net.sam3.state_dict().values()))
    plain = MedSAM3Net("tiny")
    save_model_file(torch.compile(plain), tmp_path / "compiled.pt")  # compiling wraps, runs nothing
    saved = torch.load(tmp_path / "compiled.pt", weights_only=False)
    assert "extra_state" not in saved and all(k.startswith("sam3.") for k in saved["model"])
