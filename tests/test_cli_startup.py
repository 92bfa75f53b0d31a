"""The command line starts fast: building the parser, ``--help`` and argument errors import nothing heavy.

Not a timing test (timings: ``scripts/bench_cli.py``): a fresh interpreter builds the full ``medsam3`` parser under
``python -X importtime`` and the modules it imported are checked, so a module-level ``import torch`` (or MONAI,
transformers, ...) in a sub-command's parser module, or an eager package ``__init__``, fails here instead of
silently adding seconds to every ``medsam3`` call.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# top-level packages that take from a tenth of a second to several seconds to import
HEAVY = ("torch", "monai", "transformers", "mlflow", "ignite", "fastapi", "uvicorn", "matplotlib", "numpy",
         "scipy", "skimage", "PIL", "nibabel", "pandas")

# runs in a fresh interpreter: the full parser, every sub-command's --help and argparse errors (then the imported
# top-level packages), then a light sub-command's input error (then the packages again); JSON on stdout
MARKER = "--- medsam3 probe: parser done ---"
_PROBE = f"MARKER = {MARKER!r}\n" + """
import contextlib, io, json, sys
import medsam3_monai.deploy.cli as cli

parser = cli.build_parser()
commands = list(parser._subparsers._group_actions[0].choices)
codes = {}


def call(argv):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            codes[" ".join(argv)] = cli.main(argv)
        except SystemExit as stop:
            codes[" ".join(argv)] = stop.code


def top_level():
    return sorted({m.split(".")[0] for m in sys.modules})


for argv in [["--help"], *[[name, "--help"] for name in commands], ["segment"], ["evaluate"]]:
    call(argv)
modules = top_level()
print(MARKER, file=sys.stderr, flush=True)  # importtime lines after it are the datalist error's
call(["datalist"])  # the sub-command's own input error: its run may import numpy, but reporting needs no torch
print(json.dumps({"commands": commands, "codes": codes, "modules": modules, "after_datalist_error": top_level()}))
"""


def _importtime_modules(stderr: str) -> set[str]:
    """Top-level package names in ``-X importtime`` output (``import time: self | cumulative | name``)."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":  # the header line
                names.add(name.split(".")[0])
    return names


@pytest.fixture(scope="module")
def probe() -> dict:
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", _PROBE], capture_output=True, text=True,
                          cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert MARKER in done.stderr
    result["importtime"] = _importtime_modules(done.stderr.split(MARKER)[0])
    return result


def test_probe_sees_the_imports(probe):
    """The probe itself works: it parsed importtime lines and found the package and argparse."""
    assert {"medsam3_monai", "argparse"} <= probe["importtime"]
    assert {"medsam3_monai", "argparse"} <= set(probe["modules"])
    assert {"segment", "evaluate", "datalist", "demo", "serve"} <= set(probe["commands"])


def test_building_the_parser_imports_nothing_heavy(probe):
    imported = probe["importtime"] | set(probe["modules"])
    heavy = sorted(set(HEAVY) & imported)
    assert not heavy, (
        f"building the medsam3 parser (and --help / argument errors) imported {heavy}: import them inside the "
        "sub-command's run function, not at module level of the parser modules or package __init__ files"
    )


def test_help_and_argument_errors_exit_as_argparse_does(probe):
    codes = probe["codes"]
    assert codes["--help"] == 0
    assert all(codes[f"{name} --help"] == 0 for name in probe["commands"]), codes
    assert codes["segment"] == 2 and codes["evaluate"] == 2  # required arguments missing
    assert codes["datalist"] == 2  # NAME ROOT --out missing: the sub-command's own one-line error


def test_light_subcommand_error_needs_no_torch(probe):
    """Reporting an input error checks for CheckpointError only when its (torch-importing) module is loaded."""
    assert not {"torch", "transformers", "monai"} & set(probe["after_datalist_error"])


def test_console_script_argument_error():
    script = Path(sys.executable).parent / "medsam3"
    if not script.is_file():
        pytest.skip(f"no medsam3 console script beside {sys.executable}")
    done = subprocess.run([str(script), "segment"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 2
    assert "usage: medsam3 segment" in done.stderr
    assert "the following arguments are required: INPUT, --prompt, --out PATH (or --out-dir DIR)" in done.stderr


def test_a_misspelt_option_is_named_with_the_sub_commands_usage(capsys):
    from medsam3_monai.deploy.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "x.png", "--promt", "polyp", "--out", "m.png"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage: medsam3 segment" in err
    assert "medsam3 segment: error: unrecognized arguments: --promt polyp" in err


def test_no_command_prints_the_help_and_fails(capsys):
    """``medsam3`` alone exited 0, so a script that lost its command "succeeded"."""
    from medsam3_monai.deploy.cli import main

    assert main([]) == 2
    said = capsys.readouterr().err
    assert "usage: medsam3" in said and "medsam3: error: give a command" in said


def test_the_parsers_image_size_rule_is_the_networks():
    """``slice_size`` (the benchmarks' ``--image-size``; a size no network takes ran, or failed with a traceback)
    spells out the ViT patch so that parsers import no transformers: it must keep agreeing with the network's."""
    import argparse

    from medsam3_monai.deploy.arguments import VIT_PATCH_SIZE, slice_size
    from medsam3_monai.networks.presets import PATCH_SIZE, check_image_size

    assert VIT_PATCH_SIZE == PATCH_SIZE
    for size in range(1, 300):
        try:
            check_image_size(size)
            network_takes = True
        except ValueError:
            network_takes = False
        try:
            slice_size(str(size))
            parser_takes = True
        except argparse.ArgumentTypeError:
            parser_takes = False
        assert parser_takes == network_takes, size


def test_lazy_data_package_keeps_its_names():
    """``medsam3_monai.data`` imports its submodules on first use; every public name still resolves (the bundle
    configs call ``$medsam3_monai.data.load_datalists(...)`` after ``$import medsam3_monai.data``)."""
    import medsam3_monai.data as data
    from medsam3_monai.data.caching import CACHE_MODES
    from medsam3_monai.data.datalist import load_datalists

    for name in data.__all__:
        assert getattr(data, name) is not None, name
        assert name in dir(data)
    assert data.load_datalists is load_datalists and data.CACHE_MODES is CACHE_MODES
    with pytest.raises(AttributeError):
        data.no_such_name  # noqa: B018
