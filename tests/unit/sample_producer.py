"""A sample producer: an invoicing service that signs its invoices with ZANDD.

Written as a producer would write it, against the client API alone; its unit tests
(``test_sample_producer.py``) run it on ``contracts.testing.FakeFleet``, no broker needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from contracts.client import SigningClient
from contracts.errors import Forbidden, KeyDisabled, KeyNotFound, ZanddError
from contracts.sync_client import SyncSigningClient


class InvoiceNotSigned(Exception):
    """The invoice could not be signed; ``reason`` says why, for the invoicing team."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SignedInvoice:
    """An invoice as sent: its canonical bytes and the signature over them."""

    body: bytes
    key_id: str
    key_version: int
    signature: bytes


def canonical(invoice: dict[str, Any]) -> bytes:
    """The bytes that get signed: sorted keys, no spaces."""
    return json.dumps(invoice, sort_keys=True, separators=(",", ":")).encode()


async def sign_invoice(
    client: SigningClient, key_id: str, invoice: dict[str, Any]
) -> SignedInvoice:
    """Sign one invoice; a retryable failure is tried once more, a refusal is explained."""
    body = canonical(invoice)
    for attempt in (1, 2):
        try:
            reply = await client.sign(key_id, body)
        except (KeyNotFound, KeyDisabled, Forbidden) as exc:
            raise InvoiceNotSigned(f"the invoicing key cannot sign: {exc.code.value}") from exc
        except ZanddError as exc:
            if exc.retryable and attempt == 1:
                continue
            raise InvoiceNotSigned(f"signing failed: {exc.code.value}") from exc
        return SignedInvoice(body, reply.key_id, reply.version, reply.signature)
    raise AssertionError("unreachable")


def sign_invoices(
    client: SyncSigningClient, key_id: str, invoices: list[dict[str, Any]]
) -> list[SignedInvoice]:
    """Sign a day's invoices in one ``sign.batch`` (blocking: for a Celery task)."""
    bodies = [canonical(invoice) for invoice in invoices]
    reply = client.sign_batch(key_id, bodies)
    return [
        SignedInvoice(body, reply.key_id, reply.version, signature)
        for body, signature in zip(bodies, reply.signatures, strict=True)
    ]


def is_authentic(public_key_pem: str, invoice: SignedInvoice) -> bool:
    """What the invoice's receiver runs: ECDSA P-256 over SHA-256, with ``cryptography``."""
    public_key = load_pem_public_key(public_key_pem.encode())
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    try:
        public_key.verify(invoice.signature, invoice.body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
