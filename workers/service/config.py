"""Worker configuration: ``ZANDD_*`` environment variables, each also a CLI flag."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from contracts.amqp import DEFAULT_AMQP_URL
from contracts.limits import (
    DEFAULT_MAX_BATCH_ITEMS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    Limits,
)
from contracts.models import Principal
from contracts.topology import MAX_SIGN_SHARDS
from contracts.urls import redact_url

DEFAULT_SWTPM_PORT = 2321
#: ``ZANDD_QUOTA_OVERRIDES`` value that exempts a principal from every quota.
UNLIMITED = "unlimited"
RequestRate = Annotated[float, Field(gt=0, le=1_000_000)]
SignatureRate = Annotated[float, Field(gt=0, le=100_000_000)]


class QuotaOverride(BaseModel):
    """One principal's quotas in ``ZANDD_QUOTA_OVERRIDES``: a field left out keeps the
    default, ``null`` lifts that limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_s: RequestRate | None = None
    signatures_per_s: SignatureRate | None = None


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "zandd"


class Settings(BaseSettings):
    """Everything a worker, ``zandd up`` or the CLI needs to know about its surroundings."""

    model_config = SettingsConfigDict(env_prefix="ZANDD_", extra="ignore")

    amqp_url: str = DEFAULT_AMQP_URL
    data_dir: Path = Field(default_factory=_default_data_dir)
    vault_url: str | None = None
    kek_file: Path | None = None
    tpm_tcti: str | None = None
    swtpm_port: int = DEFAULT_SWTPM_PORT
    #: The state directory of the swtpm ``zandd up`` starts; default ``<data dir>-swtpm``.
    swtpm_state_dir: Path | None = None
    signer_concurrency: int = Field(default=64, ge=1, le=10_000)
    keygen_concurrency: int = Field(default=4, ge=1, le=256)
    drain_timeout_s: float = Field(default=10.0, gt=0)
    #: Longest wait between two reconnect (or dependency probe) attempts; jittered below it.
    max_backoff_s: float = Field(default=30.0, gt=0)
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1)
    max_batch_items: int = Field(default=DEFAULT_MAX_BATCH_ITEMS, ge=1)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    #: Port of this process's Prometheus endpoint; None (the default) serves none.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    traces_exporter: Literal["none", "console", "otlp"] = "none"
    #: False for workers with least-privilege broker users: the topology is then only looked
    #: up (passive declares), as ops/rabbitmq/definitions.json or an admin declared it.
    declare_topology: bool = True
    #: Sign requests spread over this many quorum queues (``zandd.sign.0`` …) behind a
    #: consistent-hash exchange, so their leaders (and the load) sit on several nodes; 1 (the
    #: default) is the one queue ``zandd.sign``. Needs the broker plugin
    #: rabbitmq_consistent_hash_exchange when > 1. docs/operations.md, "Sign shards".
    sign_shards: int = Field(default=1, ge=1, le=MAX_SIGN_SHARDS)
    #: The connection requests travel on: the lean one (``contracts/wire.py``) or aiormq's
    #: (``contracts/transport_aiormq.py``, for comparison: ``zandd bench`` measures both).
    transport: Literal["lean", "aiormq"] = "lean"
    # Access and key lifecycle (the rules are in workers/service/policy.py). Name lists are
    # comma-separated (or a JSON list) in the environment.
    #: Accept requests without ``user_id`` as principal ``anonymous``: closed test networks only.
    allow_anonymous: bool = False
    #: AMQP users who may create keys; ``*`` is anyone authenticated.
    key_creators: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    #: AMQP users who may change the state of any key (each key's owner may change its own).
    admins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: How often the keygen worker destroys versions whose waiting period is over.
    destroy_check_interval_s: float = Field(default=60.0, gt=0)
    #: A worker publishes its newest audit head after this many entries, or this often.
    audit_head_every_entries: int = Field(default=1000, ge=1)
    audit_head_interval_s: float = Field(default=10.0, gt=0)
    #: The keygen worker has the TPM sign the audit head after this many entries, or this
    #: often (when the log grew); each costs one TPM signature (~10 ms on swtpm).
    audit_checkpoint_every_entries: int = Field(default=1000, ge=1)
    audit_checkpoint_interval_s: float = Field(default=60.0, gt=0)
    #: Workers lock their memory (mlockall) when the process is permitted to.
    lock_memory: bool = True
    # Per-principal quotas, fleet-wide (workers/service/quotas.py); None (the default) is no limit.
    quota_requests_per_s: RequestRate | None = None
    quota_signatures_per_s: SignatureRate | None = None
    #: JSON: principal -> {"requests_per_s": ..., "signatures_per_s": ...} or "unlimited".
    quota_overrides: Annotated[dict[Principal, QuotaOverride | Literal["unlimited"]], NoDecode] = (
        Field(default_factory=dict)
    )
    #: Start even when the vault holds key versions the KEK ring cannot open (they stay
    #: unreadable; health fails and ZanddVaultRecordsUnreadable fires). ``--allow-unreadable``.
    allow_unreadable: bool = False
    #: Set by ``zandd up`` for its children: the pipe from which they read the KEK ring it
    #: opened (the ring itself never is in the environment).
    kek_fd: int | None = Field(default=None, ge=0)
    #: The PCR selection (e.g. ``sha256:0,2,4,7``) a newly sealed KEK ring must match to open;
    #: None (the default) seals without a PCR policy.
    kek_ring_pcrs: str | None = None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("key_creators", "admins", mode="before")
    @classmethod
    def _name_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [name.strip() for name in text.split(",") if name.strip()]
        return value

    @field_validator("quota_overrides", mode="before")
    @classmethod
    def _json_object(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(
                    "must be a JSON object such as "
                    '{"alice": {"requests_per_s": 100, "signatures_per_s": 5000}, '
                    f'"ops": "{UNLIMITED}"}} ({exc.msg} at character {exc.pos})'
                ) from None
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # URLs carry passwords: a repr (a traceback, a debug line) shows them redacted.
        for name, value in super().__repr_args__():
            if name in ("amqp_url", "vault_url") and isinstance(value, str):
                yield name, redact_url(value)
            else:
                yield name, value

    @property
    def resolved_vault_url(self) -> str:
        """The vault URL, defaulting to an SQLite file in the data dir."""
        return self.vault_url or f"sqlite:///{self.data_dir.absolute() / 'vault.db'}"

    @property
    def resolved_kek_file(self) -> Path:
        """The KEK ring file, defaulting to one in the data dir."""
        return self.kek_file or self.data_dir / "kek-ring.json"

    @property
    def swtpm_dir(self) -> Path:
        """Where ``zandd up`` keeps the state of the swtpm it starts: beside the data dir,
        not in it (``<data dir>-swtpm``), so that a copy of the data dir does not carry the
        TPM its KEK ring is sealed to."""
        if self.swtpm_state_dir is not None:
            return self.swtpm_state_dir
        data = self.data_dir.absolute()
        return data.with_name(f"{data.name}-swtpm")

    @property
    def local_swtpm_tcti(self) -> str:
        """The TCTI of the swtpm ``zandd up`` runs when the host has no TPM device."""
        return f"swtpm:host=127.0.0.1,port={self.swtpm_port}"

    @property
    def limits(self) -> Limits:
        """The request size limits in force."""
        return Limits(
            max_message_bytes=self.max_message_bytes,
            max_batch_items=self.max_batch_items,
            max_body_bytes=self.max_body_bytes,
        )
