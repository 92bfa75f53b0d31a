"""The agent's files, written as ``medsam3 segment`` writes a one-prompt result (its writers and its atomic
staging: nothing appears unless everything succeeded):

* ``--out``: 2D -> a 0/255 mask picture of the input's size (PNG/BMP/TIFF); volume -> a 0/1 NIfTI label map with
  the input's affine. ``report_no_mask`` writes an empty mask (all 0) of the same kind.
* ``<out>.json``: ``medsam3 segment``'s sidecar (value -> prompt, score, pixels; protocol, checkpoint, ...) plus an
  ``agent`` entry: request, planner, status, the chosen marks, the reason when nothing matches, the trace path.
* ``<out>.trace.json`` (or ``--trace``): the run's trace (:mod:`.trace`).
* ``--overlay``: ``medsam3 segment``'s overlay of the answer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["OutputPlan", "answer_prediction", "plan_outputs", "write_failed_trace", "write_outputs"]


def _suffix(path: str | Path) -> str:
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


@dataclass
class OutputPlan:
    """Where the files go; ``trace_explicit``: ``--trace`` was given (then a failed run's trace is written too)."""

    out: Path
    sidecar: Path
    trace: Path
    overlay: Path | None = None
    trace_explicit: bool = False


def plan_outputs(input_path: str, kind: str, out: str, overlay: str | None = None, trace: str | None = None,
                 overwrite: bool = False) -> OutputPlan:
    """Check the output paths before anything runs (suffixes, clashes, existing files)."""
    from ..deploy.segment_cli import IMAGE_OUTPUTS, VOLUME_OUTPUTS

    out_path = Path(out)
    suffix = _suffix(out_path)
    if kind == "image" and suffix not in IMAGE_OUTPUTS:
        raise ValueError(f"--out {out}: a 2D image's mask is written as PNG (or BMP/TIFF); give --out ending in .png")
    if kind == "volume" and suffix not in VOLUME_OUTPUTS:
        raise ValueError(f"--out {out}: a volume's mask is written as NIfTI; give --out ending in .nii.gz (or .nii)")
    plan = OutputPlan(out_path, Path(f"{out}.json"), Path(trace) if trace else Path(f"{out}.trace.json"),
                      Path(overlay) if overlay else None, trace_explicit=bool(trace))
    if plan.overlay is not None and _suffix(plan.overlay) != ".png":
        raise ValueError(f"--overlay {overlay}: the overlay is a PNG picture; give a path ending in .png")
    if _suffix(plan.trace) != ".json":
        raise ValueError(f"--trace {trace}: the trace is JSON; give a path ending in .json")
    from ..deploy.arguments import check_output_files

    check_output_files([("--out", plan.out), ("--out", plan.sidecar), ("--trace", plan.trace)]
                       + ([("--overlay", plan.overlay)] if plan.overlay is not None else []), input_path, overwrite)
    return plan


def _is_2d_nifti(path: str | Path) -> bool:
    if _suffix(path) not in (".nii", ".nii.gz") or not Path(path).is_file():
        return False
    import nibabel as nib

    return len(nib.load(str(path)).header.get_data_shape()) == 2


def _answer_prediction(decision: Any, reference: Any, view: Any, input_path: str, mask: Any, settings: Any) -> Any:
    """A ``Prediction`` of the answer (one label, value 1) for the sidecar summary and the overlay."""
    import torch

    from ..inferers.predict import Prediction

    label_map = torch.from_numpy(mask.astype("uint8"))
    if decision.status == "selected":
        name = " + ".join(decision.phrases)
        score = max(m.score for m in decision.marks)
    else:
        name, score = "(no match)", 0.0
    if reference is None:
        affine = view.affine if view.affine is not None else torch.eye(4, dtype=torch.float64)
        return Prediction(label_map=label_map, prompts=[name], label_values=[1], scores=[score],
                          protocol="none (no phrase was segmented)", is_volume=view.is_volume, affine=affine,
                          source=str(input_path), seed_slices=[-1] if view.is_volume else None,
                          settings={"checkpoint": settings.checkpoint, "modality": settings.modality,
                                    "score_threshold": settings.score_threshold})
    seeds = None
    if reference.seed_slices:
        best = decision.marks[0].phrase if decision.status == "selected" else None
        index = reference.prompts.index(best) if best in reference.prompts else 0
        seeds = [int(reference.seed_slices[index])] if decision.status == "selected" else [-1]
    return dataclasses.replace(reference, label_map=label_map, prompts=[name], label_values=[1], scores=[score],
                               seed_slices=seeds, slice_scores=None)


def answer_prediction(decision: Any, segmenter: Any, view: Any = None) -> Any:
    """The answer as a one-label ``Prediction`` in the input's geometry (value 1: the union of the selected marks;
    all 0 for ``no_mask``), what ``--out`` holds; the server's agent model answers with it. ``view`` (the input as
    the planner saw it) is loaded only when no phrase was segmented at all."""
    import numpy as np
    from monai.data import MetaTensor

    from .marks import union_of

    if decision.status == "selected":
        mask, reference = union_of(decision.marks), decision.marks[0].prediction
    else:
        reference = segmenter.last_prediction
        if reference is None and view is None:
            from ..inferers.inputs import input_kind
            from .render import View

            s = segmenter.settings
            view = View.load(segmenter.path, s.modality, s.ct_window, s.channel, input_kind(segmenter.path) == "volume",
                             max_pixels=s.max_pixels)
        shape = tuple(reference.label_map.shape) if reference is not None else view.shape
        mask = np.zeros(shape, dtype=bool)
    prediction = _answer_prediction(decision, reference, view, segmenter.path, mask, segmenter.settings)
    meta = dict(getattr(reference.label_map, "meta", {})) if reference is not None else {}
    return dataclasses.replace(prediction, label_map=MetaTensor(prediction.label_map, meta=meta))


def write_outputs(plan: OutputPlan, decision: Any, view: Any, segmenter: Any, request: str, trace: Any) -> str:
    """Write mask, sidecar, overlay and trace together; returns the line to print."""
    import numpy as np

    from ..deploy.segment_cli import (IMAGE_OUTPUTS, StagedFiles, share_text, sidecar_json, size_text,
                                      write_label_volume, write_mask_image)
    from .marks import union_of

    input_path = segmenter.path
    if decision.status == "selected":
        mask = union_of(decision.marks)
        reference = decision.marks[0].prediction
    else:
        reference = segmenter.last_prediction
        mask = np.zeros(view.shape, dtype=bool)
    prediction = _answer_prediction(decision, reference, view, input_path, mask, segmenter.settings)
    if view.is_volume:
        labels = mask.astype(np.uint8)
        if labels.ndim == 3 and labels.shape[-1] == 1 and _is_2d_nifti(input_path):
            labels = labels[..., 0]  # a 2D NIfTI in, a 2D NIfTI out
        written = [1]
    else:
        labels = mask.astype(np.uint8) * np.uint8(255)
        written = [255]
    summary = prediction.summary(written)
    summary["values"] = ("0/255 binary mask" if not view.is_volume else "0/1 mask: 1 = the answer")
    summary.update(shape=list(labels.shape), output=str(plan.out),
                   overlay=None if plan.overlay is None else str(plan.overlay))
    summary["agent"] = {
        "request": request, "planner": decision.planner, "status": decision.status,
        "marks": [m.facts() for m in decision.marks], "phrases": decision.phrases, "reason": decision.reason,
        "trace": str(plan.trace),
    }
    if decision.details.get("kept"):  # the offline planner: the phrasings whose masks the answer fuses
        summary["agent"]["fused_phrasings"] = list(decision.details["kept"])
    trace.data["decision"] = decision.as_json()
    trace.data["outputs"] = {"mask": str(plan.out), "sidecar": str(plan.sidecar), "trace": str(plan.trace),
                             "overlay": None if plan.overlay is None else str(plan.overlay)}
    with StagedFiles() as staged:
        if view.is_volume:
            write_label_volume(labels, np.asarray(prediction.affine, dtype=np.float64), staged.path(plan.out),
                               reference=input_path)
        else:
            write_mask_image(labels, staged.path(plan.out), IMAGE_OUTPUTS[_suffix(plan.out)])
        staged.path(plan.sidecar).write_text(sidecar_json(summary), encoding="utf-8")
        if plan.overlay is not None:
            from ..deploy.overlay import save_overlay

            save_overlay(prediction, staged.path(plan.overlay), image=view.image,
                         title=f"{Path(input_path).name}: {request} ({decision.planner} planner)")
        trace.finish(decision.status)
        staged.path(plan.trace).write_text(json.dumps(trace.as_json(), indent=2) + "\n", encoding="utf-8")
        staged.commit()
    total = max(int(labels.size), 1)
    if decision.status == "selected":
        what = ", ".join(f"mark {m.number} {m.phrase!r} (score {m.score:.3f})" for m in decision.marks)
        what += f"; {share_text(int(mask.sum()), total)} of the {'volume' if view.is_volume else 'image'}"
    else:
        what = f"no match: {decision.reason}; the mask is empty"
    extra = f" + {plan.overlay}" if plan.overlay is not None else ""
    return (f"wrote {plan.out} {size_text(labels.shape, view.is_volume)} [{what}] + {plan.sidecar} + "
            f"{plan.trace}{extra}")


def write_failed_trace(plan: OutputPlan, trace: Any, error: str) -> None:
    """A failed run writes nothing, except its trace when ``--trace`` named a file for it."""
    if not plan.trace_explicit:
        return
    from ..deploy.segment_cli import StagedFiles

    trace.finish("failed", error)
    with StagedFiles() as staged:
        staged.path(plan.trace).write_text(json.dumps(trace.as_json(), indent=2) + "\n", encoding="utf-8")
        staged.commit()
