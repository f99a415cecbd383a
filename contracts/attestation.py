"""Key attestation: check what the TPM said about a key, with the fleet's pinned attestation key.

When the keygen worker creates a key it has the TPM certify the new object (``TPM2_Certify``)
with the fleet attestation key, a restricted signing key that never leaves the TPM. The reply
of ``key.create`` / ``key.public`` carries three parts (``KeyAttestation``):

- ``public_area``: the key's ``TPMT_PUBLIC`` as the TPM marshalled it (type, name algorithm,
  object attributes, authorization policy, parameters, the public point);
- ``certify_info``: the ``TPMS_ATTEST`` the TPM signed (``TPM_ST_ATTEST_CERTIFY``), naming the
  certified object by its TPM name, ``nameAlg || H(TPMT_PUBLIC)``;
- ``signature``: the attestation key's ECDSA P-256/SHA-256 signature over ``certify_info``, DER.

:func:`verify_attestation` needs no TPM library: it parses both structures by hand (TPM 2.0
Part 2, big-endian) and checks the signature with the attestation key the caller pinned, that
the certified name is the name of ``public_area``, that ``public_area`` holds the very public
key the caller was given, that the qualifying data binds the key id and version, and that the
TPM generated the key itself (``sensitiveDataOrigin``). It then reports plainly whether the key
is bound to the TPM (``fixedTPM``/``fixedParent``) or exportable, and under which policy. Trust
comes from the pinned attestation key alone: the vault and the fleet may both lie.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from contracts.algorithms import RSA_PUBLIC_EXPONENT, PublicKey
from contracts.crypto import load_public_key, public_key_pem
from contracts.errors import IntegrityError, InvalidRequest
from contracts.models import KeyAttestation

TPM_GENERATED_VALUE: Final = 0xFF544347
TPM_ST_ATTEST_CERTIFY: Final = 0x8017
TPM_ALG_SHA256: Final = 0x000B
TPM_ALG_ECC: Final = 0x0023
TPM_ALG_NULL: Final = 0x0010
TPM_ECC_NIST_P256: Final = 0x0003
TPM_ECC_NIST_P384: Final = 0x0004
TPM_ALG_RSA: Final = 0x0001
_CURVE_IDS: Final = {"secp256r1": TPM_ECC_NIST_P256, "secp384r1": TPM_ECC_NIST_P384}

# TPMA_OBJECT bits (TPM 2.0 Part 2, 8.3).
FIXED_TPM: Final = 1 << 1
FIXED_PARENT: Final = 1 << 4
SENSITIVE_DATA_ORIGIN: Final = 1 << 5
USER_WITH_AUTH: Final = 1 << 6
ADMIN_WITH_POLICY: Final = 1 << 7
RESTRICTED: Final = 1 << 16
DECRYPT: Final = 1 << 17
SIGN_ENCRYPT: Final = 1 << 18

_ATTRIBUTE_NAMES: Final = (
    (FIXED_TPM, "fixedTPM"),
    (FIXED_PARENT, "fixedParent"),
    (SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
    (USER_WITH_AUTH, "userWithAuth"),
    (ADMIN_WITH_POLICY, "adminWithPolicy"),
    (RESTRICTED, "restricted"),
    (DECRYPT, "decrypt"),
    (SIGN_ENCRYPT, "sign"),
)

#: Policy digest of TPM2_PolicyCommandCode(TPM_CC_Duplicate) from a fresh SHA-256 session:
#: the only policy of an exportable key, which lets the keygen worker duplicate it once.
DUPLICATE_ONLY_POLICY: Final = hashlib.sha256(
    bytes(32) + struct.pack(">II", 0x0000016C, 0x0000014B)
).digest()

_QUALIFYING_TAG: Final = b"zandd-attest/1"
_MAX_PART_BYTES: Final = 1024


def qualifying_data(key_id: str, version: int) -> bytes:
    """What the keygen worker passes to TPM2_Certify: SHA-256 binding the key id and version,
    so an attestation of one key cannot be shown for another."""
    encoded = key_id.encode("utf-8")
    return hashlib.sha256(
        _QUALIFYING_TAG + struct.pack(">I", len(encoded)) + encoded + struct.pack(">Q", version)
    ).digest()


@dataclass(frozen=True, slots=True)
class AttestationParts:
    """The parts of a key attestation, as stored in the vault and sent on the wire.

    ``signer`` is the SubjectPublicKeyInfo DER of the attestation key that signed, as the
    keygen worker saw it: it tells which key to look for, and is never what a verifier trusts.
    """

    public_area: bytes
    certify_info: bytes
    signature: bytes
    signer: bytes = b""

    def encode(self) -> bytes:
        """One length-prefixed blob, how the vault keeps it."""
        return b"".join(
            struct.pack(">H", len(part)) + part
            for part in (self.public_area, self.certify_info, self.signature, self.signer)
        )

    @classmethod
    def decode(cls, blob: bytes) -> AttestationParts:
        """The parts of an :meth:`encode` blob; IntegrityError if it is not one."""
        reader = _Reader(blob, "stored attestation")
        parts = [reader.sized() for _ in range(4)]
        reader.end()
        return cls(*parts)


@dataclass(frozen=True, slots=True)
class CertifyInfo:
    """The fields of a ``TPMS_ATTEST`` of type ``TPM_ST_ATTEST_CERTIFY``."""

    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    name: bytes
    qualified_name: bytes


@dataclass(frozen=True, slots=True)
class PublicArea:
    """The fields of an ECC or RSA ``TPMT_PUBLIC`` that attestation is about: for ECC the
    curve and point, for RSA (``key_type`` ``TPM_ALG_RSA``, ``curve_id`` 0) the modulus in
    ``x`` and the exponent (0 meaning 65537)."""

    name_alg: int
    object_attributes: int
    auth_policy: bytes
    curve_id: int
    x: bytes
    y: bytes
    key_type: int = TPM_ALG_ECC
    exponent: int = 0


@dataclass(frozen=True, slots=True)
class AttestationReport:
    """What a verified attestation says about the key."""

    fixed_tpm: bool
    fixed_parent: bool
    sensitive_data_origin: bool
    attributes: tuple[str, ...]
    policy_digest: bytes
    policy: str
    firmware_version: int
    clock: int
    reset_count: int
    restart_count: int

    @property
    def tpm_bound(self) -> bool:
        """True when the key can never leave its TPM (``fixedTPM`` and ``fixedParent``)."""
        return self.fixed_tpm and self.fixed_parent

    def describe(self) -> str:
        """The report in plain words, one fact per line."""
        if self.tpm_bound:
            where = "bound to its TPM (fixedTPM|fixedParent): it never left it"
        else:
            where = (
                "EXPORTABLE (no fixedTPM/fixedParent): the TPM let the keygen worker export it "
                "once; after that the vault's sealing protects it, not the TPM"
            )
        return "\n".join(
            (
                "attestation OK: created inside the TPM (sensitiveDataOrigin)",
                f"key: {where}",
                f"policy: {self.policy} ({self.policy_digest.hex() or 'empty'})",
                f"attributes: {'|'.join(self.attributes)}",
                f"TPM firmware: {self.firmware_version:#018x}, clock {self.clock} ms, "
                f"resets {self.reset_count}, restarts {self.restart_count}",
            )
        )


class _Reader:
    """Big-endian TPM structure reader that refuses truncation and overlong sizes."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._at = 0
        self._what = what

    def take(self, count: int) -> bytes:
        if count < 0 or self._at + count > len(self._data):
            raise IntegrityError(f"the {self._what} is truncated")
        chunk = self._data[self._at : self._at + count]
        self._at += count
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def sized(self) -> bytes:
        size = self.uint(2)
        if size > _MAX_PART_BYTES:
            raise IntegrityError(f"the {self._what} holds an oversized field")
        return self.take(size)

    def end(self) -> None:
        if self._at != len(self._data):
            raise IntegrityError(f"the {self._what} has trailing bytes")


def parse_certify_info(data: bytes) -> CertifyInfo:
    """Parse a ``TPMS_ATTEST`` that must be a TPM-generated certification."""
    reader = _Reader(data, "TPMS_ATTEST")
    if reader.uint(4) != TPM_GENERATED_VALUE:
        raise IntegrityError("the TPMS_ATTEST was not generated by a TPM (bad magic)")
    if reader.uint(2) != TPM_ST_ATTEST_CERTIFY:
        raise IntegrityError("the TPMS_ATTEST is not a TPM2_Certify attestation")
    signer, extra = reader.sized(), reader.sized()
    clock, reset_count, restart_count, safe = struct.unpack(">QIIB", reader.take(17))
    firmware = reader.uint(8)
    name, qualified_name = reader.sized(), reader.sized()
    reader.end()
    return CertifyInfo(
        signer, extra, clock, reset_count, restart_count, bool(safe), firmware, name, qualified_name
    )


def parse_public_area(data: bytes) -> PublicArea:
    """Parse an ECC or RSA ``TPMT_PUBLIC`` (as the keygen worker makes them)."""
    reader = _Reader(data, "TPMT_PUBLIC")
    key_type = reader.uint(2)
    if key_type not in (TPM_ALG_ECC, TPM_ALG_RSA):
        raise IntegrityError("the attested public area is neither an ECC nor an RSA key")
    name_alg, attributes, policy = reader.uint(2), reader.uint(4), reader.sized()
    if key_type == TPM_ALG_RSA:
        if reader.uint(2) != TPM_ALG_NULL:  # symmetric
            raise IntegrityError("the attested key has a symmetric algorithm: not a signing key")
        if reader.uint(2) != TPM_ALG_NULL:  # the scheme's hash follows a non-NULL scheme
            reader.uint(2)
        reader.uint(2)  # keyBits: the modulus below says it
        exponent = reader.uint(4)
        modulus = reader.sized()
        reader.end()
        return PublicArea(
            name_alg, attributes, policy, 0, modulus, b"", key_type=TPM_ALG_RSA, exponent=exponent
        )
    if reader.uint(2) != TPM_ALG_NULL:  # symmetric: a signing key has none
        raise IntegrityError("the attested key has a symmetric algorithm: not a signing key")
    if reader.uint(2) != TPM_ALG_NULL:  # the scheme's hash follows a non-NULL scheme
        reader.uint(2)
    curve = reader.uint(2)
    if reader.uint(2) != TPM_ALG_NULL:  # kdf
        reader.uint(2)
    x, y = reader.sized(), reader.sized()
    reader.end()
    return PublicArea(name_alg, attributes, policy, curve, x, y)


def tpm_name(public_area: bytes) -> bytes:
    """The TPM name of an object whose name algorithm is SHA-256."""
    return struct.pack(">H", TPM_ALG_SHA256) + hashlib.sha256(public_area).digest()


def _check_point(area: PublicArea, public_key: PublicKey) -> None:
    if area.name_alg != TPM_ALG_SHA256:
        raise IntegrityError("the attested key is not named with SHA-256")
    if isinstance(public_key, rsa.RSAPublicKey):
        rsa_numbers = public_key.public_numbers()
        exponent = area.exponent or RSA_PUBLIC_EXPONENT
        if (
            area.key_type != TPM_ALG_RSA
            or int.from_bytes(area.x, "big") != rsa_numbers.n
            or exponent != rsa_numbers.e
        ):
            raise IntegrityError(
                "the attested public area holds another public key than the one given"
            )
        return
    if area.key_type != TPM_ALG_ECC or area.curve_id != _CURVE_IDS.get(public_key.curve.name):
        raise IntegrityError("the attested key is not on the curve of the key given")
    numbers = public_key.public_numbers()
    if (int.from_bytes(area.x, "big"), int.from_bytes(area.y, "big")) != (numbers.x, numbers.y):
        raise IntegrityError("the attested public area holds another public key than the one given")


def _policy_name(digest: bytes) -> str:
    if not digest:
        return "none (no policy: only the object's authValue)"
    if digest == DUPLICATE_ONLY_POLICY:
        return "PolicyCommandCode(TPM2_Duplicate): duplication only"
    return "unknown policy"


def verify_attestation(
    parts: AttestationParts,
    public_key: PublicKey,
    attestation_key: ec.EllipticCurvePublicKey,
    *,
    key_id: str,
    version: int,
) -> AttestationReport:
    """Check an attestation of ``key_id`` v``version`` against a pinned attestation key.

    Raises:
        IntegrityError: the signature, the name, the public key, the qualifying data or the
            attributes do not hold; the message says which.
    """
    try:
        attestation_key.verify(parts.signature, parts.certify_info, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise IntegrityError(
            "the attestation signature does not verify with the pinned key"
        ) from exc
    info = parse_certify_info(parts.certify_info)
    area = parse_public_area(parts.public_area)
    if info.name != tpm_name(parts.public_area):
        raise IntegrityError("the certified TPM name is not the name of the attested public area")
    _check_point(area, public_key)
    if info.extra_data != qualifying_data(key_id, version):
        raise IntegrityError(f"the attestation was made for another key than {key_id} v{version}")
    if not area.object_attributes & SENSITIVE_DATA_ORIGIN:
        raise IntegrityError("the key was not generated inside the TPM (no sensitiveDataOrigin)")
    attributes = area.object_attributes
    return AttestationReport(
        fixed_tpm=bool(attributes & FIXED_TPM),
        fixed_parent=bool(attributes & FIXED_PARENT),
        sensitive_data_origin=True,
        attributes=tuple(name for bit, name in _ATTRIBUTE_NAMES if attributes & bit),
        policy_digest=area.auth_policy,
        policy=_policy_name(area.auth_policy),
        firmware_version=info.firmware_version,
        clock=info.clock,
        reset_count=info.reset_count,
        restart_count=info.restart_count,
    )


def attestation_reply(blob: bytes | None) -> KeyAttestation | None:
    """The wire form of a stored attestation blob (None stays None)."""
    if blob is None:
        return None
    parts = AttestationParts.decode(blob)
    signer = None
    if parts.signer:
        try:
            signer = public_key_pem(load_public_key(parts.signer))
        except (InvalidRequest, ValueError) as exc:
            raise IntegrityError("the stored attestation names a malformed signing key") from exc
    return KeyAttestation(
        public_area=parts.public_area,
        certify_info=parts.certify_info,
        signature=parts.signature,
        attestation_key_pem=signer,
    )


def parts_of(reply: KeyAttestation) -> AttestationParts:
    """The parts of a ``key.create``/``key.public`` reply's attestation (the key it names as
    its signer left out: only a pinned attestation key is checked against)."""
    return AttestationParts(reply.public_area, reply.certify_info, reply.signature)
