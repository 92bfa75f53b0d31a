"""The app's ``--conf`` options (``monailabel start_server ... --conf KEY VALUE``) -> one :class:`AppConfig`.

Every value arrives as a string. Keys (all optional):

* ``labels``: the concepts, as JSON ``{"polyp": 1, "instrument": 2}`` (label name -> label value), a JSON
  list ``["polyp", "instrument"]`` or a comma-separated ``polyp,instrument`` (values 1..P in that order).
  Default ``{"polyp": 1}``. Each label is one text prompt; the label name is the prompt text unless
  ``prompts`` says otherwise.
* ``prompts``: JSON ``{"label name": "text prompt"}`` for labels whose prompt differs from their name, e.g.
  ``{"polyp": "colon polyp"}``.
* ``checkpoint`` (``tiny``: random init, runs without weights), ``image_size``, ``tracker`` (``auto``),
  ``protocol`` (``top_query``), ``score_threshold`` (0.5), ``modality`` (none: by channels), ``ct_window`` and
  ``resize_kernel`` (the ones the checkpoint's model file records, its training's, else ``abdomen`` and ``sam3``):
  as ``medsam3 segment``'s options of the same names.
* ``model``: the model's name in MONAI Label (``medsam3``); ``preload``: load the network at start (``false``:
  on the first request).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

DEFAULT_LABELS = {"polyp": 1}
MODEL_NAME = "medsam3"
KNOWN_KEYS = ("labels", "prompts", "checkpoint", "image_size", "tracker", "protocol", "score_threshold",
              "modality", "ct_window", "resize_kernel", "model", "preload")
#: ``--conf`` keys MONAI Label itself reads (its server mode, the model zoo's source and token)
MONAI_LABEL_KEYS = ("server_mode", "auth_token", "zoo_source", "zoo_repo")


class ConfError(ValueError):
    """A ``--conf`` value the app cannot use (the message names the key and what to give)."""


@dataclass
class AppConfig:
    labels: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LABELS))
    prompts: dict[str, str] = field(default_factory=dict)  # label name -> text prompt (every label)
    checkpoint: str = "tiny"
    image_size: int | None = None
    tracker: str = "auto"
    protocol: str = "top_query"
    score_threshold: float = 0.5
    modality: str | None = None
    ct_window: Any = None  # None: the model file's own (its training's), else abdomen
    resize_kernel: str | None = None  # None: the model file's own, else sam3
    model: str = MODEL_NAME
    preload: bool = False

    def __post_init__(self) -> None:
        self.prompts = {name: self.prompts.get(name, name) for name in self.labels}


def _json_or_text(key: str, value: str) -> Any:
    text = value.strip()
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfError(f"--conf {key} {value!r}: not valid JSON ({err})") from None
    return text


def parse_labels(value: Any) -> dict[str, int]:
    """``{"polyp": 1}`` / ``["polyp", "instrument"]`` / ``"polyp,instrument"`` -> {name: value}."""
    spec = _json_or_text("labels", value) if isinstance(value, str) else value
    if isinstance(spec, str):
        spec = [part.strip() for part in spec.split(",") if part.strip()]
    if isinstance(spec, list):
        spec = [(name, i + 1) for i, name in enumerate(spec)]  # pairs: a name given twice stays visible
    elif isinstance(spec, dict):
        spec = list(spec.items())
    if not isinstance(spec, list) or not spec:
        raise ConfError(f"--conf labels {value!r}: give JSON {{\"polyp\": 1}}, a JSON list or comma-separated names")
    names = [str(name).strip() for name, _ in spec]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfError(f"--conf labels {value!r}: {twice} named twice")
    labels: dict[str, int] = {}
    for name, (_, number) in zip(names, spec):
        if isinstance(number, str) and number.strip().isdigit():
            number = int(number)
        if isinstance(number, bool) or not isinstance(number, int):
            raise ConfError(f"--conf labels: the value of {name!r} must be an integer 1..255, got {number!r}")
        if not name:
            raise ConfError("--conf labels: a label name is empty")
        if not 1 <= number <= 255:
            raise ConfError(f"--conf labels: {name!r} = {number}: label values are 1..255 (0 is the background)")
        labels[name] = number
    if len(set(labels.values())) < len(labels):
        raise ConfError(f"--conf labels {value!r}: two labels share a value")
    return labels


def _choice(key: str, value: str | None, choices: tuple[str, ...]) -> str | None:
    if value is not None and value not in choices:
        raise ConfError(f"--conf {key} {value!r}: choose one of {', '.join(choices)}")
    return value


def parse_conf(conf: dict[str, str] | None) -> AppConfig:
    """The app's settings from MONAI Label's ``conf`` dict, checked as far as can be without loading the network:
    an unknown key (a typo would silently keep the default, e.g. random weights for ``checkpont``), a checkpoint or
    tracker that is not there, a bad image size, protocol, modality or CT window all stop the start."""
    conf = dict(conf or {})
    unknown = sorted(set(conf) - set(KNOWN_KEYS) - set(MONAI_LABEL_KEYS))
    if unknown:
        import difflib

        hints = [f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, KNOWN_KEYS, 1))
                 else repr(key) for key in unknown]
        raise ConfError(f"unknown --conf key(s) {', '.join(hints)}: the app's keys are {', '.join(KNOWN_KEYS)}")
    labels = parse_labels(conf["labels"]) if conf.get("labels") else dict(DEFAULT_LABELS)
    prompts: dict[str, str] = {}
    if conf.get("prompts"):
        spec = _json_or_text("prompts", conf["prompts"])
        if not isinstance(spec, dict):
            raise ConfError(f"--conf prompts {conf['prompts']!r}: give JSON {{\"label name\": \"text prompt\"}}")
        unknown = sorted(set(map(str, spec)) - set(labels))
        if unknown:
            raise ConfError(f"--conf prompts names {unknown}, which are not labels ({sorted(labels)})")
        prompts = {str(k): str(v).strip() for k, v in spec.items()}
        empty = [k for k, v in prompts.items() if not v]
        if empty:
            raise ConfError(f"--conf prompts: empty prompt for {empty}")
    image_size = conf.get("image_size")
    try:
        score = float(conf.get("score_threshold", 0.5))
    except ValueError:
        raise ConfError(f"--conf score_threshold {conf['score_threshold']!r}: give a number in [0, 1]") from None
    if not 0.0 <= score <= 1.0:
        raise ConfError(f"--conf score_threshold {score}: give a number in [0, 1]")
    ct = conf.get("ct_window") or None
    if ct is not None and "," in ct:
        try:
            width, level = (float(v) for v in ct.split(","))
        except ValueError:
            raise ConfError(f"--conf ct_window {ct!r}: give a preset name or width,level (e.g. 400,40)") from None
        ct = (width, level)
    from medsam3_monai.bundle import check_network_source, flag
    from medsam3_monai.networks.checkpoints import CheckpointError
    from medsam3_monai.networks.presets import check_image_size
    from medsam3_monai.networks.tracker import check_tracker_source
    from medsam3_monai.protocol_registry import PROTOCOLS
    from medsam3_monai.transforms.intensity import check_ct_window, handler_for_modality
    from medsam3_monai.transforms.slices import RESIZE_KERNELS

    modality = conf.get("modality") or None
    modality = None if modality in (None, "auto", "none") else modality
    if image_size in (None, "", "none", "None"):
        image_size = None
    elif not str(image_size).strip().isdigit():
        raise ConfError(f"--conf image_size {image_size!r}: give a whole number, a multiple of 14 (e.g. 1008)")
    checkpoint = conf.get("checkpoint") or "tiny"
    tracker = conf.get("tracker") or "auto"
    for key, check in (("image_size", lambda: image_size is None or check_image_size(int(image_size))),
                       ("checkpoint", lambda: check_network_source(checkpoint, None)),
                       ("tracker", lambda: check_tracker_source(tracker)),
                       ("ct_window", lambda: ct is None or check_ct_window(ct))):
        try:
            check()
        except (ValueError, OSError, CheckpointError) as err:
            raise ConfError(f"--conf {key}: {err}") from None
    try:
        preload = flag(conf.get("preload", "false"), "conf preload")
    except ValueError as err:
        raise ConfError(str(err)) from None
    if modality is not None:
        try:
            handler_for_modality(modality)
        except KeyError:
            raise ConfError(f"--conf modality {modality!r}: give auto (by channels), CT, MRI, X-ray, ultrasound, "
                            "endoscopy, fundus, OCT, dermoscopy, pathology, EM or microscopy") from None
    config = AppConfig(
        labels=labels,
        prompts=prompts,
        checkpoint=checkpoint,
        image_size=None if image_size is None else int(image_size),
        tracker=tracker,
        protocol=_choice("protocol", conf.get("protocol") or "top_query", tuple(PROTOCOLS)),
        score_threshold=score,
        modality=modality,
        ct_window=ct,
        resize_kernel=(_choice("resize_kernel", conf["resize_kernel"], RESIZE_KERNELS) if conf.get("resize_kernel")
                       else None),
        model=conf.get("model") or MODEL_NAME,
        preload=preload,
    )
    from medsam3_monai.inferers.inputs import check_distinct_prompts

    try:  # two labels of one text: the second would always be empty (the request-time check, at start)
        check_distinct_prompts(list(config.prompts.values()), "--conf labels / prompts")
    except ValueError as err:
        raise ConfError(str(err)) from None
    return config


def studies_note(studies: str, patterns: list[str]) -> str | None:
    """What to say when a studies folder lists nothing while its sub-folders hold images (a dataset's ``images/``):
    MONAI Label's datastore reads only the files directly in the folder that match ``patterns``
    (``MONAI_LABEL_DATASTORE_FILE_EXT``: ``*.nii.gz``, ``*.png``, ...). None when there is nothing to say (a DICOMweb
    URL, a folder that lists images, or one without images anywhere)."""
    from fnmatch import fnmatch
    from pathlib import Path

    folder = Path(studies)
    if not folder.is_dir():
        return None

    def listed(path: Path) -> bool:
        return path.is_file() and any(fnmatch(path.name, pattern) for pattern in patterns)

    if any(listed(path) for path in folder.iterdir()):
        return None
    below: dict[Path, int] = {}
    for path in folder.rglob("*"):
        if listed(path) and "labels" not in path.relative_to(folder).parts[:1]:
            below[path.parent] = below.get(path.parent, 0) + 1
    if not below:
        return None
    fullest = max(below, key=below.get)
    return (f"--studies {folder} lists no images: MONAI Label reads only the files directly in it "
            f"({', '.join(patterns)}), and {sum(below.values())} are in its sub-folders, e.g. {below[fullest]} in "
            f"{fullest}: give that folder as --studies")
