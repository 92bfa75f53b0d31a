"""The preprocessing an inference repeats: how the network saw the pictures in training.

The training bundle records its ``resize_kernel`` and ``ct_window`` in the model files it writes
(``models/model.pt``, ``model_best_val_dice.pt``, ``checkpoint_iterN.pt``; ``MedSAM3Net.trained_preprocessing``).
Every inference path (``Predictor``, ``run_evaluation``, the inference and evaluation bundles, the ``medsam3``
commands) takes a setting given to it, else the recorded one, else the default (``sam3``, ``abdomen``), and says when
a given setting differs from the recorded one.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["DEFAULT_CT_WINDOW", "DEFAULT_RESIZE_KERNEL", "inference_preprocessing", "log_preprocessing_notes",
           "log_training_differences", "recorded_preprocessing", "same_setting", "trained_setting"]

#: the settings of a network whose file records none (``tiny``, ``sam3.pt``, a Medical-SAM3 release, an HF folder)
DEFAULT_RESIZE_KERNEL = "sam3"
DEFAULT_CT_WINDOW = "abdomen"
_DEFAULTS = {"resize_kernel": DEFAULT_RESIZE_KERNEL, "ct_window": DEFAULT_CT_WINDOW}
#: the bundles' key and the commands' option of each setting, for the notes
_OPTIONS = {"resize_kernel": "--resize-kernel", "ct_window": "--ct-window"}


def trained_setting(network: Any, key: str) -> Any:
    """The ``key`` (``resize_kernel`` or ``ct_window``) ``network``'s model file records, else the default: what the
    inference bundle's ``resize_kernel`` and ``ct_window`` are unless overridden."""
    return (getattr(network, "trained_preprocessing", None) or {}).get(key, _DEFAULTS[key])


def same_setting(key: str, given: Any, recorded: Any) -> bool:
    """Whether two values of ``key`` are the same setting (a CT window by its width and level: ``lung`` is
    ``1500,-600``)."""
    if key == "ct_window":
        from ..transforms.intensity import _window

        return _window(given) == _window(recorded)
    return given == recorded


def _shown(value: Any) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, (list, tuple)) else str(value)


def inference_preprocessing(network: Any, resize_kernel: str | None = None,
                            ct_window: str | Sequence[float] | None = None) -> tuple[str, Any, list[str]]:
    """(resize_kernel, ct_window, notes) for an inference with ``network`` (a ``MedSAM3Net``): each setting given,
    else the one its model file records (:attr:`MedSAM3Net.trained_preprocessing`), else the default. ``notes``: one
    line per given setting that differs from the recorded one (the masks of such a run are not the model's best)."""
    recorded = dict(getattr(network, "trained_preprocessing", None) or {})
    chosen: dict[str, Any] = {}
    notes: list[str] = []
    for key, given in (("resize_kernel", resize_kernel), ("ct_window", ct_window)):
        if given is None:
            chosen[key] = recorded.get(key, _DEFAULTS[key])
            continue
        chosen[key] = given
        if key in recorded and not same_setting(key, given, recorded[key]):
            notes.append(f"the model was trained with {key} {_shown(recorded[key])} and this run uses "
                         f"{_shown(given)}: to use the model's own, leave the setting out ({_OPTIONS[key]}, the "
                         f"bundles' {key}, the MONAI Label app's --conf {key})")
    return chosen["resize_kernel"], chosen["ct_window"], notes


def log_preprocessing_notes(network: Any, resize_kernel: Any, ct_window: Any) -> None:
    """The inference and evaluation bundles' note (a warning in their log) for a ``resize_kernel`` or ``ct_window``
    given that differs from the one the network's model file records (:func:`inference_preprocessing`); the value
    that equals the recorded one, its own default, says nothing."""
    import logging

    for line in inference_preprocessing(network, resize_kernel, ct_window)[2]:
        logging.getLogger("medsam3_monai.bundle").warning(line)


def recorded_preprocessing(resize_kernel: str, ct_window: Any, items: Sequence[Any] = ()) -> dict[str, Any]:
    """What the training bundle records in its model files (``recorded_preprocessing``): its ``resize_kernel``, and
    its ``ct_window`` when a training item is CT (a model trained without CT has no window to repeat)."""
    from ..transforms.intensity import is_ct_windowed

    ct = any(isinstance(item, dict) and is_ct_windowed(item.get("modality")) for item in items)
    return {"resize_kernel": resize_kernel, **({"ct_window": ct_window} if ct else {})}


def log_training_differences(network: Any, recorded: dict[str, Any]) -> None:
    """The training bundle's note (a warning in its log) when the starting checkpoint's model file records another
    preprocessing than this training's (``recorded``, what its own model files will record): a fine-tune of a lung-
    window model on the abdomen window changes what the network sees, and the training bundle does not follow the
    starting checkpoint (its settings are its own: ``--ct_window``, ``--resize_kernel``)."""
    import logging

    started = dict(getattr(network, "trained_preprocessing", None) or {})
    for key, value in recorded.items():
        if key in started and not same_setting(key, value, started[key]):
            logging.getLogger("medsam3_monai.bundle").warning(
                f"the starting checkpoint was trained with {key} {_shown(started[key])} and this training uses "
                f"{_shown(value)}: pass --{key} {_shown(started[key])} (medsam3 train: --set {key}="
                f"{_shown(started[key])}) to keep the checkpoint's")
