"""The preprocessing an inference repeats: how the network saw the pictures in training.

The training bundle records its ``resize_kernel`` and ``ct_window`` in the model files it writes
(``models/model.pt``, ``model_best_val_dice.pt``, ``checkpoint_iterN.pt``; ``MedSAM3Net.trained_preprocessing``).
Every inference path (``Predictor``, ``run_evaluation``, the inference and evaluation bundles, the ``medsam3``
commands) takes a setting given to it, else the recorded one, else the default (``sam3``, ``abdomen``), and says when
a given setting differs from the recorded one.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["DEFAULT_CT_WINDOW", "DEFAULT_RESIZE_KERNEL", "inference_preprocessing", "trained_setting"]

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


def _same(key: str, given: Any, recorded: Any) -> bool:
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
        if key in recorded and not _same(key, given, recorded[key]):
            notes.append(f"the model was trained with {key} {_shown(recorded[key])} and this run uses "
                         f"{_shown(given)}: leave {_OPTIONS[key]} (the bundles' {key}) out to use the model's own")
    return chosen["resize_kernel"], chosen["ct_window"], notes
