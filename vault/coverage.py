"""Does a KEK ring open every record of a vault? Asked before anything starts, and kept asking.

The vault's records name the KEK that sealed them, so a ring that lacks one of those ids is
the wrong ring (a wrong ``ZANDD_KEK_FILE``, a data dir without its ring, a ring restored from
before a rotation). Nothing may start on it, and nothing may create a fresh ring over a vault
that has records, unless the operator says so explicitly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from contracts.errors import ConfigurationError
from contracts.urls import redact_url

#: The flag of ``zandd up`` and ``zandd vault init`` that accepts unreadable records.
ALLOW_UNREADABLE_FLAG = "--allow-unreadable"


@dataclass(frozen=True, slots=True)
class RingCoverage:
    """Which KEK ids the vault uses that the ring lacks, and how many versions each seals."""

    missing: Mapping[str, int]

    @property
    def unreadable(self) -> int:
        """Key versions that the ring cannot open."""
        return sum(self.missing.values())

    @property
    def complete(self) -> bool:
        """True when the ring opens every sealed version of the vault."""
        return not self.missing

    def describe_missing(self) -> str:
        """``2 key versions sealed with KEK ids kek-a, kek-b`` (ids sorted)."""
        versions = "version" if self.unreadable == 1 else "versions"
        ids = "id" if len(self.missing) == 1 else "ids"
        return f"{self.unreadable} key {versions} sealed with KEK {ids} " + ", ".join(
            sorted(self.missing)
        )


def coverage_of(usage: Mapping[str, int], kek_ids: Iterable[str]) -> RingCoverage:
    """The coverage of a vault whose ``kek_usage()`` is ``usage`` by a ring with ``kek_ids``."""
    known = set(kek_ids)
    return RingCoverage({k: n for k, n in usage.items() if k not in known})


def unreadable_error(coverage: RingCoverage, ring_path: Path, vault_url: str) -> ConfigurationError:
    """The one sentence that refuses to start on a ring that does not open the vault."""
    return ConfigurationError(
        f"the KEK ring {ring_path} lacks what the vault at {redact_url(vault_url)} needs: "
        f"{coverage.describe_missing()} cannot be opened; point ZANDD_KEK_FILE at the ring "
        "that sealed them"
    )


def no_ring_error(coverage: RingCoverage, ring_path: Path, vault_url: str) -> ConfigurationError:
    """The one sentence that refuses to create a ring over a vault that has records."""
    return ConfigurationError(
        f"the KEK ring {ring_path} does not exist but the vault at {redact_url(vault_url)} holds "
        f"{coverage.describe_missing()}, which a new ring would not open; point ZANDD_KEK_FILE "
        f"at the ring that sealed them (or pass {ALLOW_UNREADABLE_FLAG} to create a new ring "
        "and leave them unreadable)"
    )
