"""Authenticated key records: an HMAC-SHA256 over every field of a key version.

A vault writer without the KEK ring can change any column, so the fields that decide who may
do what with a key (owner, allowed signers, state, ``destroy_after``, the public key, the
sealed material, ...) are covered by a MAC under a key derived from a KEK with HKDF-SHA256 and
a label of its own, so the MAC key is never the AES key itself. The record names the KEK its
MAC key came from (the active one when it was written): after a KEK rotation old records stay
verifiable, and ``zandd vault rewrap`` recomputes their MACs under the new active KEK.

``generation`` grows by one with every change of a version (``replace_key`` enforces it), so
an older copy of a row — validly MACed once — can be told from the current one by whoever
has seen a newer generation (signers hear it in ``key.state_changed`` events).
"""

from __future__ import annotations

import dataclasses
import hmac
import struct
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import lru_cache
from hashlib import sha256

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from contracts.errors import IntegrityError
from vault.kek import Kek, KekRing
from vault.records import KeyRecord, RecordMac

MAC_KEY_INFO = b"zandd-record-mac/1"
_DOMAIN_TAG = b"zandd-record/1"
_MAC_KEY_BYTES = 32
_ATTESTATION_TAG = b"attestation"
_TPM_BLOB_TAG = b"tpm-blob"
_ROTATION_PERIOD_TAG = b"rotation-period"
_NEXT_ROTATION_TAG = b"next-rotation"
_ABSENT = b"\x00"
_PRESENT = b"\x01"


def _field(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _text(value: str) -> bytes:
    return _field(value.encode("utf-8"))


def _number(value: int) -> bytes:
    if not 0 <= value < 2**63:
        raise ValueError("record numbers must be in [0, 2**63)")
    return _field(struct.pack(">Q", value))


def _optional(value: bytes | None) -> bytes:
    # A marker byte first: an absent value never encodes like an empty one.
    return _field(_ABSENT) if value is None else _field(_PRESENT + value)


def _moment(value: datetime | None) -> bytes | None:
    # Microseconds in UTC: what both stores keep exactly, so a record read back encodes as
    # it was written.
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="microseconds").encode("ascii")


def _list(values: Iterable[str]) -> bytes:
    items = [_text(value) for value in values]
    return _number(len(items)) + b"".join(items)


def record_fields(record: KeyRecord, mac_kek_id: str) -> bytes:
    """The canonical, length-prefixed encoding of every field of ``record`` that is MACed.

    Everything but the MAC itself: identity, generation, algorithm, public key, sealed
    material (KEK id, nonce, ciphertext), state, label, allowed signers (in order), creation
    time and principal, request id, ``destroy_after``, the KEK the MAC key comes from, the TPM
    attestation and the TPM-bound key, the rotation period and the next rotation time (each
    of the last four tagged and appended only when present).
    """
    sealed = record.sealed
    return b"".join(
        (
            _field(_DOMAIN_TAG),
            _text(record.key_id),
            _number(record.version),
            _number(record.generation),
            _text(record.algorithm),
            _field(record.public_key_der),
            _optional(None if sealed is None else sealed.kek_id.encode("utf-8")),
            _optional(None if sealed is None else sealed.nonce),
            _optional(None if sealed is None else sealed.ciphertext),
            _text(record.state.value),
            _optional(None if record.label is None else record.label.encode("utf-8")),
            _list(record.allowed_signers),
            _optional(_moment(record.created_at)),
            _text(record.created_by),
            _optional(None if record.request_id is None else record.request_id.encode("utf-8")),
            _optional(_moment(record.destroy_after)),
            _text(mac_kek_id),
            _tagged(_ATTESTATION_TAG, record.attestation),
            _tagged(_TPM_BLOB_TAG, record.tpm_blob),
            _tagged(_ROTATION_PERIOD_TAG, _optional_number(record.rotation_period_s)),
            _tagged(_NEXT_ROTATION_TAG, _moment(record.next_rotation_at)),
        )
    )


def _optional_number(value: int | None) -> bytes | None:
    return None if value is None else _number(value)


def _tagged(tag: bytes, value: bytes | None) -> bytes:
    # Appended only when present, after a tag of their own: records made before these fields
    # keep the MAC they have, and since every field is length-prefixed and tagged, no record
    # with them encodes like one without them, or like one with the other.
    return b"" if value is None else _field(tag) + _field(value)


@lru_cache(maxsize=64)
def _mac_key(kek: Kek) -> bytes:
    # Cached per KEK: HKDF costs more than the HMAC it keys.
    return HKDF(
        algorithm=hashes.SHA256(), length=_MAC_KEY_BYTES, salt=None, info=MAC_KEY_INFO
    ).derive(kek.key)


def compute_mac(record: KeyRecord, kek: Kek) -> bytes:
    """The HMAC-SHA256 tag of ``record`` (its stored MAC aside) under ``kek``'s MAC key."""
    return hmac.new(_mac_key(kek), record_fields(record, kek.kek_id), sha256).digest()


def authenticated(record: KeyRecord, ring: KekRing, *, generation: int) -> KeyRecord:
    """``record`` at ``generation``, MACed under the ring's active KEK."""
    kek = ring.active
    updated = dataclasses.replace(record, generation=generation)
    return dataclasses.replace(updated, mac=RecordMac(kek.kek_id, compute_mac(updated, kek)))


def verify_record(record: KeyRecord, ring: KekRing) -> KeyRecord:
    """Return ``record`` if its MAC holds; else IntegrityError (also for a record without one).

    A record without a MAC comes from a vault not yet upgraded (``zandd vault mac-records``)
    or was written by someone without the ring: either way nothing vouches for its fields.
    """
    name = f"key {record.key_id} v{record.version}"
    if record.mac is None:
        raise IntegrityError(f"{name} has no record MAC: nothing vouches for its metadata")
    kek = ring.get(record.mac.kek_id)
    if not hmac.compare_digest(compute_mac(record, kek), record.mac.tag):
        raise IntegrityError(f"{name} failed its record MAC: its metadata was changed")
    return record


class GenerationWatermark:
    """The highest generation this process has seen of each key version.

    A record older than that is an older copy of the row (restored from a backup, rolled
    back): its MAC is valid, since it was once current, but it is no longer the truth. What
    a process never saw it cannot know: a fresh process accepts the newest copy it is shown.
    """

    __slots__ = ("_highest",)

    def __init__(self) -> None:
        self._highest: dict[tuple[str, int], int] = {}

    def saw(self, key_id: str, version: int, generation: int) -> None:
        """Note that ``generation`` of the version exists (a load, a write, an event)."""
        if generation > self._highest.get((key_id, version), 0):
            self._highest[key_id, version] = generation

    def check(self, record: KeyRecord) -> KeyRecord:
        """Return ``record`` (noting its generation) unless a newer one was seen."""
        highest = self._highest.get((record.key_id, record.version), 0)
        if record.generation < highest:
            raise IntegrityError(
                f"key {record.key_id} v{record.version} is generation {record.generation}, "
                f"but generation {highest} was seen: an older copy of the record"
            )
        if record.generation > highest:
            self._highest[record.key_id, record.version] = record.generation
        return record
