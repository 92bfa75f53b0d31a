"""Validation during training forwards at most ``val_images_per_batch`` slices at a time, whatever the volume size,
and the Dice does not depend on that budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsam3_monai.engines import ImageBudgetBatches

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundles" / "medsam3" / "configs"
HIPPOCAMPUS = "MSD_Task04_Hippocampus_cropped"
VALIDATION_VOLUMES = 3


def _slices(name: str, count: int) -> list[dict]:
    return [{"name": f"{name}{index}"} for index in range(count)]


def test_slices_are_regrouped_in_order_into_batches_of_the_budget():
    loader = [[_slices("a", 5)], [_slices("b", 3), {"name": "c0"}], [_slices("d", 1)]]  # volumes and a picture
    batches = list(ImageBudgetBatches(loader, images_per_batch=4, collate_fn=lambda items: [i["name"] for i in items]))
    assert batches == [["a0", "a1", "a2", "a3"], ["a4", "b0", "b1", "b2"], ["c0", "d0"]]
    assert list(ImageBudgetBatches([], 4, collate_fn=list)) == []
    with pytest.raises(ValueError, match="images_per_batch must be a positive"):
        ImageBudgetBatches(loader, images_per_batch=0)


def _validation(shared_data: Path, tmp_path: Path, images_per_batch: int):
    """The training bundle's validation loader and evaluator on three hippocampus volumes (tiny network, 56 px)."""
    from monai.bundle import ConfigWorkflow

    from medsam3_monai.data import build_datalist, write_datalist

    datalist = build_datalist(HIPPOCAMPUS, shared_data / HIPPOCAMPUS).datalist
    datalist = {"training": datalist["training"][:1], "validation": datalist["validation"][:VALIDATION_VOLUMES]}
    path = write_datalist(datalist, tmp_path / "hippocampus.json")
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"), workflow_type="train", bundle_root=str(tmp_path / "run"),
        datalists=[str(path)], image_size=56, cache="none", val_protocol="semantic",
        val_images_per_batch=images_per_batch,
    )
    workflow.initialize()
    parse = workflow.parser.get_parsed_content
    return parse("validate#dataloader"), parse("validate#evaluator")


@pytest.mark.slow
def test_bundle_validation_forwards_bounded_batches_with_the_same_dice(shared_data: Path, tmp_path: Path):
    loader, evaluator = _validation(shared_data, tmp_path / "bounded", images_per_batch=8)
    sizes = [len(batch["images"]) for batch in loader]
    assert sizes[:-1] == [8] * (len(sizes) - 1) and 0 < sizes[-1] <= 8
    total = sum(sizes)
    assert total > 3 * 8  # three hippocampus volumes: ~35 slices each, so every volume spans several forwards

    evaluator.run()
    bounded = evaluator.state.metrics["val_dice"]
    assert evaluator.state.iteration == len(sizes)
    evaluator.run(global_epoch=2)  # a second pass (the next validation) reads every batch again
    assert evaluator.state.iteration == len(sizes) and evaluator.state.metrics["val_dice"] == bounded

    whole_loader, whole = _validation(shared_data, tmp_path / "whole", images_per_batch=10**6)
    assert [len(batch["images"]) for batch in whole_loader] == [total]  # the old behaviour: one forward
    whole.run()
    assert 0 < bounded == pytest.approx(whole.state.metrics["val_dice"], abs=1e-4)


def test_a_pass_reads_the_loader_to_its_end_when_the_number_of_batches_changes(tiny_net):
    """Ignite keeps the first pass's batch count as the epoch length of an unsized loader; the evaluator does not."""
    import torch

    from medsam3_monai.engines import MedSAM3Evaluator, PromptDice, collate_find_queries, pred_and_label
    from medsam3_monai.instance_masks import InstanceMasks

    size = tiny_net.image_size
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, 10:30, 10:30] = True

    def picture() -> dict:
        target = {"text": "polyp", "boxes": torch.tensor([[0.18, 0.18, 0.18, 0.18]]), "is_negative": False,
                  "masks": InstanceMasks.from_dense(mask)}
        return {"image": torch.zeros(3, size, size, dtype=torch.uint8), "targets": [target]}

    volumes = [[[picture() for _ in range(3)]]]
    evaluator = MedSAM3Evaluator(
        device=torch.device("cpu"), val_data_loader=ImageBudgetBatches(volumes, 2, collate_find_queries),
        network=tiny_net, key_val_metric={"dice": PromptDice(output_transform=pred_and_label)}, bf16=False,
    )
    evaluator.run()
    assert evaluator.state.iteration == 2
    volumes.append([[picture() for _ in range(3)]])  # 6 pictures now: 3 batches
    evaluator.run(global_epoch=2)
    assert evaluator.state.iteration == 3
