"""Node configuration: one pydantic-settings model, read from TOML, overridden by environment.

Precedence (highest first): keyword arguments, ``TRIAGE_NODE_*`` environment
variables (``__`` separates nesting: ``TRIAGE_NODE_DICOM__PORT=11113``), the TOML
file given with ``--config``, the defaults below. The defaults are the embedded
all-in-one mode: SQLite under ``./var``, no broker server.
``config.example.toml`` documents every key; keep the two in step (a test checks).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from node import tomldoc
from node.errors import ConfigError

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash/controls


def validate_ae_title(value: str) -> str:
    """An AE title (PS3.5 6.2 VR AE): 1-16 characters, no backslash or control characters."""
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(value):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 characters, no backslash)")
    return stripped


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


class DicomSettings(_Section):
    """The DICOM listener (C-ECHO/C-STORE SCP)."""

    ae_title: AETitle = "TRIAGE"
    host: str = "0.0.0.0"  # noqa: S104 - a DICOM node listens on the hospital network
    port: int = Field(default=11112, ge=1, le=65535)
    #: Largest PDU we accept. Large PDUs mean fewer, cheaper reads; 0 means unlimited.
    max_pdu_size: int = Field(default=4_194_304, ge=0)
    #: Who may send. Each entry: "AE", "AE@host" or "AE@network/prefix", or a table.
    allowed_callers: list[AllowedCaller] = Field(
        default_factory=lambda: [
            AllowedCaller(ae_title="STORESCU", host="127.0.0.1"),
            AllowedCaller(ae_title="ECHOSCU", host="127.0.0.1"),
            AllowedCaller(ae_title="DCMSEND", host="127.0.0.1"),
        ]
    )
    maximum_associations: int = Field(default=32, ge=1)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=120.0, gt=0)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return validate_ae_title(v)

    @field_validator("allowed_callers", mode="before")
    @classmethod
    def _callers(cls, v: Any) -> Any:
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


class DatabaseSettings(_Section):
    """SQLAlchemy database URL; empty means SQLite at ``<data_dir>/triage-node.db``."""

    url: str = ""
    #: Run Alembic migrations to head when the node starts (embedded mode).
    auto_upgrade: bool = True
    echo: bool = False


class WebSettings(_Section):
    """The web application (worklist, admin, REST API)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    #: A login lasts this long after the last request (sliding expiry of the session cookie).
    session_minutes: int = Field(default=480, ge=1)
    #: Key that signs session cookies. Empty: a random key kept in <data_dir>/web-secret (0600).
    secret_key: str = ""
    #: Send the session cookie only over HTTPS (set when a TLS proxy is in front).
    secure_cookies: bool = False
    #: Studies per worklist page.
    page_size: int = Field(default=50, ge=1, le=500)
    #: How often an open worklist asks whether anything changed, in seconds.
    poll_seconds: float = Field(default=2.5, gt=0)


class ModelsSettings(_Section):
    """Which model weights the workers load."""

    #: A folder with a site's own weights and metadata (same layout as models/weights/);
    #: not set: the weights shipped with triage-node.
    weights_dir: Path | None = None


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


OutputKind = Literal["seg", "sr", "sc"]
OUTPUT_KINDS: tuple[OutputKind, ...] = ("seg", "sr", "sc")


class Destination(_Section):
    """A DICOM AE that receives results (a PACS, a viewer, a VNA)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    #: Which result objects it receives: DICOM SEG, the SR report, the heatmap image.
    kinds: list[OutputKind] = Field(default_factory=lambda: list(OUTPUT_KINDS))
    #: Also forward the original study (a node that sits in front of PACS).
    send_original: bool = False
    #: Keep retrying temporary failures for this long before marking a delivery failed.
    retry_for_seconds: float = Field(default=86_400.0, gt=0)
    #: Our calling AE title towards this destination (default: dicom.ae_title).
    calling_ae_title: AETitle | None = None

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return None if v is None else validate_ae_title(v)


class ResultsSettings(_Section):
    """Identity of the DICOM objects the node creates."""

    #: Root under which every UID we create is derived (deterministically) from the
    #: source UIDs, model name and version. Use your organisation's registered root.
    uid_root: str = "1.2.826.0.1.3680043.8.498."
    #: Names written into the objects (Manufacturer, device observer, station).
    device_name: str = Field(default="triage-node", max_length=64)
    institution_name: str | None = None

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


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False


class Settings(BaseSettings):
    """All settings of one node; see ``config.example.toml``."""

    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_NODE_",
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
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @model_validator(mode="after")
    def _unique_destinations(self) -> Settings:
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique: {', '.join(duplicates)}")
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
    cls: type[Settings] = type("FileSettings", (Settings,), {"toml_document": data})
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = [tomldoc.describe(source, text, err["loc"], err["msg"]) for err in exc.errors()]
        raise ConfigError(source, problems) from None
