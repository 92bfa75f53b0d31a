"""Turn a dataset folder into a MONAI decathlon-style datalist with the 85/15 split.

Item schema (``datasets_meta/schema/datalist.schema.json``)::

    {"image": path, "label": path | [path, ...], "dataset": name, "modality": m,
     "prompts": {"<label value>": "<concept>"}, "instance_rule": rule | {"<label value>": rule},
     "mask_encoding": "binary" | "label_map" | "instance_map" | "outline", "case": id}

Paths are absolute by default; with ``relative_to`` they are POSIX paths relative to that folder; read them
back with :func:`load_datalist` (``base_dir`` = that folder). ``monai.data.load_decathlon_datalist`` also
works but prefixes *any* string value that names an existing file or folder under ``base_dir`` (e.g.
``"dataset": "BUSI"`` when ``base_dir/BUSI`` exists), so prefer :func:`load_datalist`. A list of labels means
several masks of one image, merged by union. Splits: pairs of an official test split, and every pair of an external
dataset, go to ``test``; the rest is split 85/15 per dataset by :func:`~medsam3_monai.data.splits.split_items`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .catalogue import Catalogue, DatasetEntry, load_catalogue, load_schema, normalise_name
from .checks import is_nifti, spatial_shape, unknown_label_values
from .converters import resolve
from .pairs import Conversion, DatalistError, Pair, Problem
from .schemas import validate
from .splits import split_items

__all__ = ["DatalistResult", "build_datalist", "check_datalist_out", "items_of_split", "load_datalist",
           "read_datalist_json", "readers_schema", "write_datalist"]

SPLITS = ("training", "validation", "test")
_MAX_LISTED = 20


@dataclass
class DatalistResult:
    """The datalist plus what was left out: ``skipped`` (bad input, only with ``skip_bad``) and
    ``unlabelled`` (published without labels); both are reported by the CLI."""

    datalist: dict[str, list[dict[str, Any]]]
    converter: str
    skipped: list[Problem] = field(default_factory=list)
    unlabelled: list[Problem] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {split: len(self.datalist[split]) for split in SPLITS}

    def summary(self) -> str:
        counts = self.counts()
        text = ", ".join(f"{split} {n}" for split, n in counts.items())
        lines = [f"{sum(counts.values())} items ({text})"]
        parts = (("unlabelled (left out by design)", self.unlabelled), ("skipped (bad input)", self.skipped))
        for what, problems in parts:
            if problems:
                lines.append(f"{len(problems)} {what}:")
                lines.extend(f"  {p}" for p in problems[:_MAX_LISTED])
                if len(problems) > _MAX_LISTED:
                    lines.append(f"  ... and {len(problems) - _MAX_LISTED} more")
        return "\n".join(lines)


def _pair_problems(pair: Pair, entry: DatasetEntry, check_values: bool, channel: int | None = None
                   ) -> list[Problem]:
    """Header size check of image vs every mask; the image's channels against ``channel`` (``--channel``, when
    given: the loader's rule, :func:`~medsam3_monai.transforms.io.check_channel`); label values of label maps
    against the catalogue."""
    try:
        shape = spatial_shape(pair.image)
    except Exception as err:  # noqa: BLE001 - any reader failure is reported with the file name
        return [Problem(pair.image, f"cannot read image header ({err})")]
    problems = []
    if channel is not None:
        problems += _channel_problems(pair.image, channel)
    for label in pair.labels:
        try:
            label_shape = spatial_shape(label)
        except Exception as err:  # noqa: BLE001
            problems.append(Problem(label, f"cannot read mask header ({err})"))
            continue
        if label_shape != shape and not _transposed_on_grid(pair.image, label):
            from ..transforms.io import _turned_mask_hint  # (PIL only; the EXIF turn a stored-orientation mask misses)

            hint = _turned_mask_hint(pair.image, label_shape, shape)
            problems.append(Problem(label, f"mask size {label_shape} differs from image {pair.image.name} {shape}"
                                           + (f": {hint}" if hint else "")))
        elif check_values and entry.mask_encoding == "label_map":
            try:
                unknown = unknown_label_values(label, entry.labels)
            except ValueError as err:
                problems.append(Problem(label, str(err)))
                continue
            if unknown:
                problems.append(Problem(
                    label, f"label value(s) {unknown} are not in the catalogue entry {entry.name} "
                    f"(known: {', '.join(sorted(entry.labels, key=int))})"
                ))
    return problems


def _transposed_on_grid(image: Path, label: Path) -> bool:
    """Whether a NIfTI mask of another array shape lies on its image's own world grid with its axes in another order
    (the loader transposes it onto the image: :func:`~medsam3_monai.transforms.io.grid_order`), from the headers."""
    if not (is_nifti(image) and is_nifti(label)):
        return False
    import nibabel as nib

    from ..transforms.io import grid_order

    ours, theirs = nib.load(str(image)), nib.load(str(label))
    return grid_order(ours.affine, ours.shape[:3], theirs.affine, theirs.shape[:3]) is not None


def _channel_problems(image: Path, channel: int) -> list[Problem]:
    """``--channel`` against one image's header (the loader's rule; NIfTI volumes, other formats at loading)."""
    from ..transforms.errors import ChannelError  # (here: converting without --channel imports no torch)
    from ..transforms.io import check_channel, nifti_channels

    header = nifti_channels(image)
    try:
        if header is not None:
            check_channel(image, True, header[0], channel, header[1])
    except ChannelError as err:
        return [Problem(image, f"{err.problem} (--channel {channel} was given for every item)")]
    return []


def _format(path: Path, relative_to: Path | None) -> str:
    absolute = os.path.abspath(path)
    return Path(os.path.relpath(absolute, relative_to)).as_posix() if relative_to else absolute


def _item(pair: Pair, entry: DatasetEntry, relative_to: Path | None, channel: int | None = None) -> dict[str, Any]:
    labels = [_format(p, relative_to) for p in pair.labels]
    item = {
        "image": _format(pair.image, relative_to),
        "label": labels[0] if len(labels) == 1 else labels,
        "dataset": entry.name,
        "modality": entry.modality,
        "prompts": dict(entry.labels),
        "instance_rule": entry.item_instance_rule(),
        "mask_encoding": entry.mask_encoding,
        "case": pair.case,
    }
    if channel is not None:
        item["channel"] = channel
    return item


def _check_channel(channels: Mapping[int, str], channel: int | None, root: Path) -> None:
    """A channel is chosen exactly when the images have several (and it is one of them)."""
    named = ", ".join(f"{index} {name}".strip() for index, name in sorted(channels.items()))
    if channels and channel is None:
        raise DatalistError(f"{root}: the images have {len(channels)} channels ({named}): choose the one to segment "
                            "with --channel N (in Python: channel=N); every item then says so ('channel')")
    if channel is not None and not channels:
        raise DatalistError(f"{root}: --channel {channel} given, but these images have no channels to choose from "
                            "(--channel picks one modality / time point of 4D volumes such as MSD's, not a colour "
                            "channel): leave it out")
    if channel is not None and channel not in channels:
        raise DatalistError(f"{root}: channel {channel} is not one of the images' channels ({named})")


def _entries(pairs: Iterable[Pair], catalogue: Catalogue) -> dict[str, DatasetEntry]:
    entries = {}
    for pair in pairs:
        if pair.dataset not in entries:
            entry = catalogue.get(pair.dataset)
            if not entry.labels or entry.mask_encoding is None:
                raise DatalistError(f"catalogue entry {entry.name} has no verified labels/mask encoding")
            entries[pair.dataset] = entry
    return entries


def _check_root(root: Path, layout: str) -> None:
    if not root.exists():
        raise DatalistError(f"{root}: dataset folder not found")
    if not root.is_dir():
        raise DatalistError(f"{root}: not a folder (ROOT is the dataset folder)")
    if not any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise DatalistError(f"{root}: dataset folder is empty. Expected {layout}")


def build_datalist(
    name: str,
    root: Path | str,
    *,
    catalogue: Catalogue | None = None,
    val_fraction: float = 0.15,
    seed: int = 42,
    skip_bad: bool = False,
    check_values: bool = True,
    relative_to: Path | str | None = None,
    channel: int | None = None,
    bad_hint: str = "use --skip-bad to leave these files out",
) -> DatalistResult:
    """Read ``root`` with the converter named (or implied) by ``name`` and build the datalist.

    Bad input (image without mask, mask without image, mask size different from the image, label value not in
    the catalogue) raises :class:`DatalistError` listing every problem, unless ``skip_bad``: then the pairs are
    left out and listed in ``result.skipped``. ``check_values`` reads every label map to compare its values
    with the catalogue (turn off for very large 3D datasets). ``channel`` picks the channel of multi-channel (4D)
    images that every item segments (written as its ``channel``); such a dataset (MSD BrainTumour, Prostate)
    needs one. ``bad_hint`` is what the error of bad input advises.
    """
    catalogue = catalogue or load_catalogue()
    root = Path(root)
    converter, entry = resolve(name, catalogue)
    _check_root(root, converter.summary)
    try:
        converted = converter.convert(root, entry, catalogue)
    except DatalistError as err:
        raise DatalistError(f"{err}{_layout_one_level_down(root, converter, entry, catalogue)}") from None
    conversion: Conversion = _as_entry(converted, entry, converter.name,
                                       every_dataset=normalise_name(name) == normalise_name(converter.name))
    _check_channel(conversion.channels, channel, root)
    entries = _entries(conversion.pairs, catalogue)
    problems = list(conversion.problems)
    good: list[Pair] = []
    for pair in conversion.pairs:
        found = _pair_problems(pair, entries[pair.dataset], check_values, channel)
        problems.extend(found)
        if not found:
            good.append(pair)
    if problems and not skip_bad:
        listed = "\n  ".join(str(p) for p in problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        every = (f"\nNo image/mask pair of {root} is usable as {converter.name}'s: is it another dataset? "
                 f"{_CATALOGUE_HINT}" if not good else "")
        raise DatalistError(
            f"{root}: {len(problems)} problem(s) in the {converter.name} layout ({bad_hint}):\n  {listed}{more}{every}"
        )
    if not good:
        found = ""
        if (Path(root) / "images").is_dir() and (Path(root) / "masks").is_dir():
            found = (f"; {root} has images/ and masks/, but no image there has its mask named as {converter.name}'s "
                     f"are: is it another dataset? {_CATALOGUE_HINT}")
        found = found or _layout_one_level_down(root, converter, entry, catalogue)
        raise DatalistError(f"{root}: no usable image/mask pairs found. Expected {converter.summary}{found}")
    relative = Path(os.path.abspath(relative_to)) if relative_to else None
    datalist: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for dataset, entry in sorted(entries.items()):
        parts = _split([p for p in good if p.dataset == dataset], entry, val_fraction, seed, root)
        for split, chosen in zip(SPLITS, parts):
            datalist[split].extend(_item(p, entry, relative, channel) for p in chosen)
    validate(datalist, load_schema("datalist", catalogue.root), "datalist")
    return DatalistResult(datalist, converter.name, problems if skip_bad else [], list(conversion.unlabelled))


def _layout_one_level_down(root: Path, converter: Any, entry: Any, catalogue: Catalogue) -> str:
    """The hint for an error about ``root`` when the folder inside it holds the converter's layout (an archive
    unpacked into a folder of its own: ``archive/Dataset_BUSI_with_GT``): ``root``'s only folder, or one named as
    the dataset; "" when none does (a folder of several datasets is not searched: another's layout may convert)."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX")))
    names = {normalise_name(n) for n in (converter.name, *((entry.name, *entry.aliases) if entry else ()))}
    if len(folders) > 1:
        folders = [folder for folder in folders if normalise_name(folder.name) in names]
    for folder in folders:
        try:
            if converter.convert(folder, entry, catalogue).pairs:
                return (f"\n{folder} holds that layout (an archive unpacked into a folder of its own): give that "
                        f"folder instead of {root}")
        except (DatalistError, OSError, ValueError):
            continue
    return ""


#: where the catalogue's datasets and their layouts are named
_CATALOGUE_HINT = "(`medsam3 datalist --list` names the catalogue's datasets and their layouts)"


def _as_entry(conversion: Conversion, entry: DatasetEntry | None, converter: str,
              every_dataset: bool = False) -> Conversion:
    """The pairs of the catalogue entry the user named: an entry of one's own that reuses another dataset's converter
    (its labels, prompts and instance rule over the same folder layout) gets the pairs that converter names after
    its own dataset; one that read several datasets, the entry among them, gives the entry's pairs alone
    (``TotalSegmentator_MRI``: the MR example, not the CT one beside it), unless ``every_dataset`` (the converter
    itself was named: ``TotalSegmentator_example_CT_MR``). A converter that read several datasets, none of them the
    entry, is an error."""
    produced = {pair.dataset for pair in conversion.pairs}
    if entry is None or not produced or (every_dataset and entry.name in produced):
        return conversion
    if entry.name in produced:
        conversion.pairs = [pair for pair in conversion.pairs if pair.dataset == entry.name]
        return conversion
    if len(produced) > 1:
        raise DatalistError(f"{entry.name} reads its folder with the {converter} converter, which found the datasets "
                            f"{sorted(produced)} there, not {entry.name}: name one of them, or give {entry.name} a "
                            "converter of one dataset")
    conversion.pairs = [replace(pair, dataset=entry.name) for pair in conversion.pairs]
    return conversion


def _split(
    pairs: list[Pair], entry: DatasetEntry, val_fraction: float, seed: int, root: Path
) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(training, validation, test) of one dataset: official test and external pairs -> test, rest 85/15."""
    cases = [p.case for p in pairs]
    if len(set(cases)) != len(cases):
        duplicate = next(c for c in cases if cases.count(c) > 1)
        raise DatalistError(f"{root}: case {duplicate!r} occurs twice in {entry.name}")
    is_test = [entry.role == "external" or p.split == "test" for p in pairs]
    pool = [p for p, held_out in zip(pairs, is_test) if not held_out]
    test = sorted((p for p, held_out in zip(pairs, is_test) if held_out), key=lambda p: p.case)
    training, validation = split_items(pool, val_fraction, seed, key=lambda p: p.case, stratify=lambda p: p.group)
    return training, validation, test


def check_datalist_out(out: Path, overwrite: bool) -> None:
    """Refuse a datalist file to write that is a folder, or exists without ``overwrite``."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give the datalist's file name, e.g. {out / 'datalist.json'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")


def write_datalist(datalist: dict[str, Any], out: Path | str, overwrite: bool = False) -> Path:
    """Write ``datalist`` as JSON atomically (a temporary file renamed into place: never a partial file)."""
    out = Path(out)
    check_datalist_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as stream:
            json.dump(datalist, stream, indent=2, ensure_ascii=False)
            stream.write("\n")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def read_datalist_json(path: Path | str) -> Any:
    """The parsed content of a datalist file (what every reader of datalists starts from); FileNotFoundError when
    it is missing, DatalistError when it is not JSON."""
    if Path(path).is_dir():
        raise DatalistError(f"datalist {path} is a folder: give the datalist's JSON file (make one from a dataset "
                            "folder with `medsam3 datalist NAME ROOT --out FILE`)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"datalist {path} not found (make one with `medsam3 datalist NAME ROOT --out FILE`)")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))  # a byte-order mark (Notepad's) is no error
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatalistError(f"datalist {path} is not valid JSON: {err}") from None


#: what every reader needs of an item; the rest of what `medsam3 datalist` writes has a default when left out
READER_REQUIRED = ("image", "label", "prompts")


def readers_schema() -> dict[str, Any]:
    """The datalist schema as the readers (training, ``evaluate``, ``segment --datalist``) take a datalist: what
    ``medsam3 datalist`` writes (``datasets_meta/schema/datalist.schema.json``) with only :data:`READER_REQUIRED`
    required (``dataset``: the file's name, ``modality``: decided by the channels, ``instance_rule`` /
    ``mask_encoding``: read from the mask, ``case``: the image's file name), ``modality`` in any spelling (checked
    by :func:`modality_problems`), and the keys the readers take that no converter writes: a 2D item's
    ``spacing`` (``[rows_mm, cols_mm]``, for NSD / HD95) and ``group`` (the table's group)."""
    schema = load_schema("datalist")
    item = schema["$defs"]["item"]
    item["required"] = list(READER_REQUIRED)
    item["properties"]["modality"] = {"type": "string", "minLength": 1}
    item["properties"]["spacing"] = {"type": "array", "minItems": 2, "maxItems": 2,
                                     "items": {"type": "number", "exclusiveMinimum": 0}}
    item["properties"]["group"] = {"type": "string", "minLength": 1}
    schema["required"] = []
    return schema


def modality_problems(datalist: Mapping[str, Any]) -> list[str]:
    """``$.split[i].modality: ...`` for each item whose modality the intensity step does not know (spelling aside:
    ``Endoscopy`` = ``endoscopy``, ``XRay`` = ``X-ray``)."""
    from ..transforms.intensity import MODALITY_HANDLERS, handler_for_modality

    problems = []
    for split in SPLITS:
        for number, item in enumerate(datalist.get(split) or []):
            modality = item.get("modality") if isinstance(item, Mapping) else None
            if isinstance(modality, str):
                try:
                    handler_for_modality(modality)
                except KeyError:
                    problems.append(f"$.{split}[{number}].modality: {modality!r} is not a modality the intensity "
                                    f"step knows (any spelling of: {', '.join(sorted(MODALITY_HANDLERS))})")
    return problems


def load_datalist(
    path: Path | str, split: str = "training", base_dir: Path | str | None = None
) -> list[dict[str, Any]]:
    """Items of one split with relative ``image``/``label`` paths joined to ``base_dir`` (default: the
    datalist's folder); every other field is returned unchanged."""
    datalist = read_datalist_json(path)
    if not isinstance(datalist, dict):
        raise DatalistError(f"{path}: a datalist is an object of lists ('training', 'validation', 'test'), not a "
                            f"{type(datalist).__name__}; make one with `medsam3 datalist`")
    return items_of_split(datalist, path, split, base_dir)


def items_of_split(datalist: Mapping[str, Any], path: Path | str, split: str, base_dir: Path | str | None = None
                   ) -> list[dict[str, Any]]:
    """:func:`load_datalist` on the already parsed ``datalist`` of the file ``path``: each item of ``split`` checked
    (an object with ``image`` and ``label`` paths), its relative paths joined to ``base_dir`` (default: ``path``'s
    folder)."""
    path = Path(path)
    if split not in datalist:
        empty = (" (add \"validation\": [] to train without validation)" if split == "validation"
                 else f" (add \"{split}\": [] for none)")
        raise DatalistError(f"{path}: no {split!r} list (has {', '.join(datalist)}){empty}")
    if not isinstance(datalist[split], list):
        raise DatalistError(f"{path}: {split!r} must be a list of items, not a {type(datalist[split]).__name__}")
    base = Path(base_dir) if base_dir is not None else path.parent

    def join(value: str) -> str:
        return value if os.path.isabs(value) else os.path.normpath(base / value)

    items = []
    for number, item in enumerate(datalist[split], start=1):
        where = f"{path}: {split} item {number}"
        if not isinstance(item, dict):
            raise DatalistError(f"{where} is {item!r}, not an object with 'image' and 'label' paths")
        item = dict(item)
        check_misspelt_keys(item, where)
        for key in ("image", "label"):
            value = item.get(key)
            paths = value if isinstance(value, list) else [value]
            if value is None:
                raise DatalistError(f"{where} has no '{key}' path")
            if not paths or not all(isinstance(p, str) and p for p in paths):
                raise DatalistError(f"{where}: '{key}' must be a file path (or, for 'label', a list of them), got "
                                    f"{value!r}")
        if not item.get("prompts") and not isinstance(item.get("prompts"), (str, list)):
            raise DatalistError(f"{where} ({item['image']}) has no 'prompts': give its label value -> text object, "
                                'e.g. {"1": "polyp"} (a catalogued dataset\'s from datasets_meta, as medsam3 datalist '
                                "writes it)")
        if "prompts" in item and not isinstance(item["prompts"], Mapping):
            raise DatalistError(f"{where}: 'prompts' is a {type(item['prompts']).__name__}, not an object of label "
                                'value -> text: write it as {"1": "polyp"} (one entry per label value)')
        keys = [key for key in item.get("prompts", {}) if not str(key).strip().isdigit() or int(key) < 1]
        if keys:
            raise DatalistError(f"{where}: 'prompts' keys {keys} are not label values: the keys are the mask's "
                                'label values (1, 2, ...) and the values their texts, e.g. {"1": "polyp"}')
        check_prompt_texts(item.get("prompts", {}), where)
        item["image"] = join(item["image"])
        label = item["label"]
        item["label"] = [join(p) for p in label] if isinstance(label, list) else join(label)
        items.append(item)
    return items


@functools.lru_cache(maxsize=1)
def _item_keys() -> tuple[str, ...]:
    return tuple(sorted(readers_schema()["$defs"]["item"]["properties"]))


def check_misspelt_keys(item: Mapping[str, Any], where: str) -> None:
    """DatalistError for an item key that is a misspelling of one the readers take and the item lacks (``modalty``
    without ``modality``: the item would be read without its modality, e.g. an MRI min-max scaled instead of
    clipped at its percentiles). Other keys of a user's own are left alone here (``label2`` beside ``label``;
    ``medsam3 datalist --check`` refuses every key the schema does not name)."""
    import difflib

    known = _item_keys()
    for key in item:
        if key in known or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key.lower(), known, n=1, cutoff=0.85)
        if close and close[0] not in item:  # beside the real key ('label2' next to 'label'): a key of the user's
            raise DatalistError(f"{where}: key {key!r} is not one the readers take; did you mean {close[0]!r}? (as "
                                f"written, the item is read without its {close[0]!r})")


def check_prompt_texts(prompts: Mapping[Any, Any], where: str) -> None:
    """DatalistError naming ``where`` (the datalist and item) when a prompt of ``prompts`` has no concept text (empty,
    blank or not a string), is longer than SAM3's 32 tokens, or reads as another label's concept (the same token ids:
    "Liver" and "liver", "polyp." and "polyp ."; evaluation would leave the second label empty, training would teach
    one text two masks)."""
    texts = {key: text for key, text in prompts.items() if not isinstance(text, str) or not text.strip()}
    if texts:
        raise DatalistError(f"{where}: 'prompts' {texts} give no concept text: each label value needs a text, "
                            'e.g. {"1": "polyp"}')
    from ..networks.tokenizer import CONTEXT_LENGTH, prompt_reading, repeated_reading

    for key, text in prompts.items():  # refused here, not when the network first reads it (hours into a training)
        tokens = len(prompt_reading(text))
        if tokens > CONTEXT_LENGTH:
            raise DatalistError(f"{where}: prompt {key} {text[:60]!r} is {tokens} tokens; SAM3 reads at most "
                                f"{CONTEXT_LENGTH} (start and end included): shorten it to a concept phrase")
    repeated = repeated_reading(list(prompts.values()))
    if repeated is not None:
        first, key = (list(prompts)[index] for index in repeated)
        raise DatalistError(f"{where}: labels {first} ({prompts[first]!r}) and {key} ({prompts[key]!r}) have one "
                            f"concept as SAM3 reads it (the same tokens): evaluation would leave label {key} empty and "
                            "training would teach one text two masks; give each label its own concept, or merge the "
                            "two labels")


def load_datalists(paths: str | Path | Sequence[str | Path], split: str = "training", check_files: bool = True
                   ) -> list[dict[str, Any]]:
    """Items of ``split`` from one or several datalist files (a multi-dataset mix), in the given order; with
    ``check_files`` a file that is not there is refused naming its datalist (:func:`check_files_exist`)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    items: list[dict[str, Any]] = []
    for path in paths:
        found = load_datalist(path, split)
        if check_files:
            check_files_exist(found, f"datalist {path} ({split})")
        items.extend(found)
    _warn_repeated_images(items, paths, split)
    return items


def _warn_repeated_images(items: Sequence[Mapping[str, Any]], paths: Sequence[str | Path], split: str) -> None:
    """Warn when an image is in more than one of ``items`` (a datalist given twice, or an image in two datalists):
    each copy counts, as oversampling in training."""
    from collections import Counter

    repeated = [image for image, n in Counter(os.path.abspath(str(item["image"])) for item in items).items() if n > 1]
    if not repeated:
        return
    import warnings

    given = Counter(os.path.abspath(str(path)) for path in paths)
    twice = [(path, n) for path, n in given.items() if n > 1]
    why = (f"datalist {twice[0][0]} is given {twice[0][1]} times" if twice else
           "they are in more than one item of the datalists")
    warnings.warn(f"{len(repeated)} {split} image(s) are listed more than once (e.g. {repeated[0]}): {why}, so each "
                  "copy counts (in training, as oversampling)", stacklevel=3)


def check_files_exist(items: Sequence[Mapping[str, Any]], where: str = "the datalist(s)") -> None:
    """Raise ``FileNotFoundError`` listing (up to 10) image and label paths of ``items`` that do not exist."""
    missing = []
    for item in items:
        labels = item.get("label")
        for path in [item.get("image")] + (list(labels) if isinstance(labels, list) else [labels]):
            if path is None or not Path(path).exists():
                missing.append(str(path) if path is not None else f"(no image/label in case {item.get('case')})")
    if missing:
        listed = "\n  ".join(missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise FileNotFoundError(f"{len(missing)} image/label file(s) of {where} not found:\n  {listed}{more}\n"
                                "(relative paths are read from the datalist's own folder; `medsam3 datalist --check "
                                "FILE` checks every item)")


def concept_pool(items: Sequence[dict[str, Any]]) -> list[str]:
    """Sorted distinct prompt texts of ``items``: the pool negative prompts are sampled from."""
    return sorted({text for item in items for text in item.get("prompts", {}).values()})
