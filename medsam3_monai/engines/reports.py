"""Report handlers of the evaluation engine: overlays for a sample of cases, the per-case CSV, the per-dataset
table (Medical SAM3 Table 3 layout), the radar chart, and an MLflow run with parameters, metrics and files.

Output folder of one evaluation::

    cases.csv           one line per (case, prompt): dataset, group, case, prompt, protocol, dice, iou[, nsd, hd95]
    table.csv/.md       per dataset, per group (mean of its datasets) and overall; Dice/IoU/NSD in % in the .md
    radar.png           per-dataset Dice and IoU (Fig. 3)
    overlays/*.png      image | ground truth | prediction with the truth's contour, for a sample of cases (Fig. 4)

MLflow: the default store is ``sqlite:///<out>/mlruns.db`` with artifacts in ``<out>/mlartifacts`` (MLflow 3
refuses the old ``./mlruns`` file store); any tracking URI can be given instead.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from ..inferers.image import invert_slice
from ..metrics.aggregate import MetricTable, aggregate, write_cases_csv, write_csv
from ..metrics.plots import overlay_figure, radar_chart, radiological_view, view_aspect
from ..transforms.intensity import unit_pixels

__all__ = ["DEFAULT_EXPERIMENT", "EvaluationReport", "OverlayWriter", "absent_label_warnings", "default_tracking_uri",
           "check_tracking_uri", "open_experiment"]

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "medsam3-evaluate"
REPORT_FILES = ("cases.csv", "table.csv", "table.md", "radar.png")


def _safe(text: str) -> str:
    """``text`` as one file or folder name: characters other than letters, digits and ``._-`` as ``_``; a name of
    dots alone (``..``: the folder above) as ``case``."""
    name = re.sub(r"[^0-9A-Za-z._-]+", "_", str(text)).strip("_")
    return name if name.strip(".") else "case"


def _without_image_suffix(case: str) -> str:
    """A case name without an image or volume file extension (a hand-written datalist's cases are file names):
    ``x.jpg`` -> ``x``, ``ct.nii.gz`` -> ``ct``; other names unchanged."""
    from ..transforms.io import IMAGE_2D_SUFFIXES, VOLUME_SUFFIXES

    lower = case.lower()
    for suffix in sorted(IMAGE_2D_SUFFIXES + VOLUME_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix) and len(case) > len(suffix):
            return case[: -len(suffix)]
    return case


def _metric_key(*parts: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . / :`` and spaces."""
    return "/".join(re.sub(r"[^0-9A-Za-z_\-. :]+", "_", str(p)) for p in parts)


def default_tracking_uri(folder: str | Path) -> str:
    """``sqlite:///<folder>/mlruns.db`` (absolute; :func:`~medsam3_monai.bundle.sqlite_uri`)."""
    from ..bundle import sqlite_uri

    return sqlite_uri(Path(folder).resolve() / "mlruns.db")


def open_experiment(tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT, artifact_location: str | Path | None = None):
    """(MlflowClient, experiment id), creating the experiment (with ``artifact_location``) when missing.

    A new experiment in a SQLite store given without ``artifact_location`` keeps its artifacts in ``mlartifacts``
    beside the database file (MLflow's own default is ``./mlruns`` of whatever folder the command runs in); other
    stores (a tracking server, PostgreSQL, ...) keep their own artifact root."""
    from mlflow import MlflowClient

    from ..bundle import prepare_sqlite_store, sqlite_database

    tidy = prepare_sqlite_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    found = _first_contact(lambda: client.get_experiment_by_name(experiment), tracking_uri)
    tidy()
    _refuse_deleted(found, tracking_uri)
    if found is not None:
        return client, found.experiment_id
    database = sqlite_database(tracking_uri)
    if artifact_location is None and database is not None:
        artifact_location = database.parent / "mlartifacts"
    location = Path(artifact_location).resolve().as_uri() if artifact_location is not None else None
    return client, client.create_experiment(experiment, artifact_location=location)


def check_tracking_uri(tracking_uri: str | None, option: str = "--tracking-uri",
                       experiment: str | None = None) -> None:
    """Refuse a tracking URI that cannot be used (a server that is not running, a bad URI) before a long run
    (ValueError saying what to change; ``option``: how the caller's user gives it), and an ``experiment`` of that
    store that was deleted; None (a SQLite store in the output folder) is always fine."""
    if tracking_uri is None:
        return
    from mlflow import MlflowClient

    def contact() -> Any:  # (making the client is part of the contact: MLflow refuses some stores there)
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
        return client

    client = _first_contact(contact, tracking_uri, option)
    if experiment is not None:
        _refuse_deleted(client.get_experiment_by_name(experiment), tracking_uri)


def _refuse_deleted(found: Any, tracking_uri: str) -> None:
    """A deleted experiment cannot take runs (MLflow's "Current state is deleted"): say how to go on."""
    if found is not None and getattr(found, "lifecycle_stage", "active") == "deleted":
        raise ValueError(f"MLflow experiment {found.name!r} in {tracking_uri} is deleted: restore it (mlflow "
                         f"experiments restore --experiment-id {found.experiment_id}), or choose another --experiment")


def _first_contact(call: Any, tracking_uri: str, option: str = "--tracking-uri") -> Any:
    """``call()``, the first request to the tracking store, tried once (MLflow's own policy retries a server that
    is not there for minutes); a store that cannot be used is a ValueError saying what to change."""
    import os

    from mlflow.exceptions import MlflowException

    saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        return call()
    except (MlflowException, OSError) as err:
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ValueError(f"MLflow tracking URI {tracking_uri} cannot be used ({reason[:300]}): start that tracking "
                         "server or correct the URI (a database such as sqlite:///runs/mlflow.db, or "
                         f"http://HOST:PORT), or leave {option} out for a SQLite store in the output folder"
                         ) from None
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved


class OverlayWriter:
    """Write ``overlays/NNN_<dataset>_<case>.png`` for a sample of cases while the evaluator runs.

    The sample: round-robin over datasets (first case of each dataset, then the second, ...) up to
    ``max_overlays``, so every dataset is shown. A volume is shown at the slice (along the slicing axis) where
    the ground truth is largest. The image is the slice-space image mapped back with ``Invertd``.

    Args:
        out_dir: the report folder (overlays go to ``out_dir/overlays``).
        transform: the preprocessing (for the inverse of the resize).
        data: the evaluated items (to pick the sample); None takes the first ``max_overlays`` cases.
        max_overlays: 0 disables overlays.
    """

    def __init__(self, out_dir: str | Path, transform: Any, data: Sequence[Mapping[str, Any]] | None = None,
                 max_overlays: int = 8, folder: str = "overlays") -> None:
        self.folder = Path(out_dir) / folder
        self.transform = transform
        self.max_overlays = int(max_overlays)
        self.selected: set[tuple[str, str]] | None = None if data is None else self.sample(data, self.max_overlays)
        self.written: list[Path] = []

    @staticmethod
    def sample(data: Sequence[Mapping[str, Any]], count: int) -> set[tuple[str, str]]:
        per_dataset: dict[str, list[str]] = {}
        for item in data:
            per_dataset.setdefault(str(item.get("dataset", "")), []).append(str(item.get("case")))
        chosen: list[tuple[str, str]] = []
        rank = 0
        while len(chosen) < count and any(rank < len(c) for c in per_dataset.values()):
            for dataset, cases in per_dataset.items():
                if rank < len(cases) and len(chosen) < count:
                    chosen.append((dataset, cases[rank]))
            rank += 1
        return set(chosen)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for output in engine.state.output or []:
            prediction = output["prediction"]
            key = (prediction.dataset, prediction.case)
            if self.max_overlays <= len(self.written) or prediction.truth is None:
                continue
            if self.selected is not None and key not in self.selected:
                continue
            self.written.append(self.write(prediction, output.get("records", []), len(self.written)))

    def write(self, prediction: Any, records: Sequence[Mapping[str, Any]], index: int) -> Path:
        from ..transforms.slices import extract_slice, plane_axes

        truth, pred, items = prediction.truth, prediction.pred, prediction.items
        where = ""
        if prediction.is_volume:
            meta = items[0]["image"].meta
            axis, transposed = int(meta["slice_axis"]), bool(meta["slice_transposed"])
            dims = [d for d in range(3) if d != axis]
            area = (truth != 0).sum(dim=dims) if truth.any() else (pred != 0).sum(dim=dims)
            depth = int(torch.argmax(area))
            item = next(it for it in items if int(it["image"].meta["slice_index"]) == depth)
            truth = extract_slice(truth[None], depth, axis, transposed)[0]
            pred = extract_slice(pred[None], depth, axis, transposed)[0]
            where = f", slice {depth}"
        else:
            item = items[0]
        image = invert_slice(unit_pixels(item["image"]), item, self.transform).as_tensor()  # [0, 1]
        aspect = 1.0
        if prediction.is_volume:  # radiological convention: anterior up, the patient's right on the left
            row_axis, col_axis = plane_axes(axis, transposed)
            affine = meta["volume_affine"]
            image, truth, pred = (radiological_view(x, affine, row_axis, col_axis) for x in (image, truth, pred))
            aspect = view_aspect(affine, row_axis, col_axis)
        title = f"{prediction.dataset} / {prediction.case}{where} ({records[0]['protocol'] if records else ''})"
        if records:
            title += f"\n{_score_line(records)}"
        case = _safe(_without_image_suffix(prediction.case))
        path = self.folder / f"{index:03d}_{_safe(prediction.dataset)}_{case}.png"
        boxes = None if prediction.is_volume else getattr(prediction, "boxes", None)  # T+I, in the input's pixels
        if boxes and any(box is not None for box in boxes):  # a class absent from the truth had none (text only)
            title += "; dashed: box prompts"
        return overlay_figure(image, truth, pred, path, prediction.values, prediction.prompts, title, boxes=boxes,
                              aspect=aspect)


class PredictionWriter:
    """Write every evaluated case's merged label map in its input's own geometry while the evaluator runs:
    ``out_dir/predictions/<dataset>/<case>_seg.png`` for a 2D picture (its size, the prompts' label values, those
    the metrics compare with the decoded truth: 1 for a binary mask's foreground; 16-bit above 255) or
    ``..._seg.nii.gz`` for a volume (its affine, and a NIfTI input's qform / sform codes and units, as ``medsam3
    segment`` writes them; a 2D NIfTI's comes back 2D), to open beside the truth in a viewer. Names made alike by
    the file-name rules (``My Data/v1`` and ``My Data v1``, a case twice) get ``_2``, ``_3``, ... rather than one
    file holding another's prediction.

    Args:
        out_dir: the report folder.
        enabled: False writes nothing (the evaluation bundle's ``save_predictions``).
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, folder: str = "predictions") -> None:
        self.folder = Path(out_dir) / folder
        self.enabled = bool(enabled)
        self.written: list[Path] = []
        self._taken: set[Path] = set()  # (the names written, looked up for each case)

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for output in engine.state.output or []:
            self.write(output["prediction"])

    def write(self, prediction: Any) -> Path:
        import numpy as np
        from PIL import Image

        from ..deploy.segment_cli import as_source_dimensions, write_label_volume, write_mask_image

        folder = self.folder / _safe(prediction.dataset)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{_safe(_without_image_suffix(prediction.case))}_seg"
        suffix = ".nii.gz" if prediction.is_volume else ".png"
        path, copy = folder / f"{stem}{suffix}", 1
        while path in self._taken:
            copy += 1
            path = folder / f"{stem}_{copy}{suffix}"
        labels = torch.as_tensor(prediction.pred).cpu().numpy()
        if prediction.is_volume:
            meta = prediction.items[0]["image"].meta
            source = meta.get("filename_or_obj")
            write_label_volume(as_source_dimensions(labels, source), meta["volume_affine"], path, source)
        else:
            if labels.size and labels.max() > 255:
                Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint16)).save(path)
            else:
                write_mask_image(labels, path)
        self.written.append(path)
        self._taken.add(path)
        return path


#: an overlay's title names each class's Dice up to this many classes; beyond, their mean and the lowest ones
TITLE_CLASSES = 4


def _score_line(records: Sequence[Mapping[str, Any]]) -> str:
    """The Dice line under an overlay's title: per class, or for many classes the mean and the three lowest."""
    dice = [(str(r["prompt"]), 100 * float(r["metrics"]["dice"])) for r in records]
    if len(dice) <= TITLE_CLASSES:
        return ", ".join(f"{name}: Dice {value:.1f}" for name, value in dice)
    lowest = ", ".join(f"{name} {value:.1f}" for name, value in sorted(dice, key=lambda d: d[1])[:3])
    return f"{len(dice)} classes: mean Dice {sum(v for _, v in dice) / len(dice):.1f}; lowest: {lowest}"


#: absent label values a dataset's warning names before "and N more" (a many-class CT lacks dozens in one case)
ABSENT_VALUES_LISTED = 8


#: what to do about empty predictions, for 2D pictures and for volumes
_EMPTY_2D_HINT = ("on 2D cases a model trained with the semantic head alone (e.g. the tiny recipe) is evaluated with "
                  "--protocol semantic")
_EMPTY_THRESHOLD_HINT = ("with protocol {protocols} a query scoring below --score-threshold gives no mask: a model "
                         "whose scores stay below it needs a lower threshold")
_EMPTY_VOLUME_HINT = ("a volume keeps only the slices whose detection scores >= --score-threshold (then the tracker; "
                      "--volume-score-threshold sets it for volumes alone), whatever the 2D --protocol: a model whose "
                      "scores stay below it, as a random or briefly trained one's, needs a lower threshold")
#: the same when every empty row scored at least its threshold: the threshold dropped nothing
_EMPTY_KEPT_HINT = ("with protocol {protocols} every prompt scored >= --score-threshold ({threshold:g}), so queries "
                    "were kept and their masks themselves have no foreground pixel (as a random or briefly trained "
                    "model's can): a lower threshold cannot help")
_EMPTY_VOLUME_KEPT_HINT = ("every volume's best slice scored >= the volumes' detection threshold ({threshold:g}), so "
                           "slices were kept and their top query's masks themselves have no foreground pixel (as a "
                           "random or briefly trained model's can): a lower threshold cannot help")


def empty_prediction_warnings(records: Sequence[dict[str, Any]], protocol: str, score_threshold: float | None = None,
                              volume_threshold: float | None = None) -> list[str]:
    """The report's warnings about predictions without a foreground pixel: one when every prediction of the run is
    empty, else one per dataset whose predictions all are (its foreground cases all score 0), with what to do.
    ``score_threshold`` / ``volume_threshold`` (None: not known): the run's 2D and volume thresholds; where every
    empty row scored at least its own, the hint says the masks themselves are empty instead of lowering it."""
    def hint(rows: Sequence[dict[str, Any]]) -> str:
        return _hint(rows, score_threshold, volume_threshold)

    empty = [r for r in records if r.get("empty_prediction", False)]
    if records and len(empty) == len(records):
        return [f"every prediction of this run is empty ({_rows(len(records))}), so every foreground case scores 0: "
                f"no mask the model gave (protocol {protocol}) has a foreground pixel. {hint(records)}"]
    warnings = []
    datasets: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        datasets.setdefault(str(record.get("dataset")), []).append(record)
    for dataset, rows in sorted(datasets.items()):
        if all(r.get("empty_prediction", False) for r in rows):
            protocols = ", ".join(sorted({str(r.get("protocol")) for r in rows}))
            warnings.append(f"every prediction of dataset {dataset} is empty ({_rows(len(rows))}, protocol "
                            f"{protocols}), so its foreground cases score 0. {hint(rows)}")
    return warnings


def _rows(count: int) -> str:
    return f"{count} case-prompt row{'s' if count != 1 else ''}"


def _scored_at_least(rows: Sequence[dict[str, Any]], threshold: float | None) -> bool:
    """Whether ``threshold`` is known and every row of ``rows`` (at least one) scored at least it."""
    return threshold is not None and bool(rows) and all(float(r.get("score", -1.0)) >= threshold for r in rows)


def _hint(records: Sequence[dict[str, Any]], score_threshold: float | None = None,
          volume_threshold: float | None = None) -> str:
    """What to do about ``records``' empty predictions: the 2D hint, the volume one, or both (records read back from
    a cases.csv do not say which they are); a threshold every row scored above is not offered as the cure."""
    from ..protocol_registry import PROTOCOLS

    kinds = set().union(*({r["volume"]} if "volume" in r else {False, True} for r in records))
    reading_rows = [r for r in records if not r.get("volume", False)
                    and getattr(PROTOCOLS.get(str(r.get("protocol", "")).split("+")[0]), "reads_threshold", False)]
    reading = ", ".join(sorted({str(r.get("protocol")) for r in reading_rows}))
    texts = []
    if reading:
        kept = _scored_at_least(reading_rows, score_threshold)
        texts.append((_EMPTY_KEPT_HINT if kept else _EMPTY_THRESHOLD_HINT).format(protocols=reading,
                                                                               threshold=score_threshold or 0.0))
    if False in kinds:
        texts.append(_EMPTY_2D_HINT)
    if True in kinds:
        volumes = [r for r in records if r.get("volume", False)]
        texts.append(_EMPTY_VOLUME_KEPT_HINT.format(threshold=volume_threshold)
                     if _scored_at_least(volumes, volume_threshold) else _EMPTY_VOLUME_HINT)
    hint = "; ".join(texts)
    return hint[0].upper() + hint[1:]


#: what a label value in no truth mask means for an evaluation's rows
ABSENT_IN_EVALUATION = "rows only count false positives (100 where the prediction is empty, 0 elsewhere)"


def absent_label_warnings(records: Sequence[Mapping[str, Any]], meaning: str = ABSENT_IN_EVALUATION,
                          where: str = "truth mask", cases: str = "case(s)") -> list[str]:
    """One line per dataset naming its label values that no truth mask of the run holds (records' ``empty_truth``):
    their prompts score Dice 100 where the prediction is empty too and 0 elsewhere: a class absent from the split,
    or a dataset whose prompts' label values are not those of its masks. A line gives the first
    ``ABSENT_VALUES_LISTED`` values with their prompts, then the others' values alone. ``meaning``, ``where`` and
    ``cases``: the words of another reader (``medsam3 datalist --check``: "mask", "item(s)")."""
    groups: dict[str, dict[int, list[Mapping[str, Any]]]] = {}
    for record in records:
        if "empty_truth" in record:
            groups.setdefault(str(record.get("dataset", "")), {}).setdefault(int(record["label"]), []).append(record)
    lines = []
    for dataset, by_value in groups.items():
        absent = {value: rows for value, rows in by_value.items() if all(row["empty_truth"] for row in rows)}
        if not absent:
            continue
        named = []
        for value, rows in sorted(absent.items())[:ABSENT_VALUES_LISTED]:
            prompts = ", ".join(f"'{p}'" for p in dict.fromkeys(str(row.get("prompt", "")) for row in rows))
            named.append(f"{value} (prompt {prompts})")
        rest = sorted(absent)[len(named):]
        listed = ", ".join(named) + (f" and {len(rest)} more ({', '.join(map(str, rest))})" if rest else "")
        count = len({row.get("case") for rows in absent.values() for row in rows})
        one = len(absent) == 1
        what = (f"label value {listed} is" if one else
                f"{len(absent)} of its {len(by_value)} label values, {listed}, are")
        lines.append(f"dataset {dataset}: {what} in no {where} of its {count} {cases}, so "
                     f"{'its' if one else 'their'} {meaning}; expected when every case is a negative (e.g. BUSI's "
                     "normal images) or holds only some of the classes (one CT of a many-class set), "
                     f"else {'the class is' if one else 'the classes are'} absent from the split "
                     "or the dataset's label values do not match the values in its masks")
    return lines


def write_skipped_csv(path: Path, unreadable: Sequence[Any]) -> Path:
    """``skipped.csv``: the image, label and error of each case ``--skip-unreadable`` left out (``UnreadableCase``)."""
    return write_csv(path, ["image", "label", "error"],
                     [{"image": case.item.get("image", ""), "label": case.item.get("label", ""), "error": case.error}
                      for case in unreadable])


class NothingReadable(ValueError):
    """Every case of an evaluation was unreadable and skipped (``--skip-unreadable``): nothing to report.
    ``unreadable``: the skipped cases (``UnreadableCase``), each with its item and error."""

    def __init__(self, unreadable: list[Any]) -> None:
        self.unreadable = list(unreadable)
        super().__init__(f"no metric records to report: every case read was unreadable and skipped "
                         f"(--skip-unreadable: {len(self.unreadable)}, e.g. {self.unreadable[0].error})")

    def __reduce__(self) -> tuple[Any, tuple[list[Any]]]:
        return type(self), (self.unreadable,)


class EvaluationReport:
    """Collect the evaluator's metric records; on COMPLETED write the report files and log the MLflow run.

    Args:
        out_dir: the report folder.
        params: run parameters (checkpoint, protocol, datalists, image size, ...), logged to MLflow.
        notes: lines added under the Markdown table (how the numbers were produced).
        mlflow: log an MLflow run (parameters, per-dataset and group metrics, every report file).
        tracking_uri: None = ``sqlite:///<out_dir>/mlruns.db`` (artifacts in ``out_dir/mlartifacts``).
        experiment, run_name: MLflow experiment and run names.
        parent_run_id: make the run a child of this run (comparisons: one child per checkpoint).
        title: heading of the Markdown table.
        skip_empty_truth: leave the 2D (case, prompt) rows whose truth is empty out of ``cases.csv`` and the tables
            (listed in ``skipped_empty_truth.csv``), as the Medical-SAM3 release's 2D evaluation skips images without
            foreground (volume rows are all scored); by default they are scored (100 when the prediction is empty
            too, else 0).

    After the run: ``records`` (every row), ``table`` (:class:`MetricTable`), ``files`` and ``run_id``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        params: Mapping[str, Any] | None = None,
        notes: Sequence[str] = (),
        mlflow: bool = True,
        tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        title: str | None = None,
        artifact_dirs: Sequence[str] = ("overlays",),
        skip_empty_truth: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.skip_empty_truth = bool(skip_empty_truth)
        self.params = dict(params or {})
        self.notes = list(notes)
        self.mlflow = bool(mlflow)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.title = title
        self.artifact_dirs = list(artifact_dirs)
        self.records: list[dict[str, Any]] = []
        self.table: MetricTable | None = None
        self.files: list[Path] = []
        self.run_id: str | None = None
        self.unreadable: list[Any] = []  # UnreadableCase items the evaluator skipped

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.records.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.complete)

    def collect(self, engine: Engine) -> None:
        for output in engine.state.output or []:
            self.records.extend(output.get("records", []))

    def complete(self, engine: Engine | None = None) -> None:
        self.unreadable = list(getattr(engine.state, "unreadable", []) if engine is not None else [])
        self.write()
        if self.mlflow:
            self.log_mlflow()

    # -------------------------------------------------------------------------------------------- files
    def write(self) -> list[Path]:
        if not self.records:
            if self.unreadable:
                raise NothingReadable(self.unreadable)
            raise ValueError("no metric records to report: were any labelled cases evaluated?")
        scored, skipped = self.scored_records()
        if not scored:
            raise ValueError(f"every one of the {len(self.records)} (case, prompt) rows has an empty truth, and "
                             "--skip-empty-truth leaves them all out: nothing to report")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.table = aggregate(scored)
        out = self.out_dir
        files = [write_cases_csv(scored, out / "cases.csv"), self.table.to_csv(out / "table.csv")]
        if skipped:
            files.append(write_csv(out / "skipped_empty_truth.csv", ["dataset", "case", "prompt", "label"],
                                   [{k: row.get(k, "") for k in ("dataset", "case", "prompt", "label")}
                                    for row in skipped]))
        title = self.title or f"Per-dataset results (protocol: {self.table.protocol})"
        text = self.table.to_markdown(title=title)
        found = []  # logged (naming the report: a comparison writes two) and put first under the table
        found += empty_prediction_warnings(self.records, self.table.protocol, *self._thresholds())
        found += absent_label_warnings(scored)  # (rows left out by --skip-empty-truth are said below)
        for warning in found:
            logger.warning("%s: %s", out, warning)
        notes = [f"WARNING: {warning}." for warning in reversed(found)] + list(self.notes)
        if skipped:
            gone = sorted({str(r.get("dataset")) for r in skipped} - {str(r.get("dataset")) for r in scored})
            notes.append(f"{len(skipped)} of {len(self.records)} (case, prompt) rows have an empty truth and are left "
                         "out of the table and cases.csv (--skip-empty-truth, as the Medical-SAM3 release's 2D "
                         "evaluation skips images without foreground); see skipped_empty_truth.csv"
                         + (f". Every row of {', '.join(gone)} was left out, so the table has no row for it."
                            if gone else "."))
        if self.unreadable:
            files.append(write_skipped_csv(out / "skipped.csv", self.unreadable))
            notes.append(f"{len(self.unreadable)} unreadable case(s) skipped (--skip-unreadable): counted under "
                         "Cases above but not in the table; see skipped.csv.")
        if notes:
            text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        (out / "table.md").write_text(text, encoding="utf-8")
        files.append(out / "table.md")
        # named after the run: a comparison's (and the demo's) two charts are told apart when opened side by side
        files.append(radar_chart(self.table, out / "radar.png", title=(
            f"Per-dataset Dice and IoU of {self.run_name}" if self.run_name else None)))
        self.files = files
        logger.info("evaluation report written to %s (%d records)", out, len(self.records))
        return files

    def _thresholds(self) -> tuple[float | None, float | None]:
        """(2D score threshold, volumes' detection threshold) of the run, from its parameters (None: not given)."""
        def number(key: str) -> float | None:
            value = self.params.get(key)
            return None if value is None else float(value)

        return number("score_threshold"), number("volume_score_threshold")

    def scored_records(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``records`` split into the rows the table scores and those ``skip_empty_truth`` leaves out: the 2D rows
        with an empty truth (the Medical-SAM3 release's 2D rule; volume rows are all scored)."""
        if not self.skip_empty_truth:
            return list(self.records), []
        left_out = [r.get("empty_truth") and not r.get("volume") for r in self.records]
        return ([r for r, out in zip(self.records, left_out) if not out],
                [r for r, out in zip(self.records, left_out) if out])

    # -------------------------------------------------------------------------------------------- MLflow
    def metrics(self) -> dict[str, float]:
        """``<dataset>/<metric>``, ``group/<group>/<metric>``, ``overall/<metric>`` (fractions; HD95 in mm)."""
        out: dict[str, float] = {}
        for row in self.table.rows if self.table else []:
            prefix = {"dataset": (row["name"],), "group": ("group", row["name"]), "overall": ("overall",)}[row["kind"]]
            for metric in self.table.metrics:
                value = row[metric]
                if value == value:  # not NaN
                    out[_metric_key(*prefix, metric)] = float(value)
        return out

    def log_mlflow(self) -> str:
        tracking_uri = self.tracking_uri or default_tracking_uri(self.out_dir)
        artifact_root = self.out_dir / "mlartifacts" if self.tracking_uri is None else None
        client, experiment_id = open_experiment(tracking_uri, self.experiment, artifact_root)
        tags = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else None
        run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        run_id = run.info.run_id
        try:
            from mlflow.entities import Metric, Param

            params = [Param(k, str(v)[:500]) for k, v in self.params.items()]
            params.append(Param("num_records", str(len(self.records))))
            if self.skip_empty_truth:
                params.append(Param("skipped_empty_truth_rows", str(len(self.scored_records()[1]))))
            if self.table is not None and self.table.mixes_protocols():  # pictures and volumes: each dataset's
                params.append(Param("dataset_protocols", "; ".join(
                    f"{r['name']}: {r['protocol']}" for r in self.table.dataset_rows())[:500]))
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, 0) for k, v in self.metrics().items()]
            client.log_batch(run_id, metrics=metrics, params=params)
            for path in self.files:
                client.log_artifact(run_id, str(path))
            for folder in self.artifact_dirs:
                if (self.out_dir / folder).is_dir():
                    client.log_artifacts(run_id, str(self.out_dir / folder), folder)
            client.set_terminated(run_id)
        except BaseException:
            # on a full disk marking the run fails too: MLflow would log its own traceback above the one-line error,
            # and its error would replace the one that stopped the logging
            store_logger = logging.getLogger("mlflow.store.db.utils")
            level = store_logger.level
            store_logger.setLevel(logging.CRITICAL + 1)
            try:
                client.set_terminated(run_id, status="FAILED")
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            finally:
                store_logger.setLevel(level)
            raise
        self.run_id = run_id
        logger.info("MLflow run %s in %s", run_id, tracking_uri)
        return run_id
