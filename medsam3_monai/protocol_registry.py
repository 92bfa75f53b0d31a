"""The 2D evaluation protocols: one registry, name -> description + mask-logits function.

Every command line choice, request validation, validation metric and report note reads this table, and
``medsam3_monai.inferers.protocols`` holds the functions (definitions: ``bundles/medsam3/docs/conventions.md``). The module is
light (no torch import) so that command-line parsers can offer the names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Protocol:
    """A way to turn detector outputs into one mask-logit map and one score per prompt.

    Attributes:
        name: as written on the command line and beside every number it produced.
        description: for report notes; ``{score_threshold}`` is filled in.
        function: name of its function in :mod:`medsam3_monai.inferers.protocols`,
            ``(outputs, size, score_threshold) -> (logits (B, H, W), scores (B,))``; ``size`` None: the masks' own
            resolution (the 2D way back resizes them once, straight to the picture's size).
        validation: usable as the training bundle's validation metric (``val_protocol``).
        reads_threshold: whether its masks depend on ``score_threshold`` (a prediction records it then).
        query_function: for a protocol whose mask is the union of several queries' masks, the name of its function
            ``(outputs, score_threshold) -> (maps (K, h, w), owners (K,), scores (B,))`` giving the kept queries'
            own maps at the masks' resolution and the prompt of each: the 2D way back resizes each to the picture's
            size and unites them there, as SAM3's ``Sam3Processor`` does (the union of masks resized to a picture is
            not the resize of their union at 288 px).
    """

    name: str
    description: str
    function: str
    validation: bool = False
    reads_threshold: bool = False
    query_function: str | None = None

    @property
    def unites_queries(self) -> bool:
        """Whether a prompt's mask is the union of several queries' masks (:attr:`query_function`)."""
        return self.query_function is not None

    def logits(self, outputs: Any, size: int | tuple[int, int] | None, score_threshold: float = 0.5):
        """Mask logits (B, H, W) float32 at ``size`` (None: the masks' own) and scores (B,) of ``outputs`` (a
        ``MedSAM3Output``)."""
        from .inferers import protocols

        return getattr(protocols, self.function)(outputs, size, score_threshold)

    def query_logits(self, outputs: Any, score_threshold: float = 0.5):
        """A uniting protocol's kept queries (:attr:`query_function`): their (K, h, w) float32 mask logits at the
        masks' resolution, the prompt of each (K,) in prompt order, and the scores (B,) of :meth:`logits`."""
        from .inferers import protocols

        if self.query_function is None:
            raise ValueError(f"protocol {self.name!r} gives one map per prompt, not the kept queries' own maps")
        return getattr(protocols, self.query_function)(outputs, score_threshold)

    def describe(self, score_threshold: float = 0.5) -> str:
        return self.description.format(score_threshold=score_threshold)


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("top_query", "the highest-scoring query's mask per prompt (the papers' protocol)",
                 "top_query_logits", validation=True),
        Protocol("top_query_floor", "the highest-scoring query's mask per prompt, empty when its score is below "
                 "{score_threshold} (the rule of the Medical-SAM3 release's 2D evaluation script, which uses 0.1)",
                 "top_query_floor_logits", reads_threshold=True),
        Protocol("threshold", "the union of the queries with score >= {score_threshold}", "threshold_logits",
                 reads_threshold=True, query_function="threshold_query_logits"),
        Protocol("semantic", "the semantic head's mask (logit > 0)", "semantic_logits", validation=True),
    )
}
DEFAULT_PROTOCOL = "top_query"


def get_protocol(name: str, validation: bool = False) -> Protocol:
    """The registered protocol ``name`` (``validation``: one usable as the training validation metric)."""
    choices = [p.name for p in PROTOCOLS.values() if p.validation or not validation]
    if name not in choices:
        raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(choices)}")
    return PROTOCOLS[name]


def checked_score_threshold(value: Any, name: str = "score threshold") -> float:
    """``value`` as a score threshold (the ``threshold`` and ``top_query_floor`` protocols' query score, and a
    volume's detection score): a number in [0, 1], else ValueError saying so (``name``: the setting it came from)."""
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r}: give a number in [0, 1]") from None
    if isinstance(value, bool) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{name} {value!r}: give a number in [0, 1]")
    return threshold


def score_text(score: float, threshold: float) -> str:
    """``score`` for a note that sets it against ``threshold``: 3 decimals, more where those would round it up to
    the threshold (0.251688 against 0.25182 is not "0.252")."""
    text = f"{score:.3f}"
    return text if (float(text) >= threshold) == (score >= threshold) else f"{score:.6g}"
