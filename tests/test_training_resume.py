"""Resume: a training run killed mid-epoch and restarted from its last checkpoint ends with exactly the
parameters of the run that was never interrupted (model, optimiser, scheduler, iteration, data and RNG)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from medsam3_monai.engines import TrainingCheckpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundles" / "medsam3" / "configs"


class Killed(RuntimeError):
    """Stands for the process dying (pre-emption, OOM kill) in the middle of an epoch."""


def _datalists(shared: Path, out: Path) -> list[str]:
    from medsam3_monai.data import build_datalist, write_datalist

    paths = []
    for folder in ("Kvasir-SEG_sample", "ChestXray_lung_sample"):  # 4 + 3 training items, 1 + 1 validation
        paths.append(str(write_datalist(build_datalist(folder, shared / folder).datalist, out / f"{folder}.json")))
    return paths


def _workflow(bundle_root: Path, datalists: list[str], **overrides):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"), workflow_type="train",
        bundle_root=str(bundle_root), datalists=datalists, max_epochs=2, batch_size=2, val_interval=1000,
        save_interval=1, **overrides,
    )
    workflow.initialize()
    return workflow


def _final_state(bundle_root: Path) -> dict[str, torch.Tensor]:
    return torch.load(bundle_root / "models" / "model.pt", map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_to_the_uninterrupted_parameters(shared_data: Path, tmp_path: Path):
    datalists = _datalists(shared_data, tmp_path / "datalists")

    whole = _workflow(tmp_path / "whole", datalists)
    whole.run()
    whole.finalize()
    epoch_length = whole.parser.get_parsed_content("train#trainer").state.epoch_length
    assert epoch_length == 4  # 7 items in batches of 2: the kill below lands inside the second epoch

    killed = _workflow(tmp_path / "resumed", datalists)
    trainer = killed.parser.get_parsed_content("train#trainer")

    def die(engine):
        raise Killed(f"killed at iteration {engine.state.iteration}")

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=epoch_length + 2), die)
    with pytest.raises(RuntimeError) as raised:  # the bundle's "run" expression wraps the exception
        killed.run()
    assert isinstance(raised.value.__cause__, Killed)
    assert not (tmp_path / "resumed" / "models" / "model.pt").exists()

    resumed = _workflow(tmp_path / "resumed", datalists)
    resumed.run()
    resumed.finalize()
    checkpoint = next(h for h in resumed.parser.get_parsed_content("train#handlers") if isinstance(h, TrainingCheckpoint))
    assert checkpoint.resumed_from is not None and checkpoint.resumed_from.name == f"checkpoint_iter{epoch_length + 2}.pt"
    assert resumed.parser.get_parsed_content("train#trainer").state.iteration == 2 * epoch_length
    kept = sorted(p.name for p in (tmp_path / "resumed" / "runs" / "checkpoints").glob("*.pt"))
    assert kept == [f"checkpoint_iter{2 * epoch_length - 1}.pt", f"checkpoint_iter{2 * epoch_length}.pt"], kept

    expected, got = _final_state(tmp_path / "whole"), _final_state(tmp_path / "resumed")
    assert expected.keys() == got.keys()
    differing = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differing, f"{len(differing)} tensors differ after resume, e.g. {differing[:3]}"
    initial = _workflow(tmp_path / "untrained", datalists).parser.get_parsed_content("network").state_dict()
    trained = whole.parser.get_parsed_content("network").state_dict()
    assert sum(not torch.equal(initial[k], trained[k]) for k in initial) > 100  # training did move the weights


def test_a_checkpoint_of_another_kind_is_refused_by_name(tmp_path: Path):
    from ignite.engine import Engine

    from medsam3_monai.networks import MedSAM3Net

    network = MedSAM3Net("tiny")
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    torch.save({"network": network.state_dict()}, tmp_path / "checkpoint_iter3.pt")  # no optimiser, no trainer
    handler = TrainingCheckpoint(str(tmp_path), {"network": network, "optimizer": optimizer})
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    with pytest.raises(KeyError, match="lacks .*not written by this training bundle"):
        handler.load(engine)


def test_running_a_finished_training_again_says_there_is_nothing_left(tmp_path: Path, caplog):
    """The same command after the run completed resumes at its last epoch: no iteration runs, and the log says why
    and what to do (raise max_epochs, or resume=false)."""
    import logging

    from ignite.engine import Engine

    def run(max_epochs: int) -> Engine:
        network = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)

        def step(engine: Engine, batch: torch.Tensor) -> None:
            optimizer.zero_grad()
            network(batch).sum().backward()
            optimizer.step()

        engine = Engine(step)
        TrainingCheckpoint(str(tmp_path), {"network": network, "optimizer": optimizer}, save_interval=2).attach(engine)
        engine.run([torch.ones(1, 2)] * 3, max_epochs=max_epochs)
        return engine

    assert run(max_epochs=1).state.iteration == 3
    with caplog.at_level(logging.WARNING, logger="medsam3_monai.engines.checkpointing"):
        assert run(max_epochs=1).state.iteration == 3
    assert f"the training in {tmp_path} finished at epoch 1 of max_epochs 1: nothing left to train" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medsam3_monai.engines.checkpointing"):
        assert run(max_epochs=2).state.iteration == 6
    assert "nothing left to train" not in caplog.text
