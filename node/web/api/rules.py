"""Routing rules (admins): the active text, validation with line numbers, a tester, versions."""

from __future__ import annotations

import re
from datetime import datetime

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel
from sqlalchemy import select

from node.db.models import Study
from node.errors import RuleError, StorageError
from node.routing.attributes import study_series_attributes
from node.routing.match import explain
from node.routing.store import NOTHING_ROUTED
from node.web import auth
from node.web.context import Context, RulesVersion, WebContext, client_address

router = APIRouter(prefix="/api/rules", tags=["rules"])

_LINE = re.compile(r"^line (\d+): (.*)$", re.S)


class Problem(BaseModel):
    line: int | None
    message: str


class Validation(BaseModel):
    ok: bool
    problems: list[Problem]
    rules: list[str] = []


class RulesText(BaseModel):
    text: str
    comment: str | None = None


class RulesTest(BaseModel):
    study_instance_uid: str
    #: Rules to test; empty: the active version.
    text: str | None = None


class ConditionOut(BaseModel):
    keyword: str
    condition: str
    values: list[str] | None
    matched: bool
    reason: str


class SeriesOut(BaseModel):
    series_instance_uid: str
    matched: bool
    conditions: list[ConditionOut]
    #: Which image of the series ``conditions`` describe (1-based), of how many: the
    #: first that meets every condition, else the first.
    image: int = 1
    images: int = 1


class RuleOut(BaseModel):
    index: int
    rule_name: str
    description: str
    enabled: bool
    matched: bool
    chosen: bool
    series: list[SeriesOut]


class TestResult(BaseModel):
    study_instance_uid: str
    chosen: str | None
    rules: list[RuleOut]


class VersionOut(BaseModel):
    version: int
    created_at: datetime
    created_by: str
    comment: str | None
    active: bool


class ActiveRules(BaseModel):
    version: int | None
    text: str
    versions: list[VersionOut]


def problems_of(exc: RuleError) -> list[Problem]:
    out = []
    for p in exc.problems:
        m = _LINE.match(p)
        out.append(
            Problem(line=int(m.group(1)), message=m.group(2))
            if m
            else Problem(line=None, message=p)
        )
    return out


def versions(ctx: WebContext) -> list[VersionOut]:
    return [
        VersionOut(
            version=v.version,
            created_at=v.created_at,
            created_by=v.created_by,
            comment=v.comment,
            active=v.active,
        )
        for v in ctx.rules.versions()
    ]


def active_rules(ctx: WebContext) -> ActiveRules:
    version = ctx.rules.active_version()
    text = ctx.rules.text(version) if version is not None else ""
    return ActiveRules(version=version, text=text, versions=versions(ctx))


def validate(ctx: WebContext, text: str) -> Validation:
    try:
        rule_set = ctx.rules.parse(text, "rules")
    except RuleError as exc:
        return Validation(ok=False, problems=problems_of(exc))
    names = [r.name for r in rule_set.rules]
    if not any(r.enabled for r in rule_set.rules):
        # Saving refuses it (RuleStore.save); say so before the admin presses Save.
        nothing = Problem(line=None, message=NOTHING_ROUTED)
        return Validation(ok=False, problems=[nothing], rules=names)
    return Validation(ok=True, problems=[], rules=names)


def run_test(ctx: WebContext, study_uid: str, text: str | None) -> TestResult:
    """Explain every rule of ``text`` (or the active version) against a stored study."""
    try:
        rule_set = ctx.rules.parse(text, "rules") if text else ctx.rules.active()[1]
    except RuleError as exc:
        raise HTTPException(422, {"problems": [p.model_dump() for p in problems_of(exc)]}) from None
    with ctx.sessions() as session:
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
        if study_id is None:
            raise HTTPException(404, "no such study")
        try:
            series = study_series_attributes(session, ctx.store, study_id)
        except StorageError as exc:
            raise HTTPException(422, str(exc)) from None
    explained = explain(rule_set, series)
    return TestResult(
        study_instance_uid=study_uid,
        chosen=next((r.rule_name for r in explained if r.chosen), None),
        rules=[
            RuleOut(
                index=r.index,
                rule_name=r.rule_name,
                description=r.description,
                enabled=r.enabled,
                matched=r.matched,
                chosen=r.chosen,
                series=[
                    SeriesOut(
                        series_instance_uid=s.series_instance_uid,
                        matched=s.matched,
                        image=s.instance + 1,
                        images=s.instances,
                        conditions=[
                            ConditionOut(
                                keyword=c.keyword,
                                condition=c.condition,
                                values=list(c.values) if c.values is not None else None,
                                matched=c.matched,
                                reason=c.reason,
                            )
                            for c in s.conditions
                        ],
                    )
                    for s in r.series
                ],
            )
            for r in explained
        ],
    )


@router.get("", response_model=ActiveRules)
def get_rules(admin: auth.Admin, ctx: Context) -> ActiveRules:
    """The active rules document and every saved version."""
    return active_rules(ctx)


@router.post("/validate", response_model=Validation)
def validate_rules(body: RulesText, admin: auth.Admin, ctx: Context) -> Validation:
    """Check a document without saving it; problems carry their line."""
    return validate(ctx, body.text)


@router.post("/test", response_model=TestResult)
def test_rules(body: RulesTest, admin: auth.Admin, ctx: Context, request: Request) -> TestResult:
    """Which rule would route a stored study, and why every other did not."""
    result = run_test(ctx, body.study_instance_uid, body.text)
    ctx.audit.record(
        admin.name,
        "rules.test",
        study_instance_uid=body.study_instance_uid,
        client_address=client_address(request),
    )
    return result


@router.post("", response_model=VersionOut, status_code=201, responses={422: {"model": Validation}})
def save_rules(body: RulesText, admin: auth.Admin, ctx: Context, request: Request) -> VersionOut:
    """Save a new version and make it active; a document with a mistake changes nothing."""
    try:
        version = ctx.rules.save(body.text, admin.name, body.comment)
    except RuleError as exc:
        raise HTTPException(
            422, Validation(ok=False, problems=problems_of(exc)).model_dump()
        ) from None
    ctx.audit.record(
        admin.name,
        "rules.save",
        detail=f"version {version}",
        client_address=client_address(request),
    )
    return next(v for v in versions(ctx) if v.version == version)


@router.get("/versions", response_model=list[VersionOut])
def list_versions(admin: auth.Admin, ctx: Context) -> list[VersionOut]:
    return versions(ctx)


@router.get("/versions/{version}", response_model=RulesText)
def version_text(version: RulesVersion, admin: auth.Admin, ctx: Context) -> RulesText:
    try:
        return RulesText(text=ctx.rules.text(version))
    except RuleError:
        raise HTTPException(404, "no such version") from None


@router.post("/versions/{version}/activate", response_model=VersionOut)
def activate(
    version: RulesVersion, admin: auth.Admin, ctx: Context, request: Request
) -> VersionOut:
    """Roll back (or forward): the old text becomes a new active version."""
    try:
        new = ctx.rules.activate(version, admin.name)
    except RuleError as exc:
        status = 404 if "no such version" in str(exc) else 422
        raise HTTPException(status, str(exc)) from None
    ctx.audit.record(
        admin.name,
        "rules.activate",
        detail=f"version {version} -> {new}",
        client_address=client_address(request),
    )
    return next(v for v in versions(ctx) if v.version == new)
