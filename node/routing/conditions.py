"""The conditions a rule puts on one attribute, written as TOML values.

=====================================  =========================================
``"CHEST"``                            equality
``"CR*"``, ``"CHEST?"``                wildcard (``*`` any run, ``?`` one char)
``"/PA|AP/i"``                         regular expression (search), flags ``i``
``["CR", "DX"]``                       any of (each item one of the above)
``3``, ``{min = 18}``, ``{max = 5}``   number equal / in an inclusive range
``{present = true}``                   attribute present with a value (or not)
``{not = <condition>}``                negation of any condition
=====================================  =========================================

An attribute may hold several values (``ImageType = DERIVED\\PRIMARY``): a condition
on text holds if it holds for one of the values or for the whole backslash-joined
value. CS and PN values compare ignoring case in equality, any-of and wildcards; a regular
expression follows its own flags. Leading and trailing spaces are padding (PS3.5 6.2),
in the rule as in the header. Equality on DS and IS (numbers written as text) compares
numbers: ``"0.5"`` equals ``0.50``. Ages (AS) are compared in years, dates (DA) as
``YYYYMMDD``, times (TM) as ``HHMMSS`` and date-times (DT) as ``YYYYMMDDHHMMSS``
numbers (:func:`as_number`).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

_REGEX = re.compile(r"^/(?P<pattern>.*)/(?P<flags>[A-Za-z]*)$", re.DOTALL)
_REGEX_FLAGS = {"i": re.IGNORECASE}
_EMPTY_TEXT = "empty string; use {present = false} for an absent or empty attribute"
_AGE = re.compile(r"^(\d{3})([DWMY])$")
_TIME = re.compile(r"^(?P<hms>\d{2}|\d{4}|\d{6})(?P<fraction>\.\d{0,6})?$")
_OLD_TIME = re.compile(r"^\d{2}:\d{2}(:\d{2}(\.\d{0,6})?)?$")
#: DT: YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX] (PS3.5 6.2); the offset is left aside.
_DATE_TIME = re.compile(r"^(?P<digits>\d{4}(?:\d{2}){0,5})(?P<fraction>\.\d{1,6})?(?:[+-]\d{4})?$")
#: What a shorter DT lacks, as its first instant: 2024 is 20240101000000.
_DT_PADDING = "0101000000"
_OLD_DATE = re.compile(r"^\d{4}\.\d{2}\.\d{2}$")
#: VRs holding numbers as decimal text (PS3.5 6.2), compared as numbers in equality.
_DECIMAL_TEXT_VRS = frozenset({"DS", "IS"})
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}

FORMS = (
    '"TEXT", "WILD*CARD", "/regex/i", [any, of], a number, {min = N, max = N}, '
    "{present = true|false} or {not = <condition>}"
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """Whether a condition held for one image's values, and why, in words."""

    matched: bool
    reason: str


def _show(values: tuple[str, ...]) -> str:
    return "\\".join(values) if len(values) != 1 else values[0]


def _candidates(values: tuple[str, ...], fold: bool) -> list[str]:
    texts = [v.strip() for v in values]
    if len(texts) > 1:
        texts.append("\\".join(texts))
    return [t.casefold() for t in texts] if fold else texts


def _has_value(values: tuple[str, ...] | None) -> bool:
    return values is not None and any(v.strip() for v in values)


def _absent(values: tuple[str, ...] | None) -> Outcome:
    return Outcome(False, "absent" if values is None else "empty")


def as_number(value: str, *, vr: str = "") -> float | None:
    """A DICOM value as the number a range compares (PS3.5 6.2).

    AS ages (``045Y``, ``006M``) in years; TM times as ``HHMMSS.FFFFFF``, so the
    shorter ``HHMM`` and ``HH`` forms (``1830`` is 18:30) and the ACR-NEMA
    ``HH:MM:SS`` read as the same time; DA dates as ``YYYYMMDD``, the ACR-NEMA
    ``YYYY.MM.DD`` too; DT date-times as ``YYYYMMDDHHMMSS.FFFFFF``, a shorter one at
    its first instant (``2024`` is ``20240101000000``), the UTC offset left aside.
    """
    text = value.strip()
    if vr == "AS":
        m = _AGE.match(text)
        if m:
            return int(m.group(1)) * _DAYS_PER[m.group(2)] / _DAYS_PER["Y"]
    elif vr == "TM":
        m = _TIME.match(text.replace(":", "") if _OLD_TIME.match(text) else text)
        if m is None:
            return None
        text = m.group("hms").ljust(6, "0") + (m.group("fraction") or "")
    elif vr == "DA" and _OLD_DATE.match(text):
        text = text.replace(".", "")
    elif vr == "DT":
        m = _DATE_TIME.match(text)
        if m is None:
            return None
        digits = m.group("digits")
        text = digits + _DT_PADDING[len(digits) - 4 :] + (m.group("fraction") or "")
    try:
        return float(text)
    except ValueError:
        return None


@lru_cache(maxsize=256)
def check_regex(pattern: str, flags: str) -> None:
    """Refuse what :func:`compile_regex` could not compile, with the admin's reason."""
    bad = sorted(set(flags) - set(_REGEX_FLAGS))
    if bad:
        raise _problem(f"unknown regular expression flag {bad[0]!r} (allowed: i)")
    if not pattern:
        raise _problem("empty regular expression")
    try:
        compile_regex(pattern, flags)
    except re.error as exc:
        raise _problem(f"invalid regular expression /{pattern}/: {exc}") from None


def check_bounds(low: float | None, high: float | None) -> None:
    for key, bound in (("min", low), ("max", high)):
        if bound is not None and math.isnan(bound):
            raise _problem(f"{key} must be a number, not nan (it would never match)")
    if low is None and high is None:
        raise _problem("a range needs min, max or both")
    if low is not None and high is not None and low > high:
        raise _problem(f"min {low:g} is greater than max {high:g}")


def compile_regex(pattern: str, flags: str) -> re.Pattern[str]:
    bits = 0
    for f in flags:
        bits |= _REGEX_FLAGS[f]
    return re.compile(pattern, bits)


class ConditionBase(BaseModel):
    """What every condition can do; the subclasses are the forms in the table above."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def evaluate(
        self, values: tuple[str, ...] | None, *, fold: bool = False, vr: str = ""
    ) -> Outcome:
        """Test ``values`` (``None``: attribute absent).

        ``fold``: compare ignoring case; ``vr``: the attribute's VR, which says how a
        value reads as a number (:func:`as_number`).
        """
        raise NotImplementedError

    def describe(self) -> str:
        """The condition as an admin reads it, e.g. ``in [CR, DX]``."""
        raise NotImplementedError

    def uses_numbers(self) -> bool:
        return False

    def only_presence(self) -> bool:
        return False


class Equals(ConditionBase):
    kind: Literal["equals"] = "equals"
    value: str

    @field_validator("value")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        # Padding is no part of a value (PS3.5 6.2); stored values are compared stripped.
        if value.strip() == "":
            raise _problem(_EMPTY_TEXT)
        return value.strip()

    def evaluate(
        self, values: tuple[str, ...] | None, *, fold: bool = False, vr: str = ""
    ) -> Outcome:
        if values is None or not _has_value(values):
            return _absent(values)
        want = self.value.casefold() if fold else self.value
        hit = want in _candidates(values, fold) or self._same_number(values, vr)
        return Outcome(hit, f"'{_show(values)}' {'=' if hit else '!='} '{self.value}'")

    def _same_number(self, values: tuple[str, ...], vr: str) -> bool:
        """DS and IS values are numbers written as text: ``"0.5"`` equals ``"0.50"``."""
        if not set(vr.split(" or ")) & _DECIMAL_TEXT_VRS:
            return False
        want = as_number(self.value)
        return want is not None and any(as_number(v) == want for v in values)

    def describe(self) -> str:
        return f"= '{self.value}'"


class Wildcard(ConditionBase):
    kind: Literal["wildcard"] = "wildcard"
    pattern: str

    @field_validator("pattern")
    @classmethod
    def _not_empty(cls, pattern: str) -> str:
        if pattern.strip() == "":
            raise _problem("empty wildcard pattern")
        return pattern.strip()

    def evaluate(
        self, values: tuple[str, ...] | None, *, fold: bool = False, vr: str = ""
    ) -> Outcome:
        if values is None or not _has_value(values):
            return _absent(values)
        # fnmatch would also read [...] as a set; DICOM wildcards (PS3.4 C.2.2.2.4) are * and ?.
        pattern = "".join("[[]" if c == "[" else c for c in self.pattern)
        pattern = pattern.casefold() if fold else pattern
        hit = any(fnmatch.fnmatchcase(c, pattern) for c in _candidates(values, fold))
        return Outcome(
            hit, f"'{_show(values)}' {'matches' if hit else 'does not match'} '{self.pattern}'"
        )

    def describe(self) -> str:
        return f"like '{self.pattern}'"


class Regex(ConditionBase):
    kind: Literal["regex"] = "regex"
    pattern: str
    flags: str = ""

    @model_validator(mode="after")
    def _compiles(self) -> Regex:
        check_regex(self.pattern, self.flags)
        return self

    def evaluate(
        self, values: tuple[str, ...] | None, *, fold: bool = False, vr: str = ""
    ) -> Outcome:
        if values is None or not _has_value(values):
            return _absent(values)
        rx = compile_regex(self.pattern, self.flags)
        hit = any(rx.search(c) for c in _candidates(values, False))
        return Outcome(
            hit,
            f"'{_show(values)}' {'matches' if hit else 'does not match'} "
            f"/{self.pattern}/{self.flags}",
        )

    def describe(self) -> str:
        return f"~ /{self.pattern}/{self.flags}"


class Range(ConditionBase):
    """An inclusive numeric range; ``min == max`` is numeric equality."""

    kind: Literal["range"] = "range"
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Range:
        check_bounds(self.min, self.max)
        return self

    def evaluate(
        self, values: tuple[str, ...] | None, *, fold: bool = False, vr: str = ""
    ) -> Outcome:
        if values is None or not _has_value(values):
            return _absent(values)
        age = vr == "AS"
        numbers = [n for v in values if (n := as_number(v, vr=vr)) is not None]
        if not numbers:
            return Outcome(False, f"'{_show(values)}' is not a number")
        hit = any(
            (self.min is None or n >= self.min) and (self.max is None or n <= self.max)
            for n in numbers
        )
        shown = _show(values) + (f" ({_num(numbers[0])} years)" if age and len(values) == 1 else "")
        if self.min is not None and self.min == self.max:
            return Outcome(hit, f"'{shown}' {'=' if hit else '!='} {_num(self.min)}")
        return Outcome(hit, f"'{shown}' {'is' if hit else 'is not'} {self._range()}")

    def _range(self) -> str:
        if self.min is not None and self.min == self.max:
            return f"= {_num(self.min)}"
        if self.max is None:
            return f">= {_num(self.min)}"
        if self.min is None:
            return f"<= {_num(self.max)}"
        return f"in {_num(self.min)}..{_num(self.max)}"

    def describe(self) -> str:
        return self._range()

    def uses_numbers(self) -> bool:
        return True


def _num(x: float | None) -> str:
    return f"{x:g}" if x is not None else "?"


Scalar = Annotated[Equals | Wildcard | Regex | Range, Field(discriminator="kind")]


class AnyOf(ConditionBase):
    kind: Literal["any_of"] = "any_of"
    options: tuple[Scalar, ...]

    @field_validator("options")
    @classmethod
    def _not_empty(cls, options: tuple[Scalar, ...]) -> tuple[Scalar, ...]:
        if not options:
            raise _problem("empty list matches nothing; list at least one value")
        return options

    def evaluate(
        self, values: tuple[str, ...] | None, *, fold: bool = False, vr: str = ""
    ) -> Outcome:
        if values is None or not _has_value(values):
            return _absent(values)
        for option in self.options:
            if option.evaluate(values, fold=fold, vr=vr).matched:
                return Outcome(True, f"'{_show(values)}' is one of {self._list()}")
        return Outcome(False, f"'{_show(values)}' is none of {self._list()}")

    def _list(self) -> str:
        return "[" + ", ".join(_short(o) for o in self.options) + "]"

    def describe(self) -> str:
        return f"in {self._list()}"

    def uses_numbers(self) -> bool:
        return any(o.uses_numbers() for o in self.options)


def _short(option: ConditionBase) -> str:
    if isinstance(option, Equals):
        return option.value
    if isinstance(option, Wildcard):
        return option.pattern
    if isinstance(option, Regex):
        return f"/{option.pattern}/{option.flags}"
    return option.describe()


class Presence(ConditionBase):
    kind: Literal["presence"] = "presence"
    present: bool

    def evaluate(
        self, values: tuple[str, ...] | None, *, fold: bool = False, vr: str = ""
    ) -> Outcome:
        has = _has_value(values)
        state = "present" if has else ("absent" if values is None else "empty")
        return Outcome(has == self.present, state)

    def describe(self) -> str:
        return "present" if self.present else "absent or empty"

    def only_presence(self) -> bool:
        return True


class Not(ConditionBase):
    kind: Literal["not"] = "not"
    condition: Condition

    def evaluate(
        self, values: tuple[str, ...] | None, *, fold: bool = False, vr: str = ""
    ) -> Outcome:
        inner = self.condition.evaluate(values, fold=fold, vr=vr)
        return Outcome(not inner.matched, f"not ({inner.reason})")

    def describe(self) -> str:
        return f"not ({self.condition.describe()})"

    def uses_numbers(self) -> bool:
        return self.condition.uses_numbers()

    def only_presence(self) -> bool:
        return self.condition.only_presence()


def _problem(message: str) -> PydanticCustomError:
    # A custom error keeps pydantic's "Value error, " prefix out of what admins read.
    return PydanticCustomError("rule_condition", message)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _problem(f"{key} must be a number, not {value!r}")
    return float(value)


def _scalar(value: Any) -> Equals | Wildcard | Regex | Range:
    if isinstance(value, bool):
        raise _problem(f"{value!r} is not a condition; use {{present = {str(value).lower()}}}")
    if isinstance(value, int | float):
        if math.isnan(value):
            raise _problem("nan is not a number a value can equal; it would never match")
        return Range(min=float(value), max=float(value))
    if not isinstance(value, str):
        raise _problem(f"unsupported value {value!r}; write one of: {FORMS}")
    if value.strip() == "":
        raise _problem(_EMPTY_TEXT)
    if value.startswith("/"):
        m = _REGEX.match(value)
        if m is None:
            raise _problem(f"regular expression {value!r} must be written /pattern/flags")
        pattern, flags = m.group("pattern"), m.group("flags")
        check_regex(pattern, flags)
        return Regex(pattern=pattern, flags=flags)
    if "*" in value or "?" in value:
        return Wildcard(pattern=value)
    return Equals(value=value)


def parse_condition(value: Any) -> ConditionBase | dict[str, Any]:
    """Read a TOML value as a condition, or raise a pydantic error saying what is wrong."""
    if isinstance(value, ConditionBase):
        return value
    if isinstance(value, list):
        if not value:
            raise _problem("empty list matches nothing; list at least one value")
        if any(isinstance(v, list | dict) for v in value):
            raise _problem("list items must be strings or numbers")
        return AnyOf(options=tuple(_scalar(v) for v in value))
    if isinstance(value, dict):
        if "kind" in value:  # a condition as JSON (model_dump), e.g. from the admin API
            return value  # the tagged union validates it
        keys = set(value)
        if keys == {"present"}:
            if not isinstance(value["present"], bool):
                raise _problem("present must be true or false")
            return Presence(present=value["present"])
        if keys == {"not"}:
            return Not(condition=parse_condition(value["not"]))
        if keys and keys <= {"min", "max"}:
            low = _number(value["min"], "min") if "min" in value else None
            high = _number(value["max"], "max") if "max" in value else None
            check_bounds(low, high)
            return Range(min=low, max=high)
        raise _problem(f"unknown condition table with keys {sorted(keys)}; write one of: {FORMS}")
    return _scalar(value)


Condition = Annotated[
    Equals | Wildcard | Regex | Range | AnyOf | Presence | Not,
    Field(discriminator="kind"),
    BeforeValidator(parse_condition),
]

Not.model_rebuild()

#: Validates a condition in any form, e.g. a JSON one (``{kind = ...}``) for the VR checks.
CONDITION: TypeAdapter[ConditionBase] = TypeAdapter(Condition)
