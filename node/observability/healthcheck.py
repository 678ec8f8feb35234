"""The client side of the probes: ``triage-node health``, the images' HEALTHCHECK.

It reads the same settings as the process it checks (TOML and ``TRIAGE_NODE_*``), so
it follows them: the port the role listens on, HTTPS when ``web.tls_certificate`` is
set. A probe from inside the container connects to the loopback address, which the
certificate does not name; instead of a host name check it verifies that the server
presents the configured certificate (that certificate is the only trust anchor), which
is what a health probe needs to know, with no CA bundle or name to configure.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass

from node.config import Settings

#: Listening on every address: probe the loopback one instead.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}  # noqa: S104 # nosec B104


@dataclass(frozen=True, slots=True)
class Target:
    """What a probe asks: the URL, and the TLS context for an HTTPS one."""

    url: str
    tls: ssl.SSLContext | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    ok: bool
    summary: str


def target(settings: Settings, *, worker: bool = False, live: bool = False) -> Target:
    """The endpoint of this process's role: the node's web.port, or the worker's http_port.

    ``live``: ``/healthz`` (the process runs) instead of ``/readyz`` (it can work:
    database, storage, listener, broker).
    """
    path = "/healthz" if live else "/readyz"
    if worker:
        host, port = settings.worker.http_host, settings.worker.http_port
        if not port:
            raise ValueError("the worker has no health endpoint (worker.http_port = 0)")
        return Target(f"http://{_address(host)}:{port}{path}")
    web = settings.web
    if not web.enabled:
        raise ValueError("no HTTP endpoint to probe (web.enabled = false)")
    if web.tls_certificate is None:
        return Target(f"http://{_address(web.host)}:{web.port}{path}")
    context = ssl.create_default_context(cafile=str(web.tls_certificate))
    # The certificate itself is the trust anchor, also when a CA issued it.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False  # loopback: the certificate names the public host
    return Target(f"https://{_address(web.host)}:{web.port}{path}", context)


def ask(probe: Target, timeout: float) -> Answer:
    """GET the endpoint: ok on HTTP 200; the summary says why not, without patient data."""
    try:
        with urllib.request.urlopen(  # nosec B310 # noqa: S310 (http/https URL built above)
            probe.url, timeout=timeout, context=probe.tls
        ) as response:
            return Answer(True, _summary(response.read(), "ok"))
    except urllib.error.HTTPError as exc:
        return Answer(False, f"HTTP {exc.code}: {_summary(exc.read(), exc.reason)}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Answer(False, f"no answer from {probe.url}: {reason}")


def _summary(body: bytes, fallback: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return fallback
    if not isinstance(data, dict):
        return fallback
    reasons = data.get("reasons") or []
    status = str(data.get("status", fallback))
    return f"{status}: {'; '.join(map(str, reasons))}" if reasons else status


def _address(host: str) -> str:
    host = _LOOPBACK.get(host, host)
    return f"[{host}]" if ":" in host else host
