"""Worker configuration: ``ZANDD_*`` environment variables, each also a CLI flag."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.amqp import DEFAULT_AMQP_URL
from contracts.limits import (
    DEFAULT_MAX_BATCH_ITEMS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    Limits,
)

DEFAULT_SWTPM_PORT = 2321


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
    signer_concurrency: int = Field(default=64, ge=1, le=10_000)
    keygen_concurrency: int = Field(default=4, ge=1, le=256)
    drain_timeout_s: float = Field(default=10.0, gt=0)
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1)
    max_batch_items: int = Field(default=DEFAULT_MAX_BATCH_ITEMS, ge=1)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024)
    log_level: str = "INFO"

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
        """Where ``zandd up`` keeps the state of the swtpm it starts."""
        return self.data_dir / "swtpm"

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
