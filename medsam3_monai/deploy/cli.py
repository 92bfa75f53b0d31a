"""The `medsam3` command line: one sub-command per job, clear errors and non-zero exits on bad input."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .. import __version__

# sub-command modules, each exposing add_parser(subparsers); imported lazily per call
_COMMANDS = ("medsam3_monai.deploy.convert", "medsam3_monai.data.cli", "medsam3_monai.deploy.evaluate_cli",
             "medsam3_monai.deploy.demo", "medsam3_monai.deploy.segment_cli",
             "medsam3_monai.deploy.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsam3",
        description="Medical SAM3 / MedSAM3: text-prompted medical image segmentation with SAM3, the MONAI way.",
    )
    parser.add_argument("--version", action="version", version=f"medsam3-monai {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue  # that capability is not installed in this version
            raise
        module.add_parser(subparsers)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (reported in one line), not a bug (full traceback).

    Every input error of the package (PromptError, DataError, DatalistError, CatalogueError, KeyMappingError)
    is a ValueError; CheckpointError is a RuntimeError of its own.
    """
    from ..networks.checkpoints import CheckpointError

    return (CheckpointError, FileNotFoundError, FileExistsError, ValueError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except _user_errors() as err:
        print(f"medsam3 {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medsam3: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
