"""The offline planner's reading of a request: which catalogue concept it names, and the phrasings to try.

``"segment the lesion in the upper left quadrant"`` -> concept ``tumor`` (``lesion`` is in its synonym group) ->
phrasings ``tumor, tumour, mass, lesion, neoplasm``. The vocabulary is the catalogue (``datasets_meta``): every
synonym group (``synonyms.json``), every dataset's label concepts, MedSAM3's phrase table and Medical SAM3's
evaluation prompts (``papers`` of each dataset). The longest catalogue text found in the request (whole words,
case-insensitive, a trailing plural ``s`` forgiven) names the concept; its canonical form comes first, then the
text the request used, the MedSAM3 phrase-table and Medical SAM3 prompts of the datasets of that concept, then the
rest of its synonym group. A request naming nothing the catalogue knows is used as it stands, stripped of
instructions (``segment``, ``please``, ``the``) and location words (``upper left quadrant``): MedSAM3 takes any
short noun phrase.

Location words are reported (``ConceptPlan.location``), not applied: the offline planner segments the concept
wherever it is.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

__all__ = ["ConceptPlan", "LOCATION_WORDS", "phrase_key", "resolve_request", "resolve_requests"]

#: words of a request that ask for a place in the image; the offline planner reports them (it does not filter)
LOCATION_WORDS = frozenset(
    "upper lower left right top bottom middle centre center central quadrant quadrants side half corner "
    "anterior posterior superior inferior medial lateral proximal distal".split()
)
#: words of a request that are instructions, not part of a concept
FILLER_WORDS = frozenset(
    "segment segmentation segments outline delineate find show mark highlight detect locate identify select "
    "extract draw give me please the a an all any every each of in on at into within from to this that these "
    "those image images picture photo scan slice slices volume mask masks region regions area areas visible "
    "and or with for is are there here can you could would kindly it its them their".split()
)
#: location words that are part of anatomical names when a content word follows ('left ventricle', 'right lung')
LATERALITY = frozenset({"left", "right"})
#: words after which a request's noun phrase qualifies its head ('the tumor in the kidney')
PREPOSITIONS = frozenset("in of on at within inside from near along around".split())
#: a word: letters and digits of any script ('tumör', 'rénale', '乳腺肿瘤' are words, not split or dropped)
_WORD = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*")
#: what joins two things to segment in one request ('the liver and the spleen', 'optic cup & optic disc', 'a, b')
_JOIN = re.compile(r"\s*(?:[,;&+]|\band\b|\bplus\b|\bas well as\b)\s*", re.IGNORECASE)
#: the words of a join that survive phrase_key (a catalogue text spanning one is one concept)
_JOIN_WORDS = frozenset({"and", "plus", "as", "well"})


def phrase_key(text: str) -> str:
    """Comparison key of a phrase: NFKC, case-folded, words only, single spaces (``'Polyp.'`` == ``'polyp'``)."""
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text).casefold()))


@dataclass(frozen=True)
class ConceptPlan:
    """What the offline planner segments for a request.

    Attributes:
        request: the request as given.
        concept: the canonical concept (first of its synonym group), or the request's own phrase.
        matched: the request's words that named it.
        phrasings: the texts to run, canonical first, without duplicates.
        sources: phrasing -> where it came from.
        location: location words of the request (reported, not applied).
        in_catalogue: whether the concept came from the catalogue.
        unused: the request's words (neither instructions nor location) outside the catalogue text that named the
            concept, e.g. ``brain`` of ``brain tumor``; the request's own phrase is then run too.
        request_phrase: that phrase of the request's own (``brain tumor``), or "" when every word is the concept's.
    """

    request: str
    concept: str
    matched: str
    phrasings: list[str]
    sources: dict[str, str] = field(default_factory=dict)
    location: list[str] = field(default_factory=list)
    in_catalogue: bool = True
    unused: list[str] = field(default_factory=list)
    request_phrase: str = ""

    def as_json(self) -> dict:
        return {"request": self.request, "concept": self.concept, "matched": self.matched,
                "in_catalogue": self.in_catalogue, "phrasings": list(self.phrasings),
                "sources": dict(self.sources), "location_words_not_applied": list(self.location),
                "words_beyond_the_concept": list(self.unused)}


@lru_cache(maxsize=2)
def _vocabulary(root: str | None) -> tuple[dict[str, str], dict[str, list[tuple[str, str]]]]:
    """(text key -> canonical concept, canonical concept -> [(paper phrasing, source)])."""
    from ..data.catalogue import load_catalogue

    catalogue = load_catalogue(root)
    index: dict[str, str] = {}
    papers: dict[str, list[tuple[str, str]]] = {}

    def add(text: str) -> str:
        canonical = catalogue.canonical_concept(text)
        index.setdefault(phrase_key(text), canonical)
        return canonical

    for group in catalogue.synonym_groups:
        for text in group:
            add(text)
    for entry in catalogue.datasets.values():
        concepts = {add(text) for text in (*entry.labels.values(), *entry.concepts)}
        phrase = (entry.papers.get("medsam3") or {}).get("phrase")
        for part in (phrase or "").split("&"):
            if part.strip():
                canonical = add(part.strip())
                papers.setdefault(canonical, []).append((part.strip(), f"MedSAM3 phrase table ({entry.name})"))
        prompt = (entry.papers.get("medical_sam3") or {}).get("prompt")
        if prompt and len(concepts) == 1:  # a dataset of one concept: its prompt names that concept
            (canonical,) = concepts
            index.setdefault(phrase_key(prompt), canonical)
            papers.setdefault(canonical, []).append((prompt, f"Medical SAM3 prompt ({entry.name})"))
    return index, papers


def _find(words: list[str], index: dict[str, str]) -> tuple[int, int, str] | None:
    """(start, stop, canonical) of the longest catalogue text in ``words``; the latest on ties, as the head of an
    English noun phrase comes last (``brain tumor``: ``tumor``, not ``brain``)."""
    best: tuple[int, int, str] | None = None
    for start in range(len(words)):
        for stop in range(len(words), start, -1):
            if best is not None and stop - start < best[1] - best[0]:
                break
            span = words[start:stop]
            candidates = [" ".join(span)]
            if span[-1].endswith("s") and len(span[-1]) > 3:  # 'polyps' -> 'polyp', 'lesions' -> 'lesion'
                candidates.append(" ".join([*span[:-1], span[-1][:-1]]))
            for text in candidates:
                if text in index:
                    best = (start, stop, index[text])
                    break
            if best is not None and best[:2] == (start, stop):
                break
    return best


def resolve_request(request: str, max_phrasings: int = 6, catalogue_root: str | None = None) -> ConceptPlan:
    """The concept a request names and the phrasings the offline planner runs (see the module docstring).

    Raises :class:`~.errors.AgentError` when the request names nothing at all.
    """
    from .errors import AgentError

    if max_phrasings < 1:
        raise AgentError(f"max_phrasings must be >= 1, got {max_phrasings}")
    words = phrase_key(request).split()
    content = {i for i, w in enumerate(words) if w not in FILLER_WORDS and w not in LOCATION_WORDS}
    if not content:
        raise AgentError(f"the request {request!r} names nothing to segment; name the structure in it, e.g. "
                         "'polyp' or 'segment the liver tumor'")

    def named(i: int) -> bool:
        """Part of a name: a content word, or left / right just before one ('left ventricle')."""
        return i in content or (words[i] in LATERALITY and i + 1 in content)

    location = [w for i, w in enumerate(words) if w in LOCATION_WORDS and not named(i)]
    first, last = min(i for i in range(len(words)) if named(i)), max(content)
    own = " ".join(w for i, w in enumerate(words) if first <= i <= last and (named(i) or w not in LOCATION_WORDS))
    # the head comes before a preposition ('tumor in the left kidney': tumor), last within its phrase (brain tumor);
    # the words after it qualify it, and 'kidney tumor' may be what the catalogue knows
    cut = next((i for i in range(first + 1, len(words)) if words[i] in PREPOSITIONS), len(words))
    # location words stay in the search ('anterior hippocampus' is a catalogue name), instructions do not
    head = [w for w in words[:cut] if w not in FILLER_WORDS]
    qualifier = [w for w in words[cut + 1:] if w not in FILLER_WORDS and w not in PREPOSITIONS]
    index, papers = _vocabulary(catalogue_root)
    choices = []
    for phrase in (head, qualifier + head) if qualifier else (head,):
        found = _find(phrase, index)
        if found is not None and found[1] == len(phrase):  # it names the head, not only a modifier ('liver cyst')
            choices.append((found[1] - found[0], phrase, found))
    if not choices:
        return ConceptPlan(request, own, own, [own], {own: "the request (not in the catalogue)"},
                           location, in_catalogue=False)
    _, phrase, (start, stop, canonical) = max(choices, key=lambda choice: choice[0])  # the head's on ties
    matched = " ".join(phrase[start:stop])
    unused = [w for w in phrase[:start] + phrase[stop:] + (qualifier if phrase is head else [])
              if w not in LOCATION_WORDS]
    from ..data.catalogue import load_catalogue

    candidates: list[tuple[str, str]] = [(canonical, "canonical concept (datasets_meta)")]
    if unused:  # 'brain tumor': the concept tumor, and the request's words as they are
        candidates.append((own, "the request (its words beyond the catalogue's)"))
    candidates.append((matched, "the request"))
    candidates += papers.get(canonical, [])
    candidates += [(text, "synonyms.json") for text in load_catalogue(catalogue_root).synonyms(canonical)]
    phrasings: list[str] = []
    sources: dict[str, str] = {}
    seen: set[str] = set()
    for text, source in candidates:
        key = phrase_key(text)
        if key and key not in seen:
            seen.add(key)
            phrasings.append(text)
            sources[text] = source
    phrasings = phrasings[:max_phrasings]
    return ConceptPlan(request, canonical, matched, phrasings, {p: sources[p] for p in phrasings},
                       [w for w in location if w not in matched.split()], unused=unused,
                       request_phrase=own if unused else "")


def resolve_requests(request: str, max_phrasings: int = 6, catalogue_root: str | None = None) -> list[ConceptPlan]:
    """The concepts a request names: one :class:`ConceptPlan` per part when it joins catalogue concepts ('the liver
    and the spleen', 'optic cup & optic disc', 'liver, spleen'), else the one plan of :func:`resolve_request`.
    The request stays one concept when a catalogue text spans the join ('portal vein and splenic vein'), when a
    part names nothing the catalogue knows ('the polyp and its margin'), or when the parts name one concept."""
    from .errors import AgentError

    whole = resolve_request(request, max_phrasings, catalogue_root)
    parts = [part for part in _JOIN.split(request) if part and part.strip()]
    if len(parts) < 2 or (whole.in_catalogue and _JOIN_WORDS & set(whole.matched.split())):
        return [whole]
    plans: list[ConceptPlan] = []
    for part in parts:
        try:
            plan = resolve_request(part, max_phrasings, catalogue_root)
        except AgentError:  # a part of instructions only ('... and show it')
            return [whole]
        if not plan.in_catalogue:
            return [whole]
        if plan.concept not in [other.concept for other in plans]:
            plans.append(plan)
    return plans if len(plans) > 1 else [whole]
