"""The offline planner (``--llm none``): no MLLM. The request's concept is resolved through the catalogue
(:mod:`.concepts`: canonical phrase, the request's own words, MedSAM3's phrase table, Medical SAM3's prompts,
synonyms), all phrasings run as one batch (one predictor call: on a 2D picture the vision encoder runs once) and
their masks are fused by confidence (:mod:`.fusion`). A request joining several catalogue concepts ("liver and
spleen") has each done so, and the answer is their union. It is the default when no planner endpoint is configured and
the fallback when the endpoint cannot be reached.
"""

from __future__ import annotations

from typing import Any, Callable

from .concepts import ConceptPlan, resolve_requests
from .decision import Decision
from .fusion import Fusion, fuse_by_confidence, silence_phrasings
from .marks import Mark

__all__ = ["plan_offline"]


def plan_offline(request: str, segmenter: Any, *, max_phrasings: int = 6, keep_ratio: float = 0.5,
                 min_score: float = 0.0, log: Callable[[str], None] = lambda line: None) -> Decision:
    """Segment what ``request`` names with every catalogue phrasing of it at once and fuse the masks.

    A request joining catalogue concepts ('the liver and the spleen', :func:`~.concepts.resolve_requests`) has each
    concept segmented and fused on its own (one predictor call per concept) and answers their union.

    Returns a ``selected`` decision with one mark per concept found (the fused mask, named after the concept), or
    ``no_mask`` when no phrasing scores at least ``min_score`` or every fused mask is empty.
    """
    plans = resolve_requests(request, max_phrasings)
    if len(plans) > 1:
        log(f"note: the request names {len(plans)} concepts ({', '.join(repr(p.concept) for p in plans)}): each is "
            "segmented with its own phrasings, and the answer is their union")
    outcomes = [_segment_concept(plan, segmenter, keep_ratio, min_score, log) for plan in plans]
    marks: list[Mark] = []
    for plan, (fusion, prediction, _) in zip(plans, outcomes):
        mark = Mark(len(marks) + 1, plan.concept, 1, fusion.mask, fusion.score, prediction, bool(prediction.is_volume))
        if fusion.kept and not mark.empty:
            marks.append(mark)
    if len(plans) == 1:
        details = outcomes[0][2]
    else:
        details = {"concepts": [outcome[2] for outcome in outcomes],
                   "kept": [text for fusion, _, _ in outcomes for text in fusion.kept],
                   "batch": {"phrasings": sum(o[2]["batch"]["phrasings"] for o in outcomes),
                             "predictor_calls": len(plans)}}
    if marks:
        missing = [plan.concept for plan in plans if plan.concept not in [mark.phrase for mark in marks]]
        if missing:
            log(f"note: nothing found for {', '.join(repr(c) for c in missing)}; the answer holds the rest")
        return Decision("selected", marks, planner="offline", details=details)
    if not any(fusion.kept for fusion, _, _ in outcomes):
        best = max(fusion.score for fusion, _, _ in outcomes)
        named = " or ".join(repr(plan.concept) for plan in plans)
        return Decision("no_mask", reason=f"no phrasing of {named} scored >= {min_score:g} (best {best:.3f})",
                        planner="offline", details=details)
    named = " or ".join(repr(plan.concept) for plan in plans)
    return Decision("no_mask", reason=f"the phrasings of {named} segmented nothing"
                    + _below_threshold(segmenter, outcomes), planner="offline", details=details)


def _below_threshold(segmenter: Any, outcomes: list[tuple[Fusion, Any, dict[str, Any]]]) -> str:
    """Why the masks are empty when the segmenter's score threshold emptied them (a volume's detections, or a 2D
    protocol that reads it) and no phrasing reached it; else nothing."""
    from ..protocol_registry import get_protocol, score_text

    settings = getattr(segmenter, "settings", None)
    threshold = getattr(settings, "score_threshold", None)
    if threshold is None:
        return ""
    volume = any(bool(prediction.is_volume) for _, prediction, _ in outcomes)
    if not volume and not get_protocol(getattr(settings, "protocol", "top_query")).reads_threshold:
        return ""
    best = max(fusion.score for fusion, _, _ in outcomes)
    if best >= threshold:
        return ""
    where = "no slice" if volume else f"no query (protocol {settings.protocol})"
    return (f": {where} scored >= the score threshold {threshold:g} (best {score_text(best, threshold)}); lower it "
            "to see weaker ones")


def _segment_concept(plan: ConceptPlan, segmenter: Any, keep_ratio: float, min_score: float,
                     log: Callable[[str], None]) -> tuple[Fusion, Any, dict[str, Any]]:
    """One concept's phrasings segmented in one predictor call and fused: ``(fusion, prediction, details)``."""
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
    prediction = segmenter.segment_many(  # the unkept phrasings silenced before the merge: see .fusion
        phrasings, before_merge=lambda items: silence_phrasings(items, [0] * len(phrasings), keep_ratio, min_score))
    fusion = fuse_by_confidence(prediction, keep_ratio, min_score)
    details = {"concept": plan.as_json(), "dropped_phrasings": dropped, "keep_ratio": keep_ratio,
               "min_score": min_score, "fusion": fusion.table, "kept": fusion.kept,
               "batch": {"phrasings": len(phrasings), "predictor_calls": 1}}
    return fusion, prediction, details
