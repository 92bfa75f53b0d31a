"""Bundles load their own weights: ``inference.json`` / ``evaluate.json`` use ``bundle_root/models/model.pt``, which
MONAI's ``CheckpointLoader`` reads too; the random ``tiny`` network only when asked for by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medsam3_monai.bundle import BUNDLE_CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def bundle_with_weights(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    from medsam3_monai.networks import MedSAM3Net
    from medsam3_monai.networks.checkpoints import save_checkpoint_file

    trained = MedSAM3Net("tiny", seed=7)  # not the weights `tiny` builds (seed 0)
    save_checkpoint_file(trained.sam3, tmp_path / "bundle" / "models" / "model.pt")
    return tmp_path / "bundle", trained.state_dict()


def test_inference_bundle_uses_bundle_root_models_model_pt(bundle_with_weights):
    from monai.bundle import ConfigWorkflow

    bundle_root, expected = bundle_with_weights
    workflow = ConfigWorkflow(config_file=str(BUNDLE_CONFIGS / "inference.json"),
                              meta_file=str(BUNDLE_CONFIGS / "metadata.json"), workflow_type="infer",
                              bundle_root=str(bundle_root))
    workflow.initialize()
    assert workflow.parser.get_parsed_content("checkpoint") == str(bundle_root / "models" / "model.pt")
    network = workflow.parser.get_parsed_content("network")
    state = network.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert workflow.parser.get_parsed_content("image_size") == network.image_size == 112


def test_monai_checkpoint_loader_reads_model_pt(bundle_with_weights):
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader

    from medsam3_monai.networks import MedSAM3Net

    bundle_root, expected = bundle_with_weights
    network = MedSAM3Net("tiny")
    assert not all(torch.equal(network.state_dict()[k], v) for k, v in expected.items())
    CheckpointLoader(str(bundle_root / "models" / "model.pt"), {"model": network}, map_location="cpu")(Engine(lambda e, b: None))
    assert all(torch.equal(network.state_dict()[k], v) for k, v in expected.items())


def test_without_weights_the_bundle_asks_for_a_checkpoint(tmp_path):
    from medsam3_monai.bundle import bundle_weights

    with pytest.raises(ValueError, match="no weights: .*models/model.pt does not exist.*--checkpoint tiny"):
        bundle_weights(tmp_path)


def test_the_inference_bundle_builds_a_file_without_a_configuration_at_checkpoint_image_size():
    """inference.json: ``checkpoint_image_size`` is the size a sam3.pt / Medical-SAM3 file is built at (null: the
    network's default, 1008), ``tiny_image_size`` the tiny network's; the slice size is read from the network."""
    from medsam3_monai.bundle import config_parser

    def network_size(**overrides) -> int | None:
        return config_parser("inference.json", **overrides).get_parsed_content("network_def#image_size")

    assert network_size(checkpoint="tiny") == 112 and network_size(checkpoint="tiny", tiny_image_size=224) == 224
    assert network_size(checkpoint="sam3.pt") is None  # MedSAM3Net builds it at 1008
    assert network_size(checkpoint="sam3.pt", checkpoint_image_size=504) == 504


def test_an_image_size_other_than_the_networks_is_refused_before_the_inference_runs(tmp_path):
    """``--image_size`` does not set the inference bundle's slice size (it is read from the network): given another
    size than the network's, the bundle stops before its first case and names the settings that do set it."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=str(BUNDLE_CONFIGS / "inference.json"),
                              meta_file=str(BUNDLE_CONFIGS / "metadata.json"), workflow_type="infer",
                              bundle_root=str(tmp_path), checkpoint="tiny", image_size=224)
    workflow.initialize()
    with pytest.raises(RuntimeError) as raised:  # MONAI's expression wrapper; `monai.bundle run` says our one line
        workflow.run()
    cause = raised.value
    while cause is not None and not isinstance(cause, ValueError):
        cause = cause.__cause__ or cause.__context__
    assert str(cause) == ("--image_size 224: the inference bundle's slice size is the network's, here 112 px; give "
                          "--tiny_image_size 224 to build the tiny network at 224"), raised.value
    assert not (tmp_path / "predictions").exists()
