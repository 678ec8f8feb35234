"""Request bodies of the user-facing app are bounded before anyone is authenticated.

FastAPI reads a whole JSON or form body before the route's dependencies run, and the
login throttle reads the login bodies itself: without a bound, anyone could make the
node hold gigabytes in memory with one POST (no account needed). Result uploads of
the internal API (workers, cluster token) keep their own, larger limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from node.runtime import Node
from node.web.app import MAX_BODY_BYTES, create_app

TOKEN = "body-limit-test-token-0123456789abcdef"


@pytest.mark.parametrize("path", ["/api/session", "/login", "/api/rules/validate", "/logout"])
def test_a_body_declared_too_large_is_refused_unread(client: TestClient, path: str) -> None:
    body = b" " * (MAX_BODY_BYTES + 1)
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413


@pytest.mark.parametrize("path", ["/api/session", "/login"])
def test_a_chunked_body_is_cut_at_the_limit(client: TestClient, path: str) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for _ in range(8):
            yield b" " * (MAX_BODY_BYTES // 2)

    r = client.post(path, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code in (400, 413)  # 400: FastAPI's answer to a body it could not read


def test_result_uploads_keep_their_own_limit(start_node: Callable[..., Node]) -> None:
    node = start_node(cluster={"token": TOKEN})  # all-in-one: the internal API on web.port
    with TestClient(create_app(node)) as c:
        r = c.put(
            "/internal/v1/files/results/1.2.3/v1/big.npy",
            content=b"x" * (2 * MAX_BODY_BYTES),
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    assert r.status_code == 204
    assert node.store.read("results/1.2.3/v1/big.npy") == b"x" * (2 * MAX_BODY_BYTES)
