"""Argument types and output-folder rules shared by the ``medsam3`` sub-commands (standard library only: building
the parser stays fast)."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = ["DEFAULT_SCORE_THRESHOLD", "INPUT_HELP", "RESIZE_KERNEL_CHOICES", "add_ct_window_option",
           "add_detector_chunk_option", "add_gpu_options", "add_model_options", "add_resize_kernel_option",
           "add_score_threshold_option", "add_tracker_batch_option", "at_least", "check_output_files", "checked_threshold_option", "compile_notice",
           "ct_window", "ct_window_for", "gpu_context", "pixels", "remove_output"]


def add_model_options(parser: Any) -> None:
    """``--checkpoint`` (default tiny), ``--image-size`` and ``--resize-kernel`` of the sub-commands that run one model
    (``segment``, ``serve``, ``agent``) on ``parser`` (a parser or an argument group)."""
    parser.add_argument("--checkpoint", default="tiny", metavar="SRC",
                        help="'tiny' (random init, default), an HF folder, sam3.pt, a Medical-SAM3 or medsam3-monai "
                             "checkpoint")
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="slice-space size: tiny 112 by default; a checkpoint file without a configuration "
                             "(sam3.pt, a Medical-SAM3 file) is built at it (default 1008; 504 for the release's 3D "
                             "checkpoint); others must match theirs")
    add_resize_kernel_option(parser)


#: an INPUT the one-model commands (``segment``, ``agent``) take, in their help
INPUT_HELP = ("2D image (png, jpg, jpeg, bmp, tif, tiff, gif, ppm, a single-frame .dcm / .ima), volume (.nii, .nii.gz, "
              ".mha, .mhd, .nrrd, .nhdr, a multi-frame .dcm) or DICOM series folder")


#: ``--resize-kernel``'s choices: ``transforms.slices.RESIZE_KERNELS`` (written out: the parsers import no torch)
RESIZE_KERNEL_CHOICES = ("sam3", "monai")


def add_resize_kernel_option(parser: Any) -> None:
    """``--resize-kernel`` (the bundles' ``resize_kernel``) on ``parser``: how the pictures are resized to the slice
    space, which should be how the network saw them in training."""
    parser.add_argument("--resize-kernel", choices=RESIZE_KERNEL_CHOICES, default=None,
                        help="the resize to the slice space: sam3 (SAM3's image processor's, on the 8-bit picture) "
                             "or monai (MONAI's Resize of the float intensities), as the network was trained. "
                             "Default: the one a model file of this project records (the training bundle's "
                             "resize_kernel), else sam3 (monai for models fine-tuned with this project before "
                             "December 2026, whose files record none)")


def random_weights_notes(checkpoint: Any) -> list[str]:
    """What to say when a command runs the random-init tiny network (``--checkpoint tiny``, the default of
    ``segment``, ``agent`` and ``serve``), whose masks look like results: one note; none for real weights."""
    if str(checkpoint) != "tiny":
        return []
    return ["--checkpoint tiny (the default) is a random-init network: its masks and scores mean nothing; give "
            "--checkpoint real weights (a SAM3 / Medical-SAM3 file or folder, a training run's models/model.pt)"]


#: the score threshold where none is given
DEFAULT_SCORE_THRESHOLD = 0.5


def add_score_threshold_option(parser: Any, default: float | None = DEFAULT_SCORE_THRESHOLD, also: str = "",
                               protocol: str = "--protocol") -> None:
    """``--score-threshold T`` (``default``: None where a command refuses it when nothing would read it, 0.5 then
    applying); ``also``: what the help adds; ``protocol``: what picks the protocol in this command."""
    parser.add_argument("--score-threshold", type=float, default=default, metavar="T",
                        help=f"score threshold in [0, 1] (default {DEFAULT_SCORE_THRESHOLD:g}): the query score of "
                             f"{protocol} threshold, the floor of {protocol} top_query_floor (the Medical-SAM3 "
                             "release's 2D evaluation floors at 0.1), and the detection score of a volume's slices"
                             + also)


def checked_threshold_option(given: float | None, protocols: Sequence[str | None], volumes: bool) -> float:
    """``--score-threshold`` as it applies (0.5 when not given): refused outside [0, 1], and when given to a run
    that would not read it (2D pictures only, none of whose ``protocols``, None: top_query, reads a threshold)."""
    from ..protocol_registry import DEFAULT_PROTOCOL, get_protocol

    if given is None:
        return DEFAULT_SCORE_THRESHOLD
    if not 0.0 <= given <= 1.0:
        raise ValueError(f"--score-threshold must be in [0, 1], got {given}")
    names = sorted({protocol or DEFAULT_PROTOCOL for protocol in protocols})
    if not volumes and not any(get_protocol(name).reads_threshold for name in names):
        raise ValueError(f"--score-threshold {given:g} would change nothing here: protocol {', '.join(names)} reads no "
                         "threshold; it is read by --protocol top_query_floor and threshold, and by volumes")
    return float(given)


def add_detector_chunk_option(parser: Any) -> None:
    """``--detector-chunk N`` of the sub-commands that segment with many prompts (``segment``, ``evaluate``,
    ``serve``, ``agent``): ``MedSAM3Net.detector_chunk``, the find-queries per detector pass (None: the network's,
    16)."""
    parser.add_argument("--detector-chunk", type=at_least(1), default=None, metavar="N",
                        help="image-prompt pairs per detector pass (default 16): the detector's memory grows with "
                             "them; lower it if many prompts run out of memory, raise it on a large GPU")


def add_tracker_batch_option(parser: Any) -> None:
    """``--tracker-batch N`` of the sub-commands that segment volumes (``segment``, ``evaluate``, ``serve``): a
    volume's prompts propagated together by the tracker (``inferers.tracking``; the default is its
    ``TRACKER_BATCH``, written here so that building the parser imports no torch)."""
    parser.add_argument("--tracker-batch", type=at_least(1), default=8, metavar="N",
                        help="volumes: prompts the tracker propagates together, each with the masks it gets alone "
                             "(default %(default)s; 1 = one at a time): raise it for many prompts on a large GPU, "
                             "lower it if they run out of memory")


def add_gpu_options(parser: Any) -> None:
    """``--autocast`` and ``--compile`` of the sub-commands that run the network over many inputs (``segment``,
    ``evaluate``): :func:`gpu_context` and ``inferers.batch.compile_network`` apply them."""
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none",
                        help="bf16 autocast for the network (CUDA or CPU; default none: float32)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the vision encoder (and a volume's tracker): a minute or more at the "
                             "first batch (a smaller last batch is padded to its size) and at the first volume, then "
                             "faster; pays over many inputs on a GPU")


def compile_notice(prog: str) -> str:
    """The line ``--compile`` prints before the first batch, which then takes a while."""
    return (f"{prog}: --compile: the vision encoder compiles at the first batch (a minute or more; a smaller last "
            "batch is padded to the first one's size, so it compiles once), the tracker at the first volume")


def gpu_context(args: argparse.Namespace, device: Any) -> Any:
    """``torch.no_grad`` and bf16 autocast on ``device`` with ``--autocast bf16``
    (``inferers.batch.inference_context``); nothing otherwise."""
    import contextlib

    if getattr(args, "autocast", "none") in (None, "none"):
        return contextlib.nullcontext()
    from ..inferers.batch import inference_context

    return inference_context(device, args.autocast)


def pixels(value: str) -> int:
    """``--max-pixels N``: a positive number of pixels (``200000000`` or ``2e8``)."""
    try:
        count = int(float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of pixels (e.g. 200000000 or 2e8)") from None
    if count <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: give a positive number of pixels")
    return count


def at_least(minimum: int) -> Callable[[str], int]:
    """An argument type for whole numbers ``>= minimum``."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{value!r}: give a number >= {minimum}")
        return number

    return parse


#: SAM3's ViT patch side (``networks.presets.PATCH_SIZE``; spelt out so that the parsers import no transformers)
VIT_PATCH_SIZE = 14


def slice_size(value: str) -> int:
    """An argument type for ``--image-size``: a positive multiple of the ViT's 14-pixel patch (the rule of
    :func:`~medsam3_monai.networks.presets.check_image_size`)."""
    size = at_least(1)(value)
    if size % VIT_PATCH_SIZE:
        raise argparse.ArgumentTypeError(f"{value!r}: give a multiple of {VIT_PATCH_SIZE}, the ViT's patch size "
                                         "(e.g. 112, 224, 1008)")
    if size < 2 * VIT_PATCH_SIZE:  # one patch: the FPN's 0.5x level has no pixel
        raise argparse.ArgumentTypeError(f"{value!r}: give at least {2 * VIT_PATCH_SIZE}, two ViT patches "
                                         "(e.g. 112, 224, 1008)")
    return size


def ct_window(value: str) -> Any:
    """``--ct-window``: a preset name, or ``width,level`` -> ``(width, level)``."""
    if "," not in value:
        return value
    try:
        width, level = (float(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"--ct-window {value!r}: give a preset name or width,level (e.g. 400,40)") from None
    return (width, level)


def add_ct_window_option(parser: Any) -> None:
    """``--ct-window`` (default None: the model's own, else abdomen) of the sub-commands that read CT inputs."""
    parser.add_argument("--ct-window", default=None, metavar="NAME|W,L",
                        help="CT window preset (abdomen, lung, bone, brain, ...) or width,level in HU, for CT inputs "
                             "(--modality CT, or the datalist's 'modality'). Default: the one a model file of this "
                             "project records (the training bundle's ct_window), else abdomen")


def ct_window_for(value: str | None, modalities: Iterable[str | None]) -> Any:
    """``--ct-window`` (None: not given, the model's own) for inputs of ``modalities`` -> what the pipeline takes.

    A window given where no input is CT (no input's intensity rule is the CT window) would go unused (the others
    are scaled by their own rule): refused, with the fix. Unknown modality names count as not CT (their own
    check names them)."""
    if value is None:
        return None
    from ..transforms.intensity import is_ct_windowed  # torch and MONAI: at run time, not when parsing

    window = ct_window(value)
    if not any(is_ct_windowed(modality) for modality in modalities):
        raise ValueError(f"--ct-window {value} applies to CT inputs, but no input is marked CT: add --modality CT "
                         "(or 'modality': 'CT' in the datalist items)")
    return window


def nearest_existing(path: str | Path) -> Path:
    """``path`` (absolute) when it exists, else its nearest existing parent; a name too long for the file system
    counts as not existing."""
    existing = Path(path).absolute()
    while True:
        try:
            if existing.exists() or existing == existing.parent:
                return existing
        except OSError:  # ENAMETOOLONG
            pass
        existing = existing.parent


def check_name_lengths(path: str | Path, option: str) -> None:
    """Refuse an output path with a name longer than the file system allows (255 bytes on most): found before any
    work instead of as a traceback when the file is written."""
    absolute = Path(path).absolute()
    try:
        limit = int(os.pathconf(nearest_existing(absolute), "PC_NAME_MAX"))
    except (OSError, ValueError):
        limit = 255
    long = [part for part in absolute.parts if len(os.fsencode(part)) > limit]
    if long:
        raise ValueError(f"{option} {path}: the name {long[0][:40]}... is {len(os.fsencode(long[0]))} bytes, longer "
                         f"than the file system allows ({limit}); choose a shorter name (or rename the input)")


def check_writable(path: str | Path, option: str, folder: bool = False) -> None:
    """Refuse an output (a file, or a folder when ``folder``) that cannot be made, before any work: a name too long,
    a file where a folder must be, or a place this user cannot write (a read-only file system, another user's
    folder). The folder itself is checked when it exists, else its nearest existing parent."""
    check_name_lengths(path, option)
    _check_place(path, option, folder)


def _check_place(path: str | Path, option: str, folder: bool) -> None:
    """:func:`check_writable` but the name lengths."""
    wanted = Path(path).absolute()
    existing = nearest_existing(wanted if folder else wanted.parent)
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is a file, so {'the folder' if folder else 'the file'} cannot "
                         "be made there: give a path in a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the folder" if folder and existing == wanted else f"the folder {existing}"
        raise ValueError(f"{option} {path}: {what} cannot be written (read-only, or not this user's): choose a place "
                         "you can write")


def check_output_files(outputs: Sequence[tuple[str, Path]], input_path: str | Path, overwrite: bool) -> None:
    """Refuse output files (``(option, path)``: the option that names each, e.g. ``("--out", sidecar)``) that are
    the same file twice, the input, a folder, (without ``overwrite``) existing files, or files that cannot be written
    there (:func:`check_writable`), naming the options."""
    def options(chosen: Sequence[tuple[str, Path]]) -> str:
        return " / ".join(dict.fromkeys(option for option, _ in chosen))

    for option, path in outputs:
        check_name_lengths(path, option)

    resolved = [path.resolve() for _, path in outputs]
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"{options(outputs)} (and the .json sidecar) must name different files")
    clashing = [(option, path) for option, path in outputs if path.resolve() == Path(input_path).resolve()]
    if clashing:
        raise ValueError(f"an output would overwrite the input {input_path}; choose another {options(clashing)}")
    folders = [str(path) for _, path in outputs if path.is_dir()]
    if folders:
        raise ValueError(f"{', '.join(folders)} is a folder; give a file path")
    existing = [(option, path) for option, path in outputs if path.exists()]
    if existing and not overwrite:
        verb = "exists" if len(existing) == 1 else "exist"
        raise FileExistsError(f"{', '.join(str(path) for _, path in existing)} already {verb}; choose another "
                              f"{options(existing)} or pass --overwrite")
    for option, path in outputs:  # (their name lengths were checked first: a long name breaks the checks above)
        _check_place(path, option, folder=False)


def remove_output(out: Path, created: bool) -> None:
    """After a failure: remove ``out`` when the command created it, else empty it (it was empty at the start)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
