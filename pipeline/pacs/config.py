"""Listener configuration: configs/pacs.yaml validated by pydantic, overridden by CLI flags."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.config import CONFIG_DIR, read_yaml
from pipeline.errors import InputError

DEFAULT_PACS_CONFIG = CONFIG_DIR / "pacs.yaml"
_FORMATS = ("json", "csv", "nifti", "seg", "sr", "html")


def check_ae_title(value: str) -> str:
    """An AE title: 1-16 characters of the default character repertoire, no backslash, not blank."""
    title = value.strip()
    if not title or len(title) > 16 or "\\" in title or not all(32 <= ord(c) < 127 for c in title):
        raise ValueError(f"invalid AE title {value!r} (1-16 printable ASCII characters, no backslash)")
    return title


@dataclass(frozen=True)
class Destination:
    """Where results are sent: AE title, host and TCP port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


_DEST = re.compile(r"^(?P<ae>[^@]+)@(?P<host>\[[0-9A-Fa-f:.]+\]|[^:@\s]+):(?P<port>\d{1,5})$")


def parse_destination(text: str) -> Destination:
    """Parse ``AE@HOST:PORT`` (IPv6 hosts in brackets). Raises ValueError with a clear message."""
    m = _DEST.match(text.strip())
    if not m:
        raise ValueError(f"destination {text!r} must look like AE@HOST:PORT")
    port = int(m["port"])
    if not 0 < port < 65536:
        raise ValueError(f"destination port {port} out of range 1-65535")
    return Destination(check_ae_title(m["ae"]), m["host"].strip("[]"), port)


class OutboxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    retry_base_s: float = Field(5.0, gt=0)
    retry_max_s: float = Field(600.0, gt=0)


class JobsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_attempts: int = Field(3, ge=1)
    keep_done_days: float | None = Field(7.0, ge=0)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: str = "auto"
    fast: bool = False
    intent: Literal["palliative", "curative"] = "palliative"
    model: str | None = None
    formats: list[str] = Field(default_factory=lambda: list(_FORMATS))

    @field_validator("formats")
    @classmethod
    def _formats(cls, value: list[str]) -> list[str]:
        bad = [f for f in value if f not in _FORMATS]
        if bad:
            raise ValueError(f"unknown format(s) {bad}")
        out = list(dict.fromkeys(["json", *value]))
        for needed in ("seg", "sr"):  # the PACS gets SEG + SR: always produce them
            if needed not in out:
                out.append(needed)
        return out


class PacsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ae_title: str = "OSTEOPLAN"
    bind_address: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    spool: Path | None = None
    send_to: str | None = None
    study_timeout_s: float = Field(30.0, gt=0)
    # a study whose sending associations have all closed is complete after this long with no new
    # instance (None: only study_timeout_s); for senders that send a whole study per association
    release_timeout_s: float | None = Field(None, gt=0)
    allow_ae: list[str] = Field(default_factory=list)
    max_associations: int = Field(8, ge=1)
    max_instance_mb: float = Field(1024.0, gt=0)
    min_free_mb: float = Field(512.0, ge=0)
    network_timeout_s: float = Field(60.0, gt=0)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    storage_classes: list[str] = Field(default_factory=lambda: ["CTImageStorage"])
    outbox: OutboxConfig = OutboxConfig()
    jobs: JobsConfig = JobsConfig()
    run: RunConfig = RunConfig()

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("allow_ae")
    @classmethod
    def _allow(cls, value: list[str]) -> list[str]:
        return [check_ae_title(v) for v in value]

    @field_validator("send_to")
    @classmethod
    def _send_to(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parse_destination(value)
        return value.strip()

    @field_validator("storage_classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        from pydicom.uid import UID
        import pydicom.uid

        out = []
        for name in value:
            uid = getattr(pydicom.uid, name, None)
            if not isinstance(uid, UID):
                raise ValueError(f"unknown storage SOP class keyword {name!r}")
            out.append(name)
        if "CTImageStorage" not in out:
            raise ValueError("storage_classes must include CTImageStorage")
        return out

    @model_validator(mode="after")
    def _retry(self) -> "PacsConfig":
        if self.outbox.retry_max_s < self.outbox.retry_base_s:
            raise ValueError("outbox.retry_max_s must be >= outbox.retry_base_s")
        return self

    @property
    def destination(self) -> Destination | None:
        return parse_destination(self.send_to) if self.send_to else None

    def storage_uids(self) -> list[str]:
        import pydicom.uid

        return [str(getattr(pydicom.uid, n)) for n in self.storage_classes]


def load_pacs_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> PacsConfig:
    """Read ``path`` (default configs/pacs.yaml), apply non-None ``overrides`` (dotted keys allowed,
    e.g. ``run.device``), validate. Raises InputError with one line on any problem."""
    path = Path(path) if path is not None else DEFAULT_PACS_CONFIG
    data: dict[str, Any] = read_yaml(path) if (path.exists() or path != DEFAULT_PACS_CONFIG) else {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else node
        node[leaf] = value
    try:
        cfg = PacsConfig.model_validate(data)
    except Exception as exc:  # pydantic.ValidationError: first error on one line
        errors = getattr(exc, "errors", None)
        if callable(errors):
            e = errors()[0]
            where = ".".join(str(p) for p in e.get("loc", ())) or "config"
            raise InputError(f"invalid pacs config {path}: {where}: {e.get('msg')}") from None
        raise InputError(f"invalid pacs config {path}: {exc}") from None
    if cfg.spool is None:
        raise InputError("no spool folder: give --spool DIR or set spool in the pacs config")
    return cfg
