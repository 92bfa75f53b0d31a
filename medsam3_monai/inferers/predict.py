"""Prediction on files: an image or a volume + text prompts (+ boxes) -> one label map in the input's own
geometry. Shared by ``medsam3 segment``, the inference bundle (``configs/inference.json``) and a server.

Pipeline (the bundle spells out the same pieces in JSON):

1. :func:`~.inputs.inference_items`: datalist items ``{"image": path, "prompts": ..., "box": ..., "modality": ...}``.
2. the bundle's ``preprocessing`` (``configs/inference.json``, read by :meth:`Predictor.pipeline`): load ->
   intensity by modality -> axial slices (volumes) -> grey to RGB -> resize to S x S -> SAM3 normalisation; a
   case becomes a list of slice items (one for a 2D image).
3. :class:`PromptInferer` (a MONAI ``Inferer``): 2D -> :func:`~.image.segment_image` (protocol
   ``top_query``, ``threshold`` or ``semantic``; optional box prompts); volume -> :func:`~.volume.segment_volume`
   (detector on every slice, tracker propagation from the most confident slice). Every slice item gets
   ``pred``: a 2D image's (P, h, h) mask logits at the mask head's resolution (S / 3.5; S for ``threshold``), a
   volume slice's (P, S, S) bit-packed masks (``bitmasks.BitMasks``, with ``mask_scores``, the slice's score per
   prompt).
4. the bundle's ``postprocessing``, one slice item at a time (``postprocess.MaskLogitsd`` keeps a volume slice's
   present masks, ``Invertd`` or the inverse left to the merge, merge by maximum confidence), then the slices
   restacked -> a (1, *spatial) label map (0 background, the prompts' label values).

Large 2D pictures: the picture stays uint8 at its own size; intensity, resize, inverse and merge run one row
tile at a time (``transforms.TiledResizeToSliced``, ``postprocess.InvertToInputd`` + ``MergePromptsd``), so the
peak memory is about 7-9 bytes per input pixel whatever the size (``scripts/bench_memory.py``); a picture that
would not fit (or is over PIL's decompression-bomb limit) is refused from its header (``max_pixels``).
5. :class:`Predictor` wraps 2-4 for one file and returns a :class:`Prediction`; :func:`predict_file` is the
   one-call form.

Label values: prompt ``c`` (0-based) is label ``c + 1``, or the datalist's own value when ``prompts`` maps
values to texts (``{"1": "anterior hippocampus", "2": "posterior hippocampus"}``). Volumes: a slice's
detection counts when its score >= ``score_threshold``; with a tracker its masks are propagated from the
most confident slice (see :mod:`.volume`); ``protocol`` applies to 2D images only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from ..networks import load_network
from ..networks.tracker import resolve_tracker
from ..protocol_registry import checked_score_threshold, get_protocol
from ..tensors import plain_tensor, voxel_spacing
from ..transforms.errors import DataError, source_name
from ..transforms.intensity import is_volume_slice
from .image import segment_image
from .inputs import _prompt_mapping, box_prompts, input_kind, item_prompts, user_error
from .postprocess import KEPT_PROMPTS, transforms_of
from .tracking import TRACKER_BATCH
from .protocols import MASK_LOGIT

__all__ = [
    "MASK_LOGIT",
    "Prediction",
    "Predictor",
    "PromptInferer",
    "is_volume_case",
    "native_image",
    "predict_file",
]


def is_volume_case(case: Any, image_key: str = "image") -> bool:
    """Whether a preprocessed case (an item or the list of its slice items) is a volume's slices."""
    first = case if isinstance(case, Mapping) else case[0]
    return is_volume_slice(first[image_key])


# ------------------------------------------------------------------------------------------------ inferer
class PromptInferer(Inferer):
    """A case (its slice-space items) + the network -> the same items with per-prompt slice-space maps.

    Every output item gets ``pred`` (P, h, h) mask logits at the mask head's resolution (S / 3.5; S for the
    ``threshold`` protocol, which unites queries at S), resized once, straight to the picture's size, as SAM3's
    ``Sam3Processor`` does (mask = logit > 0; a 2D image's stay on the network's device: its way back to the
    picture's size, ``MergePromptsd``, runs there) and the case's ``prompt_values``,
    ``prompt_texts``, ``prompt_scores`` (P,) and ``protocol``. A volume slice's ``pred`` is its (P, S, S) masks
    instead, a view of the volume's :class:`~.bitmasks.BitMasks` (1 bit a pixel; a volume's float maps would take
    8 bytes a pixel for every prompt and slice), with ``mask_scores`` (P,) the slice's score per prompt:
    they stand for mask logits and a ``confidence``, the mask times that score, which the way back resizes one
    slice at a time (``postprocess.MaskLogitsd``, ``MergePromptsd``; 2D confidence, score x sigmoid(logit), is
    computed after the inversion by ``MergePromptsd``).
    Volume items also carry ``slice_scores`` (P, D) and ``seed_slices`` (P,).

    Args:
        protocol: 2D protocol (``top_query``, ``threshold``, ``semantic``; see :mod:`.image`).
        score_threshold: the ``threshold`` protocol's query score, and the volume path's detection score.
        tracker: SAM3 tracker for volumes (``networks.tracker.resolve_tracker``); None = detector only.
        tracker_name: how the tracker is described in the outputs.
        volume_batch_size: slices per detector call.
        tracker_batch: prompts of a volume propagated together by the tracker (:mod:`.tracking`; 1: one at a time).
        progress: progress bars for volumes.

    An item's ``box`` (pixels, see :func:`box_prompts`) adds box prompts on 2D images; on a volume it is an
    error (the volume path takes text prompts only). An item's ``protocol`` and ``score_threshold`` replace the
    inferer's for that case (a server's request chooses its own); every output item records the threshold it ran
    with as ``score_threshold``.
    """

    def __init__(self, protocol: str = "top_query", score_threshold: float = 0.5, tracker: Any = None,
                 tracker_name: str | None = None, volume_batch_size: int = 8, progress: bool = False,
                 image_key: str = "image", tracker_batch: int = TRACKER_BATCH) -> None:
        super().__init__()
        self.protocol = get_protocol(protocol).name
        self.score_threshold = checked_score_threshold(score_threshold)
        if tracker is not None and not isinstance(tracker, torch.nn.Module):
            raise ValueError(f"tracker must be a loaded tracker model or None, not {tracker!r}: choose it by name with "
                             "networks.tracker.resolve_tracker (the bundles' --tracker_source auto|none|tiny|FOLDER|"
                             "sam3.pt; their --tracker replaces the loaded model)")
        self.tracker = tracker
        self.tracker_name = tracker_name or ("none" if tracker is None else type(tracker).__name__)
        self.volume_batch_size = int(volume_batch_size)
        if int(tracker_batch) < 1:
            raise ValueError(f"tracker_batch (prompts the tracker propagates together) must be >= 1, got "
                             f"{tracker_batch}: give 1 for one at a time, or more")
        self.tracker_batch = int(tracker_batch)
        self.progress = progress
        self.image_key = image_key

    def __call__(self, inputs: Any, network: torch.nn.Module, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        items, path, values, prompts = self._case(inputs)
        device = next(network.parameters()).device
        threshold = self.threshold_of(items[0])
        if is_volume_case(items, self.image_key):
            case = self._volume(items, prompts, network, path, threshold)
        else:
            case = self._image(items[0], prompts, network, device, threshold)
        case.update(prompt_values=values, prompt_texts=prompts, score_threshold=threshold)
        for item in items:
            item.update(case)
        return items

    def _case(self, inputs: Any) -> tuple[list[dict[str, Any]], str | None, list[int], list[str]]:
        items = [dict(inputs)] if isinstance(inputs, Mapping) else [dict(item) for item in inputs]
        if not items:
            raise ValueError("PromptInferer got a case without slice items")
        first = items[0]
        path = source_name(first[self.image_key], first, self.image_key)
        values, prompts = item_prompts(first, path)
        return items, path, values, prompts

    def threshold_of(self, item: Mapping[str, Any]) -> float:
        """The score threshold of the case whose first slice item is ``item``: its own ``score_threshold``, else the
        inferer's."""
        own = item.get("score_threshold")
        if own is None:
            return self.score_threshold
        where = source_name(item.get(self.image_key), item, self.image_key)
        return checked_score_threshold(own, f"{where}: score_threshold" if where else "score_threshold")

    def infer_cases(self, cases: Sequence[Any], network: torch.nn.Module,
                    images: torch.Tensor | None = None) -> list[list[dict[str, Any]]]:
        """Several cases at once (what an engine iteration over a batch of cases calls): the 2D cases go through
        the network together, several images per forward (:func:`~.batch.segment_image_batch`: each image with
        its own prompts, text features from the network's per-prompt cache), volumes one at a time as
        :meth:`__call__` does (as do 2D cases with a score threshold of their own other than the inferer's).
        Returns the cases in order, each as :meth:`__call__` returns it; the 2D masks
        are those of one-by-one calls (the same forward per image, batched).

        ``images``: the 2D cases' slice-space images already stacked (N2D, 3, S, S) in case order, e.g. by
        :func:`~.batch.collate_case_batch` in a DataLoader worker (pinned for an asynchronous copy); stacked
        here when None.
        """
        from .batch import segment_image_batch

        outputs: list[list[dict[str, Any]] | None] = [None] * len(cases)
        flat: list[tuple[int, list[dict[str, Any]], list[int], list[str]]] = []
        rows: list[int] = []  # each batched case's row among the 2D cases (``images``)
        two_d = 0
        for index, case in enumerate(cases):
            if is_volume_case(case, self.image_key):
                outputs[index] = self(case, network)
                continue
            two_d += 1
            if self.threshold_of(case if isinstance(case, Mapping) else case[0]) != self.score_threshold:
                outputs[index] = self(case, network)  # a threshold of its own: its own forward
            else:
                items, _path, values, prompts = self._case(case)
                flat.append((index, items, values, prompts))
                rows.append(two_d - 1)
        if images is not None and images.shape[0] != two_d:
            raise ValueError(f"{images.shape[0]} stacked images for {two_d} 2D cases")
        if flat:
            device = next(network.parameters()).device
            if images is None:
                images = torch.stack([plain_tensor(items[0][self.image_key]) for _, items, _, _ in flat])
            elif len(rows) != two_d:
                images = images[rows]
            protocols, boxes = [], []
            for _, items, _, prompts in flat:
                first = items[0]
                protocols.append(get_protocol(first.get("protocol") or self.protocol).name)
                box = first.get("box")
                boxes.append(None if box is None else
                             box_prompts(box, len(prompts), first[self.image_key].meta["spatial_shape"]))
            segs = segment_image_batch(network, images.to(device, non_blocking=True), [f[3] for f in flat],
                                       protocols=protocols, score_threshold=self.score_threshold, boxes=boxes,
                                       logits_on_device=True, at_mask_size=True)
            for (index, items, values, prompts), seg, protocol, box in zip(flat, segs, protocols, boxes):
                _set_prediction(items[0], seg)
                case = {"prompt_scores": seg.scores.float(), "protocol": protocol + ("+box" if box is not None else ""),
                        "prompt_values": values, "prompt_texts": prompts, "score_threshold": self.score_threshold}
                for item in items:
                    item.update(case)
                outputs[index] = items
        return outputs  # type: ignore[return-value]

    def _image(self, item: dict[str, Any], prompts: list[str], network: torch.nn.Module,
               device: torch.device, threshold: float) -> dict[str, Any]:
        image = item[self.image_key]
        protocol = get_protocol(item.get("protocol") or self.protocol).name  # a request may choose its own
        box = item.get("box")
        boxes = None if box is None else box_prompts(box, len(prompts), image.meta["spatial_shape"])
        seg = segment_image(network, plain_tensor(image).to(device), prompts, protocol=protocol,
                            score_threshold=threshold, boxes=None if boxes is None else boxes[0],
                            box_labels=None if boxes is None else boxes[1], logits_on_device=True, at_mask_size=True)
        _set_prediction(item, seg)
        return {"prompt_scores": seg.scores.float(), "protocol": protocol + ("+box" if boxes is not None else "")}

    def _volume(self, items: list[dict[str, Any]], prompts: list[str], network: torch.nn.Module,
                path: str | None, threshold: float) -> dict[str, Any]:
        from .volume import segment_volume

        if items[0].get("box") is not None:
            raise DataError(path, "box prompts are for 2D images", "segment volumes with text prompts only")
        # on the host: each detector batch crosses to the device as it goes (uint8 levels, normalised there)
        slices = torch.stack([plain_tensor(item[self.image_key]) for item in items])
        result = segment_volume(network, slices, prompts, self.tracker,
                                score_threshold=threshold, batch_size=self.volume_batch_size,
                                progress=self.progress, tracker_batch=self.tracker_batch,
                                pixels_normalized=True)
        for z, item in enumerate(items):  # bit-packed masks (views), one slice at a time in the way back
            item["pred"], item["mask_scores"] = result.bits[:, z], result.scores[:, z].float()
        protocol = f"volume: top_query per slice (score >= {threshold:g}), tracker {self.tracker_name}"
        return {"prompt_scores": result.scores.amax(dim=1).float(), "slice_scores": result.scores.float(),
                "seed_slices": result.seed_slices.long(), "protocol": protocol}


def _set_prediction(item: dict[str, Any], seg: Any) -> None:
    """A 2D case's :class:`~.image.ImageSegmentation` into its item for the way back: ``pred`` its maps (the merge's
    confidence, score x sigmoid(logit), is made after the inversion) and, when they are the kept queries' own maps,
    ``kept_prompts`` the prompt of each (:class:`~.postprocess.MergePromptsd` unites them at the picture's size)."""
    item["pred"] = MetaTensor(seg.logits.float())
    if seg.owners is not None:
        item[KEPT_PROMPTS] = seg.owners.tolist()


# ------------------------------------------------------------------------------------------------ result
@dataclass
class Prediction:
    """One input's prediction in its own geometry.

    Attributes:
        label_map: MetaTensor (H, W) for a 2D image or (X, Y, Z) for a volume (the input's shape and affine),
            uint8: 0 background, ``label_values[c]`` where prompt ``c`` won (overlaps: highest confidence).
        prompts, label_values: the prompt texts and their label values, in prompt order.
        scores: per prompt, the protocol's score (2D) or the best slice score (volumes).
        protocol: how the masks were made (``top_query``, ``threshold+box``, ``volume: ...``).
        is_volume: volume (NIfTI/DICOM) or 2D image.
        affine: 4 x 4 voxel -> world (RAS) matrix; the identity (pixel units) for 2D images.
        source: the input path.
        seed_slices, slice_scores: volumes only, the tracker's seed slice per prompt (-1: none confident)
            and the detector score of every slice (P, D).
        settings: checkpoint, image size, tracker, thresholds and boxes that produced it.
    """

    label_map: torch.Tensor
    prompts: list[str]
    label_values: list[int]
    scores: list[float]
    protocol: str
    is_volume: bool
    affine: torch.Tensor
    source: str
    seed_slices: list[int] | None = None
    slice_scores: torch.Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.label_map.shape)

    @property
    def spacing(self) -> tuple[float, ...] | None:
        """Voxel size in mm per array axis (volumes), None for 2D pictures."""
        if not self.is_volume:
            return None
        return tuple(float(v) for v in voxel_spacing(self.affine))

    def largest_components(self) -> Prediction:
        """This prediction with only the largest connected component of each label (MONAI's
        ``KeepLargestConnectedComponent``: each label on its own, full connectivity: 8 neighbours in 2D, 26 in 3D);
        what MONAI Label's ``largest_cc`` option asks of its SAM2 model."""
        from monai.transforms import KeepLargestConnectedComponent

        labels = plain_tensor(self.label_map)
        keep = KeepLargestConnectedComponent(applied_labels=[int(v) for v in self.label_values], is_onehot=False,
                                             independent=True)
        kept = plain_tensor(keep(labels[None])[0]).to(labels.dtype)
        meta = dict(self.label_map.meta) if isinstance(self.label_map, MetaTensor) else None
        return replace(self, label_map=MetaTensor(kept, meta=meta) if meta is not None else kept)

    def masks(self) -> torch.Tensor:
        """(P, *spatial) bool, each prompt's pixels after the overlap resolution (disjoint)."""
        labels = plain_tensor(self.label_map)
        return torch.stack([labels == int(v) for v in self.label_values])

    def summary(self, label_values: Sequence[int] | None = None) -> dict[str, Any]:
        """JSON-able description: label value -> prompt, score and pixel count; protocol, settings, geometry.

        ``label_values`` renames the values as written (e.g. 255 for a single-prompt PNG mask)."""
        written = list(label_values) if label_values is not None else self.label_values
        labels = plain_tensor(self.label_map)
        counts = [int(torch.count_nonzero(labels == int(v))) for v in self.label_values]  # no int64 copy
        unit = "voxels" if self.is_volume else "pixels"
        labels = {
            str(int(w)): {"prompt": text, "score": round(float(score), 6), unit: int(n)}
            for w, text, score, n in zip(written, self.prompts, self.scores, counts)
        }
        out: dict[str, Any] = {
            "input": self.source,
            "kind": "volume" if self.is_volume else "image",
            "shape": list(self.shape),
            "background": 0,
            "labels": labels,
            "protocol": self.protocol,
            "overlaps": "pixel-wise maximum of score x sigmoid(mask logit)" if len(self.prompts) > 1 else None,
            **self.settings,
        }
        if self.is_volume:
            out["affine"] = [[round(float(v), 6) for v in row] for row in torch.as_tensor(self.affine).tolist()]
            out["spacing"] = [round(v, 6) for v in self.spacing]
            out["spatial_units"] = "mm"  # the affine's and spacing's (a micron input's NIfTI is written in microns)
            out["seed_slices"] = {str(int(w)): int(s) for w, s in zip(written, self.seed_slices or [])}
        return out


def _check_settings(tracker: Any, ct_window: Any = None, resize_kernel: Any = None) -> None:
    """A tracker source that is not there, an unknown CT window or resize kernel fails when a predictor is made, not
    at the first volume (servers start with it); None (the model's own) passes."""
    from ..bundle import check_resize_kernel
    from ..networks.tracker import check_tracker_source
    from ..transforms.intensity import check_ct_window

    if tracker is None or isinstance(tracker, (str, Path)):
        check_tracker_source(tracker)
    if ct_window is not None:
        check_ct_window(ct_window)
    if resize_kernel is not None:
        check_resize_kernel(resize_kernel)


class Predictor:
    """A loaded network (+ tracker) ready to segment files: ``Predictor(...)(path, prompts, box=...)``.

    Args:
        network: a ``MedSAM3Net`` (eval mode; any device).
        tracker: ``auto`` (see ``networks.tracker.resolve_tracker``; built on the first volume), ``none``,
            ``tiny``, an HF folder, or a tracker module.
        checkpoint: the network's source (for ``tracker="auto"``, which finds a tracker in it, and the outputs'
            description); default the network's own (``MedSAM3Net.source``).
        protocol, score_threshold, volume_batch_size, tracker_batch: as :class:`PromptInferer`.
        ct_window: CT window preset or (width, level) for ``modality="CT"``; None: the one the network's model file
            records (its training's, ``MedSAM3Net.trained_preprocessing``), else ``"abdomen"``.
        resize_kernel: the resize to the slice space, the bundles' ``resize_kernel``: ``"sam3"`` (SAM3's image
            processor's) or ``"monai"`` (MONAI's ``Resize``), as the network was trained; None: the one its model file
            records, else ``"sam3"``.
        progress: progress bars (stderr) for volumes and for the tiled passes over large 2D pictures.
        max_pixels: the largest 2D picture to accept, in pixels (it also lifts PIL's decompression-bomb limit);
            ``"auto"``: PIL's limit and what fits in the available memory (``transforms.io.check_picture_size``;
            the ``MEDSAM3_MAX_PIXELS`` environment variable replaces ``"auto"``).

    Attribute ``preprocessing_notes``: a line for each setting given that differs from the one the network's model file
    records (:func:`~.trained_settings.inference_preprocessing`).
    """

    def __init__(self, network: torch.nn.Module, *, tracker: Any = "auto", checkpoint: str | None = None,
                 protocol: str = "top_query", score_threshold: float = 0.5,
                 ct_window: str | Sequence[float] | None = None, progress: bool = False,
                 max_pixels: int | str | None = "auto", volume_batch_size: int = 8,
                 tracker_batch: int = TRACKER_BATCH, resize_kernel: str | None = None) -> None:
        from .trained_settings import inference_preprocessing

        _check_settings(tracker, ct_window, resize_kernel)
        resize_kernel, ct_window, self.preprocessing_notes = inference_preprocessing(network, resize_kernel, ct_window)
        self.network = network.eval()
        self.checkpoint = str(checkpoint if checkpoint is not None else getattr(network, "source", "tiny"))
        self._tracker_spec = tracker
        self._tracker: tuple[Any, str] | None = None
        self._compile_mode: tuple[str | None] | None = None  # (mode,) once compile() was called
        self.ct_window = ct_window
        self.resize_kernel = resize_kernel
        self.progress = bool(progress)
        self.max_pixels = max_pixels
        self.inferer = PromptInferer(protocol, score_threshold, volume_batch_size=volume_batch_size, progress=progress,
                                     tracker_batch=tracker_batch)
        self._pipelines: tuple[Any, Any] | None = None

    def pipeline(self) -> tuple[Any, Any]:
        """(preprocessing, postprocessing) of ``configs/inference.json`` (the inverse needs the very transform
        objects that made the items, so the pair is built once and kept). A 4D input's channel is its item's
        ``channel`` (``LoadMedicalImaged`` reads it)."""
        from ..bundle import config_parser

        if self._pipelines is None:
            parser = config_parser("inference.json", image_size=int(self.network.image_size),
                                   ct_window=self.ct_window, max_pixels=self.max_pixels,
                                   resize_kernel=self.resize_kernel)
            # one parser: the post-processing's Invertd holds the very preprocessing parsed here
            pipelines = (parser.get_parsed_content("preprocessing"), parser.get_parsed_content("to_input_space"))
            for chain in pipelines:  # the tiled 2D steps' progress bars follow the predictor's
                for step in transforms_of(chain):
                    if hasattr(step, "progress"):
                        step.progress = self.progress
            self._pipelines = pipelines
        return self._pipelines

    @classmethod
    def from_checkpoint(cls, checkpoint: str = "tiny", image_size: int | None = None,
                        device: str | torch.device | None = None, detector_chunk: int | None = None,
                        **kwargs: Any) -> Predictor:
        _check_settings(kwargs.get("tracker", "auto"), kwargs.get("ct_window"),
                        kwargs.get("resize_kernel"))  # before the weights load
        return cls(load_network(checkpoint, image_size, device, detector_chunk), checkpoint=checkpoint, **kwargs)

    def compile(self, mode: str | None = None) -> Predictor:
        """``torch.compile`` for a run over many inputs (``medsam3 segment --compile``), in place: the network's
        vision encoder now, a smaller batch padded to the first one's size (``inferers.batch.compile_network``), and
        the tracker's per-slice modules (``inferers.batch.compile_tracker``) once it is built, at the first volume.
        Each compiles at its first use. Returns the predictor."""
        from .batch import compile_network, compile_tracker

        compile_network(self.network, compile=True, mode=mode, pad_batches=True)
        self._compile_mode = (mode,)
        if self._tracker is not None and self._tracker[0] is not None:
            compile_tracker(self._tracker[0], mode)
        return self

    def tracker(self) -> tuple[Any, str]:
        """(tracker, description), built once on first use (and compiled after :meth:`compile`)."""
        if self._tracker is None:
            spec = self._tracker_spec
            if spec is None or isinstance(spec, str):
                self._tracker = resolve_tracker(spec, self.checkpoint, self.network, described=True)
            else:
                self._tracker = (spec, type(spec).__name__)
            if self._compile_mode is not None and self._tracker[0] is not None:
                from .batch import compile_tracker

                compile_tracker(self._tracker[0], self._compile_mode[0])
        return self._tracker

    def check_prompts(self, prompts: Sequence[str] | str) -> list[str]:
        """Texts the model can take (non-empty, at most 32 tokens); raises PromptError otherwise."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.network.tokenize(prompts)
        return prompts

    def item(self, path: str | Path, prompts: Sequence[str] | Mapping[Any, str] | str, box: Any = None,
             modality: str | None = None, protocol: str | None = None,
             score_threshold: float | None = None) -> dict[str, Any]:
        """The datalist item of one input, checked before anything is read: the input exists and has a supported
        format, the prompts fit the model (a list: label values 1..P; or ``{value: text}``), no box on a volume,
        a known modality and protocol, a score threshold in [0, 1]. Raises ValueError / FileNotFoundError
        (PromptError) with what to do."""
        from ..transforms.intensity import handler_for_modality

        kind = input_kind(path)
        mapping = _prompt_mapping(prompts)
        self.check_prompts(list(mapping.values()))
        if box is not None and kind == "volume":
            raise ValueError(f"{path}: box prompts are for 2D images; segment volumes with text prompts only")
        if modality is not None:
            try:
                handler_for_modality(modality)
            except KeyError:
                raise ValueError(f"unknown modality {modality!r}; e.g. CT, MRI, X-ray, ultrasound, endoscopy") from None
        if protocol is not None:
            get_protocol(protocol)
        if score_threshold is not None:
            score_threshold = checked_score_threshold(score_threshold)
        return {"image": str(path), "prompts": mapping, "box": box, "modality": modality, "protocol": protocol,
                "score_threshold": score_threshold}

    def __call__(self, path: str | Path, prompts: Sequence[str] | str, box: Any = None,
                 modality: str | None = None, channel: int | None = None, protocol: str | None = None,
                 before_merge: Callable[[list[dict[str, Any]]], None] | None = None,
                 score_threshold: float | None = None) -> Prediction:
        """Segment one file (``box``: see :func:`box_prompts`; ``channel``: the channel / time point of a 4D
        volume; ``protocol``: this call's 2D protocol, default the predictor's; ``score_threshold``: this call's
        score threshold (of a protocol that reads one, and of a volume's detections), default the predictor's,
        which stays as it is; ``before_merge``: called with the case's items as :class:`PromptInferer` leaves them,
        per-prompt maps and scores, before the way back and the merge, e.g. the offline planner's
        ``agent.fusion.silence_phrasings``). Input errors raise ValueError / FileNotFoundError (DataError,
        PromptError) with what to do."""
        item = self.item(path, prompts, box=box, modality=modality, protocol=protocol, score_threshold=score_threshold)
        if channel is not None:
            item["channel"] = channel
        transform, postprocessing = self.pipeline()
        with _input_errors():
            slices = transform(item)
            slices = slices if isinstance(slices, list) else [slices]
            self._set_tracker([slices], [item])
            outputs = self.inferer(slices, self.network)
            if before_merge is not None:
                before_merge(outputs)
            case = postprocessing(outputs)
        return self.prediction(case, item)

    def _set_tracker(self, cases: Sequence[list[dict[str, Any]]], items: Sequence[Mapping[str, Any]]) -> None:
        """Volumes get the tracker (built on the first one); a box on a volume is an error."""
        volumes = [is_volume_case(case) for case in cases]
        for volume, item in zip(volumes, items):
            if volume and item.get("box") is not None:
                raise ValueError(f"{item['image']} is a volume: box prompts are for 2D images; use text prompts only")
        self.inferer.tracker, self.inferer.tracker_name = self.tracker() if any(volumes) else (None, "none")

    def infer_cases(self, cases: Sequence[list[dict[str, Any]]], items: Sequence[Mapping[str, Any]],
                    images: torch.Tensor | None = None) -> list[dict[str, Any]]:
        """Preprocessed cases (with their datalist ``items``) -> post-processed cases in the inputs' geometry:
        the 2D ones through the network together (:meth:`PromptInferer.infer_cases`), volumes one at a time."""
        _, postprocessing = self.pipeline()
        with _input_errors():
            self._set_tracker(cases, items)
            return [postprocessing(case) for case in self.inferer.infer_cases(cases, self.network, images)]

    def prediction(self, case: Mapping[str, Any], item: Mapping[str, Any]) -> Prediction:
        """A post-processed case (and its datalist item, whose ``channel`` the input was read with) ->
        :class:`Prediction`."""
        labels = case["pred"]
        is_volume = labels.ndim == 4
        label_map = MetaTensor(labels.as_tensor()[0], meta=dict(labels.meta))
        seeds = case.get("seed_slices")
        box, modality = item.get("box"), item.get("modality")
        settings = {"checkpoint": self.checkpoint, "image_size": int(self.network.image_size),
                    "resize_kernel": self.resize_kernel, "modality": modality,
                    "box": None if box is None else _box_list(box, len(case["prompt_texts"]))}
        # the ones that read it (a picture's protocol label, "+box" for the T+I variant; a volume's is a description)
        if is_volume or get_protocol(str(case["protocol"]).removesuffix("+box")).reads_threshold:
            settings["score_threshold"] = float(case.get("score_threshold", self.inferer.score_threshold))
        if item.get("channel") is not None:
            settings["channel"] = int(item["channel"])
        if is_volume:
            settings["tracker"] = self.inferer.tracker_name
        if (modality or "").lower() == "ct":
            settings["ct_window"] = self.ct_window
        return Prediction(
            label_map=label_map, prompts=list(case["prompt_texts"]), label_values=list(case["prompt_values"]),
            scores=[float(s) for s in case["prompt_scores"]], protocol=str(case["protocol"]), is_volume=is_volume,
            affine=torch.as_tensor(labels.affine, dtype=torch.float64).clone(), source=str(item["image"]),
            seed_slices=None if seeds is None else [int(s) for s in seeds],
            slice_scores=case.get("slice_scores"), settings=settings,
        )

    def predict_many(self, items: Sequence[Mapping[str, Any]], *, batch_size: int = 8, num_workers: int = 0,
                     channel: int | None = None, pin_memory: bool | None = None
                     ) -> Iterator[tuple[dict[str, Any], Any]]:
        """Segment many inputs: ``(item, Prediction)`` per datalist item (from :meth:`item`), in order, or
        ``(item, UnreadableCase)`` for an input that could not be read (the caller stops or goes on).

        A torch ``DataLoader`` runs ``configs/inference.json``'s preprocessing in ``num_workers`` processes and
        stacks each batch's 2D slice-space images (pinned when the network is on CUDA); up to ``batch_size`` 2D
        images share one network forward; volumes go one at a time through the volume path. See
        :mod:`.batch`."""
        from .batch import predict_items

        yield from predict_items(self, items, batch_size=batch_size, num_workers=num_workers, channel=channel,
                                 pin_memory=pin_memory)


@contextmanager
def _input_errors() -> Iterator[None]:
    """An input error inside MONAI's ``RuntimeError("applying transform ...")`` wrappers re-raised as itself."""
    try:
        yield
    except RuntimeError as err:
        cause = user_error(err)
        if cause is None:
            raise
        raise cause from None


def _box_list(box: Any, num_prompts: int) -> list[list[float] | None]:
    boxes = list(box)
    if len(boxes) == 4 and all(isinstance(v, (int, float)) for v in boxes):
        boxes = [boxes]
    return [None if b is None else [float(v) for v in b] for b in boxes]


def predict_file(
    path: str | Path,
    prompts: Sequence[str] | str,
    box: Any = None,
    network: torch.nn.Module | None = None,
    *,
    checkpoint: str | None = None,
    image_size: int | None = None,
    protocol: str = "top_query",
    score_threshold: float = 0.5,
    tracker: Any = "auto",
    modality: str | None = None,
    ct_window: str | Sequence[float] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    channel: int | None = None,
    max_pixels: int | str | None = "auto",
    resize_kernel: str | None = None,
) -> Prediction:
    """Segment one image or volume file with text prompts (and, for 2D images, boxes in pixels).

    ``network`` (a loaded ``MedSAM3Net``) is used when given (its own source then names it and finds the tracker),
    else ``checkpoint`` is loaded (default ``tiny``; ``image_size`` sizes the tiny preset). ``ct_window`` and
    ``resize_kernel``: as :class:`Predictor` (None: the network's training's). Keep a :class:`Predictor` to segment
    many files with one loaded network.
    """
    if network is None:
        network = load_network("tiny" if checkpoint is None else checkpoint, image_size, device)
    else:
        built = int(getattr(network, "image_size", image_size or 0))
        if image_size is not None and image_size != built:
            raise ValueError(f"image_size={image_size} but the given network works at {built} px: leave image_size "
                             "out when passing a network (it sizes the checkpoint loaded without one)")
        if device is not None:
            network = network.to(device)
    predictor = Predictor(network, tracker=tracker, checkpoint=checkpoint, protocol=protocol,
                          score_threshold=score_threshold, ct_window=ct_window, progress=progress,
                          max_pixels=max_pixels, resize_kernel=resize_kernel)
    return predictor(path, prompts, box=box, modality=modality, channel=channel)


def native_image(path: str | Path, modality: str | None = None, ct_window: Any = "abdomen",
                 channel: int | None = None, stride: int = 1) -> torch.Tensor:
    """The input at its own size with intensities in [0, 1] (the model's intensity rule): (C, H, W) or
    (1, X, Y, Z). For overlays. A 2D picture is read as uint8 and mapped to float32 once (no second float copy);
    its size limit is ``MEDSAM3_MAX_PIXELS`` or PIL's. ``stride`` > 1 keeps every stride-th row and column of a
    2D picture before the float mapping (a display-sized copy of a large picture)."""
    from ..transforms import LoadMedicalImaged, ScaleIntensityByModalityd
    from ..transforms.intensity import materialize_intensity

    item = LoadMedicalImaged(keys="image", label_keys=(), channel=channel, keep_uint8=True)(
        {"image": str(path), "modality": modality})
    if stride > 1 and item["image"].ndim == 3:
        item["image"] = item["image"][:, ::stride, ::stride].clone()
    scaled = ScaleIntensityByModalityd(keys="image", ct_window=ct_window, defer_2d=True)(item)["image"]
    return plain_tensor(materialize_intensity(scaled))
