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


def test_the_benchmarks_refuse_compile_in_one_line_before_building_the_network(monkeypatch, capsys):
    """``bench_train.py --compile`` / ``bench_gpu.py --compile`` on a machine that cannot compile stop before the
    network is built (bench_train counted the FLOPs of a training step first, then ended in a traceback)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_gpu
    import bench_train

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", _no_compiler)
    monkeypatch.setattr(bench_train, "MedSAM3Net", None)  # building the network would fail the test
    with pytest.raises(SystemExit) as stopped:
        bench_train.main(["--compile"])
    assert stopped.value.code == 2 and "no working C++ compiler" in capsys.readouterr().err
    monkeypatch.setattr(bench_gpu, "PARTS", {})
    with pytest.raises(SystemExit, match="bench_gpu.py: --compile .* no working C\\+\\+ compiler"):
        bench_gpu.main(["forward", "--tiny", "--device", "cpu", "--compile"])
