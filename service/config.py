"""Service settings: environment variables with the prefix ``VOXELDOSE_`` (plus ``RAY_ADDRESS``).

    VOXELDOSE_DATA_DIR=/srv/voxeldose VOXELDOSE_DATABASE_URL=postgresql+psycopg://u:p@db/voxeldose \
    RAY_ADDRESS=ray://head:10001 voxeldose serve

Defaults run everything on one machine: SQLite in ``data_dir``, Ray started in-process.  With a
Ray cluster (``RAY_ADDRESS``) ``data_dir`` must be on storage that every Ray node sees at the same
path (the workers read ``incoming/`` and write ``jobs/<id>/out``) and the database must be one that
every node reaches (PostgreSQL), because the workers write progress into it.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Any, get_args

from pydantic import AliasChoices, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from voxeldose.spec import JobSpec, PvcMethod

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the name localhost."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """All knobs of the service.  Constructor keywords override the environment (the CLI uses that)."""

    model_config = SettingsConfigDict(env_prefix="VOXELDOSE_", extra="ignore", validate_default=True)

    data_dir: Path = Field(Path("./voxeldose-data"), description="incoming/, jobs/<id>/out, voxeldose.db")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///{data_dir}/voxeldose.db")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("RAY_ADDRESS", "VOXELDOSE_RAY_ADDRESS", "ray_address"),
        description="None: a Ray started in-process (local, loopback only); else the cluster to join",
    )
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of the in-process Ray (None: all)")
    ray_object_store_mb: int | None = Field(
        512, ge=80, description="object store of the in-process Ray, MiB (jobs pass paths, not arrays)"
    )
    jobs_in_flight: int = Field(2, ge=1)
    job_timeout_s: float = Field(3600.0, gt=0)
    max_attempts: int = Field(3, ge=1, description="runs of one job before a lost worker fails it")
    max_upload_mb: int = Field(2048, ge=1)
    min_free_disk_mb: int = Field(1024, ge=0)
    dispatch_interval_s: float = Field(0.5, gt=0)
    log_json: bool = False
    auth_disabled: bool = Field(False, description="tests only; refused unless host is loopback")
    # DICOM node (``voxeldose dicom-node``, :mod:`service.dicom_node`) ---------------------------
    dicom_ae_title: str = Field(
        "VOXELDOSE", min_length=1, max_length=16, description="our AE title (Called AE must match)"
    )
    dicom_host: str = Field("127.0.0.1", description="address the Storage SCP listens on")
    dicom_port: int = Field(11112, ge=0, le=65535)
    dicom_allowed_aets: list[str] = Field(
        default_factory=list,
        description="calling AE titles allowed to associate; empty refuses everyone unless dicom_allow_any",
    )
    dicom_allow_any: bool = Field(False, description="accept any calling AE title (the host list still applies)")
    dicom_allowed_hosts: list[str] = Field(
        default_factory=list, description="peer IP addresses or networks (CIDR) allowed; empty: any address"
    )
    dicom_min_free_mb: int = Field(1024, ge=0, description="refuse instances (0xA700) below this much free disk")
    dicom_max_associations: int = Field(10, ge=1)
    dicom_enabled: bool = Field(True, description="`voxeldose serve` also runs the DICOM node and its job trigger")
    # Job trigger (:mod:`service.trigger`) ------------------------------------------------------
    dicom_quiet_period_s: float = Field(
        30.0,
        ge=0,
        description="a patient's series count as complete this long after the last instance (or "
        "dicom_release_settle_s after an association release)",
    )
    dicom_release_settle_s: float = Field(
        5.0,
        ge=0,
        description="after an association release (or a STOW-RS request) the trigger waits this long before looking: "
        "a sender that opens a new association at once is still sending (Orthanc does so mid-push to negotiate a "
        "SOP class it had not proposed, e.g. a SEG); an instance arriving meanwhile restarts the quiet period",
    )
    trigger_min_timepoints: int = Field(
        3, ge=1, description="SPECT time points (each with its CT) that start a job, with VOIs"
    )
    trigger_deadline_h: float = Field(
        240.0,
        ge=0,
        description="hours after a cycle's first series: start with what exists (1 time point: single-time-point method); 0: never",
    )
    trigger_spec: dict[str, Any] = Field(
        default_factory=dict,
        description="JobSpec fields for node-started jobs (JSON), e.g. calibration, fit, dose, pvc (its camera "
        "profile: the registered one matching the SPECT)",
    )
    trigger_interval_s: float = Field(2.0, gt=0, description="how often the trigger and the sender look for work")
    # Results back to the PACS (:mod:`service.sender`) ----------------------------------------
    dicom_destination_ae_title: str | None = Field(
        None, max_length=16, description="AE title results are sent to; unset: none sent"
    )
    dicom_destination_host: str | None = None
    dicom_destination_port: int | None = Field(None, ge=1, le=65535)
    dicom_send_sources: list[str] = Field(
        default_factory=lambda: ["dicom"], description="jobs of these origins are sent (dicom, upload, api)"
    )
    dicom_send_max_age_h: float = Field(
        72.0, gt=0, description="only jobs finished this recently are sent (a new destination does not get the history)"
    )
    dicom_send_max_attempts: int = Field(8, ge=1)
    dicom_send_retry_s: float = Field(30.0, gt=0, description="first retry delay; doubles per attempt, at most 1 h")
    dicom_send_timeout_s: float = Field(60.0, gt=0, description="association and DIMSE timeout when sending")
    dicom_send_unapproved: bool = Field(
        True,
        description="send results before a physicist approved them (RT Dose and SR marked preliminary); false: "
        "only approved results are sent.  Either way an approval sends the approved SR and RT Dose",
    )
    # The physicist's review (:mod:`service.approval`) ----------------------------------------
    review_organisation: str = Field(
        "voxeldose", min_length=1, max_length=64, description="Verifying Organization written into approved SRs"
    )

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'voxeldose.db'}"
        self.dicom_allowed_aets = [a.strip() for a in self.dicom_allowed_aets if a.strip()]
        for a in self.dicom_allowed_aets:
            if len(a) > 16:
                raise ValueError(f"DICOM AE title longer than 16 characters: {a!r}")
        for h in self.dicom_allowed_hosts:
            try:
                ipaddress.ip_network(h.strip(), strict=False)
            except ValueError:
                raise ValueError(f"dicom_allowed_hosts: not an IP address or network: {h!r}") from None
        dest = (self.dicom_destination_ae_title, self.dicom_destination_host, self.dicom_destination_port)
        if any(v not in (None, "") for v in dest) and not all(v not in (None, "") for v in dest):
            raise ValueError(
                "dicom_destination_ae_title, dicom_destination_host and dicom_destination_port go together: set all three or none"
            )
        bad = set(self.dicom_send_sources) - {"dicom", "upload", "api"}
        if bad:
            raise ValueError(f"dicom_send_sources: unknown origin(s) {sorted(bad)}; expected dicom, upload, api")
        if self.trigger_spec:
            fixed = {"inputs", "patient_id", "cycle_number", "earlier_cycles"} & set(self.trigger_spec)
            if fixed:
                raise ValueError(f"trigger_spec may not set {sorted(fixed)}: the trigger fills them in")
            probe = {**self.trigger_spec, "inputs": ["."]}
            pvc = probe.get("pvc", "none")
            if pvc != "none" and probe.get("camera") is None:
                # the camera profile comes per job, from the registered profile matching the SPECT (service.cameras)
                if pvc not in get_args(PvcMethod):
                    raise ValueError(f"trigger_spec: pvc {pvc!r} is not one of {', '.join(get_args(PvcMethod))}")
                probe["pvc"] = "none"
            try:
                JobSpec.model_validate(probe)
            except (ValidationError, ValueError) as exc:  # pydantic's message names the field
                raise ValueError(f"trigger_spec is not a valid job spec: {exc}") from None
        if self.auth_disabled and not is_loopback(self.host):
            raise ValueError(
                f"auth_disabled is only allowed when the service listens on loopback, not on {self.host!r}"
            )
        return self

    # paths -----------------------------------------------------------------------------------
    @property
    def incoming_dir(self) -> Path:
        return self.data_dir / "incoming"

    @property
    def db_url(self) -> str:
        """``database_url`` as filled in (the SQLite file in ``data_dir`` when none was given)."""
        return self.database_url or f"sqlite:///{self.data_dir / 'voxeldose.db'}"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    def job_out_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id / "out"

    @property
    def dicom_destination(self) -> str | None:
        """``AE@host:port`` of the results' destination, or None."""
        if not self.dicom_destination_ae_title:
            return None
        return f"{self.dicom_destination_ae_title}@{self.dicom_destination_host}:{self.dicom_destination_port}"

    @property
    def dicom_dir(self) -> Path:
        """Instances received by the DICOM node: ``<Study>/<Series>/<SOPInstance>.dcm``."""
        return self.data_dir / "dicom"

    def ensure_dirs(self) -> None:
        for p in (self.data_dir, self.incoming_dir, self.jobs_dir):
            p.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings from the environment (cached; tests build their own ``Settings``)."""
    return Settings()
