"""``medsam3 segment INPUT --prompt TEXT [...] --out PATH``: segment one image or volume with text prompts.

Outputs (all in the input's own geometry; nothing is written unless everything succeeded):

* 2D image (PNG, JPEG, BMP, TIFF, GIF) -> ``--out`` PNG (or BMP/TIFF) of the input's size, uint8. One prompt:
  a binary mask **0/255**; several prompts: a label map with values **1..P** in prompt order (0 background),
  overlaps going to the prompt with the higher confidence (score x sigmoid(mask logit)) at the pixel.
* Volume (NIfTI, DICOM series folder, MetaImage, NRRD) -> ``--out`` NIfTI (``.nii.gz``/``.nii``) of the
  input's shape with its affine (hence spacing), uint8 label values **1..P** (one prompt: 0/1).
* ``<out>.json`` beside it: label value -> prompt, score and pixel count; protocol, checkpoint, tracker,
  thresholds, box; for volumes the affine, spacing and the tracker's seed slice per prompt.
* ``--overlay PNG``: the input with the masks filled and outlined and a legend (volumes: a 3-slice montage).

Every file is first written under a temporary name and moved into place at the end: a failure (bad input,
bad checkpoint, interrupted run) leaves no partial output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..protocol_registry import PROTOCOLS

__all__ = ["StagedFiles", "add_parser", "run", "write_label_volume", "write_mask_image"]

IMAGE_OUTPUTS = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
#: what ``--overlay`` adds to a 2D picture's peak memory, bytes per input pixel (it decodes the picture again as
#: uint8 and draws a display-sized copy: deploy.overlay.DISPLAY_PIXELS)
OVERLAY_BYTES_PER_PIXEL = 4
VOLUME_OUTPUTS = (".nii", ".nii.gz")
BINARY_VALUE = 255  # a single prompt's 2D mask

_EPILOG = """\
Output values: 2D, one prompt -> 0/255 mask; 2D, several prompts -> labels 1..P (prompt order);
volumes -> NIfTI labels 1..P with the input's affine. <out>.json maps values to prompts and scores.
--box x1 y1 x2 y2: pixel coordinates of the input (x = column, y = row, image spanning [0, W] x [0, H]);
give it once (used with every prompt) or once per prompt; 2D images only.
Protocols (2D): top_query = each prompt's highest-scoring query (the papers'), threshold = union of the
queries with score >= --score-threshold, semantic = the semantic head. Volumes: the detector on every slice
(top query, kept where score >= --score-threshold), merged with SAM3 tracker propagation from the most
confident slice. --tracker auto = tiny for the tiny checkpoint, the checkpoint's own tracker for a
facebook/sam3 folder, else none (detector only).
Intensity: --modality CT uses the --ct-window preset; MRI a 0.5-99.5 percentile clip; without --modality
RGB pictures are divided by 255 and grey images min-max scaled.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "segment",
        help="segment an image or volume with text prompts (and boxes): mask/label map in the input's geometry",
        description="Text-prompted segmentation of one 2D image or 3D volume with SAM3 / Medical SAM3 weights.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT",
                        help="2D image (png, jpg, bmp, tif, gif), volume (.nii, .nii.gz, .mha, .nrrd) or DICOM folder")
    parser.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                        help="concept to segment, e.g. 'polyp' (repeat for several: label values 1..P)")
    parser.add_argument("--box", action="append", nargs=4, type=float, metavar=("X1", "Y1", "X2", "Y2"),
                        help="box prompt in input pixels (2D only); once for all prompts or once per prompt")
    parser.add_argument("--checkpoint", default="tiny", metavar="SRC",
                        help="'tiny' (random init, default), an HF folder, sam3.pt, a Medical-SAM3 or medsam3-monai "
                             "checkpoint")
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="slice-space size of the tiny network (default 112); must match a real checkpoint")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default=None, help="2D protocol (default top_query)")
    parser.add_argument("--score-threshold", type=float, default=0.5, metavar="F",
                        help="query score of the threshold protocol and of volume detections (0.5)")
    parser.add_argument("--tracker", default="auto", metavar="SRC|none",
                        help="volumes: auto (default), none (detector only), tiny or an HF folder")
    parser.add_argument("--modality", default=None,
                        help="intensity rule: CT, MRI, X-ray, ultrasound, endoscopy, ... (default: by channels)")
    parser.add_argument("--ct-window", default="abdomen", metavar="NAME|W,L",
                        help="CT window preset (abdomen, lung, bone, brain, ...) or width,level (with --modality CT)")
    parser.add_argument("--channel", type=int, default=None, metavar="N",
                        help="for a 4D volume (several channels / time points): segment channel N (0-based)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="mask / label map to write: .png (2D) or .nii.gz (volumes); <PATH>.json beside it")
    parser.add_argument("--overlay", default=None, metavar="PNG", help="also write an overlay picture")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--max-pixels", type=_pixels, default=None, metavar="N",
                        help="accept 2D pictures up to N pixels, also above PIL's decompression-bomb limit "
                             "(default: PIL's limit and what fits in 80%% of the available memory; "
                             "env MEDSAM3_MAX_PIXELS)")
    parser.set_defaults(func=run)
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
            anchor = target.parent
            while not anchor.exists():
                anchor = anchor.parent
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


def output_labels(prediction: Any) -> tuple[Any, dict[str, Any]]:
    """The array written out for a ``Prediction`` and its JSON summary: one prompt on a 2D image gives a 0/255
    mask, anything else the label map (0 background, one value per prompt)."""
    labels = prediction.label_map.as_tensor().cpu().numpy()
    values = list(prediction.label_values)
    binary = not prediction.is_volume and len(values) == 1
    if binary:
        labels = (labels == values[0]).view("uint8")  # one byte per pixel, scaled in place
        labels *= BINARY_VALUE
        values = [BINARY_VALUE]
    summary = prediction.summary(values)
    summary["values"] = "0/255 binary mask" if binary else "label map: 0 background, one value per prompt"
    return labels, summary


def write_mask_image(array: Any, path: str | Path, image_format: str = "PNG") -> None:
    """(H, W) uint8 array -> a greyscale picture of that size (rows first)."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L").save(path, format=image_format)


def write_label_volume(array: Any, affine: Any, path: str | Path, reference: str | Path | None = None) -> None:
    """(X, Y, Z) label map -> NIfTI with ``affine`` (RAS, as MONAI reads it), uint8 (int32 above 255).

    With a NIfTI ``reference`` its qform/sform codes (0 included) and units are kept, so viewers place both
    alike."""
    import nibabel as nib
    import numpy as np

    array = np.asarray(array)
    dtype = np.uint8 if array.size == 0 or array.max() <= 255 else np.int32
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(array.astype(dtype), affine)
    qform_code = sform_code = 1
    if reference is not None and _suffix(reference) in VOLUME_OUTPUTS and Path(reference).is_file():
        header = nib.load(str(reference)).header
        qform_code = int(header["qform_code"])  # kept as they are, 0 (unknown) included
        sform_code = int(header["sform_code"])
        image.header.set_xyzt_units(*header.get_xyzt_units())
    else:
        image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    nib.save(image, str(path))


def _plan_outputs(args: argparse.Namespace, kind: str) -> tuple[Path, Path, Path | None]:
    out = Path(args.out)
    suffix = _suffix(out)
    if kind == "image" and suffix not in IMAGE_OUTPUTS:
        raise ValueError(f"--out {out}: a 2D image's mask is written as PNG (or BMP/TIFF); give --out ending in .png")
    if kind == "volume" and suffix not in VOLUME_OUTPUTS:
        raise ValueError(f"--out {out}: a volume's label map is written as NIfTI; give --out ending in .nii.gz")
    sidecar = Path(f"{out}.json")
    overlay = Path(args.overlay) if args.overlay else None
    if overlay is not None and _suffix(overlay) != ".png":
        raise ValueError(f"--overlay {overlay}: the overlay is a PNG picture; give a path ending in .png")
    targets = [out, sidecar] + ([overlay] if overlay is not None else [])
    resolved = [t.resolve() for t in targets]
    if len(set(resolved)) < len(resolved):
        raise ValueError("--out, its .json sidecar and --overlay must be different files")
    if Path(args.input).resolve() in resolved:
        raise ValueError(f"an output would overwrite the input {args.input}; choose another --out/--overlay")
    folders = [str(t) for t in targets if t.is_dir()]
    if folders:
        raise ValueError(f"{', '.join(folders)} is a folder; give a file path")
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); choose another --out or pass --overwrite")
    return out, sidecar, overlay


def _is_2d_nifti(path: str | Path) -> bool:
    """A NIfTI file whose header has two dimensions (the loader reads it as a one-slice volume)."""
    if _suffix(path) not in VOLUME_OUTPUTS or not Path(path).is_file():
        return False
    import nibabel as nib

    return len(nib.load(str(path)).header.get_data_shape()) == 2


def _pixels(value: str) -> int:
    try:
        pixels = int(float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of pixels (e.g. 200000000 or 2e8)") from None
    if pixels <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: give a positive number of pixels")
    return pixels


def _ct_window(value: str) -> Any:
    if "," not in value:
        return value
    try:
        width, level = (float(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"--ct-window {value!r}: give a preset name or width,level (e.g. 400,40)") from None
    return (width, level)


# ------------------------------------------------------------------------------------------------ command
def run(args: argparse.Namespace) -> int:
    from ..inferers.inputs import input_kind

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
    if not 0.0 <= args.score_threshold <= 1.0:
        raise ValueError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    max_pixels = getattr(args, "max_pixels", None) or "auto"
    if kind == "image":  # a picture too large for the limit or the memory: refused from its header, up front
        from ..transforms.io import check_picture_size, picture_size

        try:
            size = picture_size(args.input)
        except Exception:  # not readable: the loader says why, below
            size = None
        if size is not None:
            from ..transforms.io import SEGMENT_BYTES_PER_PIXEL

            check_picture_size(args.input, size, max_pixels, SEGMENT_BYTES_PER_PIXEL
                               + (OVERLAY_BYTES_PER_PIXEL if args.overlay else 0))

    import torch

    from ..inferers.predict import Predictor
    from ..transforms.errors import DataError

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    predictor = Predictor.from_checkpoint(
        args.checkpoint, args.image_size, torch.device(device), tracker=args.tracker,
        protocol=args.protocol or "top_query", score_threshold=args.score_threshold,
        ct_window=_ct_window(args.ct_window), progress=not args.no_progress, max_pixels=max_pixels,
    )
    try:
        prediction = predictor(args.input, args.prompt, box=args.box, modality=args.modality, channel=args.channel)
    except DataError as err:
        if "4D volume" in err.problem:
            raise ValueError(f"{err.path}: {err.problem}: segment a 3D volume, or pick one channel / time point "
                             "with --channel N") from None
        raise

    labels, summary = output_labels(prediction)
    if prediction.is_volume and labels.ndim == 3 and labels.shape[-1] == 1 and _is_2d_nifti(args.input):
        labels = labels[..., 0]  # a 2D NIfTI in, a 2D NIfTI out
    summary.update(shape=list(labels.shape), output=str(out), overlay=None if overlay is None else str(overlay))
    with StagedFiles() as staged:
        if prediction.is_volume:
            write_label_volume(labels, prediction.affine.numpy(), staged.path(out), reference=args.input)
        else:
            write_mask_image(labels, staged.path(out), IMAGE_OUTPUTS[_suffix(out)])
        staged.path(sidecar_path).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if overlay is not None:
            from ..transforms.io import MAX_PIXELS_ENV
            from .overlay import save_overlay

            previous = os.environ.get(MAX_PIXELS_ENV)
            if getattr(args, "max_pixels", None):  # the overlay re-reads the picture: the same size limit
                os.environ[MAX_PIXELS_ENV] = str(args.max_pixels)
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
        f"{100.0 * entry.get('pixels', entry.get('voxels', 0)) / total:.1f}%)"
        for value, entry in summary["labels"].items()
    )
    extra = f" + {overlay}" if overlay is not None else ""
    print(f"wrote {out} {'x'.join(str(s) for s in labels.shape)} [{described}] + {sidecar_path}{extra}")
    if prediction.is_volume:
        for line in empty_volume_notes(prediction, args.score_threshold):
            print(f"note: {line}", file=sys.stderr)
    return 0


def empty_volume_notes(prediction, score_threshold: float) -> list[str]:
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
            notes.append(f"{prompt!r}: no slice scored >= {score_threshold} (best {score:.3f}); the mask is empty: "
                         "lower --score-threshold to see weaker detections")
    return notes
