"""One study: details, images, overlays, and read / reviewed marks."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response

from node.web import auth
from node.web.context import Context, client_address
from node.web.images import ImageUnavailable, heatmap_png, image_png, mask_png
from node.web.studies import (
    Mark,
    OverlayKind,
    ResultFileMissing,
    StudyOut,
    instance_copy,
    instance_file,
    mark_and_audit,
    overlay_file,
    result_file,
)
from node.web.studies import study_detail as read_study

router = APIRouter(prefix="/api/studies", tags=["studies"])

#: Images of a patient must not outlive the session in a shared workstation's browser cache.
_PNG_CACHE = "no-store"


@router.get("/{study_uid}", response_model=StudyOut)
def study_detail(study_uid: str, user: auth.User, ctx: Context, request: Request) -> StudyOut:
    """Patient and study attributes, series and instances, findings, deliveries."""
    with ctx.reads() as session:
        study = read_study(session, study_uid)
    if study is None:
        raise HTTPException(404, "no such study")
    ctx.audit.record(
        user.name, "study.api", study_instance_uid=study_uid, client_address=client_address(request)
    )
    return study


@router.post("/{study_uid}/{what}", response_model=StudyOut)
def mark_study(
    study_uid: str, what: Mark, user: auth.User, ctx: Context, request: Request
) -> StudyOut:
    """Mark the study read or reviewed by the current user (shown on the worklist)."""
    if not mark_and_audit(
        ctx.sessions,
        ctx.audit,
        study_uid,
        what=what,
        user_name=user.name,
        client_address=client_address(request),
    ):
        raise HTTPException(404, "no such study")
    with ctx.sessions() as session:
        study = read_study(session, study_uid)
    assert study is not None
    return study


@router.get(
    "/{study_uid}/instances/{sop_uid}/image.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def instance_image(
    study_uid: str,
    *,
    sop_uid: str,
    user: auth.User,
    ctx: Context,
    request: Request,
    frame: Annotated[int, Query(ge=1)] = 1,
) -> Response:
    """One frame of a stored image as PNG (grey levels as the models saw them)."""
    with ctx.reads() as session:
        where = instance_file(session, study_uid, sop_uid)
    if where is None:
        raise HTTPException(404, "no such instance in this study")
    if where.purged:
        raise HTTPException(410, "image no longer stored (retention policy)")
    try:
        with instance_copy(ctx.store, ctx.settings.cluster, study_uid, sop_uid, where) as path:
            body = image_png(path, frame)
    except ResultFileMissing:
        raise HTTPException(503, "the image is not reachable from this web server") from None
    except ImageUnavailable as exc:
        raise HTTPException(422, str(exc)) from None
    ctx.audit.record(
        user.name,
        "image.view",
        study_instance_uid=study_uid,
        detail=sop_uid,
        client_address=client_address(request),
    )
    return Response(body, media_type="image/png", headers={"Cache-Control": _PNG_CACHE})


@router.get(
    "/{study_uid}/instances/{sop_uid}/{kind}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def instance_overlay(
    study_uid: str,
    *,
    sop_uid: str,
    kind: OverlayKind,
    user: auth.User,
    ctx: Context,
    request: Request,
) -> Response:
    """The lung mask or Grad-CAM heatmap of an image as a transparent PNG overlay."""
    with ctx.reads() as session:
        rel = overlay_file(session, study_uid, sop_uid, kind)
    if rel is None:
        raise HTTPException(404, f"no {kind} for this image")
    try:
        with result_file(ctx.store, ctx.settings.cluster, rel) as path:
            body = mask_png(path) if kind == "mask" else heatmap_png(path)
    except ResultFileMissing:
        raise HTTPException(404, f"the {kind} file is not available") from None
    except ImageUnavailable as exc:
        raise HTTPException(422, str(exc)) from None
    ctx.audit.record(
        user.name,
        f"{kind}.view",
        study_instance_uid=study_uid,
        detail=sop_uid,
        client_address=client_address(request),
    )
    return Response(body, media_type="image/png", headers={"Cache-Control": _PNG_CACHE})
