"""The bundle's configs as the one source of its pipelines: read a component of ``bundles/medsam3/configs``.

``medsam3 segment``, ``medsam3 evaluate`` and the server build their transform chains from the same JSON that
``python -m monai.bundle run`` executes, through MONAI's ``ConfigParser`` with the caller's overrides.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import unquote

BUNDLE_CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "medsam3" / "configs"
#: set by ``medsam3 train`` for the bundle it runs: the program name its errors go under (``medsam3 train``)
FRONT_VARIABLE = "MEDSAM3_FRONT"
#: a folder where the ranks of one ``torchrun`` (``deploy.torchrun`` makes it) mark the lines they said, so that an
#: input error every rank meets is said once, not once per rank
SAID_ONCE_VARIABLE = "MEDSAM3_SAID_ONCE_DIR"
#: set with it: that command's own options, a JSON object of bundle key -> option (``{"max_epochs": "--epochs"}``)
FRONT_OPTIONS_VARIABLE = "MEDSAM3_FRONT_OPTIONS"
#: and the values its ``--set KEY=VALUE`` gave, a JSON object of bundle key -> value (named in its messages)
FRONT_VALUES_VARIABLE = "MEDSAM3_FRONT_VALUES"
#: a bundle option in a message: ``--key`` and the value that may follow it (``--image_size 112``, ``--resume false``,
#: ``--grad_clip_norm None``, a quoted word or path ``--resume '/runs/a.pt'``)
_BUNDLE_OPTION = re.compile(r"--([a-z][a-z0-9_]*(?:#[a-z0-9_]+)*)(?: (true|false|None|-?[0-9][0-9.e+-]*|'[^'\s]+'))?"
                            r"(?![\w#-])")


def config_parser(config: str | Sequence[str], **overrides: Any):
    """A MONAI ``ConfigParser`` of ``bundles/medsam3/configs/<config>`` with ``overrides`` (config ids) applied.

    ``config`` may be a list of names, merged in order as ``monai.bundle run --config_file "[a, b]"`` merges
    them (``["inference.json", "evaluate.json"]`` is the evaluation bundle). Override values may be Python
    objects (a built network), which the parser passes through unchanged.

    Components parsed from one parser share their references (``@preprocessing`` in the post-processing is
    the very ``Compose`` parsed as ``preprocessing``), so parse a pipeline's pieces from the same parser.
    """
    from monai.bundle import ConfigParser

    paths = [BUNDLE_CONFIGS / name for name in ([config] if isinstance(config, str) else config)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"bundle config {path} not found: medsam3-monai runs from its repository checkout")
    parser = ConfigParser()
    parser.read_config([str(path) for path in paths])
    parser.update(overrides)
    return parser


def inference_postprocessing(preprocessing: Any):
    """The ``to_input_space`` of ``configs/inference.json`` (``Invertd`` per slice, restack, merge by confidence)
    for cases made by ``preprocessing``, an already built chain (``CaseInferer`` is given one)."""
    parser = config_parser("inference.json")
    parser["preprocessing"] = preprocessing
    return parser.get_parsed_content("to_input_space")


def front_words(message: str, options: dict[str, str], values: dict[str, str] | None = None) -> str:
    """A training bundle message in the words of a command that runs the bundle with its own ``options`` (bundle key
    -> option): ``--max_epochs`` -> ``--epochs``, ``--image_size 112`` -> ``--image-size 112``, and a key without an
    option of its own as ``--set``: ``--resume false`` -> ``--set resume=false``, ``did you mean --val_protocol?``
    -> ``did you mean --set val_protocol=...?``, ``--resize_kernel 'monai'`` -> ``--set resize_kernel=monai`` (a word
    value is quoted in the bundle's message; a message naming none takes the one ``values`` gives, the command's
    ``--set`` values); a key ``values`` gives is named as given even when the configs lack it (``--set epochs=3``);
    anything else that is not a key of the training configs stays as it is."""
    keys = set()
    for name in ("train.json", "multi_gpu_train.json"):
        keys |= set(json.loads((BUNDLE_CONFIGS / name).read_text(encoding="utf-8")))

    def swap(match: re.Match) -> str:
        key, value = match.group(1), (match.group(2) or "").strip("'")  # a word value comes quoted
        if key in options:
            return options[key] + (f" {value}" if value else "")
        if key in (values or {}) or key.split("#", 1)[0] in keys:
            return f"--set {key}={value or (values or {}).get(key) or '...'}"
        return match.group(0)

    return _BUNDLE_OPTION.sub(swap, message)


def in_front_words(text: str) -> str:
    """``text`` (a message naming bundle options) in the words of the command that runs the bundle (``medsam3
    train``: ``MEDSAM3_FRONT``, with its options in ``MEDSAM3_FRONT_OPTIONS``), else unchanged."""
    import os

    if not os.environ.get(FRONT_VARIABLE):
        return text
    return front_words(text, json.loads(os.environ.get(FRONT_OPTIONS_VARIABLE) or "{}"),
                       json.loads(os.environ.get(FRONT_VALUES_VARIABLE) or "{}"))


def _first_to_say(line: str) -> bool:
    """Whether this process is the first rank of its ``torchrun`` to say ``line`` (True outside one): a mark file
    named by the line's hash, created exclusively in ``SAID_ONCE_VARIABLE``'s folder."""
    import hashlib
    import os

    folder = os.environ.get(SAID_ONCE_VARIABLE)
    if not folder:
        return True
    try:
        os.close(os.open(os.path.join(folder, hashlib.sha1(line.encode()).hexdigest()), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    except OSError:  # the folder is gone or not writable: better twice than never
        return True
    return True


def _a_rank_said_why() -> bool:
    """Whether, under a ``torchrun`` of ``medsam3 train``, a rank has said its one error line already
    (:func:`_first_to_say` marked it)."""
    import os

    folder = os.environ.get(SAID_ONCE_VARIABLE)
    try:
        return bool(folder) and any(os.scandir(folder))
    except OSError:
        return False


def report_input_errors(prog: str = "medsam3 bundle", always: bool = False) -> None:
    """Make an input error end a ``python -m monai.bundle run`` as ``medsam3`` ends: one line on stderr, exit 2.

    The bundles call this first in ``initialize``. When the bundle is the program (``python -m monai.bundle``,
    also under torchrun; ``always``: whatever the program), it installs a ``sys.excepthook`` that finds our input
    error (a ValueError such as ``DataError``, a FileNotFoundError, a ``CheckpointError``) inside MONAI's and
    Ignite's ``RuntimeError`` wrappers, prints ``<prog>: error: <message>`` and exits with status 2; Ctrl-C ends
    with ``<prog>: interrupted`` and status 130; anything else (a bug) keeps Python's full traceback. Run by
    ``medsam3 train`` (``MEDSAM3_FRONT``), the messages name that command's options. A bundle run from Python
    (``ConfigWorkflow`` in a script, a notebook, tests) changes nothing of the process: its exceptions, and the
    script's own, keep their tracebacks.
    """
    import logging
    import os
    import sys

    if not (always or bundle_is_the_program()):
        return
    previous = sys.excepthook
    front = os.environ.get(FRONT_VARIABLE)
    if front:
        prog = front

    def hook(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
        interrupted = isinstance(error, KeyboardInterrupt)
        cause = None if interrupted else _input_error(error)
        if cause is None and not interrupted:
            if _a_rank_said_why():  # a torchrun peer stopped on an input error and said it: this rank lost it
                sys.stdout.flush()
                os._exit(2)  # (DDP's "Connection reset by peer"), a consequence, not a second story
            previous(kind, error, traceback)
            return
        bars = getattr(sys.modules.get("tqdm"), "tqdm", None)
        for bar in list(getattr(bars, "_instances", None) or []):  # a progress bar mid-line: end its line first
            bar.close()
        # the process's own stderr: under torch.distributed, its excepthook calls this one with sys.stderr swapped for
        # a buffer that it prints only after this hook returns, which os._exit does not
        stream = sys.__stderr__ or sys.stderr
        line = f"{prog}: interrupted" if interrupted else f"{prog}: error: {in_front_words(str(cause))}"
        if (not interrupted or not front) and _first_to_say(line):  # (medsam3 train says it, with how to resume)
            print(line, file=stream)
        stream.flush()
        sys.stdout.flush()
        os._exit(130 if interrupted else 2)  # excepthook cannot choose the exit status; nothing is left to clean up

    def not_said_twice(record: logging.LogRecord) -> bool:
        """Ignite's engines log "... terminating due to exception: <message>", and MONAI's ``StatsHandler``
        "Exception: " with the traceback, before the exception reaches the hook, which says it once; the lines are
        kept for anything else (a bug)."""
        if record.exc_info:
            error = record.exc_info[1]
        elif "terminating due to exception" in record.getMessage():
            error = sys.exc_info()[1]
        else:
            return True
        return not isinstance(error, KeyboardInterrupt) and _input_error(error) is None

    sys.excepthook = hook
    for handler in logging.getLogger().handlers:  # the logging file's handlers (engine loggers propagate to them)
        if not_said_twice not in handler.filters:
            handler.addFilter(not_said_twice)
    # MONAI's StatsHandler logs through a logger of its own (not propagated), which MONAI's get_logger sets up with
    # a stdout handler the first time: set up exactly so here (its later get_logger finds it), plus the filter
    from monai.apps import get_logger

    stats = get_logger("monai.handlers.StatsHandler")
    if not_said_twice not in stats.filters:
        stats.addFilter(not_said_twice)


def bundle_is_the_program() -> bool:
    """Whether this process runs ``python -m monai.bundle`` (directly or as a torchrun rank), not a script or a
    notebook that drives a bundle from Python."""
    import sys

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) in ("monai.bundle.__main__", "monai.bundle")


class _BarAwareStream:
    """A console stream whose writes clear tqdm's progress bars first and draw them again after, so that a log line
    printed while a bar is running gets its own line instead of continuing the bar's."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        from tqdm import tqdm

        with tqdm.external_write_mode(file=self.stream):
            return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, fileno, ...
        return getattr(self.stream, name)


def log_above_progress_bars() -> None:
    """Route every console log handler (the logging file's, MONAI's own module loggers') through
    :class:`_BarAwareStream`: a log line during an epoch (a skipped case, MONAI's "writing: ...") is printed above
    the progress bar rather than after it on the same line. The bundles call this in ``initialize``; it changes
    nothing where no bar is running, and it is idempotent."""
    import logging
    import sys

    loggers = [logging.getLogger()] + [logger for logger in logging.root.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if (type(handler) is logging.StreamHandler and not isinstance(handler.stream, _BarAwareStream)
                    and handler.stream in (sys.stdout, sys.stderr)):
                handler.setStream(_BarAwareStream(handler.stream))


def _input_error(error: BaseException | None) -> BaseException | None:
    """The input error (ours, or a ValueError / FileNotFoundError) inside ``error`` and its MONAI / Ignite
    wrappers, or a full disk's (``storage_errors.storage_error``), or None (a bug, or no error)."""
    if error is None:
        return None
    from .inferers.inputs import user_error
    from .networks.checkpoints import CheckpointError
    from .storage_errors import storage_error

    seen: BaseException | None = error
    while seen is not None and not isinstance(seen, CheckpointError):
        seen = seen.__cause__
    return (seen or user_error(error) or storage_error(error)
            or (error if isinstance(error, (ValueError, FileNotFoundError)) else None))


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def sqlite_uri(path: str | Path) -> str:
    """``sqlite:///`` URI of a database file (absolute) for MLflow: the path as it is, spaces and accents included,
    but ``%``, ``?`` and ``#`` percent-encoded (SQLAlchemy would read them as an escape, a query, a fragment).
    ``monai.utils.path_to_sqlite_uri`` encodes every space too, which MONAI's handler and MLflow then take
    literally for the folders they make (a folder named ``my%20work``)."""
    text = str(Path(path).expanduser().absolute())
    return "sqlite:///" + "".join(f"%{ord(c):02X}" if c in "%?#" else c for c in text)


def sqlite_database(tracking_uri: str | None) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI, its path decoded (:func:`sqlite_uri` encodes ``% ? #``);
    None for another kind of store or an in-memory database."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return None
    database = unquote(tracking_uri[len("sqlite:///"):])
    return Path(database) if database and database != ":memory:" else None


def prepare_sqlite_store(tracking_uri: str | None) -> Callable[[], None]:
    """Make the folder of a ``sqlite:///`` store's database (its path decoded: SQLite cannot make it, and MLflow then
    retries for 100 s), and return a function that removes the empty folders MLflow makes from the URI's path as
    written (``%3F`` for a '?': MLflow 3 does not decode it) once its client exists. Other stores: nothing to do."""
    database = sqlite_database(tracking_uri)
    if database is None:
        return lambda: None
    written, decoded = Path(tracking_uri[len("sqlite:///"):]).parent, database.parent
    decoded.mkdir(parents=True, exist_ok=True)
    if written == decoded:
        return lambda: None
    new = next((folder for folder in [*reversed(written.parents), written] if not folder.exists()), None)

    def tidy() -> None:
        if new is None or not new.is_dir():
            return
        for folder in sorted((p for p in new.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [new]:
            try:
                folder.rmdir()  # empty ones only
            except OSError:
                return

    return tidy


def number_in(value: Any, low: float, high: float = math.inf) -> bool:
    """An int or float (not a bool, not NaN) in ``[low, high]``, as a setting read from a command line must be."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and low <= value <= high


def whole_number(value: Any, minimum: int) -> bool:
    """An int (not a bool) >= ``minimum``: a count, an index."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


def flag(value: Any, name: str) -> bool:
    """A yes/no setting as given on ``python -m monai.bundle run``'s command line: ``--dac False`` arrives as a bool,
    ``--dac false`` as the text 'false' (MONAI's parser reads Python literals only), which must not count as true.
    Accepts bools, 0/1 and true/false/yes/no/on/off in any case; anything else is an error naming ``--name``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"--{name} {value!r}: give true or false")


def resume_setting(value: Any) -> bool | str:
    """The training bundle's ``resume``: true / false (as :func:`flag` reads them), or a checkpoint's path."""
    text = str(value).strip().lower()
    return flag(value, "resume") if isinstance(value, (bool, int)) or text in _TRUE or text in _FALSE else str(value)


def _setting_keys(name: str, defaults: dict[str, Any]) -> list[str]:
    """The keys a dictionary setting of ``train.json`` takes: its consumer's fields where it is a dataclass (the
    objective's weights and switches, the training dropout), else the keys ``train.json`` gives it."""
    import dataclasses

    if name in ("loss_weights", "loss_settings"):
        from .losses.criterion import CriterionSettings, LossWeights

        return [f.name for f in dataclasses.fields(LossWeights if name == "loss_weights" else CriterionSettings)]
    if name == "training_dropout":
        from .networks.regularization import TrainingDropout

        return [f.name for f in dataclasses.fields(TrainingDropout)]
    if name in ("matcher", "o2m_matcher"):
        import inspect

        from .losses import HungarianMatcher, OneToManyMatcher

        matcher = HungarianMatcher if name == "matcher" else OneToManyMatcher
        return [p for p in inspect.signature(matcher).parameters if p != "self"]
    return list(defaults[name])


def check_setting_keys(**settings: Any) -> None:
    """Refuse keys that a dictionary setting of ``train.json`` (``lr``, ``scheduler``, ``loss_weights``,
    ``loss_settings``, ``training_dropout``, ``matcher``, ``o2m_matcher``) does not have, before anything is
    cached: ``--lr#detectr 1e-4`` changed nothing, silently, and ``--loss_weights#gio 3`` failed after caching
    with a traceback."""
    import difflib
    import json

    defaults = json.loads((BUNDLE_CONFIGS / "train.json").read_text(encoding="utf-8"))
    for name, given in settings.items():
        if not isinstance(given, dict):
            raise ValueError(f"--{name} must be a dictionary of its keys (e.g. --{name}#KEY VALUE), got {given!r}")
        known = _setting_keys(name, defaults)
        unknown = sorted(set(given) - set(known))
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"--{name}#{unknown[0]}: {name} has no {', '.join(map(repr, unknown))}{hint}; its keys "
                             f"are {', '.join(known)}")
        if name in ("loss_weights", "matcher", "o2m_matcher", "lr", "scheduler", "training_dropout"):
            for key, value in given.items():  # numbers, checked here rather than after caching or mid-training
                if (name, key, value) == ("lr", "position_embedding_scale", None):  # None: the layer decay's own
                    continue
                if not number_in(value, 0):
                    raise ValueError(f"--{name}#{key} must be a number >= 0, got {value!r}")
        if name == "scheduler":
            timescale = given.get("timescale", 1)
            for key in ("warmup_steps", "cooldown_steps"):
                steps = given.get(key, 0)
                if isinstance(steps, float) and not steps.is_integer():
                    raise ValueError(f"--scheduler#{key} must be a whole number of optimiser steps, got {steps!r}")
            if not timescale > 0:
                raise ValueError(f"--scheduler#timescale must be > 0, got {timescale!r}")
        if name == "training_dropout":
            from .networks.regularization import TrainingDropout

            try:
                TrainingDropout(**given)
            except ValueError as err:
                raise ValueError(f"--training_dropout: {err}") from None
        if name == "loss_settings":
            _check_loss_settings(given)
        if name in ("matcher", "o2m_matcher"):
            from .losses import HungarianMatcher, OneToManyMatcher

            try:
                (HungarianMatcher if name == "matcher" else OneToManyMatcher)(**given)
            except ValueError as err:
                raise ValueError(f"--{name}: {err}") from None


def _check_loss_settings(given: dict[str, Any]) -> None:
    """``loss_settings`` as the objective (``SetCriterion``) takes them: its numbers >= 0 (a negative ``pos_weight``
    flips the sign of a term) and its alphas in [0, 1], its switches yes/no, its choices among theirs."""
    from .losses.criterion import CriterionSettings, SetCriterion

    try:
        SetCriterion(settings=CriterionSettings(**given))
    except ValueError as err:
        message = str(err)
        raise ValueError(message if message.startswith("--") else f"--loss_settings#{message}") from None


def check_flags(**settings: Any) -> None:
    """Yes/no settings read as :func:`flag` reads them, before anything is cached (``--dac maybe`` was refused only
    when the network was built)."""
    for name, value in settings.items():
        flag(value, name)


def require_whole(**settings: Any) -> None:
    """Settings that count things and must be whole numbers >= 0 (``max_instances`` 0: no cap; ``num_negatives``
    0: no sampled negatives; ``num_workers`` 0: load in the main process; ``seed``). ``--max_instances -1`` silently
    dropped targets, ``--num_negatives -1`` failed mid-training."""
    _require_whole_numbers(settings, 0)


def _require_whole_numbers(settings: dict[str, Any], minimum: int) -> None:
    for name, value in settings.items():
        if not whole_number(value, minimum):
            raise ValueError(f"--{name} must be a whole number >= {minimum}, got {value!r}")


#: what ``python -m monai.bundle run`` itself takes beside the config's own keys
RUNNER_ARGUMENTS = ("config_file", "meta_file", "logging_file", "bundle_root", "tracking", "args_file", "run_id",
                    "init_id", "final_id", "workflow_type", "workflow_name", "properties_path", "_meta_")


def check_override_keys(argv: Sequence[str] | None = None) -> None:
    """Refuse a ``--KEY`` of ``python -m monai.bundle run`` (or ``torchrun ... -m monai.bundle run``) that no config
    of the bundle has: MONAI's runner takes it as a new key that nothing reads, so ``--max_epoch 1`` trained the
    default 10 epochs, silently. A new key that another override refers to (``--augment ...`` beside ``... [@augment]
    ...``) is taken. Other ways of running (``ConfigWorkflow`` in Python) are not looked at."""
    arguments = _runner_arguments(argv)
    if arguments is not None:
        check_runner_arguments(arguments)


def check_runner_arguments(arguments: Sequence[str]) -> None:
    """:func:`check_override_keys` on the arguments after ``run`` of a ``monai.bundle run`` command line
    (``medsam3 train`` checks the command it is about to run)."""
    import difflib
    import json

    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

    known = set(RUNNER_ARGUMENTS) | set(DEFAULT_MLFLOW_SETTINGS["configs"])  # --tracking mlflow's settings
    overrides = dict(_override_values(arguments))
    running = _config_files(overrides.get("config_file"))
    if running is not None and not any(path.resolve() in running for path in BUNDLE_CONFIGS.glob("*.json")):
        running = None  # files of a copied bundle: every config's keys count
    for path in BUNDLE_CONFIGS.glob("*.json"):
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            continue
        if isinstance(config.get("configs"), dict):  # a --tracking settings file
            known |= set(config["configs"])
        elif running is None or path.resolve() in running:  # the configs this run merges (another's keys do nothing)
            known |= set(config)
    given = [arg[2:].split("=", 1)[0] for arg in arguments if arg.startswith("--")]
    merged = _merged_run_configs(overrides.get("config_file"))
    if merged is not None:  # the configs this run reads, in its order (a copied or extended bundle's own)
        _check_component_arguments(merged, overrides)
        _check_whole_blocks(merged, overrides)
    # a new key that another override reads (--augment "$..." with "... [@augment] ...") is a definition, not a typo
    known |= {name for key, value in _override_values(arguments) if value
              for name in re.findall(r"@([A-Za-z_]\w*)", value) if name != key.split("#", 1)[0]}
    for key, value in _override_values(arguments):
        if value == "None":  # fire reads None, and MONAI's update_kwargs(ignore_none=True) drops it
            hint = " (0 turns clipping off)" if key == "grad_clip_norm" else ""
            raise ValueError(f"--{key} None: MONAI's bundle runner drops an override whose value is None, so the "
                             f"config's value would stay; give the value you want instead{hint}")
    for key in given:
        top = key.split("#", 1)[0]
        if top and top not in known:
            close = difflib.get_close_matches(top, sorted(known), n=1)
            hint = f"did you mean --{close[0]}? " if close else ""
            raise ValueError(f"--{key}: the bundle has no setting '{top}', so it would change nothing; {hint}the "
                             "settings are the keys of bundles/medsam3/configs/*.json (docs/README.md, \"Settings you "
                             "will want to change\")")


def _merged_run_configs(value: str | None) -> dict[str, Any] | None:
    """The top-level entries of the config files a ``--config_file`` value names, merged in its order (a later
    file's entry replaces an earlier one's, as MONAI merges them); None when a file cannot be read as JSON (a YAML
    config, a missing file: MONAI reports those itself)."""
    import json

    paths = _config_file_list(value)
    if not paths:
        return None
    merged: dict[str, Any] = {}
    for path in paths:
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if isinstance(config, dict):
            merged.update(config)
    return merged


def _check_whole_blocks(configs: dict[str, Any], overrides: dict[str, str | None]) -> None:
    """Refuse ``--lr "{'detector': 1e-4}"``: a whole dictionary setting replaced by one lacking keys that the
    configs read one by one (``@lr#vision``: MONAI failed with "the referring item `@lr::vision` is not defined").
    A block the configs pass whole (``loss_weights``, ``matcher``: the callable's defaults fill what is left out)
    is taken as given."""
    import ast
    import json

    read = set(re.findall(r"@(\w+)#(\w+)", json.dumps(configs)))
    for key, value in overrides.items():
        block = configs.get(key)
        if not isinstance(block, dict) or "_target_" in block or not value:
            continue
        try:
            given = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            continue
        missing = [k for k in block if isinstance(given, dict) and k not in given and (key, k) in read]
        if missing:
            example = next(iter(given), next(iter(block)))
            raise ValueError(f"--{key} replaces the whole '{key}' block, and this one lacks {', '.join(missing)}, "
                             f"which the bundle reads: give only the keys you change, one each, e.g. "
                             f"--{key}#{example} VALUE")


def _check_component_arguments(configs: dict[str, Any], overrides: dict[str, str]) -> None:
    """Refuse ``--COMPONENT#ARG`` where COMPONENT is a ``_target_`` of the configs and ARG neither one of its keys nor
    a parameter of the callable it builds (the overridden ``#_target_`` when given): MONAI failed with a long
    traceback after caching. A callable taking ``**kwargs`` takes any name; a target that does not import, and a
    component replaced whole on the command line, are left to MONAI."""
    import difflib
    import inspect
    import pydoc

    components = {k: v for k, v in configs.items() if isinstance(v, dict) and "_target_" in v}
    for key in overrides:
        top, _, argument = key.partition("#")
        if top not in components or not argument or "#" in argument or argument.startswith("_"):
            continue
        if overrides.get(top):  # --optimizer "{'_target_': ...}" then --optimizer#momentum: the new one's
            continue
        if argument in components[top]:
            continue
        target = overrides.get(f"{top}#_target_", components[top]["_target_"])
        found = pydoc.locate(target) if isinstance(target, str) and not target.startswith(("$", "@")) else None
        if found is None:
            continue
        try:
            parameters = inspect.signature(found).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()) or argument in parameters:
            continue
        names = sorted(set(parameters) | {k for k in components[top] if not k.startswith("_")})
        close = difflib.get_close_matches(argument, names, n=1)
        hint = f"did you mean --{top}#{close[0]}? " if close else ""
        raise ValueError(f"--{key}: {target} takes no argument '{argument}'; {hint}its arguments are "
                         f"{', '.join(names)}")


def _config_file_list(value: str | None) -> list[Path] | None:
    """The config files a ``--config_file`` value names (one path, or a Python list of them), in order, resolved;
    None when it cannot be read that way."""
    import ast

    if not value:
        return None
    try:
        named = ast.literal_eval(value) if value.strip().startswith(("[", "(")) else value
    except (ValueError, SyntaxError):
        return None
    paths = [named] if isinstance(named, str) else list(named) if isinstance(named, (list, tuple)) else []
    return [Path(str(p)).expanduser().resolve() for p in paths] or None


def _config_files(value: str | None) -> set[Path] | None:
    """:func:`_config_file_list` as a set."""
    paths = _config_file_list(value)
    return set(paths) if paths else None


def _override_values(arguments: Sequence[str]) -> list[tuple[str, str | None]]:
    """``(key, value)`` of the runner's ``--key value`` and ``--key=value`` arguments (value None: a bare flag)."""
    pairs = []
    for index, arg in enumerate(arguments):
        if not arg.startswith("--"):
            continue
        key, equals, value = arg[2:].partition("=")
        following = arguments[index + 1] if index + 1 < len(arguments) else None
        if not equals and following is not None and not following.startswith("--"):
            value, equals = following, "="
        pairs.append((key, value if equals else None))
    return pairs


def _runner_arguments(argv: Sequence[str] | None = None) -> list[str] | None:
    """The arguments after ``run`` of ``python -m monai.bundle run`` (``argv``: default this process's), or None
    when this process is not that runner (``ConfigWorkflow`` in Python, tests)."""
    import sys

    argv = list(sys.argv if argv is None else argv)
    if not argv or Path(argv[0]).parent.name != "bundle" or Path(argv[0]).name != "__main__.py" or "run" not in argv:
        return None
    return argv[argv.index("run") + 1:]


def runner_overrides(argv: Sequence[str] | None = None) -> dict[str, str | None] | None:
    """The ``--key value`` overrides given to ``python -m monai.bundle run`` (None when this process is not that
    runner): which settings a user chose, where a config's default cannot tell."""
    arguments = _runner_arguments(argv)
    return None if arguments is None else dict(_override_values(arguments))


def check_inference_inputs(items: Sequence[dict[str, Any]], protocol: str, skip_unreadable: bool = False,
                           argv: Sequence[str] | None = None, channel: int | None = None) -> None:
    """The inference bundle's checks before the network loads, as ``medsam3 segment`` makes them: every input
    exists (unless ``skip_unreadable``; not one of them: refused), the protocol is known and a 2D one is not asked
    of volumes, each input's ``channel`` fits it (from the headers), and a ``--ct_window`` given on the runner's
    command line reaches a CT input (else it would go unused)."""
    from .data.selection import is_volume_item
    from .inferers.inputs import check_item_channels
    from .protocol_registry import get_protocol
    from .transforms.io import input_modality

    missing = [str(item["image"]) for item in items if not Path(str(item["image"])).exists()]
    if missing and (not skip_unreadable or len(missing) == len(items)):
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        go_on = "" if len(missing) == len(items) else ", or --skip_unreadable true to go on without them"
        raise FileNotFoundError(f"{missing[0]}: not found{more}; give existing images, volumes or DICOM folders in "
                                f"--datalist{go_on}")
    present = [item for item in items if str(item["image"]) not in missing]
    try:
        get_protocol(protocol)
    except ValueError as err:
        raise ValueError(f"--protocol {protocol}: {err}") from None
    if channel is not None and not whole_number(channel, 0):
        raise ValueError(f"--channel must be a whole number >= 0 (a 4D volume's channel / time point), got {channel!r}")
    check_item_channels(present, channel)
    volumes = [str(item["image"]) for item in present if is_volume_item(item)]
    if volumes and protocol not in (None, "top_query"):
        raise ValueError(f"--protocol {protocol} applies to 2D images but {volumes[0]} is a volume: volumes use the "
                         "top query per slice (score >= --score_threshold); segment them in a run of their own")
    given = runner_overrides(argv) or {}
    if "ct_window" in given:
        from .transforms.intensity import is_ct_windowed

        if not any(is_ct_windowed(input_modality(item["image"], item.get("modality"))) for item in present):
            raise ValueError(f"--ct_window {given['ct_window']} applies to CT inputs, but no input is marked CT: give "
                             "the datalist items 'modality': 'CT' (or leave --ct_window out)")


def check_val_protocol(value: Any) -> None:
    """Refuse a validation protocol ``PromptDice`` does not take, before the data is cached."""
    from .engines import PromptDice

    try:
        PromptDice(str(value))
    except (ValueError, KeyError) as err:
        raise ValueError(f"--val_protocol {value!r}: {err}") from None


def check_resize_kernel(value: Any) -> None:
    """Refuse a slice-space resize kernel ``TiledResizeToSliced`` does not have, before the data is cached."""
    from .transforms.slices import RESIZE_KERNELS

    if value not in RESIZE_KERNELS:
        raise ValueError(f"--resize_kernel {value!r}: give 'sam3' (SAM3's image processor's resize of the 8-bit "
                         "picture, the default) or 'monai' (MONAI's Resize of the float intensities)")


def check_grad_clip_norm(value: Any) -> None:
    """``grad_clip_norm``: a number >= 0 (0: no clipping). A negative one would flip every gradient's sign in
    ``clip_grad_norm_`` (the optimiser then climbs the loss)."""
    if not number_in(value, 0):
        raise ValueError(f"--grad_clip_norm must be a number >= 0 (the largest gradient norm; 0 turns clipping off), "
                         f"got {value!r}")


def require_positive(**settings: Any) -> None:
    """Refuse a bundle setting that counts iterations or epochs and must be a whole number >= 1 (``val_interval=0``
    would otherwise end in Ignite's "Argument every should be integer and greater than zero")."""
    _require_whole_numbers(settings, 1)


def slice_size(checkpoint: str | Path, image_size: int | None) -> int:
    """The training bundle's slice-space side: ``image_size`` when given, else the checkpoint's own: 112 for
    ``tiny``, the size a folder's or our model file's configuration stores, 1008 for a file without a configuration
    (``sam3.pt``, a Medical-SAM3 release file; give 504 for the release's 3D checkpoint), as the commands choose."""
    from .networks.presets import FULL_IMAGE_SIZE, TINY_IMAGE_SIZE

    if image_size is not None:
        return int(image_size)
    if str(checkpoint) == "tiny":
        return TINY_IMAGE_SIZE
    declared = _declared_image_size(Path(checkpoint).expanduser())
    return FULL_IMAGE_SIZE if declared is None else declared


def check_network_source(checkpoint: str | Path, image_size: int | None) -> None:
    """Refuse an image size that is not a multiple of 14 and a checkpoint that is neither ``tiny``, a folder nor a
    readable checkpoint file, before the training bundle caches its data (minutes at 1008 px); the network, built
    later, reads the weights and checks the rest (architecture, the checkpoint's own size)."""
    from .networks.checkpoints import checkpoint_keys, folder_without_config, missing_checkpoint, read_checkpoint_file
    from .networks.presets import check_image_size

    if image_size is not None:
        check_image_size(image_size)
    if str(checkpoint) == "tiny":
        return
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise missing_checkpoint(path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise folder_without_config(path)
    if path.is_file() and path.suffix != ".safetensors" and checkpoint_keys(path) is None:
        read_checkpoint_file(path)  # not a state dict: read whole (what loading would do), to say what it is
    declared = _declared_image_size(path)
    if image_size is not None and declared is not None and declared != int(image_size):
        raise ValueError(f"checkpoint {path} works at {declared} px, not {image_size}: give --image_size {declared}")


def _declared_image_size(path: Path) -> int | None:
    """The image size a checkpoint's stored configuration names (a transformers folder's ``config.json``, our model
    file's ``config``, a training checkpoint's ``network_config``), or None when it names none (a ``sam3.pt``)."""
    import json

    import torch

    from .networks.checkpoints import described_image_size

    try:
        if path.is_dir():
            return described_image_size(json.loads((path / "config.json").read_text(encoding="utf-8")))
        # the keys and small entries only: memory-mapped, the tensors are not read
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return described_image_size(stored if stored.get("config") is not None else stored.get("network_config"))
    except (OSError, ValueError, TypeError, AttributeError, RuntimeError):
        return None


def require_empty_output(output_dir: str | Path, executed_config: Any = None) -> None:
    """Refuse an ``output_dir`` that holds files (an earlier run's report and overlays would mix with this run's,
    and go into its MLflow run), as ``medsam3 evaluate`` refuses a non-empty ``--out``. ``executed_config``: the
    bundle's ``save_execute_config``, the file MONAI's ``--tracking`` has just written there (its path; a flag when
    not tracking), which is this run's own."""
    folder = Path(output_dir).expanduser()
    own = Path(executed_config).expanduser().resolve() if isinstance(executed_config, (str, Path)) else None
    if folder.exists() and (not folder.is_dir() or any(p.resolve() != own for p in folder.iterdir())):
        raise ValueError(f"output {folder} exists and is not an empty folder (an earlier run's?): remove it, or pass "
                         "another --output_dir (or --bundle_root)")


def bundle_weights(bundle_root: str | Path) -> str:
    """The weights a bundle's ``inference.json`` / ``evaluate.json`` run with when ``checkpoint`` is not given:
    ``bundle_root/models/model.pt`` (what ``train.json`` writes there). Raises ValueError when it is missing: the
    random-init ``tiny`` network is used only when asked for by name (``--checkpoint tiny``)."""
    import logging

    path = Path(bundle_root).expanduser() / "models" / "model.pt"
    if not path.is_file():
        raise ValueError(
            f"no weights: {path} does not exist. Pass --checkpoint SRC (an HF folder, sam3.pt, a Medical-SAM3 or "
            "medsam3-monai checkpoint), or --checkpoint tiny for the random-init network"
        )
    logging.getLogger("medsam3_monai.bundle").info("using the bundle's weights %s", path)
    return str(path)


def log_weights(checkpoint: str, network: Any, image_size: Any = None) -> None:
    """Say which weights a bundle runs with (the first ``run`` step of ``inference.json``), after refusing an
    ``image_size`` other than the network's: the inference bundle's slices follow the network, whose size its
    ``tiny_image_size`` or ``checkpoint_image_size`` sets (a bare ``--image_size`` would only change the resize, and
    the forward would refuse the slices)."""
    import logging

    built = int(getattr(network, "image_size", 0))
    try:
        wanted = None if image_size is None else int(image_size)
    except (TypeError, ValueError):
        raise ValueError(f"--image_size {image_size!r}: give a whole number, or leave it out (the inference bundle's "
                         "slice size is the network's)") from None
    if wanted is not None and wanted != built:
        where = f"the inference bundle's slice size is the network's, here {built} px"
        if str(checkpoint) == "tiny":
            remedy = f"give --tiny_image_size {wanted} to build the tiny network at {wanted}"
        elif _declared_image_size(Path(str(checkpoint)).expanduser()) is not None:
            remedy = f"checkpoint {checkpoint} works at the {built} px it stores: leave --image_size out"
        else:
            remedy = (f"give --checkpoint_image_size {wanted} to build this file without a configuration (sam3.pt, "
                      f"a Medical-SAM3 file) at {wanted}")
        raise ValueError(f"--image_size {image_size}: {where}; {remedy}")

    what = "the random-init tiny network" if str(checkpoint) == "tiny" else str(checkpoint)
    logging.getLogger("medsam3_monai.bundle").info("weights: %s (%d px slice space)", what, built)


def find_datalists(dataset_dir: str | Path) -> list[str]:
    """The datalist JSON files in ``dataset_dir`` (the training bundle's default ``datalists``: put the files
    ``medsam3 datalist`` writes into ``bundle_root/datalists``, or pass ``--datalists "['a.json', ...]"``)."""
    folder = Path(dataset_dir).expanduser()
    found = sorted(str(p) for p in folder.glob("*.json")) if folder.is_dir() else []
    if not found:
        raise ValueError(f"no datalists: {folder} holds no *.json datalist; pass --datalists \"['a.json', ...]\" or "
                         f"write datalists there with `medsam3 datalist NAME ROOT --out {folder}/NAME.json`")
    return found


def validates(items: Sequence[Any], validate_at_start: bool = False) -> bool:
    """Whether the training bundle validates: its datalists' ``validation`` lists hold items (a datalist may give
    ``"validation": []``). Without any, the run trains without validation, and says so: no ``val_dice``, no
    ``model_best_val_dice.pt`` (an empty validation scored 0.0 and saved a "best" network chosen on nothing);
    ``models/model.pt`` is the final network."""
    import logging

    if items:
        return True
    at_start = " (--validate_at_start is left out)" if validate_at_start else ""
    logging.getLogger("medsam3_monai.bundle").warning(
        "no validation items (the datalists' 'validation' lists are empty): training without validation%s: no "
        "val_dice, no model_best_val_dice.pt; models/model.pt is the final network. Give validation items "
        "(medsam3 datalist keeps 15%% of each dataset) to select the best network", at_start)
    return False
