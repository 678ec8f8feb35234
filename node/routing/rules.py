"""The routing rules document: parsing and validation (see ``rules.example.toml``).

A document is refused whole when anything in it is wrong, and every problem is
reported at once with its line, e.g.
``line 12: rule[1].match.Modality: unknown DICOM keyword 'Modalty' (did you mean
'Modality'?)``. Rules are numbered from 0 in these paths, as in the TOML array.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Collection, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from node import tomldoc
from node.db.models import Priority
from node.errors import RuleError
from node.routing import keywords
from node.routing.conditions import (
    CONDITION,
    AnyOf,
    Condition,
    ConditionBase,
    Equals,
    Not,
    Wildcard,
    as_number,
    parse_condition,
)

#: Models a rule may ask for. The worker issue extends this when it adds a model;
#: ``models.registry`` holds the same names (a test keeps them in step).
KNOWN_MODELS: frozenset[str] = frozenset({"pneumonia-triage", "lung-seg"})

#: The document format this code reads; a future change of meaning bumps it.
FORMAT = 1

PriorityName = Literal["stat", "urgent", "routine"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RULE_HEADER = re.compile(r"^\s*\[\[\s*rule\s*\]\]\s*(#.*)?$")
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
#: DICOM range matching of dates and times (PS3.4 C.2.2.2.5): ``A-B``, ``-B``, ``A-``.
_DICOM_RANGE = re.compile(r"^(?P<low>[\d.:]*)-(?P<high>[\d.:]*)$")


def _keyword(value: str) -> str:
    if keywords.is_known(value) and not keywords.is_read(value):
        raise PydanticCustomError(
            "unread_keyword",
            f"{value} is not read for routing (only the header before the pixel data is)",
        )
    if keywords.only_in_sequence_items(value):
        raise PydanticCustomError(
            "sequence_item_keyword",
            f"{value} occurs only inside sequence items, which rules do not look into; "
            "test the sequence with {present = ...}",
        )
    if keywords.is_known(value):
        return value
    hint = keywords.suggest(value)
    raise PydanticCustomError(
        "dicom_keyword",
        f"unknown DICOM keyword '{value}'" + (f" (did you mean '{hint}'?)" if hint else ""),
    )


Keyword = Annotated[str, AfterValidator(_keyword)]


class Rule(BaseModel):
    """One rule: conditions on attributes of a series, and what happens to its study."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    #: A disabled rule stays in the document (and in ``explain``) but never matches.
    enabled: StrictBool = True
    priority: PriorityName
    models: tuple[str, ...] = Field(min_length=1)
    destinations: tuple[str, ...] = ()
    #: Keyword -> condition; all must hold for one image. Empty: every study matches.
    match: dict[Keyword, Condition] = Field(default_factory=dict)

    @property
    def base_priority(self) -> Priority:
        return Priority[self.priority.upper()]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise PydanticCustomError(
                "rule_name",
                f"rule name {v!r} must be 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
            )
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        known: Collection[str] = (info.context or {}).get("known_models", KNOWN_MODELS)
        for name in v:
            if name not in known:
                raise PydanticCustomError(
                    "unknown_model",
                    f"unknown model {name!r} (known: {', '.join(sorted(known))})",
                )
        if len(set(v)) != len(v):
            raise PydanticCustomError("duplicate_model", "a model is listed twice")
        return v

    @field_validator("destinations")
    @classmethod
    def _destinations(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        known: Collection[str] | None = (info.context or {}).get("known_destinations")
        for name in v:
            if not name.strip():
                raise PydanticCustomError("destination", "empty destination name")
            if known is not None and name not in known:
                raise PydanticCustomError("unknown_destination", f"unknown destination {name!r}")
        if len(set(v)) != len(v):
            raise PydanticCustomError("duplicate_destination", "a destination is listed twice")
        return v


class RuleSet(BaseModel):
    """An ordered list of rules; the first rule that matches a study decides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1]
    #: Written ``[[rule]]`` in TOML, hence the alias.
    rules: tuple[Rule, ...] = Field(default=(), alias="rule")

    def rule(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)


def _path(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(document)"


def _line(text: str, loc: Sequence[str | int]) -> int | None:
    """The line of ``loc`` in ``text``.

    ``tomldoc.find_line`` counts ``[[rule]]`` tables but not the sub-tables under
    them (``[rule.match]``), so it is asked about the one rule's block only.
    """
    if len(loc) >= 2 and loc[0] == "rule" and isinstance(loc[1], int):
        lines = text.splitlines()
        starts = [i for i, line in enumerate(lines) if _RULE_HEADER.match(line)]
        if loc[1] < len(starts):
            start = starts[loc[1]]
            end = starts[loc[1] + 1] if loc[1] + 1 < len(starts) else len(lines)
            block = "\n".join(lines[start:end])
            found = tomldoc.find_line(block, ["rule", 0, *loc[2:]])
            return start + found if found is not None else start + 1
    return tomldoc.find_line(text, loc)


def _problem(text: str, loc: Sequence[str | int], message: str) -> tuple[int, str]:
    line = _line(text, loc)
    where = f"line {line}: " if line is not None else ""
    return (line or 0, f"{where}{_path(loc)}: {message}")


def _duplicate_names(text: str, rules: list[Any]) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(rules):
        name = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(name, str):
            continue
        if name in seen:
            message = f"duplicate rule name {name!r} (also rule[{seen[name]}])"
            found.append(_problem(text, ["rule", i, "name"], message))
        else:
            seen[name] = i
    return found


def _unsuitable_conditions(text: str, rules: list[Any]) -> list[tuple[int, str]]:
    """Conditions the attribute's VR cannot satisfy: ranges on text, values on sequences."""
    found: list[tuple[int, str]] = []
    for i, raw in enumerate(rules):
        match = raw.get("match") if isinstance(raw, dict) else None
        if not isinstance(match, dict):
            continue
        for key, value in match.items():
            if not keywords.is_known(key):
                continue
            try:
                parsed = parse_condition(value)
                condition = (
                    parsed
                    if isinstance(parsed, ConditionBase)
                    else CONDITION.validate_python(parsed)
                )
            except (PydanticCustomError, ValidationError):
                continue  # reported by validation
            vr = keywords.vr_of(key)
            loc = ["rule", i, "match", key]
            if keywords.is_opaque(key) and not condition.only_presence():
                message = f"{key} (VR {vr}) can only be tested with {{present = ...}}"
                found.append(_problem(text, loc, message))
            elif condition.uses_numbers() and not keywords.is_numeric(key):
                message = f"a number or range needs a numeric attribute; {key} has VR {vr}"
                found.append(_problem(text, loc, message))
            elif hint := _text_never_equal(condition, key, vr):
                found.append(_problem(text, loc, hint))
    return found


def _text_never_equal(condition: ConditionBase, key: str, vr: str) -> str | None:
    """Why a text condition could never equal a stored value of ``key``, or ``None``."""
    if vr in ("DA", "TM") and (hint := _range_text(condition, vr)):
        return hint
    if keywords.is_single_valued(key):
        return _several_values(condition, key)
    return None


def _several_values(condition: ConditionBase, key: str) -> str | None:
    """Why ``"CR\\DX"`` on a one-valued attribute is refused, or ``None``.

    A backslash separates values (PS3.5 6.4): the text is one multi-valued value,
    which a single-valued attribute never equals.
    """
    for value in _texts(condition):
        if "\\" in value:
            items = ", ".join(f'"{v.strip()}"' for v in value.split("\\"))
            return (
                f"'{value}' has several values but {key} holds one; "
                f"for any of them write a list: [{items}]"
            )
    return None


def _texts(condition: ConditionBase) -> list[str]:
    if isinstance(condition, Equals):
        return [condition.value]
    if isinstance(condition, Wildcard):
        return [condition.pattern]
    if isinstance(condition, AnyOf):
        return [t for option in condition.options for t in _texts(option)]
    if isinstance(condition, Not):
        return _texts(condition.condition)
    return []


def _range_text(condition: ConditionBase, vr: str) -> str | None:
    """Why a DICOM range written as text (``"20240101-20240131"``) is refused, or ``None``.

    It would be compared as one value and never be equal to a stored date or time.
    """
    for value in _texts(condition):
        m = _DICOM_RANGE.match(value)
        if m is None or not (m["low"] or m["high"]):
            continue
        bounds = [
            f"{key} = {_bound(m[part], vr)}"
            for key, part in (("min", "low"), ("max", "high"))
            if m[part]
        ]
        return (
            f"'{value}' is DICOM range matching, which a rule writes as a range: "
            "{" + ", ".join(bounds) + "}"
        )
    return None


def _bound(text: str, vr: str) -> str:
    number = as_number(text, vr=vr)
    if number is None:
        return text
    return str(int(number)) if number.is_integer() else f"{number}"


def _message(kind: str, loc: Sequence[str | int], msg: str) -> str:
    """Pydantic's wording where an admin would not guess what it means."""
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "too_short" and loc and loc[-1] == "models":
        return "list at least one model"
    if list(loc) == ["format"]:
        return f"this node reads format = {FORMAT}"
    return msg


def parse_rules(
    text: str,
    source: str = "<rules>",
    *,
    known_models: Collection[str] = KNOWN_MODELS,
    known_destinations: Collection[str] | None = None,
) -> RuleSet:
    """Parse and validate a rules document, or raise :class:`RuleError` with every problem.

    ``known_destinations``: when given, destinations outside it are refused.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        m = _TOML_POSITION.search(message)
        if m:
            message = (
                f"line {m.group(1)}: TOML syntax error: {message[: m.start()]} "
                f"(column {m.group(2)})"
            )
        else:
            message = f"TOML syntax error: {message}"
        raise RuleError(source, [message]) from None

    rules = document.get("rule")
    problems = []
    if isinstance(rules, list):
        # What pydantic cannot see field by field.
        problems = _duplicate_names(text, rules) + _unsuitable_conditions(text, rules)
    rule_set: RuleSet | None = None
    try:
        rule_set = RuleSet.model_validate(
            document,
            context={"known_models": known_models, "known_destinations": known_destinations},
        )
    except ValidationError as exc:
        for err in exc.errors():
            loc = [p for p in err["loc"] if p != "[key]"]
            problems.append(_problem(text, loc, _message(err["type"], loc, err["msg"])))
    if problems or rule_set is None:
        ordered = sorted(dict.fromkeys(problems), key=lambda p: p[0])
        raise RuleError(source, [message for _, message in ordered])
    return rule_set
