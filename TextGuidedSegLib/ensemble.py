"""Several models answering as one: their probabilities averaged (weighted) before the threshold.

An :class:`Ensemble` goes wherever a :class:`~TextGuidedSegLib.checkpoint.LoadedModel` goes in
:func:`TextGuidedSegLib.engine.segment_volume` (and so in ``evaluate``, the CLI, the worker and the
Slicer panel). The engine runs every member on the same batch of slices, each with its own input
size, intensity window and laterality convention (the prompt is mapped to each member's convention,
as for a single model), and adds the members' probabilities, resized to the slice, into one weighted
mean per chunk of slices: no member's probability volume is ever held whole. The labels are that mean
>= threshold. The uncertainty of an ensemble is the weighted variance of the members' probabilities
(their disagreement) plus the weighted mean of a sampling member's own variance (law of total variance).

Written on the command line (``--model``) or in ``Models.json`` (an entry with ``members``)::

    tmc-qata-cpu,ssa-qata-cpu                 equal weights
    tmc-qata-cpu:0.6,ssa-qata-cpu:0.4         weights (positive, summing to 1)

Members must be single models (not ensembles), all read text or all be text-free, and be made for the
same inputs (the same domain: the CLI and the panel check the input against it once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .checkpoint import LoadedModel

#: How far the given weights may sum from 1 (they are then divided by their sum).
WEIGHT_SUM_TOLERANCE = 1e-3


def is_ensemble_spec(text: str) -> bool:
    """True when ``text`` names several models (``a,b``) or gives a weight (``a:0.5``)."""
    return "," in text or _split_weight(text)[1] is not None


def _split_weight(item: str) -> tuple[str, float | None]:
    """``name:0.5`` -> (name, 0.5); ``name`` or ``C:\\models\\x`` (no number after the last ':') -> (item, None)."""
    if ":" not in item:
        return item, None
    name, _, tail = item.rpartition(":")
    try:
        weight = float(tail)
    except ValueError:
        return item, None
    return name.strip(), weight


def parse_model_spec(text: str) -> list[tuple[str, float]]:
    """Members and weights of ``a,b,c`` (equal weights) or ``a:0.5,b:0.3,c:0.2``.

    Raises ``ValueError`` with what to write instead for: an empty member, weights on some members
    only, a weight that is not positive, weights that do not sum to 1, a member named twice.
    """
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise ValueError(f"model list {text!r} has an empty member: write names separated by commas, e.g. "
                         "'tmc-qata-cpu,ssa-qata-cpu'")
    parsed = [_split_weight(item) for item in items]
    names = [name for name, _ in parsed]
    given = [w for _, w in parsed if w is not None]
    if given and len(given) != len(parsed):
        raise ValueError(f"model list {text!r}: give a weight to every member or to none (equal weights), e.g. "
                         "'a:0.5,b:0.5'")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"model list {text!r} names {', '.join(duplicates)} more than once; give it a larger "
                         "weight instead")
    weights = check_weights(given, names) if given else [1.0 / len(names)] * len(names)
    return list(zip(names, weights))


def check_weights(weights: Sequence[float], names: Sequence[str]) -> list[float]:
    """Positive, finite weights summing to 1 (within :data:`WEIGHT_SUM_TOLERANCE`), then divided by their sum."""
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weights for {len(names)} members")
    for name, w in zip(names, weights):
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"ensemble weight of {name!r} is {w:g}: weights must be positive")
    total = float(sum(weights))
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"ensemble weights must sum to 1, these sum to {total:g} "
                         f"({', '.join(f'{n}:{w:g}' for n, w in zip(names, weights))})")
    return [float(w) / total for w in weights]


def spec_text(members: Sequence[tuple[str, float]]) -> str:
    """The canonical way to write ``members``: ``a,b`` for equal weights, else ``a:0.6,b:0.4``."""
    weights = [w for _, w in members]
    if all(abs(w - weights[0]) < 1e-12 for w in weights):
        return ",".join(name for name, _ in members)
    return ",".join(f"{name}:{w:g}" for name, w in members)


@dataclass
class Ensemble:
    """Loaded members and their weights; the engine treats it like one model.

    Args:
        members: the loaded models (at least two).
        weights: one positive weight per member, summing to 1 (see :func:`check_weights`).
        name: what users see (a manifest name such as ``qata-ensemble-cpu``, or the ``--model`` text).
    """

    members: list
    weights: list = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(self.members)}")
        names = [m.name for m in self.members]
        if not self.weights:
            self.weights = [1.0 / len(self.members)] * len(self.members)
        self.weights = check_weights(list(self.weights), names)
        reads_text = {m.requires_text for m in self.members}
        if len(reads_text) > 1:
            free = [m.name for m in self.members if not m.requires_text]
            raise ValueError(f"ensemble members {', '.join(free)} are text-free and the others read text: "
                             "mixing them is not supported (a text-free model answers without the prompt)")
        if not self.name:
            self.name = spec_text(list(zip(names, self.weights)))

    @property
    def requires_text(self) -> bool:
        return self.members[0].requires_text

    @property
    def samples_masks(self) -> bool:
        """True when a member samples masks (``samples`` then applies to it)."""
        return any(m.samples_masks for m in self.members)


def members_of(model) -> list[tuple[LoadedModel, float]]:
    """``[(member, weight), ...]``: the members of an :class:`Ensemble`, or ``[(model, 1.0)]``."""
    if isinstance(model, Ensemble):
        return list(zip(model.members, model.weights))
    return [(model, 1.0)]
