"""TPM 2.0 access for the keygen worker, through tpm2-pytss (ESAPI), synchronous.

The TPM generates each key (``TPM2_Create`` under a storage primary, the private value never
chosen outside the TPM) and hands the private part out once with ``TPM2_Duplicate`` to the
NULL parent: for ECDSA (P-256, P-384) the private scalar, for RSA (2048, 3072; e = 65537) the
prime ``p`` its ``TPMT_SENSITIVE`` holds, from which the private key is rebuilt with the
public modulus (``rsa_private_key``). The key's only policy is ``PolicyCommandCode(Duplicate)``. After export the key
is no longer bound to the TPM: the TPM contributes its RNG and key generation, the vault
encryption protects the key at rest.

The duplicate crosses the TPM interface (bus, ``/dev/tpmrm0``, or the swtpm socket) under an
inner wrapper (TPM 2.0 part 1, 23.3.2.3): AES-128-CFB with a one-use key this process draws
from the OS RNG, and an integrity digest over the sensitive area and the key's name. That key
reaches the TPM as ``encryptionKeyIn``, the first parameter of ``TPM2_Duplicate``, encrypted
by the policy session (``decrypt`` attribute), which is salted to the storage primary: its
session key derives from a salt only this process and the TPM know. A passive sniffer of the
interface sees only ciphertext. The salt is encrypted to the public key ESAPI read from the
``TPM2_CreatePrimary`` response, so an active interposer that answers in the TPM's place is
not stopped.

Wiping: the scalar is copied into a ``bytearray`` that :meth:`ExportedKey.wipe` zeroes; the
deciphered duplicate lives in a ``bytearray`` zeroed after the copy, and the C buffers
tpm2-pytss hands over (the inner key, the duplicate) are zeroed here. Python cannot wipe the
``bytes`` the OS RNG returns for the inner key (it opens only this one duplicate), the
``int`` passed to ``cryptography``, nor the inner key ESAPI keeps among the saved inputs of
its last ``TPM2_Duplicate``, which the next export overwrites. OpenSSL clears its own copies of the
private value and of the AES key when the objects are freed.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import logging
import os
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_CC,
    TPM2_HT,
    TPM2_PT,
    TPM2_PT_FIRMWARE,
    TPM2_PT_VENDOR,
    TPM2_SE,
    TPM2B_DATA,
    TPM2B_PUBLIC,
    TPMA_OBJECT,
    TPMA_SESSION,
    TPMT_PUBLIC_PARMS,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TSS2_Exception,
)

from contracts.algorithms import (
    ALGORITHM_ECDSA_P256_SHA256,
    ALGORITHMS,
    RSA_PUBLIC_EXPONENT,
    AlgorithmSpec,
    PublicKey,
    algorithm_spec,
)
from contracts.errors import IntegrityError, TpmUnavailable
from vault.opening import rsa_private_key
from vault.sealing import wipe

logger = logging.getLogger(__name__)

P256_BYTES = 32
T = TypeVar("T")
#: Called with (ESAPI context, loaded key handle, its TPM2B_PUBLIC) while a new key is loaded.
LoadedHook = Callable[[Any, Any, TPM2B_PUBLIC], None]

# Policy digest of TPM2_PolicyCommandCode(TPM2_CC_Duplicate) from a fresh SHA-256 session:
# SHA256(zeros32 || TPM_CC_PolicyCommandCode || TPM_CC_Duplicate).
DUPLICATE_ONLY_POLICY = hashlib.sha256(
    bytes(32) + struct.pack(">II", TPM2_CC.PolicyCommandCode, TPM2_CC.Duplicate)
).digest()

# The inner wrapper of the duplicate and the parameter encryption of the session carrying its
# key: the storage primary's symmetric algorithm, which every TPM 2.0 implements.
_AES128_CFB = "aes128cfb"
_INNER_KEY_BYTES = 16
_AES_BLOCK_BYTES = 16

# TPM2_GetRandom returns at most the size of the TPM's largest digest per call.
_RANDOM_CHUNK_BYTES = 64

_STORAGE_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA
)
# No fixedTPM/fixedParent: the key must be duplicable.
_EXPORTABLE_KEY_ATTRIBUTES = (
    TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
)


@dataclass(frozen=True)
class TpmInfo:
    """What the TPM says about itself (TPM2_GetCapability, fixed properties)."""

    manufacturer: str
    vendor: str
    firmware_version: str
    spec: str


class ExportedKey:
    """A private value exported from the TPM plus its public part. Caller must wipe().

    ``private_scalar`` is what gets sealed: the EC scalar (``public_x``/``public_y`` the
    point), or for RSA the prime ``p`` (``modulus`` the public ``n``, e = 65537). Use it as a
    context manager to wipe on exit. Its repr never shows the private value.
    """

    __slots__ = ("algorithm", "modulus", "private_scalar", "public_x", "public_y")

    def __init__(
        self,
        private_scalar: bytearray,
        public_x: bytes = b"",
        public_y: bytes = b"",
        *,
        algorithm: str = ALGORITHM_ECDSA_P256_SHA256,
        modulus: bytes = b"",
    ) -> None:
        spec = algorithm_spec(algorithm)
        if spec.family == "ecdsa":
            size = spec.coordinate_bytes
            if not len(private_scalar) == len(public_x) == len(public_y) == size:
                raise ValueError(
                    f"a {spec.name} key needs a {size}-byte scalar and {size}-byte coordinates"
                )
        elif len(modulus) != spec.rsa_bits // 8 or len(private_scalar) != spec.rsa_bits // 16:
            raise ValueError(f"a {spec.name} key needs its modulus and a prime of half its size")
        self.algorithm = spec
        self.private_scalar = private_scalar
        self.public_x = public_x
        self.public_y = public_y
        self.modulus = modulus

    def public_key(self) -> PublicKey:
        """The public key, from the point or modulus the TPM reported."""
        if self.algorithm.family == "rsa":
            return rsa.RSAPublicNumbers(
                RSA_PUBLIC_EXPONENT, int.from_bytes(self.modulus, "big")
            ).public_key()
        return ec.EllipticCurvePublicNumbers(
            int.from_bytes(self.public_x, "big"),
            int.from_bytes(self.public_y, "big"),
            self.algorithm.curve(),
        ).public_key()

    def wipe(self) -> None:
        """Zero the scalar in place."""
        wipe(self.private_scalar)

    def __repr__(self) -> str:
        public = self.modulus[:8] if self.algorithm.family == "rsa" else self.public_x
        return (
            f"ExportedKey(algorithm={self.algorithm.name!r}, public={public.hex()}…, "
            "private_scalar=<redacted>)"
        )

    def __enter__(self) -> ExportedKey:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.wipe()


class Tpm:
    """One ESAPI connection to a TPM. Calls are serialized, so threads may share it.

    After a :class:`TpmUnavailable` from a command (TPM reset, connection lost), close this
    instance and open a new one: the cached storage primary may be gone.
    """

    def __init__(self, tcti: str, *, flush_leftovers: bool = True) -> None:
        """Open the ESAPI context over ``tcti`` (e.g. ``device:/dev/tpmrm0``).

        ``flush_leftovers=False`` for a brief user beside a running keygen worker (unsealing
        the KEK ring): on a TPM without a resource manager the leftovers may be the worker's.
        Even with it, nothing is flushed while another ``Tpm`` of this host holds the same TPM
        (a running keygen worker; ``zandd tpm check`` beside it): see ``TpmHold``.

        Raises:
            TpmUnavailable: the TCTI cannot be loaded or the TPM does not answer.
        """
        self._lock = threading.Lock()
        self._primary: Any = None
        self._hold = TpmHold(tcti)
        try:
            self._ectx: Any = ESAPI(tcti)
        except Exception as exc:
            self._hold.release()
            raise TpmUnavailable(f"cannot open the TPM through TCTI {tcti!r}: {exc}") from exc
        try:
            if flush_leftovers and self._hold.alone():
                with _tss_errors("clearing objects a previous keygen worker left"):
                    _flush_leftovers(self._ectx)
            elif flush_leftovers:
                logger.info(
                    "another process holds the TPM at %s (a running keygen worker?): its "
                    "objects are left alone",
                    tcti,
                )
        except BaseException:
            self._hold.release()
            self._ectx.close()
            raise
        self._hold.share()

    def info(self) -> TpmInfo:
        """Manufacturer, vendor string, firmware version and spec level of the TPM."""
        with self._lock, _tss_errors("reading the TPM properties"):
            props = _fixed_properties(self._context())
        return TpmInfo(
            manufacturer=_ascii(props.get(TPM2_PT.MANUFACTURER, 0)),
            vendor=_ascii(*(props.get(p, 0) for p in _VENDOR_STRINGS)),
            firmware_version=_firmware_version(
                props.get(TPM2_PT_FIRMWARE.VERSION_1, 0), props.get(TPM2_PT_FIRMWARE.VERSION_2, 0)
            ),
            spec=_spec_version(
                _ascii(props.get(TPM2_PT.FAMILY_INDICATOR, 0)),
                props.get(TPM2_PT.LEVEL, 0),
                props.get(TPM2_PT.REVISION, 0),
            ),
        )

    def get_random(self, n_bytes: int) -> bytes:
        """``n_bytes`` from the TPM's RNG, in as many TPM2_GetRandom calls as needed."""
        if n_bytes < 0:
            raise ValueError("n_bytes must not be negative")
        out = bytearray()
        try:
            with self._lock, _tss_errors("TPM2_GetRandom"):
                ectx = self._context()
                while len(out) < n_bytes:
                    digest = ectx.get_random(min(n_bytes - len(out), _RANDOM_CHUNK_BYTES))
                    if not len(digest):
                        raise TpmUnavailable("the TPM returned no random bytes")
                    out += digest.buffer
                    # The bytes may become key material (the KEK ring): clear the C copy.
                    _zero_tpm2b(digest)
            return bytes(out)
        finally:
            wipe(out)

    def create_exportable_p256(self, while_loaded: LoadedHook | None = None) -> ExportedKey:
        """Generate a P-256 key in the TPM, export it, flush it, and check it
        (:meth:`create_exportable` for ``ecdsa-p256-sha256``)."""
        return self.create_exportable(ALGORITHM_ECDSA_P256_SHA256, while_loaded)

    def create_exportable(
        self, algorithm: str, while_loaded: LoadedHook | None = None
    ) -> ExportedKey:
        """Generate a key of ``algorithm`` in the TPM, export it, flush it, and check it.

        ``while_loaded(esapi_context, key_handle, public)`` runs while the new key is loaded,
        before the export (to certify it); it must flush whatever it loads.

        Raises:
            TpmUnavailable: a TPM command failed.
            IntegrityError: the exported private value does not match the TPM's public key.
        """
        spec = algorithm_spec(algorithm)
        rsa_key = spec.family == "rsa"
        scalar = bytearray(spec.rsa_bits // 16 if rsa_key else spec.coordinate_bytes)
        sensitive_type = TPM2_ALG.RSA if rsa_key else TPM2_ALG.ECC

        def export(ectx: Any, primary: Any) -> TPM2B_PUBLIC:
            private, public, _, _, _ = ectx.create(primary, None, _exportable_key_template(spec))
            with (
                _flushed(ectx, ectx.load(primary, private, public)) as key,
                _flushed(ectx, _salted_policy_session(ectx, primary)) as session,
            ):
                if while_loaded is not None:
                    while_loaded(ectx, key, public)
                ectx.policy_command_code(session, TPM2_CC.Duplicate)
                _export_scalar(ectx, key, session, into=scalar, sensitive_type=sensitive_type)
            return public

        try:
            public = self.under_storage_primary("key generation", export)
            if rsa_key:
                exported = ExportedKey(
                    scalar, algorithm=spec.name, modulus=_public_modulus(public, spec)
                )
            else:
                exported = ExportedKey(
                    scalar, *_public_point(public, spec.coordinate_bytes), algorithm=spec.name
                )
            _check_pair(exported)
        except BaseException:
            wipe(scalar)
            raise
        return exported

    def supported_algorithms(self) -> dict[str, bool]:
        """Which algorithms of the contract this TPM can generate: ``TPM2_TestParms`` on each
        key template (swtpm 0.7 with libtpms: all of them; RSA 4096 it refuses)."""
        supported: dict[str, bool] = {}
        with self._lock, _tss_errors("TPM2_TestParms"):
            ectx = self._context()
            for name, spec in ALGORITHMS.items():
                area = _exportable_key_template(spec).publicArea
                parms = TPMT_PUBLIC_PARMS(type=area.type, parameters=area.parameters)
                try:
                    ectx.test_parms(parms)
                except TSS2_Exception:
                    supported[name] = False
                else:
                    supported[name] = True
        return supported

    def under_storage_primary(self, action: str, command: Callable[[Any, Any], T]) -> T:
        """Run ``command(esapi_context, storage_primary)`` with the TPM to ourselves.

        TSS errors become ``TpmUnavailable`` naming ``action``. ``command`` must flush every
        object it loads (a TPM without a resource manager keeps them).
        """
        with self._lock, _tss_errors(action):
            ectx = self._context()
            return command(ectx, self._storage_primary(ectx))

    def with_context(self, action: str, command: Callable[[Any], T]) -> T:
        """Run ``command(esapi_context)`` with the TPM to ourselves, without the storage primary
        (one object slot fewer, for a brief user beside a running keygen worker)."""
        with self._lock, _tss_errors(action):
            return command(self._context())

    def close(self) -> None:
        """Flush the storage primary and close the ESAPI context; idempotent."""
        with self._lock:
            if self._ectx is None:
                return
            try:
                if self._primary is not None:
                    self._ectx.flush_context(self._primary)
            except TSS2_Exception as exc:
                # The TPM may have been reset or gone away; its transient objects went with it.
                logger.warning("could not flush the TPM storage primary: %s", exc)
            finally:
                self._primary = None
                self._ectx.close()
                self._ectx = None
                self._hold.release()

    def __enter__(self) -> Tpm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _context(self) -> Any:
        if self._ectx is None:
            raise TpmUnavailable("the TPM connection is closed")
        return self._ectx

    def _storage_primary(self, ectx: Any) -> Any:
        if self._primary is None:
            self._primary, _, _, _, _ = ectx.create_primary(
                None, _storage_template(), ESYS_TR.OWNER
            )
        return self._primary


class TpmHold:
    """This process's claim on a TPM, so no other ``zandd`` process flushes its objects.

    A TPM without a resource manager (swtpm, ``/dev/tpm0``) shows every client's transient
    objects to every other; flushing "leftovers" at open would flush a running keygen worker's
    storage primary. Each ``Tpm`` holds a shared ``flock`` on a per-TPM lock file (in the
    temp dir, named by a hash of the TPM's address) while open; it flushes leftovers only when
    it can take the lock exclusively, i.e. when no other process has that TPM open. The kernel
    drops the lock of a process that dies, so a SIGKILLed worker's leftovers are flushed by
    the next opener. Never blocks: a lock file it cannot open or lock means "not alone".
    """

    def __init__(self, tcti: str) -> None:
        self._fd: int | None
        try:
            self._fd = os.open(tpm_lock_path(tcti), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            logger.info("cannot open the TPM lock file (%s): leftovers are not flushed", exc)
            self._fd = None

    def alone(self) -> bool:
        """Take the lock exclusively if no other process holds it (then flushing is safe)."""
        if self._fd is None:
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

    def share(self) -> None:
        """Hold the lock shared (from exclusive, or anew) for as long as the TPM is open."""
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                logger.info("cannot hold the TPM lock shared (%s)", exc)

    def release(self) -> None:
        """Let go of the lock; idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def tpm_lock_path(tcti: str) -> Path:
    """The lock file of the TPM ``tcti`` reaches: one per device path or swtpm address."""
    kind, _, conf = tcti.partition(":")
    if kind in ("swtpm", "mssim"):
        options = dict(part.split("=", 1) for part in conf.split(",") if "=" in part)
        where = f"{options.get('host', '127.0.0.1')}:{options.get('port', '2321')}"
    else:
        where = conf or tcti
    digest = hashlib.sha256(f"{kind}:{where}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"zandd-tpm-{digest}.lock"


def default_tcti() -> str | None:
    """The TCTI of the local TPM device (resource manager preferred), or None if there is none."""
    for device in ("/dev/tpmrm0", "/dev/tpm0"):
        if Path(device).exists():
            return f"device:{device}"
    return None


_VENDOR_STRINGS = (
    TPM2_PT_VENDOR.STRING_1,
    TPM2_PT_VENDOR.STRING_2,
    TPM2_PT_VENDOR.STRING_3,
    TPM2_PT_VENDOR.STRING_4,
)


_LEFTOVER_HANDLE_TYPES = (TPM2_HT.TRANSIENT, TPM2_HT.HMAC_SESSION, TPM2_HT.POLICY_SESSION)


def _flush_leftovers(ectx: Any) -> None:
    """Flush transient objects and loaded sessions a killed predecessor left in the TPM.

    The keygen worker is the TPM's only user. Behind a resource manager (``/dev/tpmrm0``) we
    see only our own (none yet) and this does nothing; a TPM without one (swtpm, ``/dev/tpm0``)
    keeps whatever a SIGKILLed worker had loaded, and has only a few object slots.
    """
    for handle_type in _LEFTOVER_HANDLE_TYPES:
        _, data = ectx.get_capability(TPM2_CAP.HANDLES, handle_type << 24, 64)
        for handle in list(data.data.handles):
            logger.warning("flushing TPM handle 0x%08x left by a previous process", int(handle))
            ectx.flush_context(ectx.tr_from_tpmpublic(handle))


@contextmanager
def _tss_errors(action: str) -> Iterator[None]:
    try:
        yield
    except TSS2_Exception as exc:
        raise TpmUnavailable(f"{action} failed in the TPM stack: {exc}") from exc


@contextmanager
def _flushed(ectx: Any, handle: Any) -> Iterator[Any]:
    """Yield ``handle`` and flush it from the TPM afterwards, whatever happened."""
    try:
        yield handle
    finally:
        ectx.flush_context(handle)


def _storage_template() -> TPM2B_PUBLIC:
    return TPM2B_PUBLIC.parse("ecc256:aes128cfb", objectAttributes=_STORAGE_ATTRIBUTES)


def key_template_text(spec: AlgorithmSpec) -> str:
    """The tpm2-pytss template of a key of ``spec``: curve or size, and the TPM's own scheme
    (what ``TPM2_Certify`` shows; the signers apply the algorithm's scheme in software)."""
    # The explicit ":null" symmetric part: tpm2-pytss 3.0 reads "rsapss-…" alone as asking
    # for AES, which TPM2_Create refuses for a signing key (TPM_RC_SYMMETRIC).
    if spec.family == "rsa":
        return f"rsa{spec.rsa_bits}:{'rsapss' if spec.pss else 'rsassa'}-{spec.hash_name}:null"
    return f"ecc{spec.coordinate_bytes * 8}:ecdsa-{spec.hash_name}:null"


def _exportable_key_template(
    spec: AlgorithmSpec | None = None,
) -> TPM2B_PUBLIC:
    spec = spec if spec is not None else algorithm_spec(ALGORITHM_ECDSA_P256_SHA256)
    return TPM2B_PUBLIC.parse(
        key_template_text(spec),
        objectAttributes=_EXPORTABLE_KEY_ATTRIBUTES,
        authPolicy=DUPLICATE_ONLY_POLICY,
    )


def _salted_policy_session(ectx: Any, salt_key: Any) -> Any:
    """A policy session salted to ``salt_key`` that encrypts the command's first parameter.

    The salt travels encrypted to ``salt_key`` (ECDH for the storage primary), so the session
    key, and the ``encryptionKeyIn`` it protects, never cross the interface in the clear.
    """
    session = ectx.start_auth_session(
        tpm_key=salt_key,
        bind=ESYS_TR.NONE,
        session_type=TPM2_SE.POLICY,
        symmetric=TPMT_SYM_DEF.parse(_AES128_CFB),
        auth_hash=TPM2_ALG.SHA256,
    )
    try:
        ectx.trsess_set_attributes(session, TPMA_SESSION.DECRYPT, TPMA_SESSION.DECRYPT)
    except BaseException:
        ectx.flush_context(session)
        raise
    return session


def _export_scalar(
    ectx: Any, key: Any, session: Any, *, into: bytearray, sensitive_type: int = TPM2_ALG.ECC
) -> None:
    """Duplicate ``key`` under a one-use inner wrapper, unwrap it, copy the scalar ``into``.

    The inner key comes from the OS RNG, not TPM2_GetRandom, whose response is in the clear.
    """
    inner_key = bytearray(os.urandom(_INNER_KEY_BYTES))
    key_in = TPM2B_DATA(bytes(len(inner_key)))
    try:
        key_in.buffer[:] = inner_key
        # ESYS_TR.NULL, not ESYS_TR.NONE: with NONE, ESAPI sends TPM_RH_NULL but puts an empty
        # name into the cpHash, and the TPM rejects the policy session's HMAC (TPM_RC_BAD_AUTH).
        _, duplicate, _ = ectx.duplicate(
            key,
            ESYS_TR.NULL,
            key_in,
            TPMT_SYM_DEF_OBJECT.parse(_AES128_CFB),
            session1=session,
        )
        try:
            _unwrap_inner(
                duplicate.buffer,
                inner_key,
                bytes(ectx.tr_get_name(key)),
                into=into,
                sensitive_type=sensitive_type,
            )
        finally:
            _zero_tpm2b(duplicate)
    finally:
        _zero_tpm2b(key_in)
        wipe(inner_key)


def _unwrap_inner(
    wrapped: memoryview | bytes,
    inner_key: bytearray,
    name: bytes,
    *,
    into: bytearray,
    sensitive_type: int = TPM2_ALG.ECC,
) -> None:
    """Decipher an inner-wrapped duplicate, check its integrity, copy the private value
    (the ECC scalar, or RSA's prime ``p``: ``sensitive_type``) ``into``.

    The layout (TPM 2.0 part 1, 23.3.2.3): AES-CFB with ``inner_key`` and a zero IV over
    ``TPM2B(innerIntegrity) || TPM2B_SENSITIVE``, where ``innerIntegrity`` is
    ``SHA-256(TPM2B_SENSITIVE || name)``.

    Raises:
        IntegrityError: the integrity digest does not match, or the area is not an ECC key.
    """
    plain = bytearray(len(wrapped) + _AES_BLOCK_BYTES - 1)
    try:
        decryptor = Cipher(algorithms.AES(inner_key), CFB(bytes(_AES_BLOCK_BYTES))).decryptor()
        size = decryptor.update_into(wrapped, plain)
        decryptor.finalize()
        view = memoryview(plain)[:size]
        integrity, sensitive = _take_tpm2b(view)
        expected = hashlib.sha256(sensitive)
        expected.update(name)
        if not hmac.compare_digest(integrity, expected.digest()):
            raise IntegrityError("the TPM's duplicate fails its inner integrity check")
        _copy_scalar(sensitive, into=into, sensitive_type=sensitive_type)
    finally:
        wipe(plain)


def _copy_scalar(
    marshalled: memoryview, *, into: bytearray, sensitive_type: int = TPM2_ALG.ECC
) -> None:
    """Copy the private value of a marshalled ``TPM2B_SENSITIVE`` into ``into``: the ECC
    scalar (``TPM2B_ECC_PARAMETER``) or the RSA prime ``p`` (``TPM2B_PRIVATE_KEY_RSA``).

    Parsed in place, field by field, so that no immutable copy of the sensitive area exists.
    """
    kind = "RSA" if sensitive_type == TPM2_ALG.RSA else "ECC"
    area, rest = _take_tpm2b(marshalled)
    if len(rest) or len(area) < 2 or int.from_bytes(area[:2], "big") != sensitive_type:
        raise IntegrityError(f"the TPM's duplicate is not a plain {kind} sensitive area")
    _, rest = _take_tpm2b(area[2:])  # authValue
    _, rest = _take_tpm2b(rest)  # seedValue
    scalar, rest = _take_tpm2b(rest)
    if len(rest):
        raise IntegrityError(f"the TPM's duplicate is not a plain {kind} sensitive area")
    if len(scalar) > len(into):
        raise IntegrityError(
            f"the TPM exported an {kind} private value longer than {len(into)} bytes"
        )
    into[len(into) - len(scalar) :] = scalar


def _take_tpm2b(data: memoryview) -> tuple[memoryview, memoryview]:
    """Split a marshalled TPM2B (big-endian 16-bit size, then the bytes) off ``data``."""
    if len(data) < 2:
        raise IntegrityError("the TPM's duplicate is truncated")
    size = int.from_bytes(data[:2], "big")
    if len(data) < 2 + size:
        raise IntegrityError("the TPM's duplicate is truncated")
    return data[2 : 2 + size], data[2 + size :]


def _public_point(public: TPM2B_PUBLIC, size: int = P256_BYTES) -> tuple[bytes, bytes]:
    point = public.publicArea.unique.ecc
    return _left_pad(bytes(point.x), size), _left_pad(bytes(point.y), size)


def _left_pad(coordinate: bytes, size: int = P256_BYTES) -> bytes:
    if len(coordinate) > size:
        raise IntegrityError(f"the TPM reported an EC coordinate longer than {size} bytes")
    return coordinate.rjust(size, b"\0")


def _public_modulus(public: TPM2B_PUBLIC, spec: AlgorithmSpec) -> bytes:
    """The RSA modulus the TPM reported; its exponent must be the default (0 = 65537)."""
    area = public.publicArea
    exponent = int(area.parameters.rsaDetail.exponent)
    if exponent not in (0, RSA_PUBLIC_EXPONENT):
        raise IntegrityError("the TPM made an RSA key with another exponent than 65537")
    modulus = bytes(area.unique.rsa)
    if len(modulus) != spec.rsa_bits // 8 or not modulus[0] & 0x80:
        raise IntegrityError(f"the TPM reported an RSA modulus that is not {spec.rsa_bits} bits")
    return modulus


def _check_pair(key: ExportedKey) -> None:
    """Derive the public key from the private value and compare it with the TPM's."""
    reported = key.public_key()
    try:
        if isinstance(reported, rsa.RSAPublicKey):
            rsa_private_key(key.private_scalar, reported, validate=True)
            return
        derived = ec.derive_private_key(
            int.from_bytes(key.private_scalar, "big"), key.algorithm.curve()
        )
    except ValueError as exc:
        raise IntegrityError(f"the TPM exported an invalid {key.algorithm.name} key") from exc
    if derived.public_key().public_numbers() != reported.public_numbers():
        raise IntegrityError("the exported private scalar does not match the TPM's public key")


def _zero_tpm2b(value: Any) -> None:
    """Zero the bytes of a tpm2-pytss TPM2B in its C memory (its buffer is a writable view)."""
    view = value.buffer
    view[:] = bytes(len(view))


def _fixed_properties(ectx: Any) -> dict[int, int]:
    """The fixed TPM properties up to the firmware version, following ``moreData``."""
    last = int(TPM2_PT_FIRMWARE.VERSION_2)
    props: dict[int, int] = {}
    prop = int(TPM2_PT.FIXED)
    while prop <= last:
        more, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, prop, last - prop + 1)
        tagged = list(data.data.tpmProperties)
        props.update((int(t.property), int(t.value)) for t in tagged)
        if not more or not tagged:
            break
        prop = int(tagged[-1].property) + 1
    return props


def _ascii(*words: int) -> str:
    """Decode 32-bit property words holding big-endian ASCII (e.g. ``b"IBM\\0"``)."""
    raw = b"".join(word.to_bytes(4, "big") for word in words)
    return raw.replace(b"\0", b"").decode("ascii", "replace").strip()


def _firmware_version(version_1: int, version_2: int) -> str:
    # The usual reading (tpm2-tools, fwupd): four 16-bit numbers, most significant first.
    return f"{version_1 >> 16}.{version_1 & 0xFFFF}.{version_2 >> 16}.{version_2 & 0xFFFF}"


def _spec_version(family: str, level: int, revision: int) -> str:
    # TPM_PT_REVISION is the spec revision times 100; the level is 0 for every TPM 2.0 spec.
    level_part = f" level {level}" if level else ""
    return f"{family}{level_part} rev {revision // 100}.{revision % 100:02d}"
