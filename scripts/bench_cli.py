#!/usr/bin/env python
"""Command line start-up time: ``medsam3 --help``, each ``medsam3 <sub> --help`` and an argument error.

Every command runs as a fresh process of the ``medsam3`` console script of this interpreter's environment
(``Path(sys.executable).parent / "medsam3"``); the reference is ``python -c "import torch"`` timed in the same
run, so ``over_import_torch`` (command time / torch import time) stays comparable on a busy machine. Building
the parser imports nothing heavy (no torch, MONAI, transformers, ...; ``tests/test_cli_startup.py`` checks it),
so each ratio should be well below 1 (before that change ``medsam3 --help`` took 4.6-7.6 s, about three torch
imports; after it about 0.1 s).

* ``wall_s``: median elapsed seconds over ``--repeats`` runs (after one warm-up run of each command);
* ``cpu_s``: median user + system CPU seconds of the process (less sensitive to other load on the machine);
* ``error``: ``medsam3 segment`` without arguments, which must exit 2 with argparse's message.

    python scripts/bench_cli.py [--repeats 3]

Prints one JSON object on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, whichever one the environment installed
# ... and the children it starts
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
MEDSAM3 = Path(sys.executable).parent / "medsam3"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_once(command: list[str]) -> tuple[float, float, int]:
    """(wall seconds, child CPU seconds, exit code) of one run of ``command``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.returncode


def measure(command: list[str], repeats: int) -> dict[str, Any]:
    """Median wall and CPU seconds of ``command`` over ``repeats`` runs after one warm-up run."""
    _run_once(command)
    runs = [_run_once(command) for _ in range(repeats)]
    codes = sorted({code for _, _, code in runs})
    return {
        "wall_s": round(statistics.median(wall for wall, _, _ in runs), 3),
        "cpu_s": round(statistics.median(cpu for _, cpu, _ in runs), 3),
        "runs_wall_s": [round(wall, 3) for wall, _, _ in runs],
        "exit_code": codes[0] if len(codes) == 1 else codes,
    }


def subcommands() -> list[str]:
    """The sub-commands the installed ``medsam3`` offers (read from its parser, which is light to build)."""
    from medsam3_monai.deploy.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from medsam3_monai.deploy.arguments import at_least

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=at_least(1), default=3, help="timed runs per command (default 3; median)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if not MEDSAM3.is_file():
        raise SystemExit(f"{MEDSAM3}: no medsam3 console script beside this Python (pip install -e . first)")

    started = time.perf_counter()
    _log("reference: python -c 'import torch'")
    torch_import = measure([sys.executable, "-c", "import torch"], args.repeats)
    reference = torch_import["wall_s"]

    commands = {"--help": ["--help"]}
    commands.update({f"{name} --help": [name, "--help"] for name in subcommands()})
    commands["segment (argument error)"] = ["segment"]
    results: dict[str, Any] = {}
    for label, arguments in commands.items():
        _log(f"medsam3 {label}")
        result = measure([str(MEDSAM3), *arguments], args.repeats)
        result["over_import_torch"] = round(result["wall_s"] / reference, 3)
        results[label] = result

    helps = {label: r for label, r in results.items() if label.endswith("--help")}
    slowest = max(helps, key=lambda label: helps[label]["wall_s"])
    report: dict[str, Any] = {
        "console_script": str(MEDSAM3),
        "repeats": args.repeats,
        "unit": "wall_s = median elapsed seconds of a fresh process; cpu_s = its median user + system CPU seconds; "
                "over_import_torch = wall_s / the wall_s of python -c 'import torch' in this run",
        "import_torch": torch_import,
        "help_s": results["--help"]["wall_s"],
        "help_over_import_torch": results["--help"]["over_import_torch"],
        "slowest_help": {"command": f"medsam3 {slowest}", "wall_s": helps[slowest]["wall_s"],
                         "over_import_torch": helps[slowest]["over_import_torch"]},
        "commands": results,
        "machine": {"cpu_count": os.cpu_count(), "loadavg_1min": round(os.getloadavg()[0], 2),
                    "python": sys.version.split()[0], "bench_wall_s": round(time.perf_counter() - started, 1)},
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
