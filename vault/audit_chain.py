"""The audit chain's key: each link an HMAC-SHA256 under a key derived from the KEK ring.

An unkeyed SHA-256 chain only shows edits to someone who kept a head elsewhere: a vault writer
can recompute every hash after the entries it changed. With a key nobody can link an entry
without the ring, so a writer who has the vault but not the ring can neither edit, re-chain nor
forge an entry (it can still cut the newest ones: that is what published heads are for).

The key is HKDF-SHA256 of the KEK active at write time, with its own ``info`` label, so it is
never the KEK itself nor the key of any other use of it. The link names that KEK —
``hmac-sha256/<kek_id>/<64 hex digits>`` — so entries written before a rotation stay checkable
with the KEK that keyed them; an unkeyed (legacy) link is 64 hex digits. The link lives where
the hash always did (the entry's hash field), so the stores keep their schema.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vault.kek import Kek, KekRing

#: HKDF ``info`` of the audit key; a new derivation gets a new label, never reuses this one.
AUDIT_KEY_INFO = b"zandd-audit-chain/1"
AUDIT_KEY_BYTES = 32
KEYED_LINK_SCHEME = "hmac-sha256"
_LEGACY_LINK = re.compile(r"[0-9a-f]{64}")
_KEYED_LINK = re.compile(rf"{KEYED_LINK_SCHEME}/([A-Za-z0-9][A-Za-z0-9._-]{{0,63}})/[0-9a-f]{{64}}")


@dataclass(frozen=True, slots=True, repr=False)
class ChainKey:
    """The audit key derived from one KEK, and that KEK's id (which every link it makes names)."""

    kek_id: str
    key: bytes

    def link(self, data: bytes) -> str:
        """The keyed link of an entry's canonical bytes."""
        digest = hmac.new(self.key, data, hashlib.sha256).hexdigest()
        return f"{KEYED_LINK_SCHEME}/{self.kek_id}/{digest}"

    def __repr__(self) -> str:
        return f"ChainKey(kek_id={self.kek_id!r}, key=<redacted>)"

    __str__ = __repr__


def derive_chain_key(kek: Kek) -> ChainKey:
    """HKDF-SHA256 of ``kek`` under the audit chain's own label."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=AUDIT_KEY_BYTES, salt=None, info=AUDIT_KEY_INFO)
    return ChainKey(kek.kek_id, hkdf.derive(kek.key))


def link_kek_id(link: str) -> str | None:
    """The KEK id a keyed link names; None for a legacy (unkeyed) link; ValueError otherwise."""
    if _LEGACY_LINK.fullmatch(link):
        return None
    keyed = _KEYED_LINK.fullmatch(link)
    if keyed is None:
        raise ValueError("neither a keyed nor a legacy audit link")
    return keyed.group(1)


class ChainKeyLookup(Protocol):
    """Where a verifier finds the audit key a link names."""

    def get(self, kek_id: str) -> ChainKey:
        """The audit key derived from KEK ``kek_id``; KeyError when it is not known."""
        ...


class ChainKeys:
    """The audit keys of a KEK ring: the active one for writing, any one for checking."""

    def __init__(self, ring: KekRing) -> None:
        self._ring = ring
        self._derived: dict[str, tuple[Kek, ChainKey]] = {}

    def active(self) -> ChainKey:
        """The key new entries are linked with: derived from the ring's active KEK."""
        return self._derive(self._ring.active)

    def get(self, kek_id: str) -> ChainKey:
        """The audit key derived from KEK ``kek_id``; KeyError when the ring does not hold it."""
        if kek_id not in self._ring.kek_ids:
            self._ring.refresh()
        if kek_id not in self._ring.kek_ids:
            raise KeyError(kek_id)
        return self._derive(self._ring.get(kek_id))

    def _derive(self, kek: Kek) -> ChainKey:
        cached = self._derived.get(kek.kek_id)
        if cached is None or cached[0] is not kek:
            cached = (kek, derive_chain_key(kek))
            self._derived[kek.kek_id] = cached
        return cached[1]
