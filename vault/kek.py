"""The KEK ring: named 256-bit vault keys kept in one JSON file.

Every sealed record names the KEK that sealed it, so the ring keeps old keys after a rotation
and records can be re-wrapped at leisure. The file is written atomically with mode 0600 and
refused when group or other may read it. It comes in two forms:

- **sealed** (``zandd-kek-ring-sealed/1``, where a TPM is present): the ring's JSON encrypted
  with AES-256-GCM under a random 32-byte wrapping key that a :class:`RingSealer` (the TPM,
  ``workers.keygen.ringseal``) keeps; the KEK ids and the active id stay readable, as
  associated data, so health checks and ``zandd vault status`` need no TPM. The ring is
  opened in memory only.
- **plaintext** (``zandd-kek-ring/1``, hosts without a TPM, compose secrets): raw key
  material, chosen explicitly.

Workers keep running across a rotation: a ring read from a file re-reads it when asked for a
KEK it does not know (a record sealed after the rotation) and when told to ``refresh``
(the keygen worker does before sealing, so new keys go under the new active KEK).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from contracts.errors import ConfigurationError, IntegrityError

KEK_SIZE_BYTES = 32
RING_FORMAT = "zandd-kek-ring/1"
SEALED_RING_FORMAT = "zandd-kek-ring-sealed/1"
WRAPPING_KEY_BYTES = 32
_NONCE_BYTES = 12
_KEK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FILE_MODE = 0o600
_DIR_MODE = 0o700

RandomBytes = Callable[[int], bytes]
#: What identifies one version of the ring file: inode, modification time, size.
_Stamp = tuple[int, int, int]


class RingSealer(Protocol):
    """Keeps the ring file's wrapping key where only this host can open it (its TPM)."""

    @property
    def description(self) -> str:
        """What seals the ring, for status lines and logs (no secret)."""
        ...

    def seal(self, wrapping_key: bytes) -> dict[str, Any]:
        """A JSON-able description of ``wrapping_key`` sealed, stored in the ring file."""
        ...

    def unseal(self, sealed: Mapping[str, Any]) -> bytes:
        """The wrapping key back from what :meth:`seal` returned; ConfigurationError if not."""
        ...


@dataclass(frozen=True, slots=True)
class RingFileInfo:
    """What a ring file says without opening it: its form and its KEK ids."""

    sealed: bool
    kek_ids: tuple[str, ...]
    active: str
    #: The PCR selection a sealed ring's TPM object requires, if any.
    pcrs: str | None = None


@dataclass(frozen=True, slots=True, repr=False)
class Kek:
    """One named 256-bit key-encryption key.

    The AES-GCM cipher is built once here so a sign request does not rebuild it each time.
    """

    kek_id: str
    key: bytes
    _aead: AESGCM = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if not _KEK_ID_RE.fullmatch(self.kek_id):
            raise ValueError(f"invalid KEK id {self.kek_id!r}")
        if len(self.key) != KEK_SIZE_BYTES:
            raise ValueError(f"a KEK must be {KEK_SIZE_BYTES} bytes")
        object.__setattr__(self, "_aead", AESGCM(self.key))

    @classmethod
    def generate(cls, *, random_bytes: RandomBytes | None = None) -> Kek:
        """Make a fresh KEK; ``random_bytes`` (e.g. the TPM's RNG) is mixed into os.urandom."""
        key = os.urandom(KEK_SIZE_BYTES)
        if random_bytes is not None:
            extra = random_bytes(KEK_SIZE_BYTES)
            if len(extra) != KEK_SIZE_BYTES:
                raise ValueError(
                    f"random_bytes returned {len(extra)} bytes, expected {KEK_SIZE_BYTES}"
                )
            # XOR keeps the key uniform as long as either source is good.
            key = (int.from_bytes(key) ^ int.from_bytes(extra)).to_bytes(KEK_SIZE_BYTES)
        kek_id = f"kek-{datetime.now(UTC):%Y%m%d}-{os.urandom(4).hex()}"
        return cls(kek_id=kek_id, key=key)

    @property
    def aead(self) -> AESGCM:
        """The cached AES-256-GCM cipher for this key."""
        return self._aead

    def __repr__(self) -> str:
        return f"Kek(kek_id={self.kek_id!r}, key=<redacted>)"

    __str__ = __repr__


class KekRing:
    """The set of KEKs a process knows, one of them active (used for new seals)."""

    __slots__ = ("_created_at", "_keks", "_sealer", "_source", "active")

    def __init__(
        self,
        active: Kek,
        *,
        others: Iterable[Kek] = (),
        created_at: Mapping[str, datetime] | None = None,
    ) -> None:
        self.active = active
        self._keks: dict[str, Kek] = {k.kek_id: k for k in others}
        self._keks[active.kek_id] = active
        now = datetime.now(UTC)
        given = created_at or {}
        self._created_at = {kek_id: given.get(kek_id, now) for kek_id in self._keks}
        #: The file this ring was read from and the version of it read; None when built here
        #: or received from ``zandd up`` (which restarts its children when the file changes).
        self._source: tuple[Path, _Stamp] | None = None
        #: What opens the file when it is sealed (re-reads need it too).
        self._sealer: RingSealer | None = None

    def get(self, kek_id: str) -> Kek:
        """The KEK named ``kek_id``, re-reading the ring file once if it is not known yet.

        An id the ring file does not have either means the record cannot be opened here.
        """
        kek = self._keks.get(kek_id)
        if kek is None and self.refresh():
            kek = self._keks.get(kek_id)
        if kek is None:
            raise IntegrityError(f"record sealed with unknown KEK {kek_id!r}")
        return kek

    def refresh(self) -> bool:
        """Re-read the ring file if it changed on disk since it was read; True when it had.

        A ring that was not read from a file never changes.
        """
        if self._source is None:
            return False
        path, stamp = self._source
        try:
            current = _stamp_of(os.stat(path))
        except OSError as exc:
            raise ConfigurationError(f"cannot read KEK file {path}: {exc.strerror}") from exc
        if current == stamp:
            return False
        fresh = KekRing.load(path, sealer=self._sealer)
        self.active, self._keks = fresh.active, fresh._keks
        self._created_at, self._source = fresh._created_at, fresh._source
        return True

    @property
    def kek_ids(self) -> tuple[str, ...]:
        """Ids of every KEK in the ring, in the order they were added (oldest first)."""
        return tuple(self._keks)

    def __repr__(self) -> str:
        return f"KekRing(active={self.active.kek_id!r}, kek_ids={self.kek_ids!r})"

    __str__ = __repr__

    @classmethod
    def load(cls, path: Path, *, sealer: RingSealer | None = None) -> KekRing:
        """Read the ring from ``path``; refuses a missing, garbled or group/other-readable file.

        A sealed file needs ``sealer`` (the TPM it was sealed to) and is opened in memory.
        """
        raw, stamp = _read_private_file(path)
        document = _json_document(raw, path)
        if isinstance(document, dict) and document.get("format") == SEALED_RING_FORMAT:
            if sealer is None:
                raise ConfigurationError(
                    f"KEK file {path} is sealed to a TPM and this process has no TPM to open it "
                    "with: run it under `zandd up`, or give it a plaintext ring (`zandd vault "
                    "export-ring`)"
                )
            document = _json_document(_open_sealed(document, sealer, path), path)
        ring = _parse_ring(document, path)
        ring._source = (path, stamp)
        ring._sealer = sealer
        return ring

    @classmethod
    def from_json(cls, raw: bytes, origin: str) -> KekRing:
        """A ring from its plaintext JSON (``zandd up`` hands it to its workers through a pipe);
        ``origin`` names where it came from in errors. It is never re-read."""
        return _parse_ring(_json_document(raw, origin), origin)

    @classmethod
    def from_fd(cls, fd: int) -> KekRing:
        """Read a plaintext ring from the pipe ``fd`` to its end, then close it."""
        chunks = []
        try:
            with os.fdopen(fd, "rb", closefd=True) as pipe:
                while chunk := pipe.read(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the KEK ring from file descriptor {fd}: {exc.strerror}"
            ) from exc
        return cls.from_json(b"".join(chunks), f"the KEK ring passed on file descriptor {fd}")

    def to_json(self) -> bytes:
        """The ring as plaintext JSON: key material, for a pipe to a child or an export."""
        return self._to_json()

    @property
    def sealer(self) -> RingSealer | None:
        """What the ring's file is sealed with; None for a plaintext file or no file."""
        return self._sealer

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        random_bytes: RandomBytes | None = None,
        sealer: RingSealer | None = None,
    ) -> KekRing:
        """Make a ring with one new KEK and write it to ``path``, which must not exist yet;
        sealed with ``sealer`` when given, else in plaintext."""
        if path.exists():
            raise ConfigurationError(f"KEK file {path} already exists: refusing to overwrite it")
        ring = cls(Kek.generate(random_bytes=random_bytes))
        ring._sealer = sealer
        ring._source = (path, _write_atomically(path, ring._file_bytes(), replace=False))
        return ring

    def rotate(self, path: Path, *, random_bytes: RandomBytes | None = None) -> KekRing:
        """Add a new active KEK (old ones stay for opening old records) and rewrite ``path``,
        in the form it has (sealed again with this ring's sealer, or plaintext).

        The file is re-read under a lock first, so two rotations at once both keep their KEK.
        """
        with _directory_lock(path.parent):
            keks = dict(self._keks)
            created_at = dict(self._created_at)
            if path.exists():
                on_disk = KekRing.load(path, sealer=self._sealer)
                _merge(keks, on_disk._keks, path)
                created_at.update(on_disk._created_at)
            new = Kek.generate(random_bytes=random_bytes)
            while new.kek_id in keks:  # same day and a 32-bit id collision: draw again
                new = Kek.generate(random_bytes=random_bytes)
            created_at[new.kek_id] = datetime.now(UTC)
            ring = KekRing(new, others=keks.values(), created_at=created_at)
            ring._sealer = self._sealer
            ring._source = (path, _write_atomically(path, ring._file_bytes(), replace=True))
        return ring

    def rewrite(self, path: Path, *, sealer: RingSealer | None) -> KekRing:
        """Write this ring to ``path`` again, sealed with ``sealer`` or (None) in plaintext:
        ``zandd vault seal-ring`` and ``export-ring``. Refuses when the file has changed
        since it was read (a rotation meanwhile would be lost)."""
        with _directory_lock(path.parent):
            if self._source is None or self._source[0] != path:
                raise ConfigurationError(f"the ring to rewrite was not read from {path}")
            if ring_file_stamp(path) != self._source[1]:
                raise ConfigurationError(f"KEK file {path} changed while rewriting it: run again")
            ring = KekRing(self.active, others=self._keks.values(), created_at=self._created_at)
            ring._sealer = sealer
            ring._source = (path, _write_atomically(path, ring._file_bytes(), replace=True))
        return ring

    def _file_bytes(self) -> bytes:
        plaintext = self._to_json()
        if self._sealer is None:
            return plaintext
        wrapping_key = os.urandom(WRAPPING_KEY_BYTES)
        header = {
            "format": SEALED_RING_FORMAT,
            "active": self.active.kek_id,
            "kek_ids": list(self.kek_ids),
            "sealed_key": self._sealer.seal(wrapping_key),
        }
        nonce = os.urandom(_NONCE_BYTES)
        ciphertext = AESGCM(wrapping_key).encrypt(nonce, plaintext, _header_aad(header))
        document = {
            **header,
            "nonce": base64.b64encode(nonce).decode("ascii"),
            "ciphertext": base64.b64encode(ciphertext).decode("ascii"),
        }
        return json.dumps(document, indent=2).encode("utf-8") + b"\n"

    def _to_json(self) -> bytes:
        keys = {
            kek_id: {
                "key": base64.b64encode(self._keks[kek_id].key).decode("ascii"),
                "created_at": self._created_at[kek_id].isoformat(timespec="seconds"),
            }
            for kek_id in self.kek_ids
        }
        document = {"format": RING_FORMAT, "active": self.active.kek_id, "keys": keys}
        return json.dumps(document, indent=2).encode("utf-8") + b"\n"


def ring_file_info(path: Path) -> RingFileInfo:
    """What the ring file at ``path`` says without opening it (a sealed ring needs no TPM)."""
    raw, _ = _read_private_file(path)
    document = _json_document(raw, path)
    if isinstance(document, dict) and document.get("format") == SEALED_RING_FORMAT:
        header = _sealed_header(document, path)
        sealed_key = header["sealed_key"]
        pcrs = sealed_key.get("pcrs") if isinstance(sealed_key, dict) else None
        return RingFileInfo(
            sealed=True,
            kek_ids=tuple(header["kek_ids"]),
            active=str(header["active"]),
            pcrs=pcrs if isinstance(pcrs, str) else None,
        )
    ring = _parse_ring(document, path)
    return RingFileInfo(sealed=False, kek_ids=ring.kek_ids, active=ring.active.kek_id)


def ring_file_kek_ids(path: Path) -> tuple[str, ...] | None:
    """The KEK ids of the ring file at ``path`` (None when there is no file), for checks that
    need no key: ``zandd health`` compares them with the vault."""
    if not path.exists():
        return None
    return ring_file_info(path).kek_ids


def ring_file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the ring file is rewritten (None when it is missing)."""
    try:
        return _stamp_of(os.stat(path))
    except FileNotFoundError:
        return None


def _json_document(raw: bytes, origin: Path | str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigurationError(f"KEK file {origin} is not valid JSON") from exc


def _header_aad(header: Mapping[str, Any]) -> bytes:
    # The readable header is authenticated: its KEK ids cannot be edited to fool a health check
    # without the ring then failing to open.
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _sealed_header(document: dict[str, Any], path: Path) -> dict[str, Any]:
    header = {k: document.get(k) for k in ("format", "active", "kek_ids", "sealed_key")}
    kek_ids = header["kek_ids"]
    if (
        not isinstance(kek_ids, list)
        or not kek_ids
        or not all(isinstance(k, str) for k in kek_ids)
        or header["active"] not in kek_ids
        or not isinstance(header["sealed_key"], dict)
    ):
        raise ConfigurationError(f"KEK file {path} is not a valid {SEALED_RING_FORMAT} file")
    return header


def _open_sealed(document: dict[str, Any], sealer: RingSealer, path: Path) -> bytes:
    header = _sealed_header(document, path)
    try:
        nonce = base64.b64decode(document["nonce"], validate=True)
        ciphertext = base64.b64decode(document["ciphertext"], validate=True)
    except (KeyError, TypeError, binascii.Error) as exc:
        raise ConfigurationError(
            f"KEK file {path} is not a valid {SEALED_RING_FORMAT} file"
        ) from exc
    wrapping_key = sealer.unseal(header["sealed_key"])
    if len(wrapping_key) != WRAPPING_KEY_BYTES:
        raise ConfigurationError(f"KEK file {path}: the TPM returned a wrapping key of bad size")
    try:
        plaintext = AESGCM(wrapping_key).decrypt(nonce, ciphertext, _header_aad(header))
    except (InvalidTag, ValueError) as exc:
        raise IntegrityError(
            f"KEK file {path} does not open with its sealed key: it was altered"
        ) from exc
    opened = _parse_ring(_json_document(plaintext, path), path)
    if opened.kek_ids != tuple(header["kek_ids"]) or opened.active.kek_id != header["active"]:
        raise IntegrityError(f"KEK file {path}: its readable KEK ids contradict the sealed ring")
    return plaintext


def _merge(keks: dict[str, Kek], more: Mapping[str, Kek], path: Path) -> None:
    for kek_id, kek in more.items():
        if keks.setdefault(kek_id, kek).key != kek.key:
            raise ConfigurationError(
                f"KEK file {path} has a KEK {kek_id!r} that differs from the one in memory"
            )


@contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    # A lock on the directory, not the file: the file is replaced (a new inode) on each write.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigurationError(f"cannot lock {directory}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _stamp_of(status: os.stat_result) -> _Stamp:
    return (status.st_ino, status.st_mtime_ns, status.st_size)


def _read_private_file(path: Path) -> tuple[bytes, _Stamp]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigurationError(
            f"KEK file {path} does not exist: run `zandd vault init`"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read KEK file {path}: {exc.strerror}") from exc
    # fstat on the open descriptor: the mode checked is the mode of the file read.
    with os.fdopen(fd, "rb") as file:
        status = os.fstat(file.fileno())
        mode = stat.S_IMODE(status.st_mode)
        if mode & 0o077:
            raise ConfigurationError(
                f"KEK file {path} is accessible by group/other (mode {mode:04o}): "
                f"run `chmod 600 {path}`"
            )
        try:
            return file.read(), _stamp_of(status)
        except OSError as exc:
            raise ConfigurationError(f"cannot read KEK file {path}: {exc.strerror}") from exc


def _parse_ring(document: Any, path: Path | str) -> KekRing:
    def garbled(reason: str) -> ConfigurationError:
        return ConfigurationError(f"KEK file {path} is not a valid {RING_FORMAT} file: {reason}")

    if not isinstance(document, dict) or document.get("format") != RING_FORMAT:
        raise garbled("missing or unknown format")
    entries = document.get("keys")
    if not isinstance(entries, dict) or not entries:
        raise garbled("no keys")
    keks: dict[str, Kek] = {}
    created_at: dict[str, datetime] = {}
    for kek_id, entry in entries.items():
        keks[kek_id], created_at[kek_id] = _parse_entry(kek_id, entry, garbled)
    active_id = document.get("active")
    if not isinstance(active_id, str) or active_id not in keks:
        raise garbled("the active KEK is not in the ring")
    return KekRing(keks[active_id], others=keks.values(), created_at=created_at)


def _parse_entry(
    kek_id: str, entry: Any, garbled: Callable[[str], ConfigurationError]
) -> tuple[Kek, datetime]:
    if not isinstance(entry, dict):
        raise garbled(f"entry {kek_id!r} is not an object")
    try:
        key = base64.b64decode(entry["key"], validate=True)
        created_at = datetime.fromisoformat(entry["created_at"])
        kek = Kek(kek_id=kek_id, key=key)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        # The message names the entry, never its content: the content is key material.
        raise garbled(f"entry {kek_id!r} is malformed") from exc
    if created_at.tzinfo is None:
        raise garbled(f"entry {kek_id!r} has a created_at without a time zone")
    return kek, created_at


def _write_atomically(path: Path, data: bytes, *, replace: bool) -> _Stamp:
    """Write ``data`` to ``path`` via a 0600 temp file, fsync, rename and fsync the directory.

    Returns the stamp of the file written.
    """
    directory = path.parent
    try:
        if not directory.exists():
            directory.mkdir(mode=_DIR_MODE, parents=True)
        tmp = directory / f".{path.name}.{os.urandom(4).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
    except OSError as exc:
        raise ConfigurationError(f"cannot write KEK file {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
            stamp = _stamp_of(os.fstat(file.fileno()))
        _publish(tmp, path, replace=replace)
        _fsync_directory(directory)
    except FileExistsError:
        raise ConfigurationError(
            f"KEK file {path} already exists: refusing to overwrite it"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"cannot write KEK file {path}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return stamp


def _publish(tmp: Path, path: Path, *, replace: bool) -> None:
    if replace:
        os.replace(tmp, path)
    else:
        # link() fails if path exists, so a concurrent creator cannot be overwritten.
        os.link(tmp, path)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
