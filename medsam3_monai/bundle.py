"""The bundle's configs as the one source of its pipelines: read a component of ``bundles/medsam3/configs``.

``medsam3 segment``, ``medsam3 evaluate`` and the server build their transform chains from the same JSON that
``python -m monai.bundle run`` executes, through MONAI's ``ConfigParser`` with the caller's overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

BUNDLE_CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "medsam3" / "configs"


def config_parser(config: str | Sequence[str], **overrides: Any):
    """A MONAI ``ConfigParser`` of ``bundles/medsam3/configs/<config>`` with ``overrides`` (config ids) applied.

    ``config`` may be a list of names, merged in order as ``monai.bundle run --config_file "[a, b]"`` merges
    them (``["inference.json", "evaluate.json"]`` is the evaluation bundle). Override values may be Python
    objects (a built network), which the parser passes through unchanged.

    Components parsed from one parser share their references (``@preprocessing`` in the post-processing is
    the very ``Compose`` parsed as ``preprocessing``), so parse a pipeline's pieces from the same parser.
    """
    from monai.bundle import ConfigParser

    paths = [BUNDLE_CONFIGS / name for name in ([config] if isinstance(config, str) else config)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"bundle config {path} not found: medsam3-monai runs from its repository checkout")
    parser = ConfigParser()
    parser.read_config([str(path) for path in paths])
    parser.update(overrides)
    return parser


def inference_postprocessing(preprocessing: Any):
    """The ``postprocessing`` of ``configs/inference.json`` (``Invertd`` per slice, restack, merge by confidence)
    for cases made by ``preprocessing``, an already built chain (``CaseInferer`` is given one)."""
    parser = config_parser("inference.json")
    parser["preprocessing"] = preprocessing
    return parser.get_parsed_content("postprocessing")
