"""One MedSAM3Trainer iteration: the loss terms it reports are the criterion's (read once, after the optimiser
step is queued), grad_norm is the clipped gradients' norm before clipping, and AdamW is the fused one on CUDA
(that test runs where a CUDA device is, as on the GPU machine's ``scripts/device_check.sh``)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from _script_helpers import load_script

from medsam3_monai.engines import MedSAM3Trainer, PrepareFindBatch, build_optimizer
from medsam3_monai.engines.trainer import loss_floats
from medsam3_monai.losses import SetCriterion
from medsam3_monai.networks import MedSAM3Net

pytestmark = pytest.mark.usefixtures("one_thread")
BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "medsam3"
NO_DROPOUT = {"dropout": 0.0, "drop_path": 0.0}  # the step and its reference see the same network


def _one_step(network: torch.nn.Module, batch: dict, device: torch.device) -> dict:
    trainer = MedSAM3Trainer(device=device, max_epochs=1, train_data_loader=[batch], network=network,
                             optimizer=build_optimizer(network), loss_function=SetCriterion(), amp=False)
    trainer.run()
    return trainer.state.output[0]["loss"]


def test_loss_floats_reads_every_term_at_once():
    values = {"loss": torch.tensor(2.5), "loss_ce": torch.tensor([0.25], dtype=torch.bfloat16),
              "grad_norm": torch.tensor(3.0, dtype=torch.float64)}
    floats = loss_floats(values)
    assert floats == {"loss": 2.5, "loss_ce": 0.25, "grad_norm": 3.0}
    assert all(type(v) is float for v in floats.values()) and list(floats) == list(values)
    assert loss_floats({}) == {}


def test_a_step_reports_the_criterions_terms_and_the_gradient_norm():
    torch.manual_seed(0)
    network = MedSAM3Net("tiny", training_dropout=NO_DROPOUT)
    batch = load_script("bench_train").synthetic_batch(2, network.image_size, instances=3)
    reference = copy.deepcopy(network).train()
    images, targets, _, kwargs = PrepareFindBatch()(batch, torch.device("cpu"))
    terms = SetCriterion()(reference(images, **kwargs), targets)  # the same weights, before the step
    terms["loss"].backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()
                                                 if p.grad is not None]))
    reported = _one_step(network, batch, torch.device("cpu"))
    assert set(reported) == set(terms) | {"grad_norm"}
    assert all(type(value) is float for value in reported.values())
    for name, value in terms.items():
        assert reported[name] == pytest.approx(float(value.detach()), rel=1e-5, abs=1e-6), name
    assert reported["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(network.parameters(), reference.parameters()))  # it stepped


def test_the_optimiser_is_pytorchs_default_off_cuda():
    assert build_optimizer(MedSAM3Net("tiny")).defaults["fused"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_adamw_is_fused_and_steps_as_the_multi_tensor_one():
    device = torch.device("cuda")
    torch.manual_seed(0)
    network = MedSAM3Net("tiny", training_dropout=NO_DROPOUT).to(device)
    twin = copy.deepcopy(network)
    fused, multi_tensor = build_optimizer(network), build_optimizer(twin)
    assert fused.defaults["fused"] is True
    for group in multi_tensor.param_groups:
        group["fused"], group["foreach"] = False, True
    batch = load_script("bench_train").synthetic_batch(2, network.image_size, instances=3)
    images, targets, _, kwargs = PrepareFindBatch()(batch, device)
    network.train()
    SetCriterion()(network(images, **kwargs), targets)["loss"].backward()
    for ours, theirs in zip(network.parameters(), twin.parameters()):  # the same gradients for both (a CUDA
        theirs.grad = None if ours.grad is None else ours.grad.clone()  # backward need not be deterministic)
    fused.step()
    multi_tensor.step()
    for ours, theirs in zip(network.parameters(), twin.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    reported = _one_step(network, batch, device)
    assert all(type(value) is float for value in reported.values()) and "grad_norm" in reported


def test_the_bundles_compile_switch_trains_with_a_compiled_vision_encoder(dynamo_counters):
    """``--compile true`` (train.json's ``compile``): the network's vision encoder runs compiled in the training
    step (forward and backward) and the step's loss terms are those of the eager network with the same weights."""
    from monai.bundle import ConfigParser

    def bundle_network(compile: bool) -> torch.nn.Module:  # the tiny preset: the same weights each time
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "train.json"))
        parser.update({"compile": compile, "training_dropout": NO_DROPOUT, "device": "$torch.device('cpu')"})
        return parser.get_parsed_content("network")

    network, twin = bundle_network(True), bundle_network(False)
    batch = load_script("bench_train").synthetic_batch(2, network.image_size, instances=3)
    compiled_terms = _one_step(network, batch, torch.device("cpu"))
    assert dynamo_counters["frames"]["ok"] >= 1  # the encoder's forward ran compiled
    eager_terms = _one_step(twin, batch, torch.device("cpu"))
    assert compiled_terms.keys() == eager_terms.keys()
    for name, value in eager_terms.items():
        assert compiled_terms[name] == pytest.approx(value, rel=1e-3, abs=1e-4), name


def test_the_step_clips_the_gradients_to_grad_clip_norm():
    torch.manual_seed(0)
    network = MedSAM3Net("tiny", training_dropout=NO_DROPOUT)
    batch = load_script("bench_train").synthetic_batch(2, network.image_size, instances=3)
    trainer = MedSAM3Trainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch], network=network,
                             optimizer=build_optimizer(network), loss_function=SetCriterion(), amp=False,
                             grad_clip_norm=0.1)
    trainer.run()
    assert trainer.state.output[0]["loss"]["grad_norm"] > 0.1  # before clipping: this step needs it
    stepped = torch.stack([p.grad.norm() for p in network.parameters() if p.grad is not None])
    assert float(torch.linalg.vector_norm(stepped)) == pytest.approx(0.1, rel=1e-4)  # what the optimiser stepped with


def _linear_trainer(batches: list, accumulation_steps: int) -> tuple[MedSAM3Trainer, torch.nn.Linear]:
    """A trainer of w x (w = 0 at first), loss (w x - y)^2, SGD at learning rate 1."""
    network = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        network.weight.zero_()
    trainer = MedSAM3Trainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=batches, network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=1.0),
        loss_function=lambda out, y: {"loss": ((out - y) ** 2).sum()},
        prepare_batch=lambda batch, device, non_blocking=False, **kwargs: (batch[0], batch[1], None, {}),
        amp=False, bf16=False, grad_clip_norm=None, accumulation_steps=accumulation_steps)
    return trainer, network


def test_accumulation_averages_the_gradients_and_steps_at_the_end_of_an_epoch():
    """Accumulation 2 over (x, y) = (1, 1), (2, 2): gradients 2 (w x - y) x = -2 and -8, each loss divided by 2:
    w = 0 - (-1 - 4) = 5. A third batch (1, 1), the last of the epoch, steps alone, its loss divided by 2 too:
    gradient 2 (5 - 1) / 2 = 4, w = 1."""
    one, two = (torch.ones(1, 1), torch.ones(1, 1)), (torch.full((1, 1), 2.0), torch.full((1, 1), 2.0))
    trainer, network = _linear_trainer([one, two], accumulation_steps=2)
    trainer.run()
    assert network.weight.item() == pytest.approx(5.0)
    trainer, network = _linear_trainer([one, two, one], accumulation_steps=2)
    trainer.run()
    assert network.weight.item() == pytest.approx(1.0)


def test_the_bundles_learning_rate_schedule_counts_optimiser_steps():
    """With accumulation 2 over 5 batches the optimiser steps 3 times (2, 4 and the epoch's last), and so does the
    schedule (train.json's OptimizerStepLrSchedule): warm-up in optimiser steps, as without accumulation."""
    from medsam3_monai.engines import OptimizerStepLrSchedule, WarmupInverseSqrtLR

    batch = (torch.ones(1, 1), torch.ones(1, 1))
    trainer, _ = _linear_trainer([batch] * 5, accumulation_steps=2)
    schedule = WarmupInverseSqrtLR(trainer.optimizer, warmup_steps=10, timescale=10)
    OptimizerStepLrSchedule(schedule).attach(trainer)
    trainer.run()
    assert schedule.last_epoch == 3 and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.3)



def test_the_parameters_without_gradients_are_the_documented_ones(tiny_net):
    """README ("Choices we made"): CLIP's own text_projection, FPN level 0.5x and the pixel decoder's third stage
    get no gradient in a training step of text-only prompts (DDP needs find_unused_parameters=True); the geometry
    encoder does get them (its CLS token joins every text-only prompt)."""
    from medsam3_monai.losses import FindTargets

    documented = ("sam3.text_encoder.text_projection.", "sam3.vision_encoder.neck.fpn_layers.3.",
                  "sam3.mask_decoder.pixel_decoder.conv_layers.2.", "sam3.mask_decoder.pixel_decoder.norms.2.")
    net = copy.deepcopy(tiny_net).train()
    mask = torch.zeros(1, net.image_size, net.image_size, dtype=torch.bool)
    mask[0, 20:60, 30:70] = True
    targets = FindTargets(torch.tensor([[0.45, 0.36, 0.36, 0.36]]), torch.tensor([1]), mask)
    SetCriterion()(net(torch.rand(1, 3, net.image_size, net.image_size), ["polyp"]), targets)["loss"].backward()
    without = sorted(name for name, p in net.named_parameters() if p.requires_grad and p.grad is None)
    assert all(name.startswith(documented) for name in without), without
    assert all(any(name.startswith(prefix) for name in without) for prefix in documented), without


def test_bf16_on_a_cpu_says_the_run_trains_in_float32(caplog):
    """``bf16`` (the default) is CUDA autocast: a CPU run says it trains in float32 (MLflow records bf16 true)."""
    import logging

    network = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    with caplog.at_level(logging.INFO, logger="medsam3_monai.engines.trainer"):
        MedSAM3Trainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[None], network=network,
                       optimizer=optimizer, loss_function=lambda *a: {}, bf16=False)
        assert "float32" not in caplog.text
        MedSAM3Trainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[None], network=network,
                       optimizer=optimizer, loss_function=lambda *a: {})
    assert "bf16 autocast applies on CUDA only: this cpu run trains in float32" in caplog.text
