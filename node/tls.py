"""TLS contexts for DICOM (PS3.15 B.2, B.9) and HTTPS, built from the configuration.

The defaults follow the BCP 195 "non-downgrading" profile of PS3.15 B.9: TLS 1.2
or newer, forward-secret AEAD cipher suites only (``DEFAULT_CIPHERS``; TLS 1.3
suites are all AEAD and not affected by ``ciphers``), no compression, no
renegotiation. Problems with the certificate files become a :class:`TlsError`
that names the file and the reason, raised when a listener starts or a delivery
is attempted, never a stack trace.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Any, NoReturn

from node.config import DestinationTls, DicomTlsSettings, TlsVersion, WebSettings, check_owner_only
from node.errors import NodeError

_VERSIONS: dict[TlsVersion, ssl.TLSVersion] = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


class TlsError(NodeError):
    """A TLS certificate, key or setting cannot be used; the message names it."""


def server_context(
    *,
    certificate: Path,
    private_key: Path,
    minimum_version: TlsVersion,
    ciphers: str,
    ca_certificates: Path | None = None,
    require_client_certificate: bool = False,
    what: str,
) -> ssl.SSLContext:
    """A server context: our chain, and with ``ca_certificates`` verification of clients.

    With a CA but no requirement, a client certificate is verified when offered
    (``CERT_OPTIONAL``); ``require_client_certificate`` makes it mandatory (mutual TLS).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context, minimum_version, ciphers, what)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(context, certificate, private_key, what)
    if ca_certificates is not None:
        _load_ca(context, ca_certificates, what)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    elif require_client_certificate:
        raise TlsError(f"{what}: require_client_certificate needs ca_certificates")
    return context


def dicom_server_context(settings: DicomTlsSettings) -> ssl.SSLContext:
    """The context of the DICOM TLS listener (``[dicom.tls]``)."""
    if settings.certificate is None or settings.private_key is None:
        raise TlsError("dicom.tls: certificate and private_key are required")
    return server_context(
        certificate=settings.certificate,
        private_key=settings.private_key,
        minimum_version=settings.minimum_version,
        ciphers=settings.ciphers,
        ca_certificates=settings.ca_certificates,
        require_client_certificate=settings.require_client_certificate,
        what="dicom.tls",
    )


def web_server_context(settings: WebSettings) -> ssl.SSLContext | None:
    """The HTTPS context of the web server, or None for plain HTTP."""
    if settings.tls_certificate is None or settings.tls_private_key is None:
        return None
    return server_context(
        certificate=settings.tls_certificate,
        private_key=settings.tls_private_key,
        minimum_version=settings.tls_minimum_version,
        ciphers=settings.tls_ciphers,
        what="web",
    )


class ClientContext(ssl.SSLContext):
    """A client context that remembers why its last connection failed.

    pynetdicom turns a failed TLS handshake into "association not established"
    (and a logged traceback); the export needs the reason ("certificate verify
    failed: unable to get local issuer certificate") to tell the admin. One
    context serves one association, so ``failure`` belongs to that attempt.
    """

    failure: str | None = None


class _RecordingSocket(ssl.SSLSocket):
    """Records handshake and read errors on its :class:`ClientContext`."""

    def _record(self, exc: OSError) -> None:
        context = self.context
        if isinstance(context, ClientContext) and context.failure is None:
            context.failure = describe(exc)

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except OSError as exc:
            self._record(exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            self._record(exc)
            raise


ClientContext.sslsocket_class = _RecordingSocket


def client_context(settings: DestinationTls, *, what: str) -> ClientContext:
    """A client context towards a destination: verify it, optionally present our certificate."""
    context = ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    _harden(context, settings.minimum_version, settings.ciphers, what)
    if settings.ca_certificates is not None:
        _load_ca(context, settings.ca_certificates, what)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = settings.check_hostname
    if (settings.certificate is None) != (settings.private_key is None):
        raise TlsError(f"{what}: certificate and private_key are set together (mutual TLS)")
    if settings.certificate is not None and settings.private_key is not None:
        _load_chain(context, settings.certificate, settings.private_key, what)
    return context


def describe(exc: OSError) -> str:
    """A one-line reason for a failed TLS (or TCP) connection, for logs and delivery details."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(exc.args[1] if len(exc.args) > 1 else exc))
        return f"TLS handshake failed: {text}"
    return f"cannot connect: {exc.strerror or exc}"


def _harden(context: ssl.SSLContext, minimum: TlsVersion, ciphers: str, what: str) -> None:
    context.minimum_version = _VERSIONS[minimum]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        context.set_ciphers(ciphers)
    except ssl.SSLError:
        raise TlsError(f"{what}: ciphers {ciphers!r} selects no cipher suite") from None


def _no_password() -> NoReturn:
    raise TlsError("encrypted")


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path, what: str) -> None:
    try:
        check_owner_only(private_key, "private key file")
    except ValueError as exc:
        raise TlsError(f"{what}: {exc}") from None
    try:
        # A password callback keeps OpenSSL from prompting on the terminal.
        context.load_cert_chain(certificate, private_key, password=_no_password)
    except TlsError:
        raise TlsError(
            f"{what}: private key file {private_key} is encrypted; store it unencrypted "
            "and readable by its owner only (chmod 600)"
        ) from None
    except ssl.SSLError as exc:
        raise TlsError(
            f"{what}: certificate {certificate} with private key {private_key} "
            f"cannot be used: {_reason(exc)}"
        ) from None
    except OSError as exc:  # the key was readable above, so this is the certificate
        raise TlsError(f"{what}: cannot read certificate {certificate}: {exc.strerror}") from None


def _load_ca(context: ssl.SSLContext, ca_certificates: Path, what: str) -> None:
    try:
        context.load_verify_locations(cafile=ca_certificates)
    except ssl.SSLError as exc:
        raise TlsError(
            f"{what}: CA certificates {ca_certificates} cannot be used: {_reason(exc)}"
        ) from None
    except OSError as exc:
        raise TlsError(f"{what}: cannot read {ca_certificates}: {exc.strerror}") from None


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "PEM_LIB" or "PEM lib" in str(exc):
            return "not a PEM certificate, or no certificate matches the key"
        if exc.reason:
            return str(exc.reason).replace("_", " ").lower()
    return str(exc.strerror or exc)
