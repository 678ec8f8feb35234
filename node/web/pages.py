"""Server-rendered pages: login, worklist, study, and the admin pages.

Pages read through the same functions as the REST API and record the same audit
events; forms post with the session's CSRF token.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from node.db.models import Priority, StudyStatus
from node.errors import RuleError
from node.users.accounts import Account
from node.web import auth
from node.web.api.audit import AuditParams
from node.web.api.destinations import destinations
from node.web.api.rules import Problem, TestResult, active_rules, run_test, validate, versions
from node.web.api.status import node_dashboard, node_models, switch_model
from node.web.api.worklist import WorklistParams, flag, item
from node.web.audit import listing
from node.web.context import Context, Offset, RulesVersion, WebContext, client_address
from node.web.model_catalogue import card
from node.web.studies import Mark, mark_and_audit, study_detail
from node.worklist import worklist_fingerprint, worklist_page

router = APIRouter(include_in_schema=False)


def render(
    ctx: WebContext,
    request: Request,
    template: str,
    user: Account | None,
    status_code: int = 200,
    **values: Any,
) -> HTMLResponse:
    return ctx.templates.TemplateResponse(
        request,
        template,
        {"user": user, "csrf": auth.csrf_token(request), **values},
        status_code=status_code,
    )


def _safe_next(target: str) -> str:
    return auth.local_path(target) or "/"


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, ctx: Context, next: str = "/") -> HTMLResponse:
    return render(ctx, request, "login.html", None, next=_safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
async def login(
    request: Request,
    ctx: Context,
    name: Annotated[str, Form()],
    password: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/",
) -> Response:
    await auth.check_csrf(request)
    account = ctx.accounts.authenticate(name, password)
    if account is None:
        ctx.audit.record(name, "login.failed", client_address=client_address(request))
        return render(
            ctx,
            request,
            "login.html",
            None,
            401,
            next=_safe_next(next),
            error="Wrong user name or password.",
        )
    auth.log_in(request, account, ctx)
    ctx.audit.record(account.name, "login", client_address=client_address(request))
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout")
def logout(user: auth.User, request: Request, ctx: Context) -> RedirectResponse:
    auth.log_out(request, ctx)
    ctx.audit.record(user.name, "logout", client_address=client_address(request))
    return RedirectResponse("/login", status_code=303)


def _query(params: WorklistParams, **extra: Any) -> str:
    data = params.model_dump(exclude_defaults=True, mode="json")
    data.update({k: v for k, v in extra.items() if v})
    return urlencode(data, doseq=True)


def _worklist_values(ctx: WebContext, params: WorklistParams, offset: int) -> dict[str, Any]:
    size = ctx.settings.web.page_size
    with ctx.reads() as session:
        rows, more = worklist_page(session, params.to_filter(), limit=size, offset=offset)
        fingerprint = worklist_fingerprint(session)
    threshold = ctx.settings.pipeline.escalate_threshold
    return {
        "items": [item(r, threshold) for r in rows],
        "uids": [r.study_instance_uid for r in rows],
        "has_more": more,
        "offset": offset,
        "fingerprint": fingerprint,
    }


def _worklist_params(request: Request) -> WorklistParams:
    """Filters from the query string; empty form fields mean "any"."""
    raw: dict[str, Any] = {}
    for key in ("modality", "priority", "received_from", "received_to", "q", "unread"):
        value = request.query_params.get(key)
        if value:
            raw[key] = value
    statuses = [s for s in request.query_params.getlist("status") if s]
    if statuses:
        raw["status"] = statuses
    try:
        return WorklistParams.model_validate(raw)
    except ValueError:
        raise HTTPException(422, "invalid filter") from None


@router.get("/", response_class=HTMLResponse)
def worklist(user: auth.User, ctx: Context, request: Request, offset: Offset = 0) -> HTMLResponse:
    params = _worklist_params(request)
    values = _worklist_values(ctx, params, offset)
    ctx.audit.record(
        user.name,
        "worklist.view",
        detail=listing(params.describe(), values["uids"]),
        client_address=client_address(request),
    )
    size = ctx.settings.web.page_size
    return render(
        ctx,
        request,
        "worklist.html",
        user,
        params=params,
        statuses=[str(s) for s in StudyStatus],
        priorities=sorted(Priority, reverse=True),
        # The live update reloads this page's rows, not the first page's.
        rows_query=_query(params, offset=offset),
        prev_query=_query(params, offset=max(offset - size, 0)),
        next_query=_query(params, offset=offset + size),
        poll_ms=int(ctx.settings.web.poll_seconds * 1000),
        **values,
    )


@router.get("/worklist/rows", response_class=HTMLResponse)
def worklist_rows(
    user: auth.User, ctx: Context, request: Request, offset: Offset = 0
) -> HTMLResponse:
    """The worklist's rows alone, for the live update of an open page."""
    params = _worklist_params(request)
    values = _worklist_values(ctx, params, offset)
    ctx.audit.record(
        user.name,
        "worklist.refresh",
        detail=listing(params.describe(), values["uids"]),
        client_address=client_address(request),
    )
    response = render(ctx, request, "_rows.html", user, **values)
    response.headers["X-Worklist-Fingerprint"] = values["fingerprint"]
    return response


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study_page(study_uid: str, user: auth.User, ctx: Context, request: Request) -> HTMLResponse:
    with ctx.reads() as session:
        study = study_detail(session, study_uid)
    if study is None:
        raise HTTPException(404, "no such study")
    ctx.audit.record(
        user.name,
        "study.view",
        study_instance_uid=study_uid,
        client_address=client_address(request),
    )
    threshold = ctx.settings.pipeline.escalate_threshold
    return render(
        ctx,
        request,
        "study.html",
        user,
        study=study,
        flag=lambda p: flag(p, threshold) or "none",
    )


@router.post("/studies/{study_uid}/{what}")
def mark_study(
    study_uid: str, what: Mark, user: auth.User, ctx: Context, request: Request
) -> RedirectResponse:
    if not mark_and_audit(
        ctx.sessions,
        ctx.audit,
        study_uid,
        what=what,
        user_name=user.name,
        client_address=client_address(request),
    ):
        raise HTTPException(404, "no such study")
    return RedirectResponse(f"/studies/{study_uid}", status_code=303)


@router.get("/models/{name}/card", response_class=HTMLResponse)
def model_card(name: str, user: auth.User, ctx: Context, request: Request) -> HTMLResponse:
    text = card(name)
    if text is None:
        raise HTTPException(404, "no card for this model")
    return render(ctx, request, "card.html", user, name=name, text=text)


# -- admin -------------------------------------------------------------------------------


def _rules_page(
    ctx: WebContext,
    request: Request,
    user: Account,
    *,
    text: str | None = None,
    problems: list[Problem] | None = None,
    message: str | None = None,
    comment: str | None = None,
    test: TestResult | None = None,
    test_uid: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    active = active_rules(ctx)
    shown = active.text if text is None else text
    problems = problems or []
    return render(
        ctx,
        request,
        "admin/rules.html",
        user,
        status_code,
        active_version=active.version,
        versions=active.versions,
        text=shown,
        line_count=max(shown.count("\n") + 1, 1),
        problems=problems,
        bad_lines={p.line for p in problems if p.line},
        message=message,
        comment=comment,
        test=test,
        test_uid=test_uid,
    )


@router.get("/admin/rules", response_class=HTMLResponse)
def rules_page(admin: auth.Admin, ctx: Context, request: Request) -> HTMLResponse:
    return _rules_page(ctx, request, admin)


@router.post("/admin/rules", response_class=HTMLResponse)
def rules_submit(
    *,
    admin: auth.Admin,
    ctx: Context,
    request: Request,
    text: Annotated[str, Form()],
    action: Annotated[str, Form()] = "validate",
    comment: Annotated[str, Form()] = "",
) -> HTMLResponse:
    text = text.replace("\r\n", "\n")
    checked = validate(ctx, text)
    if not checked.ok:
        return _rules_page(
            ctx,
            request,
            admin,
            text=text,
            problems=checked.problems,
            comment=comment,
            status_code=422,
        )
    if action != "save":
        return _rules_page(
            ctx,
            request,
            admin,
            text=text,
            comment=comment,
            message=f"Valid: {len(checked.rules)} rules ({', '.join(checked.rules)}); not saved.",
        )
    try:
        version = ctx.rules.save(text, admin.name, comment or None)
    except RuleError as exc:  # e.g. a destination removed meanwhile
        return _rules_page(
            ctx,
            request,
            admin,
            text=text,
            status_code=422,
            problems=[Problem(line=None, message=p) for p in exc.problems],
        )
    ctx.audit.record(
        admin.name,
        "rules.save",
        detail=f"version {version}",
        client_address=client_address(request),
    )
    return _rules_page(ctx, request, admin, message=f"Saved as version {version}, now active.")


@router.post("/admin/rules/test", response_class=HTMLResponse)
def rules_test(
    admin: auth.Admin,
    ctx: Context,
    request: Request,
    study_uid: Annotated[str, Form()],
    text: Annotated[str, Form()] = "",
) -> HTMLResponse:
    text = text.replace("\r\n", "\n")
    try:
        result = run_test(ctx, study_uid.strip(), text or None)
    except HTTPException as exc:
        detail: object = exc.detail
        problems = (
            [Problem.model_validate(p) for p in detail["problems"]]
            if isinstance(detail, dict)
            else [Problem(line=None, message=f"test: {detail}")]
        )
        return _rules_page(
            ctx,
            request,
            admin,
            text=text or None,
            problems=problems,
            test_uid=study_uid,
            status_code=exc.status_code,
        )
    ctx.audit.record(
        admin.name,
        "rules.test",
        study_instance_uid=study_uid.strip(),
        client_address=client_address(request),
    )
    return _rules_page(ctx, request, admin, text=text or None, test=result, test_uid=study_uid)


@router.post("/admin/rules/versions/{version}/activate")
def rules_activate(
    version: RulesVersion, admin: auth.Admin, ctx: Context, request: Request
) -> RedirectResponse:
    try:
        new = ctx.rules.activate(version, admin.name)
    except RuleError as exc:
        raise HTTPException(422, str(exc)) from None
    ctx.audit.record(
        admin.name,
        "rules.activate",
        detail=f"version {version} -> {new}",
        client_address=client_address(request),
    )
    return RedirectResponse("/admin/rules", status_code=303)


@router.get("/admin/destinations", response_class=HTMLResponse)
def destinations_page(admin: auth.Admin, ctx: Context, request: Request) -> HTMLResponse:
    return render(ctx, request, "admin/destinations.html", admin, destinations=destinations(ctx))


@router.get("/admin/models", response_class=HTMLResponse)
def models_page(admin: auth.Admin, ctx: Context, request: Request) -> HTMLResponse:
    return render(
        ctx,
        request,
        "admin/models.html",
        admin,
        models=node_models(ctx),
    )


@router.post("/admin/models/{name}/enabled")
def models_switch(
    name: str,
    admin: auth.Admin,
    ctx: Context,
    request: Request,
    enabled: Annotated[bool, Form()],
) -> RedirectResponse:
    switch_model(ctx, request, admin, name, enabled)
    return RedirectResponse("/admin/models", status_code=303)


@router.get("/admin/status", response_class=HTMLResponse)
def status_page(admin: auth.Admin, ctx: Context, request: Request) -> HTMLResponse:
    return render(ctx, request, "admin/status.html", admin, d=node_dashboard(ctx))


_AUDIT_FILTERS = ("user", "action", "study_uid", "since", "until", "from", "to")


@router.get("/admin/audit", response_class=HTMLResponse)
def audit_page(
    admin: auth.Admin,
    ctx: Context,
    request: Request,
    offset: Offset = 0,
) -> HTMLResponse:
    """The filters come from the form as typed: empty fields mean "any", and a bad
    date is answered with the form, its input and the reason (not a JSON error)."""
    form = {k: v for k in _AUDIT_FILTERS if (v := request.query_params.get(k, "").strip())}
    try:
        params = AuditParams.model_validate(form)
    except ValidationError as exc:
        return render(
            ctx,
            request,
            "admin/audit.html",
            admin,
            422,
            events=[],
            form=form,
            offset=0,
            query="",
            error="; ".join(_problem(e) for e in exc.errors()),
        )
    events = ctx.audit.list(params.to_query(), limit=100, offset=offset)
    return render(
        ctx,
        request,
        "admin/audit.html",
        admin,
        events=events,
        form=form,
        offset=offset,
        query=urlencode(params.fields()),
        error=None,
    )


def _problem(error: ErrorDetails) -> str:
    """``from: Input should be a valid date ...``; a check across fields has no name."""
    where = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


__all__ = ["router", "versions"]
