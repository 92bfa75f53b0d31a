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
    kept = sorted(p.name for p in (tmp_path / "resumed" / "runs" / "checkpoints").glob("checkpoint_iter*.pt"))
    assert kept == [f"checkpoint_iter{2 * epoch_length - 1}.pt", f"checkpoint_iter{2 * epoch_length}.pt"], kept
    # both runs end between two validations (val_interval 1000): each validated its final network once
    best = [torch.load(tmp_path / run / "runs" / "checkpoints" / "model_best_val_dice.pt", weights_only=False)
            for run in ("whole", "resumed")]
    assert best[0]["iteration"] == best[1]["iteration"] == 2 * epoch_length
    assert best[0]["val_dice"] == best[1]["val_dice"]

    expected, got = _final_state(tmp_path / "whole"), _final_state(tmp_path / "resumed")
    assert expected.keys() == got.keys()
    differing = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differing, f"{len(differing)} tensors differ after resume, e.g. {differing[:3]}"
    initial = _workflow(tmp_path / "untrained", datalists).parser.get_parsed_content("network").state_dict()
    trained = whole.parser.get_parsed_content("network").state_dict()
    assert sum(not torch.equal(initial[k], trained[k]) for k in initial) > 100  # training did move the weights

    # a training checkpoint carries its network's configuration: it is also a model file (--checkpoint)
    from medsam3_monai.networks import MedSAM3Net

    last = MedSAM3Net(str(tmp_path / "resumed" / "runs" / "checkpoints" / kept[-1])).state_dict()
    assert last.keys() == got.keys() and all(torch.equal(last[k], got[k]) for k in got)


def test_a_checkpoint_of_another_kind_is_refused_by_name(tmp_path: Path):
    from ignite.engine import Engine

    from medsam3_monai.networks import MedSAM3Net

    network = MedSAM3Net("tiny")
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    torch.save({"network": network.state_dict()}, tmp_path / "checkpoint_iter3.pt")  # no optimiser, no trainer
    handler = TrainingCheckpoint(str(tmp_path), {"network": network, "optimizer": optimizer})
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    with pytest.raises(ValueError, match="lacks .*not a training checkpoint of this bundle.*pass it as --checkpoint"):
        handler.load(engine)


def test_resume_from_a_model_file_is_refused_before_anything_is_written(tmp_path: Path):
    """``--resume models/model.pt`` (a model file) and a missing path fail when the bundle initialises, before
    the data is cached and before Ignite's DiskSaver makes an empty runs/checkpoints folder."""
    from medsam3_monai.bundle import BUNDLE_CONFIGS
    from medsam3_monai.engines import check_resume_source

    network = torch.nn.Linear(2, 1)
    model_file = tmp_path / "model.pt"
    torch.save(network.state_dict(), model_file)
    save_dir = tmp_path / "runs" / "checkpoints"
    with pytest.raises(ValueError, match=r"model.pt lacks \['trainer', 'checkpointer'\]: it is not a training chec"):
        TrainingCheckpoint(str(save_dir), {"network": network}, resume=str(model_file))
    with pytest.raises(FileNotFoundError, match="--resume 'nowhere.pt': no such checkpoint file. Give a checkpoint_"):
        check_resume_source("nowhere.pt")
    assert not save_dir.exists()
    check_resume_source(True), check_resume_source(False)
    for config in ("train.json", "multi_gpu_train.json"):
        assert "check_resume_source(medsam3_monai.bundle.resume_setting(@resume))" in (
            BUNDLE_CONFIGS / config).read_text().split('"initialize"')[1]


def _linear_training(save_dir: Path, max_epochs: int, resume: bool | str = True, extra: dict | None = None,
                     batches: int = 3):
    """A linear model trained by an Ignite engine with the bundle's checkpoint handler (3 iterations an epoch,
    a checkpoint every 2 and at the end, the newest two kept); ``extra``: more checkpointed objects."""
    from ignite.engine import Engine

    network = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)

    def step(engine: Engine, batch: torch.Tensor) -> None:
        optimizer.zero_grad()
        network(batch).sum().backward()
        optimizer.step()

    engine = Engine(step)
    handler = TrainingCheckpoint(str(save_dir), {"network": network, "optimizer": optimizer, **(extra or {})},
                                 save_interval=2, resume=resume)
    handler.attach(engine)
    engine.run([torch.ones(1, 2)] * batches, max_epochs=max_epochs)
    return engine, handler


def test_a_resume_with_gradient_accumulation_is_exact(tmp_path: Path):
    """With ``accumulation_steps`` 2 a checkpoint due inside an accumulation window waits for its optimiser step (the
    accumulated gradients are not saved): killed after it and resumed, the run ends with the uninterrupted weights.
    Saved mid-window, the resume's next step would use one batch's half-weighted gradient and lose the other."""
    from ignite.engine import Engine

    from medsam3_monai.engines.trainer import MedSAM3Trainer

    batches = [torch.full((1, 2), float(i + 1)) for i in range(5)]

    def run(save_dir: Path, kill_at: int | None = None) -> tuple[torch.nn.Linear, TrainingCheckpoint]:
        torch.manual_seed(0)
        network = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)

        def step(engine: Engine, batch: torch.Tensor) -> None:
            zero, step_now = MedSAM3Trainer._should_zero_and_step(None, engine)  # type: ignore[arg-type]
            if zero:
                optimizer.zero_grad()
            (network(batch).pow(2).sum() / 2).backward()
            if step_now:
                optimizer.step()

        engine = Engine(step)
        engine.accumulation_steps = 2
        engine._should_zero_and_step = lambda e: MedSAM3Trainer._should_zero_and_step(None, e)  # type: ignore
        handler = TrainingCheckpoint(str(save_dir), {"network": network, "optimizer": optimizer}, save_interval=3)
        handler.attach(engine)
        if kill_at:
            @engine.on(Events.ITERATION_COMPLETED(once=kill_at))
            def die(engine: Engine) -> None:
                raise Killed(f"killed at iteration {kill_at}")
        engine.run(batches, max_epochs=2)
        return network, handler

    whole, _ = run(tmp_path / "whole")
    with pytest.raises(Killed):
        run(tmp_path / "resumed", kill_at=5)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint_iter*.pt")) == ["checkpoint_iter4.pt"]
    resumed, handler = run(tmp_path / "resumed")
    assert handler.resumed_from is not None and handler.resumed_from.name == "checkpoint_iter4.pt"
    assert torch.equal(whole.weight, resumed.weight) and torch.equal(whole.bias, resumed.bias)


def test_a_resume_with_another_worker_count_is_warned_about(caplog):
    """Each loader worker draws its own random stream: the checkpoint records num_workers, and a resume with another
    count trains on with a warning (the same count, or a checkpoint without the record, is silent)."""
    import logging

    from medsam3_monai.engines import TrainingData

    items = [{"dataset": "d", "image": "a.png", "prompts": {"1": "polyp"}}]
    saved = TrainingData(items, "sam3", num_workers=0).state_dict()
    assert saved["num_workers"] == 0
    with caplog.at_level(logging.WARNING):
        TrainingData(items, "sam3", num_workers=0).load_state_dict(saved)
        TrainingData(items, "sam3", num_workers=4).load_state_dict({k: v for k, v in saved.items()
                                                                    if k != "num_workers"})
        assert not caplog.records
        TrainingData(items, "sam3", num_workers=4).load_state_dict(saved)
    assert "num_workers 0 and this run has 4" in caplog.text and "--num_workers 0 to repeat" in caplog.text
    import json
    import os

    from medsam3_monai import bundle
    from medsam3_monai.deploy.train_cli import front_options

    caplog.clear()
    front = {bundle.FRONT_VARIABLE: "medsam3 train", bundle.FRONT_OPTIONS_VARIABLE: json.dumps(front_options())}
    with caplog.at_level(logging.WARNING), pytest.MonkeyPatch.context() as patch:
        for name, value in front.items():
            patch.setitem(os.environ, name, value)
        TrainingData(items, "sam3", num_workers=4).load_state_dict(saved)
    assert "resume with --set num_workers=0 to repeat" in caplog.text  # under medsam3 train, its own option


def test_a_resume_keeps_the_best_value_so_far_and_refuses_other_epochs(tmp_path: Path, caplog):
    """The best-model handler's best value travels in the training checkpoint: after a resume, a validation worse
    than the first run's best does not overwrite model_best_val_dice.pt. A checkpoint written without it resumes
    with a warning; data whose epochs have another length is refused (Ignite would cycle it to the old length)."""
    import logging

    from medsam3_monai.engines import BestModelCheckpoint

    first = BestModelCheckpoint(None, str(tmp_path / "best.pt"))
    first.best = 0.7  # what the first run's validations reached
    _linear_training(tmp_path / "run", max_epochs=1, extra={"best_model": first})
    resumed = BestModelCheckpoint(None, str(tmp_path / "best.pt"))
    _linear_training(tmp_path / "run", max_epochs=2, extra={"best_model": resumed})
    assert resumed.best == 0.7
    older = tmp_path / "older"
    _linear_training(older, max_epochs=1)  # a checkpoint without the handler's state
    with caplog.at_level(logging.WARNING, logger="medsam3_monai.engines.checkpointing"):
        engine, _ = _linear_training(older, max_epochs=2, extra={"best_model": BestModelCheckpoint(None, "x.pt")})
    assert engine.state.iteration == 6 and ("written without the best_model state: its best value is not known, so "
                                            "the first validation rewrites the best model's file") in caplog.text
    with pytest.raises(ValueError, match=r"epochs had 3 iterations; the data given now makes 5: resume with the "
                                         r"datalists, batch size and torchrun process count it was trained with"):
        _linear_training(tmp_path / "run", max_epochs=3, batches=5)
    # a run killed while DiskSaver wrote a checkpoint leaves its temporary file: the next start removes it
    (tmp_path / "run" / "tmpk3x_9q2a").write_bytes(b"")
    (tmp_path / "run" / "tmp_notes.txt").write_text("kept")  # not a temporary file's name
    _linear_training(tmp_path / "run", max_epochs=3)
    assert not (tmp_path / "run" / "tmpk3x_9q2a").exists() and (tmp_path / "run" / "tmp_notes.txt").exists()


def test_running_a_finished_training_again_says_there_is_nothing_left(tmp_path: Path, caplog):
    """The same command after the run completed resumes at its last epoch: no iteration runs, and the log says why
    and what to do (raise max_epochs, or resume=false)."""
    import logging

    def run(max_epochs: int):
        return _linear_training(tmp_path, max_epochs)[0]

    assert run(max_epochs=1).state.iteration == 3
    with caplog.at_level(logging.WARNING, logger="medsam3_monai.engines.checkpointing"):
        assert run(max_epochs=1).state.iteration == 3
    assert f"the training in {tmp_path} finished at epoch 1 of max_epochs 1: nothing left to train" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medsam3_monai.engines.checkpointing"):
        assert run(max_epochs=2).state.iteration == 6
    assert "nothing left to train" not in caplog.text

    # the bundles' initialize ends such a rerun (status 0) before anything is cached or written
    from medsam3_monai.bundle import BUNDLE_CONFIGS
    from medsam3_monai.engines import check_resume_checkpoint

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medsam3_monai.engines.checkpointing"), \
            pytest.raises(SystemExit) as ended:
        check_resume_checkpoint(True, tmp_path, max_epochs=2)
    assert ended.value.code == 0
    assert (f"{tmp_path / 'checkpoint_iter6.pt'} finished epoch 2 of max_epochs 2: nothing left to train, so no data "
            "was cached and no model or checkpoint written; raise --max_epochs") in caplog.text
    check_resume_checkpoint(True, tmp_path, max_epochs=3)  # epochs left: the training runs
    check_resume_checkpoint(False, tmp_path, max_epochs=2)  # afresh
    check_resume_checkpoint(True, tmp_path / "empty", max_epochs=1)  # nothing to resume from
    with pytest.raises(SystemExit):  # a chosen, older checkpoint: iteration 4 is epoch 1
        check_resume_checkpoint(str(tmp_path / "checkpoint_iter4.pt"), tmp_path / "elsewhere", max_epochs=1)
    check_resume_checkpoint(str(tmp_path / "checkpoint_iter4.pt"), tmp_path / "elsewhere", max_epochs=2)
    for config in ("train.json", "multi_gpu_train.json"):
        assert ("check_resume_checkpoint(medsam3_monai.bundle.resume_setting(@resume), @ckpt_dir, @max_epochs, "
                "@train#data, batch_size=@batch_size") in (BUNDLE_CONFIGS / config).read_text().split('"initialize"')[1]


def test_a_resume_on_other_training_items_is_refused_before_caching(tmp_path: Path):
    """The checkpoint's training-data fingerprint is compared when the bundle initialises, before the data is
    cached (the resume itself compares it only after), also for a finished training whose --max_epochs is raised."""
    from medsam3_monai.engines import TrainingData, check_resume_checkpoint

    items = [{"dataset": "A", "image": f"/data/a/{n}.png"} for n in range(3)]
    _linear_training(tmp_path, max_epochs=1, extra={"training_data": TrainingData(items)})
    moved = [dict(item, image=item["image"].replace("/data/", "/elsewhere/")) for item in items]
    check_resume_checkpoint(True, tmp_path, max_epochs=2, items=moved)  # the same cases in a moved data root
    other = [*items[:2], {"dataset": "A", "image": "/data/a/other.png"}]
    with pytest.raises(ValueError, match=r"written by a training on other data \(3 training items, as now, but "
                                         r"other images\)"):
        check_resume_checkpoint(True, tmp_path, max_epochs=2, items=other)
    with pytest.raises(ValueError, match="on other data"):  # before the finished run's exit
        check_resume_checkpoint(True, tmp_path, max_epochs=1, items=other)
    relabelled = [dict(item, prompts={"1": "heart"}) for item in items]  # the same images, other targets
    with pytest.raises(ValueError, match=r"items had other prompts \(the label -> concept texts of the same images"):
        check_resume_checkpoint(True, tmp_path, max_epochs=2, items=relabelled)
    # epochs of another length (another batch size, or process count under torchrun) are refused before caching
    # too; _linear_training's epochs are 3 batches, as 3 items in batches of 1 make on one process
    check_resume_checkpoint(True, tmp_path, max_epochs=2, items=items, batch_size=1)
    for batch_size, replicas in ((2, 1), (1, 2)):
        with pytest.raises(ValueError, match=r"epochs had 3 iterations; the data given now makes 2: resume with the "
                                             r"datalists, batch size and torchrun process count it was trained with"):
            check_resume_checkpoint(True, tmp_path, max_epochs=1, items=items, batch_size=batch_size,
                                    replicas=replicas)
    older = TrainingData(items).state_dict()  # a checkpoint of before the prompts' fingerprint: images compared only
    del older["prompts_sha256"]
    TrainingData(relabelled).load_state_dict(older)


def test_a_resume_with_the_other_resize_kernel_is_refused_before_caching(tmp_path: Path):
    """The pictures a training saw depend on its slice-space resize (``resize_kernel``): a resume with the other
    kernel is refused naming the kernel to give; a checkpoint of before the kernel was recorded resumes with either."""
    from medsam3_monai.bundle import BUNDLE_CONFIGS
    from medsam3_monai.engines import TrainingData, check_resume_checkpoint

    items = [{"dataset": "A", "image": f"/data/a/{n}.png"} for n in range(3)]
    _linear_training(tmp_path, max_epochs=1, extra={"training_data": TrainingData(items, "monai")})
    check_resume_checkpoint(True, tmp_path, max_epochs=2, items=items, resize_kernel="monai")
    with pytest.raises(ValueError, match=r"resized with the 'monai' kernel, and this run's resize kernel is 'sam3': "
                                         r"resume with --resize_kernel 'monai', or start afresh with --resume false"):
        check_resume_checkpoint(True, tmp_path, max_epochs=2, items=items, resize_kernel="sam3")
    TrainingData(items, "sam3").load_state_dict(TrainingData(items).state_dict())  # nothing recorded: not compared
    for config in ("train.json", "multi_gpu_train.json"):
        assert "image_size=@slice_size, resize_kernel=@resize_kernel, ct_window=@ct_window)" in (
            BUNDLE_CONFIGS / config).read_text()
    assert '"training_data": {"_target_": "medsam3_monai.engines.TrainingData", "items": "@train#data", ' \
           '"resize_kernel": "@resize_kernel", "num_workers": "@num_workers"}' in (
               BUNDLE_CONFIGS / "train.json").read_text()


def _epoch_orders(sampler, max_epochs: int, resume_at_iteration: int = 0) -> dict[int, list[int]]:
    """The item indices each epoch of an Ignite run draws from ``sampler`` (4 items, batches of 2: the dataset
    divides into whole batches, so no batch of an epoch runs the sampler's iterator to its end), with the bundle's
    per-epoch seeding; ``resume_at_iteration``: a fresh engine and loader that start there, as a resumed run does."""
    from ignite.engine import Engine
    from torch.utils.data import DataLoader

    from medsam3_monai.engines import EpochSeedHandler

    orders: dict[int, list[int]] = {}
    engine = Engine(lambda e, batch: orders.setdefault(e.state.epoch, []).extend(batch.tolist()))
    EpochSeedHandler(seed=42, sampler=sampler).attach(engine)
    loader = DataLoader(list(range(4)), batch_size=2, sampler=sampler)
    if resume_at_iteration:
        engine.load_state_dict({"iteration": resume_at_iteration, "epoch_length": len(loader),
                                "max_epochs": max_epochs})
    engine.run(loader, max_epochs=max_epochs)
    return orders


def test_the_bundles_shuffle_after_a_resume_at_an_epoch_boundary_is_the_uninterrupted_one():
    """A resumed run's first epoch draws the order the uninterrupted run drew. A generator-seeded RandomSampler
    does not: when the items fill whole batches, the loader leaves its iterator suspended at the end of the epoch,
    and the next epoch's first ``next`` resumes it, which spends one permutation of the freshly seeded generator
    before the new epoch's iterator draws; a resumed run starts with a new iterator (1.4e-3 apart after 2 epochs)."""
    from monai.bundle import ConfigParser

    def bundle_sampler():
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "train.json"))
        parser["train#dataset"] = list(range(4))
        return parser.get_parsed_content("train#sampler")

    whole = _epoch_orders(bundle_sampler(), max_epochs=3)
    resumed = _epoch_orders(bundle_sampler(), max_epochs=3, resume_at_iteration=4)
    assert sorted(resumed) == [3] and resumed[3] == whole[3]
    assert len({tuple(order) for order in whole.values()}) > 1  # it does shuffle, differently each epoch


def test_resuming_from_a_chosen_checkpoint_keeps_training_and_rotating(tmp_path: Path, caplog):
    """``--resume FILE`` from another folder, or from the older of a folder's two kept checkpoints: the
    checkpoint's list of saved files names files that are not there (any more); rotation must skip them (it
    deleted them, and the run died at its next save with all the training since the resume lost)."""
    import logging

    first = tmp_path / "first"
    _linear_training(first, max_epochs=2)  # iterations 1-6: checkpoint_iter4 and checkpoint_iter6 kept
    assert sorted(p.name for p in first.glob("*.pt")) == ["checkpoint_iter4.pt", "checkpoint_iter6.pt"]

    elsewhere = tmp_path / "elsewhere"
    engine, handler = _linear_training(elsewhere, max_epochs=4, resume=str(first / "checkpoint_iter6.pt"))
    assert handler.resumed_from == first / "checkpoint_iter6.pt" and engine.state.iteration == 12
    assert sorted(p.name for p in elsewhere.glob("*.pt")) == ["checkpoint_iter10.pt", "checkpoint_iter12.pt"]

    with caplog.at_level(logging.WARNING, logger="medsam3_monai.engines.checkpointing"):
        engine, _ = _linear_training(first, max_epochs=3, resume=str(first / "checkpoint_iter4.pt"))
    assert engine.state.iteration == 9
    assert "holds checkpoints newer than checkpoint_iter4.pt (checkpoint_iter6.pt)" in caplog.text
    # the new run writes its own checkpoint_iter6.pt over the abandoned one's and rotates as ever
    assert sorted(p.name for p in first.glob("*.pt")) == ["checkpoint_iter8.pt", "checkpoint_iter9.pt"]


def test_resuming_a_checkpoint_of_other_trainable_parameters_says_so(tmp_path: Path):
    """A checkpoint of a ``--mode medsam3`` training (frozen encoders: other optimiser groups) resumed in full mode:
    the error names the cause instead of torch's "different number of parameter groups"."""
    from ignite.engine import Engine

    network = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    frozen = torch.optim.SGD(network[1].parameters(), lr=0.1)
    engine = Engine(lambda e, b: None)
    writer = TrainingCheckpoint(str(tmp_path), {"network": network, "optimizer": frozen}, save_interval=1)
    writer.attach(engine)
    engine.run([0], max_epochs=1)
    full = torch.optim.SGD([{"params": network[0].parameters()}, {"params": network[1].parameters()}], lr=0.1)
    reader = TrainingCheckpoint(str(tmp_path), {"network": network, "optimizer": full})
    reader.attach(Engine(lambda e, b: None))
    with pytest.raises(ValueError, match="other trainable parameters .*the same --mode"):
        reader.load(Engine(lambda e, b: None))


def test_a_resume_at_another_size_or_architecture_is_refused_in_one_line(tmp_path: Path):
    """The checkpoint's ``network_config`` names its slice space: another ``image_size`` is refused before caching;
    a network whose tensors do not fit (a checkpoint without that record, or another architecture of the same size)
    is refused when the resume loads, naming the tensors instead of torch's multi-line report."""
    from ignite.engine import Engine

    from medsam3_monai.engines import check_resume_checkpoint
    from medsam3_monai.engines.checkpointing import NetworkConfig
    from medsam3_monai.networks import MedSAM3Net

    network = MedSAM3Net("tiny", image_size=112)
    _linear_training(tmp_path, max_epochs=1, extra={"network_config": NetworkConfig(network)})
    check_resume_checkpoint(True, tmp_path, max_epochs=2, image_size=112)
    with pytest.raises(ValueError, match=r"checkpoint_iter3.pt was trained at 112 px and this run's slice space is "
                                         r"224 px: resume with --image_size 112 .*or start afresh with --resume false"):
        check_resume_checkpoint(True, tmp_path, max_epochs=2, image_size=224)
    wider = torch.nn.Linear(3, 1)  # the checkpoint's network is Linear(2, 1)
    reader = TrainingCheckpoint(str(tmp_path), {"network": wider, "optimizer": torch.optim.SGD(wider.parameters())})
    reader.attach(Engine(lambda e, b: None))
    with pytest.raises(ValueError, match=r"holds a network of another architecture than this run's \(size mismatch "
                                         r"for weight: .*\): resume with the --checkpoint and --image_size"):
        reader.load(Engine(lambda e, b: None))


def test_a_fresh_start_in_a_run_folder_sets_the_earlier_runs_checkpoints_aside(tmp_path: Path, caplog):
    """``resume=False`` where an earlier run left checkpoints (a longer one: iterations 4 and 5) and a best model:
    they move to ``earlier_<time>/``, so that the next plain resume continues this run, not the earlier one."""
    from medsam3_monai.engines import latest_checkpoint

    _linear_training(tmp_path, max_epochs=1, batches=5)
    (tmp_path / "model_best_val_dice.pt").write_bytes(b"the earlier run's best")
    with caplog.at_level("WARNING"):
        _linear_training(tmp_path, max_epochs=1, resume=False)
    (aside,) = tmp_path.glob("earlier_*")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint_iter4.pt", "checkpoint_iter5.pt",
                                                       "model_best_val_dice.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["checkpoint_iter2.pt", "checkpoint_iter3.pt"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_iter3.pt"
    assert "--resume false: the 3 checkpoint file(s) of the earlier run" in caplog.text and str(aside) in caplog.text


def test_the_validation_at_start_scores_the_restored_network(tmp_path: Path):
    """``validate_at_start`` after a resume: the bundle's ValidateAtStart runs after TrainingCheckpoint has restored
    the weights (listed after it in train.json), so it scores the trained network, not the fresh one (MONAI's
    exec_at_start ran first and the best-model saver wrote the untrained network)."""
    import json

    from ignite.engine import Engine

    from medsam3_monai.engines import ValidateAtStart

    first, _ = _linear_training(tmp_path, max_epochs=1)
    network = torch.nn.Linear(2, 1)
    trained = torch.load(sorted(tmp_path.glob("checkpoint_iter*.pt"))[-1], weights_only=True)["network"]
    assert not torch.equal(network.weight, trained["weight"])
    seen = []

    class Validator:
        def run(self, epoch):
            seen.append((epoch, network.weight.detach().clone()))

    engine = Engine(lambda e, batch: None)
    TrainingCheckpoint(str(tmp_path), {"network": network}, save_interval=2).attach(engine)
    ValidateAtStart(Validator()).attach(engine)
    ValidateAtStart(Validator(), enabled=False).attach(engine)
    engine.run([torch.ones(1, 2)] * 3, max_epochs=2)
    assert len(seen) == 1 and seen[0][0] == 1 and torch.equal(seen[0][1], trained["weight"])
    config = json.loads((CONFIGS / "train.json").read_text())
    targets = [h.get("_target_", h) if isinstance(h, dict) else h for h in config["train"]["handlers"]]
    assert targets.index("medsam3_monai.engines.ValidateAtStart") > targets.index(
        "medsam3_monai.engines.TrainingCheckpoint")


def test_a_resumed_validator_knows_the_best_value_so_far(tmp_path: Path, caplog):
    """MONAI's evaluator keeps its own best (``state.best_metric``, logged as "Got new best metric"): the best-model
    handler restores it with its own value, so after a resume a validation worse than the earlier run's best is not
    announced as a new best (it was, with whatever value it had), and the best's epoch is the earlier run's."""
    import logging

    from ignite.metrics import Average
    from monai.engines import Evaluator

    from medsam3_monai.engines import BestModelCheckpoint

    first = BestModelCheckpoint(None, str(tmp_path / "best.pt"))
    first.best, first.best_epoch = 0.7, 1
    _linear_training(tmp_path / "run", max_epochs=1, extra={"best_model": first})
    evaluator = Evaluator(device="cpu", val_data_loader=[0], iteration_update=lambda engine, batch: 0.5,
                          key_val_metric={"val_dice": Average(output_transform=lambda output: output)})
    resumed = BestModelCheckpoint(None, str(tmp_path / "best.pt"))
    resumed.attach(evaluator)
    _linear_training(tmp_path / "run", max_epochs=2, extra={"best_model": resumed})
    assert (resumed.best, resumed.best_epoch) == (0.7, 1)
    with caplog.at_level(logging.INFO):
        evaluator.run(2)
    assert evaluator.state.metrics["val_dice"] == 0.5
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.7, 1)
    assert "Got new best metric" not in caplog.text and not (tmp_path / "best.pt").exists()


def test_a_run_ending_between_validations_validates_its_final_network(tmp_path: Path):
    """ValidateAtEnd: a training whose last iteration is not a multiple of ``val_interval`` validates its final
    network once (a run shorter than the interval validates at all); one ending on a validation, a rerun of a
    finished run and a disabled handler add nothing. In train.json it comes before TrainingCheckpoint (the end-of-run
    checkpoint then carries the best value it set) and is disabled with the other validations."""
    import json

    from ignite.engine import Engine, Events

    from medsam3_monai.engines import ValidateAtEnd

    def validations(save_dir: Path, interval: int, max_epochs: int = 2, enabled: bool = True) -> list[int]:
        engine = Engine(lambda e, batch: None)
        seen = []

        class Validator:
            def run(self, epoch):
                seen.append(engine.state.iteration)

        validator = Validator()
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=interval), lambda e: validator.run(e.state.epoch))
        ValidateAtEnd(validator, interval, enabled=enabled).attach(engine)
        TrainingCheckpoint(str(save_dir), {}, save_interval=2).attach(engine)
        engine.run([torch.ones(1, 2)] * 3, max_epochs=max_epochs)
        return seen

    assert validations(tmp_path / "a", interval=4) == [4, 6]
    assert validations(tmp_path / "a", interval=4) == []  # the run had finished: nothing trained, nothing scored
    assert validations(tmp_path / "a", interval=4, max_epochs=3) == [8, 9]  # resumed for one more epoch
    assert validations(tmp_path / "short", interval=50) == [6]
    assert validations(tmp_path / "b", interval=3) == [3, 6]
    assert validations(tmp_path / "c", interval=4, enabled=False) == [4]
    config = json.loads((CONFIGS / "train.json").read_text())
    handlers = config["train"]["handlers"]
    targets = [h.get("_target_") for h in handlers]
    at_end = handlers[targets.index("medsam3_monai.engines.ValidateAtEnd")]
    assert targets.index("medsam3_monai.engines.ValidateAtEnd") < targets.index(
        "medsam3_monai.engines.TrainingCheckpoint")
    assert at_end["enabled"] == "@validates" and at_end["interval"] == "@val_interval"


def test_a_resume_on_other_training_items_is_refused_and_a_moved_data_root_is_not(tmp_path: Path):
    """The training items' fingerprint (dataset / image file name) travels in the checkpoint: other items of the
    same count, which the epoch length cannot tell, are refused; the same items under another folder resume."""
    from medsam3_monai.engines import TrainingData

    items = [{"image": f"/data/a/img{i}.png", "dataset": "A"} for i in range(3)]
    _linear_training(tmp_path, max_epochs=1, extra={"training_data": TrainingData(items)})
    moved = [dict(item, image=item["image"].replace("/data/a", "/mnt/copy")) for item in items]
    engine, _ = _linear_training(tmp_path, max_epochs=2, extra={"training_data": TrainingData(moved)})
    assert engine.state.iteration == 6
    other = [{"image": f"/data/b/scan{i}.png", "dataset": "B"} for i in range(3)]
    with pytest.raises(ValueError, match=r"written by a training on other data \(3 training items, as now, but "
                                         r"other images\)"):
        _linear_training(tmp_path, max_epochs=3, extra={"training_data": TrainingData(other)})


def test_a_datalist_without_validation_items_trains_without_validation(shared_data: Path, tmp_path: Path, capfd):
    """``"validation": []`` (a one-case dataset, TotalSegmentator's example): no validation runs, so no made-up
    val_dice 0.0 and no "best" network chosen on nothing; the run says so. With validation items the handler is
    there."""
    import json

    from monai.handlers import ValidationHandler

    from medsam3_monai.engines import ValidateAtEnd, ValidateAtStart

    datalists = _datalists(shared_data, tmp_path / "datalists")[:1]
    with_validation = _workflow(tmp_path / "with", datalists, image_size=112, validate_at_start=True)
    handlers = with_validation.parser.get_parsed_content("train#handlers")
    assert any(isinstance(h, ValidationHandler) for h in handlers)
    assert next(h for h in handlers if isinstance(h, ValidateAtStart)).enabled
    assert next(h for h in handlers if isinstance(h, ValidateAtEnd)).enabled
    datalist = json.loads(Path(datalists[0]).read_text())
    datalist["training"] += datalist.pop("validation")
    datalist["validation"] = []
    Path(datalists[0]).write_text(json.dumps(datalist))
    capfd.readouterr()
    without = _workflow(tmp_path / "without", datalists, image_size=112, validate_at_start=True)
    said = "".join(capfd.readouterr())  # the bundle's logging.conf handlers write to the console
    assert "no validation items (the datalists' 'validation' lists are empty): training without validation" in said
    handlers = without.parser.get_parsed_content("train#handlers")
    assert not any(isinstance(h, ValidationHandler) for h in handlers)
    assert not next(h for h in handlers if isinstance(h, ValidateAtStart)).enabled
    assert not next(h for h in handlers if isinstance(h, ValidateAtEnd)).enabled


def test_a_resume_with_another_ct_window_is_refused_before_caching(tmp_path: Path):
    """A CT training's pictures depend on its window too: a resume with another one is refused (the model files
    would record the second window for a network trained on both); the same window written another way resumes."""
    from medsam3_monai.engines import check_resume_checkpoint
    from medsam3_monai.engines.checkpointing import NetworkConfig
    from medsam3_monai.networks import MedSAM3Net

    _linear_training(tmp_path, max_epochs=1, extra={"network_config": NetworkConfig(
        MedSAM3Net("tiny"), {"resize_kernel": "sam3", "ct_window": "lung"})})
    check_resume_checkpoint(True, tmp_path, max_epochs=2, ct_window=[1500, -600])  # lung, as width and level
    with pytest.raises(ValueError, match=r"was trained with ct_window 'lung' and this run's is 'abdomen': resume with "
                                         r"--ct_window 'lung', or start afresh with --resume false"):
        check_resume_checkpoint(True, tmp_path, max_epochs=2, ct_window="abdomen")
