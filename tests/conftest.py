"""Shared fixtures: the tiny SAM3 preset and the real samples in ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real medical samples); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real samples not found at {SHARED_DATA} (clone with ../shared beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    if not SHARED_REFERENCE.is_dir():
        pytest.skip(f"checkpoint key references not found at {SHARED_REFERENCE}")
    return SHARED_REFERENCE


@pytest.fixture(scope="session")
def tiny_net():
    """A tiny random-init MedSAM3Net in eval mode (seed 0, 112 px). Do not mutate its weights."""
    from medsam3_monai.networks import MedSAM3Net

    return MedSAM3Net("tiny").eval()


@pytest.fixture()
def tiny_images(tiny_net) -> torch.Tensor:
    """(2, 3, S, S) random images in [0, 1]."""
    generator = torch.Generator().manual_seed(1)
    size = tiny_net.image_size
    return torch.rand(2, 3, size, size, generator=generator)


@pytest.fixture()
def dynamo_counters():
    """``torch.compile``'s counters (``torch._dynamo.utils.counters``) for one test, from a fresh compiler state;
    reset again after the test, so that compiled code does not outlive the test's modules."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the tiny
    models are latency-bound, and on shared cores extra threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def kvasir(shared_data: Path) -> Path:
    """The first Kvasir-SEG sample picture (JPEG)."""
    return sorted((shared_data / "Kvasir-SEG_sample" / "images").glob("*.jpg"))[0]


@pytest.fixture(scope="session")
def hippocampus(shared_data: Path) -> Path:
    """The first MSD hippocampus sample volume (NIfTI)."""
    return sorted((shared_data / "MSD_Task04_Hippocampus_cropped" / "images").glob("*.nii.gz"))[0]


@pytest.fixture()
def no_configured_endpoint(monkeypatch):
    """No agent planner endpoint from the environment, and loopback never through a proxy
    (``pytestmark = pytest.mark.usefixtures("no_configured_endpoint")``)."""
    for name in ("MEDSAM3_LLM_URL", "MEDSAM3_LLM_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
