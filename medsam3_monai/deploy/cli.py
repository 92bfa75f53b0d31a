"""The `medsam3` command line: one sub-command per job, clear errors and non-zero exits on bad input."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from typing import Any, Sequence

from .. import __version__

# sub-command modules, each exposing add_parser(subparsers); imported lazily per call
_COMMANDS = ("medsam3_monai.deploy.convert", "medsam3_monai.data.cli", "medsam3_monai.deploy.evaluate_cli",
             "medsam3_monai.deploy.demo", "medsam3_monai.deploy.train_cli", "medsam3_monai.deploy.segment_cli",
             "medsam3_monai.deploy.serve", "medsam3_monai.deploy.agent_cli", "medsam3_monai.deploy.reproduce_cli")


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
    is a ValueError; CheckpointError is a RuntimeError of its own. Its module imports torch, so it is looked up
    only when already loaded (if it is not, no CheckpointError can have been raised): an error of a light
    sub-command (``medsam3 datalist``) is reported without importing torch.
    """
    errors: tuple[type[BaseException], ...] = (FileNotFoundError, FileExistsError, ValueError)
    checkpoints = sys.modules.get("medsam3_monai.networks.checkpoints")
    if checkpoints is not None:
        errors = (checkpoints.CheckpointError, *errors)
    return errors


def _innermost_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub-)sub-command ``args`` were parsed by (``medsam3 reproduce medical-sam3``'s own)."""
    while True:
        commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = getattr(args, commands.dest, None) if commands is not None else None
        if chosen not in (commands.choices if commands is not None else {}):
            return parser
        parser = commands.choices[chosen]


def _no_library_progress_bars() -> None:
    """``--no-progress`` for the libraries' bars too (transformers' "Loading weights", Hugging Face's): through
    their switch when transformers is loaded already, else through the variable it reads when it is imported."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


#: options and positionals that name files or folders: a leading '~' is the user's home in every command, as
#: the shell would expand it (it does not in `--out=~/x` or a quoted '~/x')
PATH_ARGUMENTS = ("input", "out", "out_dir", "overlay", "trace", "datalist", "data", "data_root", "root", "name",
                  "relative_to", "checkpoint", "baseline", "tracker", "src", "dst", "config")


def _expand_home(args: argparse.Namespace) -> None:
    def expand(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("~"):
            return os.path.expanduser(value)
        if isinstance(value, list):
            return [expand(v) for v in value]
        return value

    for name in PATH_ARGUMENTS:
        if hasattr(args, name):
            setattr(args, name, expand(getattr(args, name)))


#: the commands whose paths go through MONAI's bundle configs, whose parser reads every '#' in a string as its old
#: key separator: 'run#2' became 'run::2' (a run written elsewhere than it said, a datalist 'not found')
BUNDLE_COMMANDS = ("train", "evaluate", "reproduce", "demo")


def _refuse_config_hash(args: argparse.Namespace) -> None:
    """A ValueError naming the first path argument with a '#' of a command in :data:`BUNDLE_COMMANDS`."""
    if getattr(args, "command", None) not in BUNDLE_COMMANDS:
        return
    for name in PATH_ARGUMENTS:
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and "#" in value:
                option = "--" + name.replace("_", "-")
                raise ValueError(f"{option} {value}: MONAI's bundle configs read '#' as a key separator (the path "
                                 "would become '" + value.replace("#", "::") + "'): give a path without '#'")


def _one_writer(args: argparse.Namespace) -> Any:
    """The lock on the command's output folder (:mod:`.output_lock`), or a no-op for a command that writes none."""
    from .output_lock import OUTPUT_FOLDER_OPTIONS, output_lock

    name = OUTPUT_FOLDER_OPTIONS.get(args.command)
    folder = getattr(args, name, None) if name else None
    if not isinstance(folder, str) or not folder:
        return contextlib.nullcontext()
    return output_lock(folder, name.upper() if name == "dst" else "--" + name.replace("_", "-"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # named by the sub-command's own usage (argparse would print the top-level one)
        files = [extra for extra in extras if extra.startswith("-") and os.path.exists(extra)]
        hint = (f" ({files[0]} is a file: write ./{files[0]} for a name that starts with '-')" if files else "")
        _innermost_parser(parser, args).error(f"unrecognized arguments: {' '.join(extras)}{hint}")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given (a reproduction records it)
    _expand_home(args)
    if not getattr(args, "func", None):  # no command given: a script that called it wrongly must not "succeed"
        parser.print_help(sys.stderr)
        print("\nmedsam3: error: give a command (medsam3 COMMAND --help for its options)", file=sys.stderr)
        return 2
    # an input error is reported below in one line (a bug by its traceback): Ignite's engines would log an extra
    # "run is terminating due to exception" line for either
    logging.getLogger("ignite.engine.engine").setLevel(logging.CRITICAL)
    if getattr(args, "no_progress", False):
        _no_library_progress_bars()
    try:
        _refuse_config_hash(args)
        with _one_writer(args):
            return int(args.func(args) or 0)
    except _user_errors() as err:
        print(f"medsam3 {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medsam3: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a full disk, or an input error MONAI/Ignite wrapped; a bug is re-raised
        from ..storage_errors import storage_error

        cause = storage_error(err)
        if cause is None and isinstance(err, RuntimeError):  # an input error raised in a transform or an engine
            from ..inferers.inputs import user_error

            cause = user_error(err)
        if cause is None:
            raise
        print(f"medsam3 {args.command}: error: {cause}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
