"""``medsam3 datalist NAME ROOT --out FILE``: a dataset folder in its official layout -> datalist JSON.

The main CLI (``medsam3_monai.deploy.cli``) calls :func:`add_parser`; :func:`datalist_command` runs the
sub-command on its own (``python -m medsam3_monai.data.cli NAME ROOT --out FILE``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_datalist_parser", "add_parser", "check_datalist_file", "datalist_command", "decode_check",
           "run_datalist"]

_EPILOG = """\
NAME is a converter (BUSI, DRIVE, MSD, ...) or a catalogued dataset name or alias
(Kvasir-SEG_sample, MSD_Task04_Hippocampus_cropped, ...); --list shows them all.
Paths are absolute unless --relative-to BASE is given (then read it back with
medsam3_monai.data.load_datalist(FILE, split, base_dir=BASE)). Bad input (image without mask,
mask size mismatch, label value not in the catalogue) is an error naming each file,
unless --skip-bad: then those files are left out and listed on stderr. Only headers are read
unless --check: then every image and mask is decoded as training will decode it (load, decode
the mask encoding, intensity), which finds truncated or corrupt files before a long run does.
`medsam3 datalist --check FILE` does that for a datalist you already have (hand-written or
written earlier): its schema first, then every item, relative paths read from its folder.
"""


def add_datalist_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``datalist`` sub-command on ``subparsers``; its ``func`` is :func:`run_datalist`."""
    parser = subparsers.add_parser(
        "datalist",
        help="dataset folder -> datalist JSON (85/15 split, official test kept)",
        description="Turn a dataset folder in its official layout into a MONAI datalist JSON.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help="converter or dataset name (with --check alone: a datalist FILE to check)")
    parser.add_argument("root", nargs="?", metavar="ROOT", help="the dataset folder")
    parser.add_argument("--out", metavar="FILE", help="datalist JSON to write")
    parser.add_argument("--relative-to", metavar="BASE", help="write paths relative to BASE instead of absolute")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="validation share of the pool (0.15)")
    parser.add_argument("--seed", type=int, default=42, help="split seed (42)")
    parser.add_argument("--channel", type=int, default=None, metavar="N",
                        help="multi-channel (4D) images, e.g. MSD BrainTumour / Prostate: the channel every item "
                             "segments (0-based; written into each item as 'channel')")
    parser.add_argument("--skip-bad", action="store_true", help="leave bad pairs out (listed) instead of failing")
    parser.add_argument("--no-value-check", action="store_true", help="do not read label maps to check their values")
    parser.add_argument("--check", action="store_true",
                        help="decode every image and mask (finds truncated or corrupt files; slower)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar for --check")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    parser.add_argument("--list", action="store_true", help="list converters and the datasets they read, then exit")
    parser.set_defaults(func=run_datalist)
    return parser


add_parser = add_datalist_parser


def _listing() -> str:
    from .catalogue import load_catalogue
    from .converters import CONVERTERS

    catalogue = load_catalogue()
    lines = []
    for name, converter in sorted(CONVERTERS.items()):
        datasets = [e.name + (f" (also {', '.join(e.aliases)})" if e.aliases else "")
                    for e in catalogue.datasets.values() if e.converter == name]
        lines.append(f"{name:32s} {', '.join(datasets)}\n{'':32s} layout: {converter.summary}")
    return "\n".join(lines)


def run_datalist(args: argparse.Namespace) -> int:
    """Build and write the datalist; print a summary (and everything left out) to stderr."""
    from .datalist import build_datalist, write_datalist

    if args.list:
        print(_listing())
        return 0
    if args.check and args.name and not args.root:
        given = [flag for flag, value in (("--out", args.out), ("--channel", args.channel),
                                          ("--relative-to", args.relative_to), ("--seed", args.seed != 42 or None),
                                          ("--val-fraction", args.val_fraction != 0.15 or None),
                                          ("--overwrite", args.overwrite or None),
                                          ("--no-value-check", args.no_value_check or None)) if value is not None]
        if given:
            hint = " (a 4D image's channel is \"channel\": N in its items)" if args.channel is not None else ""
            raise ValueError(f"{' and '.join(given)} {'go' if len(given) > 1 else 'goes'} with NAME ROOT (a dataset "
                             f"folder to convert); --check FILE checks a datalist you have and writes nothing{hint}")
        return check_datalist_file(args.name, skip_bad=args.skip_bad, progress=not args.no_progress)
    if not (args.name and args.root and args.out):
        raise ValueError("NAME, ROOT and --out FILE are required (or --list, or --check FILE for a datalist you have)")
    _check_out(Path(args.out), args.overwrite)  # before the build and the decode check (minutes on a whole dataset)
    result = build_datalist(
        args.name,
        args.root,
        val_fraction=args.val_fraction,
        seed=args.seed,
        skip_bad=args.skip_bad,
        check_values=not args.no_value_check,
        relative_to=args.relative_to,
        channel=args.channel,
    )
    notes = []
    if args.check:
        notes = decode_check(result, skip_bad=args.skip_bad, progress=not args.no_progress, base_dir=args.relative_to)
    out = write_datalist(result.datalist, args.out, overwrite=args.overwrite)
    for note in notes:
        print(f"medsam3 datalist: note: {note}", file=sys.stderr)
    datasets = sorted({item["dataset"] for items in result.datalist.values() for item in items})
    source = result.converter if datasets == [result.converter] else f"{', '.join(datasets)}; {result.converter} layout"
    print(f"medsam3 datalist: wrote {out} ({source}): {result.summary()}", file=sys.stderr)
    if args.relative_to and Path(args.relative_to).resolve() != out.resolve().parent:
        print(f"medsam3 datalist: note: its paths are relative to {args.relative_to}, but `medsam3 evaluate`, "
              f"`medsam3 segment --datalist` and the bundles read them from the datalist's own folder "
              f"({out.parent}): write it into {args.relative_to}, or load it with load_datalist(FILE, split, "
              f"base_dir={args.relative_to!r})", file=sys.stderr)
    return 0


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` the datalist could not be written to: a folder, an existing file without --overwrite, a
    place that cannot be written."""
    from ..deploy.arguments import check_writable
    from .datalist import check_datalist_out

    check_datalist_out(out, overwrite)
    check_writable(out, "--out")


def check_datalist_file(path: str | Path, skip_bad: bool = False, progress: bool = True) -> int:
    """``medsam3 datalist --check FILE``: a datalist you have (hand-written, or from an earlier run) against what the
    readers take (:func:`~medsam3_monai.data.datalist.readers_schema`: ``image``, ``label`` and ``prompts``
    required, a modality in any spelling the intensity step knows), then every image and mask decoded
    (:func:`decode_check`; relative paths from its folder). Problems raise ValueError (DatalistError) naming them;
    with ``skip_bad`` undecodable items are only listed."""
    from .datalist import (SPLITS, DatalistResult, check_prompt_texts, modality_problems, read_datalist_json,
                           readers_schema)
    from .schemas import schema_errors

    raw = read_datalist_json(path)
    given = set(raw) if isinstance(raw, dict) else set()
    if isinstance(raw, dict):  # a split left out is an empty one, as evaluate, segment and the bundles read it
        raw = {**{split: [] for split in SPLITS}, **raw}
    problems = schema_errors(raw, readers_schema())
    problems += modality_problems(raw) if not problems else []
    if problems:
        raise ValueError(f"datalist {path} does not match its schema:\n  " + "\n  ".join(problems))
    for split in SPLITS:
        for number, item in enumerate(raw[split], start=1):
            check_prompt_texts(item["prompts"], f"{path}: {split} item {number}")
    result = DatalistResult({split: list(raw[split]) for split in SPLITS}, converter="")
    total = sum(len(items) for items in result.datalist.values())
    if not total:
        raise ValueError(f"datalist {path} holds no items (its training, validation and test lists are empty)")
    notes = _split_notes(given, result.datalist, str(Path(path).resolve().parent))
    notes += decode_check(result, skip_bad=skip_bad, progress=progress, base_dir=str(Path(path).resolve().parent),
                          skip_hint=None)
    for note in notes:
        print(f"medsam3 datalist: note: {path}: {note}", file=sys.stderr)
    if result.skipped:
        listed = "\n  ".join(str(problem) for problem in result.skipped)
        print(f"medsam3 datalist: {path}: {len(result.skipped)} of {total} items do not decode:\n  {listed}",
              file=sys.stderr)
        return 1
    print(f"medsam3 datalist: {path}: {result.summary()}; every image and mask decodes", file=sys.stderr)
    return 0


def _split_notes(given: set[str], datalist: dict[str, list[dict[str, Any]]], base_dir: str) -> list[str]:
    """What a datalist's splits and items mean for its readers: a list the training bundle needs that is left out,
    an empty validation list, an image in more than one split (validation or test scores on a training image), a
    volume's ``spacing`` (unused), volumes without a modality (min-max scaled)."""
    import os

    from .datalist import SPLITS

    notes = [f"no {split!r} list: the training bundle refuses the datalist without one (write \"{split}\": [] "
             "for none)"
             for split in ("training", "validation") if split not in given]
    if "validation" in given and not datalist["validation"] and datalist["training"]:
        notes.append("the 'validation' list is empty: the training bundle trains without validation (no val_dice, "
                     "no model_best_val_dice.pt)")
    splits_of: dict[str, dict[str, str]] = {}  # image -> its splits, each with the item's own path
    for split in SPLITS:
        for item in datalist[split]:
            image = os.path.normpath(os.path.join(base_dir, item["image"]))
            splits_of.setdefault(image, {}).setdefault(split, item["image"])
    shared: dict[tuple[str, str], list[str]] = {}  # every pair of splits an image is in
    for found in splits_of.values():
        for i, a in enumerate(found):
            for b in list(found)[i + 1:]:
                shared.setdefault((a, b), []).append(found[b])
    notes += [f"{len(images)} image(s) in both {a!r} and {b!r} (e.g. {images[0]}): scores on them are not held-out "
              "scores" for (a, b), images in sorted(shared.items(), key=lambda pair: [SPLITS.index(s) for s in
                                                                                      pair[0]])]
    from ..inferers.inputs import is_volume_path

    spaced = [item["image"] for split in SPLITS for item in datalist[split]
              if "spacing" in item and is_volume_path(item["image"])]
    if spaced:
        notes.append(f"{len(spaced)} volume item(s) carry 'spacing' (e.g. {spaced[0]}), which only 2D items use: a "
                     "volume's spacing is its file's (the affine)")
    from .selection import volumes_without_modality

    unscaled = volumes_without_modality([item for split in SPLITS for item in datalist[split]], base_dir)
    return notes + ([unscaled] if unscaled else [])


#: what a prompt whose label value is in no mask means for training and evaluation
ABSENT_IN_DATALIST = ("prompts are trained only as absent concepts (negative prompts) and their evaluation rows "
                      "only count false positives")


def decode_check(result, skip_bad: bool = False, progress: bool = True, base_dir: str | None = None,
                 skip_hint: str | None = "use --skip-bad to leave unreadable items out") -> list[str]:
    """Decode every item of ``result.datalist`` with the training bundle's ``loading`` chain (load -> decode the
    mask encoding -> intensity). Unreadable items raise :class:`DatalistError` listing each (with ``skip_hint``),
    or with ``skip_bad`` are removed from the datalist and added to ``result.skipped``. Returns notes: per dataset,
    the prompts' label values that no decoded mask holds (what ``medsam3 evaluate`` warns about afterwards)."""
    import os

    from monai.transforms import Compose
    from tqdm import tqdm

    from ..bundle import config_parser
    from ..distinct import distinct_values
    from ..engines.reports import absent_label_warnings
    from ..inferers.inputs import user_error
    from ..tensors import plain_tensor
    from ..transforms.io import check_gzip_stream
    from ..transforms.labels import parse_prompts, soft_edge_pixels
    from .datalist import SPLITS
    from .pairs import DatalistError, Problem

    loading = Compose(config_parser("train.json").get_parsed_content("loading"))

    def absolute(value: str) -> str:
        return value if base_dir is None or os.path.isabs(value) else os.path.join(base_dir, value)

    def labels_of(item: dict[str, Any]) -> list[str]:
        return item["label"] if isinstance(item["label"], list) else [item["label"]]

    entries = [(split, item) for split in SPLITS for item in result.datalist[split]]
    bad: list[tuple[str, dict, Problem]] = []
    presence: list[dict[str, Any]] = []  # per item and prompt, whether its mask holds the label value
    soft: list[tuple[str, tuple[int, int]]] = []  # binary masks with a soft edge: (path, (pixels > 0, > 127))
    for split, item in tqdm(entries, desc="decoding", unit="item", disable=not progress, file=sys.stderr):
        label = item["label"]
        resolved = {**item, "image": absolute(item["image"]),
                    "label": [absolute(p) for p in label] if isinstance(label, list) else absolute(label)}
        try:
            for path in {resolved["image"], *labels_of(resolved)}:
                check_gzip_stream(path)  # the readers stop before a gzip file's own check at its end
            loaded = loading(resolved)
            if item.get("mask_encoding") == "binary":  # (auto refuses a soft edge; binary takes it as the mask)
                soft += [(path, pixels) for path in labels_of(resolved)
                         if (pixels := soft_edge_pixels(path)) is not None]
            present = {int(v) for v in distinct_values(plain_tensor(loaded["label"]).numpy())}
            presence += [{"dataset": item.get("dataset", ""), "case": resolved["image"], "label": value,
                          "prompt": text, "empty_truth": value not in present}
                         for value, text in parse_prompts(item.get("prompts"), resolved["image"]).items()]
        except (RuntimeError, ValueError, FileNotFoundError) as err:
            cause = user_error(err) if isinstance(err, RuntimeError) else err
            if cause is None:
                raise
            where, _, why = str(cause).partition(": ")  # our DataError names the file first
            files = {resolved["image"], *labels_of(resolved)}
            problem = Problem(Path(where), why) if why and where in files else Problem(
                Path(resolved["image"]), str(cause))
            bad.append((split, item, problem))
    if bad and not skip_bad:
        hint = f" ({skip_hint})" if skip_hint else ""
        if len(bad) == 1:
            raise DatalistError(f"{bad[0][2]}{hint}")
        listed = "\n  ".join(str(problem) for _, _, problem in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more (--skip-bad lists every one)" if len(bad) > 20 else ""
        raise DatalistError(f"{len(bad)} items cannot be decoded{hint}:\n  {listed}{more}")
    for split, item, problem in bad:
        result.datalist[split].remove(item)
        result.skipped.append(problem)
    return soft_edge_notes(soft) + absent_label_warnings(presence, ABSENT_IN_DATALIST, where="mask", cases="item(s)")


def soft_edge_notes(soft: Sequence[tuple[str, tuple[int, int]]]) -> list[str]:
    """A note on the binary masks whose edge is soft (anti-aliased or resized): ``"mask_encoding": "binary"``
    takes every pixel above 0 as the mask, their soft edge too."""
    if not soft:
        return []
    path, (above_zero, above_middle) = soft[0]
    more = 100 * (above_zero - above_middle) / max(above_middle, 1)
    return [f"{len(soft)} binary mask(s) have a soft (anti-aliased or resized) edge, e.g. {path}: \"mask_encoding\": "
            f"\"binary\" takes every pixel above 0 as the mask, the soft edge too ({above_zero} pixels, "
            f"{above_middle} above 127, {more:.1f} % more); if the edge is "
            "not part of the structure, binarise those masks at 127 and save them again"]


def datalist_command(argv: Sequence[str] | None = None) -> int:
    """Run ``datalist`` stand-alone: errors print one line to stderr and return 2."""
    from .catalogue import CatalogueError
    from .pairs import DatalistError

    parser = argparse.ArgumentParser(prog="medsam3")
    add_datalist_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["datalist", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_datalist(args)
    except (DatalistError, CatalogueError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"medsam3 datalist: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(datalist_command())
