"""The one typed settings object for every component (node, worker, CLI).

Every field is read from a ``CXR_``-prefixed environment variable (or an optional ``.env``
file in the working directory). Lists are comma-separated strings, e.g.
``CXR_DESTINATIONS="PACS@10.0.0.5:104,ARCHIVE@10.0.0.6:11112"``.

An invalid value stops start-up with a one-line error naming the variable
(:func:`load_settings`).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "CXR_"
DEFAULT_PATIENT_ID_SALT = "cxr-default-salt"
_AET_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash/control chars
_DEST_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")
_HOSTPORT_RE = re.compile(r"^(?:hl7://)?(?P<host>[^:@/]+):(?P<port>\d{1,5})$", re.IGNORECASE)
DICOMWEB_PREFIX = "dicomweb+"
DESTINATION_TEXT_MAX = 128  # deliveries.destination (the audit column)


def default_model_dir() -> Path:
    """The shipped default model artifact inside the ``ml`` package."""
    return Path(__file__).resolve().parent.parent / "ml" / "models" / "cxr-densenet169-v2"


class Destination(BaseModel):
    """A DICOM C-STORE destination, written ``AET@host:port``."""

    kind: Literal["dimse"] = "dimse"
    ae_title: str
    host: str
    port: int

    @property
    def label(self) -> str:
        """How problems name it (the AE title)."""
        return self.ae_title

    @classmethod
    def parse(cls, text: str) -> Destination:
        m = _DEST_RE.match(text.strip())
        if not m:
            raise ValueError(f"{text!r} is not AET@host:port")
        port = int(m["port"])
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range in {text!r}")
        aet = m["aet"].strip()
        if not _AET_RE.match(aet):
            raise ValueError(f"invalid AE title {aet!r}")
        return cls(ae_title=aet, host=m["host"], port=port)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class DicomWebDestination(BaseModel):
    """A DICOMweb STOW-RS destination, written ``dicomweb+http(s)://host[:port]/path``.

    ``url`` is the DICOMweb root (the service base URL, e.g. ``http://pacs:8042/dicom-web``);
    the results are POSTed to ``<url>/studies``. Credentials never go into the URL: they
    come from CXR_DICOMWEB_USERNAME/PASSWORD or CXR_DICOMWEB_TOKEN."""

    kind: Literal["dicomweb"] = "dicomweb"
    url: str

    @classmethod
    def parse(cls, text: str) -> DicomWebDestination:
        text = text.strip()
        if not text.lower().startswith(DICOMWEB_PREFIX):
            raise ValueError(f"{text!r} is not dicomweb+http(s)://host:port/path")
        parts = urlsplit(text[len(DICOMWEB_PREFIX) :])
        if parts.scheme.lower() not in ("http", "https"):
            raise ValueError(f"{text!r}: the scheme must be dicomweb+http or dicomweb+https")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "credentials do not belong in a destination URL: set CXR_DICOMWEB_USERNAME/"
                "CXR_DICOMWEB_PASSWORD or CXR_DICOMWEB_TOKEN"
            )
        if not parts.hostname:
            raise ValueError(f"{text!r} has no host")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"invalid port in {text!r}") from None
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port {port} out of range in {text!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"{text!r}: no query or fragment allowed")
        url = urlunsplit((parts.scheme.lower(), parts.netloc, parts.path.rstrip("/"), "", ""))
        dest = cls(url=url)
        if len(str(dest)) > DESTINATION_TEXT_MAX:
            raise ValueError(f"{text!r} is longer than {DESTINATION_TEXT_MAX} characters")
        return dest

    @property
    def label(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return DICOMWEB_PREFIX + self.url


class Hl7Destination(BaseModel):
    """An HL7 v2 receiver (a RIS) reached over MLLP, written ``host:port``."""

    kind: Literal["hl7"] = "hl7"
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Hl7Destination:
        m = _HOSTPORT_RE.match(text.strip())
        if not m:
            raise ValueError(f"{text!r} is not host:port")
        port = int(m["port"])
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range in {text!r}")
        return cls(host=m["host"], port=port)

    @property
    def label(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return f"hl7://{self.host}:{self.port}"


#: any result destination: C-STORE, STOW-RS or HL7 (``kind``: dimse / dicomweb / hl7)
AnyDestination = Destination | DicomWebDestination | Hl7Destination


def parse_destination(text: str) -> Destination | DicomWebDestination:
    """One CXR_DESTINATIONS entry: ``AET@host:port`` or ``dicomweb+http(s)://...``."""
    if text.strip().lower().startswith(DICOMWEB_PREFIX):
        return DicomWebDestination.parse(text)
    return Destination.parse(text)


class AllowedPeer(BaseModel):
    """One allow-list entry: ``AET`` or ``AET@ip`` (the IP check is optional)."""

    ae_title: str
    host: str | None = None

    @classmethod
    def parse(cls, text: str) -> AllowedPeer:
        text = text.strip()
        aet, _, host = text.partition("@")
        aet = aet.strip()
        if not _AET_RE.match(aet):
            raise ValueError(f"invalid AE title {aet!r}")
        return cls(ae_title=aet, host=host.strip() or None)

    def matches(self, ae_title: str, host: str | None) -> bool:
        if ae_title.strip() != self.ae_title:
            return False
        return self.host is None or self.host == host


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class Settings(BaseSettings):
    """All ``CXR_*`` settings. Field names are the variable names without the prefix."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # --- DICOM node -------------------------------------------------------------------
    ae_title: str = Field("CXR_WORKER", description="Our AE title (called AE must match).")
    dicom_host: str = Field("0.0.0.0", description="Address the Storage SCP binds to.")
    dicom_port: int = Field(11112, ge=1, le=65535, description="Port of the Storage SCP.")
    allowed_calling_aets: Annotated[list[AllowedPeer], NoDecode] = Field(
        default_factory=list,
        description="Calling-AE allow-list, `AET` or `AET@ip`, comma-separated; empty = any.",
    )
    max_associations: int = Field(10, ge=1, le=1000, description="Concurrent associations.")
    max_instance_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="Largest accepted encoded instance (bytes)."
    )
    receive_chunked: bool = Field(
        True,
        description="Write each C-STORE data set to the spool's tmp/ while it arrives "
        "(pynetdicom chunked receive), not into memory first.",
    )
    max_pixels: int = Field(
        100_000_000, ge=1, description="Largest Rows x Columns x Frames accepted (bomb guard)."
    )
    tls_cert: Path | None = Field(None, description="PEM certificate: enables DICOM TLS.")
    tls_key: Path | None = Field(None, description="PEM private key for CXR_TLS_CERT.")
    tls_ca: Path | None = Field(
        None, description="PEM CA bundle: when set, peers must present a certificate it signs."
    )
    acse_timeout: float = Field(30.0, gt=0, description="ACSE timeout (s).")
    request_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a new TCP connection has to send its A-ASSOCIATE-RQ.",
    )
    dimse_timeout: float = Field(60.0, gt=0, description="DIMSE timeout (s).")
    network_timeout: float = Field(60.0, gt=0, description="Idle network timeout (s).")
    handler_stuck_seconds: float = Field(
        120.0,
        gt=0,
        description="A C-STORE handler running longer than this makes /healthz unhealthy.",
    )

    # --- filtering rules ---------------------------------------------------------------
    chest_body_parts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["CHEST", "THORAX", "LUNG", ""],
        description="BodyPartExamined values treated as chest ('' = empty/absent).",
    )
    frontal_views: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["PA", "AP", ""],
        description="ViewPosition values treated as frontal ('' = empty/absent).",
    )
    accepted_modalities: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["CR", "DX", "OT", ""],
        description="Modality values classified; others are ignored.",
    )

    # --- storage and audit -------------------------------------------------------------
    spool_dir: Path = Field(Path("var/spool"), description="Durable spool of received files.")
    database_url: str = Field(
        "sqlite:///var/cxr.db", description="SQLAlchemy URL of the audit database."
    )
    patient_id_storage: Literal["hash", "plain"] = Field(
        "hash", description="Store PatientID hashed (default) or in clear."
    )
    patient_id_salt: str = Field(
        DEFAULT_PATIENT_ID_SALT,
        description="Secret key of the PatientID HMAC-SHA256; set one per site.",
    )
    spool_retention_days: int = Field(
        30, ge=0, description="Days a finished instance's spool file is kept (0 = forever)."
    )

    # --- queue / worker ----------------------------------------------------------------
    broker_url: str = Field(
        "",
        description="Celery broker, e.g. redis://redis:6379/0. Empty = embedded SQLite broker.",
    )
    embedded_broker_path: Path = Field(
        Path("var/broker.sqlite"), description="File of the embedded broker (no server)."
    )
    worker_concurrency: int = Field(1, ge=1, le=64, description="Processes per worker.")
    task_soft_time_limit: int = Field(120, ge=1, description="Soft time limit per task (s).")
    task_time_limit: int = Field(180, ge=1, description="Hard time limit per task (s).")
    task_max_retries: int = Field(5, ge=0, description="Retries for transient failures.")
    retry_backoff_base: int = Field(
        5, ge=1, description="First retry backoff (s); it doubles per retry, with jitter."
    )
    retry_backoff_max: int = Field(300, ge=1, description="Largest retry backoff (s).")
    retry_eta_max: int = Field(
        30,
        ge=0,
        description="Longest retry wait held by the broker (s); longer ones wait in the audit "
        "DB for the sweep, so a killed worker's task is redelivered after "
        "CXR_TASK_TIME_LIMIT + this + 15 s.",
    )
    requeue_interval: float = Field(
        30.0, gt=0, description="Seconds between re-queue sweeps of stranded instances."
    )
    requeue_stale_after: float = Field(
        600.0, gt=0, description="A queued/processing instance older than this is re-queued."
    )

    # --- model -------------------------------------------------------------------------
    model_dir: Path = Field(default_factory=default_model_dir, description="Model artifact.")
    inference_engine: Literal["auto", "onnx", "keras"] = Field(
        "auto", description="auto = ONNX Runtime when available (faster on CPU), else Keras."
    )
    model_cache_dir: Path = Field(
        Path("var/model-cache"), description="Where the ONNX export of the model is cached."
    )

    # --- results and delivery ----------------------------------------------------------
    destinations: Annotated[list[Destination | DicomWebDestination], NoDecode] = Field(
        default_factory=list,
        description="Result destinations, comma-separated: C-STORE `AET@host:port` and/or "
        "STOW-RS `dicomweb+http(s)://host:port/dicomweb-root`.",
    )
    dicomweb_username: str = Field("", description="Basic auth user for STOW-RS destinations.")
    dicomweb_password: SecretStr = Field(
        SecretStr(""), description="Basic auth password for STOW-RS destinations (never logged)."
    )
    dicomweb_token: SecretStr = Field(
        SecretStr(""), description="Bearer token for STOW-RS destinations (never logged)."
    )
    dicomweb_timeout: float = Field(30.0, gt=0, description="STOW-RS request timeout (s).")
    dicomweb_ca: Path | None = Field(
        None, description="PEM CA bundle verifying https STOW-RS servers (default: system CAs)."
    )
    hl7_destinations: Annotated[list[Hl7Destination], NoDecode] = Field(
        default_factory=list,
        description="HL7 v2 ORU^R01 receivers (RIS) over MLLP, `host:port`, comma-separated.",
    )
    hl7_ack_timeout: float = Field(
        30.0, gt=0, description="Seconds to connect and to wait for the HL7 ACK."
    )
    hl7_receiving_application: str = Field("", description="MSH-5 of the ORU^R01 messages.")
    hl7_receiving_facility: str = Field("", description="MSH-6 of the ORU^R01 messages.")
    urgent_threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="A COVID verdict with a probability above this is sent to the RIS with "
        "priority STAT (S) as 'COVID-19 suspected'.",
    )
    send_sr: bool = Field(True, description="Also send the Structured Report.")
    send_heatmap: bool = Field(
        True,
        description="Also send the Grad-CAM heat map as a DICOM Segmentation (FRACTIONAL).",
    )
    delivery_max_attempts: int = Field(
        10,
        ge=1,
        description="Delivery attempts per result (with the default backoff: 10-20 minutes).",
    )
    delivery_tls: bool = Field(
        False,
        description="Deliver results over DICOM TLS (client cert CXR_TLS_CERT/KEY if set; "
        "the PACS certificate is verified against CXR_TLS_CA if set).",
    )
    delivery_threads: int = Field(
        1,
        ge=0,
        le=16,
        description="Delivery threads per worker process: an image's results are sent while "
        "the next image is classified (0: sent inside the classify task).",
    )
    delivery_association_idle: float = Field(
        10.0,
        ge=0.0,
        description="Seconds an association to a C-STORE destination stays open for the "
        "next results (0: one association per instance); at most half of CXR_NETWORK_TIMEOUT.",
    )
    institution_name: str = Field("", description="Optional InstitutionName on outputs.")

    # --- web console and HTTP API (cxr web) ---------------------------------------------
    web_host: str = Field("127.0.0.1", description="Address of the web console and API.")
    web_port: int = Field(
        8080,
        ge=0,
        le=65535,
        description="Port of the web console; when taken (several processes on one host), "
        "a free port, named in the log and by `cxr run`.",
    )
    web_admin_password: SecretStr | None = Field(
        None,
        description="Password of the web user `admin`. No default: without it (or the hash "
        "file that `cxr run` writes) `cxr web` refuses to start.",
    )
    web_admin_password_file: Path = Field(
        Path("var/web-admin.scrypt"),
        description="scrypt hash of the admin password (written once by `cxr run`; the "
        "password itself is never stored).",
    )
    web_viewer_password: SecretStr | None = Field(
        None, description="Optional password of a read-only web user `viewer` (no retry)."
    )
    web_secret_key: SecretStr | None = Field(
        None, description="Key signing the session cookies (default: random per start)."
    )
    web_max_upload_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest upload accepted by Try it / predict."
    )
    web_keep_uploads: bool = Field(
        False, description="Keep uploaded files in CXR_WEB_UPLOAD_DIR (default: never stored)."
    )
    web_upload_dir: Path = Field(Path("var/uploads"), description="Where kept uploads go.")
    web_login_max_failures: int = Field(
        5, ge=1, description="Failed logins per client and user name within the window."
    )
    web_login_window_seconds: float = Field(
        300.0, gt=0, description="Window of the failed-login rate limit (s)."
    )
    web_max_pixels: int = Field(
        36_000_000,
        ge=1,
        description="Largest upload (rows x columns x frames x samples) the web console "
        "decodes: a decompression-bomb guard below the node's CXR_MAX_PIXELS.",
    )
    web_node_host: str = Field(
        "",
        description="Host the console checks the DICOM node on (default: CXR_DICOM_HOST, "
        "0.0.0.0 meaning this host; in compose: node).",
    )
    web_workers_health_url: str = Field(
        "",
        description="A /healthz whose 'workers' check the console shows (`cxr run` sets "
        "its own); empty = ask the workers through the broker (Redis).",
    )
    web_tls_cert: Path | None = Field(
        None, description="PEM certificate: the console speaks HTTPS (secure cookies, HSTS)."
    )
    web_tls_key: Path | None = Field(None, description="PEM private key for CXR_WEB_TLS_CERT.")
    web_forwarded_allow_ips: str = Field(
        "",
        description="Reverse proxies trusted for X-Forwarded-For/-Proto (comma-separated "
        "IPs); empty = none.",
    )
    web_session_max_age: int = Field(
        8 * 3600, ge=60, description="Lifetime of a web login session (s)."
    )

    # --- observability -----------------------------------------------------------------
    metrics_port: int = Field(
        9108,
        ge=0,
        le=65535,
        description="Prometheus /metrics and /healthz port (0 = off); when taken (several "
        "processes on one host), a free port, named in the log.",
    )
    metrics_host: str = Field("127.0.0.1", description="Address of the metrics endpoint.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO")
    log_json: bool = Field(False, description="JSON log lines.")

    @field_validator("allowed_calling_aets", mode="before")
    @classmethod
    def _parse_peers(cls, v: object) -> object:
        v = _split_csv(v)
        if isinstance(v, list):
            return [AllowedPeer.parse(x) if isinstance(x, str) else x for x in v]
        return v

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_dests(cls, v: object) -> object:
        v = _split_csv(v)
        if isinstance(v, list):
            return [parse_destination(x) if isinstance(x, str) else x for x in v]
        return v

    @field_validator("hl7_destinations", mode="before")
    @classmethod
    def _parse_hl7_dests(cls, v: object) -> object:
        v = _split_csv(v)
        if isinstance(v, list):
            return [Hl7Destination.parse(x) if isinstance(x, str) else x for x in v]
        return v

    @field_validator("chest_body_parts", "frontal_views", "accepted_modalities", mode="before")
    @classmethod
    def _parse_upper_list(cls, v: object) -> object:
        if isinstance(v, str):
            # keep empty entries meaningful: "CHEST,,THORAX" or a trailing comma means ''
            return [x.strip().upper() for x in v.split(",")]
        if isinstance(v, list):
            return [str(x).strip().upper() for x in v]
        return v

    @field_validator("ae_title")
    @classmethod
    def _check_aet(cls, v: str) -> str:
        if not _AET_RE.match(v) or not v.strip():
            raise ValueError("must be 1-16 printable characters without backslash")
        return v.strip()

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("CXR_TLS_CERT and CXR_TLS_KEY must be set together")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            p = getattr(self, name)
            if p is not None and not Path(p).is_file():
                raise ValueError(f"{ENV_PREFIX}{name.upper()}: file {p} does not exist")
        if self.dicomweb_ca is not None and not Path(self.dicomweb_ca).is_file():
            raise ValueError(f"{ENV_PREFIX}DICOMWEB_CA: file {self.dicomweb_ca} does not exist")
        if self.dicomweb_token.get_secret_value() and self.dicomweb_username:
            raise ValueError("set either CXR_DICOMWEB_TOKEN or CXR_DICOMWEB_USERNAME, not both")
        if self.dicomweb_password.get_secret_value() and not self.dicomweb_username:
            raise ValueError("CXR_DICOMWEB_PASSWORD needs CXR_DICOMWEB_USERNAME")
        if (self.web_tls_cert is None) != (self.web_tls_key is None):
            raise ValueError("CXR_WEB_TLS_CERT and CXR_WEB_TLS_KEY must be set together")
        for name in ("web_tls_cert", "web_tls_key"):
            p = getattr(self, name)
            if p is not None and not Path(p).is_file():
                raise ValueError(f"{ENV_PREFIX}{name.upper()}: file {p} does not exist")
        if self.task_soft_time_limit >= self.task_time_limit:
            raise ValueError("CXR_TASK_SOFT_TIME_LIMIT must be below CXR_TASK_TIME_LIMIT")
        return self

    @property
    def redelivery_timeout(self) -> int:
        """Seconds after which the broker hands a task of a killed worker to another one
        (Redis ``visibility_timeout``): a task runs at most ``task_time_limit`` after a
        countdown of at most ``retry_eta_max``, plus 15 s of slack."""
        return self.task_time_limit + self.retry_eta_max + 15

    @property
    def delivery_destinations(self) -> list[AnyDestination]:
        """Every result destination: CXR_DESTINATIONS (C-STORE, STOW-RS), then
        CXR_HL7_DESTINATIONS."""
        return [*self.destinations, *self.hl7_destinations]

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    @property
    def effective_broker_url(self) -> str:
        """The Celery broker: CXR_BROKER_URL, or the embedded SQLite transport."""
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{Path(self.embedded_broker_path).resolve()}"


class SettingsError(SystemExit):
    """Raised by :func:`load_settings`; its message is one line naming the variable."""


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if not isinstance(x, int)]
        var = f"{ENV_PREFIX}{loc[0].upper()}" if loc else "settings"
        msg = err.get("msg", "invalid")
        parts.append(f"{var}: {msg}")
    return "invalid setting: " + "; ".join(parts)


def load_settings(**overrides: object) -> Settings:
    """Build the settings, turning a validation error into a one-line :class:`SettingsError`."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (cached). Tests call ``get_settings.cache_clear()``."""
    return load_settings()


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting, for the README/doctor."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(str(x) for x in default)
        elif isinstance(default, SecretStr):
            default = ""  # a secret has no default; it is never printed
        rows.append((f"{ENV_PREFIX}{name.upper()}", str(default), field.description or ""))
    return rows
