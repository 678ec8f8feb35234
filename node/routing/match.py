"""Applying rules to a study: the routing decision, and an explanation of it.

A rule matches a study when one image of one of its series meets every condition
of the rule; the decision names all series that do (the worker analyses those).
Rules are tried in order and the first enabled rule that matches decides. No
match is a result too (``None``): the caller records the study as not routed.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from node.db.models import Priority
from node.routing import keywords
from node.routing.conditions import Outcome
from node.routing.rules import Rule, RuleSet

Header = Mapping[str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class SeriesAttributes:
    """What rules can see of one series: its images' header attributes and the sending AE.

    ``values`` maps DICOM keywords (and ``CallingAETitle``) to the element's values
    as text, one string per value; an element present without a value maps to ``()``.
    It is the first image's header; ``more`` holds the series' other images, which
    may differ in image-level attributes (ViewPosition, ImageType, ...). ``more`` may
    read its headers only when iterated (:mod:`node.routing.attributes` does).
    """

    series_instance_uid: str
    values: Header = field(hash=False)
    more: Collection[Header] = field(default=(), hash=False)

    def get(self, keyword: str) -> tuple[str, ...] | None:
        """``keyword`` in the first image's header."""
        return self.values.get(keyword)

    @property
    def instances(self) -> Iterator[Header]:
        """Every image's header, first image first."""
        yield self.values
        yield from self.more


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """What the first matching rule says should happen to a study."""

    rule_name: str
    priority: Priority
    models: tuple[str, ...]
    destinations: tuple[str, ...]
    #: The series that met the rule's conditions, in the order given.
    series_instance_uids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ConditionResult:
    keyword: str
    #: The condition as written for people, e.g. ``in [CR, DX]``.
    condition: str
    #: The series' values of ``keyword``; ``None`` when the attribute is absent.
    values: tuple[str, ...] | None
    matched: bool
    reason: str


@dataclass(frozen=True, slots=True)
class SeriesExplanation:
    series_instance_uid: str
    matched: bool
    #: For the image shown: the first that meets every condition, else the first.
    conditions: tuple[ConditionResult, ...]
    #: Which image of the series ``conditions`` are about (0: the first), of how many.
    instance: int = 0
    instances: int = 1


@dataclass(frozen=True, slots=True)
class RuleExplanation:
    """One rule against one study: per series, per condition, matched or not and why."""

    index: int
    rule_name: str
    description: str
    enabled: bool
    #: One image of a series meets every condition (whether or not the rule is enabled).
    matched: bool
    #: This rule decides the study: the first enabled rule that matched.
    chosen: bool
    series: tuple[SeriesExplanation, ...]


def _check(keyword: str, rule: Rule, header: Header) -> Outcome:
    return rule.match[keyword].evaluate(
        header.get(keyword),
        fold=keywords.is_case_insensitive(keyword),
        vr=keywords.vr_of(keyword),
    )


def _only_series_level_failed(rule: Rule, header: Header) -> bool:
    """``header`` fails ``rule`` on an attribute every image of its series shares."""
    return any(
        not _check(keyword, rule, header).matched
        for keyword in rule.match
        if keywords.same_in_series(keyword)
    )


def _header_matches(rule: Rule, header: Header) -> bool:
    return all(_check(keyword, rule, header).matched for keyword in rule.match)


def series_matches(rule: Rule, series: SeriesAttributes) -> bool:
    """One image of the series meets every condition of ``rule``.

    Conditions hold together on one image, as a C-FIND identifier does (PS3.4
    C.2.2.3): a lateral image never makes a PA image of the same series match.
    The other images are looked at only when the first fails on an image-level
    attribute (ViewPosition), not on one they share (Modality, PS3.3 C.7.3.1).
    """
    if _header_matches(rule, series.values):
        return True
    if _only_series_level_failed(rule, series.values):
        return False
    return any(_header_matches(rule, header) for header in series.more)


def route(rule_set: RuleSet, series: Sequence[SeriesAttributes]) -> RoutingDecision | None:
    """The decision of the first enabled rule that matches, or ``None`` (not routed)."""
    for rule in rule_set.rules:
        if not rule.enabled:
            continue
        matched = tuple(s.series_instance_uid for s in series if series_matches(rule, s))
        if matched:
            return RoutingDecision(
                rule_name=rule.name,
                priority=rule.base_priority,
                models=rule.models,
                destinations=rule.destinations,
                series_instance_uids=matched,
            )
    return None


def _explain_header(rule: Rule, header: Header) -> tuple[ConditionResult, ...]:
    results = []
    for keyword, condition in rule.match.items():
        outcome = _check(keyword, rule, header)
        results.append(
            ConditionResult(
                keyword=keyword,
                condition=condition.describe(),
                values=header.get(keyword),
                matched=outcome.matched,
                reason=outcome.reason,
            )
        )
    return tuple(results)


def _explain_series(rule: Rule, series: SeriesAttributes) -> SeriesExplanation:
    """Why the series matched (its first matching image), or why not (its first image)."""
    first = _explain_header(rule, series.values)
    shown, results = 0, first
    if not all(r.matched for r in first) and not _only_series_level_failed(rule, series.values):
        for index, header in enumerate(series.more, start=1):
            if _header_matches(rule, header):
                shown, results = index, _explain_header(rule, header)
                break
    return SeriesExplanation(
        series_instance_uid=series.series_instance_uid,
        matched=all(r.matched for r in results),
        conditions=results,
        instance=shown,
        instances=1 + len(series.more),
    )


def explain(rule_set: RuleSet, series: Sequence[SeriesAttributes]) -> list[RuleExplanation]:
    """Every rule against the study, in order; ``chosen`` marks the one :func:`route` picks.

    Unlike :func:`route` this evaluates every condition, so that an admin sees all
    reasons a rule failed, not only the first.
    """
    out: list[RuleExplanation] = []
    decided = False
    for index, rule in enumerate(rule_set.rules):
        per_series = tuple(_explain_series(rule, s) for s in series)
        matched = any(s.matched for s in per_series)
        chosen = matched and rule.enabled and not decided
        decided = decided or chosen
        out.append(
            RuleExplanation(
                index=index,
                rule_name=rule.name,
                description=rule.description,
                enabled=rule.enabled,
                matched=matched,
                chosen=chosen,
                series=per_series,
            )
        )
    return out
