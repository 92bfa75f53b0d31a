"""The offline planner (``--llm none``): no MLLM. The request's concept is resolved through the catalogue
(:mod:`.concepts`: canonical phrase, the request's own words, MedSAM3's phrase table, Medical SAM3's prompts,
synonyms), all phrasings run as one batch (one predictor call: on a 2D picture the vision encoder runs once) and
their masks are fused by confidence (:mod:`.fusion`). It is the default when no planner endpoint is configured and
the fallback when the endpoint cannot be reached.
"""

from __future__ import annotations

from typing import Any, Callable

from .concepts import resolve_request
from .decision import Decision
from .fusion import fuse_by_confidence
from .marks import Mark

__all__ = ["plan_offline"]


def plan_offline(request: str, segmenter: Any, *, max_phrasings: int = 6, keep_ratio: float = 0.5,
                 min_score: float = 0.0, log: Callable[[str], None] = lambda line: None) -> Decision:
    """Segment what ``request`` names with every catalogue phrasing of it at once and fuse the masks.

    Returns a ``selected`` decision with one mark (the fused mask, named after the concept), or ``no_mask`` when
    no phrasing scores at least ``min_score`` or the fused mask is empty.
    """
    plan = resolve_request(request, max_phrasings)
    phrasings, dropped = [], []
    for text in plan.phrasings:
        try:
            phrasings.append(segmenter.check_phrase(text))
        except ValueError as err:  # longer than the model's 32 tokens, ...
            dropped.append({"phrase": text, "why": str(err)})
    if not phrasings:
        raise ValueError(f"no phrasing of {plan.concept!r} fits the model: {dropped}")
    if not plan.in_catalogue:
        log(f"note: {plan.concept!r} is not in the catalogue (datasets_meta); segmenting it as written")
    if plan.unused:
        runs = ("runs beside the concept's phrasings" if plan.request_phrase in plan.phrasings
                else "is not run (--max-phrasings leaves it out)")
        log(f"note: the catalogue concept of the request is {plan.concept!r}; the rest of it "
            f"({' '.join(plan.unused)}) is not part of that concept, so the request's own phrase "
            f"{plan.request_phrase!r} {runs}; an MLLM planner (--llm-url) reads the whole request")
    if plan.location:
        log(f"note: the offline planner does not apply location words ({' '.join(plan.location)}): it segments "
            f"{plan.concept!r} wherever it is; an MLLM planner (--llm-url) can choose by position")
    prediction = segmenter.segment_many(phrasings)
    fusion = fuse_by_confidence(prediction, keep_ratio, min_score)
    details = {"concept": plan.as_json(), "dropped_phrasings": dropped, "keep_ratio": keep_ratio,
               "min_score": min_score, "fusion": fusion.table, "kept": fusion.kept,
               "batch": {"phrasings": len(phrasings), "predictor_calls": 1}}
    if not fusion.kept:
        return Decision("no_mask", reason=f"no phrasing of {plan.concept!r} scored >= {min_score:g} "
                                          f"(best {fusion.score:.3f})", planner="offline", details=details)
    mark = Mark(1, plan.concept, 1, fusion.mask, fusion.score, prediction, bool(prediction.is_volume))
    if mark.empty:
        return Decision("no_mask", reason=f"the phrasings of {plan.concept!r} segmented nothing", planner="offline",
                        details=details)
    return Decision("selected", [mark], planner="offline", details=details)
