"""Routing decisions: each condition type, ordering, several series, not routed, explanations."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from node.db.models import Priority
from node.routing.match import SeriesAttributes, explain, route
from node.routing.rules import RuleSet, parse_rules


def series(uid: str, **values: str | tuple[str, ...] | None) -> SeriesAttributes:
    return SeriesAttributes(
        uid,
        {k: (v,) if isinstance(v, str) else v for k, v in values.items() if v is not None},
    )


def one_rule(match: str, priority: str = "routine") -> RuleSet:
    return parse_rules(
        f'format = 1\n[[rule]]\nname = "r"\npriority = "{priority}"\n'
        f'models = ["lung-seg"]\n[rule.match]\n{match}\n'
    )


def matches(match: str, **values: str | tuple[str, ...] | None) -> bool:
    return route(one_rule(match), [series("1.2.3", **values)]) is not None


@pytest.mark.parametrize(
    ("match", "values", "expected"),
    [
        # equality; CS (Modality) ignores case, LO (SeriesDescription) does not
        ('Modality = "CR"', {"Modality": "CR"}, True),
        ('Modality = "CR"', {"Modality": "cr"}, True),
        ('Modality = "CR"', {"Modality": "DX"}, False),
        ('Modality = "CR"', {}, False),
        ('SeriesDescription = "Chest"', {"SeriesDescription": "chest"}, False),
        ('SeriesDescription = "Chest"', {"SeriesDescription": "Chest "}, True),
        # PN: case-insensitive (PS3.4 C.2.2.2.1), empty trailing components do not count
        ('ReferringPhysicianName = "SMITH^JOHN"', {"ReferringPhysicianName": "Smith^John"}, True),
        ('ReferringPhysicianName = "Smith*"', {"ReferringPhysicianName": "SMITH^JOHN"}, True),
        ('ReferringPhysicianName = "SMITH^JOHN"', {"ReferringPhysicianName": "SMITH^JANE"}, False),
        # any of
        ('Modality = ["CR", "DX"]', {"Modality": "DX"}, True),
        ('Modality = ["CR", "DX"]', {"Modality": "CT"}, False),
        # wildcard
        ('CallingAETitle = "CR*"', {"CallingAETitle": "CR_ROOM1"}, True),
        ('CallingAETitle = "CR?"', {"CallingAETitle": "CR12"}, False),
        ('CallingAETitle = "CR*"', {"CallingAETitle": "DX1"}, False),
        ('BodyPartExamined = "CH*"', {"BodyPartExamined": "chest"}, True),
        ('StudyDescription = "[x]*"', {"StudyDescription": "[x] chest"}, True),
        # regular expression: searched, flags
        ('SeriesDescription = "/PA|AP/"', {"SeriesDescription": "CHEST PA"}, True),
        ('SeriesDescription = "/PA|AP/"', {"SeriesDescription": "chest pa"}, False),
        ('SeriesDescription = "/PA|AP/i"', {"SeriesDescription": "chest pa"}, True),
        ('SeriesDescription = "/^PA$/"', {"SeriesDescription": "CHEST PA"}, False),
        # numeric ranges and equality; ages in years
        ("SeriesNumber = {min = 1, max = 5}", {"SeriesNumber": "5"}, True),
        ("SeriesNumber = {min = 1, max = 5}", {"SeriesNumber": "6"}, False),
        ("SeriesNumber = {min = 1}", {"SeriesNumber": "100"}, True),
        ("SeriesNumber = {max = 0}", {"SeriesNumber": "1"}, False),
        ("SeriesNumber = {max = 0}", {}, False),
        ("SeriesNumber = 3", {"SeriesNumber": "3"}, True),
        # a quoted number on a DS or IS attribute is still a number: "0.5" is "0.50"
        ('PixelSpacing = "0.5"', {"PixelSpacing": ("0.50", "0.50")}, True),
        ('SliceThickness = ["1", "2.5"]', {"SliceThickness": "2.500"}, True),
        ('SeriesNumber = "1"', {"SeriesNumber": "+1"}, True),
        ('SeriesNumber = "1"', {"SeriesNumber": "10"}, False),
        ("SliceThickness = {max = 2.5}", {"SliceThickness": "2.50"}, True),
        ("PatientAge = {min = 18}", {"PatientAge": "045Y"}, True),
        ("PatientAge = {min = 18}", {"PatientAge": "017Y"}, False),
        ("PatientAge = {max = 1}", {"PatientAge": "006M"}, True),
        ("PatientAge = {min = 18}", {"PatientAge": "unknown"}, False),
        ("StudyDate = {min = 20240101}", {"StudyDate": "20240131"}, True),
        # TM may be HHMM or HH (PS3.5 6.2): 1830 is 18:30, not 00:18:30
        ("StudyTime = {min = 180000}", {"StudyTime": "1830"}, True),
        ("StudyTime = {min = 180000}", {"StudyTime": "18"}, True),
        ("StudyTime = {max = 70000}", {"StudyTime": "0930"}, False),
        ("StudyTime = {min = 180000}", {"StudyTime": "183000.250"}, True),
        ("StudyTime = {min = 180000}", {"StudyTime": "18:30:00"}, True),  # ACR-NEMA form
        ("StudyDate = {min = 20240101}", {"StudyDate": "2024.01.31"}, True),
        # DT as YYYYMMDDHHMMSS, shorter forms padded, the UTC offset left aside
        (
            "AcquisitionDateTime = {min = 20240101180000}",
            {"AcquisitionDateTime": "202401011830"},
            True,
        ),
        (
            "AcquisitionDateTime = {max = 20240101180000}",
            {"AcquisitionDateTime": "20240101183000.5-0500"},
            False,
        ),
        ("AcquisitionDateTime = {min = 20240101000000}", {"AcquisitionDateTime": "2024"}, True),
        ("AcquisitionDateTime = {min = 20240101000000}", {"AcquisitionDateTime": "2023"}, False),
        # padding is not part of a value (PS3.5 6.2), in the rule as in the header
        ('BodyPartExamined = "CHEST "', {"BodyPartExamined": "CHEST"}, True),
        ('Modality = [" CR", "DX"]', {"Modality": "CR"}, True),
        ('CallingAETitle = "CR* "', {"CallingAETitle": "CR1"}, True),
        # presence
        ("BodyPartExamined = {present = true}", {"BodyPartExamined": "CHEST"}, True),
        ("BodyPartExamined = {present = true}", {"BodyPartExamined": ()}, False),
        ("BodyPartExamined = {present = true}", {}, False),
        ("BodyPartExamined = {present = false}", {}, True),
        ("BodyPartExamined = {present = false}", {"BodyPartExamined": "  "}, True),
        ("BodyPartExamined = {present = false}", {"BodyPartExamined": "CHEST"}, False),
        # not
        ('ViewPosition = {not = "LL"}', {"ViewPosition": "PA"}, True),
        ('ViewPosition = {not = "LL"}', {"ViewPosition": "LL"}, False),
        ('ViewPosition = {not = "LL"}', {}, True),
        ('ViewPosition = {not = ["LL", "RL"]}', {"ViewPosition": "RL"}, False),
        ("PatientAge = {not = {max = 17}}", {"PatientAge": "010Y"}, False),
        # multi-valued attributes: one value, or the whole value
        ('ImageType = "PRIMARY"', {"ImageType": ("DERIVED", "PRIMARY")}, True),
        ('ImageType = "DERIVED\\\\PRIMARY"', {"ImageType": ("DERIVED", "PRIMARY")}, True),
        ('ImageType = "LOCALIZER"', {"ImageType": ("ORIGINAL", "PRIMARY")}, False),
        # every condition of a rule must hold
        ('Modality = "CR"\nBodyPartExamined = "CHEST"', {"Modality": "CR"}, False),
        (
            'Modality = "CR"\nBodyPartExamined = "CHEST"',
            {"Modality": "CR", "BodyPartExamined": "CHEST"},
            True,
        ),
    ],
)
def test_condition(match: str, values: dict[str, str], expected: bool) -> None:
    assert matches(match, **values) is expected


CHEST_AND_CT = """\
format = 1

[[rule]]
name = "ct-head"
priority = "stat"
models = ["lung-seg"]
[rule.match]
Modality = "CT"
BodyPartExamined = "HEAD"

[[rule]]
name = "off"
enabled = false
priority = "stat"
models = ["lung-seg"]
[rule.match]
Modality = "CR"

[[rule]]
name = "chest"
priority = "urgent"
models = ["pneumonia-triage", "lung-seg"]
destinations = ["pacs"]
[rule.match]
Modality = ["CR", "DX"]
BodyPartExamined = "CHEST"

[[rule]]
name = "any-cr"
priority = "routine"
models = ["pneumonia-triage"]
[rule.match]
Modality = "CR"
"""


def test_first_enabled_match_wins_and_names_every_matching_series() -> None:
    rules = parse_rules(CHEST_AND_CT)
    study = [
        series("1.1", Modality="CR", BodyPartExamined="CHEST"),
        series("1.2", Modality="CR", BodyPartExamined="ABDOMEN"),
        series("1.3", Modality="DX", BodyPartExamined="chest"),
    ]
    decision = route(rules, study)
    assert decision is not None
    assert decision.rule_name == "chest"
    assert decision.priority is Priority.URGENT
    assert decision.models == ("pneumonia-triage", "lung-seg")
    assert decision.destinations == ("pacs",)
    assert decision.series_instance_uids == ("1.1", "1.3")


def test_later_rule_decides_when_earlier_ones_do_not_match() -> None:
    rules = parse_rules(CHEST_AND_CT)
    decision = route(rules, [series("2.1", Modality="CR", BodyPartExamined="HAND")])
    assert decision is not None
    assert (decision.rule_name, decision.priority) == ("any-cr", Priority.ROUTINE)


def test_no_matching_rule_is_not_routed() -> None:
    rules = parse_rules(CHEST_AND_CT)
    assert route(rules, [series("3.1", Modality="MR", BodyPartExamined="CHEST")]) is None
    assert route(rules, []) is None
    assert route(parse_rules("format = 1\n"), [series("3.2", Modality="CR")]) is None


def test_rule_without_conditions_matches_every_study() -> None:
    rules = parse_rules(
        'format = 1\n[[rule]]\nname = "all"\npriority = "routine"\nmodels = ["lung-seg"]\n'
    )
    decision = route(rules, [series("4.1"), series("4.2", Modality="OT")])
    assert decision is not None and decision.series_instance_uids == ("4.1", "4.2")


def test_explain_says_per_rule_series_and_condition_why() -> None:
    rules = parse_rules(CHEST_AND_CT)
    study = [
        series("5.1", Modality="CR", BodyPartExamined="CHEST"),
        series("5.2", Modality="CT"),
    ]
    result = explain(rules, study)
    assert [(r.rule_name, r.enabled, r.matched, r.chosen) for r in result] == [
        ("ct-head", True, False, False),
        ("off", False, True, False),
        ("chest", True, True, True),
        ("any-cr", True, True, False),
    ]
    head = result[0]
    assert [s.series_instance_uid for s in head.series] == ["5.1", "5.2"]
    cr, ct = head.series
    assert [(c.keyword, c.matched, c.reason) for c in cr.conditions] == [
        ("Modality", False, "'CR' != 'CT'"),
        ("BodyPartExamined", False, "'CHEST' != 'HEAD'"),
    ]
    assert [(c.keyword, c.matched, c.reason) for c in ct.conditions] == [
        ("Modality", True, "'CT' = 'CT'"),
        ("BodyPartExamined", False, "absent"),
    ]
    assert ct.conditions[1].values is None
    chest = result[2]
    assert chest.series[0].matched and not chest.series[1].matched
    assert chest.series[0].conditions[0].condition == "in [CR, DX]"
    assert chest.series[0].conditions[0].reason == "'CR' is one of [CR, DX]"


def test_explain_agrees_with_route() -> None:
    rules = parse_rules(CHEST_AND_CT)
    for study in (
        [series("6.1", Modality="CR", BodyPartExamined="CHEST")],
        [series("6.2", Modality="CT", BodyPartExamined="HEAD")],
        [series("6.3", Modality="US")],
    ):
        decision = route(rules, study)
        chosen = [r.rule_name for r in explain(rules, study) if r.chosen]
        assert chosen == ([decision.rule_name] if decision else [])


def test_one_image_of_a_series_must_meet_every_condition() -> None:
    """Conditions hold together on one image: a PA image and a separate ORIGINAL
    image of one series do not make a PA ORIGINAL image."""
    rules = one_rule('ViewPosition = "PA"\nImageType = "ORIGINAL"')
    first = {"ViewPosition": ("LL",), "ImageType": ("ORIGINAL", "PRIMARY")}
    second = {"ViewPosition": ("PA",), "ImageType": ("DERIVED", "PRIMARY")}
    mixed = SeriesAttributes("7.1", first, (second,))
    assert route(rules, [mixed]) is None
    third = {"ViewPosition": ("PA",), "ImageType": ("ORIGINAL", "PRIMARY")}
    study = [SeriesAttributes("7.1", first, (second, third))]
    decision = route(rules, study)
    assert decision is not None and decision.series_instance_uids == ("7.1",)
    # The tester shows the image that matched, and agrees with routing.
    (rx,) = explain(rules, study)
    assert rx.chosen
    (sx,) = rx.series
    assert sx.matched and (sx.instance, sx.instances) == (2, 3)
    assert [c.values for c in sx.conditions] == [("PA",), ("ORIGINAL", "PRIMARY")]
    (rx,) = explain(rules, [mixed])
    assert not rx.matched and (rx.series[0].instance, rx.series[0].instances) == (0, 2)


class _Unread(tuple[dict[str, tuple[str, ...]], ...]):
    """Images a test expects never to be read."""

    def __iter__(self) -> Iterator[dict[str, tuple[str, ...]]]:
        raise AssertionError("the series' other images were read")


def test_other_images_are_read_only_for_an_image_level_condition() -> None:
    """A CT series fails "Modality = CR" on its first image; its other 2000 images
    share the Modality (PS3.3 C.7.3.1) and are not read."""
    ct = SeriesAttributes("8.1", {"Modality": ("CT",), "ViewPosition": ()}, _Unread(({},)))
    rules = one_rule('Modality = "CR"\nViewPosition = "PA"')
    assert route(rules, [ct]) is None
    (rx,) = explain(rules, [ct])
    assert not rx.matched and rx.series[0].instances == 2
    cr = SeriesAttributes("8.2", {"Modality": ("CR",), "ViewPosition": ("LL",)}, _Unread(({},)))
    with pytest.raises(AssertionError, match="other images were read"):
        route(rules, [cr])
