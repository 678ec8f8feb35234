"""Node configuration: one pydantic-settings model, read from TOML, overridden by environment.

Precedence (highest first): keyword arguments, ``TRIAGE_NODE_*`` environment
variables (``__`` separates nesting: ``TRIAGE_NODE_DICOM__PORT=11113``), the TOML
file given with ``--config``, the defaults below. The defaults are the embedded
all-in-one mode: SQLite under ``./var``, no broker server.
``config.example.toml`` documents every key; keep the two in step (a test checks).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from node import tomldoc
from node.errors import ConfigError

#: Environment variables that override the file: TRIAGE_NODE_<SECTION>__<KEY>.
ENV_PREFIX = "TRIAGE_NODE_"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash/controls


def validate_ae_title(value: str) -> str:
    """An AE title (PS3.5 6.2 VR AE): 1-16 characters, no backslash or control characters."""
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(value):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 characters, no backslash)")
    return stripped


def check_owner_only(path: Path, what: str = "secret file") -> None:
    """Raise ValueError unless ``path`` exists and only its owner can read it.

    A secret (or private key) readable by the group or others is refused rather
    than used: the admin learns of the leak before a credential does.
    """
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ValueError(
            f"{what} {path} is readable by group or others "
            f"(mode {mode & 0o777:o}); run: chmod 600 {path}"
        )


def read_secret_file(path: Path) -> str:
    """The stripped content of a secret file that only its owner can read.

    Every way of failing is a ValueError: pydantic turns it into a problem with the
    key, where an OSError would escape validation as a traceback.
    """
    check_owner_only(path)
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"secret file {path} is not UTF-8 text") from None
    if not value:
        raise ValueError(f"secret file {path} is empty")
    return value


def _readable_secret(path: Path | None) -> Path | None:
    """Field validator of a ``*_file`` key: its problems are reported against that key.

    The section's after-validator reads the file again to fill the secret; this
    check only moves the blame from the section to the key that names the file.
    """
    if path is not None:
        read_secret_file(path)
    return path


def _from_file(section: BaseModel, field: str, file_field: str) -> None:
    """Fill ``field`` from ``file_field`` (bypassing assignment validation, no recursion)."""
    path = getattr(section, file_field)
    if path is not None:
        section.__dict__[field] = read_secret_file(path)


#: Keys whose values are secrets: refused when written in the TOML file itself.
SECRET_KEYS: tuple[tuple[str, str], ...] = (
    ("web", "secret_key"),
    ("privacy", "pseudonym_key"),
    ("cluster", "token"),
)
#: Keys holding URLs that are secrets only when they carry a password.
URL_KEYS: tuple[tuple[str, str], ...] = (("database", "url"), ("pipeline", "broker_url"))


AETitle = Annotated[str, Field(min_length=1, max_length=16)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AllowedCaller(_Section):
    """A calling AE title the SCP accepts, optionally only from one host or network."""

    ae_title: AETitle
    host: str | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return validate_ae_title(v)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError as exc:
            raise ValueError(f"host {v!r} must be an IP address or network (CIDR)") from exc
        return v

    @classmethod
    def parse(cls, value: Any) -> Any:
        """Accept ``"AE"``, ``"AE@10.0.0.5"``, ``"AE@10.0.0.0/24"`` or a table."""
        if isinstance(value, str):
            ae, sep, host = value.partition("@")
            return {"ae_title": ae, "host": host if sep else None}
        return value

    def admits(self, ae_title: str, address: str) -> bool:
        if ae_title.strip() != self.ae_title:
            return False
        if self.host is None:
            return True
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return False

    def __str__(self) -> str:
        return self.ae_title if self.host is None else f"{self.ae_title}@{self.host}"


TlsVersion = Literal["TLSv1.2", "TLSv1.3"]
#: BCP 195 / PS3.15 B.9 "non-downgrading" profile: forward-secret AEAD suites only.
DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM"


class TlsFiles(_Section):
    """Certificate material of one TLS endpoint (PEM; keys must not be group/world-readable)."""

    certificate: Path | None = None
    private_key: Path | None = None
    #: CA bundle that verifies the peer (clients of a server with mutual TLS; servers for a client).
    ca_certificates: Path | None = None
    minimum_version: TlsVersion = "TLSv1.2"
    ciphers: str = DEFAULT_CIPHERS


class DicomTlsSettings(TlsFiles):
    """DICOM TLS for the SCP."""

    enabled: bool = False
    #: The TLS listener's port (2762 is the registered "dicom-tls" port).
    port: int = Field(default=2762, ge=1, le=65535)
    #: Mutual TLS: refuse callers without a certificate signed by ca_certificates.
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _complete(self) -> DicomTlsSettings:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("dicom.tls needs certificate and private_key when enabled")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates")
        return self


class DicomSettings(_Section):
    """The DICOM listener (C-ECHO/C-STORE SCP)."""

    ae_title: AETitle = "TRIAGE"
    host: str = "0.0.0.0"  # listens on the hospital network # noqa: S104 # nosec B104
    port: int = Field(default=11112, ge=1, le=65535)
    #: Largest PDU we accept. Large PDUs mean fewer, cheaper reads; 0 means unlimited.
    max_pdu_size: int = Field(default=4_194_304, ge=0)
    #: Who may send. Each entry: "AE", "AE@host" or "AE@network/prefix", or a table.
    #: NoDecode: the environment may give the comma-separated form (see _callers).
    allowed_callers: Annotated[list[AllowedCaller], NoDecode] = Field(
        default_factory=lambda: [
            AllowedCaller(ae_title="STORESCU", host="127.0.0.1"),
            AllowedCaller(ae_title="ECHOSCU", host="127.0.0.1"),
            AllowedCaller(ae_title="DCMSEND", host="127.0.0.1"),
        ]
    )
    maximum_associations: int = Field(default=32, ge=1)
    #: At most this many associations at once from one calling AE title (0: no own limit).
    max_associations_per_caller: int = Field(default=8, ge=0)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=120.0, gt=0)
    #: Largest instance accepted; a larger one is refused (0xA700) and the association aborted.
    max_instance_bytes: int = Field(default=2_147_483_648, ge=1)
    #: DICOM TLS (PS3.15 B.2) listener beside, or instead of, the plain one.
    tls: DicomTlsSettings = Field(default_factory=DicomTlsSettings)
    #: Keep the plain (unencrypted) listener on ``port``; false: TLS only.
    plain: bool = True

    @model_validator(mode="after")
    def _some_listener(self) -> DicomSettings:
        if not self.plain and not self.tls.enabled:
            raise ValueError("plain = false needs dicom.tls.enabled (no listener otherwise)")
        if self.tls.enabled and self.plain and self.tls.port == self.port:
            raise ValueError("dicom.tls.port and dicom.port must differ")
        return self

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return validate_ae_title(v)

    @field_validator("allowed_callers", mode="before")
    @classmethod
    def _callers(cls, v: Any) -> Any:
        """A list, or a string: JSON (``[...]``) or ``"AE@host, AE2"`` (the environment's form)."""
        if isinstance(v, str):
            if v.lstrip().startswith("["):
                try:
                    v = json.loads(v)
                except ValueError as exc:
                    raise ValueError(f"not a JSON list: {exc}") from None
            else:
                v = [item.strip() for item in v.split(",") if item.strip()]
        if isinstance(v, list):
            return [AllowedCaller.parse(item) for item in v]
        return v

    @field_validator("host")
    @classmethod
    def _listen_host(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError as exc:
            raise ValueError(f"{v!r} is not an IP address to listen on") from exc
        return v


class StorageSettings(_Section):
    """Where instances, quarantine and the default database live."""

    data_dir: Path = Path("var")
    #: Below this much free disk the SCP answers "out of resources" (0xA700).
    min_free_bytes: int = Field(default=1_073_741_824, ge=0)
    #: fsync files and directories before acknowledging (power-loss safety).
    fsync: bool = True
    #: Write received instances with O_DIRECT (bypassing the page cache); see node.storage.
    direct_io: bool = True

    @property
    def instances_dir(self) -> Path:
        return self.data_dir / "instances"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"


class StudySettings(_Section):
    """When a study counts as complete."""

    #: A study is complete when no instance arrived for this many seconds.
    quiet_seconds: float = Field(default=30.0, gt=0)
    #: How often the completion check runs (at most every quiet_seconds / 2).
    check_interval_seconds: float = Field(default=1.0, gt=0)


def check_database_url(url: str) -> None:
    """Raise ValueError unless SQLAlchemy parses ``url`` and has its dialect and driver.

    Found here rather than when serve or worker first connects (a traceback). The
    message never repeats the URL: it may carry a password.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ValueError(
            "not a database URL; expected e.g. postgresql+psycopg://user@host/triage "
            "or sqlite:////var/lib/triage-node/triage-node.db"
        ) from None
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise ValueError(
            f"unknown database dialect or driver {parsed.drivername!r}; "
            "use postgresql+psycopg or sqlite"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise ValueError(
            f"the driver of {parsed.drivername!r} is not installed ({exc.name or exc}); "
            "use postgresql+psycopg or sqlite"
        ) from None


class DatabaseSettings(_Section):
    """SQLAlchemy database URL; empty means SQLite at ``<data_dir>/triage-node.db``."""

    url: str = ""
    #: A file holding the URL (it carries the password; must not be group/world-readable).
    url_file: Path | None = None
    #: Run Alembic migrations to head when the node starts (embedded mode).
    auto_upgrade: bool = True
    echo: bool = False

    _url_file = field_validator("url_file")(_readable_secret)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v:
            check_database_url(v)
        return v

    @model_validator(mode="after")
    def _secret(self) -> DatabaseSettings:
        if self.url_file is not None:
            _from_file(self, "url", "url_file")
            try:
                check_database_url(self.url)
            except ValueError as exc:
                raise ValueError(f"url_file: {exc}") from None
        return self


class WebSettings(_Section):
    """The web application (worklist, admin, REST API)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    #: A login ends this long after its user's last request (the worklist's background
    #: polls do not count), and session_max_hours after it began however active.
    session_minutes: int = Field(default=480, ge=1)
    session_max_hours: int = Field(default=12, ge=1)
    #: Failed logins of one user name, or from one client address, within
    #: login_window_minutes before further attempts are refused (HTTP 429) for
    #: login_lockout_seconds, doubling with each further failure (at most the window).
    #: Counted in each web process's memory. The address limit is higher: behind a
    #: reverse proxy without X-Forwarded-For, every user shares the proxy's address.
    login_max_failures: int = Field(default=5, ge=1)
    login_max_failures_per_address: int = Field(default=20, ge=1)
    login_window_minutes: int = Field(default=15, ge=1)
    login_lockout_seconds: int = Field(default=60, ge=1)
    #: Key that signs session cookies (a secret: environment or secret_key_file only).
    #: Neither set: a random key kept in <data_dir>/web-secret (0600).
    secret_key: str = ""
    secret_key_file: Path | None = None
    #: Send the session cookie only over HTTPS. Always on when tls_certificate is set.
    secure_cookies: bool = False
    #: Serve HTTPS with this certificate and key (PEM). Not set: plain HTTP (behind a TLS proxy).
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_minimum_version: TlsVersion = "TLSv1.2"
    tls_ciphers: str = DEFAULT_CIPHERS
    #: Prometheus metrics at /metrics (no login; restrict with the firewall or cluster.token).
    metrics: bool = True

    _secret_key_file = field_validator("secret_key_file")(_readable_secret)

    @model_validator(mode="after")
    def _secret(self) -> WebSettings:
        _from_file(self, "secret_key", "secret_key_file")
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("tls_certificate and tls_private_key are set together")
        if self.tls_certificate is not None:
            self.__dict__["secure_cookies"] = True
        return self

    #: Studies per worklist page.
    page_size: int = Field(default=50, ge=1, le=500)
    #: How often an open worklist asks whether anything changed, in seconds.
    poll_seconds: float = Field(default=2.5, gt=0)


class ModelsSettings(_Section):
    """Which model weights the workers load."""

    #: A folder with a site's own weights and metadata (same layout as models/weights/);
    #: not set: the weights shipped with triage-node.
    weights_dir: Path | None = None

    @field_validator("weights_dir")
    @classmethod
    def _weights(cls, v: Path | None) -> Path | None:
        # Checked in every role: the web role reads the metadata too (model catalogue),
        # and a folder found wrong only by a worker fails every study after its retries.
        problems = [] if v is None else weights_problems(v)
        if problems:
            raise ValueError("; ".join(problems))
        return v


def weights_problems(folder: Path) -> list[str]:
    """What keeps a worker from loading the models in ``folder``, found without loading them.

    Each model's ``<name>.json`` and the weights file it names must be there; the
    checksum and the architecture are checked when a worker loads them.
    """
    from models.registry import CLASSIFIER_NAME, SEGMENTER_NAME

    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = []
    for name in (CLASSIFIER_NAME, SEGMENTER_NAME):
        meta = folder / f"{name}.json"
        try:
            doc = json.loads(meta.read_text(encoding="utf-8"))
        except OSError as exc:
            problems.append(f"cannot read {meta}: {exc.strerror or exc}")
            continue
        except ValueError as exc:
            problems.append(f"{meta} is not valid JSON: {exc}")
            continue
        weights = doc.get("weights_file") if isinstance(doc, dict) else None
        if not isinstance(weights, str) or not weights:
            problems.append(f"{meta} names no weights_file")
        elif not (folder / weights).is_file():
            problems.append(f"{folder / weights} (the weights_file of {meta.name}) is missing")
    return problems


class RoutingSettings(_Section):
    """Where the routing rules come from (see ``rules.example.toml``)."""

    #: A rules file imported as the first version when the database holds none.
    #: Empty: the packaged default rules (chest CR/DX -> both models, routine).
    rules_file: Path | None = None


class PipelineSettings(_Section):
    """Queueing and processing of complete studies."""

    #: Celery broker. Empty: the embedded broker (SQLite file under data_dir, no server).
    #: Production: "redis://host:6379/0" or "amqp://user:pass@host:5672//".
    broker_url: str = ""
    #: Worker processes "serve" starts itself (0: run workers elsewhere, "triage-node worker").
    workers: int = Field(default=1, ge=0)
    #: A pneumonia probability at or above this raises a routine study to urgent.
    escalate_threshold: float = Field(default=0.85, ge=0, le=1)
    escalate_to: Literal["urgent", "stat"] = "urgent"
    #: Attempts per study before it is marked failed, and the first retry delay (doubles).
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_seconds: float = Field(default=5.0, ge=0)
    #: How long a worker holds a study; a dead worker's study is handed out again after it.
    lease_seconds: float = Field(default=600.0, gt=0)
    #: A file holding broker_url (when it carries a password).
    broker_url_file: Path | None = None
    #: Back-pressure: with this many studies queued or processing, new C-STOREs are
    #: answered 0xA702 (out of resources) until the backlog drains. 0: no limit.
    max_backlog_studies: int = Field(default=5000, ge=0)

    _broker_url_file = field_validator("broker_url_file")(_readable_secret)

    @model_validator(mode="after")
    def _secret(self) -> PipelineSettings:
        _from_file(self, "broker_url", "broker_url_file")
        return self


OutputKind = Literal["seg", "sr", "sc"]
OUTPUT_KINDS: tuple[OutputKind, ...] = ("seg", "sr", "sc")
#: Kinds a de-identifying destination cannot receive: the heatmap Secondary Capture has
#: the source image's pixels (and any text burned into them), is marked BurnedInAnnotation
#: YES, and node.deid refuses such objects because it does not clean pixels.
NOT_DEIDENTIFIABLE_KINDS: tuple[OutputKind, ...] = ("sc",)
_BOOL = TypeAdapter(bool)


class DestinationTls(TlsFiles):
    """TLS towards a destination."""

    #: Check that the destination's certificate names ``host``.
    check_hostname: bool = True


class Destination(_Section):
    """A DICOM AE that receives results (a PACS, a viewer, a VNA)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    #: Which result objects it receives: DICOM SEG, the SR report, the heatmap image.
    #: Default: all; with deidentify = true, all but the heatmap ("sc"), which it cannot get.
    kinds: list[OutputKind] = Field(default_factory=lambda: list(OUTPUT_KINDS))
    #: Also forward the original study (a node that sits in front of PACS).
    send_original: bool = False
    #: Keep retrying temporary failures for this long before marking a delivery failed.
    retry_for_seconds: float = Field(default=86_400.0, gt=0)
    #: Our calling AE title towards this destination (default: dicom.ae_title).
    calling_ae_title: AETitle | None = None
    #: De-identify what is sent (PS3.15 Basic Profile, pseudonyms keyed by privacy.pseudonym_key).
    deidentify: bool = False
    #: DICOM TLS towards this destination; ca_certificates verifies it, certificate and
    #: private_key are our client certificate for mutual TLS.
    tls: DestinationTls | None = None

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return None if v is None else validate_ae_title(v)

    @model_validator(mode="before")
    @classmethod
    def _deidentified_default_kinds(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kinds" not in data:
            try:
                deidentify = _BOOL.validate_python(data.get("deidentify", False))
            except ValidationError:
                return data  # reported by the field's own validation
            if deidentify:
                kinds = [k for k in OUTPUT_KINDS if k not in NOT_DEIDENTIFIABLE_KINDS]
                return {**data, "kinds": kinds}
        return data

    @model_validator(mode="after")
    def _deidentified_kinds(self) -> Destination:
        refused = [k for k in self.kinds if k in NOT_DEIDENTIFIABLE_KINDS]
        if self.deidentify and refused:
            raise ValueError(
                f"kinds: {', '.join(refused)} (the heatmap image) cannot be sent with "
                "deidentify = true: its pixels come from the source image, burned-in text "
                "included (BurnedInAnnotation YES), and de-identification does not clean "
                "pixels, so every one would fail; leave it out of kinds (the default for a "
                "de-identifying destination)"
            )
        return self


class ResultsSettings(_Section):
    """Identity of the DICOM objects the node creates."""

    #: Root under which every UID we create is derived (deterministically) from the
    #: source UIDs, model name and version. Use your organisation's registered root.
    uid_root: str = "1.2.826.0.1.3680043.8.498."
    #: Names written into the objects (Manufacturer, device observer, station).
    device_name: str = Field(default="triage-node", max_length=64)
    #: Institution Name (LO: at most 64 characters) of every object; none when unset.
    institution_name: str | None = Field(default=None, max_length=64)

    @field_validator("uid_root")
    @classmethod
    def _root(cls, v: str) -> str:
        if not re.fullmatch(r"([1-9][0-9]*|0)(\.([1-9][0-9]*|0))*\.", v) or len(v) > 40:
            raise ValueError("uid_root must be a UID prefix ending in '.', at most 40 characters")
        return v


class ExportSettings(_Section):
    """Delivery of results to destinations."""

    #: First retry delay after a temporary failure; it doubles up to max_backoff_seconds.
    initial_backoff_seconds: float = Field(default=5.0, gt=0)
    max_backoff_seconds: float = Field(default=300.0, gt=0)
    #: Seconds to wait for a destination's association, responses and network.
    timeout_seconds: float = Field(default=30.0, gt=0)
    #: C-STORE status 0x0110 (processing failure) is retried like a temporary failure,
    #: until a destination has answered it this many times in a row for one object.
    max_processing_failures: int = Field(default=5, ge=1)


class RetentionSettings(_Section):
    """How long received images are kept (findings, results metadata and audit stay)."""

    #: Purge a study's received instances this many days after it was last received
    #: and processed (0: keep forever).
    instances_days: int = Field(default=0, ge=0)
    #: Purge quarantined files after this many days (0: keep forever).
    quarantine_days: int = Field(default=30, ge=0)
    #: How often the purge runs, in minutes.
    check_interval_minutes: float = Field(default=60.0, gt=0)


class PrivacySettings(_Section):
    """De-identification for destinations with ``deidentify = true``."""

    #: Key of the keyed hash (HMAC-SHA256) that makes pseudonyms consistent across studies.
    #: A secret: from the environment or pseudonym_key_file only.
    pseudonym_key: str = ""
    pseudonym_key_file: Path | None = None

    _pseudonym_key_file = field_validator("pseudonym_key_file")(_readable_secret)

    @model_validator(mode="after")
    def _secret(self) -> PrivacySettings:
        _from_file(self, "pseudonym_key", "pseudonym_key_file")
        return self


class ClusterSettings(_Section):
    """Node, web and workers on separate hosts (production topology)."""

    #: Shared secret that workers and the web role present to the node's internal
    #: HTTP API (DICOMweb WADO-RS, result upload). A secret: environment or token_file.
    token: str = ""
    token_file: Path | None = None
    #: Base URL of the node's internal API (cluster.internal_port of the DICOM role),
    #: e.g. "http://node:8081". Used by workers and the web role when they cannot see
    #: the node's storage.
    node_url: str = ""
    #: Listener of the internal API (WADO-RS, result upload) of the dicom and all roles,
    #: apart from the user-facing web.port; HTTPS with web.tls_* like web.port.
    #: 0: no listener of its own (the dicom role serves the API on its service port,
    #: the all role on web.port; the web role never serves it).
    internal_host: str = "127.0.0.1"
    internal_port: int = Field(default=0, ge=0, le=65535)

    _token_file = field_validator("token_file")(_readable_secret)

    @model_validator(mode="after")
    def _secret(self) -> ClusterSettings:
        _from_file(self, "token", "token_file")
        return self


class WorkerSettings(_Section):
    """A worker process (``triage-node worker``)."""

    #: Where a worker reads instances and writes results: "shared" (the node's data_dir
    #: is mounted here), "dicomweb" (fetch from cluster.node_url, upload results), or
    #: "auto" (shared when the data_dir holds the node's instances, else dicomweb).
    storage: Literal["auto", "shared", "dicomweb"] = "auto"
    #: Local cache of fetched instances (empty: <data_dir>/worker-cache), bounded in size.
    cache_dir: Path | None = None
    cache_max_bytes: int = Field(default=2_147_483_648, ge=0)
    #: Health and metrics HTTP endpoint of the worker (/healthz, /readyz, /metrics); 0: off.
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=9100, ge=0, le=65535)
    #: TensorFlow threads per worker process (0: the cores divided by the concurrency).
    tf_threads: int = Field(default=0, ge=0)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False


class Settings(BaseSettings):
    """All settings of one node; see ``config.example.toml``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    #: The parsed TOML document this class reads (set on a subclass by load_settings).
    toml_document: ClassVar[dict[str, Any] | None] = None

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    study: StudySettings = Field(default_factory=StudySettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    destinations: list[Destination] = Field(default_factory=list)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @model_validator(mode="after")
    def _unique_destinations(self) -> Settings:
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _pseudonym_key(self) -> Settings:
        needing = [d.name for d in self.destinations if d.deidentify]
        if needing and not self.privacy.pseudonym_key:
            raise ValueError(
                f"destinations {', '.join(needing)} de-identify: set privacy.pseudonym_key "
                "(TRIAGE_NODE_PRIVACY__PSEUDONYM_KEY or privacy.pseudonym_key_file)"
            )
        return self

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations if d.name == name), None)

    @model_validator(mode="after")
    def _ports_differ(self) -> Settings:
        if (
            self.web.enabled
            and self.web.port == self.dicom.port
            and self.web.host == self.dicom.host
        ):
            raise ValueError("web.port and dicom.port must differ on the same host")
        return self

    @model_validator(mode="after")
    def _internal_port_apart(self) -> Settings:
        """The internal API never shares a port with people's or modalities' traffic."""
        port = self.cluster.internal_port
        taken = [self.dicom.port] + ([self.web.port] if self.web.enabled else [])
        if port and port in taken:
            raise ValueError("cluster.internal_port must differ from web.port and dicom.port")
        return self

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.storage.data_dir / 'triage-node.db').resolve()}"

    @property
    def broker_url(self) -> str:
        if self.pipeline.broker_url:
            return self.pipeline.broker_url
        return f"sqla+sqlite:///{(self.storage.data_dir / 'broker.db').resolve()}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = getattr(settings_cls, "toml_document", None)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml is not None:
            sources.append(_DictSource(settings_cls, toml))
        return tuple(sources)


class _DictSource(PydanticBaseSettingsSource):
    """A settings source holding an already parsed TOML document."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (TOML) and the environment, or raise :class:`ConfigError`.

    Every problem is reported with its key (and line, when the key is in the
    file), so an admin can fix the file in one pass.
    """
    data: dict[str, Any] | None = None
    text: str | None = None
    source = "environment/defaults"
    if path is not None:
        data, text = tomldoc.load(path)
        source = str(path)
    if data is not None:
        inline = _inline_secrets(data)
        if inline:
            raise ConfigError(
                source,
                [tomldoc.describe(source, text, loc, msg) for loc, msg in inline],
            )
    cls: type[Settings] = type("FileSettings", (Settings,), {"toml_document": data})
    env = _environment()
    try:
        return cls(**overrides)
    except SettingsError as exc:
        raise ConfigError(source, _undecodable(env) or [str(exc)]) from None
    except ValidationError as exc:
        problems = [_describe(source, text, env, overrides, err) for err in exc.errors()]
        raise ConfigError(source, problems) from None


def _environment() -> dict[str, str]:
    """Our variables, names upper-cased (pydantic-settings matches them ignoring case)."""
    return {k.upper(): v for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX)}


def _describe(
    source: str, text: str | None, env: dict[str, str], overrides: dict[str, Any], err: Any
) -> str:
    """One problem, blamed on the variable or keyword that set the value, else the file line.

    A value from the environment must not point at a (correct) line of the file.
    """
    loc: tuple[str | int, ...] = tuple(err["loc"])
    keys = [str(p) for p in loc[: _first_index(loc)]]
    msg: str = err["msg"]
    if keys and _has_path(overrides, keys):
        return tomldoc.describe(source, None, loc, msg)
    for i in range(len(keys), 0, -1):
        if _env_name(keys[:i]) in env:
            return tomldoc.describe(source, None, loc, msg, env=_env_name(keys[:i]))
    below = sorted(n for n in env if keys and n.startswith(_env_name(keys) + "__"))
    if below:  # a check of a whole section: some of its keys came from the environment
        msg += f" (set in part by {', '.join(below)})"
    return tomldoc.describe(source, text, loc, msg)


def _has_path(data: Any, keys: list[str]) -> bool:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True


def _first_index(loc: tuple[str | int, ...]) -> int:
    """How many leading parts of ``loc`` are names (an environment variable can only name those)."""
    return next((i for i, p in enumerate(loc) if not isinstance(p, str)), len(loc))


def _env_name(keys: list[str]) -> str:
    return ENV_PREFIX + "__".join(keys).upper()


def _undecodable(env: dict[str, str]) -> list[str]:
    """Variables of list/table keys whose value is not JSON, as problems.

    pydantic-settings decodes those as JSON before validation and its SettingsError
    names neither the variable nor the expected form; this finds both.
    """
    problems = []
    for name, value in sorted(env.items()):
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        field = _field_at(parts)
        if field is None or not (value or len(parts) == 1):
            continue
        kind = _complex_kind(field)
        if kind is None:
            continue
        try:
            json.loads(value)
        except ValueError as exc:
            example = '["a", "b"]' if kind == "list" else '{"key": "value"}'
            problems.append(
                f"from {name}: {'.'.join(parts)}: not valid JSON ({exc.args[0]}); "
                f"a {kind} is given in the environment as JSON, e.g. {example}"
            )
    return problems


def _field_at(parts: list[str]) -> FieldInfo | None:
    """The settings field a variable's name parts lead to, if any."""
    model: type[BaseModel] = Settings
    field: FieldInfo | None = None
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return None
        if i < len(parts) - 1:
            ann = field.annotation
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return None
            model = ann
    return field


def _complex_kind(field: FieldInfo) -> str | None:
    """'list' or 'table' when pydantic-settings JSON-decodes the field's variable, else None."""
    if NoDecode in field.metadata:
        return None
    ann = field.annotation
    args = (
        [a for a in get_args(ann) if a is not type(None)]
        if get_origin(ann) in (Union, UnionType)
        else [ann]
    )
    for arg in args:
        if (isinstance(arg, type) and issubclass(arg, BaseModel)) or get_origin(arg) is dict:
            return "table"
        if get_origin(arg) in (list, tuple, set):
            return "list"
    return None


def _inline_secrets(data: dict[str, Any]) -> list[tuple[tuple[str, str], str]]:
    """Secrets written into the configuration file itself (refused: files get copied)."""
    found = []
    for section, key in SECRET_KEYS:
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if value:
            found.append(
                (
                    (section, key),
                    "a secret may not be written in the configuration file; set "
                    f"TRIAGE_NODE_{section.upper()}__{key.upper()} or {key}_file "
                    "(a file only its owner can read)",
                )
            )
    for section, key in URL_KEYS:
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and re.match(r"^[a-z0-9+.-]+://[^/@]*:[^/@]+@", value, re.I):
            found.append(
                (
                    (section, key),
                    "this URL carries a password; set it in "
                    f"TRIAGE_NODE_{section.upper()}__{key.upper()} or {key}_file instead",
                )
            )
    return found
