"""``--compile`` on a machine whose torch.compile cannot build kernels ends in one line, before any work."""

from __future__ import annotations

import pytest
import torch
from torch._inductor import cpp_builder, exc

from medsam3_monai.inferers.batch import check_compile_toolchain, compile_network


def _no_compiler(*_args, **_kwargs):
    raise exc.InvalidCxxCompiler


def test_compiling_on_a_cpu_without_a_cpp_compiler_says_what_to_do(monkeypatch):
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", _no_compiler)
    with pytest.raises(ValueError, match="no working C\\+\\+ compiler.*leave --compile out"):
        compile_network(torch.nn.Linear(2, 2), compile=True)


def test_a_cpu_with_a_compiler_passes_the_check():
    check_compile_toolchain("cpu")  # this machine builds the project's compiled tests


def test_the_eager_path_checks_nothing(monkeypatch):
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", _no_compiler)
    compile_network(torch.nn.Linear(2, 2), compile=False, channels_last=True)


def test_the_check_is_for_the_device_the_network_will_run_on(monkeypatch):
    """``medsam3 evaluate`` compiles before it moves the networks: ``device`` names where they will run, so a CUDA
    run is checked for Triton, not for the CPU's C++ compiler."""
    import torch.utils._triton as triton_utils

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", _no_compiler)
    monkeypatch.setattr(triton_utils, "has_triton", lambda: False)
    with pytest.raises(ValueError, match="needs Triton on a CUDA device"):
        compile_network(torch.nn.Linear(2, 2), compile=True, device="cuda")
