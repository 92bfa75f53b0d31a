"""``medsam3 segment INPUT --prompt TEXT [...] --out PATH``: segment one image or volume with text prompts.

Outputs (all in the input's own geometry; nothing is written unless everything succeeded):

* 2D image (PNG, JPEG, BMP, TIFF, GIF, PPM, a single-frame DICOM file) -> ``--out`` PNG (or BMP/TIFF) of the
  input's size, uint8. One prompt: a binary mask **0/255**; several prompts: a label map with values **1..P** in
  prompt order (0 background), overlaps going to the prompt with the higher confidence (score x sigmoid(mask logit))
  at the pixel.
* Volume (NIfTI, DICOM series folder, multi-frame DICOM file, MetaImage, NRRD) -> ``--out`` NIfTI
  (``.nii.gz``/``.nii``) of the input's shape with its affine (hence spacing), uint8 label values **1..P** (one
  prompt: 0/1).
* ``<out>.json`` beside it: label value -> prompt, score and pixel count; protocol, checkpoint, tracker,
  thresholds, box; for volumes the affine, spacing and the tracker's seed slice per prompt.
* ``--overlay PNG``: the input with the masks filled and outlined and a legend (volumes: a 3-slice montage).

Every file is first written under a temporary name and moved into place at the end: a failure (bad input,
bad checkpoint, interrupted run) leaves no partial output.

Many inputs (``medsam3 segment INPUT... --out-dir DIR``: files, folders, quoted patterns, or ``--datalist FILE``):
one mask per input, ``DIR/<name>_seg.png`` (2D) or ``DIR/<name>_seg.nii.gz`` (volumes) with its ``.json`` sidecar,
written by the same functions; up to ``--batch-size`` 2D images per network forward, the preprocessing in
``--num-workers`` DataLoader processes (``inferers.batch``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..protocol_registry import PROTOCOLS, score_text
from .arguments import (INPUT_HELP, add_ct_window_option, add_detector_chunk_option, add_gpu_options, add_model_options,
                        add_score_threshold_option, add_tracker_batch_option, at_least, checked_threshold_option,
                        compile_notice, ct_window_for, gpu_context, nearest_existing, pixels, random_weights_notes)

__all__ = ["StagedFiles", "add_parser", "run", "run_many", "size_text", "write_label_volume", "write_mask_image",
           "write_prediction"]

IMAGE_OUTPUTS = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
#: what ``--overlay`` adds to a 2D picture's peak memory, bytes per input pixel (it decodes the picture again as
#: uint8 and draws a display-sized copy: deploy.overlay.DISPLAY_PIXELS)
OVERLAY_BYTES_PER_PIXEL = 4
VOLUME_OUTPUTS = (".nii", ".nii.gz")
BINARY_VALUE = 255  # a single prompt's 2D mask
DEFAULT_BATCH_SIZE = 8
OUTPUT_POSTFIX = "seg"  # <name>_seg.png, as the inference bundle names its outputs

_EPILOG = """\
Output values: 2D, one prompt -> 0/255 mask; 2D, several prompts -> labels 1..P (prompt order);
volumes -> NIfTI labels 1..P with the input's affine. <out>.json maps values to prompts and scores.
--box x1 y1 x2 y2: pixel coordinates of the input (x = column, y = row, image spanning [0, W] x [0, H]);
give it once (used with every prompt) or once per prompt; 2D images only.
Protocols (2D): top_query = each prompt's highest-scoring query (the papers'), top_query_floor = the same,
empty below --score-threshold (the Medical-SAM3 release's evaluation: 0.1), threshold = union of the
queries with score >= --score-threshold, semantic = the semantic head. Volumes: the detector on every slice
(top query, kept where score >= --score-threshold), merged with SAM3 tracker propagation from the most
confident slice. --tracker auto = tiny for the tiny checkpoint, the checkpoint's own tracker for a
facebook/sam3 folder or Meta's sam3.pt, else none (detector only).
Intensity: --modality CT uses the --ct-window preset; MRI a 0.5-99.5 percentile clip; without --modality
RGB pictures are divided by 255 and grey images min-max scaled.
Many inputs: medsam3 segment images/ 'scans/*.nii.gz' --prompt polyp --out-dir masks/ [--batch-size 8]
  or medsam3 segment --datalist kvasir.json [--split test] --out-dir masks/ (the items' own prompts unless
  --prompt is given). One mask per input, DIR/<name>_seg.png (2D) or DIR/<name>_seg.nii.gz (volumes) + .json
  sidecar (when two inputs share a name, every output keeps its sub-folder). DIR must be empty or new (else
  --overwrite). Inputs are checked before anything is written; an input that turns out unreadable stops the
  run with one line (the masks written so far stay), or with --skip-unreadable is listed in DIR/skipped.csv and
  the run goes on.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "segment",
        help="segment an image or volume with text prompts (and boxes): mask/label map in the input's geometry",
        description="Text-prompted segmentation of one 2D image or 3D volume with SAM3 / Medical SAM3 weights.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT", nargs="*",
                        help=f"{INPUT_HELP}; with --out-dir also several, folders of them and quoted patterns "
                             "('cases/*.png')")
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="concept to segment, e.g. 'polyp' (repeat for several: label values 1..P); required "
                             "unless every --datalist item has its own prompts")
    parser.add_argument("--box", action="append", nargs=4, type=float, metavar=("X1", "Y1", "X2", "Y2"),
                        help="box prompt in input pixels (2D only); once for all prompts or once per prompt")
    add_model_options(parser)
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default=None, help="2D protocol (default top_query)")
    add_score_threshold_option(parser, default=None, also=" (refused where nothing would read it)")
    parser.add_argument("--tracker", default="auto", metavar="SRC|none",
                        help="volumes: auto (default), none (detector only), tiny, an HF folder or a sam3.pt")
    parser.add_argument("--modality", default=None,
                        help="intensity rule: CT, MRI, X-ray, ultrasound, endoscopy, ... (default: by channels)")
    add_ct_window_option(parser)
    parser.add_argument("--channel", type=int, default=None, metavar="N",
                        help="for a 4D volume (several channels / time points): segment channel N (0-based)")
    parser.add_argument("--out", metavar="PATH",
                        help="mask / label map to write: .png (2D) or .nii.gz (volumes); <PATH>.json beside it")
    parser.add_argument("--overlay", default=None, metavar="PNG", help="also write an overlay picture (one input)")
    many = parser.add_argument_group("many inputs (--out-dir)")
    many.add_argument("--out-dir", metavar="DIR",
                      help="write one mask per input into DIR (<name>_seg.png / <name>_seg.nii.gz + .json)")
    many.add_argument("--datalist", metavar="FILE",
                      help="datalist JSON (a list of items or paths, or decathlon-style lists) of the inputs")
    many.add_argument("--split", default=None, metavar="NAME",
                      help="the list of a decathlon-style --datalist to segment (default test; all: every list)")
    many.add_argument("--batch-size", type=at_least(1), default=DEFAULT_BATCH_SIZE, metavar="N",
                      help=f"2D images per network forward (default {DEFAULT_BATCH_SIZE}); a volume's slices per "
                           "detector forward (volumes go one at a time); raise it on a large GPU")
    many.add_argument("--num-workers", type=at_least(0), default=0, metavar="N",
                      help="DataLoader processes reading and preprocessing inputs (default 0: in the main process)")
    many.add_argument("--skip-unreadable", action="store_true",
                      help="go on past inputs that cannot be read; they are listed in DIR/skipped.csv")
    add_gpu_options(parser)
    add_detector_chunk_option(parser)
    add_tracker_batch_option(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--max-pixels", type=pixels, default=None, metavar="N",
                        help="accept 2D pictures up to N pixels, also above PIL's decompression-bomb limit "
                             "(default: PIL's limit and what fits in 80%% of the available memory; "
                             "env MEDSAM3_MAX_PIXELS)")
    parser.set_defaults(func=run, parser=parser)
    return parser


# ------------------------------------------------------------------------------------------------ outputs
def _suffix(path: str | Path) -> str:
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


class StagedFiles:
    """Output files written under temporary names, moved into place together by :meth:`commit`.

    The temporary folder lies in the nearest existing ancestor of the first target (the same file system, so
    the moves are renames). Leaving the ``with`` block without ``commit`` (an error) removes everything.
    """

    def __init__(self) -> None:
        self._folder: Path | None = None
        self._staged: list[tuple[Path, Path]] = []

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.discard()

    def path(self, target: str | Path) -> Path:
        """A temporary path (with ``target``'s suffixes) to write ``target``'s content to."""
        target = Path(target).absolute()
        if self._folder is None:
            anchor = nearest_existing(target.parent)
            try:
                self._folder = Path(tempfile.mkdtemp(prefix=".medsam3-segment-", dir=anchor))
            except OSError as err:
                raise ValueError(f"cannot write beside {target}: {err}; choose a writable --out") from err
        staged = self._folder / f"{len(self._staged)}{_suffix(target)}"
        self._staged.append((staged, target))
        return staged

    def commit(self) -> list[Path]:
        """Move every staged file to its target (creating folders); on failure undo the moves made so far."""
        moved: list[Path] = []
        created: list[Path] = []
        try:
            for staged, target in self._staged:
                missing = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
                target.parent.mkdir(parents=True, exist_ok=True)
                created += reversed(missing)
                try:
                    os.replace(staged, target)
                except OSError:  # another file system (e.g. --overlay elsewhere): copy, then remove
                    shutil.move(str(staged), str(target))
                moved.append(target)
        except BaseException:
            for target in moved:
                target.unlink(missing_ok=True)
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    pass
            raise
        finally:
            self.discard()
        return moved

    def discard(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def output_labels(prediction: Any, source: str | Path | None = None,
                  binary_mask: bool = True) -> tuple[Any, dict[str, Any]]:
    """The array written out for a ``Prediction`` of the input ``source`` and its JSON summary: one prompt on a
    2D image gives a 0/255 mask (``binary_mask=False``: its label value, as MONAI Label apps write it), anything
    else the label map (0 background, one value per prompt); a 2D NIfTI in gives a 2D array out, not one slice."""
    labels = prediction.label_map.as_tensor().cpu().numpy()
    values = list(prediction.label_values)
    binary = binary_mask and not prediction.is_volume and len(values) == 1
    if binary:
        labels = (labels == values[0]).view("uint8")  # one byte per pixel, scaled in place
        labels *= BINARY_VALUE
        values = [BINARY_VALUE]
    if prediction.is_volume:
        labels = as_source_dimensions(labels, source)
    summary = prediction.summary(values)
    summary["values"] = "0/255 binary mask" if binary else "label map: 0 background, one value per prompt"
    summary["shape"] = list(labels.shape)
    return labels, summary


def write_mask_image(array: Any, path: str | Path, image_format: str = "PNG") -> None:
    """(H, W) uint8 array -> a greyscale picture of that size (rows first)."""
    import numpy as np
    from PIL import Image

    array = np.asarray(array)
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"{path}: label values {array.min()}..{array.max()} do not fit an 8-bit mask picture; give "
                         "2D prompts label values from 1 to 255")
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L").save(path, format=image_format)


def write_label_volume(array: Any, affine: Any, path: str | Path, reference: str | Path | None = None) -> None:
    """(X, Y, Z) label map -> NIfTI with ``affine`` (RAS, as MONAI reads it), uint8 (int32 above 255).

    With a NIfTI ``reference`` its qform/sform codes (0 included) and units are kept, so viewers place both
    alike."""
    import nibabel as nib
    import numpy as np

    from ..inferers.postprocess import set_nifti_geometry

    array = np.asarray(array)
    dtype = np.uint8 if array.size == 0 or array.max() <= 255 else np.int32
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(array.astype(dtype), affine)
    set_nifti_geometry(image, affine, reference)
    nib.save(image, str(path))


def _plan_outputs(args: argparse.Namespace, kind: str) -> tuple[Path, Path, Path | None]:
    out = Path(args.out)
    suffix = _suffix(out)
    if kind == "image" and suffix not in IMAGE_OUTPUTS:
        raise ValueError(f"--out {out}: a 2D image's mask is written as PNG (or BMP/TIFF); give --out ending in .png")
    if kind == "volume" and suffix not in VOLUME_OUTPUTS:
        raise ValueError(f"--out {out}: a volume's label map is written as NIfTI; give --out ending in .nii.gz "
                         "(or .nii)")
    sidecar = Path(f"{out}.json")
    overlay = Path(args.overlay) if args.overlay else None
    if overlay is not None and _suffix(overlay) != ".png":
        raise ValueError(f"--overlay {overlay}: the overlay is a PNG picture; give a path ending in .png")
    from .arguments import check_output_files

    check_output_files([("--out", out), ("--out", sidecar)] + ([("--overlay", overlay)] if overlay else []),
                       args.input, args.overwrite)
    return out, sidecar, overlay


def as_source_dimensions(labels: Any, source: str | Path | None) -> Any:
    """A volume's (X, Y, Z) label array as the input ``source`` stores it: a 2D NIfTI's (read as a one-slice volume)
    comes back (X, Y)."""
    if source is not None and labels.ndim == 3 and labels.shape[-1] == 1 and _is_2d_nifti(source):
        return labels[..., 0]
    return labels


def _is_2d_nifti(path: str | Path) -> bool:
    """A NIfTI file whose header has two dimensions (the loader reads it as a one-slice volume)."""
    if _suffix(path) not in VOLUME_OUTPUTS or not Path(path).is_file():
        return False
    import nibabel as nib

    return len(nib.load(str(path)).header.get_data_shape()) == 2


# ------------------------------------------------------------------------------------------------ command
def _usage(args: argparse.Namespace, message: str) -> None:
    parser = getattr(args, "parser", None)
    if parser is None:
        raise ValueError(message)
    parser.error(message)  # usage line + message on stderr, exit status 2


def _check_arguments(args: argparse.Namespace) -> bool:
    """Usage errors (argparse style, exit 2) before anything is imported; True for the many-inputs mode."""
    inputs = [args.input] if isinstance(args.input, (str, Path)) else list(args.input or [])
    args.input = inputs
    for option in ("out", "out_dir", "overlay"):  # a quoted ~ (a config file's path), as the inputs take it
        if isinstance(getattr(args, option, None), str):
            setattr(args, option, os.path.expanduser(getattr(args, option)))
    datalist = getattr(args, "datalist", None)
    out_dir = getattr(args, "out_dir", None)
    missing = [name for name, given in (("INPUT", inputs or datalist), ("--prompt", args.prompt or datalist),
                                        ("--out PATH (or --out-dir DIR)", args.out or out_dir)) if not given]
    if missing:
        _usage(args, f"the following arguments are required: {', '.join(missing)}")
    if args.out and out_dir:
        _usage(args, "give --out PATH (one input) or --out-dir DIR (one mask per input), not both")
    if getattr(args, "split", None) is not None and not datalist:
        _usage(args, f"--split {args.split} picks a list of a --datalist: give --datalist FILE, or leave --split out")
    for text in args.prompt or []:  # serve, the MONAI Label app and the inference bundle split a comma list
        if "," in str(text):
            print(f"medsam3 segment: note: prompt {text!r} holds a comma; SAM3 reads it as one concept with one label "
                  "(serve, the MONAI Label app and the inference bundle split a comma list into prompts): give "
                  "--prompt once per concept to segment them apart", file=sys.stderr)
    if out_dir is None:
        if datalist:
            _usage(args, "--datalist segments many inputs: give --out-dir DIR (one mask per input)")
        if len(inputs) > 1:
            _usage(args, f"{len(inputs)} inputs: give --out-dir DIR (one mask per input) instead of --out")
    return out_dir is not None


def run(args: argparse.Namespace) -> int:
    if _check_arguments(args):
        return run_many(args)
    from ..inferers.inputs import GLOB_CHARACTERS, check_distinct_prompts, input_kind

    args.input = os.path.expanduser(str(args.input[0]))  # a quoted ~/x.png, as --out-dir's inputs take it
    if not Path(args.input).exists() and any(c in args.input for c in GLOB_CHARACTERS):
        raise ValueError(f"{args.input!r} is a pattern: segment the files it matches with --out-dir DIR (one mask "
                         "per input) instead of --out")
    kind = input_kind(args.input)  # missing input, unsupported format: before anything is loaded
    out, sidecar_path, overlay = _plan_outputs(args, kind)
    if kind == "volume" and args.box:
        raise ValueError(f"{args.input} is a volume: --box applies to 2D images only; segment volumes with "
                         "text prompts (--prompt) alone")
    if kind == "volume" and args.protocol not in (None, "top_query"):
        raise ValueError(f"--protocol {args.protocol} applies to 2D images; volumes use the top query per slice "
                         "(score >= --score-threshold) with tracker propagation (--tracker)")
    if args.box and len(args.box) not in (1, len(args.prompt)):
        raise ValueError(f"{len(args.box)} --box for {len(args.prompt)} --prompt: give one box for all prompts "
                         "or one per prompt, in prompt order")
    if len(args.prompt) > 255:
        raise ValueError(f"{len(args.prompt)} prompts: at most 255 fit an 8-bit label map")
    check_distinct_prompts(args.prompt)  # before the model loads (the predictor checks it again)
    args.score_threshold = checked_threshold_option(args.score_threshold, [args.protocol], kind == "volume")
    max_pixels = getattr(args, "max_pixels", None) or "auto"
    if kind == "image":  # a picture too large for the limit or the memory (or multi-frame): refused up front
        from ..transforms.errors import DataError
        from ..transforms.io import check_picture_size, picture_size

        try:
            size = picture_size(args.input)
        except DataError:  # a multi-frame picture
            raise
        except Exception:  # not readable: the loader says why, below
            size = None
        if size is not None:
            from ..transforms.io import SEGMENT_BYTES_PER_PIXEL

            check_picture_size(args.input, size, max_pixels, SEGMENT_BYTES_PER_PIXEL
                               + (OVERLAY_BYTES_PER_PIXEL if args.overlay else 0))

    from ..transforms.io import input_modality

    modality = input_modality(args.input, args.modality)  # a DICOM series' own when --modality is not given
    if kind == "image":
        for line in ct_picture_notes([args.input], modality):
            print(f"note: {line}", file=sys.stderr)
    predictor = _predictor(args, max_pixels, progress=not args.no_progress, modalities=[modality])
    with _network_context(args, predictor):  # a 4D volume's error names --channel N (transforms.io.CHANNEL_HINT)
        prediction = predictor(args.input, args.prompt, box=args.box, modality=modality, channel=args.channel)

    print(write_prediction(prediction, args.input, out, sidecar_path, overlay, getattr(args, "max_pixels", None),
                           run=numerics(args)))
    for line in prediction_notes(prediction) + random_weights_notes(args.checkpoint):  # after the outputs
        print(f"note: {line}", file=sys.stderr)
    return 0


def _predictor(args: argparse.Namespace, max_pixels: Any, progress: bool, modalities: list[str | None]) -> Any:
    """The :class:`~medsam3_monai.inferers.predict.Predictor` of the arguments, for inputs of ``modalities``."""
    from ..inferers.predict import Predictor
    from ..tensors import resolve_device

    window = ct_window_for(args.ct_window, modalities)  # before the network is built
    predictor = Predictor.from_checkpoint(
        args.checkpoint, args.image_size, resolve_device(args.device), tracker=args.tracker,
        protocol=args.protocol or "top_query", score_threshold=args.score_threshold,
        ct_window=window, progress=progress, max_pixels=max_pixels, resize_kernel=args.resize_kernel,
        detector_chunk=args.detector_chunk, volume_batch_size=args.batch_size, tracker_batch=args.tracker_batch,
    )
    for line in predictor.preprocessing_notes:
        print(f"medsam3 segment: note: {line}", file=sys.stderr)
    if args.compile:
        predictor.compile()
        print(compile_notice("medsam3 segment"), file=sys.stderr)
    return predictor


def _network_context(args: argparse.Namespace, predictor: Any) -> Any:
    """bf16 autocast around the network calls with ``--autocast bf16``; nothing otherwise."""
    return gpu_context(args, next(predictor.network.parameters()).device)


def sidecar_json(summary: Any) -> str:
    """A prediction's JSON text; a score that is not a number (NaN, infinite) is written null, which JSON readers
    take (``NaN`` is not JSON)."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(summary), indent=2, allow_nan=False) + "\n"


def write_prediction(prediction: Any, source: str | Path, out: Path, sidecar_path: Path, overlay: Path | None = None,
                     max_pixels: int | None = None, run: dict[str, Any] | None = None) -> str:
    """Write one prediction's mask / label map, its JSON sidecar and (optionally) the overlay, all or nothing
    (``StagedFiles``); returns the line ``medsam3 segment`` prints about it. ``run``: more sidecar entries (the
    numerics the masks were made with: ``autocast``, ``compiled``)."""
    labels, summary = output_labels(prediction, source)
    summary.update(**(run or {}), output=str(out), overlay=None if overlay is None else str(overlay))
    with StagedFiles() as staged:
        if prediction.is_volume:
            write_label_volume(labels, prediction.affine.numpy(), staged.path(out), reference=source)
        else:
            write_mask_image(labels, staged.path(out), IMAGE_OUTPUTS[_suffix(out)])
        staged.path(sidecar_path).write_text(sidecar_json(summary), encoding="utf-8")
        if overlay is not None:
            from ..transforms.io import MAX_PIXELS_ENV
            from .overlay import save_overlay

            previous = os.environ.get(MAX_PIXELS_ENV)
            if max_pixels:  # the overlay re-reads the picture: the same size limit
                os.environ[MAX_PIXELS_ENV] = str(max_pixels)
            try:
                save_overlay(prediction, staged.path(overlay))
            finally:
                if previous is None:
                    os.environ.pop(MAX_PIXELS_ENV, None)
                else:
                    os.environ[MAX_PIXELS_ENV] = previous
        staged.commit()

    total = max(int(labels.size), 1)
    described = ", ".join(
        f"{value} = {entry['prompt']!r} (score {entry['score']:.3f}, "
        f"{share_text(entry.get('pixels', entry.get('voxels', 0)), total)})"
        for value, entry in summary["labels"].items()
    )
    extra = f" + {overlay}" if overlay is not None else ""
    return f"wrote {out} {size_text(labels.shape, prediction.is_volume)} [{described}] + {sidecar_path}{extra}"


def numerics(args: argparse.Namespace) -> dict[str, Any]:
    """How the network ran (sidecar entries): ``autocast`` (``none`` or ``bf16``: bf16 rounds scores to about three
    digits, so near-equal prompts may tie where they overlap) and ``compiled`` (``--compile``)."""
    return {"autocast": getattr(args, "autocast", None) or "none", "compiled": bool(getattr(args, "compile", False))}


def share_text(count: int, total: int) -> str:
    """``count`` of ``total`` pixels as the summary line says it: ``12.3%``, ``<0.1%`` for a few (not ``0.0%``,
    which reads as empty), ``0.0%`` for none."""
    share = 100.0 * int(count) / max(int(total), 1)
    return "<0.1%" if 0 < share < 0.05 else f"{share:.1f}%"


def size_text(shape: Sequence[int], is_volume: bool) -> str:
    """A written mask's size in the summary line (``segment``, ``agent``): a picture's as pictures are named (width x
    height, ``622x529``), a volume's in array order (its NIfTI dimensions)."""
    size = tuple(shape) if is_volume else tuple(reversed(tuple(shape)))
    return "x".join(str(int(n)) for n in size)


# ------------------------------------------------------------------------------------------------ many inputs
def _many_items(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The datalist items of every input (``--datalist`` first, then INPUTs), before anything is read."""
    from ..inferers.inputs import _prompt_mapping, expand_inputs, inference_items

    items: list[dict[str, Any]] = []
    if args.datalist:
        items += inference_items(args.datalist, args.prompt, split=args.split or "test",
                                 prompt_option="--prompt TEXT (repeat it for several)")
    if args.input:
        if not args.prompt:
            raise ValueError("INPUT files need --prompt TEXT (only --datalist items can bring their own prompts)")
        notes: list[str] = []
        items += [{"image": path, "prompts": _prompt_mapping(args.prompt)}
                  for path in expand_inputs(args.input, notes)]
        for line in notes:  # before the work: a folder whose sub-folders were left out
            print(f"note: {line}", file=sys.stderr)
    from ..transforms.io import input_modality

    for item in items:  # --modality applies to every input, the datalist's included; else a DICOM series' own
        given = args.modality if args.modality is not None else item.get("modality")
        item["modality"] = input_modality(item["image"], given)
        item.setdefault("box", None)
        item.setdefault("protocol", None)
    return items


def _check_many(args: argparse.Namespace, items: list[dict[str, Any]], max_pixels: Any
                ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Every check that can be made before the network runs; returns the items to segment and the inputs
    skipped up front (missing / unsupported, with --skip-unreadable; without it they are errors)."""
    from ..inferers.inputs import box_prompts, input_kind

    runnable, skipped = [], []
    for item in items:
        try:
            item["kind"] = input_kind(item["image"])
        except (FileNotFoundError, ValueError) as err:
            if not args.skip_unreadable:
                raise
            skipped.append((item["image"], str(err)))
            continue
        runnable.append(item)
    if args.box and len(items) > 1:
        raise ValueError(f"--box is in one picture's pixels but {len(items)} inputs were given: segment one input with "
                         "--box, or give each its own box as 'box' in a --datalist")
    if not runnable:
        raise ValueError(f"none of the {len(items)} input(s) can be read: {skipped[0][1]}")
    if args.box:
        runnable[0]["box"] = args.box if len(args.box) > 1 else args.box[0]
    volumes = [item["image"] for item in runnable if item["kind"] == "volume"]
    if volumes and args.protocol not in (None, "top_query"):
        raise ValueError(f"--protocol {args.protocol} applies to 2D images but {len(volumes)} input(s) are volumes "
                         f"(e.g. {volumes[0]}): volumes use the top query per slice; segment them in a run of "
                         "their own")
    args.score_threshold = checked_threshold_option(
        args.score_threshold, [item.get("protocol") or args.protocol for item in runnable], bool(volumes))
    from ..transforms.intensity import handler_for_modality
    from ..transforms.io import SEGMENT_BYTES_PER_PIXEL, check_picture_size, picture_size

    for modality in sorted({item["modality"] for item in runnable} - {None}):
        try:
            handler_for_modality(modality)
        except KeyError:
            first = next(item["image"] for item in runnable if item["modality"] == modality)
            raise ValueError(f"{first}: unknown modality {modality!r}; e.g. CT, MRI, X-ray, ultrasound, "
                             "endoscopy") from None

    for modality in sorted({item["modality"] for item in runnable} - {None}):
        pictures = [item["image"] for item in runnable if item["kind"] == "image" and item["modality"] == modality]
        for line in ct_picture_notes(pictures, modality):
            print(f"note: {line}", file=sys.stderr)
    from ..inferers.inputs import check_item_channels

    check_item_channels(runnable, args.channel)  # from the headers, not mid-run: an option error, never skipped
    for item in runnable:
        if len(item["prompts"]) > 255:
            raise ValueError(f"{item['image']}: {len(item['prompts'])} prompts: at most 255 fit an 8-bit label map")
        largest = max(int(value) for value in item["prompts"])
        if item["kind"] == "image" and largest > 255:
            raise ValueError(f"{item['image']}: label value {largest} does not fit a 2D image's mask (an 8-bit PNG "
                             "holds 0-255); give its prompts label values from 1 to 255")
        if item["kind"] == "volume":
            if item["box"] is not None:
                raise ValueError(f"{item['image']} is a volume: box prompts apply to 2D images only")
            continue
        try:
            size = picture_size(item["image"])
        except Exception:  # not readable: the loader says why, in its turn
            continue
        check_picture_size(item["image"], size, max_pixels, SEGMENT_BYTES_PER_PIXEL)
        if item["box"] is not None:
            try:
                box_prompts(item["box"], len(item["prompts"]), size[::-1])  # (width, height) -> (H, W)
            except ValueError as err:
                raise ValueError(f"{item['image']}: {err}") from None
    return runnable, skipped


def _plan_many(args: argparse.Namespace, items: list[dict[str, Any]]) -> tuple[Path, list[Path]]:
    """The output folder (empty or new unless --overwrite) and each item's mask path in it."""
    from ..inferers.inputs import output_names
    from .arguments import check_name_lengths, check_writable

    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file; give a folder (new or empty)")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out-dir {out_dir} is not empty; choose a new or empty folder or pass --overwrite "
                              "(files of the same names are replaced)")
    check_writable(out_dir, "--out-dir", folder=True)
    names = output_names([item["image"] for item in items], [item["kind"] for item in items], OUTPUT_POSTFIX)
    targets = [out_dir / name for name in names]
    for target in targets:  # the sidecar's name is the longest: <name>_seg.png.json
        check_name_lengths(Path(f"{target}.json"), "--out-dir")
    first_input: dict[Path, str] = {}
    for item, target in zip(items, targets):
        source = os.path.abspath(item["image"])
        if target not in first_input:
            first_input[target] = source
        elif first_input[target] == source:
            raise ValueError(f"{item['image']} is listed more than once; give each input once")
        else:
            raise ValueError(f"{first_input[target]} and {source} would both be written as {target}; rename one of "
                             "them or segment them in separate runs")
    outside = [str(t) for t in targets if os.path.commonpath([os.path.abspath(t), os.path.abspath(out_dir)])
               != os.path.abspath(out_dir)]
    if outside:  # output_names normalises the inputs, so this is a guard, not a case users meet
        raise ValueError(f"{outside[0]} is outside --out-dir {out_dir}")
    inputs = {Path(item["image"]).resolve() for item in items}
    clash = [str(t) for t in targets if t.resolve() in inputs or Path(f"{t}.json").resolve() in inputs]
    if clash:
        raise ValueError(f"{clash[0]} would overwrite an input; choose another --out-dir")
    return out_dir, targets


def run_many(args: argparse.Namespace) -> int:
    """``medsam3 segment INPUT... --out-dir DIR`` / ``--datalist FILE --out-dir DIR``: one mask per input."""
    import time

    if args.overlay:
        raise ValueError("--overlay draws one input: segment that input with --out PATH --overlay PNG")
    max_pixels = getattr(args, "max_pixels", None) or "auto"
    items = _many_items(args)
    runnable, skipped = _check_many(args, items, max_pixels)
    out_dir, targets = _plan_many(args, runnable)

    from tqdm import tqdm

    from ..engines.inference import UnreadableCase

    predictor = _predictor(args, max_pixels, progress=False, modalities=[item["modality"] for item in runnable])
    predictor.check_prompts(sorted({text for item in runnable for text in item["prompts"].values()}))
    target_of = {id(item): target for item, target in zip(runnable, targets)}
    for item in runnable:
        item.pop("kind")
    written, network_run = 0, numerics(args)
    started = time.perf_counter()
    bar = tqdm(total=len(items), unit="img", desc="segment", disable=args.no_progress, file=sys.stderr,
               dynamic_ncols=True)
    bar.update(len(skipped))
    try:
        with _network_context(args, predictor):
            results = predictor.predict_many(runnable, batch_size=args.batch_size, num_workers=args.num_workers,
                                             channel=args.channel)
            for item, result in results:
                if isinstance(result, UnreadableCase):
                    error = result.error
                    if not args.skip_unreadable:
                        where = f" (in {out_dir})" if written else ""
                        raise ValueError(f"{error}; stopped after {written} of {len(items)} masks{where}; "
                                         "--skip-unreadable goes on past unreadable inputs")
                    skipped.append((item["image"], error))
                    named = error if str(item["image"]) in error else f"{item['image']}: {error}"
                    tqdm.write(f"skipped {named}", file=sys.stderr)
                else:
                    target = target_of[id(item)]
                    tqdm.write(write_prediction(result, item["image"], target, Path(f"{target}.json"), run=network_run))
                    remedy = (LOWER_THRESHOLD if item.get("score_threshold") is None else
                              "lower the item's \"score_threshold\" in the datalist to see weaker detections")
                    for line in prediction_notes(result, remedy):
                        tqdm.write(f"note: {item['image']}: {line}", file=sys.stderr)
                    written += 1
                bar.update()
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    skipped_csv = out_dir / "skipped.csv"
    skipped_csv.unlink(missing_ok=True)  # an earlier run's list (--overwrite) does not describe this one
    if skipped:
        import csv

        out_dir.mkdir(parents=True, exist_ok=True)
        with open(skipped_csv, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "error"])
            writer.writerows(skipped)
        print(f"medsam3 segment: skipped {len(skipped)} unreadable input(s) of {len(items)}; listed in "
              f"{skipped_csv}", file=sys.stderr)
    if not written:
        raise ValueError(f"none of the {len(items)} input(s) could be segmented (each is listed with its error in "
                         f"{skipped_csv})")
    print(f"segmented {written} of {len(items)} input(s) into {out_dir} in {seconds:.1f} s "
          f"({written / max(seconds, 1e-9):.2f} img/s, batch size {args.batch_size})")
    for line in random_weights_notes(args.checkpoint):  # after the outputs
        print(f"note: {line}", file=sys.stderr)
    return 0


def slice_axis_note(affine: Any) -> str | None:
    """A note when a volume's third array axis (the one it is sliced along) does not run head to foot: its slices
    are then sagittal or coronal, which the detector sees as they are (volumes are not resampled)."""
    from ..metrics.plots import AXIS_PLANES, axis_codes

    codes = axis_codes(affine)
    plane = AXIS_PLANES.get(codes[2], "coronal")
    if plane == "axial":
        return None
    return (f"the volume's third axis runs {codes[2]} (axis codes {''.join(codes)}), so it was segmented in "
            f"{plane} slices; reorient it to axial (third axis S or I) for the papers' setting")


def ct_picture_notes(pictures: list[str], modality: str | None, shown: str | None = None) -> list[str]:
    """A note when a CT window (Hounsfield units) is to scale 2D pictures, whose pixels are display values (a DICOM
    file's are its stored values through its rescale slope and intercept: HU for CT, no note). ``shown``: what the
    note calls one picture (a server's upload), else its path."""
    from ..transforms.intensity import is_ct_windowed
    from ..transforms.io import dicom_picture_size

    pictures = [picture for picture in pictures if dicom_picture_size(picture) is None]
    if not pictures or not is_ct_windowed(modality):
        return []
    what = (shown or pictures[0]) if len(pictures) == 1 else f"{len(pictures)} pictures (e.g. {pictures[0]})"
    return [f"modality {modality!r} scales {what} with a CT window, which reads Hounsfield units; a picture's "
            "pixels are display values unless it stores HU: without a modality a picture is scaled by its "
            "channels (RGB / 255, grey min-max)"]


#: what an empty volume mask's note says to do, by where the score threshold is set
LOWER_THRESHOLD = "lower --score-threshold to see weaker detections"


def prediction_notes(prediction, remedy: str = LOWER_THRESHOLD) -> list[str]:
    """What to say after a prediction, at the score threshold it ran with (``settings["score_threshold"]``): a
    volume's :func:`volume_notes`; a 2D picture's prompts whose masks a threshold-reading protocol
    (``top_query_floor``, ``threshold``) emptied because no query scored >= it (``remedy``: how this caller's user
    lowers the threshold)."""
    threshold = prediction.settings.get("score_threshold")
    if prediction.is_volume:
        return volume_notes(prediction, threshold, remedy)
    if threshold is None:  # a protocol that reads no threshold
        return []
    return [f"{prompt!r}: no query scored >= {threshold:g} (best {score_text(score, threshold)}), so the "
            f"{prediction.protocol} mask is empty: {remedy}"
            for prompt, score in zip(prediction.prompts, prediction.scores) if score < threshold]


def unused_threshold_notes(prediction, given: float | None, default: float, name: str) -> list[str]:
    """A request's score threshold ``given`` (the option ``name``, e.g. ``params.score_threshold``) other than the
    server's ``default`` that the picture's 2D protocol did not read: one note saying so (3D Slicer sends the
    default back with every request, which needs no note)."""
    from ..protocol_registry import get_protocol

    protocol = str(prediction.protocol).removesuffix("+box")
    if prediction.is_volume or given is None or float(given) == float(default) \
            or get_protocol(protocol).reads_threshold:
        return []
    return [f"{name} {given:g} is not read by protocol {protocol}, so it changed nothing: send it with protocol "
            "top_query_floor or threshold"]


def request_notes(prediction, given: float | None, default: float, name: str) -> list[str]:
    """A server's notes on its answer to a request whose score threshold is ``given`` (the request's setting
    ``name``; ``default``: the server's): a CT window on a picture (:func:`ct_picture_notes`), :func:`prediction_notes`,
    lowered by sending a lower ``name``, and :func:`unused_threshold_notes`."""
    pictures = [] if prediction.is_volume else [str(prediction.source)]
    return (ct_picture_notes(pictures, prediction.settings.get("modality"), shown="the picture")
            + prediction_notes(prediction, remedy=f"send a lower {name}")
            + unused_threshold_notes(prediction, given, default, name))


def add_notes(summary: dict[str, Any], prediction, notes: list[str]) -> None:
    """Put ``notes`` into an answer's ``summary`` as ``notes``: when there are any, and always (empty) for a volume
    or a protocol that reads the threshold, whose notes a client looks for."""
    if notes or prediction.is_volume or prediction.settings.get("score_threshold") is not None:
        summary["notes"] = notes


def volume_notes(prediction, score_threshold: float, remedy: str = LOWER_THRESHOLD) -> list[str]:
    """What to say after a volume's prediction: its min-max scaling for want of a modality
    (:func:`~medsam3_monai.transforms.intensity.unscaled_volume_note`), slices that are not axial
    (:func:`slice_axis_note`), then the prompts whose masks are empty and why (:func:`empty_volume_notes`;
    ``remedy``: how this caller's user lowers the threshold)."""
    from ..transforms.intensity import INTENSITY_NOTE

    meta = getattr(getattr(prediction, "label_map", None), "meta", None) or {}
    given = [note for note in (meta.get(INTENSITY_NOTE), slice_axis_note(prediction.affine)) if note]
    return given + empty_volume_notes(prediction, score_threshold, remedy)


def empty_volume_notes(prediction, score_threshold: float, remedy: str = LOWER_THRESHOLD) -> list[str]:
    """Why a volume prompt's mask is empty: no slice scored >= the threshold, or the slices that did had empty
    masks (the score alone does not make a mask)."""
    notes = []
    for prompt, score, seed in zip(prediction.prompts, prediction.scores, prediction.seed_slices or []):
        if seed >= 0:
            continue
        if score >= score_threshold:
            notes.append(f"{prompt!r}: slices scored up to {score:.3f} (>= {score_threshold}) but their masks were "
                         "empty at the mask threshold, so no mask seeded the tracker; the mask is empty")
        else:
            best = score_text(score, score_threshold)
            notes.append(f"{prompt!r}: no slice scored >= {score_threshold} (best {best}); the mask is empty: {remedy}")
    return notes
