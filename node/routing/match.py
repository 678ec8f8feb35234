"""Applying rules to a study: the routing decision, and an explanation of it.

A rule matches a study when at least one of its series meets every condition of
the rule; the decision names all series that do (the worker analyses those).
Rules are tried in order and the first enabled rule that matches decides. No
match is a result too (``None``): the caller records the study as not routed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from node.db.models import Priority
from node.routing import keywords
from node.routing.conditions import Outcome
from node.routing.rules import Rule, RuleSet


@dataclass(frozen=True, slots=True)
class SeriesAttributes:
    """What rules can see of one series: its header attributes and the sending AE.

    ``values`` maps DICOM keywords (and ``CallingAETitle``) to the element's values
    as text, one string per value; an element present without a value maps to ``()``.
    """

    series_instance_uid: str
    values: Mapping[str, tuple[str, ...]] = field(hash=False)

    def get(self, keyword: str) -> tuple[str, ...] | None:
        return self.values.get(keyword)


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
    conditions: tuple[ConditionResult, ...]


@dataclass(frozen=True, slots=True)
class RuleExplanation:
    """One rule against one study: per series, per condition, matched or not and why."""

    index: int
    rule_name: str
    description: str
    enabled: bool
    #: At least one series meets every condition (whether or not the rule is enabled).
    matched: bool
    #: This rule decides the study: the first enabled rule that matched.
    chosen: bool
    series: tuple[SeriesExplanation, ...]


def _check(keyword: str, rule: Rule, series: SeriesAttributes) -> Outcome:
    return rule.match[keyword].evaluate(
        series.get(keyword),
        fold=keywords.is_case_insensitive(keyword),
        vr=keywords.vr_of(keyword),
    )


def series_matches(rule: Rule, series: SeriesAttributes) -> bool:
    return all(_check(keyword, rule, series).matched for keyword in rule.match)


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


def _explain_series(rule: Rule, series: SeriesAttributes) -> SeriesExplanation:
    results = []
    for keyword, condition in rule.match.items():
        outcome = _check(keyword, rule, series)
        results.append(
            ConditionResult(
                keyword=keyword,
                condition=condition.describe(),
                values=series.get(keyword),
                matched=outcome.matched,
                reason=outcome.reason,
            )
        )
    return SeriesExplanation(
        series_instance_uid=series.series_instance_uid,
        matched=all(r.matched for r in results),
        conditions=tuple(results),
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
