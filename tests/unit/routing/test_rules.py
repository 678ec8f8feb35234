"""Parsing rules documents: the forms admins write, and mistakes refused with line and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import registry
from node.db.models import Priority
from node.errors import NodeError, RuleError
from node.routing.conditions import AnyOf, Equals, Not, Presence, Range, Regex, Wildcard
from node.routing.rules import KNOWN_MODELS, parse_rules
from node.routing.store import default_rules_text

ROOT = Path(__file__).resolve().parents[3]

GOOD = """\
format = 1

[[rule]]
name = "chest-xray"
description = "Chest radiographs"
priority = "routine"
models = ["pneumonia-triage", "lung-seg"]
destinations = ["pacs"]

[rule.match]
Modality = ["CR", "DX"]
BodyPartExamined = "CHEST"
SeriesDescription = "/PA|AP|CHEST/i"
CallingAETitle = "CR*"
PatientAge = {min = 18, max = 99}
ImageComments = {present = false}
ViewPosition = {not = "LL"}
SamplesPerPixel = 1
"""


def test_every_condition_form_is_read() -> None:
    rule_set = parse_rules(GOOD)
    (rule,) = rule_set.rules
    assert rule.name == "chest-xray"
    assert rule.base_priority is Priority.ROUTINE
    assert rule.models == ("pneumonia-triage", "lung-seg")
    assert rule.destinations == ("pacs",)
    m = rule.match
    assert m["Modality"] == AnyOf(options=(Equals(value="CR"), Equals(value="DX")))
    assert m["BodyPartExamined"] == Equals(value="CHEST")
    assert m["SeriesDescription"] == Regex(pattern="PA|AP|CHEST", flags="i")
    assert m["CallingAETitle"] == Wildcard(pattern="CR*")
    assert m["PatientAge"] == Range(min=18, max=99)
    assert m["ImageComments"] == Presence(present=False)
    assert m["ViewPosition"] == Not(condition=Equals(value="LL"))
    assert m["SamplesPerPixel"] == Range(min=1, max=1)
    assert list(m) == [
        "Modality",
        "BodyPartExamined",
        "SeriesDescription",
        "CallingAETitle",
        "PatientAge",
        "ImageComments",
        "ViewPosition",
        "SamplesPerPixel",
    ]


def test_parsed_rules_survive_a_json_round_trip() -> None:
    """The admin API may send rules as JSON (model_dump); they must read back equal."""
    rule_set = parse_rules(GOOD)
    again = type(rule_set).model_validate(rule_set.model_dump(by_alias=True))
    assert again == rule_set


BAD = """\
format = 1

[[rule]]
name = "chest"
priority = "routine"
models = ["pneumonia-triage"]
[rule.match]
Modality = "CR"

[[rule]]
name = "chest"
prority = "stat"
priority = "asap"
models = ["pneumonia"]
[rule.match]
Modalty = "CR"
PatientName = {min = 3}
ReferencedImageSequence = "X"
SeriesDescription = "/(/"
PatientAge = {min = 9, max = 1}
BodyPartExamined = ""
ViewPosition = {foo = 1}
"""


def test_all_mistakes_are_reported_at_once_with_their_lines() -> None:
    with pytest.raises(RuleError) as caught:
        parse_rules(BAD, "bad.toml")
    err = caught.value
    assert isinstance(err, NodeError)
    assert err.source == "bad.toml"
    expected = [
        ("line 11: rule[1].name:", "duplicate rule name 'chest'"),
        ("line 12: rule[1].prority:", "unknown key"),
        ("line 13: rule[1].priority:", "'stat', 'urgent' or 'routine'"),
        ("line 14: rule[1].models:", "unknown model 'pneumonia'"),
        ("line 16: rule[1].match.Modalty:", "unknown DICOM keyword 'Modalty'"),
        ("line 17: rule[1].match.PatientName:", "numeric attribute"),
        ("line 18: rule[1].match.ReferencedImageSequence:", "{present = ...}"),
        ("line 19: rule[1].match.SeriesDescription:", "invalid regular expression"),
        ("line 20: rule[1].match.PatientAge:", "min 9 is greater than max 1"),
        ("line 21: rule[1].match.BodyPartExamined:", "empty string"),
        ("line 22: rule[1].match.ViewPosition:", "unknown condition table"),
    ]
    assert len(err.problems) == len(expected), err.problems
    for problem, (where, why) in zip(err.problems, expected, strict=True):
        assert problem.startswith(where), problem
        assert why in problem, problem
    assert "did you mean 'Modality'?" in err.problems[4]
    assert "line 22" in str(err)


def test_line_points_into_the_right_rule() -> None:
    """A mistake in the third rule's match table is reported at that rule's line."""
    text = GOOD.replace('CallingAETitle = "CR*"\n', "") + (
        '\n[[rule]]\nname = "b"\npriority = "stat"\nmodels = ["lung-seg"]\n'
        '[rule.match]\nModality = "CR"\n'
        '\n[[rule]]\nname = "c"\npriority = "stat"\nmodels = ["lung-seg"]\n'
        '[rule.match]\nModality = "CR"\nBodyPartExamimed = "CHEST"\n'
    )
    with pytest.raises(RuleError) as caught:
        parse_rules(text)
    (problem,) = caught.value.problems
    line = text.splitlines().index('BodyPartExamimed = "CHEST"') + 1
    assert problem.startswith(f"line {line}: rule[2].match.BodyPartExamimed: ")


def test_missing_keys_point_at_the_rule() -> None:
    text = 'format = 1\n\n[[rule]]\nname = "a"\nmodels = ["lung-seg"]\n'
    with pytest.raises(RuleError) as caught:
        parse_rules(text)
    assert caught.value.problems == ["line 3: rule[0].priority: required key is missing"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("format = 1\n[[rule]]\nname = \n", "line 3: TOML syntax error: Invalid value"),
        ("format = 2\n", "line 1: format: this node reads format = 1"),
        ("", "format: required key is missing"),
        ("format = 1\nrules = []\n", "line 2: rules: unknown key"),
        (
            'format = 1\n[[rule]]\nname = "has space"\npriority = "stat"\nmodels = ["lung-seg"]\n',
            "line 3: rule[0].name: rule name 'has space' must be",
        ),
        (
            'format = 1\n[[rule]]\nname = "a"\npriority = "stat"\nmodels = []\n',
            "line 5: rule[0].models: list at least one model",
        ),
        (
            'format = 1\n[[rule]]\nname = "a"\npriority = "stat"\nmodels = ["lung-seg"]\n'
            'match = {Modality = "/x/g"}\n',
            "line 6: rule[0].match.Modality: unknown regular expression flag 'g'",
        ),
        (
            'format = 1\n[[rule]]\nname = "a"\npriority = "stat"\nmodels = ["lung-seg"]\n'
            "match = {Modality = true}\n",
            "line 6: rule[0].match.Modality: True is not a condition",
        ),
    ],
)
def test_single_mistakes(text: str, expected: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse_rules(text)
    assert len(caught.value.problems) == 1, caught.value.problems
    assert caught.value.problems[0].startswith(expected), caught.value.problems


_RULE = 'format = 1\n[[rule]]\nname = "a"\npriority = "stat"\nmodels = ["lung-seg"]\n'


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ('{kind = "regex", pattern = "(CR"}', "invalid regular expression /(CR/"),
        ('{kind = "regex", pattern = "CR", flags = "x"}', "unknown regular expression flag 'x'"),
        ('{kind = "regex", pattern = ""}', "empty regular expression"),
        ('{kind = "any_of", options = []}', "empty list matches nothing"),
        ('{kind = "equals", value = ""}', "empty string"),
        ('{kind = "wildcard", pattern = ""}', "empty wildcard pattern"),
        ('{kind = "range", min = 5, max = 1}', "min 5 is greater than max 1"),
        ('{kind = "range"}', "a range needs min, max or both"),
        ('{not = {kind = "regex", pattern = "["}}', "invalid regular expression"),
    ],
)
def test_conditions_written_as_json_are_checked_like_the_short_forms(
    condition: str, expected: str
) -> None:
    """The ``{kind = ...}`` form (what the admin API round-trips) gets the same checks:
    a mistake there was saved as the active rules and then failed every routing."""
    with pytest.raises(RuleError) as caught:
        parse_rules(_RULE + f"match = {{Modality = {condition}}}\n")
    (problem,) = caught.value.problems
    assert problem.startswith("line 6: rule[0].match.Modality") and expected in problem, problem


def test_range_in_json_form_on_a_text_attribute_is_refused() -> None:
    with pytest.raises(RuleError) as caught:
        parse_rules(_RULE + 'match = {PatientName = {kind = "range", min = 1}}\n')
    assert caught.value.problems == [
        "line 6: rule[0].match.PatientName: a number or range needs a numeric attribute; "
        "PatientName has VR PN"
    ]


def test_known_models_and_destinations_are_parameters() -> None:
    text = 'format = 1\n[[rule]]\nname = "a"\npriority = "stat"\nmodels = ["new-model"]\n'
    with pytest.raises(RuleError):
        parse_rules(text)
    assert parse_rules(text, known_models={"new-model"}).rules[0].models == ("new-model",)
    with_dest = text.replace("models", 'destinations = ["pacs"]\nmodels')
    with pytest.raises(RuleError, match="unknown destination 'pacs'"):
        parse_rules(with_dest, known_models={"new-model"}, known_destinations={"ris"})


def test_known_models_follow_the_model_registry() -> None:
    assert {registry.CLASSIFIER_NAME, registry.SEGMENTER_NAME} <= KNOWN_MODELS


def test_shipped_documents_are_valid() -> None:
    default = parse_rules(default_rules_text())
    assert [r.name for r in default.rules] == ["chest-xray"]
    assert default.rules[0].models == ("pneumonia-triage", "lung-seg")
    example = parse_rules((ROOT / "rules.example.toml").read_text())
    assert len(example.rules) >= 2
    kinds = {type(c).__name__ for r in example.rules for c in r.match.values()}
    inner = {
        type(c.condition).__name__
        for r in example.rules
        for c in r.match.values()
        if isinstance(c, Not)
    }
    assert {"AnyOf", "Equals", "Wildcard", "Presence", "Range", "Not"} <= kinds
    assert {"Regex", "Range"} <= inner


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        # A quoted boolean was read as true ("no" too): a rule meant off stayed on.
        ('enabled = "no"', "line 6: rule[0].enabled: Input should be a valid boolean"),
        ('destinations = ["pacs", "pacs"]', "line 6: rule[0].destinations: a destination is"),
        ("match = {SliceThickness = nan}", "line 6: rule[0].match.SliceThickness: nan is not"),
        ("match = {SliceThickness = {max = nan}}", "line 6: rule[0].match.SliceThickness: max"),
        # DICOM range matching (PS3.4 C.2.2.2.5) written as text compared as one date.
        ('match = {StudyDate = "20240101-20240131"}', "line 6: rule[0].match.StudyDate: "),
        ('match = {StudyTime = ["-0700"]}', "line 6: rule[0].match.StudyTime: "),
        ('match = {BodyPartExamined = "   "}', "line 6: rule[0].match.BodyPartExamined: empty"),
    ],
)
def test_values_that_never_mean_what_they_say_are_refused(line: str, expected: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse_rules(_RULE + line + "\n")
    (problem,) = caught.value.problems
    assert problem.startswith(expected), problem


def test_a_date_range_written_as_dicom_text_says_how_to_write_it() -> None:
    with pytest.raises(RuleError) as caught:
        parse_rules(_RULE + 'match = {StudyDate = "20240101-20240131"}\n')
    assert "{min = 20240101, max = 20240131}" in caught.value.problems[0]
    # An offset in a DT (date time) value is not a range.
    assert parse_rules(_RULE + 'match = {AcquisitionDateTime = "20240101120000-0500"}\n')


@pytest.mark.parametrize(
    ("keyword", "why"),
    [
        # Headers are read up to the pixel data: {present = true} never matched.
        ("PixelData", "not read for routing"),
        ("FloatPixelData", "not read for routing"),
        ("DataSetTrailingPadding", "not read for routing"),
        # Only inside sequence items (PS3.3 8.8): such a rule never matched.
        ("CodeValue", "inside sequence items"),
        ("CodeMeaning", "inside sequence items"),
        ("CodingSchemeDesignator", "inside sequence items"),
    ],
)
def test_attributes_routing_never_sees_are_refused(keyword: str, why: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse_rules(_RULE + f"match = {{{keyword} = {{present = true}}}}\n")
    (problem,) = caught.value.problems
    assert problem.startswith(f"line 6: rule[0].match.{keyword}: ") and why in problem, problem


def test_a_backslash_on_a_single_valued_attribute_is_refused() -> None:
    """``"CR\\\\DX"`` is one two-valued value (PS3.5 6.4); Modality holds one value, so
    such a rule never matched. A list says "any of"."""
    with pytest.raises(RuleError) as caught:
        parse_rules(_RULE + 'match = {Modality = "CR\\\\DX"}\n')
    assert caught.value.problems == [
        "line 6: rule[0].match.Modality: 'CR\\DX' has several values but Modality holds "
        'one; for any of them write a list: ["CR", "DX"]'
    ]
    assert parse_rules(_RULE + 'match = {ImageType = "ORIGINAL\\\\PRIMARY*"}\n')
