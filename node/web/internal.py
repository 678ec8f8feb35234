"""The node's internal HTTP API for workers and the web role on other hosts.

* DICOMweb WADO-RS retrieve (PS3.18 10.4) of a study, series or instance:
  ``multipart/related; type="application/dicom"``, each part the stored Part 10
  bytes as received (the stored transfer syntax), streamed from disk.
* Result files (``results/...``): ``PUT`` writes them durably and atomically
  into the node's store (idempotent), ``GET`` reads them back.

Served on ``cluster.internal_port`` (:func:`create_internal_app`), or without one by
the dicom role's service port and an all-in-one node's web.port; never by the web role.
Every endpoint needs ``Authorization: Bearer <cluster.token>``; with no token
configured the whole API answers 404 (switched off). No session cookies here:
these callers are machines, not people.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from node.db.models import Instance, Series, Study
from node.errors import NodeError
from node.ingest.inspect import is_valid_uid
from node.web.audit import AuditTrail

if TYPE_CHECKING:
    from node.runtime import Node

log = logging.getLogger(__name__)

DICOMWEB_PREFIX = "/dicomweb"
FILES_PREFIX = "/internal/v1/files"
#: Result files are the only thing workers may write into the node's store.
RESULTS_ROOT = "results"
#: Largest result file accepted by PUT (heatmaps, masks and DICOM result objects are small).
MAX_RESULT_BYTES = 256 * 1024 * 1024
_CHUNK = 1024 * 1024
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _auth_dependency(node: Node) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        token = node.settings.cluster.token
        if not token:
            raise HTTPException(404, "Not Found")
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), token.encode()
        ):
            # %r: the path is the caller's text; escaped, its control characters
            # (terminal escapes) cannot rewrite what an operator sees in the log.
            log.warning(
                "internal API: refused request without a valid token for %r", request.url.path
            )
            raise HTTPException(
                401, "bearer token required", headers={"WWW-Authenticate": "Bearer"}
            )

    return check


def _check_uid(uid: str) -> None:
    if len(uid) > 64 or not _UID.match(uid):
        raise HTTPException(404, "Not Found")


def acceptable_syntaxes(accept: str) -> set[str] | None:
    """Transfer syntaxes an Accept header admits for DICOM parts; ``None``: any.

    We never transcode, so the stored syntax is what is served. ``transfer-syntax=*``,
    no parameter, no header or a wildcard media range admit any syntax; a request
    naming only specific syntaxes admits just those (anything else is answered 406,
    PS3.18 8.7.3.5).
    """
    if not accept.strip():
        return None
    named: set[str] = set()
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        values = {
            k.strip().lower(): v.strip().strip('"')
            for k, _, v in (p.partition("=") for p in params)
        }
        media = media.lower()
        if media in ("*/*", "multipart/*"):
            return None
        if media == "multipart/related":
            if values.get("type", "application/dicom").lower() not in (
                "application/dicom",
                "application/*",
                "*/*",
            ):
                continue
        elif media != "application/dicom":
            continue
        syntax = values.get("transfer-syntax", "*")
        if syntax == "*":
            return None
        named.add(syntax)
    return named


def _stored(
    node: Node, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> list[tuple[str, str]]:
    """(path, stored transfer syntax) of each stored instance asked for.

    A study is served as it stands: its latest version holds every instance
    received so far (a re-opened study keeps its earlier instances).
    """
    for uid in (study_uid, series_uid, sop_uid):
        if uid is not None:
            _check_uid(uid)
    query = (
        select(Instance.path, Instance.transfer_syntax_uid)
        .join(Study, Study.id == Instance.study_id)
        .join(Series, Series.id == Instance.series_id)
        .where(
            Study.study_instance_uid == study_uid,
            Instance.study_version <= Study.version,
        )
        .order_by(Series.id, Instance.instance_number, Instance.id)
    )
    if series_uid is not None:
        query = query.where(Series.series_instance_uid == series_uid)
    if sop_uid is not None:
        query = query.where(Instance.sop_instance_uid == sop_uid)
    with node.reads() as session:
        rows = session.execute(query).all()
    return [(r.path, r.transfer_syntax_uid) for r in rows if node.store.exists(r.path)]


def _multipart(
    node: Node, request: Request, found: list[tuple[str, str]], what: str, study_uid: str
) -> Response:
    """The instances ``found`` as one streamed multipart/related response."""
    if not found:
        raise HTTPException(404, "Not Found")
    wanted = acceptable_syntaxes(request.headers.get("accept", ""))
    if wanted is not None and any(syntax not in wanted for _, syntax in found):
        raise HTTPException(
            406, "instances are served in their stored transfer syntax only (ask for '*')"
        )
    # Machines read patient data here too: the audit trail shows who fetched what
    # (only what is served: a refused request reads nothing).
    AuditTrail(node.sessions).record(
        "cluster-token",
        "dicomweb.retrieve",
        study_instance_uid=study_uid,
        detail=f"{len(found)} instance(s) of {what}",
        client_address=request.client.host if request.client else None,
    )
    files = [node.store.path(rel) for rel, _ in found]
    boundary = secrets.token_hex(16)

    def body() -> Iterator[bytes]:
        for path in files:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    yield chunk
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    log.info("WADO-RS: sending %d instance(s) of %s", len(files), what)
    return StreamingResponse(
        body(), media_type=f'multipart/related; type="application/dicom"; boundary={boundary}'
    )


def internal_router(node: Node) -> APIRouter:
    """The internal API of ``node`` (include it in the app of the DICOM role)."""
    router = APIRouter(
        tags=["internal"],
        include_in_schema=False,
        dependencies=[Depends(_auth_dependency(node))],
    )
    store = node.store

    @router.get(DICOMWEB_PREFIX + "/studies/{study_uid}")
    def retrieve_study(study_uid: str, request: Request) -> Response:
        return _multipart(node, request, _stored(node, study_uid), f"study {study_uid}", study_uid)

    @router.get(DICOMWEB_PREFIX + "/studies/{study_uid}/series/{series_uid}")
    def retrieve_series(study_uid: str, series_uid: str, request: Request) -> Response:
        return _multipart(
            node, request, _stored(node, study_uid, series_uid), f"series {series_uid}", study_uid
        )

    @router.get(DICOMWEB_PREFIX + "/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}")
    def retrieve_instance(
        study_uid: str, series_uid: str, sop_uid: str, request: Request
    ) -> Response:
        return _multipart(
            node,
            request,
            _stored(node, study_uid, series_uid, sop_uid),
            f"instance {sop_uid}",
            study_uid,
        )

    @router.put(FILES_PREFIX + "/{path:path}", status_code=204)
    async def put_file(path: str, request: Request) -> Response:
        rel = result_relpath(path)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_RESULT_BYTES:
            raise HTTPException(413, "result file too large")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_RESULT_BYTES:
                raise HTTPException(413, "result file too large")
        try:
            store.ensure_space(len(data))
            # fsync blocks: off the event loop, like every other file access here.
            await run_in_threadpool(store.write, rel, bytes(data))
        except NodeError as exc:
            log.error("result upload %s failed: %s", rel, exc)
            raise HTTPException(507, "cannot store the result file") from exc
        log.info("result file %s stored (%d bytes)", rel, len(data))
        return Response(status_code=204)

    @router.get(FILES_PREFIX + "/{path:path}")
    def get_file(path: str, request: Request) -> Response:
        rel = result_relpath(path)
        if not store.exists(rel):
            raise HTTPException(404, "Not Found")
        # Result files (SEG, SR, heatmaps, masks) are patient data: audited like WADO-RS.
        study_uid = rel.split("/")[1]
        AuditTrail(node.sessions).record(
            "cluster-token",
            "result.retrieve",
            study_instance_uid=study_uid if is_valid_uid(study_uid) else None,
            detail=rel,
            client_address=request.client.host if request.client else None,
        )
        return Response(store.read(rel), media_type="application/octet-stream")

    return router


def create_internal_app(node: Node) -> FastAPI:
    """The internal API alone, for its own listener (cluster.internal_port).

    Kept off the user-facing port: its callers are workers and the web role, and
    nothing on it is meant for browsers (no pages, no OpenAPI document).
    """
    app = FastAPI(title="triage-node internal", openapi_url=None, docs_url=None, redoc_url=None)
    app.include_router(internal_router(node))
    return app


def result_relpath(path: str) -> str:
    """``path`` when it names a file under ``results/``; otherwise HTTP 400.

    Only plain segments (letters, digits, ``._-``, not starting with a dot) are
    allowed, so ``..``, absolute paths, backslashes and hidden files never pass.
    """
    parts = PurePosixPath(path).parts if path else ()
    if (
        len(parts) < 2
        or path.startswith("/")
        or "\\" in path
        or parts[0] != RESULTS_ROOT
        or not all(_SEGMENT.match(p) for p in parts)
        or "/".join(parts) != path
    ):
        raise HTTPException(400, "only files under results/ may be read or written here")
    return path
